"""Workloads: the requests a run serves, each with its arrival, lengths and expert.

* `synthetic`: Poisson or gamma arrivals, prompt/output lengths from simple distributions,
  experts from a popularity model (uniform or Zipf); all seeded.
* `trace`: the Azure LLM inference trace format (`TIMESTAMP,ContextTokens,GeneratedTokens`);
  the Azure 2023 code trace ships in `scheduler/data/` (CC BY 4.0). Experts come from the
  popularity model, since a trace does not say which model served a request.
* `paper-coe`: the SN40L paper's CoE benchmark: B prompts at once, the router run once at batch B,
  every prompt sent to a distinct expert that is not resident in HBM.

The router is timed as one more model execution per batch; `router_output_tokens` says how many
tokens it generates (1 for a classifier; the paper's benchmark times it like an expert run).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import numpy as np

from interconnect.spec_fields import Fields, UserError

__all__ = ["Request", "Workload", "WorkloadSpec", "build_workload", "read_trace", "default_trace_path",
           "WORKLOAD_KINDS"]

WORKLOAD_KINDS = ("trace", "synthetic", "paper-coe")
_TIMESTAMP = re.compile(r"^(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?$")


def default_trace_path() -> Path:
    """The Azure 2023 code trace shipped with the package."""
    return Path(str(resources.files("scheduler") / "data" / "azure_llm_code_2023.csv"))


@dataclass(frozen=True)
class Request:
    id: int
    arrival_ns: int
    prompt_tokens: int
    output_tokens: int
    expert: int


@dataclass(frozen=True)
class Workload:
    kind: str
    requests: tuple[Request, ...]
    router_output_tokens: int
    description: str


@dataclass(frozen=True)
class Distribution:
    """Token lengths: fixed, uniform [min, max], or lognormal (median, sigma) clipped to [1, max]."""

    kind: str
    a: float
    b: float = 0.0
    maximum: int = 1 << 20

    @classmethod
    def from_raw(cls, raw, fields: Fields, key: str) -> "Distribution":
        if isinstance(raw, int) and not isinstance(raw, bool):
            if raw < 1:
                fields.fail(f"expected a length >= 1, got {raw}", key)
            return cls("fixed", raw)
        sub = fields.sub(key)
        kind = sub.string("kind", choices=("fixed", "uniform", "lognormal"))
        if kind == "fixed":
            sub.check_known({"kind", "value"})
            return cls("fixed", sub.integer("value"))
        if kind == "uniform":
            sub.check_known({"kind", "min", "max"})
            low, high = sub.integer("min"), sub.integer("max")
            if high < low:
                sub.fail(f"max {high} is below min {low}", "max")
            return cls("uniform", low, high)
        sub.check_known({"kind", "median", "sigma", "max"})
        return cls("lognormal", sub.number("median"), sub.number("sigma", minimum=0.0, inclusive=True),
                   sub.integer("max", 1 << 20))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, int(self.a), dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(int(self.a), int(self.b) + 1, size=n)
        values = np.round(self.a * np.exp(self.b * rng.standard_normal(n)))
        return np.clip(values, 1, self.maximum).astype(np.int64)


@dataclass(frozen=True)
class Popularity:
    """Which expert a request goes to: uniform, or Zipf over a seeded ranking of the experts."""

    kind: str = "zipf"
    exponent: float = 1.0

    @classmethod
    def from_fields(cls, fields: Fields) -> "Popularity":
        fields.check_known({"kind", "exponent"})
        kind = fields.string("kind", "zipf", choices=("uniform", "zipf"))
        return cls(kind, fields.number("exponent", 1.0, minimum=0.0, inclusive=True) if kind == "zipf" else 0.0)

    def sample(self, rng: np.random.Generator, n: int, experts: int) -> np.ndarray:
        if self.kind == "uniform" or self.exponent == 0:
            return rng.integers(0, experts, size=n)
        weights = 1.0 / np.arange(1, experts + 1) ** self.exponent
        ranking = rng.permutation(experts)          # which expert is the most popular, second, ...
        return ranking[rng.choice(experts, size=n, p=weights / weights.sum())]


@dataclass(frozen=True)
class WorkloadSpec:
    kind: str
    popularity: Popularity
    trace: str | None = None
    limit: int | None = None
    time_scale: float = 1.0
    requests: int = 0
    arrival: str = "poisson"
    rate_per_s: float = 1.0
    cv: float = 1.0
    prompt: Distribution | None = None
    output: Distribution | None = None
    batch: int = 8
    router_output_tokens: int = 1

    @classmethod
    def from_fields(cls, fields: Fields) -> "WorkloadSpec":
        kind = fields.string("kind", choices=WORKLOAD_KINDS)
        common = {"kind", "popularity", "router_output_tokens"}
        popularity = Popularity.from_fields(fields.sub("popularity")) if fields.has("popularity") else Popularity()
        if kind == "trace":
            fields.check_known(common | {"trace", "limit", "time_scale"})
            return cls(kind, popularity, trace=fields.string("trace", None) if fields.has("trace") else None,
                       limit=fields.integer("limit") if fields.has("limit") else None,
                       time_scale=fields.number("time_scale", 1.0),
                       router_output_tokens=fields.integer("router_output_tokens", 1))
        if kind == "synthetic":
            fields.check_known(common | {"requests", "arrival", "rate_per_s", "cv", "prompt_tokens", "output_tokens"})
            return cls(kind, popularity, requests=fields.integer("requests"),
                       arrival=fields.string("arrival", "poisson", choices=("poisson", "gamma")),
                       rate_per_s=fields.number("rate_per_s", 1.0), cv=fields.number("cv", 1.0),
                       prompt=Distribution.from_raw(fields.data.get("prompt_tokens", 512), fields, "prompt_tokens"),
                       output=Distribution.from_raw(fields.data.get("output_tokens", 64), fields, "output_tokens"),
                       router_output_tokens=fields.integer("router_output_tokens", 1))
        fields.check_known(common | {"batch", "prompt_tokens", "output_tokens"})
        output = fields.integer("output_tokens", 20)
        return cls(kind, popularity, batch=fields.integer("batch", 8),
                   prompt=Distribution("fixed", fields.integer("prompt_tokens", 128)),
                   output=Distribution("fixed", output),
                   router_output_tokens=fields.integer("router_output_tokens", output))

    def to_dict(self) -> dict:
        data = {"kind": self.kind, "router_output_tokens": self.router_output_tokens,
                "popularity": {"kind": self.popularity.kind, "exponent": self.popularity.exponent}}
        if self.kind == "trace":
            data.update(trace=self.trace or str(default_trace_path()), limit=self.limit, time_scale=self.time_scale)
        elif self.kind == "synthetic":
            data.update(requests=self.requests, arrival=self.arrival, rate_per_s=self.rate_per_s, cv=self.cv,
                        prompt_tokens=vars(self.prompt), output_tokens=vars(self.output))
        else:
            data.update(batch=self.batch, prompt_tokens=int(self.prompt.a), output_tokens=int(self.output.a))
        return data


def _parse_timestamp(text: str, where: str) -> int:
    match = _TIMESTAMP.match(text.strip())
    if not match:
        raise UserError(f"{where}: TIMESTAMP: expected 'YYYY-MM-DD HH:MM:SS[.fraction]', got {text!r}")
    try:
        moment = datetime.fromisoformat(f"{match.group(1)} {match.group(2)}").replace(tzinfo=timezone.utc)
    except ValueError:
        raise UserError(f"{where}: TIMESTAMP: not a valid date/time: {text!r}") from None
    fraction = (match.group(3) or "").ljust(9, "0")
    return int(moment.timestamp()) * 1_000_000_000 + int(fraction)


def read_trace(path: str | Path, limit: int | None = None) -> list[tuple[int, int, int]]:
    """(arrival_ns relative to the first request, prompt tokens, output tokens) per trace line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such trace file")
    rows: list[tuple[int, int, int]] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        expected = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
        if header is None or [h.strip() for h in header] != expected:
            raise UserError(f"{path}: line 1: expected the header {','.join(expected)}, got {header!r}")
        for line_number, row in enumerate(reader, start=2):
            if limit is not None and len(rows) >= limit:
                break
            if not row or all(not cell.strip() for cell in row):
                continue
            where = f"{path}: line {line_number}"
            if len(row) != 3:
                raise UserError(f"{where}: expected 3 comma-separated fields, got {len(row)}")
            arrival = _parse_timestamp(row[0], where)
            lengths = []
            for name, cell in zip(expected[1:], row[1:]):
                try:
                    value = int(cell)
                except ValueError:
                    raise UserError(f"{where}: {name}: expected a whole number, got {cell!r}") from None
                if value < 1:
                    raise UserError(f"{where}: {name}: expected a number of tokens >= 1, got {value}")
                lengths.append(value)
            if rows and arrival < rows[-1][0]:
                raise UserError(f"{where}: TIMESTAMP goes back in time ({row[0]})")
            rows.append((arrival, lengths[0], lengths[1]))
    if not rows:
        raise UserError(f"{path}: no requests in the trace")
    first = rows[0][0]
    return [(arrival - first, prompt, output) for arrival, prompt, output in rows]


