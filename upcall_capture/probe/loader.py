"""Loading recv_upcall.c through bcc: compile, attach to the USDT probe, read records.

This is the only module that imports bcc. It hands out raw records (bytes) and the
probe's own counters; decoding is record.py's job.
"""

from __future__ import annotations

import ctypes
import os
import platform
import time
from dataclasses import dataclass, fields
from pathlib import Path

from upcall_capture.errors import UsageError
from upcall_capture.probe.percpu_counters import PerCpuCounters
from upcall_capture.probe.record import PKT_GAP_MAX
from upcall_capture.probe.ring_buffer import RingBuffer
from upcall_capture.probe.usdt_args import MAX_SPAN, args_reader
from upcall_capture.target import PROBE_NAME, PROBE_PROVIDER, recv_upcall_sites

SOURCE = Path(__file__).with_name("recv_upcall.c")
COMMON = SOURCE.with_name("probe_common.h")
# Put in place of the #include: bcc rewrites map calls (counters.lookup) in the program's
# own text only, not in the headers it includes.
_INCLUDE_COMMON = '#include "probe_common.h"'


def program_text(source: Path) -> str:
    """A BPF program's C, with probe_common.h in it."""
    return source.read_text().replace(_INCLUDE_COMMON, COMMON.read_text())
ARGS_MARKER = "/* ARGS: the loader puts read_upcall_args() here, or defines BCC_READARG. */"
FILTER_MARKER = "/* FILTERS: the loader puts meta_match() and packet_match() here. */"
MATCH_ALL = """
static __always_inline int meta_match(struct upcall_record *rec) { return 1; }
static __always_inline int packet_match(struct upcall_record *rec) { return 1; }
"""

# The probe never wakes the reader (ring_buffer.py): it reads the ring this often when it
# has caught up, which bounds the latency at low rates. A wakeup per record capped the
# traced program at about 80k upcalls/s on two cores.
POLL_TIMEOUT_MS = 10

# The ring is locked kernel memory on a production host: 64 MiB by default, shared by
# all CPUs. At 200,000 upcalls/s of full-size packets that is 300 ms of them, enough to ride
# out the reader being descheduled on a busy host.
DEFAULT_BUFFER_PAGES = 16384


@dataclass(frozen=True)
class Counters:
    """The probe's own per-CPU counts, summed."""

    fired: int
    filtered: int
    lost: int

    def __add__(self, other: Counters) -> Counters:
        return Counters(self.fired + other.fired, self.filtered + other.filtered,
                        self.lost + other.lost)


def check_environment() -> None:
    """Fail early, in one line, on what would otherwise be a bcc traceback."""
    if os.geteuid() != 0:
        raise UsageError("must be run as root (attaching eBPF to a USDT probe needs it)")
    import_bcc()
    release = os.uname().release
    if not Path(f"/lib/modules/{release}/build/include").exists() and not Path(
        "/sys/kernel/kheaders.tar.xz"
    ).exists():
        raise UsageError(
            f"no kernel headers for {release}: bcc compiles against them; install "
            f"linux-headers-{release} (or see the README for the generic-headers fallback)"
        )
    if not Path("/sys/kernel/tracing/uprobe_events").exists() and not Path(
        "/sys/kernel/debug/tracing/uprobe_events"
    ).exists():
        raise UsageError(
            "uprobes are unavailable: mount tracefs (mount -t tracefs tracefs /sys/kernel/tracing)"
        )


def import_bcc():
    try:
        import bcc
    except ImportError:
        raise UsageError(
            "bcc is not installed: install python3-bpfcc (Debian/Ubuntu) or python3-bcc "
            "(Fedora/RHEL); a virtualenv needs --system-site-packages"
        ) from None
    return bcc


