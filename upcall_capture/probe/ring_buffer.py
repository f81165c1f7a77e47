"""A BPF_RINGBUF_OUTPUT map's ring, read straight from its mmap'd memory.

One ring takes the records of every CPU (Linux 5.8 and later). It replaced per-CPU perf
rings because the traced program pays less for it: bpf_ringbuf_output() costs about 250 ns
less per upcall than perf_submit() here, and with BPF_RB_NO_WAKEUP it never wakes us, so
the reader polls on a timer instead (POLL_TIMEOUT_MS in loader.py bounds the latency).

bcc's reader calls back into Python through ctypes once per record, which costs more than
everything else we do with a record. Here a read walks the record headers in the ring,
copies the span of finished records with one slice, and hands that space back at once.

Layout (kernel/bpf/ringbuf.c, include/uapi/linux/bpf.h): mapping the map's fd at offset 0
gives the consumer page, whose first u64 (consumer_pos) is ours to write; at offset PAGE
comes the producer page (producer_pos, read only) and then the data pages, twice in a
row, so that whatever wraps is contiguous. Positions are free-running byte counters. Each
record starts with an 8-byte header {u32 len; u32 page offset}; the top bits of len say
the record is still being written (BUSY) or was discarded, and a record takes len + 8
bytes rounded up to 8, so a header never wraps.

The data pages are mapped a window at a time (MAP_BYTES), kept for the reads that fall
in it: the kernel maps every page of a mapping at mmap() time, and each counts in our
RSS, so a ring mapped whole would count 64 MiB (twice over, for the wrap). Mapped for
each read of 1 MiB and unmapped after it, as before, a storm of 250,000 new flows/s made
170 mmap() and munmap() calls a second, about 0.1 ms each. A window of 4 MiB makes a
third as many, each about four times as long (0.27 and 0.37 ms, `perf trace`): the
kernel maps and unmaps page by page, so the time in them is the same, some 35 ms a
second. What it saves is calls: each munmap() can interrupt the other CPU to flush its
TLB, and each call waits for the GIL on its way back.

Ordering: the kernel clears BUSY with a release after writing the record, and we read each
header before copying the data behind it; x86 does not reorder loads with loads, nor
stores with earlier loads, so Python needs no barrier there. Python has no barrier to offer
weakly ordered machines (arm64): there this relies on the thousands of instructions
between those accesses.
"""

from __future__ import annotations

import mmap
import select
import struct
from collections.abc import Iterator
from contextlib import contextmanager

BUSY = 1 << 31
DISCARD = 1 << 30
_LENGTH_MASK = DISCARD - 1
_HEADER = struct.Struct("@I4x")
# Bytes copied out of the ring at a time: bounds the memory a read takes (the ring can be
# 64 MiB) while amortising the per-read cost. Larger than any record we submit.
READ_LIMIT = 1 << 20
# The span of the ring's data mapped at a time, for the reads that fall in it (at most
# the ring's size): a remap every four reads of READ_LIMIT, for 3 MiB more RSS than one
# read's window.
MAP_BYTES = 4 << 20


class Position:
    """A u64 position in the ring's shared pages, loaded and stored whole, as the kernel
    does: through a view that makes each access one aligned 8-byte load or store.
    struct.pack_into() would not do: it zeroes its target before it writes, and a probe
    that read that zero as the consumer position took the ring for full and lost records."""

    def __init__(self, memory: mmap.mmap | bytearray) -> None:
        self._word = memoryview(memory)[:8].cast("Q")

    def load(self) -> int:
        return self._word[0]

    def store(self, value: int) -> None:
        self._word[0] = value

    def release(self) -> None:
        """Let go of the memory: an mmap cannot close while a view into it exists."""
        self._word.release()


