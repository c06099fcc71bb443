"""The live terminal dashboard of a run (`rdu run --dashboard`, `rdu dash RUN_DIR`).

`render(snapshot)` draws a `StatsSnapshot` (node/live_stats.py) and looks at nothing else, so it
is testable on a recorded console and the same for a live run and a replay. `LiveDashboard` is
the event sink: it feeds every event to `LiveStats` (a microsecond or two) and redraws on a
wall-clock timer, never per event: at most `refresh_per_s` times a second, and less often if a
redraw is slow (a loaded machine, a slow terminal), so drawing stays under `DRAW_SHARE` of the
wall time and the emulation keeps its speed. The body is drawn as fixed-width text rows rather
than nested rich Tables, which cost several times more to measure and draw. Without a terminal
it prints one summary line every few seconds instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from interconnect.spec_fields import UserError, format_bytes
from node.events_log import read_events
from node.live_stats import LiveStats, SocketView, StatsSnapshot, format_virtual_s

__all__ = ["LiveDashboard", "render", "one_line", "replay", "load_events"]

_FULL, _EMPTY = "█", "░"
DRAW_SHARE = 0.05   # at most this share of wall time goes to redrawing the live view


def _duration(ns: float) -> str:
    """Short and readable: 3.27 ms, 412 ms, 5.98 s."""
    if ns >= 1e9:
        return f"{ns / 1e9:,.2f} s"
    return f"{ns / 1e6:.0f} ms" if ns >= 1e8 else f"{ns / 1e6:.2f} ms"


def _bar(fraction: float | None, width: int = 10) -> Text:
    if fraction is None:
        return Text("n/a".ljust(width + 5), style="dim")
    fraction = min(1.0, max(0.0, fraction))
    full = round(fraction * width)
    style = "red" if fraction >= 0.95 else "yellow" if fraction >= 0.8 else "green"
    return Text(_FULL * full, style=style) + Text(_EMPTY * (width - full), style="dim") + Text(f" {fraction:4.0%}")


def _tier(used_bytes: int | None, capacity_bytes: int, width: int = 10) -> Text:
    if used_bytes is None or capacity_bytes <= 0:
        return _bar(None, width)
    return _bar(used_bytes / capacity_bytes, width)


def _short(model: str) -> str:
    """`expert0042` -> `e42` (the resident column is narrow)."""
    return f"e{int(model[6:])}" if model.startswith("expert") and model[6:].isdigit() else model


def _header(s: StatsSnapshot) -> RenderableType:
    hit = f"{s.hit_rate:.0%}" if s.hit_rate is not None else "-"
    ratio = f"{s.clock_ns / 1e9 / s.wall_s:,.1f} virtual s per wall s" if s.wall_s > 0 else ""
    state = ("stopped: " + s.stopped if s.stopped else "interrupted" if s.interrupted
             else "finished" if s.finished else "running")
    lines = [
        Text.assemble((f"{s.name}", "bold"), f": {s.experts} x {s.model} on {s.nodes} x {s.platform}, "
                      f"TP{s.tp}, {s.policy}  [{state}]"),
        Text(f"virtual time {format_virtual_s(s.clock_ns)}   wall time {s.wall_s:,.1f} s   {ratio}"),
        Text(f"throughput {s.tokens_per_s:,.0f} tokens/s   switches {s.switches:,} (prefetched {s.prefetches:,})   "
             f"evictions {s.evictions:,}   HBM hits {hit} of expert runs"),
        *([Text(f"faults {len(s.faults)}, latest: {s.faults[-1].strip()}", style="bold red")] if s.faults else []),
        Text("requests ") + _bar(s.progress, 30) + Text(f"  {s.completed:,} done / {s.requests_total:,}"
                                                        f"  (arrived {s.arrived:,})"),
    ]
    for node in s.nodes_view[:4]:
        lines.append(Text(f"node{node.index} {node.ddr_tier} ") + _tier(node.ddr_used_bytes, node.ddr_capacity_bytes)
                     + Text(f"  of {format_bytes(node.ddr_capacity_bytes)}"
                            + ("" if node.ddr_used_bytes is not None else " (occupancy not in the events)"),
                            style="dim"))
    if len(s.nodes_view) > 4:
        lines.append(Text(f"... {len(s.nodes_view) - 4} more nodes", style="dim"))
    return Panel(Group(*lines), title="rdu dashboard", title_align="left")


def _row(*cells: tuple[Text | str, int]) -> Text:
    """One line of fixed-width cells (cheaper to draw than a rich Table, which measures every
    cell twice when nested)."""
    line = Text(no_wrap=True, overflow="ellipsis")
    for i, (cell, width) in enumerate(cells):
        text = cell.copy() if isinstance(cell, Text) else Text(cell)
        text.truncate(width, overflow="ellipsis", pad=True)
        if i:
            line.append(" ")
        line.append_text(text)
    return line


def _title(text: str) -> Text:
    return Text(text, style="bold")


def _socket_rows(s: StatsSnapshot, max_rows: int) -> list[tuple[str, SocketView]]:
    """(label, view) per socket; when they do not fit, one row per TP group (its members hold
    the same experts and run in lockstep), labelled with its first member and how many more."""
    if len(s.sockets) <= max_rows:
        return [(view.name, view) for view in s.sockets]
    by_group: dict[str, list[SocketView]] = {}
    for view in s.sockets:
        by_group.setdefault(view.group, []).append(view)
    return [(f"{views[0].name} +{len(views) - 1}" if len(views) > 1 else views[0].name, views[0])
            for views in by_group.values()]


def _sockets(s: StatsSnapshot, max_rows: int, width: int) -> list[Text]:
    rows = _socket_rows(s, max_rows)
    name_w = max([len("socket"), *(len(label) for label, _ in rows)])
    group_w = max([len("group"), *(len(v.group) for v in s.sockets)])
    fixed = name_w + group_w + 12 + 27 + 12 + 5
    rest = max(10, width - fixed)
    sram_note = "" if s.backend_sampled else " (SRAM comes from the sockets' ledgers: not in recorded events)"
    lines = [_title(f"sockets: memory tiers, busy share, experts resident in HBM{sram_note}"),
             _row(("socket", name_w), ("group", group_w), ("SRAM", 12), ("HBM", 27), ("busy", 12),
                  ("in HBM (most recently used first)", rest))]
    for label, view in rows[:max_rows]:
        experts = [m for m in view.resident if m.startswith("expert")]
        others = [m for m in view.resident if not m.startswith("expert")]
        loading = f" loading {' '.join(_short(m) for m in view.loading)};" if view.loading else ""
        resident = f"{len(experts)} experts{' + ' + ', '.join(others) if others else ''}:{loading} " + \
            " ".join(_short(m) for m in reversed(experts))
        hbm = _tier(view.hbm_used_bytes, view.hbm_capacity_bytes) + Text(f" {format_bytes(view.hbm_used_bytes)}")
        lines.append(_row((label, name_w), (view.group, group_w),
                          (_tier(view.sram_used_bytes, view.sram_capacity_bytes, 6), 12), (hbm, 27),
                          (_bar(view.busy_fraction, 6), 12), (resident, rest)))
    if len(rows) > max_rows:
        lines.append(Text(f"... {len(rows) - max_rows} more rows (a taller terminal shows them)", style="dim"))
    return lines


def _links(s: StatsSnapshot) -> list[Text]:
    name_w = max([len("link"), *(len(link.name) for link in s.links)])
    moved_w = 11
    lines = [_title("links (busy share of virtual time)"), _row(("link", name_w), ("busy", 14), ("moved", moved_w))]
    for link in s.links:
        moved = format_bytes(link.bytes_moved) if link.bytes_moved is not None else link.note
        lines.append(_row((link.name, name_w), (_bar(link.busy_fraction, 8), 14), (moved, moved_w)))
    return lines


def _queues(s: StatsSnapshot) -> list[Text]:
    name_w = max([len("group"), *(len(g.name) for g in s.groups)])
    now_w = max([len("now"), *(len(g.activity) for g in s.groups)])
    lines = [_title("request queue"), _row(("group", name_w), ("waiting", 8), ("batch", 6), ("now", now_w))]
    for group in s.groups:
        lines.append(_row((group.name, name_w), (f"{group.waiting:>7,}", 8), (f"{group.batch:>5}", 6),
                          (group.activity, now_w)))
    return lines


def _latency(s: StatsSnapshot) -> list[Text]:
    lines = [_title(f"latency of {s.completed:,} completed"), _row(("", 10), ("p50", 9), ("p90", 9), ("p99", 9))]
    for label, values in (("TTFT", s.ttft_ns), ("TPOT", s.tpot_ns), ("end-to-end", s.e2e_ns)):
        lines.append(_row((label, 10), *((f"{_duration(values[q]):>9}", 9) for q in ("p50", "p90", "p99"))))
    return lines


def _flow(blocks: list[list[Text]], width: int, gap: int = 4) -> list[Text]:
    """Lay blocks of lines left to right, starting a new row of blocks when one would not fit."""
    rows: list[list[tuple[list[Text], int]]] = [[]]
    used = 0
    for lines in blocks:
        block_w = max(line.cell_len for line in lines)
        if rows[-1] and used + gap + block_w > width:
            rows.append([])
            used = 0
        used += (gap if rows[-1] else 0) + block_w
        rows[-1].append((lines, block_w))
    out: list[Text] = []
    for row in rows:
        for i in range(max(len(lines) for lines, _ in row)):
            line = Text(no_wrap=True, overflow="ellipsis")
            for j, (lines, block_w) in enumerate(row):
                cell = lines[i].copy() if i < len(lines) else Text("")
                cell.truncate(block_w, pad=True)
                line.append(" " * gap if j else "").append_text(cell)
            out.append(line)
        out.append(Text(""))
    return out[:-1]


def _log(s: StatsSnapshot, lines: int) -> RenderableType:
    shown = s.log[-lines:] if lines > 0 else ()
    body = Text("\n".join(shown) if shown else "no switches yet", no_wrap=True, overflow="ellipsis")
    return Panel(body, title="switches, evictions, faults", title_align="left")


def render(snapshot: StatsSnapshot, width: int = 120, max_socket_rows: int = 16, log_lines: int = 6) -> RenderableType:
    """The whole dashboard, drawn from `snapshot` alone, for a terminal `width` columns wide."""
    middle = _flow([_links(snapshot), _queues(snapshot), _latency(snapshot)], width)
    body = Text("\n", no_wrap=True).join([*_sockets(snapshot, max_socket_rows, width), Text(""), *middle])
    return Group(_header(snapshot), body, _log(snapshot, log_lines))


def one_line(s: StatsSnapshot) -> str:
    """The dashboard in one line, for logs and pipes."""
    hbm = max((v.hbm_used_bytes / v.hbm_capacity_bytes for v in s.sockets if v.hbm_capacity_bytes), default=0.0)
    hit = f"{s.hit_rate:.0%}" if s.hit_rate is not None else "-"
    return (f"{s.name}: {s.progress:4.0%} {s.completed:,}/{s.requests_total:,} done, {s.arrived:,} arrived | "
            f"virtual {format_virtual_s(s.clock_ns)}, wall {s.wall_s:,.1f} s | {s.tokens_per_s:,.0f} tok/s | "
            f"TTFT p50 {_duration(s.ttft_ns['p50'])} p99 {_duration(s.ttft_ns['p99'])} | "
            f"TPOT p50 {_duration(s.tpot_ns['p50'])} | switches {s.switches:,}, hit {hit} | HBM max {hbm:.0%}")


class LiveDashboard:
    """Event sink that shows a run live. Usage:

        with LiveDashboard(console) as dashboard:
            execute_run(config, [dashboard])
    """

    def __init__(self, console: Console, refresh_per_s: float = 4.0, line_interval_s: float = 3.0) -> None:
        if refresh_per_s <= 0:
            raise ValueError(f"refresh_per_s must be > 0, got {refresh_per_s}")
        self.console = console
        self.stats = LiveStats()
        self.live_view = console.is_terminal
        self.interval_s = 1.0 / refresh_per_s if self.live_view else line_interval_s
        self.draws = 0
        self._live: Live | None = None
        self._backend = None
        self._wall_start = time.perf_counter()
        self._next_draw = self._wall_start
        self._final_drawn = False

    def __enter__(self) -> "LiveDashboard":
        self._wall_start = time.perf_counter()
        self._next_draw = self._wall_start + self.interval_s
        if self.live_view:
            self._live = Live(Text("rdu dashboard: starting the emulated cluster ...", style="dim"),
                              console=self.console, auto_refresh=False, transient=False, redirect_stdout=False,
                              redirect_stderr=False)
            self._live.start(refresh=True)
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            if not self._final_drawn and self.stats.setup is not None:
                self.draw(final=True)
        finally:
            if self._live is not None:
                self._live.stop()
                self._live = None

    def attach(self, backend) -> None:
        """Sample the backend's socket ledgers (SRAM, HBM) at draw time, if it has them."""
        self._backend = backend if hasattr(backend, "socket_snapshots") else None

    def __call__(self, event: dict) -> None:
        self.stats.feed(event)
        if event["type"] == "setup":  # serving starts now (a Ray backend may have taken seconds to start)
            self._wall_start = time.perf_counter()
            self._next_draw = self._wall_start + self.interval_s
        elif event["type"] == "end":
            self.draw(final=True)
        elif time.perf_counter() >= self._next_draw:
            self.draw()

    def tick(self) -> None:
        """Draw if the refresh timer is due."""
        now = time.perf_counter()
        if now >= self._next_draw:
            self.draw(now)

    def draw(self, now: float | None = None, final: bool = False) -> None:
        """Redraw now; the next timed redraw comes after the refresh interval, or later if this
        one was slow, so that drawing never takes more than `DRAW_SHARE` of the wall time. The
        live view's `final` frame is drawn once, by `Live.stop()` on leaving the context."""
        now = time.perf_counter() if now is None else now
        if self._backend is not None:
            self.stats.observe_sockets(self._backend.socket_snapshots())
        snapshot = self.stats.snapshot(now - self._wall_start)
        if self._live is not None:
            size = self.console.size
            self._live.update(render(snapshot, width=size.width, max_socket_rows=max(2, size.height - 27),
                                     log_lines=max(2, min(8, size.height - 34))), refresh=not final)
        else:
            self.console.print(one_line(snapshot), highlight=False, soft_wrap=True)
        self.draws += 1
        self._final_drawn = snapshot.finished
        done = time.perf_counter()
        self._next_draw = done + max(self.interval_s, (done - now) * (1 - DRAW_SHARE) / DRAW_SHARE)


