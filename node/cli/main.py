"""The `rdu` command line: one entry point, one module per subcommand's work.

User mistakes (a bad flag, preset, file or field) print one line naming the problem on stderr
and exit with code 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from rdu.base import UserError

__all__ = ["main", "build_parser"]

EXIT_USER_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line (no usage dump) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _nodes_arg(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def _parse_set(items: Sequence[str] | None) -> dict[str, object]:
    """`--set socket.hbm.bandwidth_bytes_per_s=2e12` -> {dotted: parsed YAML scalar}."""
    from rdu.yaml_io import parse_yaml

    overrides: dict[str, object] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected FIELD=VALUE, e.g. socket.hbm.bandwidth_bytes_per_s=2e12")
        overrides[key.strip()] = parse_yaml(value, f"--set {key}")
    return overrides


# -- subcommands -------------------------------------------------------------------------------

def _preset_rows() -> tuple[list[dict], list[dict]]:
    """Platform and model presets as plain data (what `rdu presets --json` prints)."""
    from rdu.node.cluster.platform import load_platform, platform_presets
    from rdu.socket_actor.model_spec import load_model, model_presets

    platforms = []
    for name in platform_presets():
        spec = load_platform(name).spec
        platforms.append({"name": name, "sockets_per_node": spec.sockets_per_node,
                          "hbm_bytes_per_socket": spec.socket.hbm.capacity_bytes,
                          "ddr_bytes_per_node": spec.capacity_tier_bytes,
                          "peak_flops_per_s_per_socket": spec.socket.peak_flops_per_s, "description": spec.description})
    models = []
    for name in model_presets():
        m = load_model(name)
        models.append({"name": name, "family": m.family, "params": m.params(), "weight_bytes": m.weight_bytes(),
                       "layers": m.num_layers, "hidden": m.hidden_size, "heads": m.num_heads,
                       "kv_heads": m.num_kv_heads})
    return platforms, models


def cmd_presets(args: argparse.Namespace, console: Console) -> int:
    platforms, models = _preset_rows()
    if args.json:
        print(json.dumps({"platforms": platforms, "models": models}, sort_keys=True))
        return 0
    table = Table(title="platforms: --platform NAME (or a YAML file with base: NAME)", title_justify="left")
    for column in ("name", "sockets", "HBM/socket", "DDR/node", "TFLOPS/socket"):
        table.add_column(column, no_wrap=True, justify="left" if column == "name" else "right")
    for p in platforms:
        table.add_row(p["name"], str(p["sockets_per_node"]), f"{p['hbm_bytes_per_socket'] / 1e9:.0f} GB",
                      f"{p['ddr_bytes_per_node'] / 1e12:.1f} TB", f"{p['peak_flops_per_s_per_socket'] / 1e12:.0f}")
    console.print(table)
    for p in platforms:
        console.print(f"  [bold]{p['name']}[/bold]: {p['description']}", highlight=False)
    table = Table(title="models: --model NAME (or a path to a Hugging Face config.json)", title_justify="left")
    for column in ("name", "params", "weights", "layers", "hidden", "heads/kv"):
        table.add_column(column, no_wrap=True, justify="left" if column == "name" else "right")
    for m in models:
        table.add_row(m["name"], f"{m['params'] / 1e9:.2f} B", f"{m['weight_bytes'] / 1e9:.1f} GB",
                      str(m["layers"]), str(m["hidden"]), f"{m['heads']}/{m['kv_heads']}")
    console.print(table)
    return 0


def cmd_estimate(args: argparse.Namespace, console: Console) -> int:
    from rdu.node.studies.estimate import estimate
    from rdu.node.cluster.platform import load_platform
    from rdu.socket_actor.model_spec import load_model

    platform = load_platform(args.platform, _parse_set(args.set))
    result = estimate(platform, load_model(args.model), args.tp, args.batch, args.prompt, args.output,
                      args.mode, args.orchestration)
    if args.json:
        print(json.dumps(result.data, sort_keys=True))
    else:
        result.render(console)
    return 0


def cmd_check_tp(args: argparse.Namespace, console: Console) -> int:
    from rdu.node.studies.check_tp import check_tp

    result = check_tp(args.nodes, args.sockets_per_node, args.tokens, args.prompt, args.seed, args.platform,
                      args.address, args.batch, args.fault)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        table = Table(title=f"functional TP decode over gRPC: {result['nodes']} node(s) x "
                            f"{result['sockets_per_node']} socket(s)")
        table.add_column("quantity")
        table.add_column("value", justify="right")
        for key in ("tp", "tokens", "batch", "tokens_match", "max_abs_err", "grpc_bytes", "messages_lost",
                    "virtual_ns", "wall_s", "tokens_per_s", "ray_nodes_used"):
            table.add_row(key, str(result[key]))
        console.print(table)
    ok = result["max_abs_err"] <= 1e-4 and result["tokens_match"]
    return 0 if ok else 1


def cmd_validate_cluster(args: argparse.Namespace, console: Console) -> int:
    from rdu.node.studies.validate_cluster import validate_cluster

    report = validate_cluster(args.config)
    if args.json:
        print(json.dumps(report.to_dict(), sort_keys=True))
    else:
        for line in report.errors:
            print(f"error: {line}", file=sys.stderr)
        for line in report.warnings:
            print(f"warning: {line}", file=sys.stderr)
        if report.ok:
            print(f"ok: {args.config}: {report.summary()}")
    return 0 if report.ok else EXIT_USER_ERROR


_RUN_FLAGS = {
    # flag attribute -> dotted run-config field
    "name": "name", "platform": "platform", "nodes": "nodes", "tp": "tp", "model": "model",
    "router_model": "router_model", "experts": "experts", "workload": "workload.kind", "trace": "workload.trace",
    "limit": "workload.limit", "time_scale": "workload.time_scale", "requests": "workload.requests",
    "rate": "workload.rate_per_s", "batch": "workload.batch", "prompt": "workload.prompt_tokens",
    "output": "workload.output_tokens", "router_output_tokens": "workload.router_output_tokens",
    "zipf": "workload.popularity.exponent", "policy": "scheduler.policy", "max_batch": "scheduler.max_batch",
    "scheduler": "scheduler.kind",
    "dispatch": "scheduler.dispatch", "mode": "execution.mode", "orchestration": "execution.orchestration",
    "seed": "seed", "backend": "backend", "out": "out", "address": "address",
}


def _run_overrides(args: argparse.Namespace) -> dict:
    overrides: dict = {}
    for attribute, dotted in _RUN_FLAGS.items():
        value = getattr(args, attribute, None)
        if value is None:
            continue
        node = overrides
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if args.zipf is not None:
        overrides["workload"].setdefault("popularity", {})["kind"] = "zipf"
    if args.uniform:
        overrides.setdefault("workload", {})["popularity"] = {"kind": "uniform"}
    if args.set:
        overrides["platform_overrides"] = _parse_set(args.set)
    if args.fault:
        overrides["faults"] = list(args.fault)
    if args.functional:
        overrides["functional"] = True
    return overrides


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from rdu.node.runs.run import execute_run
    from rdu.node.runs.run_config import resolve_run_config
    from rdu.node.observe.run_progress import RunProgress
    from rdu.node.observe.summary_view import render_summary

    if args.json and args.dashboard:
        raise UserError("--json and --dashboard both want stdout: choose one (the dashboard draws on it, "
                        "--json prints one JSON document)")
    config = resolve_run_config(args.config, _run_overrides(args))
    options = {"force": args.force, "trace": args.perfetto, "command": args.command_line}
    if args.dashboard:
        from rdu.node.observe.dashboard import LiveDashboard

        with LiveDashboard(console) as dashboard:
            output = execute_run(config, [dashboard], **options)
    else:
        with RunProgress() as progress:
            output = execute_run(config, [progress], **options)
    if args.json:
        print(json.dumps({"summary": output.result.summary, "run": output.run_info, "out": str(output.out_dir)},
                         sort_keys=True))
    else:
        render_summary(console, output)
    return 0


# -- parser ------------------------------------------------------------------------------------

_ORCHESTRATION_HELP = ("who launches the kernels: SO = software orchestration (the host launches each kernel), "
                       "HO = hardware orchestration (the chip launches them itself); default: the platform's")

def _add_presets_command(sub: argparse._SubParsersAction) -> None:
    """`rdu presets`: list the platform and model presets."""
    p = sub.add_parser("presets", help="list platform and model presets")
    p.add_argument("--json", action="store_true", help="print names as one JSON object")
    p.set_defaults(handler=cmd_presets)


def _add_estimate_command(sub: argparse._SubParsersAction) -> None:
    """`rdu estimate`: the cost model's time for one generation on one TP group."""
    p = sub.add_parser("estimate", help="time one generation of a model on one tensor-parallel group")
    p.add_argument("--platform", default="sn40l-node", help="platform preset or YAML file (default sn40l-node)")
    p.add_argument("--model", default="llama-2-7b", help="model preset or config.json path (default llama-2-7b)")
    p.add_argument("--tp", type=_positive_int, default=8, help="tensor-parallel degree (default 8)")
    p.add_argument("--batch", type=_positive_int, default=1, help="sequences in the batch (default 1)")
    p.add_argument("--prompt", type=_positive_int, default=128, help="prompt tokens per sequence (default 128)")
    p.add_argument("--output", type=_positive_int, default=20, help="output tokens per sequence (default 20)")
    p.add_argument("--mode", choices=("fused", "unfused"), help="execution mode (default: the platform's)")
    p.add_argument("--orchestration", choices=("SO", "HO"), help=_ORCHESTRATION_HELP)
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a platform field, e.g. socket.hbm.bandwidth_bytes_per_s=2e12 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object (ns, bytes)")
    p.set_defaults(handler=cmd_estimate)


