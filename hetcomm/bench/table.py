"""The nccl-tests-style table hetcomm-bench prints on stdout.

One block per collective: ``# <op>`` then a header line, then one row per
size. Lines starting with ``#`` are comments; every other line is a row of
whitespace-separated fields, so ``grep -v '^#'`` plus ``awk`` reads it. Columns:

    size(B) count type redop root time(us) algbw(GB/s) busbw(GB/s) #wrong [wire(B)]

plus, with ``--compare``, the other backend's ``time(us) busbw(GB/s) #wrong``
and ``x <other>`` = other's time / this time (above 1: faster than the other).
``#wrong`` is ``N/A`` when checking is off; ``wire(B)`` (payload bytes the
busiest rank sent per op) appears for backends that count them.
"""
from __future__ import annotations

from typing import TextIO

from .results import Row
from .sizes import format_size

SIZE_CONVENTION = (
    "size(B) is the whole buffer a rank handles, as in nccl-tests: the buffer for allreduce and "
    "broadcast, the gathered output (n x input) for allgather, the input (n x output) for "
    "reduce_scatter, the send buffer for alltoall; count = size / sizeof(type)."
)
TIMING_CONVENTION = (
    "time(us) is the max over ranks of each rank's mean over back-to-back iterations after a barrier; "
    "algbw = size/time; busbw = algbw x 2(n-1)/n for allreduce, (n-1)/n for allgather, reduce_scatter "
    "and alltoall, 1 for broadcast; 1 GB = 1e9 B."
)


def fmt_time(us: float) -> str:
    """Microseconds with nccl-tests' precision (2 decimals below 100, 1 below 10000, else 0)."""
    if us >= 10000.0:
        return f"{us:.0f}"
    if us >= 100.0:
        return f"{us:.1f}"
    return f"{us:.2f}"


def fmt_wrong(row: Row) -> str:
    """``#wrong`` cell: the count, or N/A when not checked."""
    return "N/A" if row.wrong is None else str(row.wrong)


_MAIN = [("size(B)", 12), ("count", 12), ("type", 9), ("redop", 6), ("root", 5),
         ("time(us)", 10), ("algbw(GB/s)", 12), ("busbw(GB/s)", 12), ("#wrong", 7)]
_WIRE = [("wire(B)", 13)]
_CMP = [("time(us)", 10), ("busbw(GB/s)", 12), ("#wrong", 7)]


