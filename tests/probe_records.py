"""Records as recv_upcall.c submits them, for the tests and the benchmark that feed the
record path (writer, read-back, accounting) without attaching the probe: probe/record.py's
HEADER, then the key, the bytes that lay between key and packet, and the packet."""

from __future__ import annotations

import struct
from dataclasses import replace

import upcalls  # samples/replay/upcalls.py

from upcall_capture.probe.record import HEADER


def probe_record(upcall: upcalls.Upcall, *, ktime_ns: int, pid: int = 42, tid: int = 43,
                 cpu: int = 0, thread: str = "handler1", snaplen: int | None = None,
                 gap: bytes = b"") -> bytes:
    """What the probe submits for `upcall` in a handler thread: the packet cut to snaplen;
    with `gap` between key and packet, as when it read both at once from OVS's message."""
    key, packet = upcall.key, upcall.packet[:snaplen]
    return HEADER.pack(ktime_ns, len(key), pid, tid, cpu, upcall.type, len(upcall.packet),
                       len(packet), len(key), len(key) + len(gap), 0, thread.encode(),
                       upcall.dpif.encode()) + key + gap + packet


def storm(sent: list[upcalls.Upcall], count: int, *, unique: bool) -> list[bytes]:
    """The records of `count` fires of the replay over `sent`; with `unique`, every key
    made new as `upcall-replay -u` does (in the key and the packet alike). One handler
    thread, which moves to the other CPU every 500 upcalls."""
    out = []
    for index in range(count):
        upcall = sent[index % len(sent)]
        if unique and upcall.key_uniq_off >= 0:
            key, packet = bytearray(upcall.key), bytearray(upcall.packet)
            value = struct.pack(">I", 0x0A000000 + index)
            key[upcall.key_uniq_off:upcall.key_uniq_off + 4] = value
            packet[upcall.pkt_uniq_off:upcall.pkt_uniq_off + 4] = value
            upcall = replace(upcall, key=bytes(key), packet=bytes(packet))
        out.append(probe_record(upcall, ktime_ns=10**12 + index * 5000, pid=4242, tid=4243,
                                cpu=index // 500 % 2))
    return out
