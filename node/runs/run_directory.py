"""Where a run writes, and the promise that it never deletes or replaces what it did not make.

A run is written into a hidden sibling of its final path (`.<name>.partial-<random>`), created
fresh, and renamed into place only when complete. The final path is checked before serving
starts, so a refusal costs nothing already computed:

- nothing there: fine;
- a complete run directory of this tool (only the files a run writes): refused unless `force`,
  and then replaced atomically (the old one is renamed aside, the new one renamed in, the old
  one removed);
- anything else (a file, a folder with other files, an unfinished run): always refused.

A run that was interrupted or stopped never replaces a complete run: it lands beside it as
`<name>.interrupted-<n>`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from rdu.base import UserError

__all__ = ["RunDirectory", "RUN_FILES", "is_run_directory", "check_output_path", "TOOL_NAME"]

TOOL_NAME = "rdu-emulator"
# Every file a run or a later `rdu trace` / `rdu plot` writes into a run directory.
RUN_FILES = frozenset({"config.resolved.yaml", "events.msgpack", "requests.csv", "summary.json", "run.json",
                       "trace.json", "ray.log"})
RUN_FOLDERS = frozenset({"plots"})


def is_run_directory(path: Path) -> bool:
    """A folder that holds a finished run of this tool and nothing else (so replacing it loses
    nothing the user made)."""
    if not path.is_dir() or path.is_symlink():
        return False
    try:
        info = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("tool", TOOL_NAME) != TOOL_NAME or "backend" not in info:
        return False
    for entry in path.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            continue  # a writer's own temporary file
        if entry.is_dir() and entry.name in RUN_FOLDERS:
            if any(not (p.is_file() and p.suffix == ".png") for p in entry.iterdir()):
                return False
        elif not (entry.is_file() and entry.name in RUN_FILES):
            return False
    return (path / "summary.json").is_file()


def check_output_path(out: str | Path, force: bool) -> Path:
    """The final run directory for `out`, or a one-line error saying why it cannot be used."""
    text = str(out)
    if not text.strip():
        raise UserError("out: the run directory must not be empty")
    path = Path(text)
    if ".." in path.parts:
        raise UserError(f"out: {text!r}: a run directory must not contain '..'")
    if path.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents, Path.home().resolve()):
        raise UserError(f"out: {text!r} is the current folder, one of its parents or the home folder; "
                        "name a new folder")
    if path.is_symlink() or path.is_file():
        raise UserError(f"out: {text} exists and is not a folder; choose another --out")
    if path.exists():
        if not is_run_directory(path):
            raise UserError(f"out: {text} exists and is not a run directory of this tool (it holds other files); "
                            "choose another --out — nothing was changed")
        if not force:
            raise UserError(f"out: {text} already holds a run; pass --force to replace it, or choose another --out")
    if path.parent.exists() and not path.parent.is_dir():
        raise UserError(f"out: {path.parent} is not a folder")
    return path


class RunDirectory:
    """The hidden folder a run writes into, renamed to its final name when complete."""

    def __init__(self, out: str | Path, force: bool = False) -> None:
        self.final = check_output_path(out, force)
        self.force = force
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.partial = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.final.parent))
        umask = os.umask(0)
        os.umask(umask)
        self.partial.chmod(0o777 & ~umask)  # mkdtemp makes it private; a run directory is an ordinary folder

    def complete(self, finished: bool = True) -> Path:
        """Rename the partial folder into place. A finished run replaces a complete run only when
        forced (checked again now: the folder may have appeared meanwhile); anything else that
        is in the way, or an unfinished run, goes beside it under a new name."""
        target = self.final
        if target.exists() or target.is_symlink():
            replaceable = finished and self.force and is_run_directory(target)
            if not replaceable:
                return self._beside(target, "interrupted" if not finished else "new")
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            aside.rmdir()
            target.rename(aside)
            self.partial.rename(target)
            shutil.rmtree(aside)  # a complete run of this tool (checked above): ours to remove
            return target
        self.partial.rename(target)
        return target

    def _beside(self, target: Path, label: str) -> Path:
        for n in range(1, 10_000):
            candidate = target.with_name(f"{target.name}.{label}-{n}")
            if not candidate.exists():
                self.partial.rename(candidate)
                return candidate
        raise UserError(f"out: too many runs beside {target}; results kept in {self.partial}")

    def discard(self) -> None:
        """Remove the partial folder (ours: made fresh by this run) after a mistake found before serving."""
        shutil.rmtree(self.partial, ignore_errors=True)
