/*
 * HcBackend: c10d calls in, C-ABI calls out.
 *
 * Each c10d call checks its arguments, stages its tensors (zero copy for
 * contiguous CPU tensors), waits once for device-to-host copies, and submits
 * one or more core ops whose completion callbacks complete the returned Work.
 * The core runs collectives in issue order on its worker thread; this file
 * never blocks on the network except in monitoredBarrier, which is a
 * blocking call by definition.
 */
#include <Python.h>

#include <algorithm>
#include <climits>
#include <mutex>
#include <numeric>
#include <set>
#include <thread>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include "hetcomm_torch.hpp"

namespace hetcomm_torch {

extern std::atomic<const hc_api*> g_api;
thread_local bool t_in_core_callback = false;

namespace {

// Tags reserved for monitoredBarrier's messages (user tags are small).
constexpr int kMonitoredArriveTag = 0x7ffffff0;
constexpr int kMonitoredReleaseTag = 0x7ffffff1;

// Live backends, for shutdown_all() at interpreter exit.
std::mutex g_live_mu;
std::vector<c10::weak_intrusive_ptr<HcBackend>> g_live;

void* ptr(const at::Tensor& t) {
  return t.numel() ? t.data_ptr() : nullptr;
}

size_t count(const at::Tensor& t, const Wire& w) {
  return static_cast<size_t>(t.numel()) * static_cast<size_t>(w.per_element);
}

void check_tensor(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.defined(), "hetcomm: ", what, ": undefined tensor");
  TORCH_CHECK(
      t.layout() == at::kStrided,
      "hetcomm: ",
      what,
      ": only dense (strided) tensors are supported, got layout ",
      t.layout());
}

const at::Tensor& single(const std::vector<at::Tensor>& ts, const char* what) {
  TORCH_CHECK(
      ts.size() == 1,
      "hetcomm: ",
      what,
      " takes exactly one tensor per process (got ",
      ts.size(),
      ")");
  check_tensor(ts[0], what);
  return ts[0];
}

void check_like(const at::Tensor& t, const at::Tensor& ref, int64_t numel, const char* what, const char* role) {
  check_tensor(t, what);
  TORCH_CHECK(
      t.scalar_type() == ref.scalar_type(),
      "hetcomm: ",
      what,
      ": ",
      role,
      " has dtype ",
      t.scalar_type(),
      " but the input has ",
      ref.scalar_type());
  TORCH_CHECK(
      t.numel() == numel,
      "hetcomm: ",
      what,
      ": ",
      role,
      " holds ",
      t.numel(),
      " elements where ",
      numel,
      " are expected");
}

// If the tensors are contiguous CPU tensors laid end to end in memory (views
// of one flat buffer, as DDP and FSDP make them), a flat tensor over all of
// them: the core can write there directly.
std::optional<at::Tensor> adjacent_run(const std::vector<at::Tensor>& ts) {
  if (ts.empty())
    return std::nullopt;
  auto type = ts[0].scalar_type();
  auto base = static_cast<char*>(ts[0].numel() ? ts[0].data_ptr() : nullptr);
  if (!base)
    return std::nullopt;
  size_t offset = 0;
  for (const auto& t : ts) {
    if (!t.device().is_cpu() || !t.is_contiguous() || t.scalar_type() != type || t.is_conj() ||
        t.is_neg() || t.numel() == 0 || static_cast<char*>(t.data_ptr()) != base + offset)
      return std::nullopt;
    offset += t.nbytes();
  }
  int64_t total = static_cast<int64_t>(offset / c10::elementSize(type));
  // Every element of the run belongs to one of the tensors, so writing the
  // run writes exactly their elements.
  return at::from_blob(base, {total}, at::TensorOptions().dtype(type).device(at::kCPU));
}

// One flat host buffer receiving `ts` in order (copied into them at completion).
at::Tensor unpack_target(Staging& st, HcWork& work, const std::vector<at::Tensor>& ts, int64_t each) {
  if (auto run = adjacent_run(ts)) {
    for (const auto& t : ts)
      work.keep(t);
    return *run;
  }
  auto flat = st.scratch(each * static_cast<int64_t>(ts.size()), ts[0].scalar_type(), ts[0].device());
  for (size_t i = 0; i < ts.size(); i++)
    work.copy_back(ts[i], flat.narrow(0, static_cast<int64_t>(i) * each, each).view(ts[i].sizes()));
  return flat;
}

// One flat host buffer holding `ts` in order, each device tensor copied
// straight into its place. Waits for device copies.
at::Tensor pack(Staging& st, const std::vector<at::Tensor>& ts) {
  if (auto run = adjacent_run(ts)) {
    st.wait_inputs();
    return *run;
  }
  int64_t total = 0;
  at::Device like(at::kCPU);
  for (const auto& t : ts) {
    total += t.numel();
    if (!t.device().is_cpu())
      like = t.device();
  }
  auto flat = st.scratch(total, ts[0].scalar_type(), like);
  int64_t at_ = 0;
  for (const auto& t : ts) {
    if (t.numel())
      st.fill(flat.narrow(0, at_, t.numel()).view(t.sizes()), t);
    at_ += t.numel();
  }
  st.wait_inputs();
  return flat;
}

int64_t row_elems(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t d = 1; d < t.dim(); d++)
    n *= t.size(d);
  return n;
}

// Releases the GIL, if this thread holds it, while closing a communicator:
// its last completions may run Python callbacks on the worker thread.
struct NoGil {
  PyThreadState* saved = nullptr;
  NoGil() {
    if (Py_IsInitialized() && PyGILState_Check())
      saved = PyEval_SaveThread();
  }
  ~NoGil() {
    if (saved)
      PyEval_RestoreThread(saved);
  }
};

// Whether the core's table has `field` (the table grows at its end; an older
// core's is shorter).
#define HC_API_HAS(api, field) \
  ((api)->struct_size >= offsetof(hc_api, field) + sizeof((api)->field) && (api)->field)

} // namespace

// ---------------------------------------------------------------------------

HcBackend::HcBackend(
    const hc_api* api,
    hc_comm* comm,
    int rank,
    int size,
    std::chrono::milliseconds timeout,
    std::string name)
    : c10d::Backend(rank, size),
      api_(api),
      comm_(comm),
      timeout_ms_(clamp_ms(timeout)),
      name_(std::move(name)),
      inflight_(std::make_shared<std::atomic<int64_t>>(0)) {
  TORCH_CHECK(api_ && comm_, "hetcomm: null core table or communicator");
  TORCH_CHECK(
      api_->struct_size >= offsetof(hc_api, comm_destroy) + sizeof(api_->comm_destroy),
      "hetcomm: the C core is older than the torch shim (hc_api has ",
      api_->struct_size,
      " bytes); rebuild hetcomm");
  TORCH_CHECK(
      api_->comm_rank(comm_) == rank && api_->comm_size(comm_) == size,
      "hetcomm: communicator is rank ",
      api_->comm_rank(comm_),
      " of ",
      api_->comm_size(comm_),
      " but the process group is rank ",
      rank,
      " of ",
      size);
  g_api.store(api_, std::memory_order_release);
  init();
}

