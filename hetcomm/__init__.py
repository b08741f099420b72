"""hetcomm: collectives across data centres and accelerator vendors.

``import hetcomm`` registers the "hetcomm" torch.distributed backend when
torch is installed; :class:`Communicator` works without torch.
"""
from typing import Any, Callable

from hetcomm.comm import Communicator, ReduceOp, Work
from hetcomm.config import Options
from hetcomm.errors import (AbortedError, AuthError, CommTimeoutError, HetcommError, MismatchError,
                            PeerLostError, ProtocolError)


def get_include() -> str:
    """Directory holding hetcomm.h, for C programs that embed the core."""
    import os

    here = os.path.dirname(__file__)
    for candidate in (os.path.join(here, "_csrc"), os.path.join(here, "..", "csrc")):
        if os.path.exists(os.path.join(candidate, "hetcomm.h")):
            return os.path.realpath(candidate)
    raise FileNotFoundError("hetcomm.h is not installed with this copy of hetcomm")


def ddp_hook(codec: str = "int8", error_feedback: bool = True, stochastic_rounding: bool = False,
             seed: int = 0x5EED) -> Callable[..., Any]:
    """A DDP comm hook averaging gradients with a compressed hetcomm allreduce
    (see hetcomm.torch.hooks.ddp_hook); needs torch and a "hetcomm" group."""
    from hetcomm.torch.hooks import ddp_hook as make

    return make(codec, error_feedback, stochastic_rounding, seed)


def get_library_dir() -> str:
    """Directory holding libhetcomm.so (link with -L<dir> -lhetcomm)."""
    import os

    return os.path.join(os.path.dirname(__file__), "lib")


__all__ = ["ddp_hook", "get_include", "get_library_dir", "Communicator", "ReduceOp", "Work", "Options",
           "HetcommError", "CommTimeoutError", "PeerLostError", "MismatchError", "ProtocolError", "AbortedError",
           "AuthError"]
__version__ = "0.1.0"

# Registers the "hetcomm" torch.distributed backend once torch.distributed is
# imported; imports nothing from torch by itself.
from hetcomm.torch import _hook as _torch_hook  # noqa: E402

_torch_hook.install()
