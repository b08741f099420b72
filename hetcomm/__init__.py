"""hetcomm: collectives across data centres and accelerator vendors.

``import hetcomm`` registers the "hetcomm" torch.distributed backend when
torch is installed; :class:`Communicator` works without torch.
"""
from hetcomm.comm import Communicator, ReduceOp, Work
from hetcomm.config import Options
from hetcomm.errors import (AbortedError, AuthError, CommTimeoutError, HetcommError, MismatchError,
                            PeerLostError, ProtocolError)

__all__ = ["Communicator", "ReduceOp", "Work", "Options", "HetcommError", "CommTimeoutError",
           "PeerLostError", "MismatchError", "ProtocolError", "AbortedError", "AuthError"]
__version__ = "0.1.0"

# Registers the "hetcomm" torch.distributed backend once torch.distributed is
# imported; imports nothing from torch by itself.
from hetcomm.torch import _hook as _torch_hook  # noqa: E402

_torch_hook.install()
