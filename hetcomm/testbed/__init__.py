"""The emulated WAN test bed: sites as network namespaces behind tbf-limited links.

A tool of its own (``python -m hetcomm.testbed check|cleanup|measure|allreduce``),
used by the benchmarks, the training examples and the tests; see
:mod:`hetcomm.testbed.netns` for the bed and :mod:`hetcomm.testbed.probe` for
the link measurements.
"""
from hetcomm.testbed.netns import (NetemUnavailableError, NetnsError, WanTestbed, available, cleanup_stale,
                                   netem_available)

__all__ = ["NetnsError", "NetemUnavailableError", "WanTestbed", "available", "cleanup_stale", "netem_available"]
