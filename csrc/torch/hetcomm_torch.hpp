/*
 * hetcomm's torch.distributed backend: a thin c10d::Backend over the C core.
 *
 * The shim holds no algorithm and no socket. It turns c10d calls into calls
 * through the core's function table (hc_api, handed over from Python as an
 * address, so this library never links the core) and turns the core's
 * completion callbacks, which run on the communicator's worker thread, into
 * Work/Future completions.
 *
 * Tensors are passed to the core as raw host pointers. Contiguous CPU tensors
 * go as they are (no copy); anything else is staged through a host buffer:
 * pinned where the device's allocator offers it, filled with the device's own
 * asynchronous copy, and copied back on a side stream when the op completes.
 * The code talks to devices only through c10's generic interfaces
 * (VirtualGuardImpl streams, c10::Event), so cuda, xpu, mps and PrivateUse1
 * devices (npu, ...) take the same path.
 */
#pragma once

#include <atomic>
#include <condition_variable>
#include <thread>
#include <deque>
#include <functional>
#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include "hetcomm.h"

namespace c10d {
class Reducer;
class ProcessGroup;
} // namespace c10d

namespace hetcomm_torch {

// Builds a c10::DistBackendError carrying `msg` as an exception_ptr.
std::exception_ptr backend_error(const std::string& msg);
[[noreturn]] void throw_backend_error(const std::string& msg);

// ---- dtypes and reductions ------------------------------------------------

// How a tensor's elements travel: a core dtype and how many core elements
// make one tensor element (complex numbers travel as two reals; dtypes the
// core cannot reduce travel as bytes in ops that do not reduce).
struct Wire {
  int dtype;
  int64_t per_element;
};

// Wire format for data movement (any dtype works).
Wire wire_for_copy(at::ScalarType type);
// Wire format for a reduction with `op`; throws naming the dtype when the
// core cannot reduce it.
Wire wire_for_reduce(at::ScalarType type, int hc_redop, const char* what);
// hc_redop for a c10d ReduceOp; throws for PREMUL_SUM.
int redop_of(const c10d::ReduceOp& op, const char* what);

// ---- Work -------------------------------------------------------------------

// Counts ops issued to the core and not completed yet (for shutdown).
using Inflight = std::shared_ptr<std::atomic<int64_t>>;

// A Work that completes when every core op it issued has called back (and,
// for composite ops, every child Work it waits on has completed).
class HcWork : public c10d::Work {
 public:
  HcWork(
      int rank,
      c10d::OpType type,
      const char* profiling_title,
      const std::optional<std::vector<at::Tensor>>& profiling_inputs,
      std::vector<at::Tensor> result,
      Inflight inflight,
      uint64_t seq,
      std::string what);
  ~HcWork() override;

  // ---- issuing side (the caller's thread) ----
  // Holds `t` until completion (inputs and host buffers the core reads).
  void keep(at::Tensor t);
  // After the core is done: dst.copy_(src). src is a host tensor.
  void copy_back(at::Tensor dst, at::Tensor src);
  // A staging-pool block used by this Work: returned to the pool at
  // completion, fenced by the copies back.
  void lend(at::Tensor block, const c10::Device& device);
  // One more core op: returns the user pointer for hc_call_opts (an owning
  // reference to this Work that on_done takes back).
  void* add_op();
  // The submission that add_op() prepared failed: drop what add_op() took.
  void cancel_op(void* user);
  // Completes this Work after `child` completes (coalescing).
  void add_child(const c10::intrusive_ptr<c10d::Work>& child);
  // Records an error the Work will finish with.
  void fail(const std::string& msg);
  // Whether an op of this Work reported an error.
  bool failed();
  // Everything is issued: drop the issuer's token (completes the Work if all
  // ops are already done).
  void issued();
  // Number of core ops/children issued so far.
  int issued_count() const { return issued_count_; }
  // Called by wait() before blocking: lets the waiting thread run the queued
  // ops itself when the core's worker is idle (saves two thread hand-offs).
  void set_helper(std::function<void()> help) { help_ = std::move(help); }
  // Before anything is issued: the future's value becomes the single result
  // tensor instead of a list of it, so a DDP comm hook can return the future
  // as it is (a Python .then() would take the GIL on the worker thread).
  void resolve_to_tensor();

