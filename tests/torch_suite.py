"""PyTorch's own backend-agnostic distributed suite, run against hetcomm (or gloo).

This drives ``torch.testing._internal.distributed.distributed_test``'s
``_DistTestBase`` the way upstream's ``test/distributed/test_distributed_spawn.py``
does (``TestDistBackend`` + ``_DistTestBase``, one process per rank, file://
init), with ``BACKEND=hetcomm`` declared as a plugin backend with DDP and
subgroup support. Run it for both backends and compare::

    python tests/torch_suite.py --backend gloo    --world-size 2 --out /tmp/gloo2.json
    python tests/torch_suite.py --backend hetcomm --world-size 2 --out /tmp/hc2.json
    python tests/torch_suite.py --compare /tmp/gloo2.json /tmp/hc2.json

``-k REGEX`` selects tests by name, ``--exclude REGEX`` drops some. The
suite needs ``expecttest`` (PyPI), as upstream's does. Expect about ten
seconds a test on a 2-core machine (each rank is a fresh spawned process).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import unittest

if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    _parser.add_argument("--backend", default=os.environ.get("BACKEND", "hetcomm"))
    _parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "2")))
    _parser.add_argument("-k", "--pattern", default=None, help="run tests whose name matches this regex")
    _parser.add_argument("--exclude", default=None, help="skip tests whose name matches this regex")
    _parser.add_argument("--out", default=None, help="write per-test outcomes here (JSON)")
    _parser.add_argument("--test-timeout", type=int, default=int(os.environ.get("DISTRIBUTED_TESTS_DEFAULT_TIMEOUT",
                                                                              "180")),
                         help="seconds before a test's ranks are killed (upstream: 300)")
    _parser.add_argument("--compare", nargs=2, metavar=("GLOO_JSON", "HETCOMM_JSON"),
                         help="compare two result files instead of running")
    ARGS = _parser.parse_args()
    # distributed_test reads these at import time, and the ranks inherit them.
    os.environ["BACKEND"] = ARGS.backend
    os.environ["WORLD_SIZE"] = str(ARGS.world_size)
    os.environ["DISTRIBUTED_TESTS_DEFAULT_TIMEOUT"] = str(ARGS.test_timeout)
else:
    ARGS = None

if ARGS is not None and ARGS.compare:
    BACKEND = None
else:
    BACKEND = os.environ["BACKEND"]

if BACKEND is not None:
    import hetcomm  # noqa: F401  registers the "hetcomm" backend
    import torch
    import torch.distributed as dist
    from torch.testing._internal.common_distributed import DistTestCases

    if BACKEND == "hetcomm":
        # How upstream expects an out-of-tree backend to declare itself.
        DistTestCases.backend_feature["plugin"].add(BACKEND)
        DistTestCases.backend_feature["ddp"].add(BACKEND)
        DistTestCases.backend_feature["subgroup"].add(BACKEND)
        if __name__ == "__main__":
            # Build the shim (or find it cached) before any rank needs it.
            from hetcomm.torch import _build

            _build.load()

    from torch.testing._internal.distributed.distributed_test import DistributedTest, TestDistBackend

    torch.backends.cuda.matmul.allow_tf32 = False

    class TestDistBackendWithSpawn(TestDistBackend, DistributedTest._DistTestBase):
        """Upstream's test class, as test_distributed_spawn.py makes it."""

        def setUp(self) -> None:
            super().setUp()
            self._spawn_processes()
            torch.backends.cudnn.flags(enabled=True, allow_tf32=False).__enter__()

    TestDistBackendWithSpawn.__name__ = f"TestDistBackendWithSpawn{BACKEND.upper()}"
    TestDistBackendWithSpawn.__qualname__ = "TestDistBackendWithSpawn"


