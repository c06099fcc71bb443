"""Typed reading of user-supplied specs (YAML/JSON trees) with errors that name file and field.

This is the lowest layer that validates user input, so every package above reuses it:
a bad value anywhere becomes one `UserError` line such as
``sn40l.yaml: socket.hbm.bandwidth_bytes_per_s: expected a number > 0, got -1``.

Spec values may be written bare (``capacity_bytes: 64 GiB``) or with their provenance
(``capacity_bytes: {value: 64 GiB, source: "[S] paper table 1"}``); `split_sources` separates
the two trees so that specs stay plain data and reports can still cite every number.
"""

from __future__ import annotations

import math
from pathlib import Path
import re
from collections.abc import Mapping
from typing import Any, NoReturn

__all__ = ["UserError", "Fields", "split_sources", "deep_merge", "parse_bytes", "format_bytes"]


class UserError(Exception):
    """A mistake in user input (file, flag, field, trace line): one line, exit code 2."""


_MISSING = object()

_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str) -> float:
    """'64 GiB' -> 68719476736.0; '1.5e12' -> 1.5e12. Raises ValueError on anything else."""
    match = _BYTES_RE.match(text)
    if not match or match.group(2).lower() not in _BYTE_UNITS:
        raise ValueError(text)
    return float(match.group(1)) * _BYTE_UNITS[match.group(2).lower()]


def _is_sourced_leaf(node: Any) -> bool:
    return isinstance(node, Mapping) and "value" in node and set(node) <= {"value", "source"}


def split_sources(tree: Any, prefix: str = "") -> tuple[Any, dict[str, str]]:
    """Return (values, sources): `{value, source}` leaves become bare values; sources keyed by dotted path."""
    sources: dict[str, str] = {}

    def walk(node: Any, path: str) -> Any:
        if _is_sourced_leaf(node):
            if "source" in node:
                sources[path] = str(node["source"])
            return node["value"]
        if isinstance(node, Mapping):
            return {key: walk(value, f"{path}.{key}" if path else str(key)) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value, f"{path}[{i}]") for i, value in enumerate(node)]
        return node

    return walk(tree, prefix), sources


def deep_merge(base: Any, override: Any) -> Any:
    """Override wins field by field; mappings merge recursively, everything else is replaced."""
    if isinstance(base, Mapping) and isinstance(override, Mapping) and not _is_sourced_leaf(override):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = deep_merge(base[key], value) if key in base else value
        return merged
    return override


# Physically meaningful ranges, by the unit in a field's name: any value inside them keeps every
# emulated time far inside int64 nanoseconds (~292 years), so no arithmetic overflows and no
# negative time is ever printed. One rule for every numeric field of every spec.
UNIT_RANGES: tuple[tuple[str, float, float, str], ...] = (
    ("_bytes_per_s", 1e6, 1e16, "a bandwidth in bytes/s"),
    ("_flops_per_s", 1e9, 1e19, "a compute rate in FLOP/s"),
    ("_ns", 0.0, 1e15, "a time in ns"),
    ("_bytes", 0.0, 1e17, "a size in bytes"),
    ("_fraction", 1e-3, 1.0, "a fraction"),
)


def physical_range(key: str) -> tuple[float, float, str] | None:
    """The (low, high, what) range a numeric field's unit allows, or None for a unitless field."""
    for suffix, low, high, what in UNIT_RANGES:
        if key.endswith(suffix):
            return low, high, what
    return None


