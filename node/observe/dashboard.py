"""The live terminal dashboard of a run (`rdu run --dashboard`, `rdu dash RUN_DIR`).

`render(snapshot)` draws a `StatsSnapshot` (live_stats.py) and looks at nothing else, so it
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
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from rdu.base import UserError, format_bytes
from rdu.interconnect.topology import Topology
from rdu.node.observe.events_log import read_run
from rdu.node.observe.live_stats import GroupView, LiveStats, SocketView, StatsSnapshot, format_virtual_s, moves_now
from rdu.node.observe.timeline_state import copy_lanes
from rdu.scheduler.timeline import End, Event, Setup

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


def _state(s: StatsSnapshot) -> str:
    return ("stopped: " + s.stopped if s.stopped else "interrupted" if s.interrupted
            else "finished" if s.finished else "running")


def _pack(parts: Sequence[Text], width: int, gap: int = 3) -> list[Text]:
    """Short phrases laid left to right, wrapped between phrases (never inside one), so that a
    wide terminal spends fewer lines on the header than a narrow one."""
    lines: list[Text] = []
    for part in parts:
        if lines and lines[-1].cell_len + gap + part.cell_len <= width:
            lines[-1].append(" " * gap).append_text(part)
        else:
            lines.append(Text(no_wrap=True, overflow="ellipsis").append_text(part))
    return lines


def _header_lines(s: StatsSnapshot, width: int) -> list[Text]:
    """The lines inside the header panel, for a panel `width` columns wide inside."""
    hit = f"{s.hit_rate:.0%}" if s.hit_rate is not None else "-"
    figures = [Text(f"virtual time {format_virtual_s(s.clock_ns)}"), Text(f"wall time {s.wall_s:,.1f} s"),
               *([Text(f"{s.clock_ns / 1e9 / s.wall_s:,.1f} virtual s per wall s")] if s.wall_s > 0 else []),
               Text(f"throughput {s.tokens_per_s:,.0f} tokens/s"),
               Text(f"switches {s.switches:,} (prefetched {s.prefetches:,})"), Text(f"evictions {s.evictions:,}"),
               *([Text(f"preemptions {s.preemptions:,}")] if s.preemptions else []),
               Text(f"HBM hits {hit} of expert runs")]
    nodes = [Text(f"node{node.index} {node.capacity_tier_name} ")
             + _tier(node.capacity_tier_used_bytes, node.capacity_tier_bytes, 6)
             + Text(f" of {format_bytes(node.capacity_tier_bytes)}"
                    + ("" if node.capacity_tier_used_bytes is not None else " (not in the events)"), style="dim")
             for node in s.nodes_view[:4]]
    if len(s.nodes_view) > 4:
        nodes.append(Text(f"... {len(s.nodes_view) - 4} more nodes", style="dim"))
    return [
        Text.assemble((f"{s.experts} x {s.model} on {s.nodes} x {s.platform}, TP{s.tp}, {s.policy}", "bold"),
                      ("   " + s.name, "dim"), no_wrap=True, overflow="ellipsis"),  # the name repeats the rest
        *_pack(figures, width),
        *([Text(f"faults {len(s.faults)}, latest: {s.faults[-1].strip()}", style="bold red", no_wrap=True,
                overflow="ellipsis")] if s.faults else []),
        Text("requests ", no_wrap=True, overflow="ellipsis") + _bar(s.progress, min(30, max(10, width - 50)))
        + Text(f"  {s.completed:,} done / {s.requests_total:,}  (arrived {s.arrived:,})"),
        *_pack(nodes, width),
    ]


def _header(s: StatsSnapshot, lines: list[Text]) -> RenderableType:
    """The panel; its title says how the run stands, so the last frame says how it ended."""
    style = "bold red" if s.stopped or s.interrupted else "bold green" if s.finished else "bold"
    return Panel(Group(*lines), title=Text.assemble("rdu dashboard ", (f"[{_state(s)}]", style)),
                 title_align="left")


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


def _ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 4, 5] -> `0-2,4-5`."""
    spans: list[list[int]] = []
    for index in sorted(indices):
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def _members_label(views: Sequence[SocketView]) -> str:
    """`node0 s0-7 x8` for eight sockets that look the same; the socket's own name for one."""
    if len(views) == 1:
        return views[0].name
    by_node: dict[int, list[int]] = {}
    for view in views:
        node, socket = Topology.parse(view.name)
        by_node.setdefault(node, []).append(socket)
    return " ".join(f"node{node} s{_ranges(sockets)}" for node, sockets in by_node.items()) + f" x{len(views)}"


