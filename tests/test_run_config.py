"""The run-config field tables against the parser that reads through them, the generated
reference (docs/run-config.md), and unique, validated run names."""

import json
import re
import shutil
from pathlib import Path

import pytest

from rdu.base import UserError
from rdu.node.cli.main import main as rdu
from rdu.node.runs.config_fields import EXECUTION, SCHEDULER, SECTIONS, TOP, main as reference_main, render_reference
from rdu.node.runs.run_config import DEFAULTS, config_hash, resolve_run_config
from rdu.scheduler.config_table import REQUIRED
from rdu.scheduler.workloads import LENGTH, POPULARITY, WORKLOAD, default_trace_path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "run-config.md"
DERIVED = {"platform_resolved", "platform_sources"}  # outputs of resolving, not fields


def resolve(**tree):
    return resolve_run_config(None, {"backend": "inline", **tree})


@pytest.fixture()
def trace(tmp_path):
    path = tmp_path / "trace.csv"
    shutil.copyfile(default_trace_path(), path)
    return path


def _example(field, tmp_path, trace):
    value = field.example
    if isinstance(value, str):
        value = value.replace("{trace}", str(trace)).replace("{tmp}", str(tmp_path))
    return value


def _required(section, variant, tmp_path, trace):
    return {f.key: _example(f, tmp_path, trace) for f in section.applicable(variant)
            if f.default is REQUIRED and f.key != section.selector}


def _cases():
    """(section, variant, field) for every field of every table that holds a value."""
    for section in SECTIONS:
        for variant in section.variants or (None,):
            for field in section.applicable(variant):
                if field.type != "section" and field.key != section.selector:  # the variant itself
                    yield pytest.param(section, variant, field, id=f"{section.dotted(field.key)}[{variant}]")


def _place(section, variant, fields, tmp_path, trace):
    """A run-config tree with `fields` inside `section` (the given variant); the resolved value
    of a field is then at resolved[location][key]."""
    if section is TOP:
        return fields, lambda resolved: resolved
    if section in (SCHEDULER, EXECUTION):
        return {section.path: fields}, lambda resolved: resolved[section.path]
    if section is WORKLOAD:
        body = {"kind": variant, **_required(WORKLOAD, variant, tmp_path, trace), **fields}
        return {"workload": body}, lambda resolved: resolved["workload"]
    if section is POPULARITY:
        return {"workload": {"kind": "trace", "popularity": fields}}, lambda r: r["workload"]["popularity"]
    assert section is LENGTH
    body = {"kind": variant, **_required(LENGTH, variant, tmp_path, trace), **fields}
    return ({"workload": {"kind": "synthetic", "requests": 5, "prompt_tokens": body}},
            lambda resolved: resolved["workload"]["prompt_tokens"])


def _as_resolved(field, value):
    """How the resolved config writes a value given in the config file."""
    if field.type == "length":
        return value if isinstance(value, dict) else {"kind": "fixed", "value": value}
    if field.key == "faults":
        return list(value)
    if field.key == "popularity":
        return {"kind": "uniform", "exponent": 0.0}
    return value


def _shown(section, key):
    """The dotted name an error uses (the length table is placed at workload.prompt_tokens)."""
    return section.dotted(key).replace("*_tokens", "prompt_tokens")


# -- the generated reference -------------------------------------------------------------------

def test_the_reference_is_what_the_generator_writes(tmp_path):
    assert DOC.read_text(encoding="utf-8") == render_reference(), \
        "docs/run-config.md is stale: python -m rdu.node.runs.config_fields --write docs/run-config.md"
    assert reference_main(["--check", str(DOC)]) == 0
    stale = tmp_path / "stale.md"
    stale.write_text(render_reference().replace("| `tp` |", "| `tensor_parallel` |"))
    assert reference_main(["--check", str(stale)]) == 1


def test_the_reference_lists_every_field_of_every_section():
    text = DOC.read_text(encoding="utf-8")
    for section in SECTIONS:
        for field in section.fields:
            assert f"| `{section.dotted(field.key)}` |" in text
    assert "`lru`, `lfu`, `belady`, `prefetch`" in text and "`SO` = host software" in text


def test_the_generator_does_not_overwrite_a_file_it_did_not_make(tmp_path, capsys):
    mine = tmp_path / "notes.md"
    mine.write_text("# my notes\n")
    assert reference_main(["--write", str(mine)]) == 2
    assert mine.read_text() == "# my notes\n" and "not overwriting" in capsys.readouterr().err
    fresh = tmp_path / "docs" / "run-config.md"
    assert reference_main(["--write", str(fresh)]) == 0 and reference_main(["--write", str(fresh)]) == 0
    assert fresh.read_text() == render_reference()


# -- table <-> parser ----------------------------------------------------------------------------

