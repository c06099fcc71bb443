"""What produced a result: the tool's version and, in a git checkout, its commit. Recorded in
`run.json` (never in `summary.json`, which holds emulated results only) and shown by
`rdu --version`."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

__all__ = ["tool_version", "git_commit", "version_line"]

_SOURCE_ROOT = Path(__file__).resolve().parents[2]   # node/runs/ -> the repository


@lru_cache(maxsize=1)
def tool_version() -> str:
    try:
        return metadata.version("rdu-emulator")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the source tree this code runs from (with `+dirty` when it has uncommitted
    changes), or None when it is not a git checkout or git is missing."""
    if not (_SOURCE_ROOT / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(_SOURCE_ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(_SOURCE_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def version_line() -> str:
    commit = git_commit()
    return f"rdu {tool_version()}" + (f" (commit {commit[:12]}{'+dirty' if commit.endswith('+dirty') else ''})"
                                      if commit else "")
