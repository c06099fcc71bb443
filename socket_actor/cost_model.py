"""How long a step takes on one socket of a tensor-parallel group: the dataflow cost model.

A kernel plan cuts the operator graph of a step into kernels:

* `unfused`: one kernel per operator (a platform may declare small fusions, e.g. a GPU's fused
  attention kernel); every intermediate tensor goes through HBM; every kernel pays a launch, and
  kernels run one after another. A collective is its own kernel: the collective library's time
  (start-up, hop latencies, bytes at the achieved link bandwidth) plus staging its buffers in HBM.
* `fused`: one streaming kernel per decoder layer (`fusion_scope: layer`) or for the whole
  decoder (`decoder`): weights and KV read once, activations on chip, collectives streamed over
  P2P without staging. A fused kernel is a pipeline, so its time is its critical path, not a
  sum: ``max(HBM streaming, compute, P2P bandwidth, SRAM traffic) + visible collective latencies +
  fill/drain``, where a latency is visible only when the weight stream cannot hide it (the
  kernel's final collective always is, unless kernel looping streams the next layer meanwhile).
  Its on-chip working set (the widest operator's on-chip inputs and outputs) is
  checked against SRAM; what does not fit spills, written to HBM and read back.
* launches cost `launch.so_ns` (host-orchestrated, SO) or `launch.ho_ns` (on-chip, HO); with
  `kernel_looping`, consecutive decoder-layer calls are one looped kernel: one launch and one
  fill/drain for all of them.
* named costs the bottom-up model does not derive: `runtime.run_setup_ns` once per run (program
  and argument load when a model is activated) and `runtime.step_host_ns` per step (host work).

An unfused operator takes ``max(flops / (peak * compute_fraction), hbm_bytes / (bandwidth *
bw_fraction))`` where `hbm_bytes` is its weights plus the tensors that cross its kernel's
boundary. Step times are integer ns.

The graph is compiled once per (model, TP degree, plan) into affine coefficients of the step
shape, so a 2,000-step decode is a few matrix products.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from rdu.interconnect.collectives_timing import RingTiming
from rdu.base import UserError
from rdu.socket_actor.model_spec import ModelSpec
from rdu.socket_actor.operators import (SHAPE_KEYS, Operator, PhaseShape, StepGraph, build_step_graph, decode_shapes,
                                    prefill_shape, shard_weight_bytes)
from rdu.socket_actor.spec import MODES, ORCHESTRATIONS, SocketSpec

__all__ = ["CostModel", "CompiledStep", "StepTimes", "Generation", "Timing", "Segment", "compile_step"]


@dataclass(frozen=True)
class CompiledStep:
    """Distinct operator instances of a step as affine coefficients over [1, *SHAPE_KEYS]."""

    names: tuple[str, ...]
    classes: tuple[str, ...]
    collectives: tuple[str | None, ...]
    count: np.ndarray            # instances per step of each row
    flops: np.ndarray            # rows x (1 + len(SHAPE_KEYS))
    hbm_bytes: np.ndarray        # weights + tensors crossing the kernel boundary
    compulsory_bytes: np.ndarray  # weights + persistent tensors (KV cache, ids, logits)
    collective_bytes: np.ndarray
    kernels_per_step: int
    instance_rows: tuple[int, ...]     # row of each unrolled operator, in graph order
    kernel_starts: tuple[bool, ...]    # whether that operator opens a new kernel (pays a launch)
    onchip_bytes: np.ndarray           # per row: on-chip inputs + outputs (the operator's SRAM footprint)
    kernel_rows: np.ndarray            # rows x distinct kernels: instances of each row in one such kernel
    kernel_count: np.ndarray           # distinct kernels: how many of each a step runs
    kernel_is_layer: np.ndarray        # distinct kernels: whether it is a decoder-layer kernel
    kernel_last_collective: np.ndarray  # distinct kernels: row of the kernel's final collective (-1: none)


def _kernel_of(op, index: int, mode: str, scope: str, groups: tuple[tuple[str, ...], ...]) -> tuple:
    if mode == "fused":
        if scope == "decoder":
            return ("step",)
        return (op.scope, op.layer)
    for g, names in enumerate(groups):
        if op.name in names:
            return ("group", g, op.scope, op.layer)
    return ("op", index)


def _unit_shapes() -> PhaseShape:
    """Shape 0 has every variable 0 and shape k+1 has variable k at 1: sizes are affine in the shape,
    so a graph evaluated at these points yields its coefficients."""
    basis = np.zeros((len(SHAPE_KEYS), 1 + len(SHAPE_KEYS)))
    for k in range(len(SHAPE_KEYS)):
        basis[k, k + 1] = 1.0
    return PhaseShape(*basis)


def _affine_coefficients(values: np.ndarray) -> np.ndarray:
    """[constant, slope of each shape variable] from a quantity evaluated at `_unit_shapes()`."""
    values = np.broadcast_to(np.asarray(values, dtype=np.float64), (1 + len(SHAPE_KEYS),))
    return np.concatenate([[values[0]], values[1:] - values[0]])


def _tensor_kernels(graph: StepGraph, kernels: list[tuple]) -> tuple[dict[str, tuple], dict[str, set]]:
    """The kernel that writes each tensor and the kernels that read it: what decides whether a
    tensor crosses a kernel boundary, hence HBM."""
    producer = {t: kernels[i] for i, op in enumerate(graph.ops) for t in op.writes}
    consumers: dict[str, set] = {}
    for i, op in enumerate(graph.ops):
        for t in op.reads:
            consumers.setdefault(t, set()).add(kernels[i])
    return producer, consumers


def _operator_bytes(op: Operator, kernel: tuple, graph: StepGraph, producer: dict[str, tuple],
                    consumers: dict[str, set], already_read: set[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One operator's HBM traffic, the compulsory part of it (weights and persistent tensors) and
    its on-chip bytes under the kernel plan. A kernel reads an outside tensor from HBM once: the
    first reader in it pays (`already_read` records that)."""
    traffic = np.asarray(op.weight_bytes, dtype=np.float64).copy()
    must = traffic.copy()
    on_chip = traffic * 0.0
    for t in op.reads:
        if producer.get(t) == kernel and t.split("@")[0] not in _TILED:
            on_chip = on_chip + graph.tensor_bytes[t]
        if producer.get(t) != kernel and (kernel, t) not in already_read:
            already_read.add((kernel, t))
            traffic = traffic + graph.tensor_bytes[t]
            if t in graph.persistent:
                must = must + graph.tensor_bytes[t]
    for t in op.writes:
        if t in graph.persistent:
            traffic = traffic + graph.tensor_bytes[t]
            must = must + graph.tensor_bytes[t]
        elif consumers.get(t, set()) - {kernel}:
            traffic = traffic + graph.tensor_bytes[t]
        elif t.split("@")[0] not in _TILED:
            on_chip = on_chip + graph.tensor_bytes[t]
    return traffic, must, on_chip


