"""perf_ring: reading a perf ring laid out as the kernel lays it out, and splitting samples.

A small stand-in for the kernel's side writes records into an anonymous mapping with the
kernel's layout (meta page, free-running data_head, wrap-around, 8-byte alignment), so
that wrap-around and partial reads are exercised without root; the capture tests cover
the real rings.
"""

from __future__ import annotations

import mmap
import os
import random
import struct

import pytest

from upcall_capture.probe import perf_ring
from upcall_capture.probe.perf_ring import RingReader, split_samples

PAGE = mmap.PAGESIZE
SAMPLE, LOST = 9, 2


class KernelSide:
    """Writes perf records into a ring as perf_output_*() does."""

    def __init__(self, pages: int) -> None:
        self.size = pages * PAGE
        self.memory = mmap.mmap(-1, PAGE + self.size)
        struct.pack_into("<QQQQ", self.memory, 1024, 0, 0, PAGE, self.size)
        self.head = 0

    def tail(self) -> int:
        return struct.unpack_from("<Q", self.memory, 1032)[0]

    def _put(self, record: bytes) -> None:
        assert len(record) % 8 == 0
        assert self.head + len(record) - self.tail() <= self.size, "ring overrun"
        for i, byte_ in enumerate(record):  # byte by byte: the wrap can fall anywhere
            self.memory[PAGE + (self.head + i) % self.size] = byte_
        self.head += len(record)
        struct.pack_into("<Q", self.memory, 1024, self.head)

    def sample(self, raw: bytes) -> None:
        padded = raw + bytes(-(len(raw) + 4) % 8)
        self._put(struct.pack("<IHHI", SAMPLE, 0, 12 + len(padded), len(padded)) + padded)

    def lost(self, count: int) -> None:
        self._put(struct.pack("<IHHQQ", LOST, 0, 24, 77, count))


def drain(reader: RingReader, limit: int) -> tuple[list[bytes], int]:
    got, lost = [], 0
    while chunk := reader.read(limit):
        samples, lost_now, used = split_samples(chunk)
        assert used > 0, "a read made no progress"
        reader.release(used)
        got += [bytes(s) for s in samples]
        lost += lost_now
    return got, lost


# Every limit is at least the largest record (12 + 64 bytes), as READ_LIMIT is for perf.
@pytest.mark.parametrize("limit", [80, 100, 1000, perf_ring.READ_LIMIT])
def test_samples_come_out_whole_and_in_order_across_wraps(limit):
    rng = random.Random(limit)
    kernel = KernelSide(pages=1)
    reader = RingReader(kernel.memory, pages=1)
    sent, received, lost = [], [], 0
    for round_ in range(200):  # many times round the ring
        for _ in range(rng.randrange(1, 8)):
            raw = os.urandom(rng.randrange(1, 60))
            kernel.sample(raw)
            sent.append(raw)
        if round_ % 7 == 3:
            kernel.lost(5)
        got, lost_now = drain(reader, limit)
        received += got
        lost += lost_now
    assert kernel.head > 3 * kernel.size
    assert len(received) == len(sent)
    for raw, sample in zip(sent, received, strict=True):
        # Samples keep the kernel's padding, as the probe's records have it.
        assert sample[:len(raw)] == raw
        assert len(sample) - len(raw) < 8 and not any(sample[len(raw):])
    assert lost == 5 * len(range(3, 200, 7))
    assert kernel.tail() == kernel.head


def test_a_record_cut_by_the_limit_stays_in_the_ring():
    kernel = KernelSide(pages=1)
    reader = RingReader(kernel.memory, pages=1)
    kernel.sample(b"a" * 24)  # 12 bytes of header, 24 of data and 4 of padding
    kernel.sample(b"b" * 24)
    chunk = reader.read(60)
    samples, _, used = split_samples(chunk)
    assert [bytes(s[:24]) for s in samples] == [b"a" * 24]
    assert used == 40
    reader.release(used)
    assert kernel.tail() == 40  # the second record is still the kernel's to keep
    samples, _, used = split_samples(reader.read(1000))
    assert [bytes(s[:24]) for s in samples] == [b"b" * 24]


def test_an_empty_ring_reads_nothing_and_keeps_the_tail():
    kernel = KernelSide(pages=1)
    reader = RingReader(kernel.memory, pages=1)
    assert reader.read() == b""
    assert split_samples(b"") == ([], 0, 0)
    assert kernel.tail() == 0


def test_nonsense_sizes_stop_the_split_instead_of_looping():
    chunk = struct.pack("<IHHI", SAMPLE, 0, 0, 0) + bytes(16)  # size 0
    assert split_samples(chunk) == ([], 0, 0)
