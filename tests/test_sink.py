"""sink.py: safe creation of capture files, and cutting back after write errors."""

import os
import stat
import subprocess

import pytest

from upcall_capture.errors import CaptureError, UsageError
from upcall_capture.sink import open_file


def test_new_file_is_private(tmp_path):
    path = tmp_path / "c.pcapng"
    sink = open_file(str(path))
    sink.write(b"abcd")
    sink.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"abcd"


def test_existing_file_is_never_overwritten_silently(tmp_path):
    path = tmp_path / "c.pcapng"
    path.write_bytes(b"precious")
    with pytest.raises(UsageError, match="file exists"):
        open_file(str(path))
    assert path.read_bytes() == b"precious"
    sink = open_file(str(path), overwrite=True)
    sink.write(b"new")
    sink.close()
    assert path.read_bytes() == b"new"


@pytest.mark.parametrize("overwrite", [False, True])
def test_symlink_is_never_followed(tmp_path, overwrite):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "c.pcapng"
    link.symlink_to(victim)
    with pytest.raises(UsageError):
        open_file(str(link), overwrite=overwrite)
    assert victim.read_bytes() == b"keep"


def test_unwritable_directory(tmp_path):
    with pytest.raises(UsageError, match="No such file or directory"):
        open_file(str(tmp_path / "missing" / "c.pcapng"))


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: a disk that really fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_cuts_file_back_to_last_complete_block(small_disk):
    path = small_disk / "c.pcapng"
    sink = open_file(str(path))
    block = bytes(range(256)) * 12  # 3072 bytes: the disk fills in the middle of one
    written = 0
    with pytest.raises(CaptureError, match="No space left on device"):
        while True:
            sink.write(block)
            written += 1
    sink.close()
    data = path.read_bytes()
    assert written > 0
    assert data == block * written
    assert sink.good_bytes == len(data)


@pytest.mark.parametrize("name", ["c.pcapng", "c.pcapng.gz"])
def test_pieces_that_fit_are_written_when_all_do_not(small_disk, name):
    import random
    import zlib

    path = small_disk / name
    sink = open_file(str(path))
    rng = random.Random(7)  # incompressible: gzip fills the disk as fast
    pieces = [bytes(rng.randrange(256) for _ in range(3000)) for _ in range(40)]  # 120 KB
    with pytest.raises(CaptureError, match="No space left on device"):
        sink.write_pieces(pieces)
    sink.close()
    kept = sink.pieces_written
    assert 0 < kept < len(pieces)  # not all or nothing: what fitted is there
    data = path.read_bytes()
    if name.endswith(".gz"):
        data = zlib.decompressobj(31).decompress(data)
    assert data == b"".join(pieces[:kept])


def test_writes_behind_stay_in_order_and_stop_at_the_first_error(small_disk):
    import random
    import threading

    from upcall_capture.sink import WriteBehind

    path = small_disk / "c.pcapng"
    sink = open_file(str(path))
    rng = random.Random(8)
    pieces = [bytes(rng.randrange(256) for _ in range(3000)) for _ in range(40)]  # 120 KB
    reported: list[tuple[int, int]] = []
    gate = threading.Event()
    behind = WriteBehind(sink, lambda written, submitted: (gate.wait(), reported.append(
        (written, submitted))), max_bytes=10_000)
    behind.submit(pieces[:3])  # 9,000 bytes: the writer holds them (the gate) ...
    room = threading.Thread(target=behind.submit, args=(pieces[3:6],))
    room.start()
    room.join(0.2)
    assert room.is_alive()  # ... and the next three wait for room
    gate.set()
    room.join()
    with pytest.raises(CaptureError, match="No space left on device"):
        for start in range(6, 40, 2):
            behind.submit(pieces[start:start + 2])
        behind.wait()
    behind.close()
    sink.close()
    kept = sum(written for written, _ in reported)
    assert 6 < kept < len(pieces)
    assert reported[:2] == [(3, 3), (3, 3)] and reported[-1][0] < reported[-1][1]
    assert path.read_bytes() == b"".join(pieces[:kept])  # in order, and nothing after
