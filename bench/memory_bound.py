"""What this host's memory allows large collectives on one host (an estimate), beside what hetcomm and gloo reach.

Tensors live in each process's private memory, so every byte a rank needs
from a peer is copied once more than within one process: by the kernel
(``process_vm_readv``, one copy) or through shared memory (the sender's copy
in, then the receiver's copy out or fold). The script measures, with every
core copying at once as during a collective:

* ``memcpy``: one core's copy rate alone (the bench's reference, 64 MiB);
* ``memcpy_all``: a core's copy rate while every core copies;
* ``cma_all``: a core's ``process_vm_readv`` rate from another process
  while every core does the same;

each the best of ``--repeats``, on 64 MiB buffers in huge pages where the
kernel grants them (as hetcomm asks for its buffers, ``HETCOMM_HUGEPAGES``),
and from them an estimate of the busbw (nccl-tests' definition) an
algorithm moving data between private buffers can reach if every byte it
moves costs a copy from memory to memory. It is not a bound: a copy into
or out of cache is cheaper (hetcomm's allreduce reads its peers' blocks
into a scratch that stays in L2, and at 16 MiB much of a buffer is still
in L3), and hetcomm has passed it. With a byte that crosses between
ranks costing ``1 / R`` of a core's time, ``R = max(cma_all,
memcpy_all / 2)``, and ``n`` ranks sharing ``P`` cores:

* allreduce: a rank receives at least ``2(n-1)/n`` of the buffer (the
  bandwidth lower bound of any allreduce), so ``busbw ~ P R / n``;
* allgather (input and output apart, as ``all_gather_into_tensor``): a rank
  receives ``(n-1)/n`` of its output and copies its own ``1/n``, so
  ``busbw ~ P (n-1) / (n ((n-1)/R + 1/memcpy_all))``.

Both leave out the arithmetic of the fold, every control message and any
skew between ranks. Then it runs ``hetcomm-bench --via torch --compare
gloo`` on the same sizes and prints each row beside the estimate and the
targets of issue 15 (50 % of ``memcpy``; 4x gloo's busbw in the same run),
and which targets lie above the estimate.

    python bench/memory_bound.py -n 2,4 --sizes 16M,32M,64M --json bench/results/memory_bound.json

Run under ``flock /tmp/hetcomm-bench.lock`` beside other benchmarks.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from hetcomm.bench.results import memcpy_gbps

COPY_BYTES = 64 << 20


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _read_peer(libc, pid: int, dst: np.ndarray, remote: int) -> None:
    local = _Iovec(dst.ctypes.data, dst.nbytes)
    far = _Iovec(remote, dst.nbytes)
    done = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(far), 1, 0)
    if done != dst.nbytes:
        raise OSError(ctypes.get_errno(), f"process_vm_readv read {done} of {dst.nbytes} bytes from pid {pid}")


def _huge_buffer() -> np.ndarray:
    """COPY_BYTES, 2 MiB-aligned, asked to be backed by huge pages before it is touched."""
    huge = 2 << 20
    area = mmap.mmap(-1, COPY_BYTES + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(area)) % huge
    if hasattr(mmap, "MADV_HUGEPAGE"):
        area.madvise(mmap.MADV_HUGEPAGE, start, COPY_BYTES)
    return np.frombuffer(area, np.uint8, COPY_BYTES, start)


def _copier(me: int, procs: int, mode: str, repeats: int, barrier, table, results) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.process_vm_readv.restype = ctypes.c_ssize_t
    libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                                      ctypes.c_ulong]
    src, dst = _huge_buffer(), _huge_buffer()
    src.fill(1)
    dst.fill(0)
    table[me] = (os.getpid(), src.ctypes.data)
    barrier.wait()
    peer_pid, peer_src = table[(me + 1) % procs]
    copy = (lambda: np.copyto(dst, src)) if mode == "memcpy" else (lambda: _read_peer(libc, peer_pid, dst, peer_src))
    copy()  # pins and faults in
    best = float("inf")
    for _ in range(repeats):
        barrier.wait()
        t0 = time.perf_counter()
        copy()
        best = min(best, time.perf_counter() - t0)
    barrier.wait()  # the peer reading this process's buffer is done with it before it is freed
    results.put(COPY_BYTES / best / 1e9)


def concurrent_rate(mode: str, procs: int, repeats: int) -> float:
    """The slowest process's best rate, GB/s, while ``procs`` processes copy at once."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(procs), ctx.Queue()
    with ctx.Manager() as manager:
        table = manager.dict()
        workers = [ctx.Process(target=_copier, args=(i, procs, mode, repeats, barrier, table, results))
                   for i in range(procs)]
        for w in workers:
            w.start()
        rates = [results.get(timeout=120) for _ in workers]
        for w in workers:
            w.join(timeout=30)
    return min(rates)


