"""The Python API example of docs/python-api.md runs as written and returns plain data."""

import json
import re
from pathlib import Path

import pytest

from rdu.node import api

DOC = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"


def test_the_documented_example_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("switch: SN40L") and "runs/notebook-1" in printed[2]
    before, after = (float(x) for x in re.findall(r"([\d.]+) ms", printed[1]))
    assert after < before  # faster HBM: a faster decode step
    assert (tmp_path / "runs" / "notebook-1" / "summary.json").is_file()


def test_results_are_plain_data(tmp_path):
    result = api.run(out=str(tmp_path / "r"), backend="inline", experts=10, workload={"kind": "trace", "limit": 30})
    assert json.loads(json.dumps(result)) == result
    rows = api.requests(result["out"])
    assert len(rows) == 30 and isinstance(rows[0]["e2e_ns"], int)
    assert result["summary"]["requests_completed"] == 30


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(api.UserError, match="unknown platform"):
        api.estimate(platform="tpu-v9")
    with pytest.raises(api.UserError, match="no results.csv"):
        api.sweep_results(tmp_path)
