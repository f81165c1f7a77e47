"""Describing upcalls on worker processes, so that a storm of new flows uses every core.

The main process reads the ring, puts records in time order and writes the file; each
batch of records (a few hundred) goes whole to one worker, which builds its pcapng blocks
with `UpcallBlocks`, exactly as a single process would: key text, comments, options.
The main process then takes the batches back in the order it sent them, fits their
interface ids to its own table (interfaces.adopt_batch: it is the one owner of ids) and
writes them. The output is byte for byte what `--workers 0` writes for the same records.

Shedding: decoding a new key is what costs (some microseconds); copying a packet is
cheap. At most MAX_IN_FLIGHT records are out with the workers: past that the ring's
reader waits, and recv_upcall's ring holds the backlog (locked kernel memory that is
there anyway, not our heap). When the ring is SHED_KEYS_ABOVE full at a read, the
workers build their batches with `decode=False` until it is down to SHED_KEYS_UNTIL
(and, in a storm too big to decode, they have room to decode again: TRIED_HOLD_S,
DECODE_AGAIN_BELOW): still every packet's block, but a key they have not decoded already
is written raw, with a comment that says so, which costs them a fraction of decoding.
So the packets keep up as long as the packet path does, and `-r FILE -w NEW` writes the
missing texts in later.
The switch is a byte the workers share with us (Shedding), read as a batch starts:
so it reaches the batches already out too. Sent with the batch, as before, it left a
whole MAX_IN_FLIGHT of them (some 100 ms of a worker's decoding) to be decoded as the
ring filled on. At 200,000 new flows/s, the ring's peak fill in each 100 ms, in two
runs each way: median 0.27 and 0.25, highest 0.54 and 0.96 then; 0.21 and 0.20, and
0.48 and 0.56 now. Before the capture sheds keys it sheds outcomes (`behind`:
outcomes.HandlerOps.pace), and the workers make no new outcome texts (another byte).

Workers are separate interpreters (`python -m upcall_capture.workers`), each with two
pipes and two rings in memory it shares with us (channel.py): a batch's records go as
one chunk of a ring, never one object per record, its blocks come back the same way,
and a small frame through the pipe says so. A thread of the main process's sends to
each worker, so that the ring's reader never waits for a worker busy with earlier
batches, and another takes its replies, so that the worker never waits for the output
thread busy writing the file. The worker itself is one thread (one reading ahead cost
it a microsecond an upcall, handing the GIL back and forth).
"""

from __future__ import annotations

import mmap
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import BinaryIO

from upcall_capture import channel
from upcall_capture.channel import SharedMemory
from upcall_capture.errors import CaptureError
from upcall_capture.interfaces import InterfaceTable, WorkerBatch
from upcall_capture.ports import PortNames, dpctl_show, no_port_names
from upcall_capture.tuning import HeapTrimmer, schedule_for_latency
from upcall_capture.upcall_blocks import OUTCOME_TEXT_SHARE, UpcallBlocks

# Records sent to workers and not yet back, beyond which the reader waits: at 100,000
# new flows a second, some 160 ms of work. Half that, and the workers are behind.
MAX_IN_FLIGHT = 16384
# recv_upcall's ring this full at a read: keys are shed until it is down to
# SHED_KEYS_UNTIL. Keys were shed at 8,192 records out, but the workers' pace is uneven
# on a loaded host, and at 100,000 new flows/s one worker that kept up left 8% to 18% of
# them without text; waiting in the ring instead, none. A storm's start passes a quarter
# (the first batch reaches the worker some 100 ms after the first upcall, and then every
# flow is new), and each flow's first sighting goes without text. Half the ring kept
# those texts, but where the worker only just keeps up the ring stays about as full as
# the start left it: 4,000 flows repeated at 200,000/s lost 1.8% to 19.5% in four runs,
# and none to 2.8% at a quarter (A B alternating). Outcomes go first (1/16: see
# outcomes.SHED_ABOVE).
SHED_KEYS_ABOVE = 1 / 4
SHED_KEYS_UNTIL = 1 / 32
# Once keys that came back were shed again within TRIED_HOLD_S, the storm is taken to be
# too big to decode: from then on they come back only once the workers have room to
# decode again, busy less than DECODE_AGAIN_BELOW of the last BUSY_WINDOW_S, shedding
# (decoding a new key costs about twice as much). In a storm too big to decode, keys came
# back each time the ring was down to 1/32, every new one was decoded until the ring was
# a quarter full again, and so on: 4% to 18% of the keys of 250,000 new flows/s got their
# text that way, at twice the cost of shedding them, and each time the ring was left a
# quarter full for whatever came next. But at 100,000 new flows/s, where one worker keeps
# up, a stall of the host sheds keys too, and shedding kept the worker half busy there:
# in four runs, keys stayed shed 0.2 to 1.9 s after the ring was drained, some 20,000 to
# 190,000 new flows without text each time.
TRIED_HOLD_S = 1.0
DECODE_AGAIN_BELOW = 0.5
BUSY_WINDOW_S = 0.25
# Replies taken from a worker ahead of the output thread: batches of up to sink.MAX_BATCH.
REPLIES_AHEAD = 16


