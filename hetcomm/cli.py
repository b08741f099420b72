"""The ``hetcomm`` command: key generation, a look at the installation, and a check-up for runs across sites."""
from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys


def _keygen(args: argparse.Namespace) -> int:
    from hetcomm.security import keygen

    public, secret = keygen(args.directory, args.name)
    print(f"public key:  {public}\n  -> copy into every rank's allow-list directory (HETCOMM_CURVE_ALLOW)")
    print(f"secret key:  {secret}\n  -> stays on this host; point HETCOMM_CURVE_SECRET at it")
    return 0


def _info(args: argparse.Namespace) -> int:
    import zmq

    from hetcomm import __version__
    from hetcomm._capi import ffi, lib

    print(f"hetcomm {__version__}")
    print(f"kernels: {ffi.string(lib.hc_simd_level()).decode()}")
    print(f"libzmq {zmq.zmq_version()} (from pyzmq {zmq.__version__}), CURVE: {bool(zmq.has('curve'))}")
    try:
        import torch

        print(f"torch {torch.__version__}")
    except ImportError:
        print("torch: not installed (the torch backend is unavailable; Communicator works)")
    # What this rank would run with: arguments aside, the HETCOMM_* environment and defaults.
    from hetcomm.config import Options

    try:
        opts = Options().resolved()
    except ValueError as exc:
        print(f"configuration: {exc}")
        return 1
    print(f"host {opts.host or socket.gethostname()}, site {opts.site or '(none: one site)'}"
          + (f" (from {opts.topology})" if opts.topology and not os.environ.get("HETCOMM_SITE") else ""))
    for f in dataclasses.fields(opts):
        value = getattr(opts, f.name)
        if f.name not in ("site", "host", "extra") and value is not None:
            print(f"  {f.name} = {value}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from hetcomm import doctor

    if args.serve:
        try:
            server = doctor.DoctorServer(args.bind, args.port)
        except OSError as exc:
            raise ValueError(f"cannot listen on {args.bind}:{args.port}: {exc.strerror or exc}") from None
        print(f"hetcomm doctor: serving link tests on {args.bind}:{server.port} (Ctrl-C to stop); on the other "
              f"site run: hetcomm doctor --peer {socket.gethostname()}:{server.port}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.close()
        return 0
    if args.seconds <= 0:
        raise ValueError("--seconds must be positive")
    return doctor.diagnose(args.peer, args.seconds, torch=not args.no_torch)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hetcomm`` console script."""
    parser = argparse.ArgumentParser(prog="hetcomm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="make a CurveZMQ key pair for links between sites")
    k.add_argument("directory", help="where to write NAME.key and NAME.key_secret")
    k.add_argument("--name", default=None, help="certificate name (default: this host's name)")
    k.set_defaults(fn=_keygen)
    i = sub.add_parser("info", help="versions, the SIMD level of the kernels, and the settings this environment gives")
    i.set_defaults(fn=_info)
    d = sub.add_parser("doctor", help="check this host for runs across sites; with --peer, measure the link",
                       description="Checks the site label, socket-buffer limits against the WAN's "
                                   "bandwidth-delay product, CURVE keys and the torch shim; with --peer, "
                                   "measures round trip and throughput (plain TCP, 1-8 streams) to a host "
                                   "running `hetcomm doctor --serve` and suggests HETCOMM_STREAMS, "
                                   "HETCOMM_WAN_BANDWIDTH and HETCOMM_WAN_RTT. Exit status 1 if a check failed.")
    d.add_argument("--peer", metavar="HOST[:PORT]", help="measure the link to this host (runs --serve)")
    d.add_argument("--serve", action="store_true", help="answer another host's --peer tests until Ctrl-C")
    d.add_argument("--port", type=int, default=None, help="--serve: port to listen on (default 29556)")
    d.add_argument("--bind", default="0.0.0.0", help="--serve: address to listen on (default %(default)s)")
    d.add_argument("--seconds", type=float, default=2.0,
                   help="--peer: seconds per throughput test, 4 tests (default %(default)s)")
    d.add_argument("--no-torch", action="store_true", help="skip building the torch shim")
    d.set_defaults(fn=_doctor)
    args = parser.parse_args(argv)
    if args.command == "keygen" and not args.name:
        args.name = socket.gethostname()
    if args.command == "doctor" and args.port is None:
        from hetcomm.doctor import DEFAULT_PORT

        args.port = DEFAULT_PORT
    try:
        return args.fn(args)
    except (FileExistsError, ValueError) as exc:
        print(f"hetcomm {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
