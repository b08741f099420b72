/*
 * HcWork: completion of c10d Work/Future objects from the core's callbacks.
 *
 * Every core op carries an owning reference to its Work as the callback's
 * user pointer. The callback (on the communicator's worker thread) takes the
 * reference back, records an error if there was one and drops one pending
 * unit; the last unit copies staged outputs back, completes the future and
 * then finishes the Work. No lock is held while completing: a future's
 * then() callbacks run right there and may issue new ops.
 */
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include "hetcomm_torch.hpp"

namespace hetcomm_torch {

// Set by the first backend; the table is a process-wide constant of the core.
std::atomic<const hc_api*> g_api{nullptr};

std::exception_ptr backend_error(const std::string& msg) {
  try {
    C10_THROW_ERROR(DistBackendError, msg);
  } catch (...) {
    return std::current_exception();
  }
}

void throw_backend_error(const std::string& msg) {
  C10_THROW_ERROR(DistBackendError, msg);
}

namespace {

std::vector<c10::Device> accelerator_devices(const std::vector<at::Tensor>& ts) {
  std::vector<c10::Device> devices;
  for (const auto& t : ts) {
    if (!t.defined() || t.device().is_cpu())
      continue;
    bool seen = false;
    for (const auto& d : devices)
      seen = seen || d == t.device();
    if (!seen)
      devices.push_back(t.device());
  }
  return devices;
}

} // namespace

HcWork::HcWork(
    int rank,
    c10d::OpType type,
    const char* profiling_title,
    const std::optional<std::vector<at::Tensor>>& profiling_inputs,
    std::vector<at::Tensor> result,
    Inflight inflight,
    uint64_t seq,
    std::string what)
    : c10d::Work(rank, type, profiling_title, profiling_inputs),
      result_(std::move(result)),
      future_(c10::make_intrusive<c10::ivalue::Future>(
          c10::ListType::create(c10::TensorType::get()),
          accelerator_devices(result_))),
      inflight_(std::move(inflight)),
      seq_(seq),
      what_(std::move(what)) {}

HcWork::~HcWork() = default;

void HcWork::resolve_to_tensor() {
  TORCH_CHECK(result_.size() == 1 && issued_count_ == 0, "hetcomm: resolve_to_tensor needs one result, before issue");
  tensor_value_ = true;
  future_ = c10::make_intrusive<c10::ivalue::Future>(c10::TensorType::get(), accelerator_devices(result_));
}

void HcWork::keep(at::Tensor t) {
  keep_.push_back(std::move(t));
}

HcWork::DeviceSync& HcWork::sync_for(const c10::Device& device) {
  for (auto& d : devices_)
    if (d->device == device)
      return *d;
  c10::impl::VirtualGuardImpl impl(device.type());
  // The copies back run on a side stream from the device's pool, after
  // everything the caller had queued on its current stream when it issued
  // the op (the output may still be in use there).
  auto side = impl.getStreamFromGlobalPool(device, /*isHighPriority=*/false);
  auto sync = std::unique_ptr<DeviceSync>(new DeviceSync{
      device, side, c10::Event(device.type()), std::make_shared<c10::Event>(device.type())});
  sync->issued_at.record(impl.getStream(device));
  devices_.push_back(std::move(sync));
  return *devices_.back();
}

void HcWork::copy_back(at::Tensor dst, at::Tensor src) {
  if (!dst.device().is_cpu())
    sync_for(dst.device());
  copies_.push_back(CopyBack{std::move(dst), std::move(src)});
}

void HcWork::lend(at::Tensor block, const c10::Device& device) {
  leases_.push_back(Lease{std::move(block), device});
}

void* HcWork::add_op() {
  pending_.fetch_add(1, std::memory_order_relaxed);
  ++issued_count_;
  // The reference the core's callback takes back (see on_done).
  c10::raw::intrusive_ptr::incref(this);
  return this;
}

void HcWork::cancel_op(void* user) {
  --issued_count_;
  // The issuer's token is still held, so this cannot complete the Work.
  pending_.fetch_sub(1, std::memory_order_relaxed);
  c10::raw::intrusive_ptr::decref(static_cast<HcWork*>(user));
}

void HcWork::add_child(const c10::intrusive_ptr<c10d::Work>& child) {
  pending_.fetch_add(1, std::memory_order_relaxed);
  ++issued_count_;
  children_.push_back(child);
  auto self = c10::intrusive_ptr<HcWork>::unsafe_reclaim_from_nonowning(this);
  child->getFuture()->addCallback([self](c10::ivalue::Future& f) {
    if (f.hasError())
      self->fail(f.tryRetrieveErrorMessage());
    self->arrive();
  });
}

void HcWork::fail(const std::string& msg) {
  std::lock_guard<std::mutex> lock(error_mu_);
  if (error_.empty())
    error_ = msg;
}

bool HcWork::failed() {
  std::lock_guard<std::mutex> lock(error_mu_);
  return !error_.empty();
}

void HcWork::issued() {
  arrive();
}

void HcWork::on_done(hc_op* op, int status, void* user) {
  // Take back the reference add_op() gave the core: the Work lives at least
  // until this callback returns, whatever the waiters do meanwhile.
  // Declared first so that it is still set while `self` (and whatever the
  // Work's callbacks captured) is released at the end.
  struct InCallback {
    InCallback() { t_in_core_callback = true; }
    ~InCallback() { t_in_core_callback = false; }
  } in_callback;
  auto self = c10::intrusive_ptr<HcWork>::reclaim(static_cast<HcWork*>(user));
  const hc_api* api = g_api.load(std::memory_order_acquire);
  if (status != HC_OK) {
    std::string status_name = api->status_name(status);
    std::string detail = api->op_error(op);
    // "Timed out" is the phrase c10d's tests and users grep for.
    std::string kind = status == HC_ERR_TIMEOUT ? "Timed out" : "failed";
    self->fail(c10::str(
        "hetcomm: rank ",
        self->rank_,
        ": ",
        self->what_,
        " ",
        kind,
        " (",
        status_name,
        "): ",
        detail));
  } else {
    int source = api->op_source(op);
    if (source >= 0)
      self->source_.store(source, std::memory_order_relaxed);
  }
  self->inflight_->fetch_sub(1, std::memory_order_relaxed);
  self->arrive();
}

void HcWork::arrive() {
  if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1)
    complete();
}