@pytest.mark.parametrize("section, variant, field", list(_cases()))
def test_the_parser_uses_every_field_of_the_table(section, variant, field, tmp_path, trace):
    """Each field the table defines is accepted, and its value reaches the resolved config."""
    value = _example(field, tmp_path, trace)
    assert value is not None and value != field.default, "the example must differ from the default"
    tree, where = _place(section, variant, {field.key: value}, tmp_path, trace)
    resolved = resolve(**tree).resolved
    assert where(resolved)[field.key] == _as_resolved(field, value)


@pytest.mark.parametrize("section, variant, field", [c for c in _cases() if c.values[2].default is not REQUIRED
                                                      and c.values[2].default is not None
                                                      and not c.values[2].default_text])
def test_the_documented_default_is_what_the_parser_fills_in(section, variant, field, tmp_path, trace):
    tree, where = _place(section, variant, {}, tmp_path, trace)
    value = where(resolve_run_config(None, tree).resolved)[field.key]
    assert value == (list(field.default) if isinstance(field.default, tuple) else _as_resolved(field, field.default))


@pytest.mark.parametrize("section", [s for s in SECTIONS if s.selector], ids=lambda s: s.path)
def test_the_selector_picks_the_variant(section, tmp_path, trace):
    """Each variant the table lists is accepted as such; the documented default variant is the parser's."""
    for variant in section.variants:
        tree, where = _place(section, variant, {}, tmp_path, trace)
        assert where(resolve(**tree).resolved)[section.selector] == variant
    selector = section.field(section.selector)
    if selector.default is not REQUIRED:
        assert resolve().resolved[section.path][section.selector] == selector.default


@pytest.mark.parametrize("section", SECTIONS, ids=lambda s: s.path or "top")
def test_the_parser_refuses_exactly_what_the_table_does_not_define(section, tmp_path, trace):
    """The parser's list of known fields (in its error) is the table's, variant by variant."""
    for variant in section.variants or (None,):
        tree, _ = _place(section, variant, {"bogus_field": 1}, tmp_path, trace)
        with pytest.raises(UserError, match="unknown field") as error:
            resolve(**tree)
        listed = str(error.value).split("expected one of: ")[1].split(", ")
        assert f"{_shown(section, 'bogus_field')}: unknown field" in str(error.value)
        assert set(listed) == section.keys(variant)


@pytest.mark.parametrize("kind", WORKLOAD.variants)
def test_the_resolved_config_holds_only_fields_of_the_table(kind, tmp_path, trace):
    """What the parser writes to config.resolved.yaml is the table, field for field."""
    tree, _ = _place(WORKLOAD, kind, {}, tmp_path, trace)
    resolved = resolve(**tree).resolved
    assert set(resolved) - DERIVED == TOP.keys()
    assert set(resolved["workload"]) == WORKLOAD.keys(kind)
    assert set(resolved["workload"]["popularity"]) == POPULARITY.keys()
    assert set(resolved["scheduler"]) == SCHEDULER.keys() and set(resolved["execution"]) == EXECUTION.keys()
    if kind == "synthetic":
        for key in ("prompt_tokens", "output_tokens"):
            assert set(resolved["workload"][key]) == LENGTH.keys("fixed")


@pytest.mark.parametrize("section, variant, field", [c for c in _cases() if c.values[2].type in
                                                      ("integer", "number", "choice", "boolean", "integer-or-auto")])
def test_the_parser_validates_every_field_by_its_type(section, variant, field, tmp_path, trace):
    tree, _ = _place(section, variant, {field.key: "nonsense"}, tmp_path, trace)
    with pytest.raises(UserError, match=re.escape(_shown(section, field.key) + ": expected")):
        resolve(**tree)


def test_defaults_come_from_the_table():
    assert DEFAULTS["tp"] == TOP.field("tp").default == 8
    assert DEFAULTS["scheduler"] == {"kind": "auto", "policy": "lru", "max_batch": 8, "dispatch": "expert-affinity",
                                     "dispatch_window_ms": 1000.0, "pinned_experts": [], "max_num_batched_tokens": 8192, "max_num_seqs": 256,
                                     "block_size": 16, "preemption": "recompute", "model_selection": "round-robin",
                                     "placement": "spread"}


def test_a_resolved_synthetic_workload_reads_back(tmp_path):
    workload = {"kind": "synthetic", "requests": 5, "prompt_tokens": {"kind": "lognormal", "median": 50,
                                                                        "sigma": 0.3}, "output_tokens": 4}
    first = resolve(workload=workload).resolved["workload"]
    again = resolve(workload={k: v for k, v in first.items()}).resolved["workload"]
    assert again == first and first["prompt_tokens"] == {"kind": "lognormal", "median": 50.0, "sigma": 0.3,
                                                         "max": 1 << 20}