def _looks(view: SocketView) -> tuple:
    """Everything a socket row shows except the socket's name: members that agree share a row."""
    return (view.group, view.hbm_used_bytes, view.hbm_capacity_bytes, view.sram_used_bytes, view.resident,
            view.loading, round(view.busy_fraction, 3), view.state)


def _socket_rows(s: StatsSnapshot, max_rows: int | None = None) -> list[tuple[str, SocketView]]:
    """(label, view) per row: the members of a TP group hold the same experts and run in
    lockstep, so they share one row, unless something (a fault, a ledger sample) sets some of
    them apart; then each distinct look gets its own row. If those are more than `max_rows`,
    one row per group, which names the members that differ."""
    looks: dict[tuple, list[SocketView]] = {}
    groups: dict[str, list[SocketView]] = {}
    for view in s.sockets:
        looks.setdefault(_looks(view), []).append(view)
        groups.setdefault(view.group, []).append(view)
    if max_rows is not None and len(looks) > max_rows:
        return [(_members_label(views), _group_view(views)) for views in groups.values()]
    rows = [(_members_label(views), views[0]) for views in looks.values()]
    order = {name: i for i, name in enumerate(groups)}
    return sorted(rows, key=lambda row: order[row[1].group])   # stable: a group's rows stay together


def _group_view(views: Sequence[SocketView]) -> SocketView:
    """One view for a whole group: its first member's, with the states of those that differ."""
    one_node = len({view.node for view in views}) == 1   # then the row's label names the node
    marks = [f"{'s' + str(Topology.parse(view.name)[1]) if one_node else view.name} {view.state}"
             for view in views if view.state and view.state != "down"]
    state = "down" if all(view.state == "down" for view in views) else ", ".join(marks)
    return replace(views[0], state=state)


def _show_sram(s: StatsSnapshot) -> bool:
    """The SRAM column only carries information once some sampled ledger says a byte is used."""
    return any(view.sram_used_bytes for view in s.sockets)


def _sockets(s: StatsSnapshot, max_rows: int, width: int, title: bool = True) -> list[Text]:
    rows = _socket_rows(s, max_rows)
    sram = _show_sram(s)
    bar_w = 10 if width >= 110 else 6
    name_w = max([len("sockets"), *(len(label) for label, _ in rows)])
    group_w = max([len("group"), *(len(v.group) for v in s.sockets)])
    hbm_w, busy_w, sram_w = bar_w + 17, bar_w + 6, 12
    fixed = name_w + group_w + hbm_w + busy_w + 4 + (sram_w + 1 if sram else 0)
    rest = max(10, width - fixed - 1)
    lines = [_title("sockets: memory tiers, busy share, experts resident in HBM")] if title else []
    lines.append(_row(("sockets", name_w), ("group", group_w), *([("SRAM", sram_w)] if sram else []),
                      ("HBM", hbm_w), ("busy", busy_w), ("in HBM (most recently used first)", rest)))
    shown = rows if len(rows) <= max_rows else rows[:max(0, max_rows - 1)]
    for label, view in shown:
        lines.append(_socket_line(view, label, sram, bar_w, (name_w, group_w, sram_w, hbm_w, busy_w, rest)))
    if len(shown) < len(rows):
        lines.append(Text(f"... {len(rows) - len(shown)} more rows (a taller terminal shows them)", style="dim"))
    return lines


def _socket_line(view: SocketView, label: str, sram: bool, bar_w: int, widths: tuple[int, ...]) -> Text:
    name_w, group_w, sram_w, hbm_w, busy_w, rest = widths
    experts = [m for m in view.resident if m.startswith("expert")]
    others = [m for m in view.resident if not m.startswith("expert")]
    state = Text(f"{view.state}; ", style="bold red" if "down" in view.state or "restarting" in view.state
                 else "yellow") \
        if view.state else Text("")
    loading = f" loading {' '.join(_short(m) for m in view.loading)};" if view.loading else ""
    extra = (" + " + ", ".join(others)) if others and rest >= 40 else ""  # narrow: the experts matter more
    recent_first = " ".join(_short(m) for m in reversed(experts))
    resident = state + Text(f"{len(experts)} experts{extra}:{loading} {recent_first}")
    hbm = _tier(view.hbm_used_bytes, view.hbm_capacity_bytes, bar_w) + Text(f" {format_bytes(view.hbm_used_bytes)}")
    sram_cell = [(_tier(view.sram_used_bytes, view.sram_capacity_bytes, 6), sram_w)] if sram else []
    return _row((label, name_w), (view.group, group_w), *sram_cell, (hbm, hbm_w),
                (_bar(view.busy_fraction, bar_w), busy_w), (resident, rest))


class _Block(NamedTuple):
    """Lines drawn side by side with other blocks; `min_width` is as narrow as it may be cut
    (only a block whose last column is free text may be cut at all)."""

    lines: list[Text]
    min_width: int


