"""``hetcomm-bench``: an nccl-tests-style collective benchmark, hetcomm beside torch's gloo.

Spawns ``--world-size`` local ranks, runs each collective over a range of
sizes, checks every result against a numpy reference and prints one table per
collective on stdout (logs go to stderr). See ``hetcomm-bench --help``.

Exit status: 0 all good; 1 some result was wrong or ranks disagreed bit for
bit; 2 bad arguments or a backend/testbed that cannot run here; 3 a rank
failed, crashed or stalled (its error is printed); 130 interrupted; 141 stdout closed early.
"""
from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Any

from .backends import BackendUnavailable, check_backend
from .collectives import CODECS, COLLECTIVES, Case, DType, build_plan, parse_dtype, parse_ops
from .launcher import Launcher, LauncherUnavailable, RankFailure, make_launcher, run_world
from .results import Collector, Row, machine_info, now_iso, write_json
from .runner import RankConfig
from .plot import PlotUnavailable, plot_results, require_matplotlib
from .progress import Progress
from .sizes import (AUTO_BYTES_PER_LOOP, AUTO_MAX_ITERS, AUTO_MIN_ITERS, format_size, parse_size,
                    parse_size_list, size_range)
from .table import SIZE_CONVENTION, TIMING_CONVENTION, TableWriter, summary_line

log = logging.getLogger("hetcomm.bench.cli")

BACKENDS = ("hetcomm", "gloo")
DEFAULT_VIA = {"hetcomm": "numpy", "gloo": "torch"}
DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE, DEFAULT_STEP_FACTOR = "4", "256M", 4
#: the run with no size option: a few sizes and shorter timed loops, about half a minute with gloo
QUICK_SIZES = "4,256,16K,256K,1M,4M,16M"
QUICK_BYTES_PER_LOOP = 256 << 20
EXIT_OK, EXIT_WRONG, EXIT_USAGE, EXIT_RANK_FAILED, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 3, 130, 141

DESCRIPTION = "\n\n".join(textwrap.fill(t, 79) for t in (
    "Collective benchmark in the style of nccl-tests: spawns local ranks, times allreduce, broadcast, "
    "allgather, reduce_scatter and alltoall over a range of sizes, checks every result against a numpy "
    "reference and prints a table per collective on stdout (logs on stderr). With no arguments: a quick run "
    "(4 B .. 16 MiB) of hetcomm beside gloo, with an 'x gloo' column, a progress bar on a terminal and a "
    "one-line summary at the end.",
    SIZE_CONVENTION,
    TIMING_CONVENTION,
    "#wrong counts elements that differ from the reference, summed over ranks (exact, since the test data "
    "are small integers; with a lossy --codec see --codec). Sizes take binary K/M/G suffixes (1K = 1024).",
))

