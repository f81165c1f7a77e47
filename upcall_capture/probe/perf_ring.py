"""Per-CPU perf rings of a BPF_PERF_OUTPUT map, read straight from their mmap'd memory.

bcc's reader calls back into Python through ctypes once per record, which costs more than
everything else we do with a record. Here each CPU's ring is opened with perf_event_open()
and mapped by us; a read copies up to READ_LIMIT bytes of a ring with one slice (two at
the wrap), splits the copy into samples with one unpack per record, and hands the space
of the whole records in it back to the kernel at once.

The kernel wakes the poller only when a ring holds `wakeup_bytes` (a quarter of it, by
default, at most READ_LIMIT), so at high rates a wakeup carries a large batch and costs
little per record. At low rates the poll timeout bounds how long a record can wait: every
read looks at every ring, whatever woke it.

Layout (include/uapi/linux/perf_event.h): the first page is `struct perf_event_mmap_page`,
whose data_head (written by the kernel) and data_tail (written by us) are free-running byte
counters into the data pages that follow. Records are `struct perf_event_header` {u32 type,
u16 misc, u16 size} and 8-byte aligned; a PERF_RECORD_SAMPLE with PERF_SAMPLE_RAW carries
{u32 size; raw bytes}, the raw bytes padded so that the record stays aligned, and a
PERF_RECORD_LOST carries {u64 id; u64 lost}.

Ordering: the kernel publishes data_head after writing the records (smp_store_release),
and we read it before reading the data; x86 does not reorder loads with loads, nor stores
with earlier loads, so a Python read of the head, then of the data, then the store of
data_tail need no barrier there. Python has no barrier to offer weakly ordered machines
(arm64): there this relies on the thousands of instructions between those accesses.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import select
import struct
import weakref
from collections.abc import Iterable

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_ATTR_FLAG_WATERMARK = 1 << 14  # wakeup_watermark (bytes), not wakeup_events
PERF_ATTR_SIZE_VER5 = 112
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9

# perf_event_open(2) by machine; Python has no wrapper.
_SYSCALL_PERF_EVENT_OPEN = {
    "x86_64": 298, "aarch64": 241, "ppc64le": 319, "ppc64": 319, "s390x": 331, "riscv64": 241,
}

# struct perf_event_attr: type, size, config, sample_period, sample_type, read_format,
# flag bits, wakeup_events (with the watermark flag: wakeup_watermark); the rest is zero.
_ATTR = struct.Struct("<IIQQQQQI")
# struct perf_event_mmap_page: data_head at 1024, data_tail, data_offset, data_size.
_META = struct.Struct("<QQQQ")
_META_OFFSET = 1024
_DATA_TAIL = struct.Struct("<Q")
_DATA_TAIL_OFFSET = 1032
# perf_event_header (type, size) and, for a sample, the raw size.
_SAMPLE_HEAD = struct.Struct("<IxxHI")
_SAMPLE_HEAD_SIZE = _SAMPLE_HEAD.size
_LOST_COUNT = struct.Struct("<Q")
# Bytes copied out of a ring at a time: bounds the memory a read takes (a ring can hold
# 32 MiB) while amortising the per-read cost. Larger than any perf record (64 KiB).
READ_LIMIT = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def perf_event_open_bpf_output(cpu: int, wakeup_bytes: int) -> int:
    """A file descriptor for a BPF output event on one CPU (any process), waking its
    poller when wakeup_bytes are waiting."""
    number = _SYSCALL_PERF_EVENT_OPEN.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"perf_event_open: unknown machine {platform.machine()}")
    attr = ctypes.create_string_buffer(PERF_ATTR_SIZE_VER5)
    _ATTR.pack_into(attr, 0, PERF_TYPE_SOFTWARE, PERF_ATTR_SIZE_VER5, PERF_COUNT_SW_BPF_OUTPUT,
                    1, PERF_SAMPLE_RAW, 0, PERF_ATTR_FLAG_WATERMARK, wakeup_bytes)
    fd = _libc.syscall(ctypes.c_long(number), attr, ctypes.c_int(-1), ctypes.c_int(cpu),
                       ctypes.c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open on cpu {cpu}: {os.strerror(err)}")
    return fd


class RingReader:
    """The consumer's side of a perf ring in memory laid out as the kernel lays it out:
    the meta page, then the data pages. Kept apart from the event fd so that it can be
    exercised on any buffer."""

    def __init__(self, memory: mmap.mmap, pages: int, page_size: int = mmap.PAGESIZE) -> None:
        self._map = memory
        _, tail, offset, size = _META.unpack_from(memory, _META_OFFSET)
        # Kernels before 4.1 leave data_offset/data_size zero: the data follows the page.
        self._data_offset = offset or page_size
        self._data_size = size or pages * page_size
        self._tail = tail

    def read(self, limit: int = READ_LIMIT) -> bytes:
        """A copy of up to `limit` bytes written since the last release."""
        head = _META.unpack_from(self._map, _META_OFFSET)[0]
        tail = self._tail
        if head == tail:
            return b""
        size = self._data_size
        start = self._data_offset + tail % size
        end = start + min(head - tail, limit)
        wrap = self._data_offset + size
        if end <= wrap:
            return self._map[start:end]
        return self._map[start:wrap] + self._map[self._data_offset:end - size]

    def release(self, nbytes: int) -> None:
        """Hand nbytes, read and done with, back to the kernel."""
        if nbytes:
            self._tail += nbytes
            _DATA_TAIL.pack_into(self._map, _DATA_TAIL_OFFSET, self._tail)


class PerfRing(RingReader):
    """One CPU's ring: a BPF output event's fd and its mapping.

    perf maps its rings VM_DONTCOPY: a child forked after the rings were set up (as -Z
    does, to give up root) has the fds but not the mappings. So each ring maps itself
    again, at the same address, right after a fork.
    """

    def __init__(self, cpu: int, pages: int, wakeup_bytes: int | None = None) -> None:
        if pages < 1 or pages & (pages - 1):
            raise ValueError(f"perf ring pages must be a power of two, not {pages}")
        self.cpu = cpu
        page = mmap.PAGESIZE
        wakeup_bytes = wakeup_bytes or max(min(pages * page // 4, READ_LIMIT), 1)
        self.fd = perf_event_open_bpf_output(cpu, wakeup_bytes)
        try:
            memory = mmap.mmap(self.fd, (pages + 1) * page, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(self.fd)
            raise
        super().__init__(memory, pages, page)
        self._length = (pages + 1) * page
        handle = ctypes.c_char.from_buffer(memory)
        self._address = ctypes.addressof(handle)
        del handle  # an exported buffer could not be closed
        _LIVE_RINGS.add(self)

    def _map_again(self) -> None:
        address = _libc.mmap(self._address, self._length, mmap.PROT_READ | mmap.PROT_WRITE,
                             mmap.MAP_SHARED | _MAP_FIXED_NOREPLACE, self.fd, 0)
        if address == self._address:
            return
        if address in (None, _MAP_FAILED) and ctypes.get_errno() == errno.EEXIST:
            return  # the mapping did survive the fork
        # Nothing to fall back on: reading the ring would touch unmapped memory.
        os.write(2, b"upcall-capture: cannot map the perf ring again after fork\n")
        os._exit(1)

    def close(self) -> None:
        if self.fd >= 0:
            _LIVE_RINGS.discard(self)
            self._map.close()
            os.close(self.fd)
            self.fd = -1


_MAP_FIXED_NOREPLACE = 0x100000
_MAP_FAILED = ctypes.c_void_p(-1).value
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long)
_LIVE_RINGS: weakref.WeakSet[PerfRing] = weakref.WeakSet()


def _map_rings_again() -> None:
    for ring in list(_LIVE_RINGS):
        ring._map_again()


os.register_at_fork(after_in_child=_map_rings_again)


def split_samples(chunk: bytes) -> tuple[list[memoryview], int, int]:
    """The raw samples in a chunk read from a ring (views into it), the number of records
    the kernel reported lost (PERF_RECORD_LOST), and the bytes of whole records parsed: a
    record cut by the end of the chunk is left for the next read. Raw samples keep the
    kernel's alignment padding at their end."""
    samples: list[memoryview] = []
    append = samples.append
    view = memoryview(chunk)
    unpack = _SAMPLE_HEAD.unpack_from
    lost = 0
    pos = 0
    end = len(chunk)
    # Every record we can meet is at least 12 bytes: a sample's header and raw size, or
    # a lost record (24).
    while end - pos >= _SAMPLE_HEAD_SIZE:
        kind, size, raw_size = unpack(chunk, pos)
        if size < _SAMPLE_HEAD_SIZE or size > end - pos:
            break  # cut by the end of the chunk (or nonsense: then it stays stuck)
        if kind == PERF_RECORD_SAMPLE:
            start = pos + _SAMPLE_HEAD_SIZE
            append(view[start:start + raw_size])
        elif kind == PERF_RECORD_LOST:
            lost += _LOST_COUNT.unpack_from(chunk, pos + 16)[0]
        pos += size
    return samples, lost, pos


