"""--follow: after the traced ovs-vswitchd exits, find the one that replaces it and attach.

Which process is the successor:
- without -p, the one process named ovs-vswitchd, as at the start;
- with -p, a process running the same executable as the traced one (its /proc/PID/exe
  names the same path; a binary replaced by an upgrade still counts as the same path).
Either way it must have started after the traced process did, so that another instance
already running beside it (from the same binary, say in another namespace) is never
taken for its successor. While no candidate runs, or while several do, the capture keeps
waiting, saying so once on stderr. A candidate without the dpif_recv:recv_upcall probe,
or one the probe cannot be attached to, is named on stderr and passed over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from upcall_capture.errors import UsageError
from upcall_capture.target import (
    PROBE_NAME,
    PROBE_PROVIDER,
    VSWITCHD,
    Process,
    check_probe,
    is_alive,
    process,
)
from upcall_capture.view import clock_time

LOOK_INTERVAL_S = 0.25
# A process younger than this may not have mapped the library that holds the probe yet:
# a failed probe check is tried again rather than held against it.
SETTLE_NS = 1_000_000_000


class AttachableProbe(Protocol):
    def attach(self) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Followed:
    probe: AttachableProbe  # attached
    process: Process
    note: str  # for the first upcall after the gap


def start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19]) if len(fields) > 19 else None


def same_path(exe: str) -> str:
    return exe.removesuffix(" (deleted)")


class Follower:
    """Waits for the traced process's successor and attaches a new probe to it."""

    def __init__(self, first: Process, *, same_exe: bool,
                 make_probe: Callable[[int], AttachableProbe],
                 say: Callable[[str], None],
                 attached: Callable[[int], None] = lambda pid: None) -> None:
        self.current = first
        self.same_exe = same_exe
        self.make_probe = make_probe
        self.attached = attached  # called with the successor's pid once its probe is on
        self.say = say
        self.restarts = 0
        self._started = start_ticks(first.pid) or 0
        self._passed_over: set[int] = set()
        self._first_seen: dict[int, int] = {}
        self._last_said = ""

    def wait(self, keep_waiting: Callable[[], bool]) -> Followed | None:
        """The successor, with a probe attached; None once keep_waiting() says to stop."""
        gone = self.current
        exited_ns = time.time_ns()
        self._passed_over.add(gone.pid)
        wanted = f"a new {same_path(gone.exe)}" if self.same_exe else f"a new {VSWITCHD}"
        self.say(f"{gone.comm} (pid {gone.pid}) exited; waiting for {wanted} (--follow)")
        while keep_waiting():
            found = self._look()
            if found is not None:
                probe, successor = found
                self.current = successor
                self.restarts += 1
                self._started = start_ticks(successor.pid) or self._started
                self.say(f"listening on {PROBE_PROVIDER}:{PROBE_NAME} in {successor.comm} "
                         f"(pid {successor.pid}), restart {self.restarts} followed")
                note = (f"after a gap: {gone.comm} pid {gone.pid} exited at "
                        f"{_clock(exited_ns)}, pid {successor.pid} attached at "
                        f"{_clock(time.time_ns())}")
                return Followed(probe, successor, note)
            time.sleep(LOOK_INTERVAL_S)
        return None

    def _matches(self, candidate: Process) -> bool:
        if self.same_exe:
            return same_path(candidate.exe) == same_path(self.current.exe)
        return candidate.comm == VSWITCHD

    def _candidates(self) -> list[Process]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in self._passed_over:
                continue
            try:
                candidate = process(int(entry.name))
            except UsageError:
                continue  # it exited while we looked
            started = start_ticks(candidate.pid)
            if self._matches(candidate) and started is not None and started >= self._started \
                    and is_alive(candidate.pid):
                found.append(candidate)
        return found

    def _look(self) -> tuple[AttachableProbe, Process] | None:
        candidates = self._candidates()
        if len(candidates) > 1:
            pids = ", ".join(f"{p.pid} ({p.exe})" for p in sorted(candidates, key=lambda p: p.pid))
            self._say_once(f"several candidates to follow are running: {pids}; waiting until "
                           f"only one is")
        if len(candidates) != 1:
            return None
        candidate = candidates[0]
        now = time.monotonic_ns()
        first_seen = self._first_seen.setdefault(candidate.pid, now)
        try:
            check_probe(candidate)
        except UsageError as err:
            if now - first_seen >= SETTLE_NS:
                self._pass_over(candidate, err)
            return None
        probe = self.make_probe(candidate.pid)
        try:
            probe.attach()
        except UsageError as err:
            probe.close()
            self._pass_over(candidate, err)
            return None
        self.attached(candidate.pid)
        return probe, candidate

    def _pass_over(self, candidate: Process, err: UsageError) -> None:
        self._passed_over.add(candidate.pid)
        self.say(f"{err}; not following it, still waiting")

    def _say_once(self, text: str) -> None:
        if text != self._last_said:
            self._last_said = text
            self.say(text)


def _clock(wall_ns: int) -> str:
    return clock_time(wall_ns)[:12]  # HH:MM:SS.mmm
