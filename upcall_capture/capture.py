"""The capture loop: probe records, merged into time order, handed to the outputs.

It stops on -c, on a signal, when the traced process exits, or when a pipe reader
leaves; then it stops the probe, drains what is left, and closes every output so
that the file is complete. The probe's own counters are the truth about losses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from upcall_capture.errors import CaptureError, UsageError
from upcall_capture.probe.loader import Counters, RecvUpcallProbe
from upcall_capture.probe.record import TimeMerger, Upcall, parse
from upcall_capture.sink import OutputThread, Sink
from upcall_capture.target import is_alive
from upcall_capture.upcall_blocks import UpcallBlocks

# How often to look whether the traced process is still there.
LIVENESS_INTERVAL_NS = 250_000_000
PROGRESS_INTERVAL_NS = 1_000_000_000


class Output(Protocol):
    # Why the output can take no more (its reader left, a write failed), or None.
    ended: str | None

    def packets(self, records: list[bytes], dropped: int = 0) -> None: ...
    def finish(self, end_ktime_ns: int, start_ktime_ns: int) -> None: ...


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

    def drain(self) -> list[list[bytes]]:
        return [self._select(ring) for ring in self.probe.drain()]

    def stop(self) -> list[list[bytes]]:
        return [self._select(ring) for ring in self.probe.stop()]

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


class PcapngOutput:
    """pcapng sections: a header at once, packets as they come, statistics at the end.

    With a Rotation, each file is a complete capture of its own: when one is full or
    old enough it gets its statistics and is closed, and the next starts with a new
    section header and its own interfaces.
    """

    def __init__(self, make_blocks: Callable[[], UpcallBlocks], sink: Sink,
                 section_header: bytes, *, rotation: Rotation | None = None,
                 open_next: Callable[[int], Sink] | None = None) -> None:
        self.make_blocks = make_blocks
        self.section_header = section_header
        self.rotation = rotation
        self.open_next = open_next
        self.ended: str | None = None
        self.error: CaptureError | None = None
        self.written = 0  # upcalls in complete blocks in the output
        self.files = 0
        self._start(sink)

    def _start(self, sink: Sink) -> None:
        self.sink = sink
        self.blocks = self.make_blocks()
        self.files += 1
        self._file_start_ns = time.monotonic_ns()
        sink.write(self.section_header)

    def _rotation_due(self, now_ns: int) -> bool:
        rotation = self.rotation
        if rotation is None:
            return False
        if rotation.max_bytes is not None and self.sink.good_bytes >= rotation.max_bytes:
            return True
        return rotation.interval_ns is not None and \
            now_ns - self._file_start_ns >= rotation.interval_ns

    def packets(self, records: list[bytes], dropped: int = 0) -> None:
        if self.ended:
            return
        try:
            now_ns = time.monotonic_ns()
            if self._rotation_due(now_ns):
                self._write_statistics(now_ns)
                self.sink.close()
                self._start(self.open_next(self.files))
            self.sink.write(self.blocks.packets(records, dropped))
        except (CaptureError, UsageError) as err:
            # The sink cut the file back to its last complete block: this batch is not in it.
            self.error = CaptureError(str(err))
            self.ended = str(err)
            return
        if self.sink.closed_by_reader:
            self.ended = "the output's reader went away"
        else:
            self.written += len(records)

    def finish(self, end_ktime_ns: int, start_ktime_ns: int) -> None:
        if not self.ended:
            try:
                self._write_statistics(end_ktime_ns)
            except CaptureError as err:
                self.error = err
        self.sink.close()

    def _write_statistics(self, end_ktime_ns: int) -> None:
        self.sink.write(self.blocks.statistics(end_ktime_ns, start_ktime_ns=self._file_start_ns))


@dataclass
class Summary:
    captured: int
    lost: int
    filtered: int
    fired: int
    stop_reason: str

    def line(self) -> str:
        text = f"{self.captured} upcalls captured, {self.lost} lost"
        if self.filtered:
            text += f", {self.filtered} filtered out"
        return text + f" ({self.fired} fired)"


class Capture:
    TARGET_EXITED = "the traced process exited"
    COUNT_REACHED = "count reached"
    DURATION_REACHED = "duration reached"

    def __init__(self, probe: RecvUpcallProbe, outputs: list[Output], *, target_pid: int,
                 count: int | None = None, duration: float | None = None,
                 progress: Callable[[int, Counters, float], None] | None = None) -> None:
        self.probe = probe
        self.progress = progress  # called about once a second: captured, counters, elapsed
        self.outputs = outputs
        self.target_pid = target_pid
        self.count = count
        self.duration = duration
        self.stop_reason: str | None = None
        self.captured = 0
        self._merger = TimeMerger()
        self._lost_seen = 0

    def request_stop(self, reason: str) -> None:
        """Safe to call from a signal handler: the loop notices after its current poll."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def run(self) -> Summary:
        start_ns = time.monotonic_ns()
        deadline = None if self.duration is None else start_ns + int(self.duration * 1e9)
        next_liveness = start_ns + LIVENESS_INTERVAL_NS
        next_progress = start_ns + PROGRESS_INTERVAL_NS
        outputs = self.outputs

        def handle(records: list[bytes], dropped: int) -> None:
            for output in outputs:
                output.packets(records, dropped)

        # The outputs build and write blocks in a thread of their own: writing releases
        # the GIL, so it overlaps with reading the next batch from the rings.
        self._output_thread = OutputThread(handle)
        while self.stop_reason is None:
            drain_start = time.monotonic_ns()
            self._merger.add(self.probe.drain())
            counters = self.probe.counters()
            self._deliver(self._merger.release(drain_start), counters)
            now = time.monotonic_ns()
            if self.progress is not None and now >= next_progress:
                next_progress = now + PROGRESS_INTERVAL_NS
                self.progress(self.captured, counters, (now - start_ns) / 1e9)
            if now >= next_liveness:
                next_liveness = now + LIVENESS_INTERVAL_NS
                if not is_alive(self.target_pid):
                    self.request_stop(self.TARGET_EXITED)
            if deadline is not None and now >= deadline:
                self.request_stop(self.DURATION_REACHED)
        # Stop the probe first: after that the rings hold all that it submitted, and
        # its counters agree exactly with what was received.
        self._merger.add(self.probe.stop())
        counters = self.probe.counters()
        self._deliver(self._merger.release_all(), counters)
        self._output_thread.close()
        end_ns = time.monotonic_ns()
        for output in self.outputs:
            output.finish(end_ns, start_ns)
        return Summary(
            captured=self.captured, lost=counters.lost, filtered=counters.filtered,
            fired=counters.fired, stop_reason=self.stop_reason,
        )

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
        for output in self.outputs:
            if output.ended:
                self.request_stop(output.ended)