# -- names and the content hash -----------------------------------------------------------------

def test_the_default_name_says_what_ran():
    config = resolve()
    assert re.fullmatch(r"sn40l-node-n1-tp8-e150-trace-lru-seed0-[0-9a-f]{8}", config.name), config.name
    assert config.out == f"runs/{config.name}" and config.name.endswith(config_hash(config.resolved))
    other = resolve(platform="dgx-h100", experts=100, nodes=2, tp=4, seed=3, scheduler={"policy": "prefetch"},
                    workload={"kind": "synthetic", "requests": 9})
    assert other.name.startswith("dgx-h100-n2-tp4-e100-synthetic-prefetch-seed3-")


@pytest.mark.parametrize("change", [
    {"nodes": 2}, {"experts": 149}, {"workload": {"limit": 100}}, {"faults": ["kill-socket:node0/socket3@request=5"]},
    {"platform_overrides": {"links.p2p.latency_ns": 500}}, {"workload": {"time_scale": 0.5}},
    {"scheduler": {"max_batch": 4}}, {"execution": {"mode": "unfused"}},
], ids=lambda c: json.dumps(c))
def test_runs_that_differ_in_one_field_get_different_names(change):
    base = resolve()
    assert resolve(**change).name != base.name and resolve(**change).name == resolve(**change).name


def test_where_a_run_goes_is_not_part_of_its_identity():
    base = resolve()
    moved = resolve(name="x", out="elsewhere/x", address="auto")
    assert config_hash(moved.resolved) == config_hash(base.resolved)
    assert moved.name == "x" and moved.out == "elsewhere/x" and resolve(name="x").out == "runs/x"


def test_a_trace_counts_by_its_content(trace):
    shipped = resolve()
    copied = resolve(workload={"trace": str(trace)})
    assert copied.resolved["workload"]["trace"] != shipped.resolved["workload"]["trace"]
    assert config_hash(copied.resolved) == config_hash(shipped.resolved)
    lines = trace.read_text().splitlines(keepends=True)
    trace.write_text("".join(lines[:-1]))
    assert config_hash(resolve(workload={"trace": str(trace)}).resolved) != config_hash(shipped.resolved)


@pytest.mark.parametrize("tree, message", [
    ({"name": ""}, "command line: name: must not be empty"),
    ({"name": "  "}, "command line: name: must not be empty"),
    ({"name": "a/b"}, "command line: name: expected one path component"),
    ({"name": "a\\b"}, "command line: name: expected one path component"),
    ({"name": ".."}, "command line: name: expected one path component"),
    ({"name": "."}, "command line: name: expected one path component"),
    ({"name": "a\nb"}, "command line: name: expected one path component"),
    ({"name": 5}, "command line: name: expected text"),
    ({"out": ""}, "command line: out: must not be empty"),
])
def test_bad_names_and_outs_are_refused(tree, message):
    with pytest.raises(UserError, match=re.escape(message)):
        resolve(**tree)


def test_a_bad_name_on_the_command_line_is_one_line_exit_2(tmp_path, capsys):
    code = rdu(["run", "--backend", "inline", "--limit", "5", "--name", "../up", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "name: expected one path component" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_two_runs_that_differ_only_in_nodes_land_in_different_directories(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["run", "--backend", "inline", "--limit", "20", "--experts", "20", "--tp", "4", "--json"]
    assert rdu(common + ["--nodes", "1"]) == 0
    first = json.loads(capsys.readouterr().out)["out"]
    assert rdu(common + ["--nodes", "2"]) == 0
    second = json.loads(capsys.readouterr().out)["out"]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith("."))
    assert first != second and len(runs) == 2 and all((tmp_path / "runs" / r / "summary.json").is_file() for r in runs)
    assert [r.split("-")[2] for r in runs] == ["n1", "n2"]


def test_every_run_flag_sets_a_field_of_the_table():
    """`rdu run` flags write into the run config; each must land on a field the reference documents."""
    from rdu.node.cli.main import _RUN_FLAGS

    sections = {s.path: s for s in SECTIONS}
    for flag, dotted in _RUN_FLAGS.items():
        path, _, key = dotted.rpartition(".")
        section = sections[path]
        assert any(f.key == key for f in section.fields), f"--{flag} sets {dotted}, which the table does not define"


@pytest.mark.parametrize("section", ["workload", "scheduler", "execution", "platform_overrides"])
def test_an_empty_section_in_a_file_means_its_defaults(section, tmp_path):
    """`workload:` with nothing under it (YAML null) is the section's defaults, not a crash (the
    fuzzer found it)."""
    path = tmp_path / "run.yaml"
    path.write_text(f"backend: inline\n{section}:\n", encoding="utf-8")
    assert resolve_run_config(str(path), {}).resolved == resolve_run_config(None, {"backend": "inline"}).resolved