def _add_check_tp_command(sub: argparse._SubParsersAction) -> None:
    """`rdu check-tp`: the functional model run tensor-parallel over gRPC."""
    p = sub.add_parser("check-tp", help="run the functional model tensor-parallel over gRPC and check it")
    p.add_argument("--nodes", type=_positive_int, default=1, help="emulated nodes (default 1)")
    p.add_argument("--sockets-per-node", type=_positive_int, default=8, help="socket actors per node (default 8)")
    p.add_argument("--tokens", type=_positive_int, default=16, help="tokens to generate per sequence (default 16)")
    p.add_argument("--batch", type=_positive_int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--prompt", type=_positive_int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and prompt (default 0)")
    p.add_argument("--platform", default="sn40l-node", help="platform whose links time the run (default sn40l-node)")
    p.add_argument("--address", default="local",
                   help="Ray to use: local (start one here, default), auto or host:port (join a cluster)")
    p.add_argument("--fault", action="append", metavar="SPEC",
                   help="lose messages on a link, e.g. drop-link:node0/socket1-node0/socket2@p=0.05 (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_check_tp)


def _add_run_command(sub: argparse._SubParsersAction) -> None:
    """`rdu run`: a whole serving run; its flags override the run config's fields."""
    p = sub.add_parser("run", help="serve a Composition of Experts on an emulated cluster")
    p.add_argument("config", nargs="?", help="run config YAML (flags override its fields)")
    p.add_argument("--name", help="run name (default: derived from the config)")
    p.add_argument("--platform", help="platform preset or YAML (default sn40l-node)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a platform field (repeatable)")
    p.add_argument("--nodes", type=_nodes_arg, help="emulated nodes, or 'auto': as many as one TP group needs "
                                                   "(default 1)")
    p.add_argument("--tp", type=_positive_int, help="tensor-parallel degree of each group (default 8)")
    p.add_argument("--model", help="expert model preset or config.json (default llama-2-7b)")
    p.add_argument("--router-model", help="router model (default: the expert model)")
    p.add_argument("--experts", type=_positive_int, help="number of experts (default 150)")
    p.add_argument("--workload", choices=("trace", "synthetic", "paper-coe"), help="workload kind (default trace)")
    p.add_argument("--trace", help="Azure-format trace CSV (default: the shipped Azure 2023 code trace)")
    p.add_argument("--limit", type=_positive_int, help="trace: first N requests only")
    p.add_argument("--time-scale", type=float, help="trace: multiply inter-arrival gaps (0.5 = twice as fast)")
    p.add_argument("--requests", type=_positive_int, help="synthetic: number of requests")
    p.add_argument("--rate", type=float, help="synthetic: arrivals per second")
    p.add_argument("--batch", type=_positive_int, help="paper-coe: prompts served at once")
    p.add_argument("--prompt", type=_positive_int, help="synthetic / paper-coe: prompt tokens")
    p.add_argument("--output", type=_positive_int, help="synthetic / paper-coe: output tokens")
    p.add_argument("--router-output-tokens", type=_positive_int, help="tokens the router generates per prompt")
    popularity = p.add_mutually_exclusive_group()
    popularity.add_argument("--zipf", type=float, help="expert popularity: Zipf exponent (default 1.0)")
    popularity.add_argument("--uniform", action="store_true", help="expert popularity: uniform")
    p.add_argument("--scheduler", choices=("auto", "static", "continuous"),
                   help="continuous = iteration-level batching with paged KV (traces, synthetic loads); static = "
                        "the paper's benchmark cycle (paper-coe); auto (default) picks by workload")
    p.add_argument("--policy", help="residency policy: lru, lfu, belady, prefetch (default lru)")
    p.add_argument("--max-batch", type=_positive_int, help="requests per router batch (default 8)")
    p.add_argument("--dispatch", help="expert-affinity or least-loaded (default expert-affinity)")
    p.add_argument("--mode", choices=("fused", "unfused"), help="execution mode (default: the platform's)")
    p.add_argument("--orchestration", choices=("SO", "HO"), help=_ORCHESTRATION_HELP)
    p.add_argument("--seed", type=int, help="seed of the workload (default 0)")
    p.add_argument("--backend", choices=("ray", "inline"), help="ray socket actors (default) or in-process")
    p.add_argument("--address", help="Ray: local (default), auto or host:port")
    p.add_argument("--out", help="run directory (default runs/<name>); an existing run there is refused unless --force")
    p.add_argument("--force", action="store_true",
                   help="replace an existing run directory at --out (only one this tool wrote; nothing else is "
                        "ever replaced)")
    p.add_argument("--perfetto", action="store_true",
                   help="also write trace.json for Perfetto (large for big runs; `rdu trace RUN_DIR` makes it later)")
    p.add_argument("--fault", action="append", metavar="SPEC",
                   help="inject a fault, e.g. kill-socket:node0/socket3@request=500, kill-node:node1@virtual_ms=2000, "
                        "drop-link:node0/socket1-node0/socket2@p=0.01 (repeatable)")
    p.add_argument("--functional", action="store_true",
                   help="carry functional payloads: switches copy real (small) weights, every batch really runs "
                        "tensor-parallel and is checked against a reference (small runs: slow)")
    p.add_argument("--dashboard", action="store_true", help="show a live terminal dashboard while the run goes")
    p.add_argument("--json", action="store_true", help="print summary and run info as one JSON object")
    p.set_defaults(handler=cmd_run)


def _add_validate_cluster_command(sub: argparse._SubParsersAction) -> None:
    """`rdu validate-cluster`: check a Ray cluster-launcher YAML offline."""
    p = sub.add_parser("validate-cluster", help="check a Ray cluster-launcher YAML offline (Ray's schema + ours)")
    p.add_argument("config", help="cluster YAML, e.g. cluster.yaml")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_validate_cluster)