c10::intrusive_ptr<HcBackend> HcBackend::create(
    const hc_api* api,
    hc_comm* comm,
    int rank,
    int size,
    std::chrono::milliseconds timeout,
    std::string name) {
  auto backend = c10::make_intrusive<HcBackend>(api, comm, rank, size, timeout, std::move(name));
  std::lock_guard<std::mutex> lock(g_live_mu);
  g_live.erase(
      std::remove_if(g_live.begin(), g_live.end(), [](const auto& w) { return w.expired(); }),
      g_live.end());
  g_live.emplace_back(backend);
  return backend;
}

HcBackend::~HcBackend() {
  hc_comm* comm = nullptr;
  {
    std::unique_lock<std::shared_mutex> lock(comm_mu_);
    std::swap(comm, comm_);
  }
  if (!comm)
    return;
  if (t_in_core_callback) {
    // The last reference went away inside a completion on the
    // communicator's own worker thread, which cannot join itself.
    const hc_api* api = api_;
    std::thread([api, comm] { api->comm_destroy(comm); }).detach();
    return;
  }
  NoGil no_gil;
  api_->comm_destroy(comm);
}

int HcBackend::clamp_ms(std::chrono::milliseconds ms) {
  if (ms.count() < 0)
    return 0;
  return ms.count() > INT_MAX ? INT_MAX : static_cast<int>(ms.count());
}

int HcBackend::timeout_for(std::chrono::milliseconds requested) const {
  if (requested == c10d::kUnsetTimeout)
    return timeout_ms_.load();
  return clamp_ms(requested);
}

c10::intrusive_ptr<c10d::Backend::Options> HcBackend::getBackendOptions() {
  return c10::make_intrusive<c10d::Backend::Options>("hetcomm", timeout());
}

void HcBackend::check_root(int64_t root, const char* what) const {
  TORCH_CHECK(
      root >= 0 && root < size_,
      "hetcomm: ",
      what,
      ": root rank ",
      root,
      " is not in [0, ",
      size_,
      ")");
}

c10::intrusive_ptr<HcWork> HcBackend::make_work(
    c10d::OpType type,
    const char* title,
    const std::vector<at::Tensor>& inputs,
    std::vector<at::Tensor> result,
    bool collective,
    const char* what) {
  uint64_t seq = collective ? ++seq_ : seq_.load();
  auto work = c10::make_intrusive<HcWork>(
      rank_,
      type,
      title,
      std::optional<std::vector<at::Tensor>>(inputs),
      std::move(result),
      inflight_,
      seq,
      what);
  c10::weak_intrusive_ptr<HcBackend> self(c10::intrusive_ptr<HcBackend>::reclaim_copy(this));
  work->set_helper([self]() {
    if (auto backend = self.lock())
      backend->help_progress();
  });
  return work;
}

void HcBackend::help_progress() {
  if (t_in_core_callback)
    return;
  std::shared_lock<std::shared_mutex> lock(comm_mu_);
  if (comm_ && HC_API_HAS(api_, comm_progress))
    api_->comm_progress(comm_);
}

template <typename F>
void HcBackend::submit(HcWork& work, CallMode mode, F&& fn) {
  hc_call_opts opts;
  api_->call_opts_init(&opts);
  opts.timeout_ms = mode.timeout_ms;
  opts.on_done = &HcWork::on_done;
  std::shared_lock<std::shared_mutex> lock(comm_mu_);
  if (!comm_)
    throw_backend_error(c10::str(
        "hetcomm: rank ", rank_, ": process group '", name_, "' was shut down or aborted"));
  opts.user = work.add_op();
  inflight_->fetch_add(1, std::memory_order_relaxed);
  hc_op* op = nullptr;
  // Blocking: the core runs the op before returning (on this thread when
  // the communicator is idle) and completes the Work through on_done.
  int rc = fn(comm_, &opts, mode.blocking ? nullptr : &op);
  if (rc != HC_OK && !(mode.blocking && work.failed())) {
    inflight_->fetch_sub(1, std::memory_order_relaxed);
    work.cancel_op(opts.user);
    std::string detail = api_->last_error();
    if (detail.empty())
      detail = api_->status_name(rc);
    // Ops already submitted for this Work still complete (and release it);
    // the caller gets the error now.
    throw_backend_error(c10::str("hetcomm: rank ", rank_, ": ", detail));
  }
  if (op)
    api_->op_release(op);
}

c10::intrusive_ptr<c10d::Work> HcBackend::launched(const c10::intrusive_ptr<HcWork>& w) {
  w->issued();
  return remember(w);
}

c10::intrusive_ptr<c10d::Work> HcBackend::remember(const c10::intrusive_ptr<c10d::Work>& w) {
  std::lock_guard<std::mutex> lock(coalesce_mu_);
  if (coalescing_)
    coalesced_.push_back(w);
  return w;
}

// ---- collectives ------------------------------------------------------------

c10::intrusive_ptr<c10d::Work> HcBackend::broadcast(
    std::vector<at::Tensor>& tensors,
    const c10d::BroadcastOptions& opts) {
  const auto& t = single(tensors, "broadcast");
  check_root(opts.rootRank, "broadcast");
  TORCH_CHECK(opts.rootTensor == 0, "hetcomm: broadcast: rootTensor must be 0 (one tensor per process)");
  int root = static_cast<int>(opts.rootRank);
  if (sites_)
    return remember(sites_->broadcast(t, root, rank_));
  Wire w = wire_for_copy(t.scalar_type());
  auto work = make_work(c10d::OpType::BROADCAST, "hetcomm:broadcast", tensors, tensors, true, "broadcast");
  Staging st(*work);
  at::Tensor h = rank_ == root ? st.in(t) : st.out(t);
  st.wait_inputs();
  submit(*work, mode_for(opts), [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
    return api_->broadcast(c, ptr(h), count(h, w), w.dtype, root, o, op);
  });
  return launched(work);
}

