"""The kernel side of a capture: failed upcalls into the stream, and each upcall's wait.

The kernel probe's ring is drained right after recv_upcall's, in the same loop: an
upcall's ENQUEUE event is submitted before the upcall is queued, so by then every
enqueue of the upcalls just read is in hand (queueing.py matches them). FAILED events
become upcall records (kernel_record.failed_record) that join the time merge; received
upcalls, once merged into time order, get their enqueue after the packet (F_KERNEL).

The datapath's own `lost:` counter is read at the start and at the end, from the traced
ovs-vswitchd's dpctl/show, so that the summary can hold the two counts side by side.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from upcall_capture.ports import PortNames, parse_datapath_lost
from upcall_capture.probe.kernel_probe import KernelCounters, KernelProbe
from upcall_capture.probe.kernel_record import (
    CMD_TO_TYPE,
    EV_ENQUEUE,
    EVENT_HEAD,
    failed_record,
    parse_event,
)
from upcall_capture.probe.record import (
    F_FAILED,
    HEADER_SIZE,
    Upcall,
    header_format,
    parse,
    with_enqueue,
)
from upcall_capture.queueing import EnqueueMatcher

# An unknown device asks dpctl/show again at most this often: each time may cost the loop
# the 5 s timeout of ovs-appctl when ovs-vswitchd is stuck, which is when upcalls fail.
PORTS_REFRESH_S = 30.0
# What annotate() reads of a record: its numbers and flags.
_NUMBERS = struct.Struct(header_format("comm"))


@dataclass(frozen=True)
class DatapathLost:
    """A datapath's `lost:` counter at the start and at the end of the capture."""

    dpif: str
    start: int
    end: int | None  # None: not readable at the end (ovs-vswitchd gone)

    @property
    def grown(self) -> int | None:
        return None if self.end is None else self.end - self.start


class KernelSide:
    def __init__(self, probe: KernelProbe, dpctl_show: Callable[[], str], *,
                 keep: Callable[[Upcall], bool] | None = None) -> None:
        self.probe = probe
        self.dpctl_show = dpctl_show
        self.keep = keep  # the whole --filter and packet filter, for failed upcalls
        self.matcher = EnqueueMatcher()
        self.filtered = 0  # failed upcalls the filters rejected
        self._ports: PortNames | None = None  # devices to port numbers, from dpctl/show
        self.lost_at_start: dict[str, int] = {}
        self.lost: list[DatapathLost] = []

    def attach(self) -> None:
        self.probe.attach()
        # After the attach: every failure the counter shows from now on is also seen.
        text = self.dpctl_show()
        self.lost_at_start = parse_datapath_lost(text)
        self._ports = PortNames(self.dpctl_show, PORTS_REFRESH_S, known=text)

    def drain(self) -> list[bytes]:
        """Failed upcalls, as records for the merge; enqueues go to the matcher."""
        return self._take(self.probe.drain())

    def stop(self) -> list[bytes]:
        """At the end: the datapaths' counters, then what is left in the ring."""
        end = parse_datapath_lost(self.dpctl_show())
        self.lost = [DatapathLost(dpif, start, end.get(dpif))
                     for dpif, start in sorted(self.lost_at_start.items())]
        return self._take(self.probe.stop())

    def _take(self, events: Sequence[bytes | memoryview]) -> list[bytes]:
        records = []
        matcher = self.matcher
        add, unpack, head = matcher.add, EVENT_HEAD.unpack_from, EVENT_HEAD.size
        for raw in events:
            (ktime, kind, _, _, portid, _, pkt_len, _, _, _, cmd, mru, _,
             device) = unpack(raw)
            if kind == EV_ENQUEUE:  # every upcall's: the common case, kept short
                add(ktime, CMD_TO_TYPE.get(cmd, cmd), raw[head:head + pkt_len], portid, mru,
                    device.split(b"\0", 1)[0])
                continue
            event = parse_event(raw)
            matcher.forget(event)
            record = failed_record(event, self._ports.number(event.dpif, event.device))
            if self.keep is not None and not self.keep(parse(record)):
                self.filtered += 1
                continue
            records.append(record)
        return records

    def annotate(self, records: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
        """Records in time order, each received upcall with its enqueue."""
        match = self.matcher.match
        out = []
        for record in records:
            (ktime, _, _, _, _, type_, _, pkt_len, _, pkt_offset,
             flags) = _NUMBERS.unpack_from(record)
            if flags & F_FAILED:
                out.append(record)
                continue
            at = HEADER_SIZE + pkt_offset
            out.append(with_enqueue(record, match(type_, record[at:at + pkt_len], ktime)))
        return out

    def counters(self) -> KernelCounters:
        return self.probe.counters()

    def close(self) -> None:
        self.probe.close()


def report(lost: Sequence[DatapathLost], failed: int, counters: KernelCounters,
           filtered: int, matcher: EnqueueMatcher) -> list[str]:
    """The summary's lines for the kernel side: the datapaths' own count of failed
    upcalls beside the failed upcalls captured, and why they differ where they do."""
    lines = []
    grown = [d.grown for d in lost if d.grown is not None]
    if not lost:
        lines.append(f"{failed} failed upcalls captured (the datapath's lost: counter "
                     "could not be read)")
    else:
        total = sum(grown)
        text = f"datapath lost {total} upcalls during the capture; {failed} failed upcalls " \
               "captured"
        unread = [d.dpif for d in lost if d.grown is None]
        reasons = []
        if unread:
            reasons.append(f"the counter of {', '.join(unread)} was unreadable at the end")
        if counters.failed_lost:
            reasons.append(f"{counters.failed_lost} found the tool's kernel ring full")
        if filtered:
            reasons.append(f"{filtered} were filtered out")
        if counters.unpaired:
            reasons.append(f"{counters.unpaired} returned without the tracepoint's entry "
                           "(not recorded)")
        if failed + counters.failed_lost + filtered > total and not unread:
            reasons.append("the kernel side also sees datapaths of other ovs-vswitchd "
                           "processes, and failures while the counter was being read")
        if total != failed and reasons:
            text += " (" + "; ".join(reasons) + ")"
        elif total != failed:
            text += " (the difference is not explained: please report it)"
        lines.append(text)
    received = matcher.matched + matcher.unmatched
    if received:
        lines.append(f"queueing delay known for {matcher.matched} of {received} received "
                     f"upcalls" + (f" ({counters.enqueue_lost} enqueue events found the "
                                   "kernel ring full)" if counters.enqueue_lost else ""))
    return lines