class RingProbe:
    """A loaded BPF program with a `control` switch and one ring: how it stops and is
    freed."""

    _bpf = None
    _buffer: RingBuffer | None = None
    _counters: PerCpuCounters | None = None

    def _start(self, ring: str, ring_name: str, counters: int) -> None:
        """Once loaded: let the program submit, and map its ring (`ring_name` is what an
        error calls it); the first `counters` of its `counters` array are read."""
        self._bpf["control"][ctypes.c_int(0)] = ctypes.c_uint32(0)
        events = self._bpf[ring]
        bcc = import_bcc()
        self._counters = PerCpuCounters(self._bpf["counters"].map_fd, counters,
                                        len(bcc.utils.get_possible_cpus()),
                                        bcc.libbcc.lib._name)
        try:
            self._buffer = RingBuffer(events.map_fd, events.max_entries)
        except OSError as err:
            self.close()
            raise UsageError(f"cannot map {ring_name}: {err.strerror}") from None

    def _counter_values(self) -> tuple[int, ...]:
        """The program's counters, each summed over the CPUs."""
        return self._counters.read()

    @property
    def backlog(self) -> bool:
        """The last read left records in the ring (it reads at most READ_LIMIT bytes)."""
        return self._buffer.backlog

    @property
    def fill(self) -> float:
        """The share of the ring that held records at the last read."""
        return self._buffer.fill

    def halt(self) -> None:
        """Stop counting and submitting. What the ring still holds is then read as ever
        (drain, until backlog is false), after which the counters agree exactly with
        what was read."""
        self._bpf["control"][ctypes.c_int(0)] = ctypes.c_uint32(1)
        time.sleep(0.01)  # a probe already past the stop check finishes its submit

    def stop(self) -> list[memoryview]:
        """halt(), and every record still in the ring, read at once: for a ring whose
        backlog is small enough to hold twice over (the capture drains recv_upcall's a
        read at a time)."""
        self.halt()
        records = self._buffer.read()
        while self._buffer.backlog:
            records += self._buffer.read()
        return records

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None


class RecvUpcallProbe(RingProbe):
    """The BPF program attached to one process's dpif_recv:recv_upcall."""

    def __init__(self, pid: int, *, snaplen: int, key_cap: int, buffer_pages: int,
                 filter_c: str = MATCH_ALL) -> None:
        self.pid = pid
        self.snaplen = snaplen
        self.key_cap = key_cap
        self.buffer_pages = buffer_pages
        self.filter_c = filter_c
        self._bpf = None
        self._buffer: RingBuffer | None = None

    def mark_outcomes_shed(self, on: bool) -> None:
        """Mark the records F_OUTCOME_SHED from now on (on), or no longer."""
        self._bpf["control"][ctypes.c_int(1)] = ctypes.c_uint32(1 if on else 0)

    def attach(self) -> None:
        bcc = import_bcc()
        usdt = bcc.USDT(pid=self.pid)
        try:
            usdt.enable_probe(probe=f"{PROBE_PROVIDER}:{PROBE_NAME}", fn_name="trace_recv_upcall")
        except Exception as err:  # bcc raises a bare Exception
            raise UsageError(f"cannot enable the USDT probe in pid {self.pid}: {err}") from None
        reader = args_reader([site.args for site in recv_upcall_sites(self.pid)],
                             platform.machine())
        text = (program_text(SOURCE).replace(ARGS_MARKER, reader or "")
                .replace(FILTER_MARKER, self.filter_c))
        cflags = [f"-DKEY_CAP={self.key_cap}", f"-DSNAPLEN={self.snaplen}",
                  f"-DPKT_GAP_MAX={PKT_GAP_MAX}", f"-DARG_SPAN_MAX={MAX_SPAN}",
                  f"-DRING_PAGES={self.buffer_pages}", "-w"]
        if reader is None:
            cflags.append("-DBCC_READARG")
        try:
            self._bpf = bcc.BPF(text=text.encode(), usdt_contexts=[usdt], cflags=cflags)
        except Exception as err:
            raise UsageError(f"cannot load the BPF program: {err}") from None
        self._start("events", "the ring buffer", counters=len(fields(Counters)))

    def drain(self, timeout_ms: int = POLL_TIMEOUT_MS) -> list[memoryview]:
        """Wait timeout_ms (unless the last drain left a backlog), then read up to
        ring_buffer.READ_LIMIT bytes of records, in the order the ring holds them: time
        order for each CPU's records, nearly so across CPUs (TimeMerger sorts them)."""
        if not self._buffer.backlog:
            self._buffer.wait(timeout_ms)
        return self._buffer.read()

    def peak_fill(self) -> float:
        """The ring's fullest, as a share, at a drain since the last call."""
        return self._buffer.peak_fill()

    def counters(self) -> Counters:
        return Counters(*self._counter_values())