c10::intrusive_ptr<c10d::Work> HcBackend::allreduce(
    std::vector<at::Tensor>& tensors,
    const c10d::AllreduceOptions& opts) {
  const auto& t = single(tensors, "allreduce");
  TORCH_CHECK(!opts.sparseIndices.has_value(), "hetcomm: allreduce: sparse tensors are not supported");
  int redop = redop_of(opts.reduceOp, "allreduce");
  Wire w = wire_for_reduce(t.scalar_type(), redop, "allreduce");
  if (sites_ && sites_->handles_allreduce(tensors, opts) && runs_hierarchical(count(t, w), w.dtype, redop))
    return remember(sites_->allreduce(t, opts, rank_));
  auto work = make_work(c10d::OpType::ALLREDUCE, "hetcomm:all_reduce", tensors, tensors, true, "allreduce");
  Staging st(*work);
  at::Tensor h = st.inout(t);
  st.wait_inputs();
  submit(*work, mode_for(opts), [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
    return api_->allreduce(c, ptr(h), ptr(h), count(h, w), w.dtype, redop, o, op);
  });
  return launched(work);
}

bool HcBackend::runs_hierarchical(size_t count, int dtype, int redop) {
  // The site split composes the core's hierarchical allreduce; an allreduce
  // the core runs otherwise (small ones by recursive doubling, whose order
  // of sums follows ranks, not sites) stays whole on hetcomm, so that the
  // results are the same bits as without the split.
  if (!HC_API_HAS(api_, comm_allreduce_algo))
    return false;
  std::shared_lock<std::shared_mutex> lock(comm_mu_);
  return comm_ && api_->comm_allreduce_algo(comm_, count, dtype, redop) == HC_ALGO_HIERARCHICAL;
}

c10::intrusive_ptr<c10d::Work> HcBackend::allreduce_compressed(
    at::Tensor& tensor,
    int codec,
    uint64_t residual_key,
    uint64_t sr_seed,
    int redop,
    bool tensor_future) {
  TORCH_CHECK(codec >= 0 && codec < HC_CODEC_COUNT, "hetcomm: allreduce_compressed: codec ", codec, " is not an hc_codec");
  TORCH_CHECK(redop == HC_SUM || redop == HC_AVG, "hetcomm: allreduce_compressed: only sum and avg are compressed");
  std::vector<at::Tensor> tensors{tensor};
  check_tensor(tensor, "allreduce_compressed");
  Wire w = wire_for_reduce(tensor.scalar_type(), redop, "allreduce_compressed");
  auto work = make_work(c10d::OpType::ALLREDUCE, "hetcomm:all_reduce_compressed", tensors, tensors, true,
                        "allreduce_compressed");
  if (tensor_future)
    work->resolve_to_tensor();
  Staging st(*work);
  at::Tensor h = st.inout(tensor);
  st.wait_inputs();
  submit(*work, timeout_ms_.load(), [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
    hc_call_opts with = *o;
    with.codec = codec;
    with.residual_key = residual_key;
    with.sr_seed = sr_seed;
    return api_->allreduce(c, ptr(h), ptr(h), count(h, w), w.dtype, redop, &with, op);
  });
  return launched(work);
}

c10::intrusive_ptr<c10d::Work> HcBackend::allreduce_coalesced(
    std::vector<at::Tensor>& tensors,
    const c10d::AllreduceCoalescedOptions& opts) {
  TORCH_CHECK(!tensors.empty(), "hetcomm: allreduce_coalesced: no tensors");
  int redop = redop_of(opts.reduceOp, "allreduce_coalesced");
  std::vector<Wire> wires;
  bool uniform = true;
  for (const auto& t : tensors) {
    check_tensor(t, "allreduce_coalesced");
    wires.push_back(wire_for_reduce(t.scalar_type(), redop, "allreduce_coalesced"));
    uniform = uniform && t.scalar_type() == tensors[0].scalar_type();
  }
  auto work = make_work(
      c10d::OpType::ALLREDUCE_COALESCED,
      "hetcomm:all_reduce_coalesced",
      tensors,
      tensors,
      true,
      "allreduce_coalesced");
  Staging st(*work);
  int timeout_ms = timeout_for(opts.timeout);
  if (uniform) {
    // One reduction over all of them: one round of latency, not one per tensor.
    at::Tensor flat = pack(st, tensors);
    int64_t at_ = 0;
    if (!adjacent_run(tensors)) {
      for (const auto& t : tensors) {
        work->copy_back(t, flat.narrow(0, at_, t.numel()).view(t.sizes()));
        at_ += t.numel();
      }
    }
    Wire w = wires[0];
    submit(*work, timeout_ms, [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
      return api_->allreduce(c, ptr(flat), ptr(flat), count(flat, w), w.dtype, redop, o, op);
    });
  } else {
    std::vector<at::Tensor> hs;
    for (const auto& t : tensors)
      hs.push_back(st.inout(t));
    st.wait_inputs();
    for (size_t i = 0; i < hs.size(); i++) {
      const auto& h = hs[i];
      Wire w = wires[i];
      submit(*work, timeout_ms, [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
        return api_->allreduce(c, ptr(h), ptr(h), count(h, w), w.dtype, redop, o, op);
      });
    }
  }
  return launched(work);
}

c10::intrusive_ptr<c10d::Work> HcBackend::reduce(
    std::vector<at::Tensor>& tensors,
    const c10d::ReduceOptions& opts) {
  const auto& t = single(tensors, "reduce");
  check_root(opts.rootRank, "reduce");
  TORCH_CHECK(opts.rootTensor == 0, "hetcomm: reduce: rootTensor must be 0 (one tensor per process)");
  int root = static_cast<int>(opts.rootRank);
  int redop = redop_of(opts.reduceOp, "reduce");
  Wire w = wire_for_reduce(t.scalar_type(), redop, "reduce");
  auto work = make_work(c10d::OpType::REDUCE, "hetcomm:reduce", tensors, tensors, true, "reduce");
  Staging st(*work);
  at::Tensor h = rank_ == root ? st.inout(t) : st.in(t);
  st.wait_inputs();
  void* recv = rank_ == root ? ptr(h) : nullptr;
  submit(*work, mode_for(opts), [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
    return api_->reduce(c, ptr(h), recv, count(h, w), w.dtype, redop, root, o, op);
  });
  return launched(work);
}

void HcBackend::submit_allgather(HcWork& work, CallMode mode, const at::Tensor& hin, const at::Tensor& hout) {
  Wire w = wire_for_copy(hin.scalar_type());
  submit(work, mode, [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
    return api_->allgather(c, ptr(hin), ptr(hout), count(hin, w), w.dtype, o, op);
  });
}

