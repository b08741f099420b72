"""DDP training across two emulated data centres: gloo against hetcomm.

Builds 2 sites x 2 ranks in network namespaces joined by a tbf-limited WAN
(hetcomm.testbed.netns; needs root), trains the same MLP on the same data for
a fixed number of steps, once with gloo and once with hetcomm (hierarchical
allreduce, int8 gradients with error feedback on the inter-site leg), and
reports step time and loss for both.

    sudo python bench/wan_training.py --rate 1gbit --steps 60
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HIDDEN = 1024  # ~2.4M parameters: 9.1 MiB of fp32 gradients per step
BATCH = 128    # per rank


def rank_main(backend: str, codec: str, steps: int, out: str) -> None:
    """One rank (run inside its site's namespace with env:// variables set)."""
    import datetime

    import torch
    import torch.distributed as dist

    import hetcomm

    rank = int(os.environ["RANK"])
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(256, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                                torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
                                torch.nn.Linear(HIDDEN, 10))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    if backend == "hetcomm" and codec != "none":
        ddp.register_comm_hook(None, hetcomm.ddp_hook(codec, error_feedback=True))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1 + rank)
    teacher = torch.Generator().manual_seed(99)
    w = torch.randn(256, 10, generator=teacher)
    times, losses = [], []
    for _ in range(steps):
        x = torch.randn(BATCH, 256, generator=g)
        y = (x @ w).argmax(dim=1)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        loss.backward()  # DDP's allreduces run here
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    grads = sum(p.numel() for p in model.parameters()) * 4
    with open(out, "w") as f:
        json.dump({"times": times, "losses": losses, "grad_bytes": grads}, f)
    dist.destroy_process_group()


def run(bed, backend: str, codec: str, steps: int, tmp: str, port: int) -> list[dict]:
    outs = [os.path.join(tmp, f"{backend}-{r}.json") for r in range(bed.world_size)]
    procs = bed.spawn_ranks(lambda r: [sys.executable, __file__, "--rank-main", backend, codec, str(steps), outs[r]],
                            master_port=port, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for r, p in enumerate(procs):
        out, _ = p.communicate(timeout=1800)
        if p.returncode != 0:
            sys.exit(f"{backend} rank {r} failed:\n{out.decode(errors='replace')[-4000:]}")
    results = []
    for o in outs:
        with open(o) as f:
            results.append(json.load(f))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="1gbit")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--codec", default="int8")
    ap.add_argument("--json", help="write the per-step results here")
    args = ap.parse_args()
    from hetcomm.testbed.netns import WanTestbed, available

    ok, why = available()
    if not ok:
        sys.exit(f"network namespaces unavailable: {why}")
    report = {}
    with tempfile.TemporaryDirectory() as tmp, WanTestbed(sites=2, ranks_per_site=2, wan_rate=args.rate) as bed:
        for i, (backend, codec) in enumerate((("gloo", "none"), ("hetcomm", args.codec))):
            res = run(bed, backend, codec, args.steps, tmp, 29600 + i)
            # Step time of the slowest rank, past two warm-up steps.
            steady = [max(r["times"][s] for r in res) for s in range(2, args.steps)]
            report[f"{backend} ({codec})"] = {"step_s": sum(steady) / len(steady), "first_loss": res[0]["losses"][0],
                                              "final_loss": sum(res[0]["losses"][-5:]) / 5,
                                              "grad_bytes": res[0]["grad_bytes"]}
    base = report["gloo (none)"]["step_s"]
    print(f"# DDP, 2 sites x 2 ranks, WAN {args.rate} per direction (tbf), {args.steps} steps, "
          f"{report['gloo (none)']['grad_bytes'] / 2**20:.1f} MiB of gradients per step")
    print(f"{'':22} {'step time (s)':>14} {'x gloo':>7} {'loss: first':>12} {'last 5 steps':>13}")
    for name, r in report.items():
        print(f"{name:22} {r['step_s']:14.3f} {base / r['step_s']:7.2f} {r['first_loss']:12.4f} {r['final_loss']:13.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rate": args.rate, "steps": args.steps, "report": report}, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-main":
        rank_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()
