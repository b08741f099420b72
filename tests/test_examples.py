"""The examples in examples/ run, at a small size, and say what they promise."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    pp = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    # a rank that loses its peers fails within a minute instead of hetcomm's default 300 s
    env = {**os.environ, "PYTHONPATH": pp, "HETCOMM_TIMEOUT": "60", "PYTHON": sys.executable}
    env.pop("HETCOMM_SITE", None)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
                          start_new_session=True)


@pytest.mark.timeout(300)
def test_ddp_two_sites():
    pytest.importorskip("torch")
    p = run([sys.executable, "examples/ddp_two_sites.py", "--steps", "12"], 280)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 ranks in sites ['dc-a', 'dc-a', 'dc-b', 'dc-b']" in p.stdout
    m = re.search(r"loss ([\d.]+) -> ([\d.]+); parameters bit-identical on all 4 ranks", p.stdout)
    assert m, p.stdout + p.stderr
    assert float(m.group(2)) < 0.5 * float(m.group(1))


@pytest.mark.netns
@pytest.mark.timeout(300)
def test_ddp_two_sites_in_network_namespaces():
    pytest.importorskip("torch")
    from hetcomm.testbed.netns import available

    ok, why = available()
    if not ok:
        pytest.skip(f"WAN test bed unavailable: {why}")
    p = run([sys.executable, "examples/ddp_two_sites.py", "--netns", "--wan-rate", "200mbit",
             "--ranks-per-site", "1", "--steps", "5"], 280)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 ranks in sites ['0', '1']" in p.stdout and "bit-identical on all 2 ranks" in p.stdout


@pytest.mark.timeout(300)
def test_fsdp2():
    pytest.importorskip("torch")
    p = run([sys.executable, "examples/fsdp2.py", "--steps", "6"], 280)
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"2 ranks: largest difference from the unsharded reference (\S+) \(ok\)", p.stdout)
    assert m and float(m.group(1)) < 1e-4, p.stdout + p.stderr


@pytest.mark.timeout(180)
def test_c_program_embedding_the_c_abi(tmp_path):
    if not shutil.which("cc"):
        pytest.skip("no C compiler")
    p = run(["bash", "examples/c/run.sh", "4", str(tmp_path)], 170)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = sorted(p.stdout.splitlines())
    assert len(lines) == 4, p.stdout
    for rank, line in enumerate(lines):
        m = re.match(rf"rank {rank} \(site dc-{rank // 2} of 2 sites\): exact allreduce ok; int8 allreduce max "
                     r"error (\S+) \(bound (\S+)\), identical on all ranks; (\d+) of (\d+) bytes sent crossed sites",
                     line)
        assert m, line
        assert 0 < float(m.group(1)) <= float(m.group(2))  # compressed, so lossy, and within the bound
        assert 0 < int(m.group(3)) < int(m.group(4))


def test_examples_readme_lists_every_example():
    listed = (EXAMPLES / "README.md").read_text()
    for path in sorted(EXAMPLES.rglob("*")):
        if path.suffix in (".py", ".c") and not path.name.startswith("_"):
            assert f"`{path.relative_to(EXAMPLES)}`" in listed, path