EPILOG = """\
examples:
  hetcomm-bench                                   quick look: hetcomm beside gloo, 2 ranks, all ops, 4 B .. 16 MiB
  hetcomm-bench --full --plot busbw.png           4 B .. 256 MiB in steps of 4, and a picture of busbw
  hetcomm-bench --compare none                    hetcomm alone
  hetcomm-bench --backend gloo                    the gloo baseline alone
  hetcomm-bench --backend gloo -n 4 --ops allreduce --min-size 16M --max-size 256M
  hetcomm-bench --codec int8 --ops allreduce --json out.json

exit status: 0 ok, 1 wrong results, 2 bad arguments or backend unavailable,
3 a rank failed or stalled, 130 interrupted, 141 stdout closed early.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also the source of ``--help``)."""
    p = argparse.ArgumentParser(prog="hetcomm-bench", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--backend", choices=BACKENDS, default="hetcomm",
                   help="library to benchmark (default: %(default)s)")
    g.add_argument("--via", choices=("numpy", "torch"),
                   help="hetcomm through its numpy Communicator (default for hetcomm) or through "
                        "torch.distributed (init_process_group(BACKEND); the only path for gloo)")
    g.add_argument("--compare", choices=BACKENDS + ("none",), metavar="{gloo,hetcomm,none}",
                   help="also run this backend (same sizes, same machine, one after the other) and "
                        "print its time/busbw beside each row, plus 'x OTHER' = OTHER's time / this time "
                        "(default: gloo beside hetcomm when torch is installed; none: one backend alone)")
    g.add_argument("-n", "--world-size", type=int, default=2, help="number of ranks (default: %(default)s)")
    g.add_argument("-o", "--ops", default="all",
                   help=f"comma-separated collectives, or 'all' (default): {', '.join(COLLECTIVES)}")
    g.add_argument("-d", "--dtype", default="float32",
                   help="element type: float32 (default), float64, float16, bfloat16 (--via torch only), "
                        "int8, int16, int32, int64, uint8, bool")
    g.add_argument("--root", type=int, default=0, help="broadcast root (default: %(default)s)")
    g.add_argument("--codec", default="none", metavar="{" + ",".join(CODECS) + "}[,...]",
                   help="compression for hetcomm's allreduce and reduce_scatter; a comma-separated list runs "
                        "hetcomm once per codec, each beside the same gloo run (floating-point dtypes; "
                        "not applied to gloo; --via torch: the process group's default codec, "
                        "ProcessGroupOptions(codec=...)). Checking then accepts an absolute error per element of "
                        "2 * n^2 * M * eps with M = 2 (the data are integers in [-2, 2]) and eps = 2^-11 "
                        "fp16, 2^-8 bf16, 1/254 int8, 1/14 int4, 2 for 1bit: up to n partial sums of "
                        "magnitude <= n*M are quantized, plus one error-feedback residual carried in. "
                        "All ranks must still agree bit for bit")
    s = p.add_argument_group("sizes and iterations")
    s.add_argument("--sizes", help="comma-separated sizes in bytes, e.g. 4,1K,1M,64M (instead of a range; "
                                   f"default with no size option: the quick set {QUICK_SIZES})")
    s.add_argument("--full", action="store_true",
                   help="the full range 4 B .. 256 MiB in steps of 4 (what --min-size, --max-size and "
                        "--step-factor default to)")
    s.add_argument("--min-size", help="smallest size of the range (default: 4)")
    s.add_argument("--max-size", help="largest size of the range, included when on the progression "
                                      "(default: 256M)")
    s.add_argument("--step-factor", type=int, help="integer factor between sizes of the range (default: 4)")
    s.add_argument("--iters", type=int,
                   help=f"timed iterations per size (default: auto = clamp(1 GiB / size, "
                        f"{AUTO_MIN_ITERS}, {AUTO_MAX_ITERS}); 256 MiB / size for the quick set)")
    s.add_argument("--warmup", type=int,
                   help="untimed iterations before timing (default: auto = clamp(iters // 10, 1, 20))")
    s.add_argument("--no-check", action="store_true",
                   help="skip result checking (#wrong shows N/A)")
    r = p.add_argument_group("running")
    r.add_argument("--timeout", type=float, default=300.0,
                   help="each backend's own operation/rendezvous timeout in seconds, so a rank that "
                        "waits on a dead or silent peer fails with the backend's error; as a backstop "
                        "all ranks are killed when none reports progress for 1.25*TIMEOUT+5 s "
                        "(default: %(default)s)")
    r.add_argument("--json", metavar="FILE", help="write machine info, arguments and every row as JSON")
    r.add_argument("--plot", metavar="FILE.png",
                   help="draw busbw against size per collective, one line per backend (runs with "
                        "--sites: time per size as bars); needs matplotlib (pip install 'hetcomm[plot]'). "
                        "python -m hetcomm.bench.plot OUT.png A.json B.json ... combines several --json runs")
    r.add_argument("--sites", type=int, help="WAN testbed: spread ranks over N sites in network namespaces "
                                             "(needs root; see hetcomm.testbed.netns)")
    r.add_argument("--wan-rate", help="WAN testbed: link rate between sites, e.g. 1gbit (with --sites)")
    r.add_argument("-v", "--verbose", action="count", default=0,
                   help="more logging on stderr (-v: rank output, -vv: debug)")
    r.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    return p


@dataclass
class Run:
    """One backend run: the world that is started for it."""

    backend: str
    via: str
    codec: str
    #: say the codec in the label (several codecs in one run)
    show_codec: bool = False

    @property
    def label(self) -> str:
        """Name in the table (``gloo``, ``hetcomm``, ``hetcomm/torch``, ``hetcomm int8``)."""
        name = self.backend if self.via == DEFAULT_VIA[self.backend] else f"{self.backend}/{self.via}"
        return f"{name} {self.codec}" if self.show_codec and self.codec != "none" else name


@dataclass
class Options:
    """Validated, resolved arguments."""

    primaries: list[Run]  # one per codec
    compare: Run | None
    world_size: int
    dtype: DType
    ops: list[str]
    sizes: list[int]
    cases: list[Case]
    notes: list[str]

    @property
    def primary(self) -> Run:
        """The first (usually only) run of the benchmarked backend."""
        return self.primaries[0]


