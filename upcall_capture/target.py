"""Finding the ovs-vswitchd to trace, and checking that it has the probe.

The check reads the ELF `.note.stapsdt` section of the process's executable and the
libraries it maps, so a binary built without --enable-usdt-probes gets a clear error
before bcc is ever asked (bcc's own failure is an opaque exception).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from upcall_capture.errors import UsageError

PROBE_PROVIDER = "dpif_recv"
PROBE_NAME = "recv_upcall"
VSWITCHD = "ovs-vswitchd"

_NT_STAPSDT = 3


@dataclass(frozen=True)
class Probe:
    provider: str
    name: str
    args: str  # e.g. "8@%rdx 4@%ecx 8@%rax 4@12(%rbx) 8@576(%rbx) 8@584(%rbx)"


def stapsdt_probes(elf: bytes) -> list[Probe]:
    """The USDT probes described in an ELF image's .note.stapsdt section.

    Handles 64- and 32-bit, little- and big-endian ELF. Anything that is not a
    well-formed ELF yields no probes rather than an exception.
    """
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] not in (1, 2) or elf[5] not in (1, 2):
        return []
    wide = elf[4] == 2
    order = "<" if elf[5] == 1 else ">"
    try:
        if wide:
            shoff, = struct.unpack_from(order + "Q", elf, 0x28)
            shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", elf, 0x3A)
            section = struct.Struct(order + "IIQQQQIIQQ")
        else:
            shoff, = struct.unpack_from(order + "I", elf, 0x20)
            shentsize, shnum, shstrndx = struct.unpack_from(order + "HHH", elf, 0x2E)
            section = struct.Struct(order + "IIIIIIIIII")
        if shentsize < section.size or shstrndx >= shnum:
            return []
        headers = [section.unpack_from(elf, shoff + i * shentsize) for i in range(shnum)]
        strtab = headers[shstrndx]
        names = elf[strtab[4]:strtab[4] + strtab[5]]
        for header in headers:
            name_end = names.find(b"\0", header[0])
            if names[header[0]:name_end] == b".note.stapsdt":
                notes = elf[header[4]:header[4] + header[5]]
                return list(_parse_notes(notes, order, 8 if wide else 4))
    except struct.error:
        return []
    return []


def _parse_notes(notes: bytes, order: str, address_size: int) -> Iterator[Probe]:
    note = struct.Struct(order + "III")
    offset = 0
    while offset + note.size <= len(notes):
        namesz, descsz, kind = note.unpack_from(notes, offset)
        name_start = offset + note.size
        desc_start = name_start + _align4(namesz)
        offset = desc_start + _align4(descsz)
        if offset > len(notes):
            return
        if kind != _NT_STAPSDT or notes[name_start:name_start + namesz] != b"stapsdt\0":
            continue
        # pc, base and semaphore addresses, then provider, name and args strings.
        strings = notes[desc_start + 3 * address_size:desc_start + descsz].split(b"\0")
        if len(strings) >= 3:
            provider, name, args = (s.decode("ascii", "replace") for s in strings[:3])
            yield Probe(provider, name, args)


def _align4(n: int) -> int:
    return (n + 3) & ~3


def is_recv_upcall(probe: Probe) -> bool:
    return probe.provider == PROBE_PROVIDER and probe.name == PROBE_NAME


# ---- processes (reads /proc) ----

@dataclass(frozen=True)
class Process:
    pid: int
    comm: str
    exe: str


def process(pid: int) -> Process:
    """The running process `pid`, or a UsageError that says why not."""
    proc = Path(f"/proc/{pid}")
    try:
        comm = (proc / "comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        raise UsageError(f"no such process: {pid}") from None
    except OSError as err:
        raise UsageError(f"cannot read process {pid}: {err.strerror}") from None
    try:
        exe = os.readlink(proc / "exe")
    except OSError:
        exe = comm
    return Process(pid, comm, exe)


def find_vswitchd() -> Process:
    """The one running ovs-vswitchd; a UsageError listing them if there are none or several."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == VSWITCHD:
                found.append(process(int(entry.name)))
        except (OSError, UsageError):
            continue  # it exited while we looked
    if not found:
        raise UsageError(f"no {VSWITCHD} is running; give its pid with -p")
    if len(found) > 1:
        pids = ", ".join(f"{p.pid} ({p.exe})" for p in sorted(found, key=lambda p: p.pid))
        raise UsageError(f"several {VSWITCHD} processes are running: {pids}; choose one with -p")
    return found[0]


def mapped_objects(pid: int) -> list[str]:
    """The executable and the shared objects the process maps, main program first."""
    paths = [f"/proc/{pid}/exe"]
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return paths
    seen = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and ".so" in fields[5]:
            if fields[5] not in seen:
                seen.add(fields[5])
                paths.append(fields[5])
    return paths


def recv_upcall_sites(pid: int) -> list[Probe]:
    """Every place in the process's objects that fires dpif_recv:recv_upcall, each with
    its own argument locations (bcc attaches to all of them)."""
    return list(filter(is_recv_upcall, usdt_probes(pid)))


def usdt_probes(pid: int) -> list[Probe]:
    """Every USDT probe site in the process's executable and the libraries it maps."""
    sites = []
    for path in mapped_objects(pid):
        try:
            image = Path(path).read_bytes()
        except OSError:
            continue
        sites += stapsdt_probes(image)
    return sites


def check_probe(target: Process) -> None:
    """Raise a UsageError unless the process has dpif_recv:recv_upcall."""
    if recv_upcall_sites(target.pid):
        return
    raise UsageError(
        f"{target.exe} (pid {target.pid}) has no {PROBE_PROVIDER}:{PROBE_NAME} USDT probe: "
        f"it is not an ovs-vswitchd built with --enable-usdt-probes"
    )


def read_cstring(pid: int, address: int, limit: int = 64) -> bytes | None:
    """A NUL-terminated string from the process's memory (faulting pages in as needed),
    or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
            memory.seek(address)
            raw = memory.read(limit)
    except (OSError, OverflowError, ValueError):
        return None
    return raw.split(b"\0", 1)[0]


# Enough for any ovs-vswitchd's read-only data, and bounded for anything else.
PREFAULT_LIMIT = 64 << 20


def prefault_readonly_data(pid: int, limit: int = PREFAULT_LIMIT) -> None:
    """Make the executable's read-only data resident in the traced process.

    A probe reads user memory without faulting pages in: constants the process has not
    touched lately (a dpif name, a canned packet in a test emitter) would read as
    unreadable. Reading them once through /proc/PID/mem faults them in for it.
    """
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) < 6 or fields[5] != exe or not fields[1].startswith("r"):
                    continue
                start, end = (int(bound, 16) for bound in fields[0].split("-"))
                size = min(end - start, limit)
                limit -= size
                memory.seek(start)
                memory.read(size)
                if limit <= 0:
                    return
    except (OSError, ValueError, OverflowError):
        return  # best effort: the probe marks what it still cannot read


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it has exited all the same.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
