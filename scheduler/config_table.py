"""Declarative run-config fields: one table that the parser reads values through and that the
reference in docs/run-config.md is generated from, so the two cannot drift apart.

A `ConfigField` says what a field is (type, default, unit, allowed values, meaning) and reads it
from a `Fields` view with exactly those rules. A `Section` groups the fields of one mapping of the
run config; a section with a `selector` (e.g. `workload.kind`) has variants, and a field may
apply to some variants only. This module sits below `node` (the scheduler's workload section
uses it, and the scheduler never imports `node`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rdu.base import Fields

__all__ = ["ConfigField", "Section", "REQUIRED", "TYPES"]


class _Required:
    """The default of a field that has none: leaving it out is an error."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

# type -> how the reference names it. Types outside the simple ones are read by their section's
# own code (which still takes its default and validation from the field).
TYPES = {
    "integer": "whole number", "number": "number", "text": "text", "choice": "text", "boolean": "true/false",
    "integer-or-auto": "whole number or `auto`", "length": "whole number or distribution",
    "mapping": "mapping", "integer-list": "list of whole numbers", "fault-list": "list of fault specs",
    "path-component": "text", "path": "path", "section": "mapping",
}
_SEPARATORS = ("/", "\\")


@dataclass(frozen=True)
class ConfigField:
    """One field of a run-config mapping. `default` is REQUIRED, None (optional, unset) or a value;
    `default_text` describes a default that is computed (e.g. "= output_tokens")."""

    key: str
    type: str
    meaning: str
    default: Any = None
    unit: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    inclusive: bool = False
    maximum: float | None = None
    kinds: tuple[str, ...] = ()
    default_text: str = ""
    allowed_text: str = ""
    example: Any = None

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"{self.key}: unknown field type {self.type!r}")

    def applies_to(self, variant: str | None) -> bool:
        """Whether the field belongs to this variant of its section (all variants if `kinds` is empty)."""
        return not self.kinds or variant in self.kinds

    def read(self, fields: Fields) -> Any:
        """The validated value of this field in `fields`, its default when absent (None if optional)."""
        key = self.key
        if self.default is None and not fields.has(key):
            return None
        default = () if self.default is REQUIRED else (self.default,)
        if self.type == "integer":
            return fields.integer(key, *default, minimum=int(self.minimum if self.minimum is not None else 1),
                                  maximum=None if self.maximum is None else int(self.maximum))
        if self.type == "number":
            return fields.number(key, *default, minimum=self.minimum if self.minimum is not None else 0.0,
                                 inclusive=self.inclusive, maximum=self.maximum)
        if self.type == "choice":
            return fields.string(key, *default, choices=self.choices)
        if self.type == "text":
            return fields.string(key, *default)
        if self.type in ("path", "path-component"):
            return self._path(fields, fields.string(key, *default))
        if self.type == "boolean":
            return fields.boolean(key, *default)
        if self.type == "integer-or-auto":
            if fields.data.get(key) == "auto":
                return "auto"
            return fields.integer(key, *default, minimum=int(self.minimum if self.minimum is not None else 1),
                                  maximum=None if self.maximum is None else int(self.maximum))
        if self.type == "integer-list":
            raw = fields.data.get(key) if fields.has(key) else list(self.default)
            if not isinstance(raw, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in raw):
                fields.fail(f"expected a list of whole numbers, got {raw!r}", key)
            return raw
        if self.type == "mapping":
            raw = fields.data.get(key) if fields.has(key) else {}
            if not isinstance(raw, dict):
                fields.fail(f"expected a mapping, got {raw!r}", key)
            return raw
        raise TypeError(f"{key}: a {self.type} field is read by its section's own code")

    def _path(self, fields: Fields, text: str) -> str:
        """A path must not be empty; a path component (a run name) must also stay one directory
        level: no separators, no `.` or `..`, no control characters."""
        if not text.strip():
            fields.fail("must not be empty", self.key)
        if self.type == "path-component":
            if any(sep in text for sep in _SEPARATORS) or text in (".", "..") or \
                    any(ord(c) < 32 for c in text):
                fields.fail(f"expected one path component (no '/', '\\', '..' or control characters), "
                            f"got {text!r}", self.key)
        return text

    # -- the reference --------------------------------------------------------------------------
    def type_text(self) -> str:
        return TYPES[self.type]

    def default_doc(self) -> str:
        if self.default_text:
            return self.default_text
        if self.default is REQUIRED:
            return "required"
        if self.default is None:
            return "unset"
        if isinstance(self.default, bool):
            return f"`{str(self.default).lower()}`"
        if isinstance(self.default, (list, tuple)) and not self.default:
            return "`[]`"
        return f"`{self.default}`"

    def allowed_doc(self) -> str:
        if self.allowed_text:
            return self.allowed_text
        if self.choices:
            return ", ".join(f"`{c}`" for c in self.choices)
        parts = []
        if self.type == "path-component":
            return "one path component: no `/`, `\\`, `.` or `..`"
        if self.type == "path":
            return "a non-empty path"
        if self.type in ("integer", "integer-or-auto", "length"):
            parts.append(f">= {int(self.minimum if self.minimum is not None else 1)}")
            if self.maximum is not None:
                parts.append(f"<= {int(self.maximum):,}")
        elif self.type == "number":
            parts.append(f"{'>=' if self.inclusive else '>'} {self.minimum if self.minimum is not None else 0:g}")
            if self.maximum is not None:
                parts.append(f"<= {self.maximum:g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Section:
    """The fields of one mapping of the run config (`path` is its dotted place, "" for the top)."""

    path: str
    title: str
    fields: tuple[ConfigField, ...]
    selector: str | None = None
    variants: tuple[str, ...] = ()
    note: str = ""

    def applicable(self, variant: str | None = None) -> tuple[ConfigField, ...]:
        return tuple(f for f in self.fields if f.applies_to(variant))

    def keys(self, variant: str | None = None) -> set[str]:
        return {f.key for f in self.applicable(variant)}

    def field(self, key: str, variant: str | None = None) -> ConfigField:
        for f in self.applicable(variant):
            if f.key == key:
                return f
        raise KeyError(f"{self.path or '(top)'}: no field {key!r} for {variant!r}")

    def check(self, fields: Fields, variant: str | None = None) -> None:
        """Refuse any key of `fields` that this section (variant) does not define."""
        fields.check_known(self.keys(variant))

    def read(self, fields: Fields, key: str, variant: str | None = None) -> Any:
        return self.field(key, variant).read(fields)

    def defaults(self, variant: str | None = None) -> dict[str, Any]:
        """Fields with a concrete default value (not required, not unset, not computed)."""
        return {f.key: f.default for f in self.applicable(variant)
                if f.default is not REQUIRED and f.default is not None and not f.default_text}

    def dotted(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key
