"""Tests of the ``hetcomm-bench`` command (hetcomm/bench/).

The command runs in a subprocess with ``--backend gloo`` on tiny sizes and a
few ranks. Faults (a failing, stalling, lying or interrupted rank) are
injected through a ``sitecustomize.py`` put on the ranks' PYTHONPATH, so the
package carries no test hooks. Tests of the hetcomm backend run only once
``hetcomm.Communicator`` exists.
"""
from __future__ import annotations

import json
import math
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from harness import interruptible
from hetcomm.bench.collectives import COLLECTIVES, DTYPES, build_plan, parse_ops, tolerance
from hetcomm.bench.data import check, expected_segments, send_data, sum_pattern
from hetcomm.bench.sizes import auto_iters, auto_warmup, parse_size, parse_size_list, size_range

ROOT = Path(__file__).resolve().parent.parent
ALL_OPS = list(COLLECTIVES)
TINY = ["--sizes", "4,1K,64K", "--iters", "3", "--warmup", "1"]


def bench(*args: str, timeout: float = 150, pythonpath: list[Path] = (), env: dict | None = None
          ) -> subprocess.CompletedProcess:
    """Run ``python -m hetcomm.bench.cli ARGS`` and return the finished process."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join([str(p) for p in pythonpath] + [str(ROOT)]
                                             + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-m", "hetcomm.bench.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=ROOT)


def parse_table(out: str) -> dict[str, list[dict]]:
    """Rows of each op block of the table, fields by position (extra columns in ``rest``)."""
    tables: dict[str, list[dict]] = {}
    op = None
    for line in out.splitlines():
        if line.startswith("#"):
            name = line[1:].strip()
            if name in COLLECTIVES:
                op = name
                tables[op] = []
            continue
        if not line.strip():
            continue
        f = line.split()
        assert op is not None, f"row outside a block: {line!r}"
        tables[op].append(dict(size=int(f[0]), count=int(f[1]), type=f[2], redop=f[3], root=int(f[4]),
                               time=float(f[5]), algbw=float(f[6]), busbw=float(f[7]), wrong=f[8],
                               rest=f[9:]))
    return tables


def fault_dir(tmp_path: Path, body: str) -> Path:
    """A directory holding a sitecustomize.py with ``body`` (runs at start of every rank)."""
    d = tmp_path / "inject"
    d.mkdir()
    (d / "sitecustomize.py").write_text(body)
    return d


# ---------------------------------------------------------------- unit tests


@pytest.mark.timeout(30)
def test_size_parsing_and_ranges():
    assert parse_size("4") == 4
    assert parse_size("1K") == parse_size("1k") == parse_size("1KiB") == parse_size("1KB") == 1024
    assert parse_size("64M") == 64 << 20
    assert parse_size_list("4,1K,1M,64M") == [4, 1024, 1 << 20, 64 << 20]
    assert size_range(4, 256 << 20, 4)[-1] == 256 << 20
    assert len(size_range(4, 256 << 20, 4)) == 14
    assert size_range(4, 100, 4) == [4, 16, 64]
    for bad in ("1X", "-4", "", "1.5M", "K"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(ValueError):
        size_range(4, 1024, 1)
    assert auto_iters(4) == 200 and auto_iters(256 << 20) == 5 and auto_iters(64 << 20) == 16
    assert auto_warmup(200) == 20 and auto_warmup(5) == 1


@pytest.mark.timeout(30)
def test_plan_rounds_sizes_per_collective():
    f32 = DTYPES["float32"]
    cases, notes = build_plan(["allreduce", "allgather"], [4, 1024], f32, 3, None, None)
    got = [(c.op, c.size, c.count) for c in cases]
    # allgather needs whole float32 elements per rank: 4 B is skipped, 1024 B -> 1020 B.
    assert got == [("allreduce", 4, 1), ("allreduce", 1024, 256), ("allgather", 1020, 255)]
    assert any("skipped" in n for n in notes) and any("1020" in n for n in notes)
    assert parse_ops("all_reduce,bcast,all") == ALL_OPS


@pytest.mark.timeout(30)
def test_busbw_factors_match_nccl_tests():
    n = 4
    assert COLLECTIVES["allreduce"].busbw_factor(n) == pytest.approx(1.5)
    for op in ("allgather", "reduce_scatter", "alltoall"):
        assert COLLECTIVES[op].busbw_factor(n) == pytest.approx(0.75)
    assert COLLECTIVES["broadcast"].busbw_factor(n) == 1.0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("dtype", ["float16", "int8", "uint8", "bool", "float32"])
def test_reference_is_exact_and_catches_errors(dtype):
    """Simulate each collective in numpy and check it with the bench's reference."""
    dt = DTYPES[dtype]
    n, count = 3, 3 * 1000
    for op, coll in COLLECTIVES.items():
        ins = [send_data(coll, r, n, coll.counts(count, n)[0], 0, dt) for r in range(n)]
        m = count // n
        for r in range(n):
            if op == "allreduce":
                out = sum(i.astype(np.int64) for i in ins)
            elif op == "reduce_scatter":
                out = sum(i.astype(np.int64) for i in ins)[r * m:(r + 1) * m]
            elif op == "broadcast":
                out = ins[0]
            elif op == "allgather":
                out = np.concatenate(ins)
            else:
                out = np.concatenate([i[r * m:(r + 1) * m] for i in ins])
            out = (out > 0) if dt.kind == "bool" and coll.reduces else out
            out = np.asarray(out).astype(dt.check)
            segs = expected_segments(coll, r, n, count, 0, dt)
            assert check(lambda a, b: out[a:b], segs, 0.0, dt.is_float)[0] == 0, (op, r)
            bad = out.copy()
            bad[-1] = not bad[-1] if dt.kind == "bool" else bad[-1] + 1
            assert check(lambda a, b: bad[a:b], segs, 0.0, dt.is_float)[0] == 1, (op, r)
    # sums of the data stay exact in the narrowest types up to 63 ranks
    assert np.abs(sum_pattern(63, dt).tile.astype(np.float64)).max() <= 127


