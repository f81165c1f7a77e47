"""The kernel's side of a BPF ring buffer (kernel/bpf/ringbuf.c), in plain memory.

Lays records out as bpf_ringbuf_reserve()/submit() do: an 8-byte header whose length has
the BUSY bit until the record is submitted, records 8-byte aligned, positions free-running,
a record's bytes wrapping around the end of the data area (which the reader maps once). So
ring_buffer.RingReader can be exercised without root; the capture tests cover the real one.
"""

from __future__ import annotations

import mmap
import struct

from upcall_capture.probe.ring_buffer import BUSY, DISCARD, RingReader

PAGE = mmap.PAGESIZE


class KernelSide:
    def __init__(self, size: int = PAGE, consumer: bytearray | mmap.mmap | None = None) -> None:
        self.size = size
        self.consumer = bytearray(PAGE) if consumer is None else consumer
        self.producer = bytearray(PAGE + size)
        self.head = 0

    def reader(self) -> RingReader:
        return RingReader(self.consumer, self.producer, self.size, PAGE)

    def consumed(self) -> int:
        return struct.unpack_from("@Q", self.consumer, 0)[0]

    def _write(self, position: int, data: bytes) -> None:
        start = position % self.size
        first = min(len(data), self.size - start)  # the rest wraps to the beginning
        self.producer[PAGE + start:PAGE + start + first] = data[:first]
        self.producer[PAGE:PAGE + len(data) - first] = data[first:]

    def reserve(self, data: bytes) -> int:
        """Writes a record still marked BUSY; returns its position for commit()."""
        taken = (len(data) + 8 + 7) & ~7
        assert self.head + taken - self.consumed() <= self.size, "ring overrun"
        position = self.head
        self._write(position, struct.pack("@II", len(data) | BUSY, 0) + data)
        self.head += taken
        struct.pack_into("@Q", self.producer, 0, self.head)
        return position

    def commit(self, position: int, discard: bool = False) -> None:
        at = PAGE + position % self.size
        length = struct.unpack_from("@I", self.producer, at)[0] & ~BUSY
        self._write(position, struct.pack("@I", length | (DISCARD if discard else 0)))

    def output(self, data: bytes) -> None:
        self.commit(self.reserve(data))
