"""Loading flow_ops.c through bcc: a process's flow puts and executes, with their ring."""

from __future__ import annotations

import ctypes
import fcntl
import os
import threading
from dataclasses import dataclass, fields
from pathlib import Path

from upcall_capture.errors import UsageError
from upcall_capture.probe.loader import RingProbe, import_bcc, program_text
from upcall_capture.target import usdt_probes

SOURCE = Path(__file__).with_name("flow_ops.c")
PROVIDER = "dpif_netlink_operate__"
PROBES = {"op_flow_put": "trace_op_flow_put", "op_flow_execute": "trace_op_flow_execute"}
# A request is copied up to this much: a 9000-byte jumbo frame's execute, with its key
# and actions; a put is a few hundred bytes.
OPS_CAP = 16384
# 16 MiB: a put is about 400 bytes, an execute its packet and 150 more.
DEFAULT_RING_PAGES = 4096
_SHEDDING = 2  # control[0]'s value for it (SHEDDING in flow_ops.c)
# Where a uprobe put back (rehook) has its fd: above the numbers bcc uses while it loads
# programs (a few dozen each), which its teardown of a program closes a second time.
_HIGH_FD = 512


def missing_probes(pid: int) -> list[str]:
    """The probes of PROBES the process does not have."""
    present = {(probe.provider, probe.name) for probe in usdt_probes(pid)}
    return [f"{PROVIDER}:{name}" for name in PROBES if (PROVIDER, name) not in present]


@dataclass(frozen=True)
class OpsCounters:
    puts: int
    executes: int
    lost: int  # events that found the ring full
    shed: int  # events not copied while shedding (OpsProbe.shed)

    def __add__(self, other: OpsCounters) -> OpsCounters:
        # Field by field: dataclasses.astuple() cost 5 µs a call, read after every read
        # of recv_upcall's ring.
        return OpsCounters(self.puts + other.puts, self.executes + other.executes,
                           self.lost + other.lost, self.shed + other.shed)


class OpsProbe(RingProbe):
    """flow_ops.c attached to one process's op_flow_put and op_flow_execute."""

    def __init__(self, pid: int, *, ring_pages: int = DEFAULT_RING_PAGES) -> None:
        self.pid = pid
        self.ring_pages = ring_pages
        # Where bcc put the uprobes, (binary, function, address, pid), and those that
        # unhook() took out.
        self._sites: list[tuple[bytes, bytes, int, int]] = []
        self._unhooked: list[tuple[bytes, bytes, int, int]] = []
        self._unhooking: threading.Thread | None = None

    def attach(self) -> None:
        bcc = import_bcc()
        usdt = bcc.USDT(pid=self.pid)
        try:
            for name, function in PROBES.items():
                usdt.enable_probe(probe=f"{PROVIDER}:{name}", fn_name=function)
            self._sites = usdt.enumerate_active_probes()
            self._bpf = bcc.BPF(text=program_text(SOURCE).encode(), usdt_contexts=[usdt],
                                cflags=[f"-DOPS_CAP={OPS_CAP}",
                                        f"-DRING_PAGES={self.ring_pages}", "-w"])
        except Exception as err:  # bcc raises a bare Exception
            self.close()
            raise UsageError(f"cannot attach to the flow put and execute probes of pid "
                             f"{self.pid}: {err}") from None
        self._start("op_events", "the flow operations' ring", counters=len(fields(OpsCounters)))

    def drain(self) -> list[memoryview]:
        return self._buffer.read()

    def shed(self, on: bool) -> None:
        """Count the ops but copy none (on), or copy them again; outcomes.py says which
        upcalls that leaves unknown."""
        self._bpf["control"][ctypes.c_int(0)] = ctypes.c_uint32(_SHEDDING if on else 0)

    def unhook(self) -> bool:
        """Take the uprobes out of the traced process while the ops are shed: its handlers
        then no longer trap into the kernel at every put and execute, which cost the
        replay a quarter of its time per upcall here, shed or not. bcc takes some 0.2 s
        to detach the two here, so a thread of its own does it, and shed() has stopped
        the copies already. The thread is joined before
        stop() and close(): bcc's cleanup walks the uprobes it changes.

        Not after -Z: the root parent holds the uprobes' fds too, so they would stay, and
        bcc's detach, which closes our fd before it looks in tracefs, would fail there
        and leave that closed number in its table, to be closed again at the next
        shedding, whatever holds it by then. True: they are being taken out."""
        if os.geteuid() != 0:
            return False
        self._unhooking = threading.Thread(target=self._detach, name="ops-unhook",
                                           daemon=True)
        self._unhooking.start()
        return True

    def _detach(self) -> None:
        fds = self._bpf.uprobe_fds
        for site in self._sites:
            if site not in self._unhooked:
                binary, _, address, pid = site
                try:
                    self._bpf.detach_uprobe(name=binary, addr=address, pid=pid)
                except Exception:  # bcc's bare Exception
                    # Failed after it closed the fd, or before: bcc's table keeps only
                    # open ones, and a closed one's uprobe is gone, to be put back.
                    closed = [name for name, fd in fds.items() if not _is_open(fd)]
                    if not closed:
                        continue
                    for name in closed:
                        del fds[name]
                self._unhooked.append(site)

    def rehook(self) -> bool:
        """Put the uprobes back (some 10 ms here); False if the process is gone.

        bcc's teardown of a program closes again fd numbers it freed while loading it
        (SharedMemory in channel.py met this too). A uprobe attached during the capture
        takes the lowest free number, one of those: when the recv_upcall probe was torn
        down (at the end, or --follow), it closed this one's fd, and our own teardown
        then failed with a traceback. So its fd moves up, out of their way."""
        self.wait_unhooked()
        fds = self._bpf.uprobe_fds
        while self._unhooked:
            binary, function, address, pid = self._unhooked[-1]
            before = set(fds)
            try:
                self._bpf.attach_uprobe(name=binary, fn_name=function, addr=address, pid=pid)
            except Exception:  # bcc raises a bare Exception
                return False
            for name in set(fds) - before:
                fds[name] = _moved_up(fds[name])
            self._unhooked.pop()
        return True

    def wait_unhooked(self) -> None:
        """Until unhook()'s thread is done."""
        if self._unhooking is not None:
            self._unhooking.join()
            self._unhooking = None

    def stop(self) -> list[memoryview]:
        self.wait_unhooked()
        return super().stop()

    def close(self) -> None:
        self.wait_unhooked()
        super().close()

    def counters(self) -> OpsCounters:
        return OpsCounters(*self._counter_values())


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


def _moved_up(fd: int) -> int:
    """The same open file at a number of _HIGH_FD or more (fd is closed), or fd itself
    where the process may not open that many."""
    try:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _HIGH_FD)
    except OSError:
        return fd
    os.close(fd)
    return high
