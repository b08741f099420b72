"""Message sizes for hetcomm-bench: parsing ``4``, ``1K``, ``64MiB``; ranges; iteration counts.

Suffixes are binary, as in nccl-tests: K = 1024, M = 1024**2, G = 1024**3
(``1K``, ``1k``, ``1KB`` and ``1KiB`` all mean 1024 bytes).
"""
from __future__ import annotations

from hetcomm.config import parse_size

#: ``--iters auto``: about this many bytes per timed loop, within the bounds below.
AUTO_BYTES_PER_LOOP = 1 << 30
AUTO_MIN_ITERS = 5
AUTO_MAX_ITERS = 200


def parse_size_list(text: str) -> list[int]:
    """Parse a comma-separated list of sizes (``4,1K,1M,64M``) into bytes, order kept."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("empty size list")
    return [parse_size(t) for t in items]


def format_size(nbytes: int) -> str:
    """Render bytes compactly with a binary suffix where exact (``1048576`` -> ``1M``)."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= unit and nbytes % unit == 0:
            return f"{nbytes // unit}{suffix}"
    return str(nbytes)


def size_range(min_size: int, max_size: int, factor: int) -> list[int]:
    """Geometric sizes ``min_size, min_size*factor, ...`` up to and including ``max_size``.

    Like nccl-tests' ``-b/-e/-f``: ``max_size`` is included only when it lies on
    the progression.
    """
    if min_size <= 0:
        raise ValueError("--min-size must be at least 1 byte")
    if max_size < min_size:
        raise ValueError("--max-size must not be below --min-size")
    if factor < 2:
        raise ValueError("--step-factor must be an integer of at least 2")
    sizes = []
    s = min_size
    while s <= max_size:
        sizes.append(s)
        s *= factor
    return sizes


def auto_iters(size: int, bytes_per_loop: int = AUTO_BYTES_PER_LOOP) -> int:
    """Timed iterations for one size when ``--iters`` is not given.

    ``clamp(bytes_per_loop / size, 5, 200)``; with the default 1 GiB: 200 for
    everything up to 4 MiB, then fewer so that each timed loop moves about
    1 GiB (64 at 16 MiB, 16 at 64 MiB, 5 at 256 MiB).
    """
    return max(AUTO_MIN_ITERS, min(AUTO_MAX_ITERS, bytes_per_loop // max(size, 1)))


def auto_warmup(iters: int) -> int:
    """Untimed warm-up iterations when ``--warmup`` is not given: ``clamp(iters // 10, 1, 20)``."""
    return max(1, min(20, iters // 10))
