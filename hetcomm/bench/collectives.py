"""What hetcomm-bench measures: the collectives, dtypes, codecs and the per-size plan.

Size convention (the one nccl-tests uses): ``size`` is the bytes of the *whole*
buffer a rank handles in the collective, and ``count = size / sizeof(dtype)``:

* allreduce, broadcast: the buffer itself;
* allgather: the gathered output (world_size x the per-rank input);
* reduce_scatter: the input (world_size x the per-rank output);
* alltoall: the send buffer (world_size blocks, one per destination).

``algbw = size / time`` and ``busbw = algbw x factor`` with the nccl-tests
factors: allreduce ``2(n-1)/n``; allgather, reduce_scatter and alltoall
``(n-1)/n``; broadcast ``1``. ``GB`` is 1e9 bytes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable

from .sizes import AUTO_BYTES_PER_LOOP, auto_iters, auto_warmup, format_size


@dataclass(frozen=True)
class Collective:
    """One collective as the benchmark sees it.

    Attributes:
        name: canonical name (``allreduce`` ...).
        redop: ``sum`` for reductions, ``none`` otherwise (the table's redop column).
        split: the size is cut into ``world_size`` blocks, so it must divide evenly.
        identical: every rank ends with the same output (checked bit for bit).
        reduces: the result is a sum over ranks (so codecs and tolerances apply).
        factor: busbw factor as a function of world size.
    """

    name: str
    redop: str
    split: bool
    identical: bool
    reduces: bool
    factor: Callable[[int], float]

    def busbw_factor(self, world_size: int) -> float:
        """nccl-tests' bus-bandwidth factor for ``world_size`` ranks."""
        return self.factor(world_size)

    def counts(self, count: int, world_size: int) -> tuple[int, int]:
        """Elements in (send buffer, receive buffer) for a case of ``count`` elements."""
        if self.name == "allgather":
            return count // world_size, count
        if self.name == "reduce_scatter":
            return count, count // world_size
        return count, count


COLLECTIVES: dict[str, Collective] = {
    c.name: c
    for c in (
        Collective("allreduce", "sum", False, True, True, lambda n: 2.0 * (n - 1) / n),
        Collective("broadcast", "none", False, True, False, lambda n: 1.0),
        Collective("allgather", "none", True, True, False, lambda n: (n - 1) / n),
        Collective("reduce_scatter", "sum", True, False, True, lambda n: (n - 1) / n),
        Collective("alltoall", "none", True, False, False, lambda n: (n - 1) / n),
    )
}

OP_ALIASES = {
    "all_reduce": "allreduce",
    "all-reduce": "allreduce",
    "bcast": "broadcast",
    "all_gather": "allgather",
    "all-gather": "allgather",
    "reducescatter": "reduce_scatter",
    "reduce-scatter": "reduce_scatter",
    "all_to_all": "alltoall",
    "all-to-all": "alltoall",
}


def parse_ops(text: str) -> list[str]:
    """Parse ``--ops`` (comma-separated, aliases such as ``all_reduce`` allowed; ``all`` = every op)."""
    names: list[str] = []
    for raw in text.split(","):
        key = raw.strip().lower()
        if not key:
            continue
        if key == "all":
            names.extend(COLLECTIVES)
            continue
        key = OP_ALIASES.get(key, key)
        if key not in COLLECTIVES:
            raise ValueError(f"unknown op {raw.strip()!r}; choose from {', '.join(COLLECTIVES)}")
        names.append(key)
    if not names:
        raise ValueError("empty op list")
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class DType:
    """An element type.

    Attributes:
        name: the bench's name (``--dtype``), also printed in the type column.
        itemsize: bytes per element.
        kind: ``float``, ``signed``, ``unsigned`` or ``bool``.
        numpy: numpy dtype name, or None when numpy cannot hold it (bfloat16).
        check: numpy dtype results are read back in for verification.
        max_finite: largest finite value (floats), else None.
    """

    name: str
    itemsize: int
    kind: str
    numpy: str | None
    check: str
    max_finite: float | None = None

    @property
    def is_float(self) -> bool:
        """True for floating-point types (the only ones codecs apply to)."""
        return self.kind == "float"


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float32", 4, "float", "float32", "float32", 3.4028234663852886e38),
        DType("float64", 8, "float", "float64", "float64", 1.7976931348623157e308),
        DType("float16", 2, "float", "float16", "float16", 65504.0),
        DType("bfloat16", 2, "float", None, "float32", 3.3895313892515355e38),
        DType("int8", 1, "signed", "int8", "int8"),
        DType("int16", 2, "signed", "int16", "int16"),
        DType("int32", 4, "signed", "int32", "int32"),
        DType("int64", 8, "signed", "int64", "int64"),
        DType("uint8", 1, "unsigned", "uint8", "uint8"),
        DType("bool", 1, "bool", "bool", "bool"),
    )
}

DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "double": "float64", "fp64": "float64",
                 "half": "float16", "fp16": "float16", "bf16": "bfloat16", "int": "int32", "long": "int64"}


def parse_dtype(text: str) -> DType:
    """Resolve ``--dtype`` (``float32``, ``half``, ``bf16`` ...) to a :class:`DType`."""
    key = text.strip().lower()
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {text!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[key]


#: Largest magnitude in the test data (see :mod:`hetcomm.bench.data`).
DATA_MAX_ABS = 2

#: Per-quantization error of each codec, relative to the largest magnitude in
#: the quantized block: half an fp16/bf16 ulp; half a step of a symmetric
#: 8-bit (127 levels a side) or 4-bit (7 levels) absmax scale; and for 1-bit
#: (sign times a scale no larger than the block's absmax) up to 2x absmax.
CODEC_EPS: dict[str, float] = {
    "none": 0.0,
    "fp16": 2.0 ** -11,
    "bf16": 2.0 ** -8,
    "int8": 1.0 / 254.0,
    "int4": 1.0 / 14.0,
    "1bit": 2.0,
}

CODECS = tuple(CODEC_EPS)


def tolerance(coll: Collective, dtype: DType, codec: str, world_size: int) -> float:
    """Absolute per-element error accepted when checking a result.

    Zero (exact) unless a lossy codec applies, i.e. a floating-point
    reduction with ``codec != none``. Then the bound is
    ``2 * n**2 * M * eps(codec)`` with ``M`` = :data:`DATA_MAX_ABS`: a ring or
    hierarchical reduction quantizes at most ``n`` partial sums, each no larger
    than ``n * M`` in magnitude, and error feedback can carry in at most one
    more such error from the previous call, hence the factor 2. For 1-bit this
    bound is loose on purpose (it still catches NaN, unwritten or misrouted
    blocks and wrong magnitudes); all ranks must still agree bit for bit.
    """
    if codec == "none" or not coll.reduces or not dtype.is_float:
        return 0.0
    return 2.0 * world_size * world_size * DATA_MAX_ABS * CODEC_EPS[codec]


@dataclass(frozen=True)
class Case:
    """One row of the table: a collective at one size, with its loop counts."""

    op: str
    size: int
    count: int
    iters: int
    warmup: int

    def to_dict(self) -> dict:
        """JSON-ready form (also how cases travel to the ranks)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: d[k] for k in ("op", "size", "count", "iters", "warmup")})


def build_plan(ops: Iterable[str], sizes: Iterable[int], dtype: DType, world_size: int,
               iters: int | None, warmup: int | None,
               bytes_per_loop: int = AUTO_BYTES_PER_LOOP) -> tuple[list[Case], list[str]]:
    """Turn ops x sizes into cases, op-major, sizes in the given order.

    Sizes are rounded down to whole elements, and for split collectives to a
    whole number of elements per rank; a size that rounds to zero is skipped
    and a duplicate after rounding is dropped. ``iters``/``warmup`` of None
    mean "auto" (see :func:`hetcomm.bench.sizes.auto_iters`, which ``bytes_per_loop``
    is passed to).

    Returns:
        (cases, notes): notes say what was rounded or skipped, for logging.
    """
    sizes = list(sizes)
    cases: list[Case] = []
    notes: list[str] = []
    for op in ops:
        coll = COLLECTIVES[op]
        unit = dtype.itemsize * (world_size if coll.split else 1)
        seen: set[int] = set()
        for size in sizes:
            rounded = (size // unit) * unit
            if rounded == 0:
                notes.append(f"{op}: {format_size(size)} B skipped (needs at least {unit} B: "
                             f"{'one element per rank' if coll.split else 'one element'})")
                continue
            if rounded != size:
                notes.append(f"{op}: {size} B rounded down to {rounded} B (whole {dtype.name} elements"
                             f"{' per rank' if coll.split else ''})")
            if rounded in seen:
                continue
            seen.add(rounded)
            it = iters if iters is not None else auto_iters(rounded, bytes_per_loop)
            wu = warmup if warmup is not None else auto_warmup(it)
            cases.append(Case(op, rounded, rounded // dtype.itemsize, it, wu))
    return cases, notes
