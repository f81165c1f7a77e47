"""Datapath port names, from `ovs-appctl dpctl/show` of the traced ovs-vswitchd.

The in_port in a flow key is the datapath port number, which only the vswitchd that
owns the datapath can name. Its control socket is found through the process's own
open sockets, so the right instance answers even when several run.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

_DATAPATH = re.compile(r"^(\S+@\S+):\s*$")
_PORT = re.compile(r"^\s+port (\d+): (\S+)")
_LOST = re.compile(r"^\s+lookups:.*\blost:(\d+)")
_VIA_PROC_FD = re.compile(r"^/proc/self/fd/\d+/([^/]+)$")
_DEFAULT_RUN_DIRECTORIES = ("/var/run/openvswitch", "/run/openvswitch")

PortMap = dict[tuple[str, int], str]


def _datapath_lines(text: str) -> Iterator[tuple[str, str]]:
    """(dpif, line) for each line of `ovs-appctl dpctl/show` output under a datapath."""
    dpif = None
    for line in text.splitlines():
        if m := _DATAPATH.match(line):
            dpif = m.group(1)
        elif dpif:
            yield dpif, line


def parse_dpctl_show(text: str) -> PortMap:
    """{(dpif, port number): name} from `ovs-appctl dpctl/show` output."""
    return {(dpif, int(m.group(1))): m.group(2)
            for dpif, line in _datapath_lines(text) if (m := _PORT.match(line))}


def parse_datapath_lost(text: str) -> dict[str, int]:
    """{dpif: its `lost:` counter} from `ovs-appctl dpctl/show` output: the upcalls the
    datapath failed to deliver since it was created."""
    return {dpif: int(m.group(1))
            for dpif, line in _datapath_lines(text) if (m := _LOST.match(line))}


def control_socket(pid: int) -> str | None:
    """The unixctl socket (`*.ctl`) that process `pid` listens on, if any."""
    inodes = {t[len("socket:["):-1] for t in _open_files(pid) if t.startswith("socket:[")}
    try:
        # The table of the process's own network namespace: /proc/net/unix lists only ours.
        table = Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in table:
        fields = line.split(maxsplit=7)
        if len(fields) == 8 and fields[6] in inodes and fields[7].endswith(".ctl"):
            return _bound_path(pid, fields[7])
    return None


def _bound_path(pid: int, name: str) -> str | None:
    """A path that reaches the socket bound as `name` by process `pid`.

    OVS binds a path too long for sun_path as /proc/self/fd/DIRFD/BASENAME and then closes
    DIRFD, so the kernel's name is only a base name: look for it where that process keeps
    its run directory.
    """
    if not (m := _VIA_PROC_FD.match(name)):
        return name
    for directory in _run_directories(pid):
        path = os.path.join(directory, m.group(1))
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return path
        except OSError:
            continue
    return None


def _run_directories(pid: int) -> list[str]:
    """Where process `pid` may have put its control socket, most likely first."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        environ = []
    from_environment = [os.fsdecode(v[len(b"OVS_RUNDIR="):]) for v in environ
                        if v.startswith(b"OVS_RUNDIR=")]
    # Its pidfile and log file, kept open, live in the run and log directories.
    of_open_files = [os.path.dirname(t) for t in _open_files(pid)
                     if t.startswith("/") and not t.startswith(("/dev/", "/proc/"))]
    return [*from_environment, *of_open_files, *_DEFAULT_RUN_DIRECTORIES]


def _open_files(pid: int) -> list[str]:
    """What process `pid`'s file descriptors point at, skipping any closed meanwhile."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    targets = []
    for fd in fds:
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return targets


def dpctl_show(pid: int) -> str:
    """`ovs-appctl dpctl/show` of that vswitchd, or "" when it cannot be asked."""
    socket = control_socket(pid)
    if socket is None:
        return ""
    try:
        done = subprocess.run(
            ["ovs-appctl", "-t", socket, "dpctl/show"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout if done.returncode == 0 else ""


class PortNames:
    """Names ports, and numbers them by name, asking the vswitchd again on an unknown one
    at most every `refresh_interval` seconds.

    `known`: dpctl/show text read at the start. A stuck ovs-vswitchd (the moment upcalls
    fail) answers nothing, so the names are best learnt while it still answers."""

    def __init__(self, fetch: Callable[[], str], refresh_interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic, known: str = "") -> None:
        self._fetch = fetch
        self._interval = refresh_interval
        self._clock = clock
        self._fetched_at: float | None = None
        self._learn(known)
        if self._ports:
            self._fetched_at = clock()

    def _learn(self, text: str) -> None:
        self._ports: PortMap = parse_dpctl_show(text)
        self._numbers = {(dpif, name): port for (dpif, port), name in self._ports.items()}

    def _refreshed(self) -> bool:
        if not self._may_refresh():
            return False
        self._fetched_at = self._clock()
        self._learn(self._fetch())
        return True

    def name(self, dpif: str, port: int) -> str | None:
        found = self._ports.get((dpif, port))
        if found is None and self._refreshed():
            found = self._ports.get((dpif, port))
        return found

    def number(self, dpif: str, name: str) -> int | None:
        """The datapath port of the device `name` (the kernel names devices)."""
        found = self._numbers.get((dpif, name))
        if found is None and self._refreshed():
            found = self._numbers.get((dpif, name))
        return found

    def _may_refresh(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at >= self._interval


def no_port_names(dpif: str, port: int) -> None:
    return None
