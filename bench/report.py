"""What a bench run leaves behind: its rows, the verdict on its targets, the markdown table, the
JSON record, and the README block regenerated from that record.

Nothing here measures anything or touches Ray, so all of it is unit-tested without either.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rdu.base import UserError

BEGIN_MARKER = "<!-- bench-table:begin -->"
END_MARKER = "<!-- bench-table:end -->"
TOOL = "rdu-emulator bench"  # marks latest.json as ours, so we never overwrite a file we did not make
RESULT_FILES = ("latest.json", "table.md")


@dataclass
class Row:
    """One measurement of this run. `ok` is None when the row has no target, so "no target" and
    "target met" stay distinct in the table and in the exit code."""

    group: str
    name: str
    value: float
    unit: str
    target: str = ""
    ok: bool | None = None

    def to_dict(self) -> dict:
        """Plain data for JSON; a value that could not be measured (NaN) becomes null, which
        strict JSON readers accept."""
        data = dict(vars(self))
        if isinstance(self.value, float) and math.isnan(self.value):
            data["value"] = None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Row":
        value = data["value"]
        return cls(**{**data, "value": float("nan") if value is None else float(value)})


@dataclass
class BenchRecord:
    """A whole bench run: which groups ran (and which crashed), where, when, and their rows."""

    date: str
    cores: int
    groups: list[str]
    rows: list[Row]
    failed: list[str] = field(default_factory=list)
    group_wall_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"tool": TOOL, "date": self.date, "cores": self.cores, "groups": self.groups,
                "failed": self.failed, "group_wall_s": self.group_wall_s,
                "missed": [r.name for r in missed(self.rows)], "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, data: dict) -> "BenchRecord":
        return cls(date=data["date"], cores=data["cores"], groups=list(data["groups"]),
                   rows=[Row.from_dict(r) for r in data["rows"]], failed=list(data.get("failed", [])),
                   group_wall_s=dict(data.get("group_wall_s", {})))


def missed(rows: list[Row]) -> list[Row]:
    """The rows whose target was checked and not met (rows without a target never miss)."""
    return [r for r in rows if r.ok is False]


def exit_code(rows: list[Row]) -> int:
    """1 when any target was missed, else 0: `make bench` must fail loudly, not print NO and pass."""
    return 1 if missed(rows) else 0


def format_value(value: float, unit: str = "") -> str:
    """Three significant figures or so, with thousands separators: a one-run measurement on a
    shared machine carries no more precision than that."""
    if unit == "bool":
        return "yes" if value else "no"
    if math.isnan(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:,.1f}"
    return f"{value:,.2f}"


def _cell(text: str) -> str:
    """A markdown table cell: a literal | would split the cell."""
    return text.replace("|", "\\|")


def _with_unit(text: str, unit: str) -> str:
    """`630 MB/s`, `7.0%`, `1.8x`; a bool row's text (yes/no) is its own unit."""
    if not text or unit in ("", "bool"):
        return text
    return f"{text}{unit}" if unit in ("%", "x") else f"{text} {unit}"


def verdict_lines(rows: list[Row]) -> list[str]:
    """What a run says after its table: which rows missed their target, or that all were met."""
    bad = missed(rows)
    checked = sum(r.ok is not None for r in rows)
    if not bad:
        return [f"bench: all {checked} targets met"]
    lines = [f"bench: {len(bad)} of {checked} targets missed:"]
    lines += [f"  {r.group}: {r.name} = {_with_unit(format_value(r.value, r.unit), r.unit)} "
              f"(target {_with_unit(r.target, r.unit)})" for r in bad]
    return lines


def _met(row: Row) -> str:
    return "" if row.ok is None else ("yes" if row.ok else "**NO**")


def markdown_table(rows: list[Row]) -> str:
    """The rows as one GitHub markdown table (no trailing newline)."""
    lines = ["| group | measurement | value | target | met |", "|---|---|--:|---|---|"]
    for r in rows:
        cells = (r.group, r.name, _with_unit(format_value(r.value, r.unit), r.unit), _with_unit(r.target, r.unit),
                 _met(r))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def record_block(record: BenchRecord) -> str:
    """The text that goes between the README markers: the table of one run plus the line that
    says when, on how many cores, and that these numbers come from that single run."""
    groups = ", ".join(record.groups)
    return (f"{markdown_table(record.rows)}\n\n"
            f"Numbers of one `make bench` run ({groups}) on {record.date}, {record.cores} cores; "
            "the machine may have been shared, so wall times are indicative and targets are checked "
            "by `make bench` itself, not by the tests.")


def splice_readme(text: str, block: str) -> str:
    """Replace exactly what lies between the begin and end markers with `block`, keeping the
    markers and every other byte of the text. Missing, repeated or swapped markers are a user
    error: guessing where the table goes could eat a section of the README."""
    if text.count(BEGIN_MARKER) != 1 or text.count(END_MARKER) != 1:
        raise UserError(f"the README must hold exactly one {BEGIN_MARKER} and one {END_MARKER}")
    head, rest = text.split(BEGIN_MARKER)
    if END_MARKER not in rest:
        raise UserError(f"{END_MARKER} comes before {BEGIN_MARKER} in the README")
    _, tail = rest.split(END_MARKER)
    return f"{head}{BEGIN_MARKER}\n{block.strip()}\n{END_MARKER}{tail}"


def check_complete(record: BenchRecord, all_groups: list[str]) -> None:
    """The README table must come from one full, uncrashed run: refuse a partial or failed one."""
    absent = [g for g in all_groups if g not in record.groups]
    if absent:
        raise UserError(f"the latest bench run did not run {', '.join(absent)}: run `make bench` first")
    if record.failed:
        raise UserError(f"the latest bench run crashed in {', '.join(record.failed)}: fix it and rerun `make bench`")


def write_readme(readme: Path, record: BenchRecord) -> bool:
    """Splice the record's block into `readme`; True when the file changed."""
    if not readme.is_file():
        raise UserError(f"{readme}: no such file")
    text = readme.read_text(encoding="utf-8")
    new = splice_readme(text, record_block(record))
    if new == text:
        return False
    readme.write_text(new, encoding="utf-8")
    return True


def check_writable(results_dir: Path) -> None:
    """Refuse to overwrite result files in `results_dir` that another tool made."""
    latest = results_dir / "latest.json"
    if latest.exists():
        try:
            ours = json.loads(latest.read_text(encoding="utf-8")).get("tool") == TOOL
        except (ValueError, AttributeError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise UserError(f"{latest} was not written by {TOOL}; not overwriting it (choose another --results)")
    elif (results_dir / "table.md").exists():
        raise UserError(f"{results_dir / 'table.md'} exists without a bench latest.json; not overwriting it")


def save_record(results_dir: Path, record: BenchRecord) -> None:
    """Write latest.json (the record) and table.md (the README block) into `results_dir`."""
    results_dir.mkdir(parents=True, exist_ok=True)
    check_writable(results_dir)
    (results_dir / "table.md").write_text(record_block(record) + "\n", encoding="utf-8")
    (results_dir / "latest.json").write_text(json.dumps(record.to_dict(), indent=1) + "\n", encoding="utf-8")


def load_record(results_dir: Path) -> BenchRecord:
    """The record of the latest bench run, or a one-line error when there is none."""
    latest = results_dir / "latest.json"
    if not latest.is_file():
        raise UserError(f"{latest}: no bench results yet; run `make bench` first")
    try:
        data = json.loads(latest.read_text(encoding="utf-8"))
        if data.get("tool") != TOOL:
            raise ValueError("not ours")
        return BenchRecord.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{latest}: not a bench record ({error})") from None