class PerfBuffer:
    """A ring per CPU, plugged into a BPF_PERF_OUTPUT map, and an epoll set over them."""

    def __init__(self, cpus: Iterable[int], pages: int, wakeup_bytes: int | None = None) -> None:
        self.rings: list[PerfRing] = []
        self.lost = 0  # what the kernel reported with PERF_RECORD_LOST
        self.backlog = False
        self._epoll = select.epoll()
        try:
            for cpu in cpus:
                ring = PerfRing(cpu, pages, wakeup_bytes)
                self.rings.append(ring)
                self._epoll.register(ring.fd, select.EPOLLIN)
        except OSError:
            self.close()
            raise

    def wait(self, timeout_ms: int) -> None:
        """Until a ring has woken us, or the timeout passes (then some may hold a few)."""
        try:
            self._epoll.poll(timeout_ms / 1000)
        except InterruptedError:  # a signal: the caller looks at its stop flag
            pass

    def read(self) -> list[list[memoryview]]:
        """The samples in each ring, a list per ring, each in the order it was written;
        at most READ_LIMIT bytes of each (`backlog` says whether any ring held more)."""
        per_ring = []
        self.backlog = False
        for ring in self.rings:
            chunk = ring.read()
            if chunk:
                samples, lost, used = split_samples(chunk)
                ring.release(used)
                self.lost += lost
                self.backlog = self.backlog or len(chunk) == READ_LIMIT
                per_ring.append(samples)
        return per_ring

    def close(self) -> None:
        for ring in self.rings:
            ring.close()
        self._epoll.close()
