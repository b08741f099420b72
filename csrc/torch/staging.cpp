/*
 * Host staging of tensor arguments, and the dtype / reduction mapping.
 *
 * The core moves bytes between host buffers. A contiguous CPU tensor is its
 * own host buffer (zero copy). Anything else gets a contiguous host buffer:
 * a non-contiguous CPU tensor a plain one, an accelerator tensor a pinned one
 * (when its allocator can pin) filled by the device's own non-blocking copy
 * on the caller's current stream. The caller waits for those copies once per
 * c10d call, before the core sees the buffer; copies back happen when the op
 * completes (see work.cpp).
 */
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

at::Tensor host_empty(at::IntArrayRef sizes, at::ScalarType dtype, const c10::Device& device) {
  auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  auto type = static_cast<size_t>(device.type());
  if (!device.is_cpu() && pin_state[type].load() != 2) {
    try {
      auto h = at::empty(sizes, options.pinned_memory(true));
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
  return at::empty(sizes, options);
}

at::Tensor host_empty_like(const at::Tensor& t) {
  return host_empty(t.sizes(), t.scalar_type(), t.device());
}

namespace {

bool zero_copy(const at::Tensor& t) {
  return t.device().is_cpu() && t.is_contiguous() && !t.is_conj() && !t.is_neg();
}

} // namespace

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
  auto h = host_empty_like(t);
  {
    c10::DeviceGuard guard(t.device());
    c10::impl::VirtualGuardImpl impl(t.device().type());
    // The device's own asynchronous copy, queued behind the kernels that
    // produced t on the caller's current stream.
    h.copy_(t, /*non_blocking=*/true);
    c10::Event done(t.device().type());
    done.record(impl.getStream(t.device()));
    d2h_.push_back(std::move(done));
  }
  work_.keep(h);
  return h;
}

at::Tensor Staging::out(const at::Tensor& t) {
  if (zero_copy(t)) {
    work_.keep(t);
    return t;
  }
  auto h = t.device().is_cpu()
      ? at::empty(t.sizes(), at::TensorOptions().dtype(t.scalar_type()).device(at::kCPU))
      : host_empty_like(t);
  work_.keep(h);
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
  auto h = host_empty({numel}, type, like);
  work_.keep(h);
  return h;
}

void Staging::wait_inputs() {
  for (const auto& e : d2h_)
    e.synchronize();
  d2h_.clear();
}

} // namespace hetcomm_torch