def _virtual_span_ns(events: list[dict]) -> int:
    """Virtual time a replay walks through: the latest start (done events finish in the future)."""
    return max((e.get("t_ns", 0) for e in events if e["type"] != "done"), default=0)


def load_events(events_path: str | Path) -> list[dict]:
    """All events of a recorded run (read before a replay starts, so a corrupt file is an error
    before anything is drawn)."""
    events = list(read_events(events_path))
    if not events:
        raise UserError(f"{events_path}: no events to replay")
    return events


def replay(events: Sequence[dict], dashboard: LiveDashboard, speed: float | None = None,
           target_wall_s: float = 3.0) -> dict | None:
    """Feed a recorded run through `dashboard`, paced by virtual time: `speed` virtual seconds
    per wall second, or by default the whole run in about `target_wall_s`. Returns the end
    event's summary (None for a crashed run)."""
    span_s = _virtual_span_ns(events) / 1e9
    if speed is not None and speed <= 0:
        raise UserError(f"--speed: expected a positive number, got {speed}")
    speed = speed or (span_s / target_wall_s if span_s > 0 else 1.0)
    started = time.perf_counter()
    summary = None
    for event in _paced(events, started, speed, dashboard):
        dashboard(event)
        if event["type"] == "end":
            summary = event.get("summary")
    return summary


def _paced(events: Iterable[dict], started: float, speed: float, dashboard: LiveDashboard) -> Iterable[dict]:
    """Yield events no earlier than their virtual time says, keeping the dashboard drawn meanwhile."""
    for event in events:
        if event["type"] != "done":
            due = started + event.get("t_ns", 0) / 1e9 / speed
            while (wait := due - time.perf_counter()) > 0.002:
                time.sleep(min(wait, dashboard.interval_s))
                dashboard.tick()
        yield event
