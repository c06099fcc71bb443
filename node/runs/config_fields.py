"""Every field of a run config, in one declarative table that `node.run_config` parses with, and the
generator of its reference, docs/run-config.md:

    python -m rdu.node.runs.config_fields --write docs/run-config.md   # regenerate
    python -m rdu.node.runs.config_fields --check docs/run-config.md   # exit 1 if it is stale

The workload sections are defined next to the workload parser (`scheduler.workloads`); the top
level, `scheduler` and `execution` sections here. Allowed values come from the same constants the
parser checks against (policies, dispatch rules, modes, backends), so the reference cannot drift.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rdu.scheduler.config_table import ConfigField, Section
from rdu.scheduler.faults import FAULT_KINDS
from rdu.scheduler.policies import POLICIES
from rdu.scheduler.serving import DISPATCH, MODEL_SELECTION, PLACEMENT, PREEMPTION, SCHEDULER_KINDS
from rdu.scheduler.workloads import WORKLOAD_SECTIONS
from rdu.socket_actor.spec import MODES, ORCHESTRATIONS

__all__ = ["TOP", "SCHEDULER", "EXECUTION", "SECTIONS", "BACKENDS", "render_reference", "main"]

BACKENDS = ("ray", "inline")

TOP = Section("", "Top level", fields=(
    ConfigField("name", "path-component", "the run's name; names its directory under `runs/`",
                default_text="`<platform>-n<nodes>-tp<tp>-e<experts>-<workload>-<policy>-seed<seed>-<hash>`",
                example="my-run"),
    ConfigField("platform", "text", "the machine: a platform preset or a platform YAML file", "sn40l-node",
                allowed_text="a preset (`rdu presets`) or a YAML file", example="dgx-h100"),
    ConfigField("platform_overrides", "mapping", "platform fields to override, dotted (like `--set`)",
                default_text="`{}`", allowed_text="dotted platform field: value",
                example={"links.p2p.latency_ns": 500}),
    ConfigField("nodes", "integer-or-auto", "emulated nodes (`auto`: as many as one TP group needs)", 1,
                unit="nodes", maximum=4096, example=2),
    ConfigField("tp", "integer", "tensor-parallel degree: sockets per group (divides the sockets of the nodes)",
                8, unit="sockets", example=4),
    ConfigField("model", "text", "the expert model", "llama-2-7b",
                allowed_text="a preset (`rdu presets`) or a `config.json` path", example="mistral-7b"),
    ConfigField("router_model", "text", "the router model, resident in HBM", default_text="= `model`",
                allowed_text="as `model`", example="mistral-7b"),
    ConfigField("experts", "integer", "experts in the Composition of Experts", 150, unit="experts", maximum=100_000,
                example=20),
    ConfigField("workload", "section", "the requests served (see `workload`)", default_text="`{kind: trace}`"),
    ConfigField("scheduler", "section", "residency policy, batching, dispatch (see `scheduler`)",
                default_text="the defaults of `scheduler`"),
    ConfigField("execution", "section", "how kernels are built and launched (see `execution`)",
                default_text="the platform's"),
    ConfigField("faults", "fault-list", "failures injected at deterministic points of virtual time",
                default_text="`[]`", allowed_text=f"`KIND:TARGET@WHEN`, KIND one of {', '.join(FAULT_KINDS)}",
                example=["kill-socket:node0/socket3@request=2"]),
    ConfigField("seed", "integer", "seed of everything random (arrivals, lengths, experts, faults)", 0,
                minimum=0, example=7),
    ConfigField("backend", "choice", "`ray`: socket actors on Ray; `inline`: the same core in-process", "ray",
                choices=BACKENDS, example="inline"),
    ConfigField("address", "text", "the Ray to use (not part of the run's identity)", "local",
                allowed_text="`local` (start one here), `auto` or `host:port`", example="auto"),
    ConfigField("out", "path", "the run directory (not part of the run's identity)", default_text="`runs/<name>`",
                example="{tmp}/elsewhere"),
    ConfigField("functional", "boolean", "carry real payloads alongside the timing (numerics checked)", False,
                example=True),
))

SCHEDULER = Section("scheduler", "Scheduler", note=(
    "`kind: continuous` is iteration-level batching (vLLM v1 style): per step of a group, one model's running "
    "decodes, then chunks of admitted prompts, then FCFS admissions whose whole prompt fits in the KV blocks "
    "left in HBM; the youngest sequence is preempted (recomputed) when blocks run out; switches of experts run "
    "in the background. `kind: static` is the paper's cycle (router on a batch of `max_batch`, then each expert's "
    "requests as one static batch). `auto`: static for `paper-coe`, continuous otherwise. "
    "With one expert the continuous engine runs no router (there is nothing to route)."), fields=(
    ConfigField("kind", "choice", "the scheduler: `static` (the paper's cycle) or `continuous` (iteration-level)",
                "auto", choices=SCHEDULER_KINDS, example="static"),
    ConfigField("policy", "choice", "which expert a DDR -> HBM switch evicts (`belady`: the offline oracle; "
                "`prefetch`: copies start once the router has decided)", "lru", choices=tuple(POLICIES),
                example="prefetch"),
    ConfigField("max_batch", "integer", "static: requests a free group takes at once", 8, unit="requests",
                example=4),
    ConfigField("max_num_batched_tokens", "integer", "continuous: token budget of one step (decodes + prefill "
                "chunks)", 8192, unit="tokens", example=2048),
    ConfigField("max_num_seqs", "integer", "continuous: sequences running at once in a group (<= the token "
                "budget)", 256, unit="sequences", example=64),
    ConfigField("block_size", "integer", "continuous: tokens per KV block", 16, unit="tokens", example=32),
    ConfigField("preemption", "choice", "continuous: a preempted sequence's KV is dropped and its tokens "
                "prefilled again (`recompute`), or copied to the capacity tier and back (`swap`)", "recompute",
                choices=PREEMPTION, example="swap"),
    ConfigField("model_selection", "choice", "continuous: which model a group steps next when something "
                "changed", "round-robin", choices=MODEL_SELECTION, example="oldest-first"),
    ConfigField("placement", "choice", "continuous: `spread` (round-robin DDR, nothing preloaded) or "
                "`popularity` (hot experts replicated in DDR and pinned in HBM, up to half of it)", "spread",
                choices=PLACEMENT, example="popularity"),
    ConfigField("slo", "mapping", "continuous: latency objectives for goodput: `ttft_ms`, `tpot_ms`",
                default_text="unset (no goodput)", allowed_text="`{ttft_ms: number, tpot_ms: number}`",
                example={"ttft_ms": 500.0, "tpot_ms": 50.0}),
    ConfigField("dispatch", "choice", "which tensor-parallel group a request goes to", "expert-affinity",
                choices=DISPATCH, example="least-loaded"),
    ConfigField("dispatch_window_ms", "number", "how often each node reports its load to the cluster's ingress, "
                "which routes requests on the last report (the nodes advance in windows of this length)", 1000.0,
                unit="ms", minimum=0.001, inclusive=True, maximum=3.6e6, example=50.0),
    ConfigField("pinned_experts", "integer-list", "experts kept resident in HBM, never evicted", (),
                example=[1, 2]),
))

EXECUTION = Section("execution", "Execution", fields=(
    ConfigField("mode", "choice", "`fused`: a decoder layer is one streaming kernel; `unfused`: one kernel "
                "per operator", choices=MODES, default_text="the platform's", example="unfused"),
    ConfigField("orchestration", "choice", "kernel launches: `SO` = host software launches each kernel, "
                "`HO` = on-chip hardware sequences them", choices=ORCHESTRATIONS, default_text="the platform's",
                example="SO"),
))

SECTIONS: tuple[Section, ...] = (TOP, SCHEDULER, EXECUTION, *WORKLOAD_SECTIONS)

_HEADER = """# Run-config reference

