"""The C ABI on its own: a C program links libhetcomm.so, does its own
rendezvous (through this test's pipes) and runs collectives."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

import hetcomm

HERE = os.path.dirname(__file__)


def libzmq_path() -> str:
    """pyzmq's bundled libzmq (a C program has no pyzmq to borrow it from)."""
    import zmq

    found = glob.glob(os.path.join(os.path.dirname(zmq.__file__), "..", "pyzmq.libs", "libzmq*.so*"))
    if not found:
        pytest.skip("pyzmq has no bundled libzmq to point a C program at")
    return os.path.realpath(found[0])


@pytest.mark.timeout(120)
def test_c_program_runs_collectives(tmp_path):
    if not shutil.which("cc"):
        pytest.skip("no C compiler")
    exe = tmp_path / "allreduce"
    subprocess.run(["cc", "-O2", f"-I{hetcomm.get_include()}", os.path.join(HERE, "c", "allreduce.c"),
                    f"-L{hetcomm.get_library_dir()}", "-lhetcomm", f"-Wl,-rpath,{hetcomm.get_library_dir()}",
                    "-o", str(exe)], check=True)
    size = 3
    procs = [subprocess.Popen([str(exe), str(r), str(size), libzmq_path()], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(size)]
    try:
        endpoints = [p.stdout.readline().strip() for p in procs]
        for r, p in enumerate(procs):
            p.stdin.write("".join(f"{q} {endpoints[q]}\n" for q in range(size) if q != r))
            p.stdin.flush()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for r, (out, err) in enumerate(outs):
        assert procs[r].returncode == 0, f"rank {r}: {err}"
        assert out.strip().endswith("OK"), out
        assert "HC_ERR_INVALID_ARGUMENT" in out and "root 6 is out of range [0, 3)" in out, out
