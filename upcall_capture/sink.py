"""Where the pcapng bytes go: a new file, or standard output.

A capture file holds packet data from a production host, so it is created mode 0600,
never through a symlink planted at its path, and never over an existing file unless
the user says --overwrite (tcpdump overwrites silently; an operator who reruns a
command at 3 a.m. should not lose the previous capture).

Blocks are written whole. After a write error (a full disk) the file is cut back to
its last complete block, so it stays readable.

`OutputThread` runs the output stage (building blocks and writing them) beside the loop
that reads the probe: writes release the GIL, so on a machine with two cores the
kernel's work on them overlaps with reading and merging the next batch.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import mmap
import os
import stat
import sys
import threading
import zlib
from collections import deque
from collections.abc import Callable, Sequence

from upcall_capture.errors import CaptureError, UsageError
from upcall_capture.tuning import schedule_for_latency

# Direct I/O: transfers in multiples of this, from memory aligned to it (a page covers
# every logical block size in use), staged through a buffer of DIRECT_CHUNK bytes: twice
# the writes a capture coalesces (capture.COALESCE_BYTES), as each is that much and up to
# a batch's blocks more. Each is then one direct transfer, not two: every system call
# costs the writer's thread a wait for the GIL on its way back, and in a storm of 250,000
# new flows/s a direct write of 4 MiB took it 8 to 9 ms where `dd` takes 3.5 (only the
# pages written count in the RSS: some 4.6 MiB).
DIRECT_ALIGN = mmap.PAGESIZE
DIRECT_CHUNK = 8 << 20
# writev()'s limit on pieces a call (Linux's UIO_MAXIOV).
IOV_MAX = 1024


class Sink:
    """Writes whole blocks to a file descriptor, remembering the last good offset.

    A regular file is written with O_DIRECT where the file system allows it: at an upcall
    storm's 250 MB/s, buffered writes cost a core of kernel time in page-cache copies
    and writeback, and fill the host's memory with dirty pages; direct writes cost a
    tenth of that and leave the page cache alone. Direct I/O moves whole aligned blocks
    only, so the last, partial block of each write goes through the page cache (a second
    descriptor of the file, without O_DIRECT: turning the flag off and on again for it
    took two more system calls a write) and is written again, completed, by the next
    direct write. Every write() leaves all its bytes in the file, as a buffered write
    would.
    """

    def __init__(self, fd: int, name: str, *, truncatable: bool) -> None:
        self.fd = fd
        self.name = name
        self.truncatable = truncatable
        self.good_bytes = 0  # bytes of complete blocks on disk
        self.closed_by_reader = False
        self._direct: mmap.mmap | None = None  # the aligned staging buffer, when direct
        self._partial = b""  # the bytes of the last, unaligned block (direct mode)
        self._partial_at = 0  # the file offset of that block
        self._buffered_fd = -1  # the file without O_DIRECT, for that block (direct mode)
        if truncatable and _set_direct(fd, True):
            try:
                self._buffered_fd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
            except OSError:  # no /proc: buffered writes, then
                _set_direct(fd, False)
            else:
                self._direct = mmap.mmap(-1, DIRECT_CHUNK)
                self._partial_at = os.lseek(fd, 0, os.SEEK_CUR)

    @property
    def direct(self) -> bool:
        return self._direct is not None

    def write(self, blocks: bytes) -> None:
        """Write complete blocks, or raise CaptureError with the file cut back to good_bytes."""
        self.write_pieces([blocks])

    def write_pieces(self, pieces: Sequence[bytes | bytearray]) -> int:
        """Write pieces of complete blocks in one go; the number written, all of them
        unless the reader left. On an error (a full disk) as many whole pieces as fit are
        written, one by one, before CaptureError is raised: the file ends after the last
        of them, and `pieces_written` says how many."""
        self.pieces_written = 0
        encoded = [self._encode(piece) for piece in pieces]
        try:
            self._write(encoded)
        except CaptureError:
            if len(encoded) == 1:
                raise
            # What fits, piece by piece: raised again at the first that does not.
            for chunk in encoded:
                self._write([chunk])
                self.pieces_written += 1
        self.pieces_written = 0 if self.closed_by_reader else len(pieces)
        return self.pieces_written

    def _encode(self, piece: bytes | bytearray) -> bytes | bytearray:
        return piece  # what goes to the file for a piece of blocks

    def _write(self, pieces: Sequence[bytes | bytearray]) -> None:
        """The pieces, one after the other, in as few system calls as they take: never
        joined first, which copied every byte of a storm's output once more (and held the
        GIL while it did)."""
        size = sum(map(len, pieces))
        if not size or self.closed_by_reader:
            return
        try:
            if self._direct is not None:
                try:
                    self._write_direct(pieces)
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    self._stop_direct()  # the file system refused an aligned transfer
                    self._write_buffered(pieces)
            else:
                self._write_buffered(pieces)
        except BrokenPipeError:
            self.closed_by_reader = True  # like tcpdump -w - | head: the reader left
            return
        except OSError as err:
            self._cut_back()
            raise CaptureError(f"{self.name}: {os.strerror(err.errno)}") from None
        self.good_bytes += size

    def _write_buffered(self, pieces: Sequence[bytes | bytearray]) -> None:
        views = deque(memoryview(piece) for piece in pieces if piece)
        while views:
            written = os.writev(self.fd, list(itertools.islice(views, IOV_MAX)))
            while written and written >= len(views[0]):
                written -= len(views.popleft())
            if written:
                views[0] = views[0][written:]

    def _write_direct(self, pieces: Sequence[bytes | bytearray]) -> None:
        partial, offset = self._partial, self._partial_at
        with memoryview(self._direct) as staged:
            # The partial block first (it is rewritten whole), then the pieces, a chunk
            # at a time.
            filled = len(partial)
            staged[:filled] = partial
            for piece in pieces:
                data = memoryview(piece)
                while data:
                    take = min(len(data), DIRECT_CHUNK - filled)
                    staged[filled:filled + take] = data[:take]
                    data = data[take:]
                    filled += take
                    if filled == DIRECT_CHUNK:
                        _pwrite_all(self.fd, staged, offset)
                        offset += DIRECT_CHUNK
                        filled = 0
            aligned = filled - filled % DIRECT_ALIGN
            _pwrite_all(self.fd, staged[:aligned], offset)
            partial = bytes(staged[aligned:filled])
            offset += aligned
        if partial:
            # Buffered, so that the file never shows padding; the next direct write
            # covers this block again and the kernel drops the cached page.
            _pwrite_all(self._buffered_fd, memoryview(partial), offset)
        self._partial, self._partial_at = partial, offset

    def _stop_direct(self) -> None:
        _set_direct(self.fd, False)
        os.lseek(self.fd, self.good_bytes, os.SEEK_SET)
        self._direct = None  # unmapped when the last view of it (maybe a traceback's) goes
        self._close_buffered()

    def _close_buffered(self) -> None:
        if self._buffered_fd >= 0:
            os.close(self._buffered_fd)
            self._buffered_fd = -1

    def _cut_back(self) -> None:
        if self.truncatable:
            try:
                os.ftruncate(self.fd, self.good_bytes)
            except OSError:
                pass
            if self._direct is not None:
                # Undo any partial-block bookkeeping this write did: redo it from the file.
                self._stop_direct()

    def discard(self) -> None:
        """Close and remove a file this run created, when the capture never started."""
        self.close()
        if self.truncatable:
            os.unlink(self.name)

    def close(self) -> None:
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1
        self._direct = None
        self._close_buffered()


class _Background:
    """A thread of the object's own running its `_run()`, with a condition to wait on, a
    flag that asks it to end once its work is done, and the error that ended it, kept
    for the thread that gave it the work (_raise_error)."""

    def _start(self, name: str) -> None:
        self._closing = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class WriteBehind(_Background):
    """A sink's writes in a thread of their own, in the order given, so that the thread
    that builds the blocks goes on while a write waits for the disk. A direct write of a
    megabyte took 2 ms here: in a storm of 250,000 new flows/s the output thread spent over
    half its time in writes, while the workers' replies waited and the workers with them.

    At most `max_bytes` wait to be written (submit() waits for room): by default two of a
    capture's coalesced writes (capture.COALESCE_BYTES). Each submit() is
    followed by `on_written(written, submitted)`: how many of its pieces are in the file,
    of how many. The first error (a CaptureError: the sink cut the file back to its last
    good piece) ends the writing: what waits is dropped, and the next submit() or wait()
    raises it."""

    def __init__(self, sink: Sink, on_written: Callable[[int, int], None], *,
                 max_bytes: int = 8 << 20) -> None:
        self.sink = sink
        self.on_written = on_written
        self.max_bytes = max_bytes
        self.waiting_bytes = 0  # submitted, not written yet
        self._queue: deque[tuple[Sequence[bytes | bytearray], int]] = deque()  # and size
        self._writing = False
        self._start("writer")

    def submit(self, pieces: Sequence[bytes | bytearray]) -> None:
        size = sum(map(len, pieces))
        with self._cond:
            while self.waiting_bytes and self.waiting_bytes + size > self.max_bytes \
                    and self._error is None:
                self._cond.wait()
            self._raise_error()
            self._queue.append((pieces, size))
            self.waiting_bytes += size
            self._cond.notify_all()

    def wait(self) -> None:
        """Until everything submitted is written; raises the writing's error."""
        with self._cond:
            while self._queue or self._writing:
                self._cond.wait()
            self._raise_error()

    def close(self) -> None:
        """End the thread once everything submitted is written (or dropped, after an
        error, which stays for wait())."""
        self._end()

    def _run(self) -> None:
        schedule_for_latency()
        cond = self._cond
        while True:
            with cond:
                while not self._queue and not self._closing:
                    cond.wait()
                if not self._queue:
                    return
                pieces, size = self._queue.popleft()
                self._writing = True
            error = None
            try:
                self.sink.write_pieces(pieces)
            except BaseException as err:  # for the thread that submitted
                error = err
            self.on_written(self.sink.pieces_written, len(pieces))
            with cond:
                self._writing = False
                self.waiting_bytes -= size
                if error is not None:
                    self._error = error
                    self._queue.clear()
                    self.waiting_bytes = 0
                cond.notify_all()


