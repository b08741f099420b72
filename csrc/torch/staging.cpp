/*
 * Host staging of tensor arguments, and the dtype / reduction mapping.
 *
 * The core moves bytes between host buffers. A contiguous CPU tensor is its
 * own host buffer (zero copy). A non-contiguous CPU tensor gets a contiguous
 * copy. An accelerator tensor gets a host buffer from the staging pool
 * (pinned when its allocator can pin) filled by the device's own
 * non-blocking copy on the caller's current stream; the caller waits for
 * those copies once per device and c10d call, before the core sees the
 * buffers. Copies back run when the op completes (see work.cpp), and the
 * buffers go back to the pool fenced by an event after those copies, so a
 * training loop stages through the same few blocks step after step.
 */
#include <algorithm>
#include <array>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include "hetcomm_torch.hpp"

namespace hetcomm_torch {

namespace {

int core_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return HC_FLOAT32;
    case at::kDouble:
      return HC_FLOAT64;
    case at::kHalf:
      return HC_FLOAT16;
    case at::kBFloat16:
      return HC_BFLOAT16;
    case at::kChar:
      return HC_INT8;
    case at::kShort:
      return HC_INT16;
    case at::kInt:
      return HC_INT32;
    case at::kLong:
      return HC_INT64;
    case at::kByte:
      return HC_UINT8;
    case at::kBool:
      return HC_BOOL;
    default:
      return -1;
  }
}

// Complex numbers are pairs of reals: they move, sum and average as such.
int complex_part(at::ScalarType type) {
  switch (type) {
    case at::kComplexFloat:
      return HC_FLOAT32;
    case at::kComplexDouble:
      return HC_FLOAT64;
    case at::kComplexHalf:
      return HC_FLOAT16;
    default:
      return -1;
  }
}

const char* redop_name(int op) {
  static const char* names[] = {"SUM", "AVG", "PRODUCT", "MIN", "MAX", "BAND", "BOR", "BXOR"};
  return op >= 0 && op < HC_REDOP_COUNT ? names[op] : "?";
}

// Whether pinning host memory works for a device type: 0 unknown, 1 yes, 2 no.
std::array<std::atomic<int>, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>
    pin_state{};

} // namespace

Wire wire_for_copy(at::ScalarType type) {
  int d = core_dtype(type);
  if (d >= 0)
    return {d, 1};
  int part = complex_part(type);
  if (part >= 0)
    return {part, 2};
  // Ops that only move data accept every dtype, as bytes.
  return {HC_UINT8, static_cast<int64_t>(c10::elementSize(type))};
}

Wire wire_for_reduce(at::ScalarType type, int hc_redop, const char* what) {
  int d = core_dtype(type);
  if (d >= 0)
    return {d, 1};
  int part = complex_part(type);
  if (part >= 0 && (hc_redop == HC_SUM || hc_redop == HC_AVG))
    return {part, 2};
  TORCH_CHECK(
      false,
      "hetcomm: ",
      what,
      " cannot reduce tensors of dtype ",
      type,
      " with ",
      redop_name(hc_redop),
      "; supported: float32, float64, float16, bfloat16, int8, int16, int32, int64, uint8, bool",
      " (and complex with SUM/AVG)");
}

int redop_of(const c10d::ReduceOp& op, const char* what) {
  switch (op.op_) {
    case c10d::ReduceOp::SUM:
      return HC_SUM;
    case c10d::ReduceOp::AVG:
      return HC_AVG;
    case c10d::ReduceOp::PRODUCT:
      return HC_PROD;
    case c10d::ReduceOp::MIN:
      return HC_MIN;
    case c10d::ReduceOp::MAX:
      return HC_MAX;
    case c10d::ReduceOp::BAND:
      return HC_BAND;
    case c10d::ReduceOp::BOR:
      return HC_BOR;
    case c10d::ReduceOp::BXOR:
      return HC_BXOR;
    case c10d::ReduceOp::PREMUL_SUM:
      TORCH_CHECK(
          false,
          "hetcomm: ",
          what,
          ": ReduceOp.PREMUL_SUM is not supported; multiply the tensor by the factor "
          "and use ReduceOp.SUM (or ReduceOp.AVG to divide by the group size)");
    default:
      TORCH_CHECK(false, "hetcomm: ", what, ": unknown ReduceOp ", static_cast<int>(op.op_));
  }
}

