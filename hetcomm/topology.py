"""Site labels from a topology file: which data centre each host is in.

One line per rule, ``HOST_PATTERN SITE``; the pattern is a shell glob
matched against the rank's host name, and the first matching line wins::

    # hosts      site
    bj-gpu-*     beijing
    sh-npu-*     shanghai
    10.3.*       shanghai

Lets one file, shipped with the job, place every rank instead of setting
HETCOMM_SITE per host.
"""
from __future__ import annotations

import fnmatch
from pathlib import Path


def read_topology(path: str | Path) -> list[tuple[str, str]]:
    """The (pattern, site) rules of a topology file, in order.

    Raises:
        ValueError: the file cannot be read, or a line is not ``PATTERN SITE``
            (naming the file and the line).
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"topology file {path} (HETCOMM_TOPOLOGY): cannot read it: {exc.strerror}") from exc
    rules = []
    for lineno, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise ValueError(f"topology file {path}, line {lineno}: expected 'HOST_PATTERN SITE', got {line.strip()!r}")
        rules.append((words[0], words[1]))
    return rules


def site_of_host(path: str | Path, host: str) -> str:
    """The site of ``host`` by the first matching rule of the file at ``path``.

    Raises:
        ValueError: no rule matches ``host``, or the file is malformed.
    """
    for pattern, site in read_topology(path):
        if fnmatch.fnmatchcase(host, pattern):
            return site
    raise ValueError(f"topology file {path}: host {host!r} matches no line "
                     "(add a 'HOST_PATTERN SITE' line for it, or set HETCOMM_SITE)")