def _block(lines: list[Text], cut_cells: int = 0) -> _Block:
    width = max(line.cell_len for line in lines)
    return _Block(lines, width - cut_cells)


def _links(s: StatsSnapshot) -> _Block:
    name_w = max([len("links"), *(len(link.name) for link in s.links)])
    moved = [format_bytes(link.bytes_moved) if link.bytes_moved is not None else link.note for link in s.links]
    moved_w = max([len("moved"), *(len(m) for m in moved)])
    lines = [_row((_title("links"), name_w), ("busy share", 13), ("moved", moved_w))]
    for link, text in zip(s.links, moved):
        lines.append(_row((link.name, name_w), (_bar(link.busy_fraction, 8), 13), (text, moved_w)))
    return _block(lines)


def _kv_cell(group: GroupView, bar_w: int) -> Text:
    """KV blocks held, as a share of the pool the resident weights leave (vLLM's "KV cache usage")."""
    if group.kv_pool_bytes <= 0:
        return Text("-")
    return _bar(group.kv_bytes / group.kv_pool_bytes, bar_w)


def _queues(s: StatsSnapshot, width: int = 120) -> _Block:
    """Per group: requests waiting, the batch it runs (sequences, for the continuous engine) and
    its KV use; the KV bar is 2 cells on an 80-column terminal, where the block must still fit
    beside the latency block."""
    name_w = max([len("queue"), *(len(g.name) for g in s.groups)])
    now_w = max([len("now"), *(len(g.activity) for g in s.groups)])
    bar_w = 2 if width < 100 else 8
    lines = [_row((_title("queue"), name_w), ("waiting", 7), ("batch", 5), ("KV use", bar_w + 5), ("now", now_w))]
    for group in s.groups:
        lines.append(_row((group.name, name_w), (f"{group.waiting:>7,}", 7), (f"{group.batch:>5}", 5),
                          (_kv_cell(group, bar_w), bar_w + 5), (group.activity, now_w)))
    return _block(lines, cut_cells=max(0, now_w - 12))  # `expert0042 …` still says who runs


def _latency(s: StatsSnapshot) -> _Block:
    """Percentiles of the completed requests (how many: the header's `done` count)."""
    lines = [_row((_title("latency"), 10), *((f"{q:>8}", 8) for q in ("p50", "p90", "p99")))]
    for label, values in (("TTFT", s.ttft_ns), ("TPOT", s.tpot_ns), ("end-to-end", s.e2e_ns)):
        lines.append(_row((label, 10), *((f"{_duration(values[q]):>8}", 8) for q in ("p50", "p90", "p99"))))
    return _block(lines)


def _flow(blocks: list[_Block], width: int, gap: int = 2) -> list[Text]:
    """Lay blocks of lines left to right, starting a new row of blocks when one would not fit
    even cut down to its `min_width`."""
    rows: list[list[tuple[list[Text], int]]] = [[]]
    used = 0
    for lines, min_width in blocks:
        block_w = min(width, max(line.cell_len for line in lines))
        room = width - used - (gap if rows[-1] else 0)
        if rows[-1] and room < min(block_w, min_width):
            rows.append([])
            used, room = 0, width
        block_w = min(block_w, room)
        used += (gap if rows[-1] else 0) + block_w
        rows[-1].append((lines, block_w))
    out: list[Text] = []
    for row in rows:
        for i in range(max(len(lines) for lines, _ in row)):
            line = Text(no_wrap=True, overflow="ellipsis")
            for j, (lines, block_w) in enumerate(row):
                cell = lines[i].copy() if i < len(lines) else Text("")
                cell.truncate(block_w, overflow="ellipsis", pad=True)
                line.append(" " * gap if j else "").append_text(cell)
            out.append(line)
        out.append(Text(""))
    return out[:-1]


def _log(s: StatsSnapshot, lines: int) -> RenderableType:
    shown = s.log[-lines:] if lines > 0 else ()
    body = Text("\n".join(shown) if shown else "no switches yet", no_wrap=True, overflow="ellipsis")
    return Panel(body, title="switches, evictions, faults", title_align="left")


class _Plan(NamedTuple):
    """What fits on the screen: socket rows, log lines, the links block, spacing."""

    socket_rows: int
    log_lines: int
    links: bool
    spacious: bool          # the sockets' title line and blank lines between sections