# The most workers chosen by default. The main process reads, orders and writes every
# upcall on what is in effect one core (its threads share the GIL): 2.2 to 2.8 µs an
# upcall in the storms of `make bench-targets` here, some 400,000 upcalls/s at most,
# which three workers decoding new keys at about 150,000/s each already match. More would
# only take cores and memory (up to 60 MB each) from a hypervisor's ovs-vswitchd.
DEFAULT_MAX_WORKERS = 4


def default_count() -> int:
    """One worker per core the main process leaves free, at least one and at most
    DEFAULT_MAX_WORKERS."""
    return min(DEFAULT_MAX_WORKERS, max(1, len(os.sched_getaffinity(0)) - 1))


@dataclass(frozen=True)
class BlockSettings:
    """How the blocks are built: the same in the main process and in every worker."""

    snaplen: int
    clock_offset_ns: int
    if_filter: str | None
    port_names: bool  # ask the traced ovs-vswitchd for port names (dpctl/show)
    known_ports: tuple[int, str] = (0, "")  # (pid, its dpctl/show text at the start)
    # The share of its time a worker may spend on new outcome texts (UpcallBlocks): past
    # it, they are shed. Which are then depends on each worker's cache and clock, so the
    # output is that of one process only while none is shed (1: none is).
    outcome_text_share: float = OUTCOME_TEXT_SHARE


@dataclass(frozen=True)
class _Batch:
    """What a worker is sent with a batch's records."""

    section: int  # the output's section (file): a new one starts a new table
    table: list[tuple[Hashable, bytes]] | None  # the section's table, when it changed
    pid: int  # the traced process, to name ports
    dropped: int  # losses before the batch: its first packet carries them
    note: str | None  # a comment for the first packet (--follow's gap)
    lengths: bytes  # array('I') of the records' lengths


@dataclass(frozen=True)
class _Built:
    """What a worker sends back with a batch's blocks."""

    interfaces: list[tuple[Hashable, bytes]]
    emitted: list[int]
    counts: list[tuple[int, int, int]]
    last: int | None  # the worker id of the last packet's interface
    undecoded: int
    cpu_seconds: float


