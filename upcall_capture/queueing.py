"""How long each upcall waited in the kernel: its enqueue matched to its recv_upcall.

Pure. Both sides know the upcall's type and its packet's first bytes
(kernel_record.match_key, as retis matches on the first 64 bytes): each upcall that
reached ovs-vswitchd takes the oldest enqueue of the same bytes from before it. Enqueues
wait, bounded in number and in age, and every one that leaves unmatched is counted;
an upcall with no enqueue to take says so rather than take a later one.

This runs for every upcall while the kernel side is on: enqueues are kept as tuples,
and a received upcall's enqueue leaves as the packed trailer its record carries.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict

from upcall_capture.probe.kernel_record import KernelEvent, match_key
from upcall_capture.probe.record import ENQUEUE_TRAILER, UNMATCHED_ENQUEUE, pack_enqueue

# Enough for the upcalls that ~30 handler sockets of 16 MiB each can hold; and how long a
# stopped ovs-vswitchd can keep them there before they count as never received.
DEFAULT_CAPACITY = 65536
DEFAULT_MAX_AGE_NS = 120_000_000_000

UNMATCHED_TRAILER = pack_enqueue(UNMATCHED_ENQUEUE)

Key = tuple[int, bytes]
# (ktime_ns, seq, portid, mru, device as bytes): in time order, then arrival order.
_Waiting = tuple[int, int, int, int, bytes]


class EnqueueMatcher:
    def __init__(self, capacity: int = DEFAULT_CAPACITY,
                 max_age_ns: int = DEFAULT_MAX_AGE_NS) -> None:
        self.capacity = capacity
        self.max_age_ns = max_age_ns
        self.matched = 0
        self.unmatched = 0  # upcalls given no enqueue
        self.expired = 0  # enqueues that no upcall took (too old, or too many waiting)
        self._waiting: dict[Key, list[_Waiting]] = {}
        # seq -> (ktime_ns, key), in arrival order: which to drop first.
        self._order: OrderedDict[int, tuple[int, Key]] = OrderedDict()
        self._seq = 0

    def __len__(self) -> int:
        return len(self._order)

    def add(self, ktime_ns: int, upcall_type: int, packet: bytes | memoryview,
            portid: int, mru: int, device: bytes) -> None:
        """An ENQUEUE event's fields (read straight from the event: see kernel_side)."""
        key = match_key(upcall_type, packet)
        self._seq += 1
        entry = (ktime_ns, self._seq, portid, mru, device)
        waiting = self._waiting.get(key)
        if waiting is None:
            self._waiting[key] = [entry]
        elif waiting[-1] <= entry:
            waiting.append(entry)
        else:  # events from two CPUs can come a little out of order
            bisect.insort(waiting, entry)
        self._order[self._seq] = (ktime_ns, key)
        if len(self._order) > self.capacity:
            self._drop_oldest()

    def forget(self, event: KernelEvent) -> None:
        """A FAILED event: the enqueue it made will never be received."""
        key = match_key(event.upcall_type, event.packet)
        waiting = self._waiting.get(key, [])
        for i, entry in enumerate(waiting):
            if entry[0] == event.ktime_ns:
                self._remove(key, i)
                return

    def match(self, upcall_type: int, packet: bytes | memoryview, ktime_ns: int) -> bytes:
        """The enqueue of an upcall received at ktime_ns (calls in time order), packed as
        its record's trailer (record.ENQUEUE_TRAILER; record.unpack_enqueue reads it)."""
        found = self._take(upcall_type, packet, ktime_ns)
        if found is None:
            return UNMATCHED_TRAILER
        queued, portid, mru, device = found
        return ENQUEUE_TRAILER.pack(queued, 0, portid, mru, device)

    def _take(self, upcall_type: int, packet: bytes | memoryview, ktime_ns: int
              ) -> tuple[int, int, int, bytes] | None:
        order = self._order
        while order and next(iter(order.values()))[0] < ktime_ns - self.max_age_ns:
            self._drop_oldest()
        key = match_key(upcall_type, packet)
        waiting = self._waiting.get(key)
        if not waiting or waiting[0][0] > ktime_ns:
            self.unmatched += 1
            return None
        ktime, seq, portid, mru, device = waiting[0]
        self._remove(key, 0)
        self.matched += 1
        return ktime_ns - ktime, portid, mru, device

    def _drop_oldest(self) -> None:
        seq, (_, key) = next(iter(self._order.items()))
        waiting = self._waiting[key]
        self._remove(key, next(i for i, w in enumerate(waiting) if w[1] == seq))
        self.expired += 1

    def _remove(self, key: Key, index: int) -> None:
        waiting = self._waiting[key]
        del self._order[waiting.pop(index)[1]]
        if not waiting:
            del self._waiting[key]
