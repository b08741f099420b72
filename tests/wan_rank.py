"""One rank of a job on the emulated WAN (started inside a site's network
namespace by tests/test_wan.py); writes its findings as JSON to argv[2]."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np

import hetcomm


def run(case: str) -> dict:
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    count = int(os.environ.get("WAN_COUNT", 1 << 20))
    opts = hetcomm.Options(timeout=120, codec_min_bytes=0)
    if case == "curve":
        opts.curve_secret = os.environ.get("WAN_CURVE_SECRET")
        opts.curve_allow = os.environ.get("WAN_CURVE_ALLOW")
        opts.curve = bool(opts.curve_secret)
    with hetcomm.Communicator(rank, size, options=opts) as comm:
        out: dict = {"sites": comm.site_count, "order": comm.ring_order()}
        if case == "algos":
            data = [np.random.default_rng(r).integers(-64, 64, count).astype(np.float32) for r in range(size)]
            exact = np.sum(data, axis=0)
            for algo in ("ring", "hier"):
                buf = data[rank].copy()
                before = comm.bytes_sent_intersite
                comm.barrier()
                t0 = time.perf_counter()
                comm.allreduce(buf, algo=algo)
                out[algo] = {"seconds": time.perf_counter() - t0, "intersite": comm.bytes_sent_intersite - before,
                             "exact": bool(np.array_equal(buf, exact)),
                             "digest": hashlib.sha256(buf.tobytes()).hexdigest()}
        elif case == "codec":
            data = [np.random.default_rng(r).standard_normal(count).astype(np.float32) for r in range(size)]
            buf = data[rank].copy()
            comm.allreduce(buf, algo="hier", codec="int8", residual_key=1)
            exact = np.sum([d.astype(np.float64) for d in data], axis=0)
            # int8 on the inter-site leg only: each of the 2 sites' quantizations
            # errs by at most absmax/254 of the partial sum it quantizes.
            bound = 2 * sum(float(np.abs(d).max()) for d in data) / 254 * 1.001
            out["within_bound"] = bool(np.abs(buf - exact).max() <= bound)
            out["digest"] = hashlib.sha256(buf.tobytes()).hexdigest()
        elif case == "curve":
            marker = np.frombuffer(bytes.fromhex(os.environ["WAN_MARKER"]) * (count // 16), np.uint8)
            buf = marker.copy()
            comm.broadcast(buf, root=0)  # site 0's bytes cross the WAN as they are, unless encrypted
            out["ok"] = bool(np.array_equal(buf, marker))
        return out


if __name__ == "__main__":
    result = run(sys.argv[1])
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
