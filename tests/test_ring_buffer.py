"""ring_buffer.RingReader: records from a BPF ring buffer laid out as the kernel lays it out
(tests/ringbuf_kernel.py), across wraps, with records still being written or discarded."""

from __future__ import annotations

import os
import random

import pytest
from ringbuf_kernel import KernelSide

from upcall_capture.probe import ring_buffer


def drain(reader, limit: int) -> list[bytes]:
    got = []
    while True:
        records = reader.read(limit)
        got += [bytes(r) for r in records]
        if not reader.backlog:
            return got
        assert records, "a read made no progress"


# Every limit is at least the largest record (8 + 60 bytes), as READ_LIMIT is for ours.
@pytest.mark.parametrize("limit", [72, 100, 1000, ring_buffer.READ_LIMIT])
def test_records_come_out_whole_and_in_order_across_wraps(limit):
    rng = random.Random(limit)
    kernel = KernelSide()
    reader = kernel.reader()
    sent, received = [], []
    for _ in range(300):  # many times round the ring
        for _ in range(rng.randrange(1, 8)):
            data = os.urandom(rng.randrange(1, 61))
            kernel.output(data)
            sent.append(data)
        received += drain(reader, limit)
    assert kernel.head > 3 * kernel.size
    assert received == sent
    assert kernel.consumed() == kernel.head


def test_a_record_still_being_written_holds_back_the_ones_after_it():
    kernel = KernelSide()
    reader = kernel.reader()
    kernel.output(b"first")
    busy = kernel.reserve(b"second")
    kernel.output(b"third")
    assert [bytes(r) for r in reader.read()] == [b"first"]
    assert kernel.consumed() == 16  # the busy record's space is still the kernel's
    assert not reader.backlog
    assert reader.read() == []
    kernel.commit(busy)
    assert [bytes(r) for r in reader.read()] == [b"second", b"third"]
    assert kernel.consumed() == kernel.head


def test_discarded_records_are_skipped_and_their_space_released():
    kernel = KernelSide()
    reader = kernel.reader()
    kernel.commit(kernel.reserve(b"dropped by the program"), discard=True)
    kernel.output(b"kept")
    assert [bytes(r) for r in reader.read()] == [b"kept"]
    assert kernel.consumed() == kernel.head


def test_the_limit_leaves_a_backlog_that_the_next_read_takes():
    kernel = KernelSide()
    reader = kernel.reader()
    for data in (b"a" * 24, b"b" * 24, b"c" * 24):  # 32 bytes each with the header
        kernel.output(data)
    assert [bytes(r) for r in reader.read(70)] == [b"a" * 24, b"b" * 24]
    assert reader.backlog and kernel.consumed() == 64
    assert [bytes(r) for r in reader.read(70)] == [b"c" * 24]
    assert not reader.backlog


def test_an_empty_ring_reads_nothing():
    kernel = KernelSide()
    reader = kernel.reader()
    assert reader.read() == [] and not reader.backlog
    assert kernel.consumed() == 0


def test_a_ring_size_that_is_not_a_power_of_two_is_refused():
    with pytest.raises(ValueError):
        KernelSide(size=3 * ring_buffer.mmap.PAGESIZE).reader()