  // The core's completion callback (runs on the communicator's worker thread).
  static void on_done(hc_op* op, int status, void* user);

  // ---- c10d::Work ----
  int sourceRank() const override;
  std::vector<at::Tensor> result() override;
  void synchronize() override;
  bool wait(std::chrono::milliseconds timeout) override;
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override;
  uint64_t getSequencenumber() const override;

 private:
  struct CopyBack {
    at::Tensor dst, src;
  };
  // Per device that receives copies back: the side stream the copies run on,
  // an event marking the point of issue on the caller's stream (the copies
  // wait for it), and an event marking the end of the copies (wait() and the
  // future make the waiter's stream wait for it).
  struct DeviceSync {
    c10::Device device;
    c10::Stream side;
    c10::Event issued_at;
    std::shared_ptr<c10::Event> copied;
  };
  struct Lease {
    at::Tensor block;
    c10::Device device;
  };

  void arrive();
  void complete();
  DeviceSync& sync_for(const c10::Device& device);
  // One stream per device on which every copy back of this Work and of its
  // children is done (the others' end-of-copy events are queued on it).
  std::vector<c10::Stream> joined_copy_streams();

  std::function<void()> help_;
  std::vector<at::Tensor> result_;
  std::vector<at::Tensor> keep_;         // released at completion
  std::vector<at::Tensor> keep_staging_;  // host sources of device copies: released with the Work
  std::vector<CopyBack> copies_;
  std::vector<Lease> leases_;
  std::vector<std::unique_ptr<DeviceSync>> devices_;
  std::vector<c10::intrusive_ptr<c10d::Work>> children_;  // a coalesced Work's ops
  std::atomic<int> pending_{1};  // the issuer's token + one per op/child
  int issued_count_ = 0;
  std::mutex error_mu_;  // guards error_ only; never held while completing
  std::string error_;
  std::atomic<int> source_{-1};
  bool tensor_value_ = false;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
  Inflight inflight_;
  uint64_t seq_;
  std::string what_;
};

// ---- staging ------------------------------------------------------------------

// Host buffers for staging, reused across calls. A block goes back with the
// events of the asynchronous copies that still read it and is lent again
// only once they have run.
class HostPool {
 public:
  struct Stats {
    int64_t allocations, reuses, free_bytes;
  };
  static HostPool& instance();
  // A uint8 block of at least `bytes` for data headed to or from `device`.
  at::Tensor take(int64_t bytes, const c10::Device& device);
  void give(at::Tensor block, const c10::Device& device, std::vector<std::shared_ptr<c10::Event>> fences);
  Stats stats();
  // Frees every block not lent out.
  void clear();

 private:
  struct Free {
    at::Tensor block;
    c10::DeviceType device_type;
    bool pinned;
    std::vector<std::shared_ptr<c10::Event>> fences;
  };
  std::mutex mu_;
  std::deque<Free> free_;
  int64_t free_bytes_ = 0, allocations_ = 0, reuses_ = 0;
};

// Collects the host buffers of one c10d call, then waits once per device for
// all device-to-host copies before anything is handed to the core.
class Staging {
 public:
  explicit Staging(HcWork& work) : work_(work) {}
  // A contiguous host tensor holding t's data (t itself when t is a
  // contiguous CPU tensor).
  at::Tensor in(const at::Tensor& t);
  // A contiguous host tensor the core writes, copied into t at completion.
  at::Tensor out(const at::Tensor& t);
  // Both: the core reads and writes it in place.
  at::Tensor inout(const at::Tensor& t);
  // A contiguous host buffer of `numel` elements of `type` from the pool,
  // lent to the Work until completion (pinned when `like` is an accelerator).
  at::Tensor scratch(int64_t numel, at::ScalarType type, const at::Device& like);
  // Copies t into the host tensor `dst` (same shape): asynchronously on
  // t's device when t lives on one, waited for by wait_inputs().
  void fill(const at::Tensor& dst, const at::Tensor& t);
  // Blocks until every device-to-host copy issued by in()/inout()/fill() is done.
  void wait_inputs();

