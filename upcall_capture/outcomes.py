"""What ovs-vswitchd did with each upcall: the flow it put, the packet it executed, or
nothing. Each received upcall waits here, in time order, until its outcome is known.

A handler thread receives a batch of upcalls, then (ofproto-dpif-upcall.c,
handle_upcalls()) for each of them in turn asks the datapath for a flow put, if it
installs the flow, and then an execute, if the packet has actions. So, per thread and in
time order (flow_ops.c's events carry the clock of recv_upcall's records):
- a put is the first waiting upcall of the thread whose key is the put's key, byte for
  byte (a kernel upcall's key is put as received: ukey_create_from_upcall());
- an execute is the first whose packet is the executed packet, byte for byte;
- an op for an upcall settles every earlier upcall of the thread: their turn is over;
  an execute settles its own upcall, and a receive after ops starts a new batch, which
  settles the last one.
Nothing is matched by position alone, so an op whose upcall the capture does not hold
(filtered out, or lost in the ring) is tied to no other upcall. An upcall whose turn did
not come within the window (--outcome-window after it was received, WINDOW_NS unless
told), whose ops may have been lost (the ops ring was full) or not copied (shed, below),
or that was still waiting when the capture ended, says its outcome is unknown: it is
never given a guess. At most CAPACITY upcalls wait; past that the oldest leaves,
unknown, and is counted.

Tying ops costs the capture's main process more than the upcalls themselves, and packets
come first: while recv_upcall's ring fills up (HandlerOps.pace), flow_ops.c stops copying
ops, and recv_upcall.c marks its records F_OUTCOME_SHED. Those pass at once, as they
are, and any earlier upcall still waiting then leaves unknown (UNKNOWN_SHED): its op may
not have been copied.

Records leave in the order they came, each with an OUTCOME trailer (record.with_outcome).
Failed upcalls (the kernel side's) pass through: no handler had them.
"""

from __future__ import annotations

import bisect
import math
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from upcall_capture.errors import UsageError
from upcall_capture.probe.loader import RecvUpcallProbe
from upcall_capture.probe.ops_probe import OpsCounters, OpsProbe, missing_probes
from upcall_capture.probe.ops_record import OP_EXECUTE, OP_HEAD, OP_PUT, FlowOp, parse_op
from upcall_capture.probe.record import (
    DID_EXECUTE,
    DID_PUT,
    F_FAILED,
    F_OUTCOME_SHED,
    HEADER_SIZE,
    UNKNOWN_CAPTURE_ENDED,
    UNKNOWN_EVENTS_LOST,
    UNKNOWN_SHED,
    UNKNOWN_TIMEOUT,
    UNKNOWN_WINDOW_FULL,
    Outcome,
    Upcall,
    count_flagged,
    header_format,
    pack_outcome,
    pack_outcome_fields,
    parse,
    with_outcome,
)

# A handler of a loaded or slow host (the system test's TCG guest) took 145 ms from
# recv_upcall to its put: at 100 ms, that put's upcall said its outcome was unknown.
WINDOW_NS = 250_000_000
_NONE_TRAILER = pack_outcome(Outcome(0))
_UNKNOWN_TRAILERS = {reason: pack_outcome(Outcome(0, reason)) for reason in
                     (UNKNOWN_TIMEOUT, UNKNOWN_EVENTS_LOST, UNKNOWN_CAPTURE_ENDED,
                      UNKNOWN_WINDOW_FULL, UNKNOWN_SHED)}
CAPACITY = 65536
MAX_BATCH = 1024
# recv_upcall's ring this full at a read: the capture is behind, and sheds the ops until
# the ring is down to SHED_UNTIL (HandlerOps.pace). With the default ring, SHED_UNTIL is
# what one read takes (ring_buffer.READ_LIMIT): a loop of 40 ms at 20,000 full-size
# upcalls/s holds as much, so a ring that full is not behind. At 1/64, outcomes were shed
# at that rate, which the capture ties; at 1/256, they never resumed above it.
SHED_ABOVE = 1 / 16
SHED_UNTIL = 1 / 64
# A shedding lasts at least MIN_SHED_NS, twice as long as the last one (up to MAX_SHED_NS)
# when it comes back within RECOVERED_NS of a resume: each resume costs a burst of ties,
# which a storm must not pay every few milliseconds.
MIN_SHED_NS = 1_000_000_000
MAX_SHED_NS = 16_000_000_000
RECOVERED_NS = 10_000_000_000
_NUMBERS = struct.Struct(header_format("comm"))
_KTIME = attrgetter("ktime_ns")