class TableWriter:
    """Streams rows to ``out`` as they arrive, opening a block whenever the op changes."""

    def __init__(self, out: TextIO, label: str, compare_label: str | None = None, show_wire: bool = False):
        self.out = out
        self.label = label
        self.compare_label = compare_label
        self.show_wire = show_wire
        self._op: str | None = None
        self._busbw: list[float] = []
        self._cmp_busbw: list[float] = []
        self.wrong_total = 0
        self.disagree: list[str] = []

    def _cols(self) -> list[tuple[str, int]]:
        cols = _MAIN + (_WIRE if self.show_wire else [])
        if self.compare_label:
            cols = cols + _CMP + [(f"x {self.compare_label}", 9)]
        return cols

    def _line(self, cells: list[str]) -> str:
        return "".join(c.rjust(w) for c, (_, w) in zip(cells, self._cols()))

    def comment(self, text: str = "") -> None:
        """Write a ``#`` comment line."""
        self.out.write(f"# {text}\n" if text else "#\n")
        self.out.flush()

    def _open(self, op: str) -> None:
        self._close_block()
        self._op = op
        self.comment()
        self.comment(op)
        if self.compare_label:
            main_w = sum(w for _, w in _MAIN[5:]) + (sum(w for _, w in _WIRE) if self.show_wire else 0)
            cmp_w = sum(w for _, w in _CMP)
            lead = sum(w for _, w in _MAIN[:5])
            group = (" " * lead + "<" + f" {self.label} ".center(main_w - 3, "-") + "> "
                     + "<" + f" {self.compare_label} ".center(cmp_w - 3, "-") + ">")
            self.out.write("#" + group[1:] + "\n")
        header = self._line([name for name, _ in self._cols()])
        self.out.write("#" + header[1:] + "\n")

    def _close_block(self) -> None:
        if self._op is None:
            return
        avg = sum(self._busbw) / len(self._busbw) if self._busbw else 0.0
        text = f"Avg bus bandwidth    : {avg:.4g} GB/s ({self.label})"
        if self.compare_label and self._cmp_busbw:
            cavg = sum(self._cmp_busbw) / len(self._cmp_busbw)
            text += f", {cavg:.4g} GB/s ({self.compare_label})"
        self.comment(text)
        self._busbw, self._cmp_busbw = [], []
        self._op = None

    def relabel(self, label: str) -> None:
        """Rows of another run follow (e.g. the next codec): close the block, name the new run."""
        self._close_block()
        self.label = label

    def row(self, row: Row, other: Row | None = None) -> None:
        """Print one row (and the other backend's figures for the same case)."""
        if row.op != self._op:
            self._open(row.op)
        cells = [str(row.size), str(row.count), row.dtype, row.redop, str(row.root),
                 fmt_time(row.time_us), f"{row.algbw:.2f}", f"{row.busbw:.2f}", fmt_wrong(row)]
        if self.show_wire:
            cells.append("-" if row.wire_bytes is None else f"{row.wire_bytes:.0f}")
        self._busbw.append(row.busbw)
        self._note(row)
        if self.compare_label:
            if other is None:
                cells += ["-", "-", "-", "-"]
            else:
                cells += [fmt_time(other.time_us), f"{other.busbw:.2f}", fmt_wrong(other),
                          f"{other.time_us / row.time_us:.2f}" if row.time_us > 0 else "-"]
                self._cmp_busbw.append(other.busbw)
                self._note(other)
        self.out.write(self._line(cells) + "\n")
        self.out.flush()

    def _note(self, row: Row) -> None:
        self.wrong_total += row.wrong or 0
        if row.identical is False:
            self.disagree.append(f"{row.backend} {row.op} {row.size} B")

    def finish(self) -> None:
        """Close the last block and print the overall check summary."""
        self._close_block()
        self.comment()
        self.comment(f"Out of bounds values : {self.wrong_total} {'OK' if self.wrong_total == 0 else 'FAILED'}")
        if self.disagree:
            self.comment("Ranks NOT bit-identical: " + "; ".join(self.disagree))
        self.comment()


def summary_line(rows: list[dict], labels: list[str], compare_label: str | None, world_size: int,
                 seconds: float) -> str:
    """The run in one line: how the backends compared (or the best busbw), whether all was right.

    ``rows`` are the JSON rows of the run (``x_compare`` set when compared);
    ``labels`` the runs of the benchmarked backend (one per codec), each
    getting its own median when there are several.
    """
    wrong = sum(r.get("wrong") or 0 for r in rows)
    lead = f"summary: {' / '.join(labels)}" + (f" vs {compare_label}" if compare_label else "")
    lead += f", {world_size} ranks, {len(rows)} cases in {seconds:.0f} s"
    verdict = "all results correct" if wrong == 0 else f"{wrong} wrong element(s)"
    ratios = sorted((r["x_compare"], r["op"], r["size"], r.get("backend")) for r in rows if r.get("x_compare"))
    if ratios:
        faster = sum(1 for x, *_ in ratios if x > 1.0)
        medians = [(label, _median([x for x, _, _, b in ratios if b == label or len(labels) == 1]))
                   for label in labels]
        median = ", ".join(f"{m:.2f}" if len(labels) == 1 else f"{label} {m:.2f}"
                           for label, m in medians if m is not None)
        (lo, lo_op, lo_size, _), (hi, hi_op, hi_size, _) = ratios[0], ratios[-1]
        return (f"{lead}: faster in {faster}/{len(ratios)}, x {compare_label} median {median} "
                f"(min {lo:.2f} {lo_op} {format_size(lo_size)}, max {hi:.2f} {hi_op} {format_size(hi_size)}); "
                f"{verdict}")
    if rows:
        best = max(rows, key=lambda r: r["busbw_GBps"])
        return (f"{lead}: best busbw {best['busbw_GBps']:.2f} GB/s ({best['op']} {format_size(best['size'])}); "
                f"{verdict}")
    return f"{lead}; {verdict}"


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
