"""The capture loop: probe records, merged into time order, handed to the outputs.

It stops on -c, on a signal, when the traced process exits, or when a pipe reader
leaves; then it stops the probe, drains what is left, and closes every output so
that the file is complete. The probe's own counters are the truth about losses.
With --follow the traced process's exit does not stop it: it waits for a successor,
attaches a new probe, and goes on with the same outputs, the first upcall after the
gap carrying a note; counters are summed over the probes.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from upcall_capture.errors import CaptureError, UsageError
from upcall_capture.follow import Follower
from upcall_capture.interfaces import InterfaceTable, adopt_batch
from upcall_capture.kernel_side import KernelSide
from upcall_capture.kernel_side import report as kernel_report
from upcall_capture.outcomes import HandlerOps
from upcall_capture.outcomes import report as outcomes_report
from upcall_capture.probe.loader import Counters, RecvUpcallProbe
from upcall_capture.probe.record import (
    F_DPIF_UNREADABLE,
    F_FAILED,
    FLAGS_OFFSET,
    PID_OFFSET,
    U32,
    TimeMerger,
    Upcall,
    count_flagged,
    ktime,
    parse,
    unread_dpif_address,
    with_dpif,
)
from upcall_capture.sink import OutputThread, Sink, WriteBehind
from upcall_capture.target import is_alive, read_cstring
from upcall_capture.upcall_blocks import UpcallBlocks
from upcall_capture.workers import BlockSettings, WorkerPool

# Blocks written at once by PcapngOutput in a storm. Each write costs the writer's thread
# some system calls (the direct transfer, and the last partial block's through the page
# cache), and after each it waits for the GIL, up to the 5 ms switch interval while the
# main process's other threads run. At 1 MiB the writer was busy 9.3 s of a 10 s storm of
# 250,000 new flows/s (7,844 pwrite() calls, 8.6 s in them) and the output thread, the
# replies and the worker waited for it; at 4 MiB, 4.5 s (2,271 calls; instrumented runs).
COALESCE_BYTES = 4 << 20
# How often to look whether the traced process is still there.
LIVENESS_INTERVAL_NS = 250_000_000
PROGRESS_INTERVAL_NS = 1_000_000_000


class Output(Protocol):
    # Why the output can take no more (its reader left, a write failed), or None.
    ended: str | None

    def prepare(self, records: Sequence[bytes], dropped: int) -> object: ...
    def packets(self, records: Sequence[bytes], dropped: int, prepared: object) -> None: ...
    def finish(self, end_ktime_ns: int, start_ktime_ns: int) -> None: ...
    def gap(self, note: str) -> None: ...  # --follow resumed after the traced process exited
    def flush(self) -> None: ...  # the output thread is idle: write what is held back


def clock_offset_ns(samples: int = 5) -> int:
    """Wall clock minus CLOCK_MONOTONIC (the probe's bpf_ktime_get_ns), in ns.

    Taken from the tightest of a few bracketed readings.
    """
    best = None
    for _ in range(samples):
        before = time.monotonic_ns()
        wall = time.time_ns()
        after = time.monotonic_ns()
        if best is None or after - before < best[0]:
            best = (after - before, wall - (before + after) // 2)
    return best[1]


class DpifNames:
    """Names the probe could not read, read through /proc/PID/mem instead.

    A probe cannot fault a page in: a dpif name in a page the traced process has not
    touched lately (a string constant, say) is unreadable to it, and it passes the
    address on. The name lives as long as the datapath, so it is read once.
    """

    def __init__(self) -> None:
        self._names: dict[tuple[int, int], bytes | None] = {}

    def resolve(self, records: list) -> list:
        """The records, names filled in. Done as soon as records are read: the process
        may not live long (reading the name also makes it resident for the probe)."""
        if not count_flagged(records, F_DPIF_UNREADABLE)[0]:
            return records
        return [self._resolved(record) if record[FLAGS_OFFSET] & F_DPIF_UNREADABLE
                else record for record in records]

    def _resolved(self, record):
        address = unread_dpif_address(record)
        pid = U32.unpack_from(record, PID_OFFSET)[0]
        if (pid, address) not in self._names:
            if len(self._names) >= 1024:  # bounded: a handful of datapaths in practice
                self._names.clear()
            self._names[(pid, address)] = read_cstring(pid, address)
        name = self._names[(pid, address)]
        return record if name is None else with_dpif(record, name)


class UserspaceFiltered:
    """A probe whose filter is finished here for what could not run in the kernel.

    Records the test rejects count as filtered, beside the probe's own, so that
    fired = captured + lost + filtered still holds.
    """

    def __init__(self, probe: RecvUpcallProbe, keep: Callable[[Upcall], bool]) -> None:
        self.probe = probe
        self.keep = keep
        self.filtered = 0

    def _select(self, records: list[bytes]) -> list[bytes]:
        kept = [record for record in records if self.keep(parse(record))]
        self.filtered += len(records) - len(kept)
        return kept

    def attach(self) -> None:
        self.probe.attach()

    def drain(self) -> list[bytes]:
        return self._select(self.probe.drain())

    def halt(self) -> None:
        self.probe.halt()

    def peak_fill(self) -> float:
        return self.probe.peak_fill()

    @property
    def backlog(self) -> bool:
        return self.probe.backlog

    @property
    def fill(self) -> float:
        return self.probe.fill

    def mark_outcomes_shed(self, on: bool) -> None:
        self.probe.mark_outcomes_shed(on)

    def counters(self) -> Counters:
        counters = self.probe.counters()
        return Counters(counters.fired, counters.filtered + self.filtered, counters.lost)

    def close(self) -> None:
        self.probe.close()


@dataclass(frozen=True)
class Rotation:
    """When to start a new file, as tcpdump's -C, -G and -W."""

    max_bytes: int | None = None  # -C: a file reaching this size is closed
    interval_ns: int | None = None  # -G: a file this old is closed
    ring: int | None = None  # -W: reuse this many names in turn


def rotated_name(path: str, index: int, ring: int | None) -> str:
    """out.pcapng, file 3 -> out-003.pcapng (the number goes before the extensions)."""
    width = max(3, len(str(ring - 1))) if ring else 3
    number = f"-{index % ring if ring else index:0{width}d}"
    for extension in (".pcapng.gz", ".pcapng", ".pcap.gz", ".pcap"):
        if path.endswith(extension):
            return path[:-len(extension)] + number + extension
    return path + number


class InlineBlocks:
    """A section's blocks built in this process (--workers 0)."""

    def __init__(self, make_blocks: Callable[[], UpcallBlocks]) -> None:
        self.make_blocks = make_blocks
        self.new_section()

    @property
    def undecoded(self) -> int:
        return 0  # it decodes every key, however long that takes

    def new_section(self) -> None:
        self.current = self.make_blocks()

    def prepare(self, records: Sequence[bytes], dropped: int, note: str | None) -> object:
        return records, dropped, note

    def blocks(self, prepared: tuple) -> bytes | bytearray:
        records, dropped, note = prepared
        if note is not None:
            self.current.note_next(note)
        return self.current.packets(records, dropped)

    def statistics(self, end_ktime_ns: int, start_ktime_ns: int, *, final: bool,
                   datapath_comments: dict[str, str] | None = None) -> bytes:
        return self.current.statistics(end_ktime_ns, start_ktime_ns=start_ktime_ns,
                                       datapath_comments=datapath_comments)


class PooledBlocks:
    """A section's blocks built by worker processes; this process owns the interface
    ids (interfaces.adopt_batch) and the losses that no packet carries yet."""

    def __init__(self, pool: WorkerPool, settings: BlockSettings,
                 target_pid: Callable[[], int]) -> None:
        self.pool = pool
        self.settings = settings
        self.target_pid = target_pid
        self._section: tuple[int, InterfaceTable] = (-1, InterfaceTable())
        self._pending_drops = 0  # the reader's: losses with no batch to carry them yet
        self.new_section()

    @property
    def undecoded(self) -> int:
        return self.pool.undecoded

    def new_section(self) -> None:
        # One assignment, so that the reader's thread sees a section and its table together.
        self._section = (self._section[0] + 1, InterfaceTable())
        self._last: int | None = None  # the table id of the last packet's interface
        self.unattributed_drops = 0

    def prepare(self, records: Sequence[bytes], dropped: int, note: str | None) -> object:
        dropped += self._pending_drops
        self._pending_drops = 0
        if not records:
            self._pending_drops = dropped
            return None
        section, table = self._section
        return self.pool.dispatch(records, dropped=dropped, note=note, section=section,
                                  table=table, pid=self.target_pid())

    def blocks(self, ticket) -> bytes:
        if ticket is None:
            return b""
        batch, last = self.pool.collect(ticket)
        blocks, mapping = adopt_batch(self._section[1], batch)
        if last is not None:
            self._last = mapping[last]
        return blocks

    def statistics(self, end_ktime_ns: int, start_ktime_ns: int, *, final: bool,
                   datapath_comments: dict[str, str] | None = None) -> bytes:
        table = self._section[1]
        if final and self._pending_drops:
            if not table.charge_after_last(self._pending_drops, self._last):
                self.unattributed_drops += self._pending_drops
            self._pending_drops = 0
        offset = self.settings.clock_offset_ns
        return table.statistics(end_ktime_ns + offset, start_ns=start_ktime_ns + offset,
                                end_ns=end_ktime_ns + offset,
                                filtered=bool(self.settings.if_filter),
                                datapath_comments=datapath_comments)


class PcapngOutput:
    """pcapng sections: a header at once, packets as they come, statistics at the end.

    Blocks are held back until COALESCE_BYTES of them are waiting or the output thread
    has nothing more to do (flush()): in a storm, each write (and the GIL it waits for
    afterwards) then carries several batches. The writes are made behind the output
    thread (sink.WriteBehind), which meanwhile takes the next batches.

    With a Rotation, each file is a complete capture of its own: when one is full or
    old enough it gets its statistics and is closed, and the next starts with a new
    section header and its own interfaces. `builder` makes the blocks: InlineBlocks or
    PooledBlocks. `datapath_comments`, asked at the end, gives the last file's ISBs a
    comment for each datapath (the kernel side's lost: counters).
    """

    def __init__(self, builder: InlineBlocks | PooledBlocks, sink: Sink,
                 section_header: bytes, *, rotation: Rotation | None = None,
                 open_next: Callable[[int], Sink] | None = None,
                 datapath_comments: Callable[[], dict[str, str]] | None = None) -> None:
        self.builder = builder
        self.datapath_comments = datapath_comments
        self.section_header = section_header
        self.rotation = rotation
        self.open_next = open_next
        self.ended: str | None = None
        self.error: CaptureError | None = None
        self.written = 0  # upcalls in complete blocks in the output
        self.files = 0
        self._gap_note: str | None = None  # for the next packet, whichever file it goes to
        self._held: list[bytes | bytearray] = []  # blocks not written yet, by batch
        self._held_upcalls: list[int] = []  # the upcalls in each
        self._held_bytes = 0
        self._submitted_upcalls: deque[int] = deque()  # of each batch with the writer
        self._start(sink, first=True)

    def _start(self, sink: Sink, *, first: bool = False) -> None:
        self.sink = sink
        if not first:
            self.builder.new_section()
        self.files += 1
        self._file_start_ns = time.monotonic_ns()
        sink.write(self.section_header)
        self._behind = WriteBehind(sink, self._written)

    def _written(self, written: int, submitted: int) -> None:
        """In the writer's thread: of the next `submitted` batches, the first `written`
        are in the file. Fewer after an error, when the rest are dropped."""
        upcalls = self._submitted_upcalls
        self.written += sum(upcalls.popleft() for _ in range(written))
        if written < submitted:
            upcalls.clear()
        if self.sink.closed_by_reader:
            self.ended = "the output's reader went away"

    def wait_written(self) -> None:
        """Everything submitted is in the file (or the writing's error is raised)."""
        self._behind.wait()

    def _rotation_due(self, now_ns: int) -> bool:
        rotation = self.rotation
        if rotation is None:
            return False
        if rotation.max_bytes is not None and \
                self.sink.good_bytes + self._behind.waiting_bytes + self._held_bytes \
                >= rotation.max_bytes:
            return True
        return rotation.interval_ns is not None and \
            now_ns - self._file_start_ns >= rotation.interval_ns

    def prepare(self, records: Sequence[bytes], dropped: int) -> object:
        """In the reader's thread, in order: hand the batch to the builder."""
        note = None
        if self._gap_note is not None and records:
            note, self._gap_note = self._gap_note, None
        return self.builder.prepare(records, dropped, note)

    def packets(self, records: Sequence[bytes], dropped: int, prepared: object) -> None:
        if self.ended:
            self.builder.blocks(prepared)  # a worker's batch is collected all the same
            return
        try:
            now_ns = time.monotonic_ns()
            if self._rotation_due(now_ns):
                self._write_held()
                self._write_statistics(now_ns)
                self._close_sink()
                self._start(self.open_next(self.files))
            blocks = self.builder.blocks(prepared)
            self._held.append(blocks)
            self._held_upcalls.append(len(records))
            self._held_bytes += len(blocks)
            if self._held_bytes >= COALESCE_BYTES:
                self._write_held()
        except (CaptureError, UsageError) as err:
            self._failed(err)

    def flush(self) -> None:
        """Write what is held back (the output thread is idle)."""
        if not self.ended:
            try:
                self._write_held()
            except CaptureError as err:
                self._failed(err)

    def _write_held(self) -> None:
        if not self._held:
            return
        held = self._held
        self._submitted_upcalls.extend(self._held_upcalls)
        self._held, self._held_upcalls, self._held_bytes = [], [], 0
        self._behind.submit(held)

    def _failed(self, err: CaptureError | UsageError) -> None:
        # The sink cut the file back to the last batch that fitted: `written` counts them.
        self.error = CaptureError(str(err))
        self.ended = str(err)

    def gap(self, note: str) -> None:
        """The capture resumed after a gap: the next packet carries `note`."""
        self._gap_note = note

    @property
    def undecoded(self) -> int:
        return self.builder.undecoded

    def finish(self, end_ktime_ns: int, start_ktime_ns: int) -> None:
        if not self.ended:
            try:
                self._write_held()
                self._write_statistics(end_ktime_ns, final=True)
            except CaptureError as err:
                self.error = err
        self._close_sink()

    def _close_sink(self) -> None:
        self._behind.close()
        self.sink.close()

    def _write_statistics(self, end_ktime_ns: int, *, final: bool = False) -> None:
        self.wait_written()  # the statistics come after every packet
        comments = self.datapath_comments() if final and self.datapath_comments else None
        self.sink.write(self.builder.statistics(end_ktime_ns, self._file_start_ns, final=final,
                                                datapath_comments=comments))


@dataclass
class Summary:
    captured: int
    lost: int
    filtered: int
    fired: int
    stop_reason: str
    restarts: int | None = None  # of the traced process, followed (--follow)
    undecoded: int = 0  # written without their key's text: the capture was overloaded
    kernel: list[str] | None = None  # the kernel side's lines (kernel_side.report)
    outcomes: str | None = None  # the outcomes' line (outcomes.report)

    def line(self) -> str:
        text = f"{self.captured} upcalls captured"
        if self.undecoded:
            text += f", {self.undecoded} without key text"
        text += f", {self.lost} lost"
        if self.filtered:
            text += f", {self.filtered} filtered out"
        text += f" ({self.fired} fired)"
        if self.restarts is not None:
            text += f"; {self.restarts} restart{'' if self.restarts == 1 else 's'} followed"
        return text


class Capture:
    TARGET_EXITED = "the traced process exited"
    COUNT_REACHED = "count reached"
    DURATION_REACHED = "duration reached"

    def __init__(self, probe: RecvUpcallProbe, outputs: list[Output], *, target_pid: int,
                 count: int | None = None, duration: float | None = None,
                 progress: Callable[[int, Counters, float], None] | None = None,
                 follower: Follower | None = None, max_pending: int = 8192) -> None:
        self.probe = probe  # the current one: --follow replaces it
        self.progress = progress  # called about once a second: captured, counters, elapsed
        self.outputs = outputs
        self.target_pid = target_pid
        self.count = count
        self.duration = duration
        self.stop_reason: str | None = None
        self.captured = 0  # upcalls handed to the outputs, failed ones included
        self.failed = 0  # of them, failed upcalls (the kernel side's)
        # The kernel side, when attached (after the probe: see cli.py); it outlives a
        # followed process.
        self.kernel: KernelSide | None = None
        # The handlers' flow puts and executes, when attached: each upcall's outcome.
        self.ops: HandlerOps | None = None
        self.follower = follower
        # The workers describing upcalls, if any: they shed keys as the ring fills, and
        # outcomes are shed first.
        self.describers: WorkerPool | None = None
        self.max_pending = max_pending  # records the outputs may have in hand
        self._merger = TimeMerger()
        self._dpif_names = DpifNames()
        self._lost_seen = 0
        self._earlier = Counters(0, 0, 0)  # the final counts of the probes before this one

    def request_stop(self, reason: str) -> None:
        """Safe to call from a signal handler: the loop notices after its current poll."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def run(self) -> Summary:
        start_ns = time.monotonic_ns()
        deadline = None if self.duration is None else start_ns + int(self.duration * 1e9)
        while self._run_probe(start_ns, deadline) and self._follow(deadline):
            pass
        end_ns = time.monotonic_ns()
        for output in self.outputs:
            output.finish(end_ns, start_ns)
        totals = self._earlier
        kernel, ops = self.kernel, self.ops
        return Summary(
            captured=self.captured - self.failed, lost=totals.lost,
            filtered=totals.filtered + (ops.filtered if ops else 0),
            fired=totals.fired, stop_reason=self.stop_reason,
            restarts=None if self.follower is None else self.follower.restarts,
            undecoded=sum(getattr(output, "undecoded", 0) for output in self.outputs),
            kernel=None if kernel is None else kernel_report(
                kernel.lost, self.failed, kernel.counters(), kernel.filtered, kernel.matcher),
            outcomes=None if ops is None else outcomes_report(ops.stage.counts, ops.totals,
                                                             ops.unhooked_s),
        )

    def _prepare(self, records: Sequence[bytes], dropped: int) -> list:
        return [output.prepare(records, dropped) for output in self.outputs]

    def _flush(self) -> None:
        for output in self.outputs:
            output.flush()

    def _handle(self, records: Sequence[bytes], dropped: int, prepared: list) -> None:
        for output, ready in zip(self.outputs, prepared, strict=True):
            output.packets(records, dropped, ready)

    def _run_probe(self, start_ns: int, deadline: int | None) -> bool:
        """Capture with the current probe until asked to stop or, when following, until
        the target exits (then True); everything it caught is handed to the outputs."""
        # The outputs build and write blocks in a thread of their own: writing releases
        # the GIL, so it overlaps with reading the next batch from the ring.
        self._output_thread = OutputThread(self._handle, prepare=self._prepare,
                                           idle=self._flush,
                                           max_pending=self.max_pending)
        self._lost_seen = 0
        exited = False
        now = time.monotonic_ns()
        next_liveness = now + LIVENESS_INTERVAL_NS
        next_progress = now + PROGRESS_INTERVAL_NS
        while self.stop_reason is None and not exited:
            drain_start = time.monotonic_ns()
            records = self._dpif_names.resolve(self.probe.drain())
            self._merger.add(records)
            if self.describers is not None:
                self.describers.pace(self.probe.fill)
            if self.ops is not None:
                self.ops.pace(self.probe, self.describers is not None
                              and self.describers.behind)
            # Every record fired before drain_start is in hand, unless the read left a
            # backlog: then only those fired before the last one read.
            horizon = ktime(records[-1]) if records and self.probe.backlog else drain_start
            if self.kernel is not None:  # after recv_upcall's ring: see kernel_side.py
                self._merger.add(self.kernel.drain())
            if self.ops is not None:  # the same: see outcomes.py
                horizon = min(horizon, self.ops.drain())
            counters = self.probe.counters()
            self._deliver_until(horizon, counters)
            now = time.monotonic_ns()
            if self.progress is not None and now >= next_progress:
                next_progress = now + PROGRESS_INTERVAL_NS
                self.progress(self.captured, self._earlier + counters,
                              (now - start_ns) / 1e9)
            if now >= next_liveness:
                next_liveness = now + LIVENESS_INTERVAL_NS
                if not is_alive(self.target_pid):
                    exited = True
                    if self.follower is None:
                        self.request_stop(self.TARGET_EXITED)
            if deadline is not None and now >= deadline:
                self.request_stop(self.DURATION_REACHED)
        # Stop the probe first: after that the ring holds all that it submitted, and
        # its counters agree exactly with what was received. The other rings' events
        # come first, whole, as each of recv_upcall's records needs those before it.
        self.probe.halt()
        if self.kernel is not None:  # it outlives a followed process: stopped at the end
            self._merger.add(self.kernel.drain() if self.stop_reason is None
                             else self.kernel.stop())
        if self.ops is not None:
            self.ops.stop()
        counters = self.probe.counters()
        # What recv_upcall's ring still holds goes out a read at a time, as in the loop:
        # a storm's backlog can be the whole ring.
        while True:
            records = self._dpif_names.resolve(self.probe.drain())
            self._merger.add(records)
            if not self.probe.backlog:
                break
            if records:  # a read can hold only records the probe discarded
                self._deliver_until(ktime(records[-1]), counters)
        # Again: a filter finished here (UserspaceFiltered) counted what the drain rejected.
        counters = self.probe.counters()
        self._deliver(self._annotated(self._merger.release_all(), None), counters)
        # Every batch is written before a gap note can be given to the outputs.
        self._output_thread.close()
        self._earlier = self._earlier + counters
        return self.stop_reason is None

    def _follow(self, deadline: int | None) -> bool:
        """Wait for the exited target's successor and move to it; False if asked to stop
        (a signal, --duration) first."""
        def keep_waiting() -> bool:
            if deadline is not None and time.monotonic_ns() >= deadline:
                self.request_stop(self.DURATION_REACHED)
            return self.stop_reason is None

        self.probe.close()  # its process is gone: free its rings and uprobes now
        followed = self.follower.wait(keep_waiting)
        if followed is None:
            return False
        self.probe, self.target_pid = followed.probe, followed.process.pid
        if self.ops is not None:
            self.ops.follow(self.target_pid)
        for output in self.outputs:
            output.gap(followed.note)
        return True

    def _deliver_until(self, horizon_ns: int, counters: Counters) -> None:
        """Out: the records fired before horizon_ns (less the merge's slack), with what
        is known of them by then."""
        self._deliver(self._annotated(self._merger.release(horizon_ns),
                                      horizon_ns - self._merger.slack_ns), counters)

    def _annotated(self, records: list, horizon_ns: int | None) -> list:
        """Records in time order, given their outcomes (those settled, or all at the end:
        horizon_ns None), then the kernel side's enqueues."""
        if self.ops is not None:
            records = self.ops.resolve(records, horizon_ns)
        return records if self.kernel is None else self.kernel.annotate(records)

    def _deliver(self, records: list[bytes], counters: Counters) -> None:
        if self.count is not None:
            room = self.count - self.captured
            if len(records) >= room:
                records = records[:room]
                self.request_stop(self.COUNT_REACHED)
        dropped = counters.lost - self._lost_seen
        self._lost_seen = counters.lost
        if not records and not dropped:
            return
        self._output_thread.put(records, dropped)
        self.captured += len(records)
        if self.kernel is not None:
            self.failed += count_flagged(records, F_FAILED)[0]
        for output in self.outputs:
            if output.ended:
                self.request_stop(output.ended)