c10::intrusive_ptr<c10d::Work> HcBackend::allgather(
    std::vector<std::vector<at::Tensor>>& outputs,
    std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& opts) {
  const auto& in = single(inputs, "allgather");
  TORCH_CHECK(outputs.size() == 1, "hetcomm: allgather takes one output list per process");
  auto& outs = outputs[0];
  TORCH_CHECK(
      static_cast<int>(outs.size()) == size_,
      "hetcomm: allgather: the output list holds ",
      outs.size(),
      " tensors but the group has ",
      size_,
      " ranks");
  for (const auto& o : outs)
    check_like(o, in, in.numel(), "allgather", "an output tensor");
  auto work = make_work(c10d::OpType::ALLGATHER, "hetcomm:all_gather", inputs, outs, true, "allgather");
  Staging st(*work);
  at::Tensor hin = st.in(in);
  at::Tensor flat = unpack_target(st, *work, outs, in.numel());
  st.wait_inputs();
  submit_allgather(*work, mode_for(opts), hin, flat);
  return launched(work);
}

c10::intrusive_ptr<c10d::Work> HcBackend::_allgather_base(
    at::Tensor& output,
    at::Tensor& input,
    const c10d::AllgatherOptions& opts) {
  check_tensor(input, "all_gather_into_tensor");
  check_like(output, input, input.numel() * size_, "all_gather_into_tensor", "the output");
  std::vector<at::Tensor> ins{input};
  auto work = make_work(
      c10d::OpType::_ALLGATHER_BASE, "hetcomm:_all_gather_base", ins, {output}, true, "all_gather_into_tensor");
  Staging st(*work);
  at::Tensor hout = st.out(output);
  at::Tensor hin = st.in(input);
  st.wait_inputs();
  submit_allgather(*work, mode_for(opts), hin, hout);
  return launched(work);
}

c10::intrusive_ptr<c10d::Work> HcBackend::allgather_coalesced(
    std::vector<std::vector<at::Tensor>>& outputs,
    std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& opts) {
  // outputs[r][i] receives rank r's inputs[i].
  TORCH_CHECK(
      static_cast<int>(outputs.size()) == size_,
      "hetcomm: allgather_coalesced: ",
      outputs.size(),
      " output lists for a group of ",
      size_,
      " ranks");
  std::vector<at::Tensor> result;
  std::vector<std::vector<at::Tensor>> per_input(inputs.size());
  for (int r = 0; r < size_; r++) {
    TORCH_CHECK(
        outputs[r].size() == inputs.size(),
        "hetcomm: allgather_coalesced: output list ",
        r,
        " holds ",
        outputs[r].size(),
        " tensors for ",
        inputs.size(),
        " inputs");
    for (size_t i = 0; i < inputs.size(); i++) {
      check_tensor(inputs[i], "allgather_coalesced");
      check_like(outputs[r][i], inputs[i], inputs[i].numel(), "allgather_coalesced", "an output tensor");
      per_input[i].push_back(outputs[r][i]);
      result.push_back(outputs[r][i]);
    }
  }
  auto work = make_work(
      c10d::OpType::ALLGATHER_COALESCED,
      "hetcomm:all_gather_coalesced",
      inputs,
      result,
      true,
      "allgather_coalesced");
  Staging st(*work);
  std::vector<at::Tensor> hins, flats;
  for (size_t i = 0; i < inputs.size(); i++) {
    hins.push_back(st.in(inputs[i]));
    flats.push_back(unpack_target(st, *work, per_input[i], inputs[i].numel()));
  }
  st.wait_inputs();
  int timeout_ms = timeout_for(opts.timeout);
  for (size_t i = 0; i < inputs.size(); i++)
    submit_allgather(*work, CallMode{timeout_ms, false}, hins[i], flats[i]);
  return launched(work);
}

c10::intrusive_ptr<c10d::Work> HcBackend::allgather_into_tensor_coalesced(
    std::vector<at::Tensor>& outputs,
    std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& opts) {
  TORCH_CHECK(
      outputs.size() == inputs.size(),
      "hetcomm: allgather_into_tensor_coalesced: ",
      outputs.size(),
      " outputs for ",
      inputs.size(),
      " inputs");
  for (size_t i = 0; i < inputs.size(); i++) {
    check_tensor(inputs[i], "allgather_into_tensor_coalesced");
    check_like(
        outputs[i], inputs[i], inputs[i].numel() * size_, "allgather_into_tensor_coalesced", "an output");
  }
  auto work = make_work(
      c10d::OpType::COALESCED,
      "hetcomm:all_gather_into_tensor_coalesced",
      inputs,
      outputs,
      true,
      "allgather_into_tensor_coalesced");
  Staging st(*work);
  std::vector<at::Tensor> hins, houts;
  for (size_t i = 0; i < inputs.size(); i++) {
    houts.push_back(st.out(outputs[i]));
    hins.push_back(st.in(inputs[i]));
  }
  st.wait_inputs();
  int timeout_ms = timeout_for(opts.timeout);
  for (size_t i = 0; i < inputs.size(); i++)
    submit_allgather(*work, CallMode{timeout_ms, false}, hins[i], houts[i]);
  return launched(work);
}

c10::intrusive_ptr<c10d::Work> HcBackend::gather(
    std::vector<std::vector<at::Tensor>>& outputs,
    std::vector<at::Tensor>& inputs,
    const c10d::GatherOptions& opts) {
  const auto& in = single(inputs, "gather");
  check_root(opts.rootRank, "gather");
  int root = static_cast<int>(opts.rootRank);
  std::vector<at::Tensor> result;
  if (rank_ == root) {
    TORCH_CHECK(
        outputs.size() == 1 && static_cast<int>(outputs[0].size()) == size_,
        "hetcomm: gather: the root needs one output list of ",
        size_,
        " tensors");
    for (const auto& o : outputs[0])
      check_like(o, in, in.numel(), "gather", "an output tensor");
    result = outputs[0];
  } else {
    TORCH_CHECK(
        outputs.empty() || (outputs.size() == 1 && outputs[0].empty()),
        "hetcomm: gather: only the root rank takes an output list");
  }
  Wire w = wire_for_copy(in.scalar_type());
  auto work = make_work(c10d::OpType::GATHER, "hetcomm:gather", inputs, result, true, "gather");
  Staging st(*work);
  at::Tensor hin = st.in(in);
  at::Tensor flat;
  if (rank_ == root)
    flat = unpack_target(st, *work, result, in.numel());
  st.wait_inputs();
  void* recv = rank_ == root ? ptr(flat) : nullptr;
  submit(*work, mode_for(opts), [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
    return api_->gather(c, ptr(hin), recv, count(hin, w), w.dtype, root, o, op);
  });
  return launched(work);
}