@pytest.mark.timeout(30)
def test_codec_tolerance():
    f32, i32 = DTYPES["float32"], DTYPES["int32"]
    ar = COLLECTIVES["allreduce"]
    assert tolerance(ar, f32, "none", 2) == 0.0
    assert tolerance(ar, i32, "int8", 2) == 0.0
    assert tolerance(COLLECTIVES["allgather"], f32, "int8", 2) == 0.0
    assert tolerance(ar, f32, "int8", 2) == pytest.approx(2 * 4 * 2 / 254)
    assert tolerance(ar, f32, "fp16", 4) < tolerance(ar, f32, "bf16", 4) < tolerance(ar, f32, "int4", 4)


# ---------------------------------------------------------------- gloo runs


@pytest.mark.timeout(180)
def test_gloo_table_parses_and_is_correct(tmp_path):
    out_json = tmp_path / "res.json"
    p = bench("--backend", "gloo", *TINY, "--json", str(out_json))
    assert p.returncode == 0, p.stderr
    tables = parse_table(p.stdout)
    assert list(tables) == ALL_OPS
    for op, rows in tables.items():
        coll = COLLECTIVES[op]
        expect_sizes = [1024, 65536] if coll.split else [4, 1024, 65536]
        assert [r["size"] for r in rows] == expect_sizes, op
        for r in rows:
            assert r["count"] == r["size"] // 4
            assert r["type"] == "float32"
            assert r["redop"] == coll.redop
            assert r["root"] == (0 if op == "broadcast" else -1)
            assert r["wrong"] == "0"
            assert r["time"] > 0
            assert r["rest"] == []  # no wire column for gloo, no compare columns
    assert "# Out of bounds values : 0 OK" in p.stdout

    doc = json.loads(out_json.read_text())
    assert doc["status"] == "ok" and doc["error"] is None
    assert doc["world_size"] == 2
    assert doc["args"]["backend"] == "gloo" and doc["args"]["via"] == "torch"
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["python"]
    assert [r["label"] for r in doc["runs"]] == ["gloo"] and len(doc["runs"][0]["ranks"]) == 2
    rows = doc["rows"]
    assert [(r["op"], r["size"]) for r in rows] == [(op, r["size"]) for op in ALL_OPS for r in tables[op]]
    for r in rows:
        assert r["wrong"] == 0 and r["dtype"] == "float32" and r["backend"] == "gloo"
        assert r["time_us"] == pytest.approx(max(r["rank_time_us"]))
        assert r["algbw_GBps"] == pytest.approx(r["size"] / r["time_us"] / 1e3)
        factor = COLLECTIVES[r["op"]].busbw_factor(2)
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * factor)
        if COLLECTIVES[r["op"]].identical:
            assert r["identical"] is True


