import re

import numpy as np
import pytest

from rdu.base import Fields, UserError
from rdu.scheduler.workloads import WorkloadSpec, build_workload, default_trace_path, read_trace


def spec(**fields):
    return WorkloadSpec.from_fields(Fields(fields, "test.yaml", "workload"))


def test_shipped_trace():
    rows = read_trace(default_trace_path())
    assert len(rows) == 8819
    assert rows[0] == (0, 4808, 10)
    assert rows[-1][1:] == (549, 173)
    assert all(b[0] >= a[0] for a, b in zip(rows, rows[1:]))
    assert rows[1][0] == 52_000_000  # 18:17:04.0319600 - 18:17:03.9799600


def test_trace_limit_and_time_scale():
    full = build_workload(spec(kind="trace", limit=100), experts=150, seed=1)
    fast = build_workload(spec(kind="trace", limit=100, time_scale=0.5), experts=150, seed=1)
    assert len(full.requests) == 100
    assert [r.arrival_ns // 2 for r in full.requests] == [r.arrival_ns for r in fast.requests]
    assert [r.expert for r in full.requests] == [r.expert for r in fast.requests]


@pytest.mark.parametrize("line, message", [
    ("2023-11-16 18:17:04.0,12", "line 3: expected 3 comma-separated fields, got 2"),
    ("2023-11-16 18:17:04.0,12,x", "line 3: GeneratedTokens: expected a whole number, got 'x'"),
    ("2023-11-16 18:17:04.0,0,5", "line 3: ContextTokens: expected a number of tokens >= 1, got 0"),
    ("yesterday,12,5", "line 3: TIMESTAMP: expected 'YYYY-MM-DD HH:MM:SS[.fraction]'"),
    ("2023-11-16 18:17:02.0,12,5", "line 3: TIMESTAMP goes back in time"),
    ("2023-13-16 18:17:04.0,12,5", "line 3: TIMESTAMP: not a valid date/time"),
])
def test_bad_trace_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "trace.csv"
    path.write_text(f"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.5,100,10\n{line}\n")
    with pytest.raises(UserError, match=re.escape(f"trace.csv: {message}")):
        read_trace(path)


def test_bad_header(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text("time,prompt,output\n")
    with pytest.raises(UserError, match="line 1: expected the header TIMESTAMP,ContextTokens,GeneratedTokens"):
        read_trace(path)


def test_synthetic_is_seeded_and_follows_its_distributions():
    s = spec(kind="synthetic", requests=2000, rate_per_s=4, prompt_tokens={"kind": "uniform", "min": 10, "max": 20},
             output_tokens=7, popularity={"kind": "zipf", "exponent": 1.2})
    a, b = build_workload(s, 50, seed=3), build_workload(s, 50, seed=3)
    assert a == b and a != build_workload(s, 50, seed=4)
    prompts = np.array([r.prompt_tokens for r in a.requests])
    assert prompts.min() >= 10 and prompts.max() <= 20
    assert {r.output_tokens for r in a.requests} == {7}
    gaps = np.diff([r.arrival_ns for r in a.requests]) / 1e9
    assert gaps.mean() == pytest.approx(0.25, rel=0.1)
    counts = np.bincount([r.expert for r in a.requests], minlength=50)
    assert counts.max() > 5 * np.median(counts)  # Zipf: a few experts take most requests


def test_gamma_arrivals_are_burstier():
    poisson = build_workload(spec(kind="synthetic", requests=3000, rate_per_s=10), 10, 0)
    gamma = build_workload(spec(kind="synthetic", requests=3000, rate_per_s=10, arrival="gamma", cv=4), 10, 0)
    cv = lambda w: np.std(np.diff([r.arrival_ns for r in w.requests])) / np.mean(np.diff([r.arrival_ns for r in w.requests]))  # noqa: E731
    assert cv(gamma) > 2 * cv(poisson)


def test_paper_coe_distinct_experts():
    w = build_workload(spec(kind="paper-coe", batch=8, prompt_tokens=128, output_tokens=20), 150, 0)
    assert len({r.expert for r in w.requests}) == 8 and {r.arrival_ns for r in w.requests} == {0}
    assert w.router_output_tokens == 1  # the router is a classification run: it picks an expert
    with pytest.raises(UserError, match="only 4 experts"):
        build_workload(spec(kind="paper-coe", batch=8), 4, 0)


@pytest.mark.parametrize("fields, message", [
    ({"kind": "stream"}, "workload.kind: expected one of trace, synthetic, paper-coe"),
    ({"kind": "trace", "limit": 0}, "workload.limit: expected a whole number >= 1"),
    ({"kind": "synthetic", "requests": 5, "rate_per_s": -1}, "workload.rate_per_s: expected a number > 0"),
    ({"kind": "synthetic", "requests": 5, "prompt_tokens": {"kind": "uniform", "min": 9, "max": 3}},
     "workload.prompt_tokens.max: max 3 is below min 9"),
    ({"kind": "trace", "bogus": 1}, "workload.bogus: unknown field"),
])
def test_bad_workload_fields(fields, message):
    with pytest.raises(UserError, match=message):
        spec(**fields)
