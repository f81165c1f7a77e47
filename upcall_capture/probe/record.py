"""The probe's record layout, and merging the per-CPU streams into probe-time order.

One struct format mirrors `struct upcall_record` in recv_upcall.c. Records are decoded
here rather than by bcc: bcc 0.26's automatic event decoding rejects byte arrays, and
one `unpack_from` per record is faster anyway.
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass

# ktime_ns, key_size, pid, tid, cpu, type, pkt_size, pkt_len, key_len, flags, comm, dpif
HEADER = struct.Struct("<QQIIIIIIII16s64s")
HEADER_SIZE = HEADER.size  # offsetof(struct upcall_record, data)
KTIME = struct.Struct("<Q")

UPCALL_TYPES = {0: "miss", 1: "action"}

# Record flags (F_* in recv_upcall.c): what the probe could not read.
F_ARG_UNREADABLE = 1
F_DPIF_UNREADABLE = 2
F_KEY_UNREADABLE = 4
F_PKT_UNREADABLE = 8
FLAG_NAMES = {
    F_ARG_UNREADABLE: "probe arguments unreadable",
    F_DPIF_UNREADABLE: "dpif name unreadable",
    F_KEY_UNREADABLE: "key unreadable",
    F_PKT_UNREADABLE: "packet unreadable",
}

# Caps the BPF program is compiled with. The per-CPU record buffer must fit in one
# per-CPU map value (32 KiB), which bounds snaplen + key cap.
DEFAULT_SNAPLEN = 9216  # a 9000-byte jumbo frame and its headers
MAX_SNAPLEN = 16384
DEFAULT_KEY_CAP = 1024  # OVS's own ODPUTIL_FLOW_KEY_BYTES is 640
MIN_KEY_CAP = 640
MAX_KEY_CAP = 2048


@dataclass(frozen=True, slots=True)
class Upcall:
    """One upcall as the probe saw it."""

    ktime_ns: int
    pid: int
    tid: int
    cpu: int
    type: int
    dpif: str
    thread: str
    flags: int
    key: bytes
    key_size: int  # real length; len(key) is what was captured
    packet: bytes
    pkt_size: int  # real length; len(packet) is what was captured

    @property
    def type_name(self) -> str:
        return UPCALL_TYPES.get(self.type, str(self.type))


def cstring(raw: bytes) -> str:
    """A NUL-terminated C string as text; bytes that are not UTF-8 are escaped."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def parse(record: bytes) -> Upcall:
    """Decode one raw record into an Upcall (the slow, readable path)."""
    (ktime, key_size, pid, tid, cpu, type_, pkt_size, pkt_len, key_len, flags,
     comm, dpif) = HEADER.unpack_from(record)
    key_end = HEADER_SIZE + key_len
    return Upcall(
        ktime_ns=ktime, pid=pid, tid=tid, cpu=cpu, type=type_,
        dpif=cstring(dpif), thread=cstring(comm), flags=flags,
        key=record[HEADER_SIZE:key_end], key_size=key_size,
        packet=record[key_end:key_end + pkt_len], pkt_size=pkt_size,
    )


def ktime(record: bytes) -> int:
    return KTIME.unpack_from(record)[0]


class TimeMerger:
    """Puts records from the per-CPU rings back into probe-time order.

    A handler thread moves between CPUs, so its records land on different rings. After
    all rings have been drained, every record fired before the drain began is in hand
    (give or take one still being written on another CPU, hence the slack). Records
    up to that horizon are released in time order; later ones wait for the next drain.
    """

    def __init__(self, slack_ns: int = 2_000_000) -> None:
        self.slack_ns = slack_ns
        self._held: list[bytes] = []

    def add(self, records: list[bytes]) -> None:
        self._held.extend(records)

    def release(self, drain_start_ns: int) -> list[bytes]:
        """Records fired before drain_start_ns - slack, in time order."""
        held = self._held
        if not held:
            return []
        held.sort(key=ktime)
        horizon = drain_start_ns - self.slack_ns
        cut = bisect.bisect_left(held, horizon, key=ktime)
        ready, self._held = held[:cut], held[cut:]
        return ready

    def release_all(self) -> list[bytes]:
        held, self._held = sorted(self._held, key=ktime), []
        return held