class _Waiting:
    """A received upcall waiting for its outcome. Its key and packet stay in the record
    (a slice is made only to compare with an op)."""

    __slots__ = ("record", "ktime_ns", "key_end", "packet_at", "pkt_len", "pkt_size",
                 "lost_before", "put", "execute", "settled")

    def __init__(self, record: bytes | memoryview, ktime_ns: int, key_end: int | None,
                 packet_at: int, pkt_len: int, pkt_size: int, lost_before: int) -> None:
        self.record = record
        self.ktime_ns = ktime_ns
        self.key_end = key_end  # None: the key was cut by the probe: no put is tied to it
        self.packet_at = packet_at
        self.pkt_len = pkt_len
        self.pkt_size = pkt_size
        self.lost_before = lost_before  # ops events lost before it was read
        self.put: FlowOp | None = None
        self.execute: FlowOp | None = None
        self.settled: int | None = None  # when its turn was over (probe time)


@dataclass(slots=True)
class _Handler:
    """One handler thread's current batch: waiting[:turn] are settled."""

    batch: list[_Waiting] = field(default_factory=list)
    turn: int = 0
    operating: bool = False  # an op came after the batch's last receive


@dataclass
class OutcomeCounts:
    put: int = 0
    execute: int = 0  # of them with a put too: counted in both
    none: int = 0
    unknown: dict[int, int] = field(default_factory=dict)  # by UNKNOWN_*
    unmatched_ops: int = 0  # ops of upcalls the capture does not hold
    dropped_ops: int = 0  # ops copied before a shedding began, and dropped unread by it

    @property
    def unknown_total(self) -> int:
        return sum(self.unknown.values())


