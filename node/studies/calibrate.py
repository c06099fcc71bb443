"""`rdu calibrate`: fit the preset values marked `fitted` to declared public observations.

A preset value marked ``fitted: {bounds, observations}`` is a parameter; the observations it
names (ids in `node/cluster/presets/observations.yaml`, each citing the calibration sheet) are what it is
fitted to. Parameters that share observations are fitted together (a *block*); blocks are
independent. Each block is one `scipy.optimize.least_squares` problem over the parameters scaled
to their bounds, with relative residuals (0 inside a range). Then leave-one-out: every fitted
observation is left out in turn, its block refitted without it, and the observation predicted.
Observations no parameter names are predictions, reported the same way.

A value inherited by another preset (the DGX H100 shares the A100's launch cost) is one parameter
for every preset built on the one that declares it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from rdu.base import UserError
from rdu.node.studies import reproduce
from rdu.node.cluster.platform import load_platform, platform_presets
from rdu.yaml_io import parse_yaml
from rdu.socket_actor.model_spec import load_model
from rdu.socket_actor.operators import shard_weight_bytes

__all__ = ["Observation", "Parameter", "Calibration", "load_observations", "declared_parameters", "evaluate",
           "calibrate", "write_calibration", "rel_error"]


@dataclass(frozen=True)
class Observation:
    """One public number: a point `value` or a `range`, and how to measure it on the emulator."""

    id: str
    kind: str
    value: float | None
    low: float | None
    high: float | None
    fields: dict
    source: str

    @property
    def target(self) -> str:
        return f"{self.value:g}" if self.value is not None else f"{self.low:g}-{self.high:g}"


@dataclass(frozen=True)
class Parameter:
    """A fitted preset value: the preset declaring it, its dotted path, bounds, observations."""

    origin: str
    path: str
    low: float
    high: float
    preset_value: float
    observations: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.origin}:{self.path}"


@dataclass
class Calibration:
    """Fitted values, in-sample and leave-one-out errors (relative; 0 inside a range)."""

    parameters: list[Parameter]
    fitted: dict[str, float]
    values: dict[str, float]                       # observation id -> emulator value with the fit
    errors: dict[str, float]                       # observation id -> in-sample error
    loo: dict[str, float] = field(default_factory=dict)   # observation id -> leave-one-out error
    loo_values: dict[str, float] = field(default_factory=dict)
    observations: list[Observation] = field(default_factory=list)

    def role(self, obs_id: str) -> str:
        return "fitted" if any(obs_id in p.observations for p in self.parameters) else "predicted"

    def to_dict(self) -> dict:
        return {
            "parameters": [{"preset": p.origin, "path": p.path, "value": self.fitted[p.key], "bounds": [p.low, p.high],
                            "preset_value": p.preset_value, "observations": list(p.observations)}
                           for p in self.parameters],
            "observations": [{"id": o.id, "target": o.value if o.value is not None else [o.low, o.high],
                              "emulator": self.values.get(o.id), "role": self.role(o.id),
                              "error": self.errors.get(o.id), "loo_error": self.loo.get(o.id),
                              "loo_emulator": self.loo_values.get(o.id), "source": o.source}
                             for o in self.observations],
        }


# -- declarations --------------------------------------------------------------------------------

def load_observations(path: str | None = None) -> list[Observation]:
    """The declared observations (default: the packaged `presets/observations.yaml`)."""
    if path is None:
        text = (resources.files("rdu.node.cluster") / "presets" / "observations.yaml").read_text(encoding="utf-8")
        origin = "node/cluster/presets/observations.yaml"
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise UserError(f"cannot read observations {path}: {exc.strerror}") from exc
        origin = path
    raw = parse_yaml(text, origin)
    if not isinstance(raw, dict) or not isinstance(raw.get("observations"), list):
        raise UserError(f"{origin}: expected a mapping with a list 'observations'")
    out = []
    for i, entry in enumerate(raw["observations"]):
        if not isinstance(entry, dict) or "id" not in entry or "kind" not in entry or "source" not in entry:
            raise UserError(f"{origin}: observations[{i}]: needs id, kind and source")
        rng = entry.get("range")
        if (rng is None) == ("value" not in entry):
            raise UserError(f"{origin}: {entry['id']}: give exactly one of value and range")
        low, high = (float(rng[0]), float(rng[1])) if rng is not None else (None, None)
        rest = {k: v for k, v in entry.items() if k not in ("id", "kind", "value", "range", "source", "unit")}
        out.append(Observation(str(entry["id"]), str(entry["kind"]),
                               None if rng is not None else float(entry["value"]), low, high, rest,
                               str(entry["source"])))
    ids = [o.id for o in out]
    if len(set(ids)) != len(ids):
        raise UserError(f"{origin}: observation ids are not unique")
    return out


def declared_parameters(platforms: list[str] | None = None) -> list[Parameter]:
    """Every value a preset marks fitted, once per declaring preset."""
    params: dict[str, Parameter] = {}
    for name in platforms or platform_presets():
        platform = load_platform(name)
        for path, mark in platform.fitted.items():
            key = f"{mark.origin}:{path}"
            if key not in params:
                value = platform.values
                for part in path.split("."):
                    value = value[part]
                params[key] = Parameter(mark.origin, path, mark.low, mark.high, float(value), mark.observations)
    return sorted(params.values(), key=lambda p: p.key)


def _overrides(params: list[Parameter], values: dict[str, float]) -> dict[str, dict]:
    """Per platform, the dotted fields to set: a parameter reaches every preset that inherits it."""
    out: dict[str, dict] = {}
    for name in platform_presets():
        marks = load_platform(name).fitted
        for p in params:
            mark = marks.get(p.path)
            if mark is not None and mark.origin == p.origin:
                out.setdefault(name, {})[p.path] = values[p.key]
    return out


# -- measuring an observation on the emulator --------------------------------------------------------

def _cost(obs: Observation, platform: str | None = None):
    from rdu.node.cluster.layout import nodes_for_tp, tp_groups
    from rdu.interconnect.topology import Topology

    spec = reproduce.load_platform_for(platform or obs.fields["platform"]).spec
    tp = int(obs.fields.get("tp", 8))
    topology = Topology(spec.links, nodes_for_tp(spec, tp), spec.sockets_per_node)
    return tp_groups(spec, topology, tp)[0], spec


def _decode_step_ns(obs: Observation, platform: str | None = None) -> float:
    group, _ = _cost(obs, platform)
    cost = group.cost_model(load_model(obs.fields["model"]))
    batch, prompt = int(obs.fields.get("batch", 1)), int(obs.fields.get("prompt_tokens", 128))
    return float(cost.decode([prompt] * batch, [2] * batch).total_ns)


def _measure(obs: Observation) -> float:
    """The emulator's value of one observation under the current trial overrides."""
    if obs.kind == "all_reduce":
        group, _ = _cost(obs)
        return float(group.ring.hardware_ns("all_reduce", float(obs.fields["message_bytes"])))
    if obs.kind == "decode_step":
        return _decode_step_ns(obs)
    if obs.kind == "ttft":
        group, _ = _cost(obs)
        cost = group.cost_model(load_model(obs.fields["model"]))
        return float(cost.prefill([int(obs.fields["prompt_tokens"])] * int(obs.fields.get("batch", 1))).total_ns)
    if obs.kind == "switch":
        group, _ = _cost(obs)
        model = load_model(obs.fields["model"])
        return float(max(group.copy_in(group.shard_bytes(model), 0).values()))
    if obs.kind == "bandwidth_share":
        group, spec = _cost(obs)
        model = load_model(obs.fields["model"])
        step = _decode_step_ns(obs)
        weight_bytes = shard_weight_bytes(model, group.tp)
        return weight_bytes / (spec.socket.hbm.bandwidth_bytes_per_s * step / 1e9)
    if obs.kind == "looping_speedup":
        return _decode_step_ns(obs, obs.fields["base"]) / _decode_step_ns(obs)
    if obs.kind == "claim":
        return reproduce.claim_values([obs.id])[obs.id]
    raise UserError(f"observation {obs.id}: unknown kind {obs.kind!r}")


