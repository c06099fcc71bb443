"""Reading YAML files with errors that name the file and line, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rdu.base import UserError, read_user_text

__all__ = ["read_yaml", "parse_yaml", "leaf_paths", "dump_yaml"]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one
    silently, so a duplicated field would quietly override the first)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"the key {key!r} appears twice (first at line "
                f"{seen[key].line + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
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