class Outcomes:
    """The stage between the time merge and the outputs (capture.py)."""

    def __init__(self, *, window_ns: int = WINDOW_NS, capacity: int = CAPACITY) -> None:
        self.window_ns = window_ns
        self.capacity = capacity
        self.counts = OutcomeCounts()
        self._queue: deque[_Waiting | bytes | memoryview] = deque()
        self._handlers: dict[int, _Handler] = {}
        self._ops: list[FlowOp] = []  # not applied yet, in time order
        self._lost = 0  # ops events lost, as last told (ops_lost)
        self._lost_before = 0
        # When ops were not copied: [start, end] in probe time, end infinite while on.
        self._shed: list[list[float]] = []
        self._taken_until = 0  # every upcall before this has been taken (resolve)

    def shed(self, on: bool, now_ns: int) -> None:
        """From now_ns on, the probe copies no ops (on), or copies them again.

        A shedding starts where the upcalls taken so far end, not at now_ns: those not
        taken yet, still in recv_upcall's ring, pass as shed too, and the ops of their
        time are dropped unread. At a storm's start, tying them one by one (some 30 µs an
        upcall, most of it parsing ops, on a slow host) kept the main process reading the
        ring at a fifth of the rate it filled for 200 ms after the switch, and the ring's
        fill went on up to where keys are shed: each new flow's first upcall went without
        its key's text."""
        if on:
            start = min(now_ns, self._taken_until)
            self._shed.append([start, math.inf])
            kept = bisect.bisect_left(self._ops, start, key=_KTIME)
            self.counts.dropped_ops += len(self._ops) - kept
            del self._ops[kept:]
        elif (going_on := self._shedding_now()) is not None:
            going_on[1] = now_ns

    def _shedding_now(self) -> list[float] | None:
        """The shedding that goes on ([start, infinity]), or None."""
        return self._shed[-1] if self._shed and self._shed[-1][1] == math.inf else None

    def add_ops(self, events: Sequence[bytes | memoryview], lost: int) -> None:
        """Ops events read from the ring, and the ring's count of lost ones so far."""
        if (going_on := self._shedding_now()) is not None:  # those copied before it began
            start = going_on[0]
            kept = [raw for raw in events if OP_HEAD.unpack_from(raw)[0] < start]
            self.counts.dropped_ops += len(events) - len(kept)
            events = kept
        ops = [parse_op(raw) for raw in events]
        if ops:
            self._ops += ops
            self._ops.sort(key=_KTIME)
        self._lost_before, self._lost = self._lost, lost

    def resolve(self, records: Sequence[bytes | memoryview], horizon_ns: int) -> list:
        """Take `records` (in time order, all received before horizon_ns), apply the ops
        before the horizon, and return the records whose outcome is settled, or whose
        window closed, in their order."""
        self._taken_until = max(self._taken_until, horizon_ns)
        if not self._queue and self._all_pass(records):
            # In a storm whose outcomes are shed, nothing else comes: no look at each.
            self._apply_until(horizon_ns, 0)
            self._pruned(horizon_ns)
            return list(records)
        self._take(records, horizon_ns)
        return self._release(horizon_ns)

    def _all_pass(self, records: Sequence[bytes | memoryview]) -> bool:
        """Every record passes as it is: marked shed by the probe, or failed (the queue
        being empty, nothing waits before them). Their shed ones are counted."""
        passing, shed = count_flagged(records, F_FAILED | F_OUTCOME_SHED, F_OUTCOME_SHED)
        if passing < len(records):
            return False
        if shed:
            self._count_unknown(UNKNOWN_SHED, shed)
        return True

    def resolve_all(self, records: Sequence[bytes | memoryview]) -> list:
        """At the end: every record, those still waiting as unknown."""
        self._take(records, None)
        return self._release(None)

    def _take(self, records: Sequence[bytes | memoryview], horizon_ns: int | None) -> None:
        ops, at = self._ops, 0
        # The shedding that goes on, or went on last: in a storm, most records fall in it.
        shed_from, shed_to = self._shed[-1] if self._shed else (math.inf, math.inf)
        shed_trailer, shed = _UNKNOWN_TRAILERS[UNKNOWN_SHED], 0
        for record in records:
            (ktime, key_size, _, tid, _, _, pkt_size, pkt_len, key_len, pkt_offset,
             flags) = _NUMBERS.unpack_from(record)
            while at < len(ops) and ops[at].ktime_ns < ktime:
                self._apply(ops[at])
                at += 1
            if flags & (F_FAILED | F_OUTCOME_SHED):  # no handler had it, or none is known
                shed += bool(flags & F_OUTCOME_SHED)
                self._queue.append(record)
                continue
            if shed_from <= ktime < shed_to or len(self._shed) > 1 and self._shed_at(ktime):
                shed += 1
                self._queue.append(with_outcome(record, shed_trailer, flags))
                continue
            waiting = _Waiting(record, ktime,
                               HEADER_SIZE + key_len if key_len == key_size else None,
                               HEADER_SIZE + pkt_offset, pkt_len, pkt_size, self._lost_before)
            handler = self._handlers.get(tid)
            if handler is None:
                handler = self._handlers[tid] = _Handler()
            elif handler.operating:  # a new batch: the last one's turns are over
                self._settle(handler, len(handler.batch), ktime)
                handler.batch, handler.turn, handler.operating = [], 0, False
            handler.batch.append(waiting)
            self._queue.append(waiting)
        if shed:
            self._count_unknown(UNKNOWN_SHED, shed)
        self._apply_until(horizon_ns, at)

    def _apply_until(self, horizon_ns: int | None, at: int) -> None:
        """Apply the ops from `at` on that came before the horizon (all: None)."""
        ops = self._ops
        end = len(ops) if horizon_ns is None else \
            bisect.bisect_left(ops, horizon_ns, lo=at, key=_KTIME)
        for op in ops[at:end]:
            self._apply(op)
        del ops[:end]

    def _apply(self, op: FlowOp) -> None:
        handler = self._handlers.get(op.tid)
        if handler is None:
            self.counts.unmatched_ops += 1
            return
        handler.operating = True
        batch = handler.batch
        # bytes() before comparing: a memoryview (the ring's records are) compares item by
        # item, eight times slower for a full-size packet.
        if op.complete and op.kind == OP_PUT and op.key is not None:
            key, key_end = op.key, HEADER_SIZE + len(op.key)
            for index in range(handler.turn, len(batch)):
                waiting = batch[index]
                if waiting.key_end == key_end and waiting.put is None and \
                        waiting.execute is None and \
                        bytes(waiting.record[HEADER_SIZE:key_end]) == key:
                    self._settle(handler, index, op.ktime_ns)
                    waiting.put = op
                    return
        elif op.complete and op.kind == OP_EXECUTE and op.packet is not None:
            packet, size = op.packet, op.pkt_size
            for index in range(handler.turn, len(batch)):
                waiting = batch[index]
                at = waiting.packet_at
                if waiting.pkt_size == size and waiting.execute is None and \
                        bytes(waiting.record[at:at + waiting.pkt_len]) == \
                        packet[:waiting.pkt_len]:
                    waiting.execute = op
                    self._settle(handler, index + 1, op.ktime_ns)
                    return
        self.counts.unmatched_ops += 1

    @staticmethod
    def _settle(handler: _Handler, turn: int, at_ns: int) -> None:
        for waiting in handler.batch[handler.turn:turn]:
            waiting.settled = at_ns
        handler.turn = max(handler.turn, turn)

    def _cut(self, ktime_ns: int, horizon_ns: int) -> int | None:
        """When a shedding that began after ktime_ns, with every op before it in hand,
        cut the upcall's turn short: what it got until then is all that can be known."""
        for start, _ in self._shed:
            if ktime_ns < start <= horizon_ns:
                return start
        return None

    def _shed_at(self, ktime_ns: int) -> bool:
        return any(start <= ktime_ns < end for start, end in self._shed)

    def _release(self, horizon_ns: int | None) -> list:
        out = []
        queue = self._queue
        while queue:
            head = queue[0]
            if not isinstance(head, _Waiting):
                out.append(queue.popleft())
                continue
            unknown = self._unknown(head, horizon_ns)
            if unknown is None:
                break
            queue.popleft()
            out.append(with_outcome(head.record, self._trailer(head, unknown)))
        self._pruned(horizon_ns)
        return out

    def _pruned(self, horizon_ns: int | None) -> None:
        self._forget_settled()
        if horizon_ns is not None:  # no upcall still waiting came before these ended
            self._shed = [span for span in self._shed
                          if span[1] > horizon_ns - self.window_ns]

    def _unknown(self, waiting: _Waiting, horizon_ns: int | None) -> int | None:
        """Why the upcall's outcome is unknown (0: it is known), or None: it waits on."""
        if waiting.settled is not None:
            until, reason = waiting.settled, 0
        elif horizon_ns is None:
            until, reason = math.inf, UNKNOWN_CAPTURE_ENDED
        elif (cut := self._cut(waiting.ktime_ns, horizon_ns)) is not None:
            until, reason = cut, UNKNOWN_SHED
        elif waiting.ktime_ns + self.window_ns <= horizon_ns:
            until, reason = waiting.ktime_ns + self.window_ns, UNKNOWN_TIMEOUT
        elif len(self._queue) > self.capacity:
            until, reason = horizon_ns, UNKNOWN_WINDOW_FULL
        else:
            return None
        if waiting.put is not None or waiting.execute is not None:
            return 0
        # With no op, "nothing" is known only if no op of its time can be missing.
        if self._lost != waiting.lost_before:
            return UNKNOWN_EVENTS_LOST
        if any(start < until and end > waiting.ktime_ns for start, end in self._shed):
            return UNKNOWN_SHED
        return reason

    def _count_unknown(self, reason: int, count: int = 1) -> None:
        self.counts.unknown[reason] = self.counts.unknown.get(reason, 0) + count

    def _trailer(self, waiting: _Waiting, unknown: int) -> bytes:
        """The OUTCOME trailer (record.pack_outcome_fields) of a leaving upcall."""
        counts = self.counts
        put, execute = waiting.put, waiting.execute
        if unknown:
            self._count_unknown(unknown)
            return _UNKNOWN_TRAILERS[unknown]
        if put is None and execute is None:
            counts.none += 1
            return _NONE_TRAILER
        if put is None:
            counts.execute += 1
            return pack_outcome_fields(DID_EXECUTE, 0, execute.ktime_ns - waiting.ktime_ns,
                                       None, True, b"", b"", execute.actions or b"")
        counts.put += 1
        did = DID_PUT
        if execute is not None:
            counts.execute += 1
            did |= DID_EXECUTE
        return pack_outcome_fields(did, 0, put.ktime_ns - waiting.ktime_ns, put.ufid,
                                   put.create, put.mask or b"", put.actions or b"",
                                   (execute.actions or b"") if execute else b"")

    def _forget_settled(self) -> None:
        """Drop the batches whose turns are all over. Batches that had no op (each of
        OVS's holds at most 64 upcalls) run together, up to MAX_BATCH: the oldest go."""
        for handler in self._handlers.values():
            batch = handler.batch
            if batch and handler.turn == len(batch):
                handler.batch, handler.turn = [], 0
            elif len(batch) > MAX_BATCH:
                cut = len(batch) - MAX_BATCH
                del batch[:cut]
                handler.turn = max(0, handler.turn - cut)