def evaluate(observations: list[Observation], overrides: dict[str, dict] | None = None) -> dict[str, float]:
    """Emulator values of `observations` with some preset fields overridden."""
    with reproduce.overridden(overrides or {}):
        return {o.id: _measure(o) for o in observations}


def rel_error(obs: Observation, value: float) -> float:
    """Signed relative error: to the point, or to the nearer bound of a range (0 inside)."""
    if obs.value is not None:
        return (value - obs.value) / obs.value
    if value < obs.low:
        return (value - obs.low) / obs.low if obs.low else value - obs.low
    if value > obs.high:
        return (value - obs.high) / obs.high
    return 0.0


# -- fitting -------------------------------------------------------------------------------------------

def _blocks(params: list[Parameter]) -> list[list[Parameter]]:
    """Parameters that share an observation, transitively, are fitted together."""
    blocks: list[tuple[set[str], list[Parameter]]] = []
    for p in params:
        joined = [b for b in blocks if b[0] & set(p.observations)]
        ids, members = set(p.observations), [p]
        for b in joined:
            ids |= b[0]
            members += b[1]
            blocks.remove(b)
        blocks.append((ids, members))
    return [sorted(b[1], key=lambda p: p.key) for b in blocks]


def _fit_block(block: list[Parameter], observations: list[Observation], start: dict[str, float],
               max_nfev: int) -> dict[str, float]:
    """Least squares over the block's parameters scaled to [0, 1] within their bounds."""
    from scipy.optimize import least_squares

    span = np.array([p.high - p.low for p in block])
    low = np.array([p.low for p in block])

    def values(u: np.ndarray) -> dict[str, float]:
        return {p.key: float(low[i] + u[i] * span[i]) for i, p in enumerate(block)}

    def residuals(u: np.ndarray) -> np.ndarray:
        measured = evaluate(observations, _overrides(block, values(u)))
        return np.array([rel_error(o, measured[o.id]) for o in observations])

    u0 = np.clip([(start[p.key] - p.low) / (p.high - p.low) if p.high > p.low else 0.5 for p in block], 0.0, 1.0)
    result = least_squares(residuals, u0, bounds=(0.0, 1.0), diff_step=0.02, max_nfev=max_nfev, x_scale=1.0)
    return values(result.x)