c10::intrusive_ptr<c10d::Work> HcBackend::scatter(
    std::vector<at::Tensor>& outputs,
    std::vector<std::vector<at::Tensor>>& inputs,
    const c10d::ScatterOptions& opts) {
  const auto& out = single(outputs, "scatter");
  check_root(opts.rootRank, "scatter");
  int root = static_cast<int>(opts.rootRank);
  if (rank_ == root) {
    TORCH_CHECK(
        inputs.size() == 1 && static_cast<int>(inputs[0].size()) == size_,
        "hetcomm: scatter: the root needs one input list of ",
        size_,
        " tensors");
    for (const auto& i : inputs[0])
      check_like(i, out, out.numel(), "scatter", "an input tensor");
  } else {
    TORCH_CHECK(
        inputs.empty() || (inputs.size() == 1 && inputs[0].empty()),
        "hetcomm: scatter: only the root rank takes an input list");
  }
  Wire w = wire_for_copy(out.scalar_type());
  std::vector<at::Tensor> prof = rank_ == root ? inputs[0] : std::vector<at::Tensor>{};
  auto work = make_work(c10d::OpType::SCATTER, "hetcomm:scatter", prof, outputs, true, "scatter");
  Staging st(*work);
  at::Tensor hout = st.out(out);
  at::Tensor flat;
  if (rank_ == root)
    flat = pack(st, inputs[0]);
  st.wait_inputs();
  void* send = rank_ == root ? ptr(flat) : nullptr;
  submit(*work, mode_for(opts), [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
    return api_->scatter(c, send, ptr(hout), count(hout, w), w.dtype, root, o, op);
  });
  return launched(work);
}

c10::intrusive_ptr<c10d::Work> HcBackend::reduce_scatter(
    std::vector<at::Tensor>& outputs,
    std::vector<std::vector<at::Tensor>>& inputs,
    const c10d::ReduceScatterOptions& opts) {
  const auto& out = single(outputs, "reduce_scatter");
  TORCH_CHECK(
      inputs.size() == 1 && static_cast<int>(inputs[0].size()) == size_,
      "hetcomm: reduce_scatter needs one input list of ",
      size_,
      " tensors");
  for (const auto& i : inputs[0])
    check_like(i, out, out.numel(), "reduce_scatter", "an input tensor");
  int redop = redop_of(opts.reduceOp, "reduce_scatter");
  Wire w = wire_for_reduce(out.scalar_type(), redop, "reduce_scatter");
  auto work = make_work(
      c10d::OpType::REDUCE_SCATTER, "hetcomm:reduce_scatter", inputs[0], outputs, true, "reduce_scatter");
  Staging st(*work);
  at::Tensor hout = st.out(out);
  at::Tensor flat = pack(st, inputs[0]);
  submit(*work, mode_for(opts), [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
    return api_->reduce_scatter(c, ptr(flat), ptr(hout), count(hout, w), w.dtype, redop, o, op);
  });
  return launched(work);
}

c10::intrusive_ptr<c10d::Work> HcBackend::_reduce_scatter_base(
    at::Tensor& output,
    at::Tensor& input,
    const c10d::ReduceScatterOptions& opts) {
  check_tensor(output, "reduce_scatter_tensor");
  check_like(input, output, output.numel() * size_, "reduce_scatter_tensor", "the input");
  int redop = redop_of(opts.reduceOp, "reduce_scatter_tensor");
  Wire w = wire_for_reduce(output.scalar_type(), redop, "reduce_scatter_tensor");
  std::vector<at::Tensor> ins{input};
  auto work = make_work(
      c10d::OpType::_REDUCE_SCATTER_BASE,
      "hetcomm:_reduce_scatter_base",
      ins,
      {output},
      true,
      "reduce_scatter_tensor");
  Staging st(*work);
  at::Tensor hout = st.out(output);
  at::Tensor hin = st.in(input);
  st.wait_inputs();
  submit(*work, mode_for(opts), [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
    return api_->reduce_scatter(c, ptr(hin), ptr(hout), count(hout, w), w.dtype, redop, o, op);
  });
  return launched(work);
}

c10::intrusive_ptr<c10d::Work> HcBackend::reduce_scatter_tensor_coalesced(
    std::vector<at::Tensor>& outputs,
    std::vector<at::Tensor>& inputs,
    const c10d::ReduceScatterOptions& opts) {
  TORCH_CHECK(
      outputs.size() == inputs.size(),
      "hetcomm: reduce_scatter_tensor_coalesced: ",
      outputs.size(),
      " outputs for ",
      inputs.size(),
      " inputs");
  int redop = redop_of(opts.reduceOp, "reduce_scatter_tensor_coalesced");
  std::vector<Wire> wires;
  for (size_t i = 0; i < inputs.size(); i++) {
    check_tensor(outputs[i], "reduce_scatter_tensor_coalesced");
    check_like(
        inputs[i], outputs[i], outputs[i].numel() * size_, "reduce_scatter_tensor_coalesced", "an input");
    wires.push_back(wire_for_reduce(outputs[i].scalar_type(), redop, "reduce_scatter_tensor_coalesced"));
  }
  auto work = make_work(
      c10d::OpType::REDUCE_SCATTER_TENSOR_COALESCED,
      "hetcomm:reduce_scatter_tensor_coalesced",
      inputs,
      outputs,
      true,
      "reduce_scatter_tensor_coalesced");
  Staging st(*work);
  std::vector<at::Tensor> hins, houts;
  for (size_t i = 0; i < inputs.size(); i++) {
    houts.push_back(st.out(outputs[i]));
    hins.push_back(st.in(inputs[i]));
  }
  st.wait_inputs();
  int timeout_ms = timeout_for(opts.timeout);
  for (size_t i = 0; i < inputs.size(); i++) {
    Wire w = wires[i];
    const auto &hin = hins[i], &hout = houts[i];
    submit(*work, timeout_ms, [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
      return api_->reduce_scatter(c, ptr(hin), ptr(hout), count(hout, w), w.dtype, redop, o, op);
    });
  }
  return launched(work);
}

