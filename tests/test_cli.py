"""The ``hetcomm`` command: keygen and info."""
import os
import stat
import subprocess
import sys


def hetcomm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hetcomm.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_keygen_writes_a_pair_and_never_overwrites(tmp_path):
    p = hetcomm("keygen", "--name", "dc1", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "dc1.key").read_text().count("public-key") == 1
    assert stat.S_IMODE((tmp_path / "dc1.key_secret").stat().st_mode) == 0o600
    again = hetcomm("keygen", "--name", "dc1", str(tmp_path))
    assert again.returncode != 0 and "dc1.key exists" in again.stderr


def test_info_shows_the_site_the_topology_file_gives(tmp_path):
    topo = tmp_path / "topology"
    topo.write_text("bj-* beijing\n* elsewhere\n")
    env = {"HETCOMM_TOPOLOGY": str(topo), "HETCOMM_HOST": "bj-gpu-3", "HETCOMM_SITE": "", "HETCOMM_CODEC": "int8"}
    p = hetcomm("info", env=env)
    assert p.returncode == 0, p.stderr
    assert "host bj-gpu-3, site beijing" in p.stdout and "codec = int8" in p.stdout
    p = hetcomm("info", env={**env, "HETCOMM_TOPOLOGY": str(tmp_path / "missing")})
    assert p.returncode == 1 and "cannot read it" in p.stdout
