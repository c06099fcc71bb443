"""Reading YAML files with errors that name the file and line, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from interconnect.spec_fields import UserError, read_user_text

__all__ = ["read_yaml", "parse_yaml", "leaf_paths", "dump_yaml"]


def parse_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{origin}: {where}not valid YAML ({problem})") from exc


def read_yaml(path: str | Path) -> Any:
    return parse_yaml(read_user_text(path, "YAML file"), str(path))


def leaf_paths(tree: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every non-mapping value in `tree`."""
    if isinstance(tree, dict) and tree:
        paths = []
        for key, value in tree.items():
            paths.extend(leaf_paths(value, f"{prefix}.{key}" if prefix else str(key)))
        return paths
    return [prefix] if prefix else []


def dump_yaml(tree: Any) -> str:
    return yaml.safe_dump(tree, sort_keys=False, default_flow_style=None, width=110)