c10::intrusive_ptr<c10d::Work> HcBackend::alltoall_base(
    at::Tensor& output,
    at::Tensor& input,
    std::vector<int64_t>& output_splits,
    std::vector<int64_t>& input_splits,
    const c10d::AllToAllOptions& opts) {
  check_tensor(input, "all_to_all_single");
  check_tensor(output, "all_to_all_single");
  TORCH_CHECK(
      input.scalar_type() == output.scalar_type(),
      "hetcomm: all_to_all_single: input is ",
      input.scalar_type(),
      " but output is ",
      output.scalar_type());
  Wire w = wire_for_copy(input.scalar_type());
  auto n = static_cast<size_t>(size_);
  // Splits are in rows (dim 0); the core counts elements.
  auto counts_of = [&](const at::Tensor& t, const std::vector<int64_t>& splits, const char* role) {
    std::vector<size_t> counts(n);
    int64_t rows = t.dim() ? t.size(0) : 1;
    int64_t row = row_elems(t) * w.per_element;
    if (splits.empty()) {
      TORCH_CHECK(
          rows % size_ == 0,
          "hetcomm: all_to_all_single: the ",
          role,
          "'s first dimension (",
          rows,
          ") is not divisible by the group size ",
          size_);
      std::fill(counts.begin(), counts.end(), static_cast<size_t>(rows / size_ * row));
    } else {
      TORCH_CHECK(
          splits.size() == n,
          "hetcomm: all_to_all_single: ",
          role,
          " split sizes have ",
          splits.size(),
          " entries for ",
          size_,
          " ranks");
      int64_t sum = 0;
      for (size_t r = 0; r < n; r++) {
        TORCH_CHECK(splits[r] >= 0, "hetcomm: all_to_all_single: negative split size");
        counts[r] = static_cast<size_t>(splits[r] * row);
        sum += splits[r];
      }
      TORCH_CHECK(
          sum == rows,
          "hetcomm: all_to_all_single: ",
          role,
          " split sizes sum to ",
          sum,
          " but the ",
          role,
          " has ",
          rows,
          " rows");
    }
    return counts;
  };
  auto scounts = counts_of(input, input_splits, "input");
  auto rcounts = counts_of(output, output_splits, "output");
  std::vector<size_t> sdispls(n), rdispls(n);
  std::exclusive_scan(scounts.begin(), scounts.end(), sdispls.begin(), size_t{0});
  std::exclusive_scan(rcounts.begin(), rcounts.end(), rdispls.begin(), size_t{0});
  std::vector<at::Tensor> ins{input};
  auto work = make_work(
      c10d::OpType::ALLTOALL_BASE, "hetcomm:all_to_all", ins, {output}, true, "all_to_all_single");
  Staging st(*work);
  at::Tensor hout = st.out(output);
  at::Tensor hin = st.in(input);
  st.wait_inputs();
  bool equal = input_splits.empty() && output_splits.empty();
  submit(*work, mode_for(opts), [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
    if (equal)
      return api_->alltoall(c, ptr(hin), ptr(hout), scounts[0], w.dtype, o, op);
    return api_->alltoallv(
        c, ptr(hin), scounts.data(), sdispls.data(), ptr(hout), rcounts.data(), rdispls.data(), w.dtype, o, op);
  });
  return launched(work);
}

c10::intrusive_ptr<c10d::Work> HcBackend::alltoall(
    std::vector<at::Tensor>& outputs,
    std::vector<at::Tensor>& inputs,
    const c10d::AllToAllOptions& opts) {
  TORCH_CHECK(
      static_cast<int>(inputs.size()) == size_ && static_cast<int>(outputs.size()) == size_,
      "hetcomm: all_to_all needs ",
      size_,
      " input and ",
      size_,
      " output tensors (got ",
      inputs.size(),
      " and ",
      outputs.size(),
      ")");
  auto type = inputs[0].scalar_type();
  for (const auto& t : inputs) {
    check_tensor(t, "all_to_all");
    TORCH_CHECK(t.scalar_type() == type, "hetcomm: all_to_all: the inputs must share one dtype");
  }
  for (const auto& t : outputs) {
    check_tensor(t, "all_to_all");
    TORCH_CHECK(t.scalar_type() == type, "hetcomm: all_to_all: the outputs must have the inputs' dtype");
  }
  Wire w = wire_for_copy(type);
  auto n = static_cast<size_t>(size_);
  std::vector<size_t> scounts(n), rcounts(n), sdispls(n), rdispls(n);
  int64_t rtotal = 0;
  for (size_t r = 0; r < n; r++) {
    scounts[r] = count(inputs[r], w);
    rcounts[r] = count(outputs[r], w);
    rtotal += outputs[r].numel();
  }
  std::exclusive_scan(scounts.begin(), scounts.end(), sdispls.begin(), size_t{0});
  std::exclusive_scan(rcounts.begin(), rcounts.end(), rdispls.begin(), size_t{0});
  auto work = make_work(c10d::OpType::ALLTOALL, "hetcomm:all_to_all", inputs, outputs, true, "all_to_all");
  Staging st(*work);
  at::Tensor rflat;
  if (auto run = adjacent_run(outputs)) {
    rflat = *run;
    for (const auto& t : outputs)
      work->keep(t);
  } else {
    rflat = st.scratch(rtotal, type, outputs[0].device());
    int64_t at_ = 0;
    for (const auto& t : outputs) {
      work->copy_back(t, rflat.narrow(0, at_, t.numel()).view(t.sizes()));
      at_ += t.numel();
    }
  }
  at::Tensor sflat = pack(st, inputs);
  submit(*work, mode_for(opts), [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
    return api_->alltoallv(
        c, ptr(sflat), scounts.data(), sdispls.data(), ptr(rflat), rcounts.data(), rdispls.data(), w.dtype, o, op);
  });
  return launched(work);
}

c10::intrusive_ptr<c10d::Work> HcBackend::barrier(const c10d::BarrierOptions& opts) {
  auto work = make_work(c10d::OpType::BARRIER, "hetcomm:barrier", {}, {}, true, "barrier");
  submit(*work, mode_for(opts), [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
    return api_->barrier(c, o, op);
  });
  return launched(work);
}

// ---- point-to-point ------------------------------------------------------------

c10::intrusive_ptr<HcWork> HcBackend::p2p(
    bool is_send,
    const at::Tensor& t,
    int peer,
    int tag,
    int timeout_ms) {
  const char* what = is_send ? "send" : "recv";
  check_tensor(t, what);
  TORCH_CHECK(tag >= 0, "hetcomm: ", what, ": tag ", tag, " is negative");
  if (peer != HC_ANY_SOURCE) {
    TORCH_CHECK(
        peer >= 0 && peer < size_ && peer != rank_,
        "hetcomm: rank ",
        rank_,
        ": ",
        what,
        ": peer ",
        peer,
        " is not another rank of [0, ",
        size_,
        ")");
  }
  Wire w = wire_for_copy(t.scalar_type());
  std::vector<at::Tensor> ts{t};
  std::string desc = is_send ? c10::str("send to rank ", peer)
                             : (peer == HC_ANY_SOURCE ? std::string("recv from any rank")
                                                      : c10::str("recv from rank ", peer));
  auto work = c10::make_intrusive<HcWork>(
      rank_,
      is_send ? c10d::OpType::SEND : (peer == HC_ANY_SOURCE ? c10d::OpType::RECVANYSOURCE : c10d::OpType::RECV),
      is_send ? "hetcomm:send" : "hetcomm:recv",
      std::optional<std::vector<at::Tensor>>(ts),
      is_send ? std::vector<at::Tensor>{} : ts,
      inflight_,
      seq_.load(),
      desc);
  Staging st(*work);
  at::Tensor h = is_send ? st.in(t) : st.out(t);
  st.wait_inputs();
  submit(*work, timeout_ms, [&](hc_comm* c, const hc_call_opts* o, hc_op** op) {
    if (is_send)
      return api_->send(c, ptr(h), count(h, w), w.dtype, peer, tag, o, op);
    return api_->recv(c, ptr(h), count(h, w), w.dtype, peer, tag, o, op);
  });
  return work;
}

