"""How long each upcall waited in the kernel: its enqueue matched to its recv_upcall.

Pure. Both sides know the upcall's type and its packet's first bytes
(kernel_record.match_key, as retis matches on the first 64 bytes): each upcall that
reached ovs-vswitchd takes the oldest enqueue of the same bytes from before it. Enqueues
wait, bounded in number and in age, and every one that leaves unmatched is counted;
an upcall with no enqueue to take says so rather than take a later one.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass, field

from upcall_capture.probe.kernel_record import KernelEvent, match_key
from upcall_capture.probe.record import Enqueue

# Enough for the upcalls that ~30 handler sockets of 16 MiB each can hold; and how long a
# stopped ovs-vswitchd can keep them there before they count as never received.
DEFAULT_CAPACITY = 65536
DEFAULT_MAX_AGE_NS = 120_000_000_000

UNMATCHED = Enqueue(queued_ns=None, result=0, portid=None, device="", mru=0)


@dataclass(order=True, slots=True)
class _Waiting:
    ktime_ns: int
    seq: int
    event: KernelEvent = field(compare=False)


class EnqueueMatcher:
    def __init__(self, capacity: int = DEFAULT_CAPACITY,
                 max_age_ns: int = DEFAULT_MAX_AGE_NS) -> None:
        self.capacity = capacity
        self.max_age_ns = max_age_ns
        self.matched = 0
        self.unmatched = 0  # upcalls given no enqueue
        self.expired = 0  # enqueues that no upcall took (too old, or too many waiting)
        self._waiting: dict[tuple[int, bytes], list[_Waiting]] = {}
        self._order: OrderedDict[int, tuple[int, bytes]] = OrderedDict()  # seq -> key
        self._seq = 0

    def __len__(self) -> int:
        return len(self._order)

    def add(self, event: KernelEvent) -> None:
        """An ENQUEUE event."""
        key = match_key(event.upcall_type, event.packet)
        self._seq += 1
        # Events from two CPUs can come a little out of order: keep each list sorted.
        bisect.insort(self._waiting.setdefault(key, []), _Waiting(event.ktime_ns, self._seq,
                                                                  event))
        self._order[self._seq] = key
        while len(self._order) > self.capacity:
            self._drop_oldest()

    def forget(self, event: KernelEvent) -> None:
        """A FAILED event: the enqueue it made will never be received."""
        key = match_key(event.upcall_type, event.packet)
        waiting = self._waiting.get(key, [])
        for i, entry in enumerate(waiting):
            if entry.ktime_ns == event.ktime_ns:
                self._remove(key, i)
                return

    def match(self, upcall_type: int, packet: bytes | memoryview, ktime_ns: int) -> Enqueue:
        """The enqueue of an upcall received at ktime_ns (calls in time order)."""
        while self._order and self._oldest_ktime() < ktime_ns - self.max_age_ns:
            self._drop_oldest()
        key = match_key(upcall_type, packet)
        waiting = self._waiting.get(key)
        if not waiting or waiting[0].ktime_ns > ktime_ns:
            self.unmatched += 1
            return UNMATCHED
        event = waiting[0].event
        self._remove(key, 0)
        self.matched += 1
        return Enqueue(queued_ns=ktime_ns - event.ktime_ns, result=0, portid=event.portid,
                       device=event.device, mru=event.mru)

    def _oldest_ktime(self) -> int:
        seq, key = next(iter(self._order.items()))
        return next(w.ktime_ns for w in self._waiting[key] if w.seq == seq)

    def _drop_oldest(self) -> None:
        seq, key = next(iter(self._order.items()))
        waiting = self._waiting[key]
        self._remove(key, next(i for i, w in enumerate(waiting) if w.seq == seq))
        self.expired += 1

    def _remove(self, key: tuple[int, bytes], index: int) -> None:
        waiting = self._waiting[key]
        del self._order[waiting.pop(index).seq]
        if not waiting:
            del self._waiting[key]
