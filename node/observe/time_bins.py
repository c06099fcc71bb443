"""Time series over a run's virtual time, filled while its events are read, in memory bounded by
the number of bins rather than by the run: the plots of a 100k-request run cost what those of a
300-request run cost.

A `TimeGrid` is a fixed number of bins from time 0 whose width doubles (adjacent bins merged)
whenever something lands beyond its end, since how long a run lasted is known only at its end.
Sums (busy time, counts) stay exact through a merge; a step function (HBM in use, a batch size)
keeps, per bin, its largest value and its last one, so its peak is exact at any width.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TimeGrid", "StepSeries"]

_MAX_NS = (1 << 63) - 1


class StepSeries:
    """A value that changes at instants (HBM in use, sequences per step), kept per bin."""

    def __init__(self, bins: int, initial: float) -> None:
        self.initial = initial
        self.peak = np.full(bins, -np.inf)          # the largest value set in the bin
        self.last = np.zeros(bins)                  # the value after its latest change in the bin
        self.last_t_ns = np.full(bins, -1, dtype=np.int64)

    def _merge(self) -> None:
        half = len(self.peak) // 2
        changed_late = self.last_t_ns[1::2] >= 0
        self.peak[:half] = np.maximum(self.peak[0::2], self.peak[1::2])
        self.last[:half] = np.where(changed_late, self.last[1::2], self.last[0::2])
        self.last_t_ns[:half] = np.where(changed_late, self.last_t_ns[1::2], self.last_t_ns[0::2])
        self.peak[half:], self.last[half:], self.last_t_ns[half:] = -np.inf, 0.0, -1

    def at_bin_ends(self, used: int) -> np.ndarray:
        """The value at the end of each of the first `used` bins (the latest change carried on)."""
        changed = self.last_t_ns[:used] >= 0
        latest = np.maximum.accumulate(np.where(changed, np.arange(used), -1))
        return np.where(latest >= 0, self.last[np.maximum(latest, 0)], self.initial)

    def peaks(self, used: int) -> np.ndarray:
        """The largest value each of the first `used` bins saw (what it started with counts)."""
        ends = self.at_bin_ends(used)
        start = np.concatenate(([self.initial], ends[:-1]))
        return np.maximum(self.peak[:used], start)

    def maximum(self) -> float:
        return float(max(self.initial, self.peak.max()))


class TimeGrid:
    """`bins` bins of a width that starts at `width_ns` and doubles as the run goes on; every
    series made by `sums()` and `steps()` shares the grid."""

    def __init__(self, bins: int = 1024, width_ns: int = 1024) -> None:
        if bins < 2 or bins % 2:
            raise ValueError(f"bins: expected an even count >= 2, got {bins}")
        self.bins = bins
        self.width_ns = width_ns
        self.end_ns = 0                             # the latest time seen
        self._sums: list[np.ndarray] = []
        self._steps: list[StepSeries] = []

    def sums(self) -> np.ndarray:
        series = np.zeros(self.bins)
        self._sums.append(series)
        return series

    def steps(self, initial: float = 0.0) -> StepSeries:
        series = StepSeries(self.bins, initial)
        self._steps.append(series)
        return series

    def _reach(self, t_ns: int) -> None:
        """Widen the bins until `t_ns` falls in the last one at the latest."""
        if t_ns > self.end_ns:
            self.end_ns = t_ns
        while t_ns >= self.bins * self.width_ns:
            half = self.bins // 2
            for series in self._sums:
                series[:half] = series[0::2] + series[1::2]
                series[half:] = 0.0
            for steps in self._steps:
                steps._merge()
            self.width_ns *= 2

    def _clamped(self, t_ns: int) -> int:
        """`t_ns` within the bins' range, the bins widened to reach it."""
        t_ns = min(max(0, t_ns), _MAX_NS)
        self._reach(t_ns)
        return t_ns

    def see(self, t_ns: int) -> None:
        """Something happened at `t_ns` (the run lasted at least until then)."""
        self._clamped(t_ns)

    def add_span(self, series: np.ndarray, start_ns: int, end_ns: int, weight: float = 1.0) -> None:
        """Add `weight` x the time of [start, end) that falls in each bin."""
        start_ns, end_ns = max(0, start_ns), min(end_ns, _MAX_NS)
        if end_ns <= start_ns or weight <= 0:
            return
        self._reach(end_ns)
        width = self.width_ns
        first, last = start_ns // width, (end_ns - 1) // width
        if first == last:
            series[first] += (end_ns - start_ns) * weight
            return
        series[first] += ((first + 1) * width - start_ns) * weight
        series[last] += (end_ns - last * width) * weight
        if last > first + 1:
            series[first + 1:last] += width * weight

    def add_count(self, series: np.ndarray, t_ns: int, count: float = 1.0) -> None:
        series[self._clamped(t_ns) // self.width_ns] += count

    def set_step(self, steps: StepSeries, t_ns: int, value: float) -> None:
        t_ns = self._clamped(t_ns)
        i = t_ns // self.width_ns
        if t_ns >= steps.last_t_ns[i]:
            steps.last[i], steps.last_t_ns[i] = value, t_ns
        if value > steps.peak[i]:
            steps.peak[i] = value

    # -- reading ----------------------------------------------------------------------------------
    @property
    def used(self) -> int:
        """Bins up to the latest time seen."""
        return min(self.bins, self.end_ns // self.width_ns + 1)

    def fine_edges_ns(self) -> np.ndarray:
        """Edges of the `used` bins (float: plotted, never summed)."""
        return np.arange(self.used + 1, dtype=float) * self.width_ns

    def coarse(self, series: np.ndarray, target: int = 60) -> tuple[np.ndarray, np.ndarray]:
        """(edges_ns, sums) of about `target` bins made of whole fine bins, covering the run."""
        used = self.used
        k = -(-used // target)
        n = -(-used // k)
        padded = np.zeros(n * k)
        padded[:used] = series[:used]
        return np.arange(n + 1, dtype=float) * k * self.width_ns, padded.reshape(n, k).sum(axis=1)

    def coarse_share(self, series: np.ndarray, target: int = 60) -> tuple[np.ndarray, np.ndarray]:
        """(edges_ns, share of each coarse bin's time within the run) of a busy-time series."""
        edges, sums = self.coarse(series, target)
        span = np.minimum(edges[1:], max(self.end_ns, 1)) - edges[:-1]
        return edges, np.divide(sums, span, out=np.zeros_like(sums), where=span > 0)