def estimates(n: int, cores: int, memcpy_all: float, cma_all: float) -> dict[str, float]:
    """Estimated busbw (GB/s) for ``n`` ranks on ``cores`` cores (see the module's docstring)."""
    p = min(n, cores)
    cross = max(cma_all, memcpy_all / 2)
    return {"allreduce": p * cross / n,
            "allgather": p * (n - 1) / (n * ((n - 1) / cross + 1 / memcpy_all))}


def run_bench(n: int, sizes: str, ops: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.json")
        subprocess.run([sys.executable, "-m", "hetcomm.bench.cli", "--via", "torch", "--compare", "gloo", "-n", str(n),
                        "-o", ops, "--sizes", sizes, "-q", "--json", path], check=True, stdout=subprocess.DEVNULL)
        with open(path) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--world-sizes", default="2,4")
    ap.add_argument("--sizes", default="16M,32M,64M")
    ap.add_argument("--ops", default="allreduce,allgather")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", help="write the rates, estimates and rows here")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    doc: dict = {"cores": cores, "runs": []}
    print(f"# {cores} cores; rates in GB/s (bytes copied per second), best of {args.repeats}; busbw in GB/s")
    print(f"# {'ranks':>5} {'op':<10} {'size':>6} {'memcpy':>7} {'mc_all':>7} {'cma_all':>7} {'est.':>6} "
          f"{'hetcomm':>8} {'gloo':>6} {'x gloo':>6} {'50%mc':>6} {'4xgloo':>6}  above the estimate")
    for n in (int(s) for s in args.world_sizes.split(",")):
        procs = min(n, cores)
        memcpy = memcpy_gbps()
        memcpy_all = concurrent_rate("memcpy", procs, args.repeats)
        cma_all = concurrent_rate("cma", procs, args.repeats)
        limit = estimates(n, cores, memcpy_all, cma_all)
        bench = run_bench(n, args.sizes, args.ops)
        run = {"world_size": n, "memcpy": memcpy, "memcpy_all": memcpy_all, "cma_all": cma_all, "estimates": limit,
               "rows": []}
        for row in bench["rows"]:
            ours, gloo = row["busbw_GBps"], row["compare"]["busbw_GBps"]
            estimate = limit[row["op"]]
            targets = {"50% memcpy": memcpy / 2, "4x gloo": 4 * gloo}
            over = [name for name, value in targets.items() if value > estimate]
            run["rows"].append({"op": row["op"], "size": row["size"], "hetcomm": ours, "gloo": gloo,
                                "estimate": estimate, "targets": targets, "targets_above_estimate": over})
            print(f"  {n:>5} {row['op']:<10} {row['size'] >> 20:>5}M {memcpy:7.2f} {memcpy_all:7.2f} {cma_all:7.2f} "
                  f"{estimate:6.2f} {ours:8.2f} {gloo:6.2f} {ours / gloo:6.2f} {memcpy / 2:6.2f} {4 * gloo:6.2f}  "
                  f"{', '.join(over) or '-'}")
        doc["runs"].append(run)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