class GzipSink(Sink):
    """A file ending in .gz: gzip-compressed pcapng, which Wireshark and tshark open as is.

    Every write is compressed and sync-flushed, so the file on disk always ends at a
    block boundary of the pcapng inside: readable while it grows, and, after a write
    error, cut back to a stream that still decompresses up to its last complete batch.
    zlib's fastest level, since an upcall storm gives it some 250 MB/s.
    """

    def __init__(self, fd: int, name: str, *, truncatable: bool) -> None:
        super().__init__(fd, name, truncatable=truncatable)
        self._zip = zlib.compressobj(1, zlib.DEFLATED, 31)  # 31: with a gzip header
        self._failed = False

    def _encode(self, piece: bytes | bytearray) -> bytes:
        # Each piece sync-flushed: the stream decompresses up to the end of any of them.
        return self._zip.compress(piece) + self._zip.flush(zlib.Z_SYNC_FLUSH)

    def write_pieces(self, pieces: Sequence[bytes | bytearray]) -> int:
        try:
            return super().write_pieces(pieces)
        except CaptureError:
            self._failed = True  # the compressor holds bytes the file does not: no trailer
            raise

    def close(self) -> None:
        if self.fd >= 0 and not self._failed and not self.closed_by_reader:
            try:
                self._write([self._zip.flush(zlib.Z_FINISH)])
            except CaptureError:
                pass  # the stream still decompresses; only the trailer is missing
        super().close()


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for a regular file; False if that is not possible."""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError:
        return False
    return True


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def open_file(path: str, *, overwrite: bool = False) -> Sink:
    """A new capture file, mode 0600, refusing symlinks and (unless overwrite) existing files."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_TRUNC if overwrite else os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise UsageError(f"{path}: file exists (use --overwrite to replace it)") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UsageError(f"{path}: is a symbolic link; refusing to write through it") from None
        raise UsageError(f"{path}: {err.strerror}") from None
    return (GzipSink if path.endswith(".gz") else Sink)(fd, path, truncatable=True)