class _Recorder(unittest.TextTestResult):
    """Keeps each test's outcome and duration."""

    out_path: str | None = None  # rewritten after every test, so a cut-short run still counts

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.outcomes: dict[str, dict[str, object]] = {}
        self._t0 = 0.0
        self._start = time.monotonic()

    @staticmethod
    def _name(test: unittest.TestCase) -> str:
        return test.id().split(".")[-1]

    def startTest(self, test: unittest.TestCase) -> None:
        self._t0 = time.monotonic()
        super().startTest(test)

    def _put(self, test: unittest.TestCase, outcome: str, detail: str = "") -> None:
        self.outcomes[self._name(test)] = {"outcome": outcome, "seconds": round(time.monotonic() - self._t0, 2),
                                           "detail": detail[-3000:]}
        if self.out_path:
            _write(self.out_path, self.outcomes, time.monotonic() - self._start)

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self._put(test, "passed")

    def addFailure(self, test: unittest.TestCase, err: object) -> None:
        super().addFailure(test, err)  # type: ignore[arg-type]
        self._put(test, "failed", self.failures[-1][1])

    def addError(self, test: unittest.TestCase, err: object) -> None:
        super().addError(test, err)  # type: ignore[arg-type]
        self._put(test, "error", self.errors[-1][1])

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        self._put(test, "skipped", reason)

    def addExpectedFailure(self, test: unittest.TestCase, err: object) -> None:
        super().addExpectedFailure(test, err)  # type: ignore[arg-type]
        self._put(test, "xfail")

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        super().addUnexpectedSuccess(test)
        self._put(test, "xpass")


def _write(path: str, outcomes: dict[str, dict[str, object]], seconds: float) -> dict[str, object]:
    counts: dict[str, int] = {}
    for o in outcomes.values():
        counts[str(o["outcome"])] = counts.get(str(o["outcome"]), 0) + 1
    summary = {"backend": BACKEND, "world_size": int(os.environ["WORLD_SIZE"]), "torch": torch.__version__,
               "counts": counts, "seconds": round(seconds, 1), "tests": outcomes}
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return summary


def run(pattern: str | None, exclude: str | None, out: str | None) -> int:
    """Runs the selected tests; returns the number that failed or errored."""
    loader = unittest.TestLoader()
    names = [n for n in loader.getTestCaseNames(TestDistBackendWithSpawn)
             if (pattern is None or re.search(pattern, n)) and (exclude is None or not re.search(exclude, n))]
    suite = unittest.TestSuite(TestDistBackendWithSpawn(n) for n in names)
    _Recorder.out_path = out
    runner = unittest.TextTestRunner(resultclass=_Recorder, verbosity=2, stream=sys.stdout)
    t0 = time.monotonic()
    result = runner.run(suite)
    outcomes = result.outcomes  # type: ignore[attr-defined]
    if out:
        _write(out, outcomes, time.monotonic() - t0)
    counts: dict[str, int] = {}
    for o in outcomes.values():
        counts[str(o["outcome"])] = counts.get(str(o["outcome"]), 0) + 1
    print(f"{BACKEND} world_size={os.environ['WORLD_SIZE']}: "
          + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return counts.get("failed", 0) + counts.get("error", 0)


def compare(gloo_path: str, hetcomm_path: str) -> int:
    """Prints both runs' counts and the tests that pass with gloo but not with hetcomm."""
    with open(gloo_path) as f:
        gloo = json.load(f)
    with open(hetcomm_path) as f:
        hc = json.load(f)
    print(f"world_size {gloo['world_size']}: gloo {gloo['counts']}  |  hetcomm {hc['counts']}")
    missing = sorted(n for n, o in gloo["tests"].items()
                     if o["outcome"] == "passed" and hc["tests"].get(n, {}).get("outcome") != "passed")
    for n in missing:
        o = hc["tests"].get(n, {"outcome": "not run", "detail": ""})
        detail = str(o.get("detail", "")).strip().splitlines()
        print(f"  {n}: {o['outcome']}: {detail[-1] if detail else ''}")
    print(f"{len(missing)} tests pass with gloo but not with hetcomm")
    return len(missing)


if __name__ == "__main__":
    if ARGS.compare:
        sys.exit(1 if compare(*ARGS.compare) else 0)
    sys.exit(1 if run(ARGS.pattern, ARGS.exclude, ARGS.out) else 0)
