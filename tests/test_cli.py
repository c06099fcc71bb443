import json
import subprocess
import sys

import pytest

from rdu.node.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_estimate_json_keys(capsys):
    code, out, _ = run(capsys, "estimate", "--platform", "sn40l-node", "--model", "llama-2-7b", "--tp", "8",
                       "--batch", "1", "--prompt", "128", "--output", "20", "--json")
    data = json.loads(out)
    assert code == 0
    for key in ("params", "weight_bytes", "ttft_ns", "tpot_ns", "total_ns", "switch_ns", "fits_in_hbm"):
        assert key in data
    assert data["params"] == 6_738_415_616 and data["fits_in_hbm"] is True
    assert data["total_ns"] == data["ttft_ns"] + data["phases"]["decode"]["total_ns"]


def test_estimate_switch_ratio_from_cli(capsys):
    switch = {}
    for platform in ("sn40l-node", "dgx-a100", "dgx-h100"):
        _, out, _ = run(capsys, "estimate", "--platform", platform, "--json")
        switch[platform] = json.loads(out)["switch_ns"]
    assert round(switch["dgx-a100"] / switch["sn40l-node"]) == 31
    assert 15 <= switch["dgx-h100"] / switch["sn40l-node"] <= 16


def test_estimate_table(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "mistral-7b", "--mode", "unfused", "--orchestration", "SO")
    assert code == 0 and "time per output token" in out and "collective" in out


def test_estimate_shows_named_costs_spill_looping_and_algorithms(capsys):
    """The new costs are in --json: they must move with the preset fields that set them."""
    def data(*argv):
        code, out, _ = run(capsys, "estimate", "--model", "llama-3.1-8b", "--prompt", "1024", "--output", "4",
                           "--json", *argv)
        assert code == 0
        return json.loads(out)

    plain, looped = data("--platform", "sn40l-node"), data("--platform", "sn40l-node-looped")
    p = plain["phases"]["decode"]
    assert p["kernel_calls_per_step"] == p["kernels_per_step"] == 34
    assert looped["phases"]["decode"]["kernel_calls_per_step"] == 3 and looped["kernel_looping"] is True
    fill = plain["runtime"]["fill_drain"]
    assert fill["total_ns"] == fill["unit_ns"] * 34 * 4 > 0            # 34 calls x (prefill + 3 decode steps)
    assert plain["runtime"]["run_setup"]["total_ns"] > 0 and plain["runtime"]["step_host"]["total_ns"] > 0
    assert plain["phases"]["prefill"]["spill_bytes"] == 0
    tiny = data("--platform", "sn40l-node", "--set", "socket.sram.capacity_bytes=1024")
    assert tiny["phases"]["prefill"]["spill_bytes"] > 0
    assert tiny["phases"]["prefill"]["hbm_bytes"] > plain["phases"]["prefill"]["hbm_bytes"]
    a100 = {(c["phase"], c["operator"]): c["algorithm"] for c in data("--platform", "dgx-a100")["collectives"]}
    assert a100[("decode", "mlp_all_reduce")] == "one_shot" and a100[("prefill", "mlp_all_reduce")] == "ring"


def test_estimate_table_lists_runtime_costs_and_collectives(capsys):
    code, out, _ = run(capsys, "estimate", "--platform", "sn40l-node-looped", "--model", "llama-3.1-8b")
    assert code == 0
    for text in ("run set-up", "host work per step", "fill/drain per fused kernel call", "SRAM spill",
                 "3 (34 before looping)", "mlp_all_reduce", "ring"):
        assert text in out, text


def test_estimate_answers_well_under_a_second():
    import time

    from rdu.node.studies.estimate import estimate
    from rdu.node.cluster.platform import load_platform
    from rdu.socket_actor.model_spec import load_model

    platform, model = load_platform("sn40l-node"), load_model("llama-3.1-70b")
    estimate(platform, model, 8, 8, 4096, 2000)                       # compile once
    start = time.perf_counter()
    estimate(platform, model, 8, 8, 4096, 2000)
    assert time.perf_counter() - start < 0.3


def test_presets(capsys):
    code, out, _ = run(capsys, "presets", "--json")
    data = json.loads(out)
    platforms = {p["name"]: p for p in data["platforms"]}
    models = {m["name"]: m for m in data["models"]}
    assert platforms["sn40l-node"]["sockets_per_node"] == 8 and models["llama-2-7b"]["layers"] == 32
    assert models["bloom-176b"]["params"] > 170e9


def test_presets_table_fits_80_columns_with_every_model_name_whole():
    from rich.console import Console

    from rdu.node.cli.main import cmd_presets

    console = Console(width=80, record=True, force_terminal=False)
    cmd_presets(type("Args", (), {"json": False})(), console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in ("llama-3.1-405b", "llama-3.1-70b", "mistral-7b", "sn40l-node", "dgx-h100"):
        assert any(line.split("│")[1].strip() == name for line in text.splitlines() if line.count("│") > 2), name


def test_version_names_the_tool(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("rdu 0.")


@pytest.mark.parametrize("argv, message", [
    (["run", "--zipf", "1.2", "--uniform"], "not allowed with argument"),
    (["run", "--json", "--dashboard"], "choose one"),
])
def test_conflicting_flags_are_one_line_errors(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["estimate", "--bogus"], "unrecognized arguments: --bogus"),
    (["estimate", "--platform", "tpu-v9"], "unknown platform 'tpu-v9'"),
    (["estimate", "--model", "gpt-9"], "unknown model 'gpt-9'"),
    (["estimate", "--tp", "3"], "TP 3 does not divide"),
    (["estimate", "--batch", "0"], "--batch: expected a whole number >= 1"),
    (["estimate", "--platform", "dgx-h100", "--mode", "fused"], "cannot run fused kernels"),
    (["estimate", "--set", "socket.hbm.bandwidth_bytes_per_s=-1"], "expected a number > 0"),
    (["estimate", "--set", "nonsense"], "expected FIELD=VALUE"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_user_errors_are_one_line_exit_2(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_console_script_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: sn40l-node\nsocket: {hbm: {capacity_bytes: -1}}\n")
    proc = subprocess.run([sys.executable, "-m", "rdu.node.cli.main", "estimate", "--platform", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "socket.hbm.capacity_bytes" in proc.stderr and "Traceback" not in proc.stderr
