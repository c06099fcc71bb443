"""One direction of imports among the rooms of the house (docs/architecture.md): a module may
import its own room and the rooms below it, never a room above or beside it. Every import in the
source counts, also those inside functions."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"rdu": "rdu", "protos": "rdu.protos", "interconnect": "rdu.interconnect",
           "socket_actor": "rdu.socket_actor", "scheduler": "rdu.scheduler", "node": "rdu.node"}

# Bottom to top; rooms on one level may not import each other.
LEVELS = [
    {"rdu"},
    {"rdu.protos"},
    {"rdu.interconnect"},
    {"rdu.socket_actor"},
    {"rdu.scheduler"},
    {"rdu.node.cluster", "rdu.node.observe"},
    {"rdu.node.runs"},
    {"rdu.node.studies"},
    {"rdu.node.api", "rdu.node.cli"},
]
ROOMS = sorted((room for level in LEVELS for room in level), key=len, reverse=True)
LEVEL = {room: i for i, level in enumerate(LEVELS) for room in level}


def room_of(module: str) -> str | None:
    for room in ROOMS:
        if module == room or module.startswith(room + "."):
            return room
    return "rdu.node" if module == "rdu.node" else None


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(module: str, path: Path) -> set[str]:
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return {n for n in names if n.split(".")[0] in ("rdu", *FOLDERS)}


def violations() -> list[str]:
    found = []
    for module, path in sorted(modules().items()):
        own = room_of(module)
        for name in sorted(imports(module, path)):
            if name.split(".")[0] != "rdu":
                found.append(f"{module}: imports {name} outside the rdu namespace")
                continue
            other = room_of(name)
            if other is None or other == own or other == "rdu.node" or own == "rdu.node":
                continue
            if LEVEL[other] >= LEVEL[own]:
                found.append(f"{module} ({own}) imports {name} ({other})")
    return found


def test_imports_run_one_way():
    assert violations() == []


def test_the_check_sees_an_import_against_the_direction(tmp_path, monkeypatch):
    """The checker itself: a scheduler module importing the runs room, or an observer importing a
    backend, is reported."""
    bad = tmp_path / "scheduler"
    bad.mkdir()
    (bad / "oops.py").write_text("def f():\n    from rdu.node.runs.run import execute_run\n")
    (tmp_path / "node" / "observe").mkdir(parents=True)
    (tmp_path / "node" / "observe" / "peek.py").write_text("from rdu.node.cluster import inline_backend\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations() == ["rdu.node.observe.peek (rdu.node.observe) imports rdu.node.cluster.inline_backend "
                            "(rdu.node.cluster)",
                            "rdu.scheduler.oops (rdu.scheduler) imports rdu.node.runs.run.execute_run (rdu.node.runs)"]