 private:
  at::Tensor host(at::IntArrayRef sizes, at::ScalarType type, const c10::Device& like);
  HcWork& work_;
  std::vector<c10::Device> d2h_devices_;
};

// ---- the in-site phases on another library (sites.cpp) --------------------------

class HcBackend;

// Runs the hierarchical allreduce and broadcast with their in-site phases on
// `site` (this site's group of another c10d backend) and the inter-site phase
// on `column` (hetcomm, the ranks at this rank's position in every site).
class SiteSplit {
 public:
  // site_of / position_of: every rank's site index and position in its site.
  SiteSplit(
      c10::intrusive_ptr<c10d::Backend> site,
      c10::intrusive_ptr<HcBackend> column,
      std::vector<int> site_of,
      std::vector<int> position_of);
  ~SiteSplit();
  bool handles_allreduce(const std::vector<at::Tensor>& ts, const c10d::AllreduceOptions& opts) const;
  c10::intrusive_ptr<c10d::Work> allreduce(at::Tensor tensor, const c10d::AllreduceOptions& opts, int rank);
  c10::intrusive_ptr<c10d::Work> broadcast(at::Tensor tensor, int root, int rank);

 private:
  // Calls run one at a time on worker_, in issue order, so that every rank
  // issues the same sequence on both subgroups.
  void enqueue(std::function<void()> job);
  void run();
  void run_allreduce(const at::Tensor& tensor, const c10d::AllreduceOptions& opts);

  c10::intrusive_ptr<c10d::Backend> site_;
  c10::intrusive_ptr<HcBackend> column_;
  std::vector<int> site_of_, position_of_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::deque<std::function<void()>> queued_;
  std::thread worker_;
};

// ---- the backend ---------------------------------------------------------------

// True on a thread while it runs a core completion callback.
extern thread_local bool t_in_core_callback;

class HcBackend : public c10d::Backend {
 public:
  // The way to make one: also registers it for shutdown_all().
  static c10::intrusive_ptr<HcBackend> create(
      const hc_api* api,
      hc_comm* comm,
      int rank,
      int size,
      std::chrono::milliseconds timeout,
      std::string name);

  HcBackend(
      const hc_api* api,
      hc_comm* comm,
      int rank,
      int size,
      std::chrono::milliseconds timeout,
      std::string name);
  ~HcBackend() override;

  const std::string getBackendName() const override {
    return "hetcomm";
  }
  c10::intrusive_ptr<Options> getBackendOptions() override;
  bool supportsCoalescing() const override {
    return true;
  }
  void setTimeout(std::chrono::milliseconds timeout) override {
    timeout_ms_.store(clamp_ms(timeout));
  }
  std::chrono::milliseconds timeout() const {
    return std::chrono::milliseconds(timeout_ms_.load());
  }

  void startCoalescing() override;
  c10::intrusive_ptr<c10d::Work> endCoalescing() override;

