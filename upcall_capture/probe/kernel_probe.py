"""Loading dp_upcall.c through bcc: the kernel datapath's side of upcalls.

It needs the openvswitch module's tracepoint openvswitch:ovs_dp_upcall (Linux 5.14 and
later), a kprobe-able ovs_dp_upcall, and headers for the running kernel (the program reads
skb->data). `unavailable()` says in one line which of them is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from upcall_capture.errors import UsageError
from upcall_capture.probe.loader import RingProbe, import_bcc, program_text

SOURCE = Path(__file__).with_name("dp_upcall.c")
TRACING = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))
TRACEPOINT = "events/openvswitch/ovs_dp_upcall"
FUNCTION = "ovs_dp_upcall"
# 16 MiB: an ENQUEUE event is about 150 bytes, a failed upcall its packet and 80 more.
DEFAULT_RING_PAGES = 4096
# A failed upcall's packet: the linear part of the skb, up to this much.
SNAPLEN = 9216


def unavailable() -> str | None:
    """Why the kernel side cannot be attached here, or None."""
    tracing = next((t for t in TRACING if (t / "events").exists()), None)
    if tracing is None:
        return "tracefs is not mounted"
    if not (tracing / TRACEPOINT).exists():
        if not Path("/sys/module/openvswitch").exists():
            return "the openvswitch kernel module is not loaded"
        return "the kernel has no openvswitch:ovs_dp_upcall tracepoint (Linux 5.14 and later)"
    try:
        functions = (tracing / "available_filter_functions").read_text()
    except OSError:
        functions = ""
    if f"\n{FUNCTION} " not in f"\n{functions}" and f"\n{FUNCTION}\n" not in f"\n{functions}":
        return f"{FUNCTION} cannot be kprobed"
    return None


@dataclass(frozen=True)
class KernelCounters:
    """The kernel side's own per-CPU counts, summed."""

    enqueued: int  # upcalls the datapath queued or tried to (tracepoint hits)
    enqueue_lost: int  # their ENQUEUE events that found the ring full
    failed: int  # of them, ovs_dp_upcall() returned an error
    failed_lost: int  # their FAILED events that found the ring full
    unpaired: int  # errors returned with no tracepoint hit to pair with (not recorded)


class KernelProbe(RingProbe):
    """The tracepoint and kretprobe of dp_upcall.c, with their ring."""

    def __init__(self, *, ring_pages: int = DEFAULT_RING_PAGES) -> None:
        self.ring_pages = ring_pages

    def attach(self) -> None:
        bcc = import_bcc()
        cflags = [f"-DSNAPLEN={SNAPLEN}", f"-DRING_PAGES={self.ring_pages}", "-w"]
        try:
            self._bpf = bcc.BPF(text=program_text(SOURCE).encode(), cflags=cflags)
            self._bpf.attach_kretprobe(event=FUNCTION, fn_name="trace_dp_upcall_return")
        except Exception as err:  # bcc raises a bare Exception
            self.close()
            raise UsageError(f"cannot load the kernel side's BPF program: {err}") from None
        self._start("kernel_events", "the kernel side's ring", counters=len(fields(KernelCounters)))

    def drain(self) -> list[memoryview]:
        return self._buffer.read()

    def counters(self) -> KernelCounters:
        return KernelCounters(*self._counter_values())