namespace {

// Pageable or pinned host memory of `bytes` bytes for data headed to or from
// `device`: pinned when the device's allocator can pin.
at::Tensor allocate_host(int64_t bytes, const c10::Device& device) {
  auto options = at::TensorOptions().dtype(at::kByte).device(at::kCPU);
  auto type = static_cast<size_t>(device.type());
  if (!device.is_cpu() && pin_state[type].load() != 2) {
    try {
      auto h = at::empty({bytes}, options.pinned_memory(true));
      pin_state[type].store(1);
      return h;
    } catch (const c10::Error& e) {
      // Some devices (mps: unified memory) have no pinned host allocator.
      pin_state[type].store(2);
      TORCH_WARN_ONCE(
          "hetcomm: cannot pin host memory for ",
          device.type(),
          " tensors; staging through pageable memory (",
          e.what_without_backtrace(),
          ")");
    }
  }
  return at::empty({bytes}, options);
}

// Staging buffers are kept for reuse up to this many bytes in all.
constexpr int64_t kPoolKeepBytes = int64_t(512) << 20;

// Rounds a request up (powers of two above 64 KiB, 4 KiB steps below) so
// that the varying sizes of one training loop map to a few reusable blocks.
int64_t block_size(int64_t bytes) {
  if (bytes <= (int64_t(64) << 10))
    return std::max<int64_t>(4096, (bytes + 4095) & ~int64_t(4095));
  int64_t b = int64_t(64) << 10;
  while (b < bytes)
    b <<= 1;
  return b;
}

} // namespace

HostPool& HostPool::instance() {
  // Leaked on purpose: Works may return blocks during interpreter exit.
  static auto* pool = new HostPool();
  return *pool;
}

at::Tensor HostPool::take(int64_t bytes, const c10::Device& device) {
  int64_t size = block_size(bytes);
  bool pinned = !device.is_cpu();
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->block.numel() != size || it->device_type != device.type() || it->pinned != pinned)
        continue;
      // A block whose last asynchronous copy (host to device) has not run
      // yet stays where it is.
      bool ready = std::all_of(it->fences.begin(), it->fences.end(), [](const auto& f) { return f->query(); });
      if (!ready)
        continue;
      auto block = std::move(it->block);
      free_bytes_ -= size;
      free_.erase(it);
      ++reuses_;
      return block;
    }
    ++allocations_;
  }
  return allocate_host(size, device);
}

void HostPool::give(at::Tensor block, const c10::Device& device, std::vector<std::shared_ptr<c10::Event>> fences) {
  std::lock_guard<std::mutex> lock(mu_);
  free_.push_back(Free{std::move(block), device.type(), !device.is_cpu(), std::move(fences)});
  free_bytes_ += free_.back().block.numel();
  // Oldest blocks go first when the pool holds too much.
  while (free_bytes_ > kPoolKeepBytes && !free_.empty()) {
    free_bytes_ -= free_.front().block.numel();
    free_.pop_front();
  }
}

HostPool::Stats HostPool::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  return Stats{allocations_, reuses_, free_bytes_};
}

void HostPool::clear() {
  std::lock_guard<std::mutex> lock(mu_);
  free_.clear();
  free_bytes_ = 0;
}

namespace {

bool zero_copy(const at::Tensor& t) {
  return t.device().is_cpu() && t.is_contiguous() && !t.is_conj() && !t.is_neg();
}

} // namespace

at::Tensor Staging::host(at::IntArrayRef sizes, at::ScalarType type, const c10::Device& like) {
  int64_t numel = c10::multiply_integers(sizes);
  int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(type));
  auto block = HostPool::instance().take(std::max<int64_t>(bytes, 1), like);
  work_.lend(block, like);
  return block.narrow(0, 0, bytes).view(type).view(sizes);
}

at::Tensor Staging::in(const at::Tensor& t) {
  if (zero_copy(t)) {
    work_.keep(t);
    return t;
  }
  if (t.device().is_cpu()) {
    auto c = t.resolve_conj().resolve_neg().contiguous();
    work_.keep(c);
    return c;
  }
  auto h = host(t.sizes(), t.scalar_type(), t.device());
  fill(h, t);
  return h;
}

void Staging::fill(const at::Tensor& dst, const at::Tensor& t) {
  if (t.device().is_cpu()) {
    dst.copy_(t);
    return;
  }
  {
    c10::DeviceGuard guard(t.device());
    // The device's own asynchronous copy, queued behind the kernels that
    // produced t on the caller's current stream; wait_inputs() waits for
    // all of them at once.
    dst.copy_(t, /*non_blocking=*/true);
  }
  if (std::find(d2h_devices_.begin(), d2h_devices_.end(), t.device()) == d2h_devices_.end())
    d2h_devices_.push_back(t.device());
}

at::Tensor Staging::out(const at::Tensor& t) {
  if (zero_copy(t)) {
    work_.keep(t);
    return t;
  }
  auto h = host(t.sizes(), t.scalar_type(), t.device());
  work_.copy_back(t, h);
  return h;
}

at::Tensor Staging::inout(const at::Tensor& t) {
  if (zero_copy(t)) {
    work_.keep(t);
    return t;
  }
  auto h = in(t);
  work_.copy_back(t, h);
  return h;
}

at::Tensor Staging::scratch(int64_t numel, at::ScalarType type, const at::Device& like) {
  return host({numel}, type, like);
}

void Staging::wait_inputs() {
  // Every copy of this call went to its device's current stream in order,
  // so one event after the last of them covers them all: one
  // synchronisation per device and call, however many tensors.
  for (const auto& device : d2h_devices_) {
    c10::impl::VirtualGuardImpl impl(device.type());
    c10::Event done(device.type());
    done.record(impl.getStream(device));
    done.synchronize();
  }
  d2h_devices_.clear();
}

} // namespace hetcomm_torch