class HandlerOps:
    """The traced process's flow put and execute probes, feeding an Outcomes stage.

    Its ring is drained right after recv_upcall's, in the same loop: every op fired before
    the drain began is then in hand, up to the merge's horizon."""

    def __init__(self, probe: OpsProbe | None, *,
                 keep: Callable[[Upcall], bool] | None = None,
                 window_ns: int = WINDOW_NS) -> None:
        self.probe = probe  # None: a followed process without the probes
        self.stage = Outcomes(window_ns=window_ns)
        self.keep = keep  # a --filter with outcome=: applied once outcomes are known
        self.filtered = 0  # upcalls it rejected
        self.shedding = False
        self._shed_for_ns = MIN_SHED_NS
        self._shed_until_ns = 0
        self._resumed_ns = -RECOVERED_NS
        self._unhooked_since_ns: int | None = None  # while the probes are out (shedding)
        self._earlier = OpsCounters(0, 0, 0, 0)  # the probes' of earlier processes
        self._unhooked_ns = 0  # the time the probes were out of the process, before now

    def resolve(self, records: Sequence[bytes | memoryview], horizon_ns: int | None) -> list:
        """The records whose outcome is known, with it (all of them: horizon_ns None)."""
        records = self.stage.resolve_all(records) if horizon_ns is None else \
            self.stage.resolve(records, horizon_ns)
        if self.keep is None:
            return records
        kept = [record for record in records if self.keep(parse(record))]
        self.filtered += len(records) - len(kept)
        return kept

    def attach(self) -> None:
        self.probe.attach()

    def drain(self) -> int | float:
        """Read the ring; returns the time before which every op is in hand (infinity
        unless the read left a backlog)."""
        if self.probe is None:
            return math.inf
        events = self.probe.drain()
        self.stage.add_ops(events, self.lost)
        return OP_HEAD.unpack_from(events[-1])[0] if events and self.probe.backlog \
            else math.inf

    def pace(self, recv: RecvUpcallProbe, describing_behind: bool = False) -> None:
        """Shed the ops while recv_upcall's ring fills up (its share held at the last
        read), so that no packet is lost for an outcome, and while the describing
        workers fall behind, so that no key goes without its text for one. The stage's
        span covers both switches, so that a record of the moments between them is shed
        too. While shed, the probes are out of the traced process (OpsProbe.unhook): in
        a storm, its handlers and the capture share the cores."""
        if self.probe is None:
            return
        now = time.monotonic_ns()  # the clock of bpf_ktime_get_ns()
        if not self.shedding and (recv.fill >= SHED_ABOVE or describing_behind):
            self._shed_for_ns = min(2 * self._shed_for_ns, MAX_SHED_NS) \
                if now - self._resumed_ns < RECOVERED_NS else MIN_SHED_NS
            self._shed_until_ns = now + self._shed_for_ns
            self.shedding = True
            self.stage.shed(True, now)
            self.probe.shed(True)
            recv.mark_outcomes_shed(True)
            if self.probe.unhook():
                self._unhooked_since_ns = now
        elif self.shedding and recv.fill <= SHED_UNTIL and not describing_behind and \
                now >= self._shed_until_ns:
            # Back in before any upcall goes unmarked; if the process is gone, its exit
            # ends the capture or moves it on (follow), still shed.
            if not self.probe.rehook():
                return
            recv.mark_outcomes_shed(False)
            self._resume()
            self._resumed_ns = now

    def _resume(self) -> None:
        self.probe.shed(False)
        self.stage.shed(False, time.monotonic_ns())
        self.shedding = False
        self._count_unhooked_time()

    def _count_unhooked_time(self) -> None:
        if self._unhooked_since_ns is not None:
            self._unhooked_ns += time.monotonic_ns() - self._unhooked_since_ns
            self._unhooked_since_ns = None

    @property
    def unhooked_s(self) -> float:
        """How long the probes were out of the traced processes, shedding."""
        since = self._unhooked_since_ns
        now = 0 if since is None else time.monotonic_ns() - since
        return (self._unhooked_ns + now) / 1e9

    def stop(self) -> None:
        if self.probe is not None:
            self.stage.add_ops(self.probe.stop(), self.lost)
        self._count_unhooked_time()  # out until the end, if shedding still

    @property
    def lost(self) -> int:
        return self.totals.lost

    @property
    def totals(self) -> OpsCounters:
        """The probes' counters, summed over the processes followed."""
        if self.probe is None:
            return self._earlier
        return self._earlier + self.probe.counters()

    def follow(self, pid: int) -> None:
        """The traced process was replaced by `pid`: attach to its probes, where it has
        them (where not, its upcalls' outcomes are unknown)."""
        self._earlier = self.totals
        if self.shedding:
            self._resume()
        self.close()
        self.probe = None
        if not missing_probes(pid):
            probe = OpsProbe(pid)
            try:
                probe.attach()
            except UsageError:
                return
            self.probe = probe

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()


