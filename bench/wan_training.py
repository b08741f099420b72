"""Training across two emulated data centres: DDP over gloo against hetcomm (DDP or DiLoCo).

Builds 2 sites x 2 ranks in network namespaces joined by a tbf-limited WAN
(hetcomm.testbed.netns; needs root), trains the same MLP on the same data for
a fixed number of steps in each run, and reports step time, a per-step
breakdown, the final held-out loss and the bytes that crossed the WAN
(counted on the shaped links).

    python bench/wan_training.py --rate 1gbit --params 25M --codec int8 --compare gloo --steps 12
    python bench/wan_training.py --rate 100mbit --mode diloco --codec int4 --inner-steps 16 --compare gloo

The last line printed is one JSON object:
``{"runs": [{"name", "backend", "mode", "codec", "step_s", "final_loss", "wan_bytes", "samples", ...}]}``.
With ``--compare gloo`` the first run is DDP over gloo whatever ``--mode`` says.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
RANK_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wan_training_rank.py")
WARMUP = 2  # steps left out of step_s


def parse_count(text: str) -> int:
    """'25M' -> 25_000_000 (decimal suffixes K, M, G)."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--params: expected a count like 25M, got {text!r}") from None


def run(bed, cfg: dict, tmp: str, port: int, timeout_s: float, log_dir: str | None = None) -> list[dict]:
    """Runs one configuration on every rank of `bed`; returns each rank's results."""
    outs = [os.path.join(tmp, f"{cfg['name']}-{r}.json".replace(" ", "_")) for r in range(bed.world_size)]
    procs = bed.spawn_ranks(lambda r: [sys.executable, RANK_SCRIPT, json.dumps({**cfg, "out": outs[r]})],
                            master_port=port, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    failed = []
    for r, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            bed.kill_processes()
            sys.exit(f"{cfg['name']}: rank {r} did not finish within {timeout_s:.0f} s")
        if log_dir:
            with open(os.path.join(log_dir, f"{cfg['name']}-rank{r}.log".replace(" ", "_")), "wb") as f:
                f.write(out)
        if p.returncode != 0:
            failed.append(f"{cfg['name']} rank {r} failed:\n{out.decode(errors='replace')[-3000:]}")
    if failed:
        sys.exit("\n".join(failed))
    results = []
    for o in outs:
        with open(o) as f:
            results.append(json.load(f))
    return results


def summarize(cfg: dict, res: list[dict], wan_bytes: int) -> dict:
    """One entry of the JSON line, plus the breakdown of the slowest rank's steps."""
    steps = len(res[0]["times"])
    steady = range(min(WARMUP, steps - 1), steps)
    step_s = sum(max(r["times"][s] for r in res) for s in steady) / len(steady)

    def mean(key: int) -> float:
        return sum(sum(r["phases"][s][key] for s in steady) / len(steady) for r in res) / len(res)

    compute = max(r["compute_s"] for r in res)
    # Mean train loss over ranks at every step, and the slowest rank's clock.
    curve = [[max(r["elapsed"][s] for r in res), sum(r["losses"][s] for r in res) / len(res)] for s in range(steps)]
    return {"name": cfg["name"], "backend": cfg["backend"], "mode": cfg["mode"], "codec": cfg["codec"],
            "step_s": step_s, "final_loss": res[0]["eval_loss"], "wan_bytes": wan_bytes,
            "samples": steps * cfg["batch"] * len(res), "params": res[0]["params"],
            # Training loop only (rank 0's site link, both ways), without start-up and rendezvous.
            "wan_bytes_train": res[0]["wan_bytes_train"], "total_s": max(r["total_s"] for r in res),
            "breakdown": {"compute_floor_s": compute, "forward_s": mean(0), "backward_s": mean(1),
                          "optimizer_s": mean(2), "exposed_comm_s": max(0.0, step_s - compute)},
            "loss_curve": curve}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", default="1gbit", help="WAN rate per direction (tc units: 1gbit, 100mbit)")
    ap.add_argument("--params", type=parse_count, default=parse_count("25M"), help="model size, e.g. 25M")
    ap.add_argument("--mode", choices=("ddp", "fsdp", "diloco"), default="ddp",
                    help="fsdp: FSDP2, the codec on its reduce-scatters (inter-site leg)")
    ap.add_argument("--fsdp-reshard-after-forward", choices=("true", "false"), default="true",
                    help="fsdp: FSDP2's reshard_after_forward (false: one parameter all-gather a step, not two)")
    ap.add_argument("--fsdp-param-dtype", choices=("fp32", "bf16"), default="fp32",
                    help="fsdp: bf16 = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)")
    ap.add_argument("--codec", default="int8", help="codec of the hetcomm run(s); several: int8,int4")
    ap.add_argument("--compare", choices=("gloo", "none"), default="none",
                    help="gloo: run DDP over gloo first, the baseline")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32, help="samples per rank and step")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--inner-steps", type=int, default=16, help="DiLoCo: inner steps H between outer steps")
    ap.add_argument("--fragments", type=int, default=4, help="DiLoCo: streaming fragments (1: plain DiLoCo)")
    ap.add_argument("--outer-lr", type=float, default=0.7, help="DiLoCo: outer Nesterov learning rate")
    ap.add_argument("--inner-backend", default="gloo", help="DiLoCo: backend of the in-site groups")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds one run may take")
    ap.add_argument("--log-dir", help="keep every rank's output here (with HETCOMM_LOG_LEVEL=DEBUG the core "
                    "logs each hierarchical allreduce's in-site and inter-site times)")
    ap.add_argument("--json", help="also write the full results (curves, breakdowns) here")
    ap.add_argument("--plot", metavar="FILE.png", help="draw train loss against wall-clock time of every run "
                    "(needs the plot extra: pip install 'hetcomm[plot]')")
    ap.add_argument("--replot", nargs="+", metavar="RESULT.json",
                    help="run nothing: draw --plot from results that --json wrote earlier")
    args = ap.parse_args()
    if args.replot:
        if not args.plot:
            ap.error("--replot needs --plot FILE.png")
        runs = []
        for path in args.replot:
            with open(path) as f:
                saved = json.load(f)
            runs += [{**r, "outer_lr": saved["args"]["outer_lr"]} for r in saved["runs"]]
        print(plot_loss_curves(runs, args.plot))
        return
    if args.plot:
        from hetcomm.bench.plot import require_matplotlib

        require_matplotlib()  # before minutes of training, not after
    from hetcomm.testbed.netns import WanTestbed, available

    ok, why = available("hctrain")
    if not ok:
        sys.exit(f"network namespaces unavailable: {why}")
    common = {"params": args.params, "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "inner_steps": args.inner_steps, "fragments": args.fragments, "outer_lr": args.outer_lr,
              "inner_backend": args.inner_backend, "fsdp_reshard": args.fsdp_reshard_after_forward == "true",
              "fsdp_param_dtype": args.fsdp_param_dtype}
    fsdp_note = "".join([" no-reshard" if not common["fsdp_reshard"] else "",
                         " bf16-params" if args.fsdp_param_dtype == "bf16" else ""]) if args.mode == "fsdp" else ""
    configs = []
    if args.compare == "gloo":
        configs.append({"name": "gloo ddp", "backend": "gloo", "mode": "ddp", "codec": "none"})
    for codec in args.codec.split(","):
        configs.append({"name": f"hetcomm {args.mode} {codec}{fsdp_note}", "backend": "hetcomm", "mode": args.mode,
                        "codec": codec})
    runs = []
    with tempfile.TemporaryDirectory() as tmp, WanTestbed(sites=2, ranks_per_site=2, wan_rate=args.rate,
                                                          prefix="hctrain") as bed:
        for i, cfg in enumerate(configs):
            cfg = {**common, **cfg}
            before = bed.wan_tx_bytes()
            res = run(bed, cfg, tmp, 29600 + i, args.timeout, args.log_dir)
            runs.append(summarize(cfg, res, bed.wan_tx_bytes() - before))
            print(f"# {cfg['name']}: {runs[-1]['step_s']:.3f} s/step, eval loss {runs[-1]['final_loss']:.4f}",
                  flush=True)
            if args.json:  # what finished survives a later run's failure
                with open(args.json, "w") as f:
                    json.dump({"rate": args.rate, "args": vars(args), "runs": runs}, f, indent=1)
    base = runs[0]["step_s"]
    print(f"# {args.mode}, 2 sites x 2 ranks, WAN {args.rate} per direction (tbf), {runs[0]['params'] / 1e6:.1f}M "
          f"parameters, batch {args.batch} per rank, {args.steps} steps (first {WARMUP} left out of step time)")
    width = max(22, *(len(r["name"]) for r in runs))
    print(f"{'run':{width}} {'step s':>7} {'x first':>7} {'compute':>8} {'fwd':>6} {'bwd+comm':>8} {'opt/outer':>9} "
          f"{'exposed':>8} {'eval loss':>9} {'WAN MB':>8} {'B/sample':>9}")
    # WAN MB: everything, start-up included; B/sample: bytes of the training loop per trained sample
    for r in runs:
        b = r["breakdown"]
        print(f"{r['name']:{width}} {r['step_s']:7.3f} {base / r['step_s']:7.2f} {b['compute_floor_s']:8.3f} "
              f"{b['forward_s']:6.3f} {b['backward_s']:8.3f} {b['optimizer_s']:9.3f} {b['exposed_comm_s']:8.3f} "
              f"{r['final_loss']:9.4f} {r['wan_bytes'] / 1e6:8.1f} {(r['wan_bytes_train'] or 0) / r['samples']:9.0f}")
    if args.plot:
        print(f"# plot: {plot_loss_curves([{**r, 'outer_lr': args.outer_lr} for r in runs], args.plot)}")
    print(json.dumps({"runs": [{k: v for k, v in r.items() if k != "loss_curve"} for r in runs]}))


def plot_loss_curves(runs: list[dict], out: str) -> str:
    """Train loss against the slowest rank's wall clock, one line per run (first of equal names wins)."""
    from hetcomm.bench.plot import plot_loss_vs_time

    curves = {}
    for r in runs:
        outer = f", outer lr {r['outer_lr']}" if r["mode"] == "diloco" else ""
        label = f"{r['name']}{outer} ({r['step_s']:.2f} s/step)"
        curves.setdefault(label, ([t for t, _ in r["loss_curve"]], [loss for _, loss in r["loss_curve"]]))
    return str(plot_loss_vs_time(curves, out, title="2 sites x 2 ranks: train loss against wall-clock time"))


if __name__ == "__main__":
    main()
