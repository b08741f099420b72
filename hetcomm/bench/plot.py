"""Pictures of benchmark results (matplotlib, the optional ``plot`` extra).

* :func:`plot_results`: hetcomm-bench JSON documents (``--json``) as busbw
  against size, one panel per collective, one line per backend and codec; runs
  on the emulated WAN (``--sites``) as time per codec, one bar group per size.
* :func:`plot_loss_vs_time`: training runs as loss against wall-clock time.

matplotlib is imported only when a picture is drawn, with the ``Agg`` backend
(no display needed). Command line, to combine several runs (e.g. one per codec)::

    python -m hetcomm.bench.plot OUT.png RESULTS.json [RESULTS.json ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

from .collectives import CODECS, COLLECTIVES
from .sizes import format_size

#: pixels = inches x DPI; small enough for a README (a PNG well under 100 KB)
FIGURE_DPI = 80


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise :class:`PlotUnavailable` (with the install command) unless matplotlib imports."""
    _pyplot()


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("plotting needs matplotlib: pip install 'hetcomm[plot]' "
                              "(or pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series_label(backend: str, codec: str) -> str:
    """``hetcomm int8``; labels of runs with several codecs carry the codec already."""
    if codec in ("", "none", None) or backend.endswith(f" {codec}"):
        return backend
    return f"{backend} {codec}"


def collect_series(docs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[tuple[int, float, float]]]]:
    """``{op: {series label: [(size, busbw GB/s, time us), ...]}}`` from hetcomm-bench JSON documents.

    A series is a backend with its codec (``hetcomm int8``, ``gloo``); the
    compared backend's rows travel inside the primary rows. When several
    documents hold the same series at the same size the first one wins.
    """
    out: dict[str, dict[str, list[tuple[int, float, float]]]] = {}
    for doc in docs:
        codecs = {r["label"]: r.get("codec", "none") for r in doc.get("runs", [])}
        for row in doc.get("rows", []):
            for r in (row, row.get("compare")):
                if not r:
                    continue
                label = _series_label(r["backend"], codecs.get(r["backend"], "none"))
                points = out.setdefault(r["op"], {}).setdefault(label, [])
                if all(size != r["size"] for size, _, _ in points):
                    points.append((r["size"], r["busbw_GBps"], r["time_us"]))
    for series in out.values():
        for points in series.values():
            points.sort()
    return out


def _title(docs: Sequence[Mapping[str, Any]]) -> str:
    doc = docs[0]
    bed = doc.get("testbed") or {}
    where = bed.get("description") or "local"
    return f"{doc.get('world_size', '?')} ranks, {where}"


def _is_wan(docs: Sequence[Mapping[str, Any]]) -> bool:
    return any((d.get("testbed") or {}).get("sites") for d in docs)


def plot_results(docs: Sequence[Mapping[str, Any]], out: str | Path) -> Path:
    """Draw hetcomm-bench results into ``out`` (PNG, SVG or PDF by its suffix); return the path.

    Local runs: busbw against size, one panel per collective. Runs on the
    emulated WAN (``--sites``): time per size as bars, one per codec and gloo.

    Raises:
        PlotUnavailable: matplotlib is missing.
        ValueError: the documents hold no rows.
    """
    series = collect_series(docs)
    if not series:
        raise ValueError("nothing to plot: the results hold no rows")
    plt = _pyplot()
    fig = _wan_bars(plt, series) if _is_wan(docs) else _busbw_panels(plt, series)
    width_chars = int(fig.get_figwidth() * 13)
    fig.suptitle(textwrap.fill(f"hetcomm-bench: {_title(docs)}", width_chars), fontsize=9)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path


def _busbw_panels(plt: Any, series: Mapping[str, Mapping[str, list]]) -> Any:
    ops = [op for op in COLLECTIVES if op in series]
    cols = min(3, len(ops))
    rows = (len(ops) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        for label, points in series[op].items():
            sizes = [s for s, _, _ in points]
            ax.plot(sizes, [b for _, b, _ in points], marker="o", markersize=3,
                    linestyle="--" if label.startswith("gloo") else "-", label=label)
        ax.set_xscale("log", base=2)
        ticks = sorted({s for points in series[op].values() for s, _, _ in points})[::2]
        ax.set_xticks(ticks, [format_size(s) for s in ticks], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(op, fontsize=9)
        ax.set_xlabel("size (B)", fontsize=8)
        ax.set_ylabel("busbw (GB/s)", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.set_visible(False)
    return fig


def _codec_order(label: str) -> tuple[bool, int, str]:
    """hetcomm first, by codec from least to most compressed; gloo last."""
    codec = label.split(" ", 1)[1] if " " in label else "none"
    return label.startswith("gloo"), CODECS.index(codec) if codec in CODECS else len(CODECS), label


def _wan_bars(plt: Any, series: Mapping[str, Mapping[str, list]]) -> Any:
    ops = [op for op in COLLECTIVES if op in series]
    fig, axes = plt.subplots(1, len(ops), figsize=(max(6.0, 4.5 * len(ops)), 3.4), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        labels = sorted(series[op], key=_codec_order)
        sizes = sorted({s for points in series[op].values() for s, _, _ in points})
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            ms = dict((s, t / 1e3) for s, _, t in series[op][label])
            xs = [j + i * width for j, s in enumerate(sizes) if s in ms]
            bars = ax.bar(xs, [ms[s] for s in sizes if s in ms], width, label=label,
                          hatch="//" if label.startswith("gloo") else None)
            ax.bar_label(bars, fmt="%.0f", fontsize=6)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [format_size(s) for s in sizes])
        ax.set_title(f"{op} across sites", fontsize=9)
        ax.set_xlabel("size (B)", fontsize=8)
        ax.set_ylabel("time (ms, lower is better)", fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def plot_loss_vs_time(runs: Mapping[str, tuple[Sequence[float], Sequence[float]]], out: str | Path,
                      title: str = "loss against wall-clock time", ylabel: str = "loss",
                      logy: bool = False) -> Path:
    """Draw training runs as loss against wall-clock time into ``out``; return the path.

    Args:
        runs: label -> (seconds since the run started, loss) of equal length,
            e.g. ``{"DDP (gloo)": (t1, l1), "DiLoCo, hetcomm int8": (t2, l2)}``.
        out: the picture's path; the suffix picks the format (``.png``, ``.svg``).
        title, ylabel: text of the figure.
        logy: logarithmic loss axis.

    Raises:
        PlotUnavailable: matplotlib is missing.
        ValueError: a run's two sequences differ in length, or no run is given.
    """
    if not runs:
        raise ValueError("nothing to plot: no run given")
    for label, (t, loss) in runs.items():
        if len(t) != len(loss):
            raise ValueError(f"run {label!r}: {len(t)} times but {len(loss)} losses")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for label, (t, loss) in runs.items():
        ax.plot(list(t), list(loss), label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("wall-clock time (s)", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m hetcomm.bench.plot OUT RESULTS.json...``: one picture of several runs."""
    p = argparse.ArgumentParser(prog="python -m hetcomm.bench.plot", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="picture to write (.png, .svg, .pdf)")
    p.add_argument("results", nargs="+", help="hetcomm-bench --json files")
    args = p.parse_args(argv)
    try:
        docs = [json.loads(Path(f).read_text()) for f in args.results]
        print(plot_results(docs, args.out))
    except (OSError, ValueError, KeyError, PlotUnavailable) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
