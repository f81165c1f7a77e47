"""--top: a live full-screen view of what is causing upcalls, refreshed every second.

`TopWindow` counts the last WINDOW_S seconds, one tally per second, by type, datapath
and the field groups of --stats (groups.py); `render` turns a snapshot of it into the
screen's lines. Both are pure: time is passed in (the wall clock live, the file's own
time with -r). `TopScreen` is the curses part, in a thread of its own; `TopOutput`
feeds a live capture's records to the window without ever slowing the capture: when
the view cannot keep up, the records it had no time for are counted, not examined,
and the screen says which share of the upcalls its groups were made from.
"""

from __future__ import annotations

import curses
import os
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import groupby

from upcall_capture.errors import UsageError
from upcall_capture.groups import Group
from upcall_capture.stats import NS_PER_S, GroupCounts, fields_of, key_fields_cache
from upcall_capture.view import CapturedUpcall, clock_time

WINDOW_S = 10
TALLY_CAPACITY = 200  # values each group's table keeps exactly, per second


class _Tally:
    """One second's counts."""

    def __init__(self, groups: Sequence[Group]) -> None:
        self.arrived = 0  # every upcall
        self.examined = 0  # the ones the groups were counted from
        self.types: Counter[str] = Counter()
        self.dpifs: Counter[str] = Counter()
        self.groups = [GroupCounts(group, TALLY_CAPACITY) for group in groups]


@dataclass
class Snapshot:
    """What the screen shows: the window's counts and the capture's own state."""

    now_s: int
    seconds: int  # the window's length: what it holds so far, at most WINDOW_S
    arrived: int  # upcalls in the window
    examined: int
    last_second: int  # upcalls in the last whole second
    types: list[tuple[str, int]]
    dpifs: list[tuple[str, int]]
    groups: list[dict]
    status: list[str] = field(default_factory=list)  # the capture's losses, the ring...


