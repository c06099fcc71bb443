"""Workloads: the requests a run serves, each with its arrival, lengths and expert.

* `synthetic`: Poisson or gamma arrivals, prompt/output lengths from simple distributions,
  experts from a popularity model (uniform or Zipf); all seeded.
* `trace`: the Azure LLM inference trace format (`TIMESTAMP,ContextTokens,GeneratedTokens`);
  the Azure 2023 code trace ships in `scheduler/data/` (CC BY 4.0). Experts come from the
  popularity model, since a trace does not say which model served a request.
* `paper-coe`: the SN40L paper's CoE benchmark: B prompts at once, the router run once at batch B,
  every prompt sent to a distinct expert that is not resident in HBM.

The router is timed as one more model execution per batch; `router_output_tokens` says how many
tokens it generates: 1 by default for every workload, a classification run (prefill + the token
that names the expert), which is what the paper's router does.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import numpy as np

from rdu.base import Fields, UserError, read_user_text
from rdu.scheduler.config_table import REQUIRED, ConfigField, Section

__all__ = ["Request", "Workload", "WorkloadSpec", "build_workload", "read_trace", "default_trace_path",
           "WORKLOAD_KINDS", "WORKLOAD_SECTIONS"]

WORKLOAD_KINDS = ("trace", "synthetic", "paper-coe")
_TIMESTAMP = re.compile(r"^(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?$")


def default_trace_path() -> Path:
    """The Azure 2023 code trace shipped with the package."""
    return Path(str(resources.files("rdu.scheduler") / "data" / "azure_llm_code_2023.csv"))


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


_TRACE, _SYNTHETIC, _PAPER = WORKLOAD_KINDS
LENGTH_KINDS = ("fixed", "uniform", "lognormal")
POPULARITY_KINDS = ("uniform", "zipf")

WORKLOAD = Section("workload", "Workload", selector="kind", variants=WORKLOAD_KINDS, fields=(
    ConfigField("kind", "choice", "what generates the requests", "trace", choices=WORKLOAD_KINDS, example="trace"),
    ConfigField("popularity", "section", "which expert each request goes to (see `workload.popularity`)",
                default_text="Zipf, exponent 1", example={"kind": "uniform"}),
    ConfigField("router_output_tokens", "integer", "tokens the router generates per batch (1 = a classifier: "
                "the router picks an expert)", 1, unit="tokens", example=3),
    ConfigField("trace", "text", "CSV file in the Azure LLM inference trace format "
                "(`TIMESTAMP,ContextTokens,GeneratedTokens`)", kinds=(_TRACE,),
                default_text="the shipped Azure 2023 code trace", allowed_text="an existing file", example="{trace}"),
    ConfigField("limit", "integer", "serve only the first N requests of the trace", unit="requests",
                kinds=(_TRACE,), default_text="unset (all)", example=7),
    ConfigField("time_scale", "number", "multiplies the trace's arrival times (0.5 = twice the rate)", 1.0,
                kinds=(_TRACE,), example=0.5),
    ConfigField("requests", "integer", "number of requests generated", REQUIRED, unit="requests",
                kinds=(_SYNTHETIC,), example=9),
    ConfigField("arrival", "choice", "arrival process", "poisson", choices=("poisson", "gamma"),
                kinds=(_SYNTHETIC,), example="gamma"),
    ConfigField("rate_per_s", "number", "mean arrival rate", 1.0, unit="requests/s", kinds=(_SYNTHETIC,),
                example=4.0),
    ConfigField("cv", "number", "coefficient of variation of the gaps between arrivals (gamma arrivals only)",
                1.0, kinds=(_SYNTHETIC,), example=2.0),
    ConfigField("prompt_tokens", "length", "prompt length per request: a number, or a distribution "
                "(see `workload.*_tokens`)", 512, unit="tokens", kinds=(_SYNTHETIC,),
                example={"kind": "uniform", "min": 10, "max": 20}),
    ConfigField("output_tokens", "length", "output length per request: a number, or a distribution "
                "(see `workload.*_tokens`)", 64, unit="tokens", kinds=(_SYNTHETIC,), example=7),
    ConfigField("batch", "integer", "prompts sent at once, each to a distinct cold expert", 8, unit="prompts",
                kinds=(_PAPER,), example=4),
    ConfigField("prompt_tokens", "integer", "prompt length of every prompt", 128, unit="tokens",
                kinds=(_PAPER,), example=64),
    ConfigField("output_tokens", "integer", "output length of every prompt", 20, unit="tokens",
                kinds=(_PAPER,), example=5),
))

POPULARITY = Section("workload.popularity", "Expert popularity", fields=(
    ConfigField("kind", "choice", "uniform over the experts, or Zipf over a seeded ranking of them", "zipf",
                choices=POPULARITY_KINDS, example="uniform"),
    ConfigField("exponent", "number", "Zipf exponent (0 = uniform); ignored when kind is uniform", 1.0,
                minimum=0.0, inclusive=True, example=1.2),
))

LENGTH = Section("workload.*_tokens", "Length distributions (`prompt_tokens`, `output_tokens` of a synthetic "
                 "workload)", selector="kind", variants=LENGTH_KINDS,
                 note="A bare number N is the same as `{kind: fixed, value: N}`.", fields=(
    ConfigField("kind", "choice", "fixed, uniform over [min, max], or lognormal clipped to [1, max]", REQUIRED,
                choices=LENGTH_KINDS, example="fixed"),
    ConfigField("value", "integer", "the length", REQUIRED, unit="tokens", kinds=("fixed",), example=11),
    ConfigField("min", "integer", "shortest length", REQUIRED, unit="tokens", kinds=("uniform",), example=10),
    ConfigField("max", "integer", "longest length (>= min)", REQUIRED, unit="tokens", kinds=("uniform",),
                example=30),
    ConfigField("median", "number", "median length", REQUIRED, unit="tokens", kinds=("lognormal",), example=100.0),
    ConfigField("sigma", "number", "standard deviation of the length's logarithm", REQUIRED, minimum=0.0,
                inclusive=True, kinds=("lognormal",), example=0.5),
    ConfigField("max", "integer", "longest length (longer samples are clipped)", 1 << 20, unit="tokens",
                kinds=("lognormal",), example=400),
))

WORKLOAD_SECTIONS = (WORKLOAD, POPULARITY, LENGTH)


@dataclass(frozen=True)
class Distribution:
    """Token lengths: fixed, uniform [min, max], or lognormal (median, sigma) clipped to [1, max]."""

    kind: str
    a: float
    b: float = 0.0
    maximum: int = 1 << 20

    @classmethod
    def from_raw(cls, raw, fields: Fields, key: str) -> "Distribution":
        """A bare length or a distribution mapping, read through the `LENGTH` table."""
        if isinstance(raw, int) and not isinstance(raw, bool):
            if raw < 1:
                fields.fail(f"expected a length >= 1, got {raw}", key)
            return cls("fixed", raw)
        sub = fields.sub(key)
        kind = LENGTH.read(sub, "kind")
        LENGTH.check(sub, kind)
        value = {f.key: f.read(sub) for f in LENGTH.applicable(kind) if f.key != "kind"}
        if kind == "fixed":
            return cls("fixed", value["value"])
        if kind == "uniform":
            if value["max"] < value["min"]:
                sub.fail(f"max {value['max']} is below min {value['min']}", "max")
            return cls("uniform", value["min"], value["max"])
        return cls("lognormal", value["median"], value["sigma"], value["max"])

    def to_dict(self) -> dict:
        """The distribution in the run-config's own field names (so a resolved config reads back)."""
        if self.kind == "fixed":
            return {"kind": "fixed", "value": int(self.a)}
        if self.kind == "uniform":
            return {"kind": "uniform", "min": int(self.a), "max": int(self.b)}
        return {"kind": "lognormal", "median": self.a, "sigma": self.b, "max": self.maximum}

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

    kind: str = POPULARITY.field("kind").default
    exponent: float = POPULARITY.field("exponent").default

    @classmethod
    def from_fields(cls, fields: Fields) -> "Popularity":
        POPULARITY.check(fields)
        kind = POPULARITY.read(fields, "kind")
        return cls(kind, POPULARITY.read(fields, "exponent") if kind == "zipf" else 0.0)

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
        """The workload section, every field read through the `WORKLOAD` table of its kind."""
        kind = WORKLOAD.read(fields, "kind")
        WORKLOAD.check(fields, kind)
        popularity = Popularity.from_fields(fields.sub("popularity")) if fields.has("popularity") else Popularity()

        def read(key: str):
            return WORKLOAD.read(fields, key, kind)

        if kind == _TRACE:
            return cls(kind, popularity, trace=read("trace"), limit=read("limit"), time_scale=read("time_scale"),
                       router_output_tokens=read("router_output_tokens"))
        if kind == _SYNTHETIC:
            lengths = {key: Distribution.from_raw(fields.data.get(key, WORKLOAD.field(key, kind).default), fields, key)
                       for key in ("prompt_tokens", "output_tokens")}
            return cls(kind, popularity, requests=read("requests"), arrival=read("arrival"),
                       rate_per_s=read("rate_per_s"), cv=read("cv"), prompt=lengths["prompt_tokens"],
                       output=lengths["output_tokens"], router_output_tokens=read("router_output_tokens"))
        return cls(kind, popularity, batch=read("batch"), prompt=Distribution("fixed", read("prompt_tokens")),
                   output=Distribution("fixed", read("output_tokens")),
                   router_output_tokens=read("router_output_tokens"))

    def to_dict(self) -> dict:
        data = {"kind": self.kind, "router_output_tokens": self.router_output_tokens,
                "popularity": {"kind": self.popularity.kind, "exponent": self.popularity.exponent}}
        if self.kind == _TRACE:
            data.update(trace=self.trace or str(default_trace_path()), limit=self.limit, time_scale=self.time_scale)
        elif self.kind == _SYNTHETIC:
            data.update(requests=self.requests, arrival=self.arrival, rate_per_s=self.rate_per_s, cv=self.cv,
                        prompt_tokens=self.prompt.to_dict(), output_tokens=self.output.to_dict())
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