class RingReader:
    """The consumer's side of a BPF ring buffer laid out as the kernel lays it out. Kept
    apart from the map's fd so that it can be exercised on any memory: here `producer`
    holds the producer page and then the data, once."""

    def __init__(self, consumer: mmap.mmap | bytearray, producer: mmap.mmap | bytearray,
                 size: int, page_size: int = mmap.PAGESIZE) -> None:
        if size < page_size or size & (size - 1):
            raise ValueError(f"ring size must be a power of two of pages, not {size}")
        self._consumer_position = Position(consumer)
        self._producer_position = Position(producer)
        self._producer = producer
        self._data_offset = page_size
        self._mask = size - 1
        self._position = self._consumer_position.load()
        self.backlog = False  # the last read left finished records behind
        self._peak_fill = 0  # bytes: the most the ring held at a read since peak_fill()
        self.fill = 0.0  # the share of the ring that held records at the last read

    def peak_fill(self) -> float:
        """The largest share of the ring that held records at a read since the last call."""
        peak, self._peak_fill = self._peak_fill, 0
        return peak / (self._mask + 1)

    def release(self) -> None:
        self._consumer_position.release()
        self._producer_position.release()

    def read(self, limit: int = READ_LIMIT) -> list[memoryview]:
        """The records finished since the last read, in ring order: views into one copy of
        up to `limit` bytes. Their space goes back to the kernel."""
        position = self._position
        # Records are whole below the producer position: it moves past a record when the
        # record is reserved.
        available = self._producer_position.load() - position
        self._peak_fill = max(self._peak_fill, available)
        self.fill = available / (self._mask + 1)
        length = min(available, limit)
        self.backlog = False
        if length < _HEADER.size:
            return []
        # The walk is the main process's work per record in a storm: the headers are read
        # as words of a cast view, a kept record's bounds in two lists, the constants
        # local, and a record's bits (BUSY, DISCARD: the top two) looked at only when set
        # (a read 0.43 -> 0.39 µs a record, offline). A record that ends within the window
        # is taken, and the padding after it, which holds no data.
        busy, discard, length_mask, header = BUSY, DISCARD, _LENGTH_MASK, _HEADER.size
        begins: list[int] = []
        ends: list[int] = []
        begin_at, end_at = begins.append, ends.append
        used = 0
        last = length - header  # where the last whole header can start
        with self._window(position & self._mask, length) as window, \
                window[:length & ~3].cast("I") as words:  # headers are 8-byte aligned
            while used <= last:
                record_length = words[used >> 2]
                if record_length >= discard:  # busy or discarded
                    if record_length & busy:
                        available = used  # the rest waits for this one
                        break
                    end = used + header + (record_length & length_mask)
                    if end > length:
                        break
                    used = (end + 7) & ~7  # where the next record starts
                    continue
                end = used + header + record_length
                if end > length:
                    break
                begin_at(used + header)
                end_at(end)
                used = (end + 7) & ~7
            self.backlog = available - used >= header
            if not used:
                return []
            view = memoryview(window[:used].tobytes())
        self._position = position + used
        self._consumer_position.store(self._position)
        return list(map(view.__getitem__, map(slice, begins, ends)))

    @contextmanager
    def _window(self, start: int, length: int) -> Iterator[memoryview]:
        """The data from offset `start` on, `length` bytes of it, contiguous."""
        data = self._producer
        begin = self._data_offset + start
        first = min(length, self._mask + 1 - start)  # the rest wraps to the beginning
        if first < length:
            data = data[begin:begin + first] + data[self._data_offset:
                                                    self._data_offset + length - first]
            begin = 0
        with memoryview(data) as view, view[begin:begin + length] as window:
            yield window


class RingBuffer(RingReader):
    """The ring of a BPF_RINGBUF_OUTPUT map, mapped from the map's fd (which stays bcc's)."""

    def __init__(self, map_fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self._fd = map_fd
        self._map_bytes = min(MAP_BYTES, size)
        # The data mapped now: its first and end offsets (the data is mapped twice in a
        # row from the ring's third page), and the mapping.
        self._data: tuple[int, int, mmap.mmap] | None = None
        self._maps = [mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE, offset=0)]
        try:
            self._maps.append(mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ,
                                        offset=page))
            super().__init__(*self._maps, size, page)
            self._epoll = select.epoll()
            self._epoll.register(map_fd, select.EPOLLIN)
        except (OSError, ValueError):
            self._close_maps()
            raise

    @contextmanager
    def _window(self, start: int, length: int) -> Iterator[memoryview]:
        # Where it wraps, the window runs on into the data's second mapping.
        end = start + length
        if self._data is None or not self._data[0] <= start <= end <= self._data[1]:
            self._unmap_data()
            page = mmap.PAGESIZE
            first = start - start % page
            last = min(max(end, first + self._map_bytes) + page - 1, 2 * (self._mask + 1))
            last -= last % page
            self._data = first, last, mmap.mmap(self._fd, last - first, mmap.MAP_SHARED,
                                                mmap.PROT_READ, offset=2 * page + first)
        first, _, mapping = self._data
        with memoryview(mapping) as view, view[start - first:end - first] as window:
            yield window

    def _unmap_data(self) -> None:
        if self._data is not None:
            self._data[2].close()
            self._data = None

    def wait(self, timeout_ms: int) -> None:
        """Until the kernel wakes us (the probe asks it not to) or the timeout passes."""
        try:
            self._epoll.poll(timeout_ms / 1000)
        except InterruptedError:  # a signal: the caller looks at its stop flag
            pass

    def _close_maps(self) -> None:
        for memory in self._maps:
            memory.close()
        self._maps = []

    def close(self) -> None:
        self.release()
        self._unmap_data()
        self._close_maps()
        self._epoll.close()