def report(counts: OutcomeCounts, probes: OpsCounters, unhooked_s: float = 0.0) -> str:
    """The summary's line for outcomes, with the probes' lost and shed ops events, and how
    long the probes were out of the process (HandlerOps.pace): its ops then went
    uncounted, and their upcalls' outcomes are the unknown ones said above."""
    lost, shed = probes.lost, probes.shed + counts.dropped_ops
    text = (f"outcomes: {counts.put} flow puts, {counts.execute} executes, "
            f"{counts.none} with no flow installed")
    if counts.unknown_total:
        reasons = ", ".join(f"{count} {UNKNOWN_SHORT[reason]}"
                            for reason, count in sorted(counts.unknown.items()))
        text += f", {counts.unknown_total} unknown ({reasons})"
    if lost:
        text += f"; {lost} flow operation events lost (ring full)"
    if shed:
        text += f"; {shed} not copied (capture overloaded)"
    if unhooked_s:
        text += f"; the probes were out for {unhooked_s:.1f} s (capture overloaded)"
    return text


UNKNOWN_SHORT = {UNKNOWN_TIMEOUT: "no op within the window",
                 UNKNOWN_EVENTS_LOST: "events lost", UNKNOWN_CAPTURE_ENDED: "capture ended",
                 UNKNOWN_WINDOW_FULL: "window full", UNKNOWN_SHED: "capture overloaded"}