class Fields:
    """A view of one mapping in a spec, which reads typed fields and names them on error."""

    def __init__(self, data: Any, origin: str, path: str = "") -> None:
        self.origin = origin
        self.path = path
        if not isinstance(data, Mapping):
            self.fail(f"expected a mapping of fields, got {type(data).__name__} {data!r}")
        self.data = data

    # -- errors --------------------------------------------------------------------------------
    def where(self, key: str | None = None) -> str:
        path = self.path if key is None else (f"{self.path}.{key}" if self.path else key)
        return f"{self.origin}: {path}" if path else self.origin

    def fail(self, message: str, key: str | None = None) -> NoReturn:
        raise UserError(f"{self.where(key)}: {message}")

    # -- structure -----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def sub(self, key: str) -> "Fields":
        if key not in self.data:
            self.fail("missing section", key)
        return Fields(self.data[key], self.origin, f"{self.path}.{key}" if self.path else key)

    def check_known(self, allowed: set[str] | frozenset[str]) -> None:
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            self.fail(f"unknown field; expected one of: {', '.join(sorted(allowed))}", unknown[0])

    def _raw(self, key: str, default: Any) -> Any:
        if key in self.data and self.data[key] is not None:
            return self.data[key]
        if default is _MISSING:
            self.fail("missing field", key)
        return default

    # -- scalars -------------------------------------------------------------------------------
    def number(self, key: str, default: Any = _MISSING, *, minimum: float = 0.0,
               inclusive: bool = False, maximum: float | None = None) -> float:
        raw = self._raw(key, default)
        if raw is default and default is not _MISSING:
            return raw
        value = self._to_float(key, raw, bytes_ok=key.endswith("_bytes"))
        if not math.isfinite(value):
            self.fail(f"expected a finite number, got {raw!r}", key)
        low_ok = value >= minimum if inclusive else value > minimum
        if not low_ok:
            self.fail(f"expected a number {'>=' if inclusive else '>'} {minimum:g}, got {raw!r}", key)
        if maximum is not None and value > maximum:
            self.fail(f"expected a number <= {maximum:g}, got {raw!r}", key)
        physical = physical_range(key)
        if physical is not None and not physical[0] <= value <= physical[1]:
            self.fail(f"expected {physical[2]} between {physical[0]:g} and {physical[1]:g} (a physically meaningful "
                      f"range, which keeps every emulated time inside int64 nanoseconds), got {raw!r}", key)
        return value

    def fraction(self, key: str, default: Any = _MISSING) -> float:
        return self.number(key, default, minimum=0.0, maximum=1.0)

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int = 1, maximum: int | None = None) -> int:
        raw = self._raw(key, default)
        if raw is default and default is not _MISSING:
            return raw
        if isinstance(raw, bool) or not isinstance(raw, int):
            if isinstance(raw, float) and raw.is_integer():
                raw = int(raw)
            elif isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
                raw = int(raw)
            else:
                self.fail(f"expected a whole number, got {raw!r}", key)
        if raw < minimum:
            self.fail(f"expected a whole number >= {minimum}, got {raw}", key)
        if maximum is not None and raw > maximum:
            self.fail(f"expected a whole number <= {maximum:,}, got {raw:,}", key)
        return int(raw)

    def string(self, key: str, default: Any = _MISSING, *, choices: tuple[str, ...] | None = None) -> str:
        raw = self._raw(key, default)
        if not isinstance(raw, str):
            self.fail(f"expected text, got {raw!r}", key)
        if choices is not None and raw not in choices:
            self.fail(f"expected one of {', '.join(choices)}, got {raw!r}", key)
        return raw

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        raw = self._raw(key, default)
        if not isinstance(raw, bool):
            self.fail(f"expected true or false, got {raw!r}", key)
        return raw

    def string_list(self, key: str, default: Any = _MISSING) -> list[str]:
        raw = self._raw(key, default)
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            self.fail(f"expected a list of names, got {raw!r}", key)
        return list(raw)

    def _to_float(self, key: str, raw: Any, *, bytes_ok: bool) -> float:
        if isinstance(raw, bool):
            self.fail(f"expected a number, got {raw!r}", key)
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            try:
                return parse_bytes(raw) if bytes_ok else float(raw)
            except ValueError:
                hint = " (a number, optionally with KiB/MiB/GiB/TiB/KB/MB/GB/TB)" if bytes_ok else ""
                self.fail(f"expected a number{hint}, got {raw!r}", key)
        self.fail(f"expected a number, got {type(raw).__name__} {raw!r}", key)


def format_bytes(nbytes: float) -> str:
    """Human-readable size with a binary unit: 1.57 GiB."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


MAX_INPUT_FILE_BYTES = 1 << 30   # a config, model file or trace larger than this is not what the user meant


def read_user_text(path: str | Path, what: str = "file") -> str:
    """The text of a file the user named: UTF-8 (with or without a byte-order mark) or UTF-16 with
    one; anything else, a folder or an unreadable file is a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such {what}")
    try:
        if path.stat().st_size > MAX_INPUT_FILE_BYTES:
            raise UserError(f"{path}: {path.stat().st_size:,} bytes is larger than a {what} can be "
                            f"({MAX_INPUT_FILE_BYTES:,})")
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
                        f"save the {what} as UTF-8") from None
