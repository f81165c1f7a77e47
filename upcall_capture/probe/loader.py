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
from upcall_capture.target import PROBE_NAME, PROBE_PROVIDER

SOURCE = Path(__file__).with_name("recv_upcall.c")
FILTER_MARKER = "/* FILTERS: the loader puts meta_match() and packet_match() here. */"
MATCH_ALL = """
static __always_inline int meta_match(struct upcall_record *rec) { return 1; }
static __always_inline int packet_match(struct upcall_record *rec) { return 1; }
"""

# Wake the reader once per this many records rather than per record: per-record wakeups
# cap the traced program at about 80k upcalls/s on two cores. Low rates are still
# delivered promptly because every poll timeout is followed by a consume of all rings.
WAKEUP_EVENTS = 64
POLL_TIMEOUT_MS = 50

# The perf buffer is locked kernel memory on a production host: at most 64 MiB in all.
MAX_DEFAULT_BUFFER_BYTES = 64 << 20
DEFAULT_PAGES_PER_CPU = 2048  # 8 MiB a CPU


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
        self._batch: list[bytes] = []

    def attach(self) -> None:
        bcc = _import_bcc()
        usdt = bcc.USDT(pid=self.pid)
        try:
            usdt.enable_probe(probe=f"{PROBE_PROVIDER}:{PROBE_NAME}", fn_name="trace_recv_upcall")
        except Exception as err:  # bcc raises a bare Exception
            raise UsageError(f"cannot enable the USDT probe in pid {self.pid}: {err}") from None
        text = SOURCE.read_text().replace(FILTER_MARKER, self.filter_c)
        cflags = [f"-DKEY_CAP={self.key_cap}", f"-DSNAPLEN={self.snaplen}", "-w"]
        try:
            self._bpf = bcc.BPF(text=text, usdt_contexts=[usdt], cflags=cflags)
        except Exception as err:
            raise UsageError(f"cannot load the BPF program: {err}") from None
        self._bpf["control"][ctypes.c_int(0)] = ctypes.c_uint32(0)
        self._bpf["events"].open_perf_buffer(
            self._on_record, page_cnt=self.buffer_pages, wakeup_events=WAKEUP_EVENTS
        )

    def _on_record(self, cpu: int, data: int, size: int) -> None:
        # Only copy: everything else happens on the batch.
        self._batch.append(ctypes.string_at(data, size))

    def drain(self, timeout_ms: int = POLL_TIMEOUT_MS) -> list[bytes]:
        """Wait up to timeout_ms for records, then read every ring empty."""
        self._bpf.perf_buffer_poll(timeout_ms)
        self._bpf.perf_buffer_consume()
        batch, self._batch = self._batch, []
        return batch

    def counters(self) -> Counters:
        table = self._bpf["counters"]
        fired, filtered, lost = (int(table.sum(ctypes.c_int(i)).value) for i in range(3))
        return Counters(fired, filtered, lost)

    def stop(self) -> list[bytes]:
        """Stop counting and submitting, and return the records still in the rings.

        After this, counters() agree exactly with what drain() and stop() returned.
        """
        self._bpf["control"][ctypes.c_int(0)] = ctypes.c_uint32(1)
        time.sleep(0.01)  # a probe already past the stop check finishes its submit
        records = []
        while batch := self.drain(timeout_ms=0):
            records.extend(batch)
        return records

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