def _plan(s: StatsSnapshot, width: int, height: int, header_lines: int) -> _Plan:
    """Fit the dashboard in `height` lines, giving up the least useful parts first: spacing,
    then the links block, then socket rows; the latency percentiles, the request queue and at
    least two lines of the log always stay."""
    rows = len(_socket_rows(s))
    core_h = len(_flow([_latency(s), _queues(s, width)], width))
    full_h = len(_flow([_latency(s), _queues(s, width), _links(s)], width))
    fixed = header_lines + 2 + 1 + 2     # header panel, sockets' column header, log panel borders
    for spacious, links, min_log in ((True, True, 4), (False, True, 3), (False, False, 2)):
        left = height - fixed - (full_h if links else core_h) - (2 if spacious else 0) - rows
        if left >= min_log:
            return _Plan(rows, min(8, left), links, spacious)
    left = height - fixed - core_h - 2
    return _Plan(max(1, left), 2, False, False)


def render(snapshot: StatsSnapshot, width: int = 120, max_socket_rows: int = 16, log_lines: int = 6,
           height: int | None = None) -> RenderableType:
    """The whole dashboard, drawn from `snapshot` alone, for a terminal `width` columns wide;
    with `height`, fitted into that many lines (which overrides `max_socket_rows` and `log_lines`)."""
    header_lines = _header_lines(snapshot, width - 4)
    plan = _Plan(max_socket_rows, log_lines, True, True) if height is None else \
        _plan(snapshot, width, height, len(header_lines))
    blocks = [_latency(snapshot), _queues(snapshot, width), *([_links(snapshot)] if plan.links else [])]
    gap = [Text("")] if plan.spacious else []
    sockets = _sockets(snapshot, plan.socket_rows, width, title=plan.spacious)
    body = Text("\n", no_wrap=True).join([*sockets, *gap, *_flow(blocks, width)])
    return Group(_header(snapshot, header_lines), body, _log(snapshot, plan.log_lines))


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
        self._backend = None  # whatever ended the run, the backend may be gone by now: never touch it
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

    def detach(self) -> None:
        """The backend is about to shut down (its Ray actors and refs die with the session): take
        the last sample of its ledgers now and forget it, so that the final frame, drawn after
        the shutdown, reads nothing but what was sampled."""
        self._sample()
        self._backend = None

    def _sample(self) -> None:
        """Read the backend's socket ledgers. The dashboard only watches: a ledger that cannot be
        read (a killed actor, a session going away) must not end the run, so on an error it
        stops sampling and keeps the last sample it has."""
        if self._backend is None:
            return
        try:
            self.stats.observe_sockets(self._backend.socket_snapshots())
        except Exception:  # noqa: BLE001 - any Ray error: stop watching, the run goes on
            self._backend = None

    def __call__(self, event: Event) -> None:
        self.stats.feed(event)
        if isinstance(event, Setup):  # serving starts now (a Ray backend may have taken seconds to start)
            self._wall_start = time.perf_counter()
            self._next_draw = self._wall_start + self.interval_s
        elif isinstance(event, End):
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
        `final` frame is shown at once (writing the outputs takes a while yet) and never samples
        the backend, which may be gone by then."""
        now = time.perf_counter() if now is None else now
        if not final:
            self._sample()
        snapshot = self.stats.snapshot(now - self._wall_start)
        if self._live is not None:
            size = self.console.size
            self._live.update(render(snapshot, width=size.width, height=size.height - 1), refresh=True)
        else:
            self.console.print(one_line(snapshot), highlight=False, soft_wrap=True)
        self.draws += 1
        self._final_drawn = snapshot.finished
        done = time.perf_counter()
        self._next_draw = done + max(self.interval_s, (done - now) * (1 - DRAW_SHARE) / DRAW_SHARE)


def _virtual_span_ns(events: Sequence[Event]) -> int:
    """Virtual time a replay walks through: as far as the engines came (arrivals are routed
    ahead of them, done events finish in the future)."""
    return max((e.t_ns for e in events if moves_now(e)), default=0)


def load_events(events_path: str | Path) -> list[Event]:
    """All events of a recorded run, its setup first (read before a replay starts, so a corrupt
    file is an error before anything is drawn)."""
    setup, rest = read_run(events_path)
    copy_lanes(setup, f"{events_path}: event 1 (setup)")   # a setup the views cannot lay out: refused now
    return [setup, *rest]


def replay(events: Sequence[Event], dashboard: LiveDashboard, speed: float | None = None,
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
        if isinstance(event, End):
            summary = event.summary
    return summary


def _paced(events: Iterable[Event], started: float, speed: float, dashboard: LiveDashboard) -> Iterable[Event]:
    """Yield events no earlier than their virtual time says, keeping the dashboard drawn meanwhile."""
    for event in events:
        if moves_now(event):
            due = started + event.t_ns / 1e9 / speed
            while (wait := due - time.perf_counter()) > 0.002:
                time.sleep(min(wait, dashboard.interval_s))
                dashboard.tick()
        yield event
