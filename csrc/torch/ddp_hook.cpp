/*
 * The DDP comm hook in C++: DDP's reducer calls it from the autograd thread as
 * soon as a bucket is ready, it submits the compressed allreduce to the core
 * and hands back the Work's future, which the core's worker thread completes
 * with the averaged bucket. No Python runs per bucket and no thread waits
 * for the GIL, so a bucket's collective starts while backward is still
 * running and progresses while the training thread computes.
 *
 * The Python hook (hetcomm.torch.hooks.ddp_hook) does the same arithmetic;
 * hooks.py routes DDP.register_comm_hook of such a hook to this class.
 */
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>

#include "hetcomm_torch.hpp"

namespace hetcomm_torch {

namespace {

class DdpHook : public c10d::CommHookInterface {
 public:
  DdpHook(c10::intrusive_ptr<c10d::ProcessGroup> group, const DdpHookConfig& cfg) : group_(std::move(group)), cfg_(cfg) {}

  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override {
    at::Tensor tensor = bucket.getBufferRef();
    auto backend = group_->getBackend(tensor.device().type());
    auto* hc = dynamic_cast<HcBackend*>(backend.get());
    TORCH_CHECK(hc != nullptr, "hetcomm.ddp_hook: the DDP process group's backend for ", tensor.device().type(),
                " is not 'hetcomm'");
    uint64_t key = cfg_.error_feedback ? cfg_.key_base + bucket.getIndex() + 1 : 0;
    uint64_t sr = 0;
    if (cfg_.stochastic_rounding) {
      sr = cfg_.seed * 1000003ull + step_;
      sr = sr ? sr : 1;
    }
    if (bucket.isLast())
      ++step_;
    // HC_AVG: DDP averages gradients.
    return hc->allreduce_compressed(tensor, cfg_.codec, key, sr, HC_AVG, /*tensor_future=*/true)->getFuture();
  }

  at::Tensor parseHookResult(const c10::IValue& result) override {
    return c10d::detail::parseCppCommHookResult(result);
  }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  DdpHookConfig cfg_;
  uint64_t step_ = 0;  // only the autograd thread touches it
};

} // namespace

void register_ddp_hook(c10d::Reducer& reducer, c10d::ProcessGroup& group, const DdpHookConfig& cfg) {
  TORCH_CHECK(cfg.codec > 0 && cfg.codec < HC_CODEC_COUNT, "hetcomm.ddp_hook: codec ", cfg.codec, " is not a codec");
  reducer.register_comm_hook(std::make_unique<DdpHook>(c10::intrusive_ptr<c10d::ProcessGroup>::reclaim_copy(&group), cfg));
}

} // namespace hetcomm_torch