class _SharedFlag:
    """A boolean in one byte of Shedding's shared memory."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __get__(self, shedding: Shedding, owner: type | None = None) -> bool:
        return shedding._bytes[self.index] != 0

    def __set__(self, shedding: Shedding, shed: bool) -> None:
        shedding._bytes[self.index] = shed


class Shedding:
    """What the workers shed, in two bytes of memory shared with them: new keys' texts
    (`keys`) and new outcome texts (`outcome_texts`). A worker looks at them before each
    batch, so a batch sent for decoding is shed as soon as the capture falls behind, not
    only those sent after. `fd` is for the workers to map, until forget_fd()
    (SharedMemory says why)."""

    keys = _SharedFlag(0)
    outcome_texts = _SharedFlag(1)

    def __init__(self, fd: int | None = None) -> None:
        self._memory = SharedMemory(mmap.PAGESIZE, fd, name="upcall-capture-shedding")
        self._bytes = self._memory.view[:2]

    @property
    def fd(self) -> int | None:
        return self._memory.fd

    def forget_fd(self) -> None:
        self._memory.forget_fd()

    def close(self) -> None:
        self._bytes.release()
        self._memory.close()


class _Worker:
    def __init__(self, settings: BlockSettings, number: int, shedding: Shedding) -> None:
        self.number = number
        self._memory = SharedMemory(channel.PAIR_BYTES, name=f"upcall-capture-{number}")
        try:
            # A session of its own: the terminal's Ctrl-C is the main process's to handle.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "upcall_capture.workers", str(shedding.fd),
                 str(self._memory.fd)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
                pass_fds=(shedding.fd, self._memory.fd))
        except OSError:
            self._memory.close()
            raise
        self._memory.forget_fd()
        self._requests, self._replies = channel.ring_pair(self._memory.view)
        self.in_flight = 0  # records sent, not yet back
        self.cpu_seconds = 0.0
        self.table_sent: tuple[int, int] | None = None  # (section, entries) last sent
        # Batches are sent by a thread of the main process's, so that the reader of the
        # ring never waits for a worker that is busy with earlier ones.
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox.put((pickle.dumps(settings), b""))
        self._sender = threading.Thread(target=self._send_all, name=f"worker-{number}",
                                        daemon=True)
        self._sender.start()
        # Its replies are taken as soon as it makes them, by another: the output thread,
        # busy writing the file, left the worker blocked on a full pipe a quarter of its
        # time in a storm of 250,000 new flows/s. At most REPLIES_AHEAD wait taken (a few
        # MB: with MAX_IN_FLIGHT's worth, the main process's peak RSS grew by 14 MB).
        self._inbox: queue.Queue = queue.Queue(maxsize=REPLIES_AHEAD)
        self._receiver = threading.Thread(target=self._receive_all,
                                          name=f"worker-{number}-replies", daemon=True)
        self._receiver.start()

    def _alive(self) -> bool:
        return self.process.poll() is None

    def _send_all(self) -> None:
        schedule_for_latency()
        stream = self.process.stdin
        try:
            while (message := self._outbox.get()) is not None:
                channel.send(stream, self._requests, *message, self._alive)
            stream.close()
        except (BrokenPipeError, ValueError):
            pass  # the worker is gone: receive() says so

    def send(self, batch: _Batch, records: bytes) -> None:
        self._outbox.put((pickle.dumps(batch), records))

    def _receive_all(self) -> None:
        schedule_for_latency()
        stream = self.process.stdout
        while (reply := channel.receive(stream, self._replies)) is not None:
            self._inbox.put(reply)
        self._inbox.put(None)  # the worker is gone

    def receive(self) -> tuple[_Built, bytes]:
        reply = self._inbox.get()
        if reply is None:
            self._inbox.put(None)  # and stays gone for any later call
            raise CaptureError(f"describing worker {self.number} exited")
        meta, blocks = reply
        return pickle.loads(meta), blocks

    def close(self) -> None:
        self._outbox.put(None)
        self._sender.join(timeout=5)
        # Replies that nobody will collect (a capture ended by an error) must not keep the
        # reader, and so the worker, waiting for room.
        deadline = time.monotonic() + 5
        while self._receiver.is_alive() and time.monotonic() < deadline:
            try:
                self._inbox.get(timeout=0.05)
            except queue.Empty:
                pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._receiver.join(timeout=5)
        self.process.stdout.close()
        if not (self._sender.is_alive() or self._receiver.is_alive()):
            self._requests.release()
            self._replies.release()
            self._memory.close()  # else left mapped: a thread may still touch it


@dataclass(frozen=True)
class Ticket:
    worker: _Worker
    count: int


class WorkerPool:
    """Batches out to the workers, least busy first, and back in the order sent.

    `dispatch` is called by the thread that reads the ring, `collect` by the one that
    writes, for the tickets in dispatch order."""

    def __init__(self, count: int, settings: BlockSettings, *,
                 max_in_flight: int = MAX_IN_FLIGHT,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.settings = settings
        self.max_in_flight = max_in_flight
        self._clock = clock
        self.workers: list[_Worker] = []
        self.undecoded = 0  # packets written without their key's text
        self._in_flight = 0
        self._lock = threading.Lock()
        self._started_ns = clock()
        self._window = (self._started_ns, 0.0)  # the busy window's start, and CPU then
        self._recently_busy = 0.0  # in the last whole window
        self._keys_back_ns: int | None = None  # when shed keys last came back
        self._too_big = False  # they were shed again within TRIED_HOLD_S
        self.shedding: Shedding | None = None
        try:
            self.shedding = Shedding()
            for number in range(count):
                self.workers.append(_Worker(settings, number, self.shedding))
            self.shedding.forget_fd()
        except OSError as err:
            self.close()
            raise CaptureError(f"cannot start a describing worker: {err.strerror}") from None

    def dispatch(self, records: Sequence[bytes | memoryview], *, dropped: int,
                 note: str | None, section: int, table: InterfaceTable, pid: int) -> Ticket:
        with self._lock:
            worker = min(self.workers, key=lambda w: w.in_flight)
            worker.in_flight += len(records)
            self._in_flight += len(records)
        state = (section, len(table))
        entries = None
        if worker.table_sent != state:
            worker.table_sent = state
            entries = [(i.identity, i.description) for i in table.interfaces]
        lengths = array("I", map(len, records)).tobytes()
        worker.send(_Batch(section, entries, pid, dropped, note, lengths),
                    b"".join(records))
        return Ticket(worker, len(records))

    def collect(self, ticket: Ticket) -> tuple[WorkerBatch, int | None]:
        """The batch's blocks, and the worker id of its last packet's interface."""
        built, blocks = ticket.worker.receive()
        with self._lock:
            ticket.worker.in_flight -= ticket.count
            ticket.worker.cpu_seconds += built.cpu_seconds
            self._in_flight -= ticket.count
            self.undecoded += built.undecoded
        return WorkerBatch(blocks, built.interfaces, built.emitted, built.counts), built.last

    def pace(self, ring_fill: float) -> None:
        """Shed new keys while recv_upcall's ring fills up (its share held at the last
        read): the workers are that far behind, and no packet is lost for a key. They
        are decoded again once the ring is nearly empty; in a storm too big to decode
        (they were shed again soon after they came back), only once the workers have
        room as well. New outcome texts (a new flow's megaflow: some 0.08 ms) wait from
        the moment they are `behind`: keys come first. (At a storm's start, the workers'
        first batches spent their whole credit of outcome texts, 50 ms, while the records
        out piled up to MAX_IN_FLIGHT.)"""
        shedding = self.shedding
        now_ns = self._clock()
        recently_busy = self._busy_lately(now_ns)
        if not shedding.keys and ring_fill >= SHED_KEYS_ABOVE:
            shedding.keys = True
            back = self._keys_back_ns
            self._too_big = back is not None and now_ns - back < TRIED_HOLD_S * 1e9
        elif shedding.keys and ring_fill <= SHED_KEYS_UNTIL and \
                (not self._too_big or recently_busy < DECODE_AGAIN_BELOW):
            shedding.keys = False
            self._keys_back_ns = now_ns
        shedding.outcome_texts = self.behind

    @property
    def decoding(self) -> bool:
        """New keys are decoded: the workers' shared flag is down."""
        return not self.shedding.keys

    @property
    def behind(self) -> bool:
        """Half of max_in_flight is out, or keys are shed: the capture sheds outcomes
        (HandlerOps.pace), which cost both the main process and the workers, first."""
        return 2 * self._in_flight >= self.max_in_flight or not self.decoding

    def busy(self) -> float:
        """How busy the workers were since they started: their CPU time over the time
        there was, 1.0 for every worker busy all along."""
        return self._busy_since(self._started_ns, 0.0, self._clock())[0]

    def _busy_lately(self, now_ns: int) -> float:
        """How busy the workers were in the last whole window of BUSY_WINDOW_S."""
        started_ns, cpu_then = self._window
        if now_ns - started_ns >= BUSY_WINDOW_S * 1e9:
            self._recently_busy, cpu_now = self._busy_since(started_ns, cpu_then, now_ns)
            self._window = (now_ns, cpu_now)
        return self._recently_busy

    def _busy_since(self, started_ns: int, cpu_then: float, now_ns: int
                    ) -> tuple[float, float]:
        """The workers' busy share from `started_ns`, when their CPU time was `cpu_then`
        (a batch's counts once it is back), to `now_ns`; and their CPU time now."""
        elapsed = (now_ns - started_ns) / 1e9
        cpu_now = sum(w.cpu_seconds for w in self.workers)
        return (cpu_now - cpu_then) / max(elapsed * len(self.workers), 1e-9), cpu_now

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        if self.shedding is not None:
            self.shedding.close()


# ---------------------------------------------------------------------------------------
# The worker's side


def _records(blob: bytes | memoryview, lengths: bytes) -> list[memoryview]:
    sizes = array("I")
    sizes.frombytes(lengths)
    view = memoryview(blob)
    ends = list(accumulate(sizes))
    return [view[end - size:end] for end, size in zip(ends, sizes, strict=True)]


class _Describer:
    """A worker's UpcallBlocks, kept in step with the main process's table."""

    def __init__(self, settings: BlockSettings, shedding: Shedding) -> None:
        self.settings = settings
        self.shedding = shedding
        self.section = -1
        self.blocks: UpcallBlocks | None = None
        self._names: dict[int, PortNames] = {}

    def _port_namer(self, pid: int):
        if not self.settings.port_names:
            return no_port_names
        if pid not in self._names:
            known_pid, known = self.settings.known_ports
            self._names = {pid: PortNames(lambda: dpctl_show(pid),
                                          known=known if pid == known_pid else "")}
        return self._names[pid].name

    def _fresh(self, entries: list[tuple[Hashable, bytes]], pid: int) -> None:
        settings = self.settings
        self.blocks = UpcallBlocks(
            snaplen=settings.snaplen, clock_offset_ns=settings.clock_offset_ns,
            port_name=self._port_namer(pid), if_filter=settings.if_filter,
            table=InterfaceTable(entries),
            outcome_text_share=settings.outcome_text_share)

    def _follow_table(self, batch: _Batch) -> None:
        if batch.section != self.section or self.blocks is None:
            self.section = batch.section
            self._fresh(batch.table or [], batch.pid)
            return
        self.blocks.port_name = self._port_namer(batch.pid)
        if batch.table is None:
            return
        ours = [(i.identity, i.description) for i in self.blocks.table.interfaces]
        common = min(len(ours), len(batch.table))
        if ours[:common] != batch.table[:common]:
            # Another worker's interface took an id this one gave out: start again from
            # the main process's table (and with empty caches, which held the old ids).
            self._fresh(batch.table, batch.pid)
        else:
            for identity, description in batch.table[common:]:
                self.blocks.table.add(identity, description)

    def build(self, batch: _Batch, blob: bytes | memoryview) -> tuple[_Built, bytes]:
        started = time.process_time()
        self._follow_table(batch)
        blocks = self.blocks
        if batch.note is not None:
            blocks.note_next(batch.note)
        undecoded = blocks.undecoded
        # What is shed is read as the batch starts, not as it was sent.
        shedding = self.shedding
        built = blocks.packets(_records(blob, batch.lengths), batch.dropped,
                               decode=not shedding.keys,
                               outcome_texts=not shedding.outcome_texts)
        table = blocks.table
        counts = []
        for if_id, interface in enumerate(table.interfaces):
            if interface.received or interface.dropped:
                counts.append((if_id, interface.received, interface.dropped))
                interface.received = interface.dropped = 0
        last = blocks.last_interface
        return _Built(
            interfaces=[(i.identity, i.description) for i in table.interfaces],
            emitted=blocks.emitted, counts=counts,
            last=None if last is None else table.find(last.identity),
            undecoded=blocks.undecoded - undecoded,
            cpu_seconds=time.process_time() - started), built


def serve(requests: BinaryIO, replies: BinaryIO, shedding: Shedding,
          memory: mmap.mmap) -> None:
    """A worker: batches in, blocks out, until the main process closes its end. A batch's
    records are read where they lie in the shared memory, and their room given back once
    its blocks are built (channel.receive_in_place)."""
    incoming, outgoing = channel.ring_pair(memoryview(memory))
    parent = os.getppid()

    def alive() -> bool:  # the main process, which takes our replies
        return os.getppid() == parent

    settings = channel.receive(requests, incoming)
    if settings is None:
        return
    describer = _Describer(pickle.loads(settings[0]), shedding)
    trimmer = HeapTrimmer()
    while (request := channel.receive_in_place(requests, incoming)) is not None:
        meta, records, end = request
        built, blocks = describer.build(pickle.loads(meta), records)
        del request, records  # nothing may see the ring's room once it is given back
        if end is not None:
            incoming.release_to(end)
        channel.send(replies, outgoing, pickle.dumps(built), blocks, alive)
        del blocks  # freed before a trim
        trimmer.tick()


if __name__ == "__main__":
    # Through the module's own name: what is pickled must name upcall_capture.workers.
    from upcall_capture import workers
    from upcall_capture.tuning import tune_gc

    tune_gc()
    try:
        shedding = workers.Shedding(int(sys.argv[1]))
        shedding.forget_fd()
        memory = channel.map_shared(int(sys.argv[2]), channel.PAIR_BYTES)
        workers.serve(sys.stdin.buffer, sys.stdout.buffer, shedding, memory)
    except (BrokenPipeError, KeyboardInterrupt):
        pass
