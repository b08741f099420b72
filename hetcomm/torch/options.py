"""``ProcessGroupOptions``: hetcomm settings for one torch process group (no torch import)."""
from __future__ import annotations

from dataclasses import dataclass

from hetcomm.config import Options, env_str


@dataclass
class ProcessGroupOptions(Options):
    """Settings of a hetcomm process group, passed as ``pg_options``.

    Every field of :class:`hetcomm.Options` applies (site, codec, streams,
    chunk_bytes, ...); fields left ``None`` take their ``HETCOMM_*``
    environment variable, then the default. ``timeout`` left ``None`` takes
    the ``timeout=`` given to ``init_process_group``/``new_group``.

    Example::

        dist.init_process_group("hetcomm", pg_options=ProcessGroupOptions(site="dc-a", codec="int8"))

    ``intra`` (``HETCOMM_INTRA``, default "hetcomm") names the library that
    carries the in-site phases of allreduce and broadcast: "nccl", "hccl",
    "gloo" (or any registered torch.distributed backend); the inter-site leg
    stays on hetcomm (see docs/devices.md).
    """

    intra: str | None = None

    def resolved(self) -> "ProcessGroupOptions":
        """A copy with every ``None`` replaced by the environment or the default, ``intra`` included
        (so that a group's settings, which newcomers adopt, name its in-site library)."""
        o = super().resolved()
        o.intra = (o.intra or env_str("HETCOMM_INTRA", "hetcomm")).strip().lower()
        return o