@dataclass
class _Rows:
    """Distinct operator instances (same name, class, collective and coefficients: typically one
    per operator of the decoder layer, however many layers) and the row of every instance."""

    names: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    collectives: list[str | None] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    coefficients: list[tuple[np.ndarray, ...]] = field(default_factory=list)  # flops, hbm, compulsory, coll, onchip
    instance_rows: list[int] = field(default_factory=list)
    index: dict[tuple, int] = field(default_factory=dict)

    def add(self, op: Operator, coefficients: tuple[np.ndarray, ...]) -> None:
        key = (op.name, op.cls, op.collective) + tuple(tuple(c) for c in coefficients)
        if key in self.index:
            self.counts[self.index[key]] += 1
        else:
            self.index[key] = len(self.names)
            self.names.append(op.name)
            self.classes.append(op.cls)
            self.collectives.append(op.collective)
            self.counts.append(1)
            self.coefficients.append(coefficients)
        self.instance_rows.append(self.index[key])

    def column(self, j: int) -> np.ndarray:
        """Coefficient j of every row (rows x (1 + len(SHAPE_KEYS)))."""
        return np.array([c[j] for c in self.coefficients])


def _kernel_starts(kernels: list[tuple]) -> tuple[bool, ...]:
    """Whether each operator opens a kernel (the first of it in graph order), i.e. pays a launch."""
    seen: set[tuple] = set()
    starts = []
    for kernel in kernels:
        starts.append(kernel not in seen)
        seen.add(kernel)
    return tuple(starts)


