"""Which code made a benchmark record: the commit, and whether the tree had uncommitted changes.

A published figure is only as good as the code it came from; every results JSON carries this,
so a stale figure can be told from a fresh one without re-running it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def code_version() -> str:
    """``git describe --always --dirty`` of the repository, or ``"unknown"`` outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"