@pytest.mark.timeout(180)
def test_gloo_three_ranks_rounds_and_checks():
    p = bench("--backend", "gloo", "-n", "3", "--sizes", "12,1K", "--iters", "2", "--warmup", "0",
              "--ops", "allreduce,allgather,alltoall,broadcast", "--root", "2")
    assert p.returncode == 0, p.stderr
    t = parse_table(p.stdout)
    assert [r["size"] for r in t["allreduce"]] == [12, 1024]
    assert [r["size"] for r in t["allgather"]] == [12, 1020]
    assert all(r["root"] == 2 for r in t["broadcast"])
    assert all(r["wrong"] == "0" for rows in t.values() for r in rows)
    busbw = t["allreduce"][1]["algbw"] * 4 / 3
    assert t["allreduce"][1]["busbw"] == pytest.approx(busbw, abs=0.011)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8", "uint8", "bool", "float64"])
def test_gloo_dtypes(dtype):
    p = bench("--backend", "gloo", "--dtype", dtype, "--sizes", "8,4K", "--iters", "20", "--warmup", "1")
    assert p.returncode == 0, p.stderr
    rows = [r for rows in parse_table(p.stdout).values() for r in rows]
    assert rows and all(r["wrong"] == "0" and r["type"] == dtype for r in rows)


@pytest.mark.timeout(120)
def test_no_check_prints_na():
    p = bench("--backend", "gloo", "--ops", "allreduce", "--sizes", "1K", "--iters", "2", "--no-check")
    assert p.returncode == 0, p.stderr
    assert parse_table(p.stdout)["allreduce"][0]["wrong"] == "N/A"


# ---------------------------------------------------------------- errors


@pytest.mark.timeout(60)
def test_compare_gloo_with_gloo_is_refused():
    p = bench("--backend", "gloo", "--compare", "gloo", *TINY)
    assert p.returncode == 2
    assert "--compare gloo" in p.stderr and "nothing to compare" in p.stderr
    assert p.stdout == ""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, message", [
    (["--sizes", "1X"], "invalid size '1X'"),
    (["--sizes", "0"], "at least 1 byte"),
    (["--sizes", "4", "--min-size", "8"], "cannot be combined with --min-size"),
    (["--min-size", "1M", "--max-size", "1K"], "--max-size must not be below --min-size"),
    (["--step-factor", "1"], "--step-factor"),
    (["--world-size", "0"], "--world-size must be at least 1"),
    (["--ops", "allfoo"], "unknown op 'allfoo'"),
    (["--dtype", "complex64"], "unknown dtype 'complex64'"),
    (["--root", "2"], "--root 2 is not a rank of a world of 2"),
    (["--iters", "0"], "--iters must be at least 1"),
    (["--timeout", "0"], "--timeout must be positive"),
    (["--codec", "int8"], "gloo has no codecs"),
    (["--codec", "zip"], "invalid choice: 'zip'"),
    (["--via", "numpy"], "gloo runs through torch.distributed only"),
    (["--dtype", "int16"], "does not support int16"),
    (["--backend", "hetcomm", "--dtype", "bfloat16"], "bfloat16 has no numpy type: use --via torch"),
    (["--backend", "hetcomm", "--codec", "int8", "--dtype", "int32"], "floating-point reductions only"),
])
def test_bad_arguments_give_clear_errors(args, message):
    argv = args if "--backend" in args else ["--backend", "gloo", *args]
    p = bench(*argv)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert "hetcomm-bench: error:" in p.stderr and "Traceback" not in p.stderr


_FAIL_RANK1 = """
import os
if os.environ.get("RANK") == "1":
    import torch.distributed as dist
    def all_reduce(*a, **k):
        raise RuntimeError("injected allreduce failure")
    dist.all_reduce = all_reduce
"""

_CORRUPT_RANK1 = """
import os
if os.environ.get("RANK") == "1":
    import torch.distributed as dist
    _orig = dist.all_reduce
    def all_reduce(t, *a, **k):
        out = _orig(t, *a, **k)
        t[0] += 1
        return out
    dist.all_reduce = all_reduce
"""