def build_workload(spec: WorkloadSpec, experts: int, seed: int) -> Workload:
    """The requests of a workload, deterministic in (spec, experts, seed)."""
    rng = np.random.default_rng(seed)
    if spec.kind == "trace":
        path = spec.trace or default_trace_path()
        rows = read_trace(path, spec.limit)
        arrivals = np.array([r[0] for r in rows], dtype=np.float64) * spec.time_scale
        choice = spec.popularity.sample(rng, len(rows), experts)
        requests = tuple(Request(i, int(arrivals[i]), rows[i][1], rows[i][2], int(choice[i]))
                         for i in range(len(rows)))
        return Workload("trace", requests, spec.router_output_tokens, f"trace {Path(path).name} ({len(rows)} requests)")
    if spec.kind == "synthetic":
        n = spec.requests
        mean_gap_s = 1.0 / spec.rate_per_s
        if spec.arrival == "poisson":
            gaps = rng.exponential(mean_gap_s, size=n)
        else:  # gamma with the requested coefficient of variation
            shape = 1.0 / spec.cv ** 2
            gaps = rng.gamma(shape, mean_gap_s / shape, size=n)
        arrivals = np.concatenate([[0.0], np.cumsum(gaps[:-1])]) * 1e9
        prompts, outputs = spec.prompt.sample(rng, n), spec.output.sample(rng, n)
        choice = spec.popularity.sample(rng, n, experts)
        requests = tuple(Request(i, int(arrivals[i]), int(prompts[i]), int(outputs[i]), int(choice[i]))
                         for i in range(n))
        return Workload("synthetic", requests, spec.router_output_tokens,
                        f"synthetic {spec.arrival} at {spec.rate_per_s:g} req/s ({n} requests)")
    if spec.batch > experts:
        raise UserError(f"workload.batch: paper-coe sends each of the {spec.batch} prompts to a distinct expert, "
                        f"but there are only {experts} experts")
    chosen = rng.choice(experts, size=spec.batch, replace=False)
    requests = tuple(Request(i, 0, int(spec.prompt.a), int(spec.output.a), int(chosen[i])) for i in range(spec.batch))
    return Workload("paper-coe", requests, spec.router_output_tokens,
                    f"paper CoE benchmark: batch {spec.batch}, {int(spec.prompt.a)} in / {int(spec.output.a)} out, "
                    f"distinct cold experts")