def build_parser() -> OneLineParser:
    """The `rdu` parser: one helper (or module) per subcommand, registered in the order --help lists them."""
    parser = OneLineParser(prog="rdu", description="Emulator of multi-socket AI dataflow accelerator nodes "
                                                   "(SambaNova SN40L-style) serving a Composition of Experts.")
    from rdu.node.cli import calibrate as cli_calibrate
    from rdu.node.cli import observe as cli_observe
    from rdu.node.cli import studies as cli_studies
    from rdu.node.runs.provenance import version_line

    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    sub.required = True
    _add_presets_command(sub)
    _add_estimate_command(sub)
    _add_check_tp_command(sub)
    _add_run_command(sub)
    cli_observe.add_commands(sub)
    cli_studies.add_commands(sub)
    cli_calibrate.add_commands(sub)
    _add_validate_cluster_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from rdu.node.runs.signals import exit_code_for_stop, install_stop_handlers
    from rdu.node.runs.std_streams import protect_std_streams

    if argv is None:  # the console script: this process is ours to set up
        protect_std_streams()
        install_stop_handlers()
    console = Console(file=sys.stdout)  # bound now: Ray's session later points sys.stdout at its log
    try:
        args = build_parser().parse_args(argv)
        args.command_line = ["rdu", *(sys.argv[1:] if argv is None else argv)]
        return args.handler(args, console)
    except UserError as exc:
        print(f"rdu: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        message = str(exc) if str(exc) not in ("", "SIGINT", "SIGTERM") else "interrupted"
        print(f"rdu: {message}", file=sys.stderr)
        return exit_code_for_stop()
    except BrokenPipeError:
        _silence_stdout()  # the reader went away (`rdu ... | head`): not an error
        return 0
    except RuntimeError as exc:
        from rdu.node.runs.run import RunStopped

        if not isinstance(exc, RunStopped):
            raise
        print(f"rdu: {exc}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
