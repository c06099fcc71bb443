"""The Python API, for notebooks and scripts: the same work as the `rdu` commands, plain data out.

    from rdu.node import api
    api.estimate(platform="dgx-h100", model="llama-2-7b", tp=8)["tpot_ns"]
    result = api.run(out="runs/nb-1", backend="inline", experts=20, workload={"kind": "trace", "limit": 200})
    result["summary"]["ttft_ns"]["p99"]
    api.requests(result["out"])[0]["e2e_ns"]
    api.sweep_results("sweeps/scale-up")          # after `rdu sweep experiments/scale-up.yaml`

Every function returns dicts and lists of numbers and strings (times in ns, sizes in bytes), and
raises `UserError` (interconnect.spec_fields) with a one-line message on bad input.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from rdu.base import UserError

__all__ = ["estimate", "run", "requests", "sweep_results", "UserError"]


def estimate(platform: str = "sn40l-node", model: str = "llama-2-7b", tp: int = 8, batch: int = 1,
             prompt_tokens: int = 128, output_tokens: int = 20, mode: str | None = None,
             orchestration: str | None = None, platform_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`rdu estimate --json`: one generation on one tensor-parallel group, analytically."""
    from rdu.node.studies.estimate import estimate as _estimate
    from rdu.node.cluster.platform import load_platform
    from rdu.socket_actor.model_spec import load_model

    return _estimate(load_platform(platform, platform_overrides or {}), load_model(model), tp, batch, prompt_tokens,
                     output_tokens, mode, orchestration).data


def run(config: str | None = None, *, force: bool = False, perfetto: bool = False, **fields: Any) -> dict[str, Any]:
    """`rdu run --json`: serve a workload and write the run directory. `fields` are run-config
    fields (nested dicts for sections, as in the YAML file) over the optional YAML `config`."""
    from rdu.node.runs.run import execute_run
    from rdu.node.runs.run_config import resolve_run_config

    output = execute_run(resolve_run_config(config, fields), force=force, trace=perfetto)
    return {"summary": output.result.summary, "run": output.run_info, "out": str(output.out_dir)}


def requests(run_dir: str | Path) -> list[dict[str, Any]]:
    """A run's `requests.csv` as one dict per request, whole numbers as ints."""
    return _rows(Path(run_dir) / "requests.csv", f"{run_dir}: no requests.csv (not a run directory)")


def sweep_results(study_dir: str | Path) -> list[dict[str, Any]]:
    """A finished study's `results.csv` as one dict per point, in the study's point order."""
    return _rows(Path(study_dir) / "results.csv",
                 f"{study_dir}: no results.csv (run `rdu sweep STUDY.yaml --out {study_dir}` first)")


def _rows(path: Path, missing: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(missing)
    with path.open(newline="", encoding="utf-8") as handle:
        return [{key: _number(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            continue
    return text
