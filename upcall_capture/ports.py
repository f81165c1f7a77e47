"""Datapath port names, from `ovs-appctl dpctl/show` of the traced ovs-vswitchd.

The in_port in a flow key is the datapath port number, which only the vswitchd that
owns the datapath can name. Its control socket is found through the process's own
open sockets, so the right instance answers even when several run.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

_DATAPATH = re.compile(r"^(\S+@\S+):\s*$")
_PORT = re.compile(r"^\s+port (\d+): (\S+)")

PortMap = dict[tuple[str, int], str]


def parse_dpctl_show(text: str) -> PortMap:
    """{(dpif, port number): name} from `ovs-appctl dpctl/show` output."""
    ports: PortMap = {}
    dpif = None
    for line in text.splitlines():
        if m := _DATAPATH.match(line):
            dpif = m.group(1)
        elif dpif and (m := _PORT.match(line)):
            ports[(dpif, int(m.group(1)))] = m.group(2)
    return ports


def control_socket(pid: int) -> str | None:
    """The unixctl socket (`*.ctl`) that process `pid` listens on, if any."""
    try:
        inodes = {
            os.readlink(f"/proc/{pid}/fd/{fd}")[len("socket:["):-1]
            for fd in os.listdir(f"/proc/{pid}/fd")
        }
        table = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in table:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and fields[7].endswith(".ctl"):
            return fields[7]
    return None


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
    """Names ports, asking the vswitchd again on an unknown port at most every few seconds."""

    def __init__(self, fetch: Callable[[], str], refresh_interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._interval = refresh_interval
        self._clock = clock
        self._ports: PortMap = {}
        self._fetched_at: float | None = None

    def name(self, dpif: str, port: int) -> str | None:
        found = self._ports.get((dpif, port))
        if found is None and self._may_refresh():
            self._fetched_at = self._clock()
            self._ports = parse_dpctl_show(self._fetch())
            found = self._ports.get((dpif, port))
        return found

    def _may_refresh(self) -> bool:
        return self._fetched_at is None or self._clock() - self._fetched_at >= self._interval


def no_port_names(dpif: str, port: int) -> None:
    return None