class TopWindow:
    """Counts of the last `seconds` seconds, by second; safe to feed from one thread and
    read from another."""

    def __init__(self, groups: Sequence[Group], seconds: int = WINDOW_S) -> None:
        self.groups = groups
        self.seconds = seconds
        self._tallies: dict[int, _Tally] = {}
        self._first_s: int | None = None  # the first second counted
        self._fields = key_fields_cache()
        self._lock = threading.Lock()

    def _tally(self, second: int) -> _Tally:
        tally = self._tallies.get(second)
        if self._first_s is None or second < self._first_s:
            self._first_s = second
        if tally is None:
            tally = self._tallies[second] = _Tally(self.groups)
            for old in [s for s in self._tallies if s <= second - self.seconds - 1]:
                del self._tallies[old]
        return tally

    def arrived(self, count: int, second: int) -> None:
        with self._lock:
            self._tally(second).arrived += count

    def add(self, items: Sequence[CapturedUpcall], second: int | None = None, *,
            arrived: bool = True) -> None:
        """Count items in `second`, or each in its own second (a file read back);
        `arrived=False` for items already counted by arrived()."""
        batches = [(second, items)] if second is not None else [
            (s, list(group)) for s, group in groupby(items, lambda i: i.wall_ns // NS_PER_S)]
        for at, batch in batches:
            fields = fields_of(batch, self._fields)  # outside the lock: the costly part
            with self._lock:
                tally = self._tally(at)
                if arrived:
                    tally.arrived += len(batch)
                tally.examined += len(batch)
                for item in batch:
                    upcall = item.upcall
                    kind = upcall.type_name if upcall.type >= 0 else "unknown"
                    # The kernel side's failed upcalls: the ones an operator watches for.
                    tally.types[f"{kind} failed" if upcall.failed else kind] += 1
                    tally.dpifs[upcall.dpif or "unknown"] += 1
                for counts in tally.groups:
                    counts.add(batch, fields)

    def snapshot(self, now_s: int, top: int) -> Snapshot:
        """The `seconds` whole seconds before second `now_s` (still being counted), or
        fewer when counting started later."""
        merged = _Tally(self.groups)
        with self._lock:
            seconds = self.seconds if self._first_s is None else \
                max(1, min(self.seconds, now_s - self._first_s))
            first = now_s - seconds
            tallies = [t for s, t in self._tallies.items() if first <= s < now_s]
            last = self._tallies.get(now_s - 1)
            for tally in tallies:
                merged.arrived += tally.arrived
                merged.examined += tally.examined
                merged.types.update(tally.types)
                merged.dpifs.update(tally.dpifs)
                for into, counts in zip(merged.groups, tally.groups, strict=True):
                    into.merge(counts)
        return Snapshot(
            now_s=now_s, seconds=seconds, arrived=merged.arrived,
            examined=merged.examined, last_second=last.arrived if last else 0,
            types=merged.types.most_common(), dpifs=merged.dpifs.most_common(),
            groups=[counts.report(merged.examined, top) for counts in merged.groups],
        )


def render(snapshot: Snapshot, width: int, height: int, title: str) -> list[str]:
    """The screen's lines, each at most `width` long, at most `height` of them.

    Rates are per second over the window. When the view examined only some of the
    upcalls, a value's rate is its share of those times the rate of all of them, and a
    line says so."""
    seconds = snapshot.seconds
    examined = snapshot.examined or 1
    scale = snapshot.arrived / examined / seconds  # a count examined -> upcalls per second

    def rate(count: int) -> str:
        return f"{count * scale:,.0f}/s"

    lines = [f"{title}  {clock_time(snapshot.now_s * NS_PER_S)[:8]}  (q quits)",
             f"upcalls: {snapshot.last_second:,}/s in the last second, "
             f"{snapshot.arrived / seconds:,.0f}/s over {seconds} s",
             *snapshot.status,
             "type: " + ", ".join(f"{name} {rate(count)}" for name, count in snapshot.types),
             "datapath: " + ", ".join(f"{name} {rate(count)}"
                                      for name, count in snapshot.dpifs)]
    if snapshot.examined < snapshot.arrived:
        lines.append(f"the view examined {snapshot.examined / snapshot.arrived:.0%} of the "
                     "upcalls (it fell behind, the capture did not): rates below are "
                     "estimated from them")
    lines.append(f"top values over the last {seconds} s: share of the upcalls, rate")
    lines = [line[:width] for line in lines]
    groups = [group for group in snapshot.groups if group["with"]]
    room = height - len(lines)
    if not groups or room < 2:
        return lines[:height]
    columns = 2 if width >= 100 and len(groups) > 1 else 1
    column_width = width // columns - (1 if columns > 1 else 0)
    per_column = -(-len(groups) // columns)
    per_group = max(1, room // per_column - 1)  # rows of values under each title
    blocks = []
    for group in groups:
        approximate = " (approximate)" if group["approximate"] else ""
        block = [f"by {group['name']}{approximate}:"]
        block += [f" {entry['share']:>6.1%} {rate(entry['count']):>11}  {entry['value']}"
                  for entry in group["top"][:per_group]]
        if not group["top"]:
            block.append(f"  every value rare: none seen over {group['max_error']} times")
        blocks.append([line[:column_width].ljust(column_width) for line in block])
    cells = [[line for block in blocks[c * per_column:(c + 1) * per_column] for line in block]
             for c in range(columns)]
    for row in range(min(room, max(len(cell) for cell in cells))):
        lines.append(" ".join(cell[row] if row < len(cell) else " " * column_width
                              for cell in cells).rstrip())
    return lines[:height]


def check_terminal(stream) -> None:
    """The view needs `stream` to be a terminal that curses knows."""
    if not stream.isatty():
        raise UsageError("--top needs a terminal on standard output")
    try:
        curses.setupterm(fd=stream.fileno())
    except curses.error as err:
        raise UsageError(f"--top cannot use this terminal: {err}") from None


class TopScreen:
    """The full-screen view (curses), redrawn every `interval` seconds from `snapshot()`,
    in a thread of its own; q calls `on_quit`."""

    def __init__(self, snapshot: Callable[[int, int], list[str]], on_quit: Callable[[], None],
                 interval: float = 1.0) -> None:
        self.snapshot = snapshot  # (width, height) -> the lines
        self.on_quit = on_quit
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="top", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Leave the full screen (the terminal is as it was)."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            curses.wrapper(self._loop)
        except curses.error:
            pass  # the terminal went away (its window was closed): nothing to draw on

    def _loop(self, screen) -> None:
        curses.curs_set(0)
        screen.timeout(100)  # how often a key and a stop are looked for, ms
        next_draw = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_draw:
                next_draw = time.monotonic() + self.interval
                self._draw(screen)
            key = screen.getch()
            if key in (ord("q"), ord("Q")):
                self.on_quit()
                return
            if key == curses.KEY_RESIZE:
                next_draw = 0.0

    def _draw(self, screen) -> None:
        # The terminal's own size: a resize whose SIGWINCH went to another thread (or
        # came before curses started) would otherwise go unseen.
        size = os.get_terminal_size(sys.__stdout__.fileno())
        if (size.lines, size.columns) != screen.getmaxyx():
            curses.resizeterm(size.lines, size.columns)
        height, width = screen.getmaxyx()
        screen.erase()
        # The last column of the last line cannot be written without an error.
        for row, line in enumerate(self.snapshot(width - 1, height)):
            screen.addstr(row, 0, line)
        screen.refresh()


class TopView:
    """The screen's lines: the window at `clock()` (a second), under `title`, with the
    capture's own state in `status`, which its owner replaces as it goes."""

    def __init__(self, window: TopWindow, title: str, clock: Callable[[], int], top: int
                 ) -> None:
        self.window = window
        self.title = title
        self.clock = clock
        self.top = top
        self.status: list[str] = []
        self.notes: deque[str] = deque(maxlen=3)  # what would have gone to stderr

    def lines(self, width: int, height: int) -> list[str]:
        snapshot = self.window.snapshot(self.clock(), self.top)
        snapshot.status = [*self.status, *self.notes]
        return render(snapshot, width, height, self.title)


class LiveStatus:
    """The capture's own state on the screen; the capture loop calls it once a second
    (as it would the status line)."""

    def __init__(self, view: TopView, peak_fill: Callable[[], float]) -> None:
        self.view = view
        self.peak_fill = peak_fill

    def __call__(self, captured: int, counters, elapsed: float) -> None:
        self.view.status = [
            f"capture: {captured:,} captured, {counters.lost:,} lost, "
            f"{counters.filtered:,} filtered ({counters.fired:,} fired) in {elapsed:,.0f} s; "
            f"ring at most {self.peak_fill():.0%} full in the last second"]


class Replay:
    """A file's upcalls at the pace of their own time (-r with --top), idle gaps of
    more than MAX_IDLE_S skipped; `now_s()` is the file's time being played."""

    MAX_IDLE_S = 2.0

    def __init__(self) -> None:
        self._offset_ns: int | None = None  # file time minus the monotonic clock
        self.end_ns: int | None = None  # the last upcall's time, once all are played

    def paced(self, items, stopped: threading.Event):
        last_ns = None
        for item in items:
            if self._offset_ns is None:
                self._offset_ns = item.wall_ns - time.monotonic_ns()
            wait = (item.wall_ns - self._offset_ns - time.monotonic_ns()) / 1e9
            if wait > self.MAX_IDLE_S:
                self._offset_ns += int((wait - 1) * 1e9)
                wait = 1.0
            if (wait > 0.01 and stopped.wait(wait)) or stopped.is_set():
                return
            last_ns = item.wall_ns
            yield item
        self.end_ns = last_ns

    def now_s(self) -> int:
        if self.end_ns is not None:
            return self.end_ns // NS_PER_S + 1  # the file's last second stays on screen
        if self._offset_ns is None:
            return 0
        return (time.monotonic_ns() + self._offset_ns) // NS_PER_S


class TopOutput:
    """A live capture's records to the window, counted by a thread of their own that
    holds the GIL at most DUTY of the time, so that the capture keeps its pace. At most
    `max_pending` records wait for it, and none longer than a second: beyond that a
    batch is counted as arrived only (the screen shows what share was examined)."""

    DUTY = 0.25

    def __init__(self, window: TopWindow, to_captured: Callable[[bytes], CapturedUpcall],
                 max_pending: int = 4096) -> None:
        self.window = window
        self.to_captured = to_captured
        self.max_pending = max_pending
        self.ended: str | None = None
        self._queue: deque[tuple[Sequence[bytes], int]] = deque()
        self._pending = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="top-count", daemon=True)
        self._thread.start()

    def prepare(self, records, dropped: int) -> None:
        return None

    def packets(self, records, dropped: int = 0, prepared: object = None) -> None:
        second = time.time_ns() // NS_PER_S
        self.window.arrived(len(records), second)
        with self._cond:
            if self._pending + len(records) <= self.max_pending:
                self._queue.append((records, second))
                self._pending += len(records)
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                records, second = self._queue.popleft()
            started = time.monotonic()
            if second >= time.time_ns() // NS_PER_S - 1:  # else too late for the screen
                self.window.add([self.to_captured(r) for r in records], second,
                                arrived=False)
            with self._cond:
                self._pending -= len(records)
            time.sleep((time.monotonic() - started) * (1 - self.DUTY) / self.DUTY)

    def finish(self, end_ktime_ns: int, start_ktime_ns: int) -> None:
        with self._cond:
            self._closing = True
            self._queue.clear()  # the view is closing: nobody will see them
            self._cond.notify()
        self._thread.join()

    def gap(self, note: str) -> None:
        pass

    def flush(self) -> None:
        pass  # nothing is held back
