"""What passes between the main process and a describing worker: each batch's bulk (its
records one way, its pcapng blocks the other) through memory both processes map, and a
small frame through a pipe that says what came and where it lies.

Why not the pipes alone, as before: on this 2-core host a pipe cost 48 µs of CPU to
write 150 KB into and 61 µs to read it out (each 4 KiB page allocated, charged and freed
again), where a copy into or out of mapped memory takes a few. A batch crossed two pipes
each way: about 0.9 µs an upcall of the tool's 6, and a third of a worker's time in a
storm of new flows, where the worker is what keeps up or not.

A ring (ByteRing) is a FIFO of variable-size chunks with one writer and one reader, in
two processes. Each chunk is contiguous: one that would run past the end starts at the
beginning again, and the bytes skipped count as used until the reader is past them.
The main process copies a reply out and releases it at once. A worker reads its batch
where it lies (receive_in_place) and releases it once the batch's blocks are built, so
that the worker, which is what keeps up or not in a storm of new flows, copies none of
it only to read it. Nothing it keeps (caches, texts) may hold a view of the ring: the
view's bytes change under it once the room is released. The worker maps the memory with
Python's mmap (map_shared), whose views can be hashed, as the describer hashes keys. A
bulk larger than the ring goes through the pipe after its frame.

Waiting: the writer waits for room by looking at the reader's released position, a few
times a millisecond at most, and notices a peer that is gone (`alive`). A ring is full
only while its reader is busy with what is in it: in a storm the main process waits so
for a worker that is behind, as it waited on a full pipe before, and a worker, now and
then, for the output thread.

Ordering: the frame that announces a chunk is written after the chunk, and read before
it, through the kernel; the released position is one aligned 8-byte store, after the
copy out (ring_buffer.Position). x86 keeps those orders; on weakly ordered machines
this relies, as the probe's ring does, on the thousands of instructions between them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import time
from collections.abc import Callable
from typing import BinaryIO

from upcall_capture.probe.ring_buffer import Position

# Each ring's room. Requests: some 8 ms of a worker's work in a storm, so that it does
# not wait for the main process, whose thread sends the next batch only once there is
# room for it, and notices that late at times (woken, then given the GIL). At 2 MiB only
# two or three of a storm's batches fitted (512 records of 1 KB or so: 450 to 600 KB),
# and at 250,000 new flows/s the worker waited 1.6 to 2.2 s of a 10 s storm for its next
# batch; at 8 MiB, 0.02 to 0.25 s (instrumented runs, before that thread was woken
# without waiting for a tick and given the GIL within 1 ms: tuning.py). 8 MiB took a
# worker's peak RSS to 62 MB at 100,000 new flows/s; 4 MiB, 58 MB (with fewer seen
# keys kept: upcall_blocks.MAX_SEEN_KEYS). Replies:
# the thread that takes them waits for the main process's GIL while the worker makes a
# batch's blocks every millisecond: at 250,000 new flows/s, a worker waited 1.3 to 1.6 s
# of a 10 s storm for room in 2 MiB, and 0.6 s in 4 MiB or 6 MiB (instrumented runs,
# with the GIL's default switch interval). Both processes touch every page in time, so
# it counts in both one's peak RSS.
REQUEST_RING_BYTES = 4 << 20
REPLY_RING_BYTES = 4 << 20
PAIR_BYTES = 2 * mmap.PAGESIZE + REQUEST_RING_BYTES + REPLY_RING_BYTES  # each after a page
# The writer's wait for room: from this, doubling up to WAIT_MAX_S.
WAIT_MIN_S = 0.0001
WAIT_MAX_S = 0.002
# A frame: the meta's length, the bulk's length, and where the bulk lies in the ring
# (-1: it follows the frame in the pipe).
_FRAME = struct.Struct("<IIq")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


class SharedMemory:
    """Pages of a memfd, mapped, for a worker to map too: it is given `fd` (pass_fds).

    Mapped through libc rather than Python's mmap, which keeps a duplicate fd open all
    along: an fd held on met bcc's cleanup, which closed it again when --follow closed
    the old probe (an fd number bcc had used and closed during its load). So `fd` is
    closed (forget_fd) as soon as the workers have it."""

    def __init__(self, size: int, fd: int | None = None, *, name: str = "upcall-capture"
                 ) -> None:
        self.size = size
        self.fd: int | None = os.memfd_create(name) if fd is None else fd
        if fd is None:
            os.ftruncate(self.fd, size)
        address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED,
                             self.fd, 0)
        if address == _MAP_FAILED:
            errno = ctypes.get_errno()
            self.forget_fd()
            raise OSError(errno, os.strerror(errno))
        self._address: int | None = address
        self.view = memoryview((ctypes.c_ubyte * size).from_address(address)).cast("B")

    def forget_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        """Unmap: only once nothing will touch `view`, or what was cut from it, again."""
        self.forget_fd()
        if self._address is not None:
            self.view.release()
            _libc.munmap(self._address, self.size)
            self._address = None


class ByteRing:
    """A FIFO of chunks in `memory`: its first page holds the reader's released position
    (a free-running byte count), the rest the chunks. `reserve` and `write` are the
    writer's; `read`, the reader's."""

    def __init__(self, memory: memoryview) -> None:
        self._released = Position(memory)
        self._data = memory[mmap.PAGESIZE:]
        self._readonly = self._data.toreadonly()
        self.capacity = len(self._data)
        self._written = self._released.load()  # the writer's position

    def reserve(self, size: int, alive: Callable[[], bool]) -> int | None:
        """Where a chunk of `size` bytes goes, once there is room for it; None for one the
        ring could never hold. Raises BrokenPipeError if the reader is gone meanwhile."""
        capacity = self.capacity
        if size > capacity:
            return None
        written = start = self._written
        offset = start % capacity
        if offset + size > capacity:  # contiguous: from the beginning again
            start += capacity - offset
        wait = WAIT_MIN_S
        # Room: the chunk ends a lap ahead of what is released at most, or the reader has
        # released everything (the bytes skipped before the chunk were never data).
        while start + size - (released := self._released.load()) > capacity \
                and released != written:
            if not alive():
                raise BrokenPipeError("the ring's reader is gone")
            time.sleep(wait)
            wait = min(2 * wait, WAIT_MAX_S)
        self._written = start + size
        return start

    def write(self, start: int, data: bytes | bytearray) -> None:
        offset = start % self.capacity
        self._data[offset:offset + len(data)] = data

    def read(self, start: int, size: int) -> bytes:
        """The chunk's bytes, copied; its room goes back to the writer."""
        data = bytes(self.view(start, size))
        self.release_to(start + size)
        return data

    def view(self, start: int, size: int) -> memoryview:
        """The chunk's bytes where they lie, read only: they stay so until its room goes
        back to the writer (release_to)."""
        offset = start % self.capacity
        return self._readonly[offset:offset + size]

    def release_to(self, end: int) -> None:
        """Give the room up to `end` (a chunk's start + size) back to the writer."""
        self._released.store(end)

    def release(self) -> None:
        self._released.release()
        self._readonly.release()
        self._data.release()


