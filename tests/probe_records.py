"""Records as recv_upcall.c submits them, for the tests and the benchmark that feed the
record path (writer, read-back, accounting) without attaching the probe: probe/record.py's
HEADER, then the key, the bytes that lay between key and packet, and the packet."""

from __future__ import annotations

import struct
from dataclasses import replace

import upcalls  # samples/replay/upcalls.py

from upcall_capture.probe.ops_record import ATTR_TYPES, MESSAGE_SIZE, OP_EXECUTE, OP_HEAD, OP_PUT
from upcall_capture.probe.record import HEADER

OUTPUT_1 = struct.pack("<HHI", 8, 1, 1)  # the actions list output:1


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


# ---- flow_ops.c's events: a handler's flow puts and executes, as netlink requests ----

def nla(kind: int, payload: bytes) -> bytes:
    return struct.pack("<HH", 4 + len(payload), kind) + payload + bytes(-len(payload) % 4)


def _request(family: int, cmd: int, attributes: bytes) -> bytes:
    """nlmsghdr, genlmsghdr and ovs_header (dp_ifindex 7), then the attributes; nlmsg_len
    0, as OVS leaves it until the message is sent."""
    body = struct.pack("<BBH i", cmd, 1, 0, 7) + attributes
    return struct.pack("<IHHII", 0, family, 1, 0, 0) + body


def attribute_spans(message: bytes) -> bytes:
    """The head's table of where each top-level attribute's payload is, as flow_ops.c
    finds them: (offset, length) by type, offset 0 for one absent."""
    spans = [0] * (2 * ATTR_TYPES)
    at = MESSAGE_SIZE
    while at + 4 <= len(message):
        length, kind = struct.unpack_from("<HH", message, at)
        if length < 4 or at + length > len(message):
            break
        if kind & 0x3FFF < ATTR_TYPES:
            spans[2 * (kind & 0x3FFF):2 * (kind & 0x3FFF) + 2] = at + 4, length - 4
        at += (length + 3) & ~3
    return struct.pack(f"<{2 * ATTR_TYPES}H", *spans)


def op_event(kind: int, message: bytes, *, ktime_ns: int, tid: int = 43) -> bytes:
    return OP_HEAD.pack(ktime_ns, 42, tid, kind, len(message), len(message), 0) + \
        attribute_spans(message) + message


def put_event(key: bytes, mask: bytes, *, ktime_ns: int, tid: int = 43,
              ufid: bytes = bytes(16), actions: bytes = OUTPUT_1) -> bytes:
    """An op_flow_put: OVS_FLOW_CMD_NEW with ufid, key, mask and actions."""
    return op_event(OP_PUT, _request(0x1D, 1, nla(9, ufid) + nla(1, key) + nla(7, mask)
                                     + nla(2, actions)), ktime_ns=ktime_ns, tid=tid)


def execute_event(packet: bytes, *, ktime_ns: int, tid: int = 43,
                  actions: bytes = OUTPUT_1) -> bytes:
    """An op_flow_execute: OVS_PACKET_CMD_EXECUTE with packet, metadata key, actions."""
    metadata = nla(2, struct.pack("<I", 0)) + nla(3, struct.pack("<I", 1))
    return op_event(OP_EXECUTE, _request(0x1F, 3, nla(1, packet) + nla(2, metadata)
                                         + nla(3, actions)), ktime_ns=ktime_ns, tid=tid)
