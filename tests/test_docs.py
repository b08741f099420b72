"""The README and docs/ stay true: the CI command, links and pictures, every HETCOMM_* variable documented."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_keeps_the_command_ci_runs():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert ci, ".ci/run runs no pytest"
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Install and test"):readme.index("\n## ", readme.index("## Install and test") + 3)]
    for command in ci:
        assert command in install.splitlines(), f"README's 'Install and test' lacks {command!r}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_pictures_resolve(doc):
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path = (doc.parent / target).resolve()
        assert path.exists(), f"{doc.name} links to {target}, which does not exist"
        if path.suffix == ".png":
            assert path.stat().st_size < 100_000, f"{target} is {path.stat().st_size} bytes"


def test_every_environment_variable_is_documented():
    names = set()
    for path in [*(ROOT / "hetcomm").rglob("*.py"), *(ROOT / "csrc").rglob("*.[ch]"), *(ROOT / "csrc").rglob("*.[ch]pp")]:
        names |= set(re.findall(r"\bHETCOMM_[A-Z0-9_]+\b", path.read_text(errors="replace")))
    names.discard("HETCOMM_H")  # the header's include guard
    documented = (ROOT / "docs" / "configuration.md").read_text()
    missing = sorted(n for n in names if f"`{n}`" not in documented)
    assert not missing, f"not in docs/configuration.md: {missing}"
