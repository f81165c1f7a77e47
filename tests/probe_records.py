"""Records as recv_upcall.c submits them, for the tests and the benchmark that feed the
record path (writer, read-back, accounting) without attaching the probe: probe/record.py's
HEADER, then the key, the bytes that lay between key and packet, and the packet."""

from __future__ import annotations

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
