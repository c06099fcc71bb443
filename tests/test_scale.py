"""Heavy tests (minutes, GBs): `make test-scale`. Not part of the default suite."""

import pytest

from rdu.node.studies.check_tp import check_tp
from rdu.node.runs.run import execute_run
from rdu.node.runs.run_config import resolve_run_config

pytestmark = [pytest.mark.scale, pytest.mark.ray]


def test_whole_trace_identical_on_ray_and_inline(ray_local, tmp_path):
    outputs = {b: execute_run(resolve_run_config(None, {"backend": b, "out": str(tmp_path / b)}))
               for b in ("inline", "ray")}
    assert outputs["ray"].result.summary["requests_completed"] == 8819
    assert (outputs["ray"].out_dir / "summary.json").read_bytes() == \
        (outputs["inline"].out_dir / "summary.json").read_bytes()


def test_128_nodes_inline(tmp_path):
    config = resolve_run_config(None, {
        "backend": "inline", "nodes": 128, "out": str(tmp_path / "big"),
        "workload": {"kind": "synthetic", "requests": 32000, "rate_per_s": 192,
                     "prompt_tokens": {"kind": "lognormal", "median": 1024, "sigma": 0.8, "max": 4096},
                     "output_tokens": {"kind": "lognormal", "median": 64, "sigma": 0.8, "max": 512}}})
    summary = execute_run(config).result.summary
    assert summary["requests_completed"] == 32000 and len(summary["groups"]) == 128


def test_check_tp_sixteen_sockets(ray_local):
    result = check_tp(2, 8, tokens=8, prompt_tokens=8, batch=4)
    assert result["max_abs_err"] <= 1e-4 and result["tokens_match"] and result["tp"] == 16
