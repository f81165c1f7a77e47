"""Loading recv_upcall.c through bcc: compile, attach to the USDT probe, read records.

This is the only module that imports bcc. It hands out raw records (bytes) and the
probe's own counters; decoding is record.py's job.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path

from upcall_capture.errors import UsageError
from upcall_capture.probe.perf_ring import PerfBuffer
from upcall_capture.target import PROBE_NAME, PROBE_PROVIDER

SOURCE = Path(__file__).with_name("recv_upcall.c")
FILTER_MARKER = "/* FILTERS: the loader puts meta_match() and packet_match() here. */"
MATCH_ALL = """
static __always_inline int meta_match(struct upcall_record *rec) { return 1; }
static __always_inline int packet_match(struct upcall_record *rec) { return 1; }
"""

# The rings wake the reader once a megabyte (or a quarter of a small ring) is waiting,
# not per record (perf_ring.PerfRing): per-record wakeups cap the traced program at about
# 80k upcalls/s on two cores, and big batches make the reader's fixed cost per wakeup
# negligible. Low rates are still delivered promptly because every poll, woken or timed
# out, reads all rings.
POLL_TIMEOUT_MS = 50

# The perf buffer is locked kernel memory on a production host: at most 64 MiB in all.
# Up to 32 MiB a CPU: a handler thread stays on one CPU for a while, so one ring can take
# a whole storm, and at 200,000 upcalls/s of full-size packets 32 MiB is 150 ms of them,
# enough to ride out the reader being descheduled on a busy host (8 MiB was 37 ms).
MAX_DEFAULT_BUFFER_BYTES = 64 << 20
DEFAULT_PAGES_PER_CPU = 8192


def default_buffer_pages(ncpus: int, page_size: int = 4096) -> int:
    """Pages per CPU: a power of two, at most 64 MiB over all CPUs."""
    pages = DEFAULT_PAGES_PER_CPU
    while pages > 1 and pages * page_size * ncpus > MAX_DEFAULT_BUFFER_BYTES:
        pages //= 2
    return pages


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
    (perf_ring.READ_LIMIT, the output queue), so a heap that keeps up to 32 MB of free
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
        self._buffer: PerfBuffer | None = None

    def attach(self) -> None:
        bcc = _import_bcc()
        tune_malloc()
        usdt = bcc.USDT(pid=self.pid)
        try:
            usdt.enable_probe(probe=f"{PROBE_PROVIDER}:{PROBE_NAME}", fn_name="trace_recv_upcall")
        except Exception as err:  # bcc raises a bare Exception
            raise UsageError(f"cannot enable the USDT probe in pid {self.pid}: {err}") from None
        text = SOURCE.read_text().replace(FILTER_MARKER, self.filter_c)
        cflags = [f"-DKEY_CAP={self.key_cap}", f"-DSNAPLEN={self.snaplen}", "-w"]
        try:
            self._bpf = bcc.BPF(text=text.encode(), usdt_contexts=[usdt], cflags=cflags)
        except Exception as err:
            raise UsageError(f"cannot load the BPF program: {err}") from None
        self._bpf["control"][ctypes.c_int(0)] = ctypes.c_uint32(0)
        try:
            self._buffer = PerfBuffer(bcc.utils.get_online_cpus(), self.buffer_pages)
        except OSError as err:
            raise UsageError(f"cannot open the perf buffer: {err.strerror}") from None
        events = self._bpf["events"]
        for ring in self._buffer.rings:
            events[events.Key(ring.cpu)] = events.Leaf(ring.fd)
        release_compiler_pages()

    def drain(self, timeout_ms: int = POLL_TIMEOUT_MS) -> list[list[memoryview]]:
        """Wait up to timeout_ms for a wakeup (unless the last drain left a backlog), then
        read every ring, up to perf_ring.READ_LIMIT bytes each: the records of each ring
        in the order it holds them, which is time order."""
        if not self._buffer.backlog:
            self._buffer.wait(timeout_ms)
        return self._buffer.read()

    def counters(self) -> Counters:
        table = self._bpf["counters"]
        fired, filtered, lost = (int(table.sum(ctypes.c_int(i)).value) for i in range(3))
        return Counters(fired, filtered, lost)

    def stop(self) -> list[list[memoryview]]:
        """Stop counting and submitting, and return the records still in the rings.

        After this, counters() agree exactly with what drain() and stop() returned.
        """
        self._bpf["control"][ctypes.c_int(0)] = ctypes.c_uint32(1)
        time.sleep(0.01)  # a probe already past the stop check finishes its submit
        runs = self._buffer.read()
        while self._buffer.backlog:
            runs += self._buffer.read()
        return runs

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None