c10::intrusive_ptr<c10d::Work> HcBackend::send(std::vector<at::Tensor>& tensors, int dst_rank, int tag) {
  const auto& t = single(tensors, "send");
  return launched(p2p(true, t, dst_rank, tag, timeout_ms_.load()));
}

c10::intrusive_ptr<c10d::Work> HcBackend::recv(std::vector<at::Tensor>& tensors, int src_rank, int tag) {
  const auto& t = single(tensors, "recv");
  return launched(p2p(false, t, src_rank, tag, timeout_ms_.load()));
}

c10::intrusive_ptr<c10d::Work> HcBackend::recvAnysource(std::vector<at::Tensor>& tensors, int tag) {
  const auto& t = single(tensors, "recv");
  return launched(p2p(false, t, HC_ANY_SOURCE, tag, timeout_ms_.load()));
}

// ---- monitored barrier --------------------------------------------------------------

void HcBackend::monitoredBarrier(const c10d::BarrierOptions& opts, bool wait_all_ranks) {
  // Rank 0 hears from every rank, then releases them all, as gloo does; its
  // error names the ranks that never arrived. Messages go point-to-point
  // under reserved tags, so the collective queue is not involved.
  if (size_ == 1)
    return;
  int timeout_ms = timeout_for(opts.timeout);
  auto token = at::zeros({1}, at::kByte);
  if (rank_ != 0) {
    auto arrive = p2p(true, token, 0, kMonitoredArriveTag, timeout_ms_.load());
    arrive->issued();
    auto release = p2p(false, at::zeros({1}, at::kByte), 0, kMonitoredReleaseTag, timeout_ms_.load());
    release->issued();
    try {
      arrive->wait(kNoTimeout);
      release->wait(kNoTimeout);
    } catch (const std::exception& e) {
      throw_backend_error(c10::str(
          "Rank ",
          rank_,
          " successfully reached monitoredBarrier, but received errors while waiting for send/recv from rank 0. ",
          "Please check rank 0 logs for faulty rank.\n Original exception: \n",
          e.what()));
    }
    return;
  }
  auto start = std::chrono::steady_clock::now();
  auto elapsed_ms = [&] {
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start)
        .count();
  };
  std::vector<c10::intrusive_ptr<HcWork>> arrivals;
  for (int r = 1; r < size_; r++) {
    auto w = p2p(false, at::zeros({1}, at::kByte), r, kMonitoredArriveTag, timeout_ms);
    w->issued();
    arrivals.push_back(w);
  }
  std::vector<int> passed, failed;
  for (int r = 1; r < size_; r++) {
    auto& w = arrivals[r - 1];
    // With wait_all_ranks every rank gets the whole timeout (they all run
    // against the same deadline in the core anyway); otherwise the first
    // rank that is missing ends the barrier.
    int64_t left = wait_all_ranks ? timeout_ms : timeout_ms - elapsed_ms();
    if (!wait_all_ranks && left <= 0) {
      std::string info = passed.empty() ? "No ranks successfully processed in monitoredBarrier."
                                        : c10::str("Successfully processed ranks: ", c10::Join(", ", passed));
      throw_backend_error(c10::str(
          "[Rank 0]: Rank ", rank_, " timed out in monitoredBarrier after ", timeout_ms, " ms.\n", info));
    }
    try {
      // A little grace, so that the core's own verdict (same deadline) wins.
      w->wait(std::chrono::milliseconds(std::max<int64_t>(left, 0) + 200));
      passed.push_back(r);
    } catch (const std::exception&) {
      if (!wait_all_ranks)
        throw_backend_error(c10::str(
            "[Rank 0]: Rank ", r, " failed to pass monitoredBarrier in ", timeout_ms, " ms"));
      failed.push_back(r);
    }
  }
  if (!failed.empty())
    throw_backend_error(c10::str(
        "[Rank 0]: Ranks ", c10::Join(", ", failed), " failed to pass monitoredBarrier in ", timeout_ms, " ms"));
  std::vector<c10::intrusive_ptr<HcWork>> releases;
  for (int r = 1; r < size_; r++) {
    auto w = p2p(true, token, r, kMonitoredReleaseTag, timeout_ms);
    w->issued();
    releases.push_back(w);
  }
  for (auto& w : releases)
    w->wait(kNoTimeout);
}

// ---- coalescing, sequence numbers, state ---------------------------------------------

void HcBackend::startCoalescing() {
  std::lock_guard<std::mutex> lock(coalesce_mu_);
  TORCH_CHECK(!coalescing_, "hetcomm: startCoalescing() called twice without endCoalescing()");
  coalescing_ = true;
  coalesced_.clear();
}

c10::intrusive_ptr<c10d::Work> HcBackend::endCoalescing() {
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  {
    std::lock_guard<std::mutex> lock(coalesce_mu_);
    TORCH_CHECK(coalescing_, "hetcomm: endCoalescing() without startCoalescing()");
    coalescing_ = false;
    works.swap(coalesced_);
  }
  // The ops already run one by one; this Work completes when all of them have.
  std::vector<at::Tensor> result;
  for (const auto& w : works)
    for (auto& t : w->result())
      result.push_back(t);
  auto group = c10::make_intrusive<HcWork>(
      rank_,
      c10d::OpType::COALESCED,
      "hetcomm:coalesced",
      std::nullopt,
      std::move(result),
      inflight_,
      seq_.load(),
      "coalesced ops");
  for (const auto& w : works)
    group->add_child(w);
  group->issued();
  return group;
}

void HcBackend::setSequenceNumberForGroup() {
  // Every rank starts its count at zero when the group is created, and all
  // count the same collectives, so the numbers agree without a store round.
  seq_.store(0);
}

uint64_t HcBackend::getSequenceNumberForGroup() {
  return seq_.load();
}

int HcBackend::comm_status() {
  std::shared_lock<std::shared_mutex> lock(comm_mu_);
  return comm_ ? api_->comm_status(comm_) : HC_ERR_STATE;
}

