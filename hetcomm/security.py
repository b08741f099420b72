"""CurveZMQ on links between sites: key pairs, the allow-list, the authenticator.

Each host (or rank) has a key pair made by ``hetcomm keygen``: a public
certificate ``NAME.key`` and a secret one ``NAME.key_secret``. Every rank is
given its secret certificate and a directory of the public certificates it
trusts (the allow-list). A rank refuses connections whose key is not listed
(ZAP, served by pyzmq's authenticator on hetcomm's ZeroMQ context) and only
connects to peers whose published key is listed, so both directions of every
inter-site link are authenticated and encrypted. Links inside a site stay
plain: they never leave the data centre, and encryption costs CPU.
"""
from __future__ import annotations

import glob
import logging
import os
import threading
from dataclasses import dataclass, field

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from hetcomm.errors import AuthError

log = logging.getLogger("hetcomm.security")

# The ZAP domain the C core sets on its CURVE sockets (HC_ZAP_DOMAIN in csrc/transport/zmq.c).
ZAP_DOMAIN = "hetcomm"


def keygen(directory: str, name: str) -> tuple[str, str]:
    """Creates ``NAME.key`` (public) and ``NAME.key_secret`` in ``directory``;
    returns their paths. Refuses to overwrite an existing key pair."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    public, secret = (os.path.join(directory, f"{name}.key{s}") for s in ("", "_secret"))
    for path in (public, secret):
        if os.path.exists(path):
            raise FileExistsError(f"{path} exists; remove it or choose another name")
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


def load_secret(path: str) -> tuple[str, str]:
    """(public, secret) Z85 keys from a secret certificate."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the CURVE secret certificate {path!r}: {exc}") from None
    if not secret:
        raise ValueError(f"{path!r} holds no secret key; pass the NAME.key_secret file made by `hetcomm keygen`")
    return public.decode(), secret.decode()


def load_allow_list(directory: str) -> set[str]:
    """The public keys (Z85) of every certificate in ``directory``."""
    if not os.path.isdir(directory):
        raise ValueError(f"CURVE allow-list directory {directory!r} does not exist")
    keys = set()
    for path in glob.glob(os.path.join(directory, "*.key")):
        public, _ = zmq.auth.load_certificate(path)
        keys.add(public.decode())
    if not keys:
        raise ValueError(f"CURVE allow-list directory {directory!r} holds no public certificates (*.key)")
    return keys


@dataclass
class _Allowed:
    """The authenticator's callback: the union of every communicator's allow-list."""

    keys: set[str] = field(default_factory=set)
    denied: list[str] = field(default_factory=list)

    def callback(self, domain: str, key: bytes) -> bool:
        z85 = zmq.utils.z85.encode(key).decode() if len(key) == 32 else key.decode()
        if z85 in self.keys:
            return True
        self.denied.append(z85)
        log.warning("refused a CURVE connection: key %s is not in the allow-list", z85)
        return False


_lock = threading.Lock()
_auth: ThreadAuthenticator | None = None
_allowed = _Allowed()


def start_authenticator(ctx: zmq.Context, allow: set[str]) -> None:
    """Serves ZAP on ``ctx`` (once per process) and adds ``allow`` to the allow-list."""
    global _auth
    with _lock:
        _allowed.keys |= allow
        if _auth is None:
            _auth = ThreadAuthenticator(ctx, log=logging.getLogger("hetcomm.zap"))
            _auth.start()
            _auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=_allowed)


def recently_denied() -> list[str]:
    """Keys refused so far (for error messages)."""
    return list(_allowed.denied)


def check_peer_key(rank: int, key: str | None, allow: set[str]) -> str:
    """A peer's published key, if the allow-list trusts it."""
    if not key:
        raise AuthError(f"rank {rank} published no CURVE key but this rank requires CURVE between sites "
                        f"(set HETCOMM_CURVE_SECRET there too)", "HC_ERR_AUTH")
    if key not in allow:
        raise AuthError(f"rank {rank} published CURVE key {key}, which is not in this rank's allow-list",
                        "HC_ERR_AUTH")
    return key