Generated by `python -m rdu.node.runs.config_fields --write docs/run-config.md` from the tables the parser
(`node/run_config.py`, `scheduler/workloads.py`) reads every field through; do not edit by hand.

A run config is a YAML file (`rdu run my-study.yaml`); `rdu run` flags override its fields, and
every field left out takes the default below. Dotted names show where a field sits: `scheduler.policy`
is `policy:` inside `scheduler:`. Unknown fields are refused with the list of the known ones. What
ran, with every default filled in, is written to `config.resolved.yaml` in the run directory.

The default `name` joins the run's identity with the first 8 hex digits of the SHA-256 of the
resolved config (`node.run_config.config_hash`: canonical JSON, without `name`, `out`, `address`
and the platform's source notes; a trace file counts by its content), so two runs that differ in
any field land in different directories.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(section: Section, variant: str | None) -> list[str]:
    """One markdown table: the fields of `section` that apply to `variant`."""
    rows = ["| field | type | default | unit | allowed | meaning |", "|---|---|---|---|---|---|"]
    for field in section.applicable(variant):
        rows.append("| " + " | ".join(_cell(c) for c in (
            f"`{section.dotted(field.key)}`", field.type_text(), field.default_doc(), field.unit,
            field.allowed_doc(), field.meaning)) + " |")
    return rows


def render_reference(sections: tuple[Section, ...] = SECTIONS) -> str:
    """The whole reference as markdown: a table per section, per variant where it has them."""
    lines = [_HEADER]
    for section in sections:
        where = f" (`{section.path}`)" if section.path else ""
        lines += [f"## {section.title}{where}", ""]
        if section.note:
            lines += [section.note, ""]
        for variant in section.variants or (None,):
            if variant is not None:
                lines += [f"### `{section.dotted(section.selector)}: {variant}`", ""]
            lines += _table(section, variant) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the reference, check it, or print it (exit 1 when --check finds it stale)."""
    parser = argparse.ArgumentParser(prog="python -m rdu.node.runs.config_fields", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="PATH", help="write the reference to PATH")
    group.add_argument("--check", metavar="PATH", help="exit 1 if PATH is not what --write would produce")
    args = parser.parse_args(argv)
    text = render_reference()
    if args.write:
        path = Path(args.write)
        if path.exists() and not path.read_text(encoding="utf-8", errors="replace").startswith(_HEADER.split("\n")[0]):
            print(f"{path}: exists and is not a generated run-config reference; not overwriting it", file=sys.stderr)
            return 2
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return 0
    if args.check:
        path = Path(args.check)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            print(f"{path}: stale; regenerate with python -m rdu.node.runs.config_fields --write {path}", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