def resolve(args: argparse.Namespace) -> Options:
    """Check the arguments against each other and the installed backends.

    Raises:
        ValueError, BackendUnavailable: with a message for the user.
    """
    n = args.world_size
    if n < 1:
        raise ValueError("--world-size must be at least 1")
    dtype = parse_dtype(args.dtype)
    ops = parse_ops(args.ops)
    range_given = [o for o, v in (("--min-size", args.min_size), ("--max-size", args.max_size),
                                  ("--step-factor", args.step_factor)) if v is not None]
    bytes_per_loop = AUTO_BYTES_PER_LOOP
    if args.sizes is not None:
        if range_given or args.full:
            raise ValueError(f"--sizes cannot be combined with {' / '.join(range_given or ['--full'])}")
        sizes = parse_size_list(args.sizes)
        if any(s <= 0 for s in sizes):
            raise ValueError("--sizes: every size must be at least 1 byte")
    elif not (range_given or args.full):
        sizes, bytes_per_loop = parse_size_list(QUICK_SIZES), QUICK_BYTES_PER_LOOP
    else:
        sizes = size_range(parse_size(args.min_size or DEFAULT_MIN_SIZE),
                           parse_size(args.max_size or DEFAULT_MAX_SIZE),
                           DEFAULT_STEP_FACTOR if args.step_factor is None else args.step_factor)
    if args.iters is not None and args.iters < 1:
        raise ValueError("--iters must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        raise ValueError("--warmup must not be negative")
    if not 0 <= args.root < n:
        raise ValueError(f"--root {args.root} is not a rank of a world of {n}")
    if args.timeout <= 0:
        raise ValueError("--timeout must be positive")
    if dtype.itemsize == 1 and dtype.kind != "bool" and n > 63 and any(COLLECTIVES[o].reduces for o in ops):
        raise ValueError(f"sums of the test data overflow {dtype.name} beyond 63 ranks")
    if args.sites is not None and args.sites < 1:
        raise ValueError("--sites must be at least 1")
    if args.wan_rate is not None and not args.wan_rate.strip():
        raise ValueError("--wan-rate must not be empty")

    via = args.via or DEFAULT_VIA[args.backend]
    if args.backend == "gloo" and via != "torch":
        raise ValueError("--backend gloo runs through torch.distributed only (--via torch)")
    compare = _default_compare(args, dtype) if args.compare is None else args.compare
    args.compare = None if compare == "none" else compare  # resolved, so the JSON records what ran
    if args.compare is not None and args.compare == args.backend:
        raise ValueError(f"--compare {args.compare}: --backend is already {args.backend}; "
                         "nothing to compare (pick the other backend)")
    codecs = parse_codecs(args.codec)
    if codecs != ["none"]:
        if "hetcomm" not in (args.backend, args.compare):
            raise ValueError(f"--codec {args.codec} is a hetcomm option; gloo has no codecs")
        if not dtype.is_float:
            raise ValueError(f"--codec {args.codec}: codecs apply to floating-point reductions only, "
                             f"not {dtype.name}")
    if len(codecs) > 1 and args.backend != "hetcomm":
        raise ValueError(f"--codec {args.codec}: several codecs need --backend hetcomm")

    def make_run(backend: str, path: str, codec: str) -> Run:
        return Run(backend, path, codec if backend == "hetcomm" else "none", show_codec=len(codecs) > 1)

    primaries = [make_run(args.backend, via, c) for c in codecs]
    compare = make_run(args.compare, DEFAULT_VIA[args.compare], codecs[0]) if args.compare else None
    for run in (*primaries, compare):
        if run is not None:
            check_backend(run.backend, run.via, dtype, run.codec)
    if args.plot:
        require_matplotlib()
    cases, notes = build_plan(ops, sizes, dtype, n, args.iters, args.warmup, bytes_per_loop)
    if not cases:
        raise ValueError("no case left to run: every size is smaller than one element "
                         "(per rank, for allgather/reduce_scatter/alltoall)")
    return Options(primaries, compare, n, dtype, ops, sizes, cases, notes)


def parse_codecs(text: str) -> list[str]:
    """``--codec``: one codec or a comma-separated list, each one of :data:`CODECS`, order kept."""
    names = [c.strip().lower() for c in text.split(",") if c.strip()]
    for c in names:
        if c not in CODECS:
            raise ValueError(f"argument --codec: invalid choice: {c!r} (choose from {', '.join(CODECS)})")
    if not names:
        raise ValueError("argument --codec: empty")
    return list(dict.fromkeys(names))


def _case(row: Row) -> str:
    size = format_size(row.size)
    return f"{row.op} {size}{' B' if size.isdigit() else ''}"


def _default_compare(args: argparse.Namespace, dtype: DType) -> str:
    """gloo beside hetcomm when it can run here, else nothing (said at INFO)."""
    if args.backend != "hetcomm":
        return "none"
    try:
        check_backend("gloo", "torch", dtype, "none")
    except BackendUnavailable as exc:
        log.info("running hetcomm alone: gloo cannot run beside it here (%s)", exc)
        return "none"
    return "gloo"


def stall_timeout(timeout: float) -> float:
    """Seconds without any rank's progress before the launcher kills the world.

    Longer than the backends' own ``timeout``, so that their errors (which name
    the peer) normally come first and this only catches what they miss.
    """
    return 1.25 * timeout + 5.0


def _setup_logging(verbose: int, quiet: bool) -> str:
    """Configure stderr logging; return the log level name for the ranks."""
    level = logging.DEBUG if verbose >= 2 else logging.INFO if verbose == 1 else logging.WARNING
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "hetcomm-bench: %(message)s"
    logging.basicConfig(stream=sys.stderr, level=level, format=fmt, force=True)
    if not quiet:
        log.setLevel(min(level, logging.INFO))
    return logging.getLevelName(level)


def _preamble(w: TableWriter, opts: Options, args: argparse.Namespace, launcher: Launcher,
              machine: dict[str, Any]) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("hetcomm")
    except PackageNotFoundError:
        ver = "dev"
    who = f"{opts.primary.backend} via {opts.primary.via}"
    if opts.compare:
        who += f", compared with {opts.compare.backend} via {opts.compare.via}"
    w.comment(f"hetcomm-bench {ver}: {who}")
    codec = args.codec + (" (hetcomm only)" if args.codec != "none" and opts.compare else "")
    w.comment(f"world size {opts.world_size} ({launcher.description}), dtype {opts.dtype.name}, "
              f"codec {codec}, broadcast root {args.root}")
    iters = args.iters if args.iters is not None else "auto"
    warm = args.warmup if args.warmup is not None else "auto"
    sizes = sorted(set(opts.sizes))
    w.comment(f"sizes {format_size(sizes[0])}..{format_size(sizes[-1])} B ({len(sizes)}), iters {iters}, "
              f"warmup {warm}, check {'off' if args.no_check else 'on'}, timeout {args.timeout:g} s")
    w.comment(SIZE_CONVENTION)
    w.comment(TIMING_CONVENTION)
    if opts.compare:
        w.comment(f"x {opts.compare.label} = {opts.compare.label} time / {opts.primary.backend} time "
                  f"(above 1: {opts.primary.backend} is faster); the {opts.compare.label} run went first")
    load = machine.get("loadavg_at_start")
    if load:
        w.comment(f"{machine.get('cpu_model')}, {machine.get('cpus_usable')} CPUs, load average "
                  f"{load[0]:.2f} at start, memcpy {machine.get('memcpy_gbps_at_start')} GB/s (one core, 64 MiB)")
        if load[0] > 0.5 * (machine.get("cpus_usable") or 1):
            log.warning("the machine is busy (load average %.2f on %s CPUs): timings will be noisy",
                        load[0], machine.get("cpus_usable"))


def _rank_config(run: Run, opts: Options, args: argparse.Namespace, level: str) -> RankConfig:
    return RankConfig(backend=run.backend, via=run.via, dtype=opts.dtype.name, codec=run.codec,
                      root=args.root, check=not args.no_check, timeout=args.timeout, log_level=level,
                      cases=[c.to_dict() for c in opts.cases])


def _args_record(args: argparse.Namespace, opts: Options) -> dict[str, Any]:
    rec = dict(vars(args))
    rec.update(via=opts.primary.via, ops=opts.ops, sizes=opts.sizes, dtype=opts.dtype.name)
    return rec


def main(argv: list[str] | None = None) -> int:
    """Run ``hetcomm-bench`` with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    rank_level = _setup_logging(args.verbose, args.quiet)
    try:
        opts = resolve(args)
        launcher = make_launcher(args.sites, args.wan_rate, opts.world_size)
    except (ValueError, BackendUnavailable, LauncherUnavailable, PlotUnavailable) as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for note in opts.notes:
        log.debug("%s", note)

    doc: dict[str, Any] = {
        "tool": "hetcomm-bench", "started": now_iso(), "status": "running", "error": None,
        "machine": machine_info(), "testbed": launcher.info(), "args": _args_record(args, opts),
        "world_size": opts.world_size, "size_convention": SIZE_CONVENTION,
        "timing_convention": TIMING_CONVENTION, "runs": [], "rows": [],
    }
    writer = TableWriter(sys.stdout, opts.primary.label, opts.compare.label if opts.compare else None,
                         show_wire=opts.primary.backend == "hetcomm" and opts.primary.via == "numpy")
    other: dict[tuple[str, int], Row] = {}
    runs = [(opts.compare, True)] if opts.compare else []
    runs += [(run, False) for run in opts.primaries]
    progress = Progress(len(runs) * len(opts.cases), enabled=None if not args.quiet else False)
    started = time.monotonic()
    rc = EXIT_OK
    try:
        with launcher, progress:
            _preamble(writer, opts, args, launcher, doc["machine"])
            for run, is_baseline in runs:
                record: dict[str, Any] = {"backend": run.backend, "via": run.via, "codec": run.codec,
                                          "label": run.label, "role": "compare" if is_baseline else "primary"}
                doc["runs"].append(record)
                if is_baseline:
                    log.info("running %s first (%d cases) for --compare; the table follows with %s",
                             run.label, len(opts.cases), opts.primary.label)

                    def on_row(row: Row) -> None:
                        other[(row.op, row.size)] = row
                        log.debug("%s %s %d B: %.2f us", row.backend, row.op, row.size, row.time_us)
                        progress.update(f"{run.label} {_case(row)} done", advance=1)
                else:
                    writer.relabel(run.label)  # closes the previous run's block before the log line
                    log.info("running %s (%d cases)", run.label, len(opts.cases))

                    def on_row(row: Row) -> None:
                        cmp = other.get((row.op, row.size))
                        progress.clear()
                        writer.row(row, cmp)
                        progress.update(f"{run.label} {_case(row)} done", advance=1)
                        d = row.to_dict()
                        if opts.compare:
                            d["compare"] = cmp.to_dict() if cmp else None
                            d["x_compare"] = cmp.time_us / row.time_us if cmp and row.time_us > 0 else None
                        doc["rows"].append(d)

                collector = Collector(opts.world_size, opts.dtype, args.root, run.label, on_row)
                record["rows_done"] = 0
                progress.update(f"starting {opts.world_size} ranks of {run.label}")
                run_world(launcher, opts.world_size, _rank_config(run, opts, args, rank_level),
                          stall_timeout(args.timeout), collector.feed)
                record["ranks"] = [collector.ranks[r] for r in sorted(collector.ranks)]
                record["rows_done"] = len(collector.rows)
            progress.clear()
            writer.finish()
            writer.comment(summary_line(doc["rows"], [run.label for run in opts.primaries],
                                        opts.compare.label if opts.compare else None,
                                        opts.world_size, time.monotonic() - started))
        doc["status"] = "ok"
        if writer.wrong_total or writer.disagree:
            doc["status"] = "wrong"
            rc = EXIT_WRONG
            log.error("results were wrong: %d element(s)%s", writer.wrong_total,
                      f"; ranks not bit-identical in {len(writer.disagree)} case(s)" if writer.disagree else "")
    except RankFailure as exc:
        sys.stdout.flush()
        doc["status"], doc["error"] = "failed", str(exc)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        if exc.detail:
            print("\n".join("    " + line for line in exc.detail.rstrip().splitlines()), file=sys.stderr)
        rc = EXIT_RANK_FAILED
    except BrokenPipeError:
        # stdout went away (e.g. piped into head): stop quietly, ranks are already stopped.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        doc["status"], doc["error"] = "interrupted", "stdout closed"
        rc = EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        sys.stdout.flush()
        doc["status"], doc["error"] = "interrupted", "interrupted (Ctrl-C); all ranks stopped"
        print(f"{parser.prog}: interrupted; all ranks stopped", file=sys.stderr)
        rc = EXIT_INTERRUPTED
    finally:
        doc["finished"] = now_iso()
        if args.json:
            try:
                write_json(args.json, doc)
            except OSError as exc:
                print(f"{parser.prog}: error: cannot write --json {args.json}: {exc}", file=sys.stderr)
                rc = rc or EXIT_USAGE
        if args.plot and doc["rows"]:
            try:
                log.info("wrote %s", plot_results([doc], args.plot))
            except (OSError, ValueError) as exc:
                print(f"{parser.prog}: error: cannot write --plot {args.plot}: {exc}", file=sys.stderr)
                rc = rc or EXIT_USAGE
    return rc


if __name__ == "__main__":
    sys.exit(main())