def open_stdout() -> Sink:
    """Standard output for `-w -`, which must not be a terminal."""
    fd = sys.stdout.fileno()
    if os.isatty(fd):
        raise UsageError("standard output is a terminal: not writing pcapng to it (pipe it)")
    return Sink(fd, "standard output", truncatable=False)


# Records handed on at a time. Each batch costs the main process's threads and a worker
# some wake-ups, pipe frames and pickles: at 250,000 new flows/s, batches of 512 took
# them 0.4 µs an upcall less than batches of 256 (main and worker 5.7 and 7.7 s of CPU
# for 2,500,000, against 6.4 and 8.1, in two pairs of runs). Batches of 1,024 took less
# again, but only three fit in a worker's request ring (channel.REQUEST_RING_BYTES), and
# the worker waited for each: 12% to 29% were lost.
MAX_BATCH = 512


class OutputThread(_Background):
    """Hands batches to `handle(batch, dropped, prepared)` in a thread of its own, in order.

    `prepare(batch, dropped)` runs first in the caller's thread, for work that must be
    started there, in order (sending the batch to a worker process); what it returns is
    handed on as `prepared`. The queue is bounded by the number of records waiting (not
    batches): when the output falls behind, `put` blocks, the reader stops draining, and
    the probe's ring holds the backlog (locked kernel memory that is there anyway) rather
    than our heap. `idle()` runs in the thread whenever it has handled batches and finds
    the queue empty (outputs that hold blocks back to write them in larger pieces write
    them then). An exception in `handle` or `idle` ends the thread and is raised again
    by the next `put` or by `close`.
    """

    def __init__(self, handle: Callable[[Sequence, int, object], None], *,
                 prepare: Callable[[Sequence, int], object] = lambda batch, dropped: None,
                 idle: Callable[[], None] = lambda: None,
                 max_pending: int = 8192, max_batch: int = MAX_BATCH) -> None:
        self.handle = handle
        self.prepare = prepare
        self.idle = idle
        self.max_pending = max_pending
        self.max_batch = max_batch
        self._queue: deque[tuple[Sequence, int, object]] = deque()
        self._pending = 0  # records queued or being handled
        self._start("output")

    def put(self, batch: Sequence, dropped: int = 0) -> None:
        """Queue a batch, in pieces of at most max_batch (so that what is built from one
        stays small), waiting while too many records are queued already."""
        for start in range(0, max(len(batch), 1), self.max_batch):
            piece = batch[start:start + self.max_batch] if len(batch) > self.max_batch \
                else batch
            with self._cond:
                while self._pending >= self.max_pending and self._error is None:
                    self._cond.wait()
                self._raise_error()
                self._pending += len(piece)
            prepared = self.prepare(piece, dropped)
            with self._cond:
                self._queue.append((piece, dropped, prepared))
                self._cond.notify_all()
            dropped = 0

    def close(self) -> None:
        """Wait until every batch has been handled, then end the thread."""
        self._end()
        self._raise_error()

    def _run(self) -> None:
        cond = self._cond
        handled = False  # since the last idle()
        while True:
            with cond:
                empty = not self._queue
            try:
                if empty and handled:
                    handled = False
                    self.idle()
                with cond:
                    while not self._queue and not self._closing:
                        cond.wait()
                    if not self._queue:
                        return
                    batch, dropped, prepared = self._queue.popleft()
                self.handle(batch, dropped, prepared)
                handled = True
            except BaseException as err:  # handed to the reader's thread
                with cond:
                    self._error = err
                    self._queue.clear()
                    self._pending = 0
                    cond.notify_all()
                return
            with cond:
                self._pending -= len(batch)
                cond.notify_all()