  c10::intrusive_ptr<c10d::Work> broadcast(
      std::vector<at::Tensor>& tensors,
      const c10d::BroadcastOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce(
      std::vector<at::Tensor>& tensors,
      const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(
      std::vector<at::Tensor>& tensors,
      const c10d::AllreduceCoalescedOptions& opts) override;
  // Not a c10d call: allreduce with hetcomm's per-call codec, error-feedback
  // residual (key != 0) and stochastic-rounding seed (!= 0); for DDP hooks
  // (tensor_future: the Work's future yields the tensor, not a list).
  c10::intrusive_ptr<c10d::Work> allreduce_compressed(
      at::Tensor& tensor,
      int codec,
      uint64_t residual_key,
      uint64_t sr_seed,
      int redop,
      bool tensor_future = false);
  c10::intrusive_ptr<c10d::Work> reduce(
      std::vector<at::Tensor>& tensors,
      const c10d::ReduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather(
      std::vector<std::vector<at::Tensor>>& outputs,
      std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _allgather_base(
      at::Tensor& output,
      at::Tensor& input,
      const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_coalesced(
      std::vector<std::vector<at::Tensor>>& outputs,
      std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(
      std::vector<at::Tensor>& outputs,
      std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> gather(
      std::vector<std::vector<at::Tensor>>& outputs,
      std::vector<at::Tensor>& inputs,
      const c10d::GatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> scatter(
      std::vector<at::Tensor>& outputs,
      std::vector<std::vector<at::Tensor>>& inputs,
      const c10d::ScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter(
      std::vector<at::Tensor>& outputs,
      std::vector<std::vector<at::Tensor>>& inputs,
      const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& output,
      at::Tensor& input,
      const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(
      std::vector<at::Tensor>& outputs,
      std::vector<at::Tensor>& inputs,
      const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall_base(
      at::Tensor& output,
      at::Tensor& input,
      std::vector<int64_t>& output_splits,
      std::vector<int64_t>& input_splits,
      const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall(
      std::vector<at::Tensor>& outputs,
      std::vector<at::Tensor>& inputs,
      const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> send(
      std::vector<at::Tensor>& tensors,
      int dst_rank,
      int tag) override;
  c10::intrusive_ptr<c10d::Work> recv(
      std::vector<at::Tensor>& tensors,
      int src_rank,
      int tag) override;
  c10::intrusive_ptr<c10d::Work> recvAnysource(
      std::vector<at::Tensor>& tensors,
      int tag) override;
  c10::intrusive_ptr<c10d::Work> barrier(
      const c10d::BarrierOptions& opts) override;
  void monitoredBarrier(const c10d::BarrierOptions& opts, bool wait_all_ranks)
      override;

  // Shrinking (torch.distributed.shrink_group): the survivors' new backend
  // runs on the links the old communicator holds, no new rendezvous.
  bool supportsShrinking() const override;
  c10::intrusive_ptr<c10d::Backend> shrink(
      const std::vector<int64_t>& ranks_to_exclude,
      int shrink_flags,
      const c10::intrusive_ptr<Options>& opts_override) override;
  // The group ranks the survivors agreed are lost, ascending; waits up to
  // timeout_ms for the agreement (a DistBackendError naming the ranks held
  // failed so far if it does not come).
  std::vector<int64_t> failed_ranks(int timeout_ms);
  // The core communicator's address, borrowed (valid until shutdown/abort):
  // hetcomm.torch.elastic grows it through the C ABI.
  uintptr_t comm_address() const;
  // The Python-side settings the group was made with (JSON, opaque here),
  // inherited by the groups shrunk from it: what a grown group's newcomers
  // must adopt.
  std::string settings() const;
  void set_settings(std::string settings);

  void setSequenceNumberForGroup() override;
  uint64_t getSequenceNumberForGroup() override;
  c10d::ErrorType getError() override;

  // Fails the running and queued ops here and on every peer, then closes.
  void abort() override;
  // Finishes the queued ops, then closes. Later ops raise.
  void shutdown() override;

  // The core's status of the communicator (0 while healthy) and its error.
  int comm_status();
  std::string comm_error();
  // Core ops issued and not completed yet.
  int64_t inflight() const {
    return inflight_->load();
  }
  const std::string& name() const {
    return name_;
  }

  // From now on, allreduce and broadcast run their in-site phases on another
  // library (HETCOMM_INTRA); see SiteSplit.
  void set_site_split(std::shared_ptr<SiteSplit> split) {
    sites_ = std::move(split);
  }
  // Whether the core runs this allreduce with its hierarchical algorithm
  // (the one a site split composes).
  bool runs_hierarchical(size_t count, int dtype, int redop);
  bool has_site_split() const {
    return sites_ != nullptr;
  }

  // Closes every live backend in this process (the interpreter is exiting):
  // aborts those with ops in flight, so that peers hear of it at once.
  static void shutdown_all();

 private:
  struct Call;  // one c10d call being issued
  // How one core op is issued: its timeout, and whether the caller waits
  // for it anyway (torch's async_op=False), so that it may run right on the
  // calling thread, as the core's blocking calls do: for a small message
  // the two thread hand-offs to the worker and back are most of its time.
  struct CallMode {
    int timeout_ms;
    bool blocking;
  };
  static int clamp_ms(std::chrono::milliseconds ms);
  int timeout_for(std::chrono::milliseconds requested) const;
  template <typename Opts>
  CallMode mode_for(const Opts& opts) const {
    return CallMode{timeout_for(opts.timeout), !opts.asyncOp};
  }
  c10::intrusive_ptr<HcWork> make_work(
      c10d::OpType type,
      const char* title,
      const std::vector<at::Tensor>& inputs,
      std::vector<at::Tensor> result,
      bool collective,
      const char* what);
  // Submits one core op for `work`; `fn(opts, op_out)` calls the core.
  template <typename F>
  void submit(HcWork& work, CallMode mode, F&& fn);
  template <typename F>
  void submit(HcWork& work, int timeout_ms, F&& fn) {
    submit(work, CallMode{timeout_ms, false}, std::forward<F>(fn));
  }
  // Submits the allgather of host tensor `hin` into host tensor `hout`.
  void submit_allgather(HcWork& work, CallMode mode, const at::Tensor& hin, const at::Tensor& hout);
  // One send or receive (peer may be HC_ANY_SOURCE); not yet issued().
  c10::intrusive_ptr<HcWork> p2p(bool is_send, const at::Tensor& t, int peer, int tag, int timeout_ms);
  // Finishes issuing: coalescing bookkeeping, returns the Work.
  c10::intrusive_ptr<c10d::Work> launched(const c10::intrusive_ptr<HcWork>& w);
  // Adds a Work to the coalesced group being collected, if any.
  c10::intrusive_ptr<c10d::Work> remember(const c10::intrusive_ptr<c10d::Work>& w);
  void check_root(int64_t root, const char* what) const;
  void help_progress();
  void close(bool abort_first);

  const hc_api* api_;
  // Ops read the handle under a shared lock; close() takes it exclusively.
  mutable std::shared_mutex comm_mu_;
  hc_comm* comm_;
  std::atomic<int> timeout_ms_;
  std::string name_;
  Inflight inflight_;
  std::atomic<uint64_t> seq_{0};
  std::mutex coalesce_mu_;
  bool coalescing_ = false;
  std::vector<c10::intrusive_ptr<c10d::Work>> coalesced_;
  mutable std::mutex settings_mu_;
  std::string settings_;
  std::shared_ptr<SiteSplit> sites_;
};

// ---- the DDP comm hook ----------------------------------------------------------

struct DdpHookConfig {
  int codec = 0;
  bool error_feedback = true;
  bool stochastic_rounding = false;
  uint64_t seed = 0;
  uint64_t key_base = 0;  // residual keys: key_base + bucket index + 1
};

// Registers the C++ comm hook (ddp_hook.cpp) on a DDP reducer.
void register_ddp_hook(c10d::Reducer& reducer, c10d::ProcessGroup& group, const DdpHookConfig& cfg);

} // namespace hetcomm_torch
