"""DDP communication hooks that compress gradients with hetcomm's codecs.

``model.register_comm_hook(group_or_None, hetcomm.ddp_hook("int8"))`` makes
DDP average each gradient bucket with a compressed allreduce: the codec runs
on every link (or, across sites, on the inter-site leg of the hierarchical
allreduce), with an error-feedback residual per bucket kept in the C core.

DDP.register_comm_hook of such a hook registers its C++ twin
(csrc/torch/ddp_hook.cpp) on DDP's reducer instead of the Python function:
the bucket's allreduce is then submitted from the autograd thread and
completed by the core's worker thread with no Python, and no GIL, per bucket.
"""
import logging
from typing import Any, Callable

import torch
import torch.distributed as dist

from hetcomm.comm import codec_code

log = logging.getLogger("hetcomm.torch")

# Residual keys: one per bucket index, in a range of this hook's own.
_KEY_BASE = 0x484F4F4B00000000  # "HOOK"


def _backend_of(group: Any, device: "torch.device") -> Any:
    from hetcomm.torch import _build

    group = group if group is not None else dist.group.WORLD
    backend = group._get_backend(device)
    return backend if isinstance(backend, _build.load().HetcommBackend) else None


def ddp_hook(codec: str = "int8", error_feedback: bool = True, stochastic_rounding: bool = False,
             seed: int = 0x5EED) -> Callable[[Any, dist.GradBucket], "torch.futures.Future[torch.Tensor]"]:
    """A DDP comm hook averaging gradients with a compressed hetcomm allreduce.

    Args:
        codec: "fp16", "bf16", "int8", "int4" or "1bit".
        error_feedback: keep a residual per bucket (what quantization dropped
            is added to the next step's gradient).
        stochastic_rounding: int8/int4 round stochastically (a new seed every step).
        seed: base seed of stochastic rounding.

    The process group registered with the hook (``state``; None: the default
    group) must be a "hetcomm" group; buckets below the communicator's
    ``codec_min_bytes`` are sent uncompressed.
    """
    code = codec_code(codec)
    if code <= 0:
        raise ValueError(f"ddp_hook needs a codec, one of fp16, bf16, int8, int4, 1bit; got {codec!r}")
    step = [0]

    # No postponed annotations in this module: DDP checks them at registration.
    def hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        tensor = bucket.buffer()
        backend = _backend_of(state, tensor.device)
        if backend is None:
            raise RuntimeError("hetcomm.ddp_hook: the DDP process group is not a 'hetcomm' group; "
                               "use dist.init_process_group('hetcomm') or pass a hetcomm group as the hook state")
        key = _KEY_BASE + bucket.index() + 1 if error_feedback else 0
        sr = (seed * 1000003 + step[0]) & (2**64 - 1) or 1 if stochastic_rounding else 0
        if bucket.is_last():
            step[0] += 1
        # 1: HC_AVG, DDP averages gradients. The future yields the tensor
        # itself and completes on the core's worker thread with no Python
        # callback, so the worker never waits for the GIL between buckets.
        return backend.allreduce_compressed(tensor, code, key, sr, 1, True).get_future()

    hook.__name__ = hook.__qualname__ = f"hetcomm_{codec}_hook"
    hook._hetcomm_native = (code, error_feedback, stochastic_rounding, seed)  # type: ignore[attr-defined]
    _route_registration()
    return hook


def _route_registration() -> None:
    """Makes DDP register hetcomm hooks as the C++ hook (once per process).

    DDP.register_comm_hook ends in ``torch.distributed._register_comm_hook(
    reducer, state, hook)``; for a hook made by :func:`ddp_hook` on a hetcomm
    group this registers the C++ hook instead. Anything else goes to torch's
    function unchanged.
    """
    original = dist._register_comm_hook
    if getattr(original, "_hetcomm_route", False):
        return

    def register(reducer: Any, state: Any, hook: Any) -> None:
        native = getattr(hook, "_hetcomm_native", None)
        group = state if state is not None else dist.distributed_c10d._get_default_group()
        if native is None or not isinstance(group, dist.ProcessGroup) or dist.get_backend(group) != "hetcomm":
            return original(reducer, state, hook)
        from hetcomm.torch import _build

        code, error_feedback, stochastic_rounding, seed = native
        _build.load().register_ddp_hook(reducer, group, code, error_feedback, stochastic_rounding, seed, _KEY_BASE)
        log.debug("DDP: registered hetcomm's C++ comm hook (%s)", hook.__name__)

    register._hetcomm_route = True  # type: ignore[attr-defined]
    dist._register_comm_hook = register