@functools.lru_cache(maxsize=256)
def compile_step(model: ModelSpec, tp: int, mode: str, scope: str,
                 groups: tuple[tuple[str, ...], ...]) -> CompiledStep:
    """Compile the step graph under a kernel plan (see module docstring)."""
    graph = build_step_graph(model, tp, _unit_shapes())
    kernels = [_kernel_of(op, i, mode, scope, groups) for i, op in enumerate(graph.ops)]
    producer, consumers = _tensor_kernels(graph, kernels)
    already_read: set[tuple] = set()
    rows = _Rows()
    for op, kernel in zip(graph.ops, kernels):
        traffic, must, on_chip = _operator_bytes(op, kernel, graph, producer, consumers, already_read)
        rows.add(op, (_affine_coefficients(op.flops), _affine_coefficients(traffic), _affine_coefficients(must),
                      _affine_coefficients(np.asarray(op.collective_bytes, dtype=np.float64)),
                      _affine_coefficients(on_chip)))
    kernel_rows, kernel_count, kernel_is_layer, last = _distinct_kernels(kernels, rows.instance_rows,
                                                                         len(rows.names), rows.collectives)
    return CompiledStep(tuple(rows.names), tuple(rows.classes), tuple(rows.collectives),
                        np.array(rows.counts, dtype=np.float64), rows.column(0), rows.column(1), rows.column(2),
                        rows.column(3), len(set(kernels)), tuple(rows.instance_rows), _kernel_starts(kernels),
                        rows.column(4), kernel_rows, kernel_count, kernel_is_layer, last)


# tensors a fused kernel streams tile by tile (flash-style attention): never whole on chip
_TILED = {"scores", "probs", "k_exp", "v_exp"}