std::string HcBackend::comm_error() {
  std::shared_lock<std::shared_mutex> lock(comm_mu_);
  return comm_ ? std::string(api_->comm_error(comm_)) : std::string("process group was shut down");
}

c10d::ErrorType HcBackend::getError() {
  int status = comm_status();
  if (status == HC_OK)
    return c10d::ErrorType::SUCCESS;
  if (status == HC_ERR_TIMEOUT)
    return c10d::ErrorType::TIMEOUT;
  if (status == HC_ERR_PEER_LOST || status == HC_ERR_ABORTED)
    return c10d::ErrorType::REMOTE_ERROR;
  return c10d::ErrorType::COMM_ERROR;
}

// ---- membership: failed ranks and shrinking -----------------------------------------

bool HcBackend::supportsShrinking() const {
  return HC_API_HAS(api_, comm_shrink) && HC_API_HAS(api_, comm_failed_ranks);
}

std::vector<int64_t> HcBackend::failed_ranks(int timeout_ms) {
  TORCH_CHECK(supportsShrinking(), "hetcomm: this C core does not report failed ranks; rebuild hetcomm");
  std::vector<int> ranks(static_cast<size_t>(size_));
  int count = 0;
  int rc;
  std::string detail;
  {
    std::shared_lock<std::shared_mutex> lock(comm_mu_);
    if (!comm_)
      throw_backend_error(c10::str("hetcomm: rank ", rank_, ": process group '", name_, "' was shut down"));
    NoGil no_gil;  // the wait for the survivors' agreement is served by the worker
    rc = api_->comm_failed_ranks(comm_, timeout_ms, ranks.data(), size_, &count);
    if (rc != HC_OK)
      detail = api_->last_error();
  }
  if (rc != HC_OK)
    throw_backend_error(c10::str("hetcomm: rank ", rank_, ": failed ranks of process group '", name_, "': ", detail));
  return std::vector<int64_t>(ranks.begin(), ranks.begin() + std::min(count, size_));
}

c10::intrusive_ptr<c10d::Backend> HcBackend::shrink(
    const std::vector<int64_t>& ranks_to_exclude,
    int shrink_flags,
    const c10::intrusive_ptr<Options>& opts_override) {
  TORCH_CHECK(supportsShrinking(), "hetcomm: this C core cannot shrink a communicator; rebuild hetcomm");
  // torch's SHRINK_DEFAULT / SHRINK_ABORT, spelled out rather than assumed
  // equal to the core's values.
  int flags;
  if (shrink_flags == 0)
    flags = HC_SHRINK_DEFAULT;
  else if (shrink_flags == 1)
    flags = HC_SHRINK_ABORT;
  else
    TORCH_CHECK(false, "hetcomm: shrink: shrink_flags ", shrink_flags, " is neither SHRINK_DEFAULT (0) nor SHRINK_ABORT (1)");
  std::vector<int> exclude;
  for (int64_t r : ranks_to_exclude) {
    TORCH_CHECK(r >= 0 && r < size_, "hetcomm: shrink: rank ", r, " to exclude is not in [0, ", size_, ")");
    TORCH_CHECK(r != rank_, "hetcomm: shrink: rank ", r, " cannot exclude itself (excluded ranks do not call shrink)");
    exclude.push_back(static_cast<int>(r));
  }
  hc_comm* out = nullptr;
  int rc;
  std::string detail;
  {
    std::shared_lock<std::shared_mutex> lock(comm_mu_);
    if (!comm_)
      throw_backend_error(c10::str("hetcomm: rank ", rank_, ": process group '", name_, "' was shut down"));
    // Blocks until the survivors agree; completions of the old group's ops
    // (which may need the GIL for Python callbacks) run meanwhile.
    NoGil no_gil;
    rc = api_->comm_shrink(comm_, exclude.data(), static_cast<int>(exclude.size()), flags, &out);
    if (rc != HC_OK)
      detail = api_->last_error();
  }
  if (rc != HC_OK)
    throw_backend_error(c10::str(
        "hetcomm: rank ", rank_, ": shrinking process group '", name_, "' without ranks [",
        c10::Join(", ", exclude), "] failed (", api_->status_name(rc), "): ", detail));
  auto timeout = opts_override ? opts_override->timeout : this->timeout();
  auto shrunk = HcBackend::create(api_, out, api_->comm_rank(out), api_->comm_size(out), timeout,
                                  c10::str(name_, "-", exclude.size()));
  shrunk->set_settings(settings());
  return shrunk;
}

std::string HcBackend::settings() const {
  std::lock_guard<std::mutex> lock(settings_mu_);
  return settings_;
}

void HcBackend::set_settings(std::string settings) {
  std::lock_guard<std::mutex> lock(settings_mu_);
  settings_ = std::move(settings);
}

uintptr_t HcBackend::comm_address() const {
  std::shared_lock<std::shared_mutex> lock(comm_mu_);
  TORCH_CHECK(comm_, "hetcomm: process group '", name_, "' was shut down");
  return reinterpret_cast<uintptr_t>(comm_);
}

void HcBackend::close(bool abort_first) {
  if (abort_first) {
    // A blocking call waits in the core holding the shared lock: the abort
    // ends that wait, so that the exclusive lock below can be had.
    std::shared_lock<std::shared_mutex> lock(comm_mu_);
    if (comm_) {
      NoGil no_gil;
      api_->comm_abort(comm_, c10::str("process group '", name_, "' aborted by rank ", rank_).c_str());
    }
  }
  hc_comm* comm = nullptr;
  {
    // Taking the handle away under the exclusive lock waits out submissions
    // in progress; the close itself runs unlocked, because completions it
    // triggers may run callbacks that issue ops (they then fail cleanly).
    std::unique_lock<std::shared_mutex> lock(comm_mu_);
    std::swap(comm, comm_);
  }
  if (!comm)
    return;
  NoGil no_gil;
  api_->comm_destroy(comm);
}

void HcBackend::abort() {
  close(true);
}

void HcBackend::shutdown() {
  close(false);
}

void HcBackend::shutdown_all() {
  std::vector<c10::intrusive_ptr<HcBackend>> live;
  {
    std::lock_guard<std::mutex> lock(g_live_mu);
    for (auto& w : g_live)
      if (auto strong = w.lock())
        live.push_back(std::move(strong));
    g_live.clear();
  }
  // Newest first, the order torch shuts groups down in.
  for (auto it = live.rbegin(); it != live.rend(); ++it)
    (*it)->close(/*abort_first=*/(*it)->inflight() > 0);
}

} // namespace hetcomm_torch