def send(stream: BinaryIO, ring: ByteRing, meta: bytes, bulk: bytes | bytearray,
         alive: Callable[[], bool]) -> None:
    """`meta` through the pipe, and `bulk` through the ring where it fits."""
    start = ring.reserve(len(bulk), alive)
    if start is None:
        stream.write(_FRAME.pack(len(meta), len(bulk), -1) + meta)
        stream.write(bulk)
    else:
        ring.write(start, bulk)
        stream.write(_FRAME.pack(len(meta), len(bulk), start) + meta)
    stream.flush()


def receive(stream: BinaryIO, ring: ByteRing) -> tuple[bytes, bytes] | None:
    """The next (meta, bulk), or None at the end of the pipe (or of a cut frame)."""
    received = receive_in_place(stream, ring)
    if received is None:
        return None
    meta, bulk, end = received
    return meta, bulk if end is None else ring.read(end - len(bulk), len(bulk))


def receive_in_place(stream: BinaryIO, ring: ByteRing
                     ) -> tuple[bytes, bytes | memoryview, int | None] | None:
    """The next (meta, bulk, end), or None at the end of the pipe (or of a cut frame).
    A bulk in the ring is a read-only view of it, whose room stays taken until
    ring.release_to(end); `end` is None for one that came through the pipe."""
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    meta_size, bulk_size, start = _FRAME.unpack(head)
    meta = stream.read(meta_size)
    if len(meta) < meta_size:
        return None
    if start >= 0:
        return meta, ring.view(start, bulk_size), start + bulk_size
    bulk = stream.read(bulk_size)
    return (meta, bulk, None) if len(bulk) == bulk_size else None


def map_shared(fd: int, size: int) -> mmap.mmap:
    """A worker's mapping of the memory its main process shares with it (SharedMemory's
    fd, closed here). Python's mmap, unlike SharedMemory's: a read-only view of it can be
    hashed (the object it views must be hashable, and a ctypes array is not). The
    duplicate fd it keeps meets no bcc in a worker."""
    try:
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def ring_pair(memory: memoryview) -> tuple[ByteRing, ByteRing]:
    """A worker's two rings in its shared memory (PAIR_BYTES): requests, replies."""
    split = mmap.PAGESIZE + REQUEST_RING_BYTES
    return ByteRing(memory[:split]), ByteRing(memory[split:])
