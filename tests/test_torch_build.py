"""The shim's build lock: a build killed half-way must not block later ones."""
from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from hetcomm.torch import _build


def _hold(build_dir: str, held, release) -> None:
    import pathlib

    with _build.build_lock(pathlib.Path(build_dir)):
        held.set()
        release.wait(30)


def test_a_leftover_torch_lock_file_is_removed(tmp_path):
    (tmp_path / "lock").write_text("")  # what a killed torch build leaves
    with _build.build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


@pytest.mark.timeout(60)
def test_builders_take_turns_and_a_dead_holder_frees_the_lock(tmp_path):
    ctx = mp.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), held, release), daemon=True)
    holder.start()
    assert held.wait(30)
    import fcntl

    with open(tmp_path / "hetcomm-build.lock", "a") as handle:
        with pytest.raises(BlockingIOError):
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.kill()  # killed inside its build: the kernel drops its lock
    holder.join(10)
    t0 = time.monotonic()
    with _build.build_lock(tmp_path):
        assert time.monotonic() - t0 < 5
