import json
import subprocess
import sys

import pytest

from node.cli import main


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


def test_presets(capsys):
    code, out, _ = run(capsys, "presets", "--json")
    data = json.loads(out)
    assert "sn40l-node" in data["platforms"] and "bloom-176b" in data["models"]


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
    proc = subprocess.run([sys.executable, "-m", "node.cli", "estimate", "--platform", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "socket.hbm.capacity_bytes" in proc.stderr and "Traceback" not in proc.stderr
