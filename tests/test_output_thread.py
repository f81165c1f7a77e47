"""sink: direct-I/O writes leave exactly the bytes written, and the output thread hands
batches on in order."""

from __future__ import annotations

import os
import random
import threading

import pytest

from upcall_capture.sink import (
    DIRECT_ALIGN,
    DIRECT_CHUNK,
    IOV_MAX,
    OutputThread,
    Sink,
    open_file,
)


def test_direct_writes_leave_exactly_the_bytes_written(tmp_path):
    path = tmp_path / "c.pcapng"
    descriptors = set(os.listdir("/proc/self/fd"))
    sink = open_file(str(path))
    if not sink.direct:
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    rng = random.Random(1)
    written = bytearray()
    sizes = [1, 3, DIRECT_ALIGN - 1, DIRECT_ALIGN, DIRECT_ALIGN + 1, 5000, DIRECT_CHUNK - 7,
             DIRECT_CHUNK, 3 * DIRECT_CHUNK + 11] + [rng.randrange(1, 70000) for _ in range(40)]
    for size in sizes:
        blocks = os.urandom(size)
        sink.write(blocks)
        written += blocks
        # After every write the file holds all of it and nothing more (no padding).
        assert path.read_bytes() == written
        assert sink.good_bytes == len(written)
    sink.close()
    assert path.read_bytes() == written
    # Both descriptors of the file (the direct one, and the one for partial blocks) closed.
    assert set(os.listdir("/proc/self/fd")) == descriptors


def test_pieces_written_at_once_leave_exactly_their_bytes_in_order(tmp_path):
    """write_pieces() stages pieces one by one (never joined): across the staging
    buffer's chunks, around a partial block left by the write before."""
    path = tmp_path / "c.pcapng"
    sink = open_file(str(path))
    if not sink.direct:
        pytest.skip(f"{tmp_path} does not take O_DIRECT")
    rng = random.Random(2)
    written = bytearray(b"x" * 100)  # a partial block first
    sink.write(bytes(written))
    for sizes in ([DIRECT_CHUNK - 150, 300, 7], [1] * 50, [DIRECT_CHUNK, DIRECT_CHUNK + 9, 0],
                  [rng.randrange(1, 200_000) for _ in range(30)]):
        pieces = [os.urandom(size) for size in sizes]
        assert sink.write_pieces(pieces) == len(pieces)
        written += b"".join(pieces)
        assert path.read_bytes() == written
        assert sink.good_bytes == len(written)
    sink.close()


def test_buffered_pieces_go_whole_through_a_pipe_that_takes_part_of_a_write():
    """More pieces than one writev() takes, into a pipe whose reader takes a little at a
    time: each write is partial, and every byte still arrives once, in order."""
    read_end, write_end = os.pipe()
    sink = Sink(write_end, "<pipe>", truncatable=False)
    pieces = [os.urandom(random.Random(size).randrange(1, 300)) for size in
              range(IOV_MAX + 500)]
    expected = b"".join(pieces)
    received = bytearray()

    def read_slowly():
        while chunk := os.read(read_end, 4096):
            received.extend(chunk)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    assert sink.write_pieces(pieces) == len(pieces)
    os.close(write_end)
    reader.join()
    os.close(read_end)
    assert received == expected
    assert sink.good_bytes == len(expected)


def test_batches_are_handled_in_order_in_pieces():
    seen = []
    thread = OutputThread(lambda batch, dropped, _: seen.append((list(batch), dropped)),
                          max_batch=3)
    thread.put(list(range(7)), dropped=5)
    thread.put([], dropped=2)  # losses alone still go through
    thread.put([7, 8])
    thread.close()
    assert seen == [([0, 1, 2], 5), ([3, 4, 5], 0), ([6], 0), ([], 2), ([7, 8], 0)]


def test_an_error_in_the_output_reaches_the_reader():
    def fail(batch, dropped, prepared):
        raise RuntimeError("output broke")

    thread = OutputThread(fail)
    thread.put([1])
    with pytest.raises(RuntimeError, match="output broke"):
        thread.close()


def test_the_queue_is_bounded():
    release = threading.Event()
    thread = OutputThread(lambda batch, dropped, _: release.wait(), max_pending=4, max_batch=4)
    thread.put([1, 2, 3, 4])  # taken by the thread, which now waits
    blocked = threading.Thread(target=thread.put, args=([5],))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # four records pending: the fifth waits for room
    release.set()
    blocked.join(10)
    assert not blocked.is_alive()
    thread.close()


def test_idle_runs_once_the_queue_is_empty():
    events = []
    gate = threading.Event()

    def handle(batch, dropped, prepared):
        gate.wait()
        events.append(batch[0])

    thread = OutputThread(handle, idle=lambda: events.append("idle"), max_batch=1)
    thread.put([1, 2, 3])  # three batches queued while the first one waits
    gate.set()
    thread.close()
    # Not between batches that were waiting: only when there was nothing left.
    assert events == [1, 2, 3, "idle"]


def test_blocks_are_held_back_until_idle_or_coalesce_bytes(tmp_path):
    import upcalls
    from conftest import REPLAY_DIR
    from probe_records import storm

    from upcall_capture import capture, pcapng
    from upcall_capture.upcall_blocks import UpcallBlocks

    records = storm(upcalls.read_records(REPLAY_DIR / "mixed.upc"), 12000, unique=False)
    path = tmp_path / "held.pcapng"
    output = capture.PcapngOutput(
        capture.InlineBlocks(lambda: UpcallBlocks(snaplen=9216, clock_offset_ns=0,
                                                  port_name=lambda d, p: None)),
        open_file(str(path)), pcapng.section_header(userappl="t", os="t", hardware="t"))
    header = path.stat().st_size
    output.packets(records[:10], 0, output.prepare(records[:10], 0))
    assert path.stat().st_size == header and output.written == 0  # held back
    output.flush()
    output.wait_written()  # written behind the output thread (sink.WriteBehind)
    assert output.written == 10 and path.stat().st_size > header
    written_at = path.stat().st_size
    for start in range(10, 12000, 100):  # about 9 MB in all
        batch = records[start:start + 100]
        output.packets(batch, 0, output.prepare(batch, 0))
    output.wait_written()
    # Written COALESCE_BYTES or more at a time, the rest still held.
    assert path.stat().st_size - written_at >= capture.COALESCE_BYTES
    assert 10 < output.written < 12000 and (output.written - 10) % 100 == 0
    output.finish(1, 0)
    packets = [b for b in pcapng.iter_blocks(path.read_bytes()) if isinstance(b, pcapng.Packet)]
    assert len(packets) == output.written == 12000