def _distinct_kernels(kernels: list[tuple], instance_rows: list[int], nrows: int, collectives: list
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group identical kernels (same rows, same counts): rows x distinct matrix, multiplicities,
    whether each is a decoder-layer kernel (what kernel looping merges) and the row of its final
    collective (whose latency nothing later in the kernel can hide)."""
    members: dict[tuple, np.ndarray] = {}
    last: dict[tuple, int] = {}
    order: list[tuple] = []
    for kernel, row in zip(kernels, instance_rows):
        if kernel not in members:
            members[kernel] = np.zeros(nrows)
            order.append(kernel)
        members[kernel][row] += 1
        if collectives[row] is not None:
            last[kernel] = row
    distinct: dict[tuple, list] = {}
    for kernel in order:
        key = (tuple(members[kernel]), kernel[0] == "layer", last.get(kernel, -1))
        distinct.setdefault(key, [members[kernel], 0, kernel[0] == "layer", last.get(kernel, -1)])[1] += 1
    cols = list(distinct.values())
    return (np.column_stack([c[0] for c in cols]), np.array([c[1] for c in cols], dtype=np.float64),
            np.array([c[2] for c in cols], dtype=bool), np.array([c[3] for c in cols], dtype=np.int64))


@dataclass(frozen=True)
class Segment:
    """The compute before one collective (or before the end of the step), in graph order."""

    compute_ns: int
    collective: str | None = None
    collective_bytes: int = 0
    staging_ns: int = 0        # HBM traffic of an unfused collective's buffers


@dataclass
class StepTimes:
    """Per-step durations (integer ns) and, on request, per-operator totals over all steps."""

    step_ns: np.ndarray
    collective_step_ns: np.ndarray | None = None   # link time of each step's collectives
    op_ns: dict[str, float] = field(default_factory=dict)
    class_ns: dict[str, float] = field(default_factory=dict)
    flops: float = 0.0
    hbm_bytes: float = 0.0
    collective_ns: float = 0.0
    launch_ns: float = 0.0
    kernels: int = 0
    spill_bytes: float = 0.0      # SRAM overflow of fused kernels, written to HBM and read back

    @property
    def total_ns(self) -> int:
        return int(self.step_ns.sum())


@dataclass(frozen=True)
class Timing:
    """What running a batch needs to know of its generation: small enough to cache by the thousand."""

    ttft_ns: int
    total_ns: int
    finish_ns: tuple[int, ...]
    collective_ns: int
    setup_ns: int = 0          # the run's set-up (program / argument load), part of ttft_ns


@dataclass
class Generation:
    """Timing of one static batch: prefill, then decode steps until every sequence is done."""

    prefill: StepTimes
    decode: StepTimes
    finish_ns: np.ndarray  # per sequence, from the start of prefill
    setup_ns: int = 0      # the run's set-up charged before the prefill (part of the prefill step)

    @property
    def ttft_ns(self) -> int:
        return self.prefill.total_ns

    @property
    def collective_ns(self) -> int:
        """Link time of all collectives of the batch (part of its duration)."""
        return int(sum(float(p.collective_step_ns.sum()) for p in (self.prefill, self.decode)
                       if p.collective_step_ns is not None))

    def timing(self) -> Timing:
        return Timing(self.ttft_ns, self.total_ns, tuple(int(f) for f in self.finish_ns), self.collective_ns,
                      self.setup_ns)

    @property
    def total_ns(self) -> int:
        return self.prefill.total_ns + self.decode.total_ns


MAX_STEP_NS = 2.0 ** 53   # ~104 days: a step time stays exact in float64 and sums of steps fit int64


class CostModel:
    """Times steps of `model` on one socket of a TP group of `tp` sockets connected by `ring`."""

    def __init__(self, socket: SocketSpec, model: ModelSpec, tp: int, ring: RingTiming,
                 mode: str | None = None, orchestration: str | None = None) -> None:
        self.socket, self.model, self.tp, self.ring = socket, model, tp, ring
        self.mode = mode or socket.default_mode
        self.orchestration = orchestration or socket.default_orchestration
        if self.mode not in MODES:
            raise UserError(f"unknown execution mode {self.mode!r}; expected one of {', '.join(MODES)}")
        if self.orchestration not in ORCHESTRATIONS:
            raise UserError(f"unknown orchestration {self.orchestration!r}; expected one of {', '.join(ORCHESTRATIONS)}")
        if self.mode == "fused" and not socket.supports_fusion:
            raise UserError(f"{socket.name} cannot run fused kernels (supports_fusion: false); use --mode unfused")
        if self.orchestration == "HO" and socket.launch_ho_ns is None:
            raise UserError(f"{socket.name} has no hardware-orchestrated launch; use --orchestration SO")
        if ring.ranks != tp:
            raise ValueError(f"ring has {ring.ranks} ranks for TP {tp}")
        self.compiled = compile_step(model, tp, self.mode, socket.fusion_scope, socket.unfused_kernel_groups)
        self.fused = self.mode == "fused"
        fused = self.fused
        self._flops_per_ns = socket.peak_flops_per_s * (
            socket.fused_compute_fraction if fused else socket.unfused_compute_fraction) / 1e9
        self._bytes_per_ns = socket.hbm.bandwidth_bytes_per_s * (
            socket.fused_hbm_bandwidth_fraction if fused else socket.unfused_hbm_bandwidth_fraction) / 1e9
        c = self.compiled
        layer_kernels = float(c.kernel_count[c.kernel_is_layer].sum()) if fused else 0.0
        self.kernel_calls = c.kernels_per_step
        if fused and socket.kernel_looping and layer_kernels > 1:
            self.kernel_calls -= int(layer_kernels) - 1   # the decoder layers run as one looped call
        self._launch_ns = socket.launch_ns(self.orchestration) * self.kernel_calls
        self._fill_ns = socket.fill_drain_ns * self.kernel_calls if fused else 0.0
        self._sram_bytes = float(socket.sram.capacity_bytes)
        bw = socket.sram.bandwidth_bytes_per_s
        self._sram_bytes_per_ns = bw / 1e9 if bw else None
        self._collective_rows = [r for r, kind in enumerate(c.collectives) if kind is not None]
        self._collective_kinds = [c.collectives[r] for r in self._collective_rows]

    # -- core -------------------------------------------------------------------------------
    def shard_bytes(self) -> int:
        return shard_weight_bytes(self.model, self.tp)

    @staticmethod
    def _design(shape: PhaseShape) -> np.ndarray:
        """Rows = steps, columns = [1, *SHAPE_KEYS]."""
        matrix = shape.matrix()
        return np.hstack([np.ones((len(matrix), 1)), matrix])

    def _collective_parts(self, x: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(latency ns, bandwidth ns) of every collective row, steps x rows (0 elsewhere)."""
        latency, bandwidth = np.zeros(shape), np.zeros(shape)
        for r, kind in zip(self._collective_rows, self._collective_kinds):
            latency[:, r], bandwidth[:, r] = self.ring.timed(kind, x @ self.compiled.collective_bytes[r])
        return latency, bandwidth

    def _fused_kernels(self, compute, memory, coll_lat, coll_bw, onchip):
        """Critical path of each distinct fused kernel (steps x kernels): (stream, visible
        collective latency, spill bytes).

        A kernel is a pipeline: HBM streaming, compute, the P2P stream and on-chip traffic run at
        once, so the slowest sets the pace. A working set larger than SRAM spills: its excess is
        written to HBM and read back, which the HBM stream must carry too. Collective latencies
        (start-up, hops) hold up the activations, not the weights: while an all-reduce is in
        flight the kernel keeps streaming the weights of the operators after it into SRAM, so a
        latency is hidden as long as the weight stream outlasts the activations' chain (compute
        plus latencies). Only the kernel's final collective has nothing left to hide behind — at
        a call boundary the pipeline drains — unless kernel looping's pipelined outer loop
        streams the next layer's weights meanwhile."""
        k = self.compiled.kernel_rows
        widest = np.zeros((compute.shape[0], k.shape[1]))
        for j in range(k.shape[1]):
            present = k[:, j] > 0
            widest[:, j] = onchip[:, present].max(axis=1) if present.any() else 0.0
        spill_bytes = np.maximum(widest - self._sram_bytes, 0.0) * 2.0
        memory_k = memory @ k + spill_bytes / self._bytes_per_ns
        sram_k = (onchip @ k) / self._sram_bytes_per_ns if self._sram_bytes_per_ns else np.zeros_like(memory_k)
        stream = np.maximum.reduce([compute @ k, memory_k, coll_bw @ k, sram_k])
        latency = coll_lat @ k
        last = self.compiled.kernel_last_collective
        exposed = np.where(last >= 0, coll_lat[:, np.maximum(last, 0)], 0.0)
        if self.socket.kernel_looping:
            exposed = np.where(self.compiled.kernel_is_layer, 0.0, exposed)
        hidden = latency - exposed
        visible = exposed + np.clip(compute @ k + hidden - stream, 0.0, hidden)
        return stream, visible, spill_bytes

    def row_times(self, shape: PhaseShape, design: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(per-instance ns, flops, hbm bytes, collective ns) as steps x rows matrices.

        Unfused: each operator's own time. Fused: each operator's share of its kernel's critical
        path (in proportion to its own bound), collectives carrying their latency."""
        c = self.compiled
        x = self._design(shape) if design is None else design
        flops, traffic = x @ c.flops.T, x @ c.hbm_bytes.T
        compute, memory = flops / self._flops_per_ns, traffic / self._bytes_per_ns
        coll_lat, coll_bw = self._collective_parts(x, flops.shape)
        if not self.fused:
            times = np.maximum(compute, memory)
            rows = self._collective_rows
            times[:, rows] = coll_lat[:, rows] + coll_bw[:, rows] + memory[:, rows]  # + HBM staging
            return times, flops, traffic, coll_lat + coll_bw
        onchip = x @ c.onchip_bytes.T
        stream, visible, spill = self._fused_kernels(compute, memory, coll_lat, coll_bw, onchip)
        own = np.maximum.reduce([compute, memory, coll_bw])
        k = c.kernel_rows
        # every row's share of the stream of each kernel it belongs to, per instance, and of the
        # kernel's visible collective latency (in proportion to the row's own latency)
        weight = np.where(own @ k > 0, stream / np.where(own @ k > 0, own @ k, 1.0), 0.0)
        latency = coll_lat @ k
        seen = np.where(latency > 0, visible / np.where(latency > 0, latency, 1.0), 0.0)
        share, lat_share = np.zeros_like(own), np.zeros_like(own)
        instances = k @ c.kernel_count
        for j in range(k.shape[1]):
            share += own * weight[:, [j]] * (k[:, j] * c.kernel_count[j])
            lat_share += coll_lat * seen[:, [j]] * (k[:, j] * c.kernel_count[j])
        per = np.where(instances > 0, instances, 1.0)
        lat_share = lat_share / per
        times = share / per + lat_share
        return times, flops, traffic, lat_share + np.minimum(coll_bw, times)

    def _step_parts(self, design: np.ndarray) -> dict[str, np.ndarray]:
        """Per step: the named parts of its time (ns), which sum to the step."""
        c = self.compiled
        if not self.fused:
            times, flops, traffic, coll = self.row_times(None, design)
            parts = {"ops": times @ c.count, "collective": coll @ c.count}
        else:
            flops, traffic = design @ c.flops.T, design @ c.hbm_bytes.T
            compute, memory = flops / self._flops_per_ns, traffic / self._bytes_per_ns
            coll_lat, coll_bw = self._collective_parts(design, flops.shape)
            onchip = design @ c.onchip_bytes.T
            stream, visible, spill = self._fused_kernels(compute, memory, coll_lat, coll_bw, onchip)
            parts = {"ops": (stream + visible) @ c.kernel_count, "collective": visible @ c.kernel_count,
                     "spill_bytes": spill @ c.kernel_count}
        n = len(design)
        parts["launch"] = np.full(n, float(self._launch_ns))
        parts["pipeline"] = np.full(n, float(self._fill_ns))
        parts["host"] = np.full(n, float(self.socket.step_host_ns))
        return parts

    def steps(self, shape: PhaseShape, breakdown: bool = False, setup: bool = False) -> StepTimes:
        """Durations of the steps described by `shape` (one per row); `setup` adds the run's
        set-up (program / argument load) to the first step."""
        design = self._design(shape)
        if len(design) == 0:
            return StepTimes(step_ns=np.zeros(0, dtype=np.int64))
        parts = self._step_parts(design)
        total = parts["ops"] + parts["launch"] + parts["pipeline"] + parts["host"]
        setup_ns = float(self.socket.run_setup_ns) if setup else 0.0
        total[0] += setup_ns
        if not np.isfinite(total).all() or total.max() >= MAX_STEP_NS:
            raise UserError(f"{self.model.name}: a step would take {float(np.max(total)):.3g} ns, beyond the "
                            f"emulator's time range ({MAX_STEP_NS:.2g} ns per step); check the platform's rates "
                            "and the batch and prompt sizes")
        step_ns = np.ceil(total).astype(np.int64)
        result = StepTimes(step_ns=step_ns, kernels=self.kernel_calls, collective_step_ns=parts["collective"])
        if breakdown:
            times, flops, traffic, coll_ns = self.row_times(shape, design)
            count = self.compiled.count
            per_row = times.sum(0) * count
            for name, cls, ns in zip(self.compiled.names, self.compiled.classes, per_row):
                result.op_ns[name] = result.op_ns.get(name, 0.0) + float(ns)
                result.class_ns[cls] = result.class_ns.get(cls, 0.0) + float(ns)
            result.launch_ns = float(parts["launch"].sum())
            result.class_ns["launch"] = result.launch_ns
            for name in ("pipeline", "host"):
                if parts[name].any():
                    result.class_ns[name] = float(parts[name].sum())
            if setup_ns:
                result.class_ns["setup"] = setup_ns
            result.flops = float((flops.sum(0) * count).sum())
            spill = float(parts.get("spill_bytes", np.zeros(1)).sum())
            result.hbm_bytes = float((traffic.sum(0) * count).sum()) + spill
            result.spill_bytes = spill
            result.collective_ns = float(parts["collective"].sum())
        return result

    # -- phases -----------------------------------------------------------------------------
    def prefill(self, prompt_lens, breakdown: bool = False, setup: bool = True) -> StepTimes:
        """The prefill step of a run (with the run's set-up, unless `setup` is false)."""
        return self.steps(prefill_shape(prompt_lens, self.model.sliding_window), breakdown, setup)

    def decode(self, prompt_lens, output_lens, breakdown: bool = False) -> StepTimes:
        return self.steps(decode_shapes(prompt_lens, output_lens, self.model.sliding_window), breakdown)

    def generate(self, prompt_lens, output_lens, breakdown: bool = False, setup: bool = True) -> Generation:
        """Prefill a batch of prompts, then decode until each has its `output_lens` tokens; `setup`
        charges the run's set-up (program / argument load) before the prefill."""
        prompt_lens = np.asarray(prompt_lens, dtype=np.int64)
        output_lens = np.asarray(output_lens, dtype=np.int64)
        if prompt_lens.size == 0 or (prompt_lens < 1).any() or (output_lens < 1).any():
            raise UserError("a generation needs at least one prompt, every prompt and output at least 1 token")
        window = self.model.sliding_window
        if breakdown:
            prefill = self.prefill(prompt_lens, breakdown, setup)
            decode = self.decode(prompt_lens, output_lens, breakdown)
        else:  # one evaluation for the prefill step and every decode step
            first, rest = prefill_shape(prompt_lens, window), decode_shapes(prompt_lens, output_lens, window)
            both = PhaseShape(*(np.concatenate([getattr(first, k), getattr(rest, k)]) for k in SHAPE_KEYS))
            times = self.steps(both, setup=setup)
            steps, coll = times.step_ns, times.collective_step_ns
            prefill = StepTimes(step_ns=steps[:1], collective_step_ns=coll[:1])
            decode = StepTimes(step_ns=steps[1:], collective_step_ns=coll[1:])
        ends = np.concatenate([[0], np.cumsum(decode.step_ns)])
        finish = prefill.total_ns + ends[output_lens - 1]
        setup_ns = int(np.ceil(float(self.socket.run_setup_ns))) if setup else 0
        return Generation(prefill=prefill, decode=decode, finish_ns=finish, setup_ns=setup_ns)

    def segments(self, shape: PhaseShape) -> list[Segment]:
        """One step cut at its collectives: what the functional plane runs between two of them.

        The collectives' link time is left out: the event-level collectives supply it.
        """
        if len(shape.matrix()) != 1:
            raise ValueError("segments() takes the shape of exactly one step")
        times, _, traffic, _ = self.row_times(shape)
        launch = self.socket.launch_ns(self.orchestration)
        c = self.compiled
        segments, acc = [], 0.0
        for row, starts in zip(c.instance_rows, c.kernel_starts):
            acc += launch if starts else 0.0
            if c.collectives[row] is None:
                acc += times[0, row]
                continue
            x = np.concatenate([[1.0], shape.matrix()[0]])
            segments.append(Segment(compute_ns=int(np.ceil(acc)), collective=c.collectives[row],
                                    collective_bytes=int(round(float(x @ c.collective_bytes[row]))),
                                    staging_ns=int(np.ceil(traffic[0, row] / self._bytes_per_ns))))
            acc = 0.0
        segments.append(Segment(compute_ns=int(np.ceil(acc))))
        return segments

    def roofline_ns(self, shape: PhaseShape) -> np.ndarray:
        """Per instance, the hardware bound: compulsory bytes at peak bandwidth vs flops at peak."""
        c = self.compiled
        x = np.column_stack([np.ones(len(shape.matrix())), shape.matrix()])
        return np.maximum(x @ c.flops.T / (self.socket.peak_flops_per_s / 1e9),
                          x @ c.compulsory_bytes.T / (self.socket.hbm.bandwidth_bytes_per_s / 1e9))