void HcWork::complete() {
  std::exception_ptr eptr;
  {
    std::lock_guard<std::mutex> lock(error_mu_);
    if (!error_.empty())
      eptr = backend_error(error_);
  }
  // The copies back to devices run on per-device side streams; with the
  // streams made current here, the future records its events on them too,
  // so then() callbacks and waiters on other streams see the copied data
  // (a coalesced Work's: its children's copies too).
  {
    c10::MultiStreamGuard guard(joined_copy_streams());
    if (!eptr) {
      try {
        for (auto& d : devices_)
          d->issued_at.block(d->side);
        for (auto& c : copies_) {
          bool device_dst = !c.dst.device().is_cpu();
          c.dst.copy_(c.src, /*non_blocking=*/device_dst);
          // The host buffer must outlive the asynchronous copy.
          if (device_dst)
            keep_staging_.push_back(c.src);
        }
        for (auto& d : devices_)
          d->copied->record(d->side);
      } catch (...) {
        eptr = std::current_exception();
      }
    }
    copies_.clear();
    keep_.clear();
    // The copies back may still be reading the staging blocks: they go back
    // to the pool fenced by the events after those copies.
    std::vector<std::shared_ptr<c10::Event>> fences;
    for (const auto& d : devices_)
      fences.push_back(d->copied);
    for (auto& lease : leases_)
      HostPool::instance().give(std::move(lease.block), lease.device, fences);
    leases_.clear();
    if (eptr) {
      future_->setError(eptr);
    } else {
      future_->markCompleted(tensor_value_ ? c10::IValue(result_.at(0)) : c10::IValue(result_));
    }
  }
  finish(eptr);
}

int HcWork::sourceRank() const {
  int s = source_.load(std::memory_order_relaxed);
  TORCH_CHECK(s >= 0, "hetcomm: sourceRank() is only known once a receive completed");
  return s;
}

std::vector<at::Tensor> HcWork::result() {
  return result_;
}

std::vector<c10::Stream> HcWork::joined_copy_streams() {
  std::vector<c10::Stream> streams;
  auto join = [&streams](const DeviceSync& d) {
    for (const auto& s : streams) {
      if (s.device() == d.device) {
        d.copied->block(s);
        return;
      }
    }
    streams.push_back(d.side);
  };
  for (const auto& d : devices_)
    join(*d);
  for (const auto& child : children_)
    if (auto* work = dynamic_cast<HcWork*>(child.get()))
      for (const auto& d : work->devices_)
        join(*d);
  return streams;
}

void HcWork::synchronize() {
  // Makes the caller's current stream wait for the copies back (a coalesced
  // Work's: those of every op it groups).
  for (const auto& d : devices_) {
    c10::impl::VirtualGuardImpl impl(d->device.type());
    d->copied->block(impl.getStream(d->device));
  }
  for (const auto& child : children_)
    child->synchronize();
}

bool HcWork::wait(std::chrono::milliseconds timeout) {
  // Only an unbounded wait may run ops inline: an inline op cannot stop at
  // the caller's deadline.
  if (help_ && timeout == kNoTimeout && !isCompleted())
    help_();
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (timeout == kNoTimeout) {
      cv_.wait(lock, [&] { return completed_; });
    } else if (!cv_.wait_for(lock, timeout, [&] { return completed_; })) {
      lock.unlock();
      throw_backend_error(c10::str(
          "hetcomm: rank ",
          rank_,
          ": ",
          what_,
          " Timed out: not complete after the ",
          timeout.count(),
          " ms given to Work.wait() (the op itself keeps running until its own timeout)"));
    }
    if (exception_)
      std::rethrow_exception(exception_);
  }
  synchronize();
  return true;
}

c10::intrusive_ptr<c10::ivalue::Future> HcWork::getFuture() {
  return future_;
}

uint64_t HcWork::getSequencenumber() const {
  return seq_;
}

} // namespace hetcomm_torch
