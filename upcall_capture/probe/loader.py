"""Loading recv_upcall.c through bcc: compile, attach to the USDT probe, read records.

This is the only module that imports bcc. It hands out raw records (bytes) and the
probe's own counters; decoding is record.py's job.
"""

from __future__ import annotations

import ctypes
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from upcall_capture.errors import UsageError
from upcall_capture.probe.record import PKT_GAP_MAX
from upcall_capture.probe.ring_buffer import RingBuffer
from upcall_capture.probe.usdt_args import args_reader
from upcall_capture.target import PROBE_NAME, PROBE_PROVIDER, recv_upcall_sites

SOURCE = Path(__file__).with_name("recv_upcall.c")
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


def check_environment() -> None:
    """Fail early, in one line, on what would otherwise be a bcc traceback."""
    if os.geteuid() != 0:
        raise UsageError("must be run as root (attaching eBPF to a USDT probe needs it)")
    _import_bcc()
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


# glibc's mallopt() parameters, and the values the capture wants.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 8 << 20
_TRIM_THRESHOLD_BYTES = 32 << 20


def tune_malloc() -> None:
    """Serve the capture's recurring buffers from a heap that keeps its pages.

    A capture allocates and frees buffers of up to a few megabytes (ring copies, block
    batches) hundreds of times a second. By default glibc gives many of them pages of
    their own, or trims the heap under them, and every new page is a page fault: that was
    an eighth of the tool's CPU time in an upcall storm. Every such buffer is bounded
    (ring_buffer.READ_LIMIT, the output queue), so a heap that keeps up to 32 MB of free
    pages stays small. Fixing the mmap threshold also stops glibc from raising it.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


# madvise(2): reclaim these pages now (Linux 5.4 and later).
_MADV_PAGEOUT = 21
# The compiler bcc links: needed to build the BPF program, not to run it.
_COMPILER_LIBRARIES = ("libLLVM", "libclang")


def release_compiler_pages() -> None:
    """Give back the resident pages of LLVM's and clang's code once the program is loaded.

    They are some 80 MB of the tool's resident memory, half of the budget, and nothing
    runs them again. They are clean file pages: were they needed after all, they would be
    read back in. Where madvise cannot do it, nothing changes.
    """
    libc = ctypes.CDLL(None)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and any(name in fields[5] for name in _COMPILER_LIBRARIES):
            start, end = (int(value, 16) for value in fields[0].split("-"))
            libc.madvise(start, end - start, _MADV_PAGEOUT)


def _import_bcc():
    try:
        import bcc
    except ImportError:
        raise UsageError(
            "bcc is not installed: install python3-bpfcc (Debian/Ubuntu) or python3-bcc "
            "(Fedora/RHEL); a virtualenv needs --system-site-packages"
        ) from None
    return bcc


class RecvUpcallProbe:
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

    def attach(self) -> None:
        bcc = _import_bcc()
        tune_malloc()
        usdt = bcc.USDT(pid=self.pid)
        try:
            usdt.enable_probe(probe=f"{PROBE_PROVIDER}:{PROBE_NAME}", fn_name="trace_recv_upcall")
        except Exception as err:  # bcc raises a bare Exception
            raise UsageError(f"cannot enable the USDT probe in pid {self.pid}: {err}") from None
        reader = args_reader([site.args for site in recv_upcall_sites(self.pid)],
                             platform.machine())
        text = (SOURCE.read_text().replace(ARGS_MARKER, reader or "")
                .replace(FILTER_MARKER, self.filter_c))
        cflags = [f"-DKEY_CAP={self.key_cap}", f"-DSNAPLEN={self.snaplen}",
                  f"-DPKT_GAP_MAX={PKT_GAP_MAX}",
                  f"-DRING_PAGES={self.buffer_pages}", "-w"]
        if reader is None:
            cflags.append("-DBCC_READARG")
        try:
            self._bpf = bcc.BPF(text=text.encode(), usdt_contexts=[usdt], cflags=cflags)
        except Exception as err:
            raise UsageError(f"cannot load the BPF program: {err}") from None
        self._bpf["control"][ctypes.c_int(0)] = ctypes.c_uint32(0)
        # Nothing runs the compiler again: give its pages back.
        release_compiler_pages()
        events = self._bpf["events"]
        try:
            self._buffer = RingBuffer(events.map_fd, events.max_entries)
        except OSError as err:
            raise UsageError(f"cannot map the ring buffer: {err.strerror}") from None

    def drain(self, timeout_ms: int = POLL_TIMEOUT_MS) -> list[memoryview]:
        """Wait timeout_ms (unless the last drain left a backlog), then read up to
        ring_buffer.READ_LIMIT bytes of records, in the order the ring holds them: time
        order for each CPU's records, nearly so across CPUs (TimeMerger sorts them)."""
        if not self._buffer.backlog:
            self._buffer.wait(timeout_ms)
        return self._buffer.read()

    def counters(self) -> Counters:
        table = self._bpf["counters"]
        fired, filtered, lost = (int(table.sum(ctypes.c_int(i)).value) for i in range(3))
        return Counters(fired, filtered, lost)

    def stop(self) -> list[memoryview]:
        """Stop counting and submitting, and return the records still in the ring.

        After this, counters() agree exactly with what drain() and stop() returned.
        """
        self._bpf["control"][ctypes.c_int(0)] = ctypes.c_uint32(1)
        time.sleep(0.01)  # a probe already past the stop check finishes its submit
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