_STALL_RANK1 = """
import os
if os.environ.get("RANK") == "1":
    import time, torch.distributed as dist
    def all_reduce(*a, **k):
        time.sleep(3600)
    dist.all_reduce = all_reduce
"""

_SLOW_AND_RECORD_PIDS = """
import os
if os.environ.get("RANK") is not None:
    import time, torch.distributed as dist
    with open(os.path.join(os.environ["BENCH_TEST_PIDS"], os.environ["RANK"]), "w") as f:
        f.write(str(os.getpid()))
    _orig = dist.all_reduce
    def all_reduce(*a, **k):
        time.sleep(0.5)
        return _orig(*a, **k)
    dist.all_reduce = all_reduce
"""


@pytest.mark.timeout(120)
def test_rank_failure_exits_nonzero_with_the_ranks_error(tmp_path):
    out_json = tmp_path / "res.json"
    p = bench("--backend", "gloo", "--ops", "allreduce", *TINY, "--json", str(out_json),
              pythonpath=[fault_dir(tmp_path, _FAIL_RANK1)])
    assert p.returncode == 3, p.stderr
    assert "rank 1 failed: RuntimeError: injected allreduce failure" in p.stderr
    doc = json.loads(out_json.read_text())
    assert doc["status"] == "failed" and "injected allreduce failure" in doc["error"]


@pytest.mark.timeout(120)
def test_wrong_results_are_counted_and_fail_the_run(tmp_path):
    p = bench("--backend", "gloo", "--ops", "allreduce", "--sizes", "4,1K", "--iters", "2",
              pythonpath=[fault_dir(tmp_path, _CORRUPT_RANK1)])
    assert p.returncode == 1, p.stderr
    rows = parse_table(p.stdout)["allreduce"]
    assert [r["wrong"] for r in rows] == ["1", "1"]
    assert "Out of bounds values : 2 FAILED" in p.stdout
    assert "NOT bit-identical" in p.stdout


@pytest.mark.timeout(120)
def test_stalled_rank_is_killed_after_timeout(tmp_path):
    t0 = time.monotonic()
    p = bench("--backend", "gloo", "--ops", "allreduce", *TINY, "--timeout", "4",
              pythonpath=[fault_dir(tmp_path, _STALL_RANK1)])
    assert p.returncode == 3, p.stderr
    # Either gloo's own timeout on rank 0 (first, normally) or the launcher's backstop.
    assert "rank 0 failed" in p.stderr or "no progress from any rank" in p.stderr, p.stderr
    assert time.monotonic() - t0 < 60