def calibrate(loo: bool = True, observations: list[Observation] | None = None, max_nfev: int = 40,
              only: set[str] | None = None, progress=None) -> Calibration:
    """Fit every block, measure every observation, and (with `loo`) refit leaving each out."""
    observations = observations if observations is not None else load_observations()
    by_id = {o.id: o for o in observations}
    params = declared_parameters()
    for p in params:
        missing = [o for o in p.observations if o not in by_id]
        if missing:
            raise UserError(f"{p.key}: fitted to unknown observation(s) {', '.join(missing)}")
    fitted = {p.key: p.preset_value for p in params}
    blocks = [b for b in _blocks(params) if only is None or any(p.key in only for p in b)]
    for block in blocks:
        obs = [by_id[i] for i in sorted({i for p in block for i in p.observations})]
        if progress:
            progress(f"fitting {', '.join(p.key for p in block)} to {len(obs)} observation(s)")
        fitted.update(_fit_block(block, obs, fitted, max_nfev))
    values = evaluate(observations, _overrides(params, fitted))
    cal = Calibration(params, fitted, values, {o.id: rel_error(o, values[o.id]) for o in observations},
                      observations=observations)
    if loo:
        for block in blocks:
            ids = sorted({i for p in block for i in p.observations})
            for left_out in ids:
                rest = [by_id[i] for i in ids if i != left_out]
                if progress:
                    progress(f"leave-one-out: {left_out}")
                refit = dict(fitted)
                refit.update(_fit_block(block, rest, fitted, max(max_nfev // 2, 5)))
                value = evaluate([by_id[left_out]], _overrides(params, refit))[left_out]
                cal.loo_values[left_out] = value
                cal.loo[left_out] = rel_error(by_id[left_out], value)
    return cal


def write_calibration(cal: Calibration, out_dir: Path) -> list[Path]:
    """calibration.json (fitted values, residuals, leave-one-out) and CALIBRATION.md into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / "calibration.json"
    data.write_text(json.dumps(cal.to_dict(), indent=2, sort_keys=True) + "\n")
    lines = ["# Calibration", "", "Command: `rdu calibrate`. Fitted preset values (scipy least_squares, within bounds):",
             "", "| preset | field | fitted | preset value | bounds | fitted to |", "|---|---|---|---|---|---|"]
    for p in cal.parameters:
        lines.append(f"| {p.origin} | `{p.path}` | {cal.fitted[p.key]:.4g} | {p.preset_value:.4g} | "
                     f"{p.low:g}-{p.high:g} | {', '.join(p.observations)} |")
    lines += ["", "| observation | target | emulator | role | error | leave-one-out error |", "|---|---|---|---|---|---|"]
    for o in cal.observations:
        loo = cal.loo.get(o.id)
        lines.append(f"| {o.id} | {o.target} | {cal.values[o.id]:.4g} | {cal.role(o.id)} | {cal.errors[o.id]:+.1%} | "
                     f"{'' if loo is None else f'{loo:+.1%}'} |")
    report = out_dir / "CALIBRATION.md"
    report.write_text("\n".join(lines) + "\n")
    return [data, report]


def fitted_overlay(cal: Calibration) -> dict[str, dict[str, Any]]:
    """Per declaring preset, the fitted values to write into it (what `--apply` would change)."""
    out: dict[str, dict[str, Any]] = {}
    for p in cal.parameters:
        value = cal.fitted[p.key]
        out.setdefault(p.origin, {})[p.path] = round(value, 4) if abs(value) < 10 else int(round(value))
    return out
