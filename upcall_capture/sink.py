"""Where the pcapng bytes go: a new file, or standard output.

A capture file holds packet data from a production host, so it is created mode 0600,
never through a symlink planted at its path, and never over an existing file unless
the user says --overwrite (tcpdump overwrites silently; an operator who reruns a
command at 3 a.m. should not lose the previous capture).

Blocks are written whole. After a write error (a full disk) the file is cut back to
its last complete block, so it stays readable.
"""

from __future__ import annotations

import errno
import os
import sys

from upcall_capture.errors import CaptureError, UsageError


class Sink:
    """Writes whole blocks to a file descriptor, remembering the last good offset."""

    def __init__(self, fd: int, name: str, *, truncatable: bool) -> None:
        self.fd = fd
        self.name = name
        self.truncatable = truncatable
        self.good_bytes = 0  # bytes of complete blocks on disk
        self.closed_by_reader = False

    def write(self, blocks: bytes) -> None:
        """Write complete blocks, or raise CaptureError with the file cut back to good_bytes."""
        if not blocks or self.closed_by_reader:
            return
        view = memoryview(blocks)
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except BrokenPipeError:
            self.closed_by_reader = True  # like tcpdump -w - | head: the reader left
            return
        except OSError as err:
            self._cut_back()
            raise CaptureError(f"{self.name}: {os.strerror(err.errno)}") from None
        self.good_bytes += len(blocks)

    def _cut_back(self) -> None:
        if self.truncatable:
            try:
                os.ftruncate(self.fd, self.good_bytes)
            except OSError:
                pass

    def discard(self) -> None:
        """Close and remove a file this run created, when the capture never started."""
        self.close()
        if self.truncatable:
            os.unlink(self.name)

    def close(self) -> None:
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1


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
    return Sink(fd, path, truncatable=True)


def open_stdout() -> Sink:
    """Standard output for `-w -`, which must not be a terminal."""
    fd = sys.stdout.fileno()
    if os.isatty(fd):
        raise UsageError("standard output is a terminal: not writing pcapng to it (pipe it)")
    return Sink(fd, "standard output", truncatable=False)