def _rows(reader, path: Path):
    """(line number, row) of a CSV reader; a malformed line (a field over the size limit, a stray
    quote) is a one-line error naming it."""
    line_number = 1
    while True:
        line_number += 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise UserError(f"{path}: line {line_number}: not a CSV line ({exc})") from None
        yield line_number, row


def read_trace(path: str | Path, limit: int | None = None) -> list[tuple[int, int, int]]:
    """(arrival_ns relative to the first request, prompt tokens, output tokens) per trace line."""
    path = Path(path)
    rows: list[tuple[int, int, int]] = []
    with io.StringIO(read_user_text(path, "trace file"), newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        expected = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
        if header is None or [h.strip() for h in header] != expected:
            raise UserError(f"{path}: line 1: expected the header {','.join(expected)}, got {header!r}")
        for line_number, row in _rows(reader, path):
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
                text = cell.strip()
                if not (text.isascii() and text.lstrip("-").isdigit()):
                    raise UserError(f"{where}: {name}: expected a whole number, got {cell!r}")
                value = int(text)
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


MAX_ARRIVAL_NS = float(1 << 61)   # leaves room for the serving after the last arrival within int64 ns


def build_workload(spec: WorkloadSpec, experts: int, seed: int) -> Workload:
    """The requests of a workload, deterministic in (spec, experts, seed)."""
    rng = np.random.default_rng(seed)
    if spec.kind == "trace":
        path = spec.trace or default_trace_path()
        rows = read_trace(path, spec.limit)
        arrivals = np.array([r[0] for r in rows], dtype=np.float64) * spec.time_scale
        if arrivals[-1] >= MAX_ARRIVAL_NS:
            raise UserError(f"{path}: the trace spans {arrivals[-1] / 1e9 / 86400 / 365.25:,.0f} years after "
                            f"time_scale {spec.time_scale:g}; the emulator's clock holds "
                            f"{MAX_ARRIVAL_NS / 1e9 / 86400 / 365.25:,.0f}")
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
        with np.errstate(over="ignore"):  # an absurd rate overflows to inf: refused just below
            arrivals = np.concatenate([[0.0], np.cumsum(gaps[:-1])]) * 1e9
        if not arrivals[-1] < MAX_ARRIVAL_NS:
            raise UserError(f"workload.rate_per_s: {n:,} requests at {spec.rate_per_s:g} per second span "
                            f"{arrivals[-1] / 1e9 / 86400 / 365.25:,.0f} years; the emulator's clock holds "
                            f"{MAX_ARRIVAL_NS / 1e9 / 86400 / 365.25:,.0f}")
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
