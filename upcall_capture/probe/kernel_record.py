"""The kernel side's events (dp_upcall.c), and the upcall records made of them.

Pure. An ENQUEUE event is the datapath queueing an upcall (ovs_dp_upcall()); a FAILED
event is one that was never delivered. A failed upcall becomes an upcall record of the
same layout as recv_upcall's (record.py), so that the merge, the filters, the workers,
the pcapng writer and the statistics take it as they take any other:
- flags F_FAILED | F_KERNEL, and the ENQUEUE trailer after the packet (errno, portid,
  device, MRU);
- its key is what the tracepoint says of the flow key, as netlink attributes: recirc_id,
  in_port (the device's datapath port, when the port table names it), ct_state and
  eth_type. It is not a full key, and the comment says so;
- dpif `system@<datapath>`: the kernel datapath's type is always "system";
- no pid, tid or thread: no handler ever had it.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from upcall_capture.probe.record import (
    F_FAILED,
    F_KERNEL,
    HEADER,
    Enqueue,
    cstring,
    pack_enqueue,
)

# struct event_head in dp_upcall.c (padded to its u64 alignment), then pkt_len bytes of
# packet.
EVENT_HEAD = struct.Struct("<QIiIIIIIHBBH2x16s16s4x")
EV_ENQUEUE, EV_FAILED = 1, 2
MATCH_BYTES = 64  # of the packet, in an ENQUEUE event
# OVS_PACKET_CMD_* (the tracepoint's upcall_cmd) to the USDT probe's dpif_upcall_type.
CMD_TO_TYPE = {1: 0, 2: 1}

# Why queue_userspace_packet() and its callers fail (net/openvswitch/datapath.c).
ERRNO_REASONS = {
    errno.EAGAIN: "handler socket full",
    errno.ENOBUFS: "handler socket full",
    errno.ENOTCONN: "no handler socket",
    errno.ECONNREFUSED: "handler socket gone",
    errno.E2BIG: "upcall too large",
    errno.EMSGSIZE: "upcall too large",
    errno.ENOMEM: "out of memory",
    errno.EINVAL: "invalid packet",
    errno.ENODEV: "datapath gone",
}

# OVS_KEY_ATTR_* of the attributes a failed upcall's key holds.
_RECIRC_ID, _IN_PORT, _CT_STATE, _ETHERTYPE = 20, 3, 22, 6
_NLA = struct.Struct("<HH")


@dataclass(frozen=True, slots=True)
class KernelEvent:
    ktime_ns: int
    kind: int
    result: int
    cpu: int
    portid: int
    pkt_size: int
    recirc_id: int
    eth_type: int
    ct_state: int
    cmd: int
    mru: int
    datapath: str
    device: str
    packet: bytes

    @property
    def dpif(self) -> str:
        return f"system@{self.datapath}"

    @property
    def upcall_type(self) -> int:
        return CMD_TO_TYPE.get(self.cmd, self.cmd)


def parse_event(raw: bytes | memoryview) -> KernelEvent:
    (ktime, kind, result, cpu, portid, pkt_size, pkt_len, recirc_id, eth_type_be, ct_state,
     cmd, mru, datapath, device) = EVENT_HEAD.unpack_from(raw)
    start = EVENT_HEAD.size
    return KernelEvent(
        ktime, kind, result, cpu, portid, pkt_size, recirc_id,
        int.from_bytes(eth_type_be.to_bytes(2, "little"), "big"), ct_state, cmd, mru,
        cstring(datapath), cstring(device), bytes(raw[start:start + pkt_len]))


def errno_text(result: int) -> str:
    """-11 -> 'EAGAIN (handler socket full)'."""
    code = -result
    name = errno.errorcode.get(code, f"error {code}")
    reason = ERRNO_REASONS.get(code)
    return f"{name} ({reason})" if reason else name


def errno_number(name: str) -> int | None:
    """'EAGAIN' (any case) -> 11, or None for a name that is not an errno."""
    code = getattr(errno, name.upper(), None)
    return code if isinstance(code, int) and name.upper().startswith("E") else None


def _attribute(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def tracepoint_key(event: KernelEvent, in_port: int | None) -> bytes:
    """What the tracepoint says of the flow key, as netlink key attributes, in the order
    OVS's keys have them."""
    parts = [_attribute(_RECIRC_ID, struct.pack("<I", event.recirc_id))]
    if in_port is not None:
        parts.append(_attribute(_IN_PORT, struct.pack("<I", in_port)))
    if event.ct_state:
        parts.append(_attribute(_CT_STATE, struct.pack("<I", event.ct_state)))
    parts.append(_attribute(_ETHERTYPE, event.eth_type.to_bytes(2, "big")))
    return b"".join(parts)


def failed_record(event: KernelEvent, in_port: int | None) -> bytes:
    """The upcall record of a FAILED event (see the module's docstring)."""
    key = tracepoint_key(event, in_port)
    head = HEADER.pack(
        event.ktime_ns, len(key), 0, 0, event.cpu, event.upcall_type, event.pkt_size,
        len(event.packet), len(key), len(key), F_FAILED | F_KERNEL, b"",
        event.dpif.encode()[:63])
    trailer = pack_enqueue(Enqueue(queued_ns=None, result=event.result, portid=event.portid,
                                   device=event.device, mru=event.mru))
    return b"".join((head, key, event.packet, trailer))


_MATCHED = MATCH_BYTES - 4  # bytes of an untagged frame that the match compares
_L4_CHECKSUM_AT = {6: 16, 17: 6}  # TCP, UDP: where the checksum is in the L4 header


_TAGS = (b"\x81\x00", b"\x88\xa8")


def match_key(upcall_type: int, packet: bytes | memoryview) -> tuple[int, bytes]:
    """What an upcall's two sides both know of it: its type and the first bytes of its
    packet, with two differences taken out:
    - an 802.1Q/802.1ad tag: the kernel's skb may hold the tag apart from the data, where
      userspace is given it inline;
    - the TCP or UDP checksum over IPv4: a locally sent packet's is only partial at the
      tracepoint, and queue_userspace_packet() completes it before the copy to userspace.
      (Over IPv6 it lies past the bytes compared.)"""
    compared = bytes(packet[:MATCH_BYTES])
    if compared[12:14] in _TAGS:
        compared = compared[:12] + compared[16:]
    compared = compared[:_MATCHED]
    if compared[12:14] == b"\x08\x00" and len(compared) >= 24 and \
            compared[23] in _L4_CHECKSUM_AT:
        at = 14 + (compared[14] & 15) * 4 + _L4_CHECKSUM_AT[compared[23]]
        if at < _MATCHED:
            compared = compared[:at] + b"\0\0"[:_MATCHED - at] + compared[at + 2:]
    return upcall_type, compared
