"""The worker channel: chunks through a ring in shared memory, frames through a pipe."""

import io
import mmap
import os
import threading
import time

import pytest

from upcall_capture import channel
from upcall_capture.channel import ByteRing, SharedMemory


def ring_of(capacity: int) -> ByteRing:
    return ByteRing(memoryview(bytearray(mmap.PAGESIZE + capacity)))


def always() -> bool:
    return True


def test_chunks_come_out_in_order_whole_where_they_would_have_wrapped():
    ring = ring_of(1000)
    for n, size in enumerate((400, 400, 300, 50, 700, 999)):
        bulk, meta = bytes([n]) * size, b"meta%d" % n
        pipe = io.BytesIO()
        channel.send(pipe, ring, meta, bulk, always)
        assert len(pipe.getvalue()) == 16 + len(meta)  # the frame alone: bulk in the ring
        assert channel.receive(io.BytesIO(pipe.getvalue()), ring) == (meta, bulk)


def test_a_bulk_larger_than_the_ring_follows_its_frame_through_the_pipe():
    ring = ring_of(1000)
    pipe = io.BytesIO()
    channel.send(pipe, ring, b"m", b"x" * 1001, always)
    channel.send(pipe, ring, b"n", b"y" * 10, always)
    pipe.seek(0)
    assert channel.receive(pipe, ring) == (b"m", b"x" * 1001)
    assert channel.receive(pipe, ring) == (b"n", b"y" * 10)
    assert channel.receive(pipe, ring) is None


def test_a_cut_frame_ends_the_stream():
    ring = ring_of(1000)
    pipe = io.BytesIO()
    channel.send(pipe, ring, b"meta", b"z" * 2000, always)
    cut = io.BytesIO(pipe.getvalue()[:-1])
    assert channel.receive(cut, ring) is None


def test_the_writer_waits_for_room_until_the_reader_releases_it():
    ring = ring_of(1000)
    first = ring.reserve(600, always)
    ring.write(first, b"a" * 600)
    taken = []

    def reader():
        time.sleep(0.05)
        taken.append(ring.read(first, 600))

    thread = threading.Thread(target=reader)
    thread.start()
    started = time.monotonic()
    second = ring.reserve(600, always)  # 600 more do not fit beside the first
    waited = time.monotonic() - started
    thread.join()
    assert taken == [b"a" * 600]
    assert waited >= 0.04
    assert second % ring.capacity == 0  # at the beginning: it would not fit at the end


def test_a_writer_waiting_for_a_reader_that_is_gone_stops():
    ring = ring_of(1000)
    ring.reserve(600, always)
    with pytest.raises(BrokenPipeError):
        ring.reserve(600, lambda: False)


def test_shared_memory_is_one_memory_for_whoever_maps_its_fd():
    memory = SharedMemory(2 * mmap.PAGESIZE)
    try:
        again = SharedMemory(2 * mmap.PAGESIZE, os.dup(memory.fd))
        memory.view[mmap.PAGESIZE:mmap.PAGESIZE + 5] = b"hello"
        assert bytes(again.view[mmap.PAGESIZE:mmap.PAGESIZE + 5]) == b"hello"
        again.close()
        assert again.fd is None
    finally:
        memory.close()


def test_a_chunk_read_in_place_is_the_rings_own_until_its_room_is_given_back():
    memory = mmap.mmap(-1, mmap.PAGESIZE + 1000)  # as a worker maps it (map_shared)
    ring = ByteRing(memoryview(memory))
    pipe = io.BytesIO()
    channel.send(pipe, ring, b"m", b"key:" * 150, always)
    channel.send(pipe, ring, b"n", b"x" * 1001, always)  # larger than the ring
    pipe.seek(0)
    meta, bulk, end = channel.receive_in_place(pipe, ring)
    assert (meta, bytes(bulk), end) == (b"m", b"key:" * 150, 600)
    assert bulk.readonly and hash(bulk[:4]) == hash(b"key:")  # the describer hashes keys
    memory[mmap.PAGESIZE:mmap.PAGESIZE + 4] = b"KEY:"
    assert bulk[:4] == b"KEY:"  # not a copy
    with pytest.raises(BrokenPipeError):  # no room yet: the writer would wait
        ring.reserve(600, lambda: False)
    ring.release_to(end)
    assert ring.reserve(600, lambda: False) == 1000  # at once, from the beginning again
    assert channel.receive_in_place(pipe, ring) == (b"n", b"x" * 1001, None)