@pytest.mark.timeout(120)
def test_ctrl_c_stops_every_rank(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    env = dict(os.environ, BENCH_TEST_PIDS=str(pids))
    env["PYTHONPATH"] = os.pathsep.join([str(fault_dir(tmp_path, _SLOW_AND_RECORD_PIDS)), str(ROOT)])
    proc = subprocess.Popen([sys.executable, "-m", "hetcomm.bench.cli", "--backend", "gloo", "--ops",
                             "allreduce", "--sizes", "4", "--iters", "1000"], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    try:
        deadline = time.monotonic() + 60
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # let them get into the loop
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    for f in pids.iterdir():
        pid = int(f.read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ---------------------------------------------------------------- hetcomm


@pytest.mark.timeout(180)
def test_hetcomm_numpy_backend_is_correct():
    p = bench("--backend", "hetcomm", "--compare", "none", *TINY)
    assert p.returncode == 0, p.stderr
    tables = parse_table(p.stdout)
    assert list(tables) == ALL_OPS
    for rows in tables.values():
        for r in rows:
            assert r["wrong"] == "0"
            assert len(r["rest"]) == 1  # the wire(B) column


@pytest.mark.timeout(240)
def test_hetcomm_compare_gloo(tmp_path):
    out_json = tmp_path / "res.json"
    p = bench("--compare", "gloo", *TINY, "--json", str(out_json))
    assert p.returncode == 0, p.stderr
    for rows in parse_table(p.stdout).values():
        for r in rows:
            wire, gloo_time, gloo_busbw, gloo_wrong, ratio = r["rest"]
            assert gloo_wrong == "0"
            assert float(ratio) == pytest.approx(float(gloo_time) / r["time"], rel=0.02, abs=0.005)  # printed with 2 decimals
    doc = json.loads(out_json.read_text())
    assert all(r["compare"]["backend"] == "gloo" and r["x_compare"] > 0 for r in doc["rows"])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("codec,via", [("fp16", "numpy"), ("int8", "numpy"), ("int8", "torch")])
def test_hetcomm_codecs_within_tolerance(codec, via, tmp_path):
    out_json = tmp_path / "res.json"
    p = bench("--codec", codec, "--via", via, "--compare", "none", "--ops", "allreduce,reduce_scatter",
              "--sizes", "1K,1M",
              "--iters", "3", "--json", str(out_json))
    assert p.returncode == 0, p.stderr
    doc = json.loads(out_json.read_text())
    for r in doc["rows"]:
        assert r["wrong"] == 0 and r["identical"] is not False
        if via == "numpy":
            assert r["wire_bytes"] is not None and math.isfinite(r["wire_bytes"])
        if codec == "int8" and r["size"] >= 1 << 20:  # above the codec threshold: compressed, so lossy
            assert r["max_err"] > 0  # (fp16 holds the bench's small integers exactly)


# ---------------------------------------------------------------- launchers


@pytest.mark.timeout(30)
def test_make_launcher_picks_local_or_the_wan_testbed(monkeypatch):
    from hetcomm.bench import launcher as L
    from hetcomm.bench import wan

    assert isinstance(L.make_launcher(None, None, 2), L.LocalLauncher)
    monkeypatch.setattr(wan, "available", lambda: (False, "no root"))
    with pytest.raises(L.LauncherUnavailable, match="network namespaces unavailable here: no root"):
        L.make_launcher(sites=2, wan_rate="1gbit", world_size=4)


@pytest.mark.timeout(120)
def test_run_world_with_a_custom_launcher():
    """A launcher other than LocalLauncher (the netns testbed is one) drives the same ranks."""
    from hetcomm.bench.collectives import Case
    from hetcomm.bench.launcher import LocalLauncher, run_world
    from hetcomm.bench.runner import RankConfig

    class Recording(LocalLauncher):
        description = "recording"

        def __init__(self):
            self.spawned = []

        def rank_env(self, rank, world_size):
            return dict(super().rank_env(rank, world_size), HETCOMM_SITE=f"site{rank}")

        def spawn(self, rank, argv, env):
            self.spawned.append((rank, env["HETCOMM_SITE"], env["MASTER_ADDR"]))
            return super().spawn(rank, argv, env)

    cfg = RankConfig(backend="gloo", via="torch", dtype="float32",
                     cases=[Case("allreduce", 64, 16, 2, 1).to_dict(), Case("alltoall", 64, 16, 2, 1).to_dict()])
    msgs = []
    with Recording() as launcher:
        run_world(launcher, 2, cfg, timeout=60, on_message=msgs.append)
    assert launcher.spawned == [(0, "site0", "127.0.0.1"), (1, "site1", "127.0.0.1")]
    rows = [m for m in msgs if m["type"] == "row"]
    assert sorted((m["op"], m["rank"]) for m in rows) == [("allreduce", 0), ("allreduce", 1),
                                                          ("alltoall", 0), ("alltoall", 1)]
    assert all(m["wrong"] == 0 for m in rows)
    assert {m["rank"] for m in msgs if m["type"] == "ready"} == {0, 1}


# ---------------------------------------------------------------- what a new user sees


@pytest.mark.timeout(30)
def test_no_arguments_mean_a_quick_run_beside_gloo():
    from hetcomm.bench.cli import QUICK_BYTES_PER_LOOP, QUICK_SIZES, build_parser, resolve

    opts = resolve(build_parser().parse_args([]))
    assert opts.primary.backend == "hetcomm" and opts.compare is not None and opts.compare.backend == "gloo"
    assert opts.ops == ALL_OPS and opts.sizes == parse_size_list(QUICK_SIZES)
    assert max(opts.sizes) <= 16 << 20
    assert {c.iters for c in opts.cases if c.size == 16 << 20} == {auto_iters(16 << 20, QUICK_BYTES_PER_LOOP)}
    full = resolve(build_parser().parse_args(["--full", "--compare", "none"]))
    assert full.compare is None and full.sizes == size_range(4, 256 << 20, 4)
    assert {c.iters for c in full.cases if c.size == 16 << 20} == {auto_iters(16 << 20)}


@pytest.mark.timeout(240)
def test_default_compare_summary_and_plot(tmp_path):
    """hetcomm beside gloo without asking, an x gloo column, a one-line summary, a picture; no bar on a pipe."""
    png = tmp_path / "busbw.png"
    package_files = {f for f in (ROOT / "hetcomm").rglob("*") if "__pycache__" not in f.parts}
    p = bench("--ops", "allreduce,allgather", *TINY, "--plot", str(png))
    assert p.returncode == 0, p.stderr
    # results go where asked, never into the package
    assert {f for f in (ROOT / "hetcomm").rglob("*") if "__pycache__" not in f.parts} == package_files
    tables = parse_table(p.stdout)
    for rows in tables.values():
        for r in rows:
            wire, gloo_time, gloo_busbw, gloo_wrong, ratio = r["rest"]
            # the ratio is printed with 2 decimals: half a unit of the last digit on top of 2 %
            assert gloo_wrong == "0" and float(ratio) == pytest.approx(float(gloo_time) / r["time"], rel=0.02, abs=0.005)
    assert "x gloo" in p.stdout
    last = p.stdout.rstrip().splitlines()[-1]
    assert last.startswith("# summary: hetcomm vs gloo, 2 ranks, 5 cases in ")
    assert "x gloo median" in last and "all results correct" in last
    assert "\r" not in p.stderr  # stderr is a pipe here: no progress bar
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 100_000


@pytest.mark.timeout(60)
def test_plot_without_matplotlib_fails_before_running(tmp_path):
    block = fault_dir(tmp_path, "import sys\nsys.modules['matplotlib'] = None\n")
    p = bench("--backend", "gloo", *TINY, "--plot", str(tmp_path / "x.png"), pythonpath=[block])
    assert p.returncode == 2 and p.stdout == ""
    assert "plotting needs matplotlib: pip install 'hetcomm[plot]'" in p.stderr


@pytest.mark.timeout(30)
def test_progress_bar_draws_on_a_terminal_only():
    import io

    from hetcomm.bench.progress import Progress

    term = io.StringIO()
    bar = Progress(4, stream=term, enabled=True)
    bar.update("gloo allreduce 4 B done", advance=1)
    assert "\r[######------------------] 1/4 0:00  gloo allreduce 4 B done" in term.getvalue()
    bar.clear()
    assert term.getvalue().endswith("\r")
    pipe = io.StringIO()  # StringIO is not a tty: the default is silence
    quiet = Progress(4, stream=pipe)
    quiet.update("x", advance=4)
    quiet.clear()
    assert pipe.getvalue() == "" and quiet.done == 4


@pytest.mark.timeout(30)
def test_summary_line():
    from hetcomm.bench.table import summary_line

    rows = [dict(op="allreduce", size=4, wrong=0, busbw_GBps=0.0, x_compare=3.0),
            dict(op="allreduce", size=1 << 20, wrong=0, busbw_GBps=2.0, x_compare=0.5),
            dict(op="broadcast", size=1 << 20, wrong=0, busbw_GBps=4.0, x_compare=5.0)]
    assert summary_line(rows, ["hetcomm"], "gloo", 2, 12.4) == (
        "summary: hetcomm vs gloo, 2 ranks, 3 cases in 12 s: faster in 2/3, x gloo median 3.00 "
        "(min 0.50 allreduce 1M, max 5.00 broadcast 1M); all results correct")
    for r in rows:
        del r["x_compare"]
    rows[0]["wrong"] = 2
    assert summary_line(rows, ["gloo"], None, 4, 3) == (
        "summary: gloo, 4 ranks, 3 cases in 3 s: best busbw 4.00 GB/s (broadcast 1M); 2 wrong element(s)")


def _doc(sites: int | None, codec: str, rows: list[tuple[str, int, float, float]]) -> dict:
    """A hetcomm-bench JSON document with hetcomm rows (and gloo's inside them)."""
    bed = {"description": "test", **({"sites": sites} if sites else {})}
    out = []
    for op, size, t_het, t_gloo in rows:
        gloo = dict(op=op, size=size, backend="gloo", time_us=t_gloo, busbw_GBps=size / t_gloo / 1e3)
        out.append(dict(op=op, size=size, backend="hetcomm", time_us=t_het, busbw_GBps=size / t_het / 1e3,
                        compare=gloo, x_compare=t_gloo / t_het))
    return {"world_size": 4, "testbed": bed, "rows": out,
            "runs": [{"label": "gloo", "codec": "none"}, {"label": "hetcomm", "codec": codec}]}


@pytest.mark.timeout(60)
def test_plot_module_local_wan_and_loss(tmp_path):
    from hetcomm.bench.plot import collect_series, main, plot_loss_vs_time, plot_results

    local = _doc(None, "none", [("allreduce", 1024, 10.0, 30.0), ("allreduce", 4096, 20.0, 50.0)])
    series = collect_series([local])
    assert series["allreduce"]["hetcomm"] == [(1024, pytest.approx(0.1024), 10.0),
                                              (4096, pytest.approx(0.2048), 20.0)]
    assert [s for s, _, _ in series["allreduce"]["gloo"]] == [1024, 4096]
    wan = [_doc(2, c, [("allreduce", 16 << 20, t, 2e5)]) for c, t in (("none", 1.5e5), ("int8", 4e4))]
    series = collect_series(wan)
    assert sorted(series["allreduce"]) == ["gloo", "hetcomm", "hetcomm int8"]
    assert len(series["allreduce"]["gloo"]) == 1  # the same gloo rows of both runs count once
    for name, docs in (("local.png", [local]), ("wan.png", wan)):
        path = plot_results(docs, tmp_path / name)
        assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size < 100_000
    files = []
    for i, d in enumerate(wan):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(d))
    assert main([str(tmp_path / "both.svg"), *map(str, files)]) == 0
    assert (tmp_path / "both.svg").read_text().lstrip().startswith("<?xml")
    loss = plot_loss_vs_time({"DDP": ([0, 1, 2], [2.3, 1.5, 1.1]), "DiLoCo": ([0, 0.5, 1], [2.3, 1.7, 1.2])},
                             tmp_path / "loss.png", title="t")
    assert loss.stat().st_size > 1000
    with pytest.raises(ValueError, match="3 times but 2 losses"):
        plot_loss_vs_time({"bad": ([0, 1, 2], [1, 2])}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="no rows"):
        plot_results([{"rows": []}], tmp_path / "empty.png")


@pytest.mark.timeout(240)
def test_several_codecs_in_one_run(tmp_path):
    """--codec none,int8: hetcomm once per codec, each beside the one gloo run; one picture of all."""
    out_json, png = tmp_path / "res.json", tmp_path / "codecs.png"
    p = bench("--ops", "allreduce", "--sizes", "1K,1M", "--iters", "3", "--codec", "none,int8",
              "--json", str(out_json), "--plot", str(png))
    assert p.returncode == 0, p.stderr
    doc = json.loads(out_json.read_text())
    assert [(r["label"], r["codec"]) for r in doc["runs"]] == [("gloo", "none"), ("hetcomm", "none"),
                                                               ("hetcomm int8", "int8")]
    rows = {(r["backend"], r["size"]): r for r in doc["rows"]}
    assert sorted(rows) == [("hetcomm", 1024), ("hetcomm", 1 << 20), ("hetcomm int8", 1024), ("hetcomm int8", 1 << 20)]
    assert all(r["compare"]["backend"] == "gloo" and r["wrong"] == 0 for r in rows.values())
    assert rows[("hetcomm", 1 << 20)]["max_err"] == 0 and rows[("hetcomm int8", 1 << 20)]["max_err"] > 0
    assert p.stdout.count("# allreduce") == 2 and re.search(r"<-+ hetcomm int8 -+> <-+ gloo -+>", p.stdout)
    last = p.stdout.rstrip().splitlines()[-1]
    assert re.match(r"# summary: hetcomm / hetcomm int8 vs gloo, 2 ranks, 4 cases in \d+ s: faster in \d/4, "
                    r"x gloo median hetcomm [\d.]+, hetcomm int8 [\d.]+ ", last), last
    from hetcomm.bench.plot import collect_series

    assert sorted(collect_series([doc])["allreduce"]) == ["gloo", "hetcomm", "hetcomm int8"]
    assert png.stat().st_size > 1000


@pytest.mark.timeout(120)
def test_ranks_exit_cleanly():
    """Ranks finish without the interpreter dying at exit (their stderr shows with -v)."""
    p = bench("--compare", "none", "--ops", "allreduce", "--sizes", "4", "--iters", "2", "-v")
    assert p.returncode == 0, p.stderr
    assert "Fatal Python error" not in p.stderr, p.stderr
