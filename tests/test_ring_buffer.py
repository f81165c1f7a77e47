"""ring_buffer.RingReader: records from a BPF ring buffer laid out as the kernel lays it out
(tests/ringbuf_kernel.py), across wraps, with records still being written or discarded."""

from __future__ import annotations

import mmap
import os
import random
import subprocess

import pytest
from conftest import build_c
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


# Spins on the consumer position, as the kernel's reserve does, and counts the times it
# went backwards: a store that is not one 8-byte write shows it a value it never had.
WATCHER_C = r"""
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
int main(int argc, char **argv)
{
    int fd = open(argv[1], O_RDONLY);
    volatile uint64_t *position = mmap(0, 4096, PROT_READ, MAP_SHARED, fd, 0);
    if (fd < 0 || position == MAP_FAILED)
        return 1;
    uint64_t last = 0, backwards = 0;
    puts("ready");
    fflush(stdout);
    for (uint64_t now; (now = *position) != UINT64_MAX; last = now)
        backwards += now < last;
    printf("%llu\n", (unsigned long long)backwards);
    return 0;
}
"""


def test_the_kernel_never_sees_a_torn_position(tmp_path):
    """A Position is stored whole: a watcher spinning on it, as the kernel's reserve reads
    the consumer position, never sees it go back. With struct.pack_into() it saw that a
    few thousand times in a million stores."""
    watcher = build_c(tmp_path, "watcher", WATCHER_C)
    page = tmp_path / "consumer_page"
    page.write_bytes(bytes(mmap.PAGESIZE))
    with open(page, "r+b") as file, mmap.mmap(file.fileno(), 0) as memory:
        position = ring_buffer.Position(memory)
        spinning = subprocess.Popen([str(watcher), str(page)], stdout=subprocess.PIPE, text=True)
        assert spinning.stdout.readline() == "ready\n"
        for value in range(1 << 40, (1 << 40) + 1_000_000):
            position.store(value)
        assert position.load() == (1 << 40) + 999_999
        position.store((1 << 64) - 1)  # the watcher stops
        backwards = int(spinning.communicate(timeout=30)[0])
        position.release()
    assert backwards == 0
