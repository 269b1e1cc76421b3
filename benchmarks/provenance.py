"""Which code made a benchmark record: the commit, and whether the tree had uncommitted changes.

A published figure is only as good as the code it came from; every results JSON carries this,
so a stale figure can be told from a fresh one without re-running it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def code_version() -> str:
    """The commit (``git describe --always``), ``-dirty`` when anything but the results files
    differs from it (a grid that merges into its own JSON must not mark its next part dirty),
    or ``"unknown"`` outside a git checkout."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    try:
        described = git("describe", "--always")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if described.returncode != 0:
        return "unknown"
    return described.stdout.strip() + ("-dirty" if changed.stdout.strip() else "")
