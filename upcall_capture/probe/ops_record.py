"""flow_ops.c's events: the netlink requests of a handler's flow puts and executes.

Pure. An event is a fixed head (struct op_event) and the first bytes of the request the
handler sent to the kernel: a netlink header, a generic netlink header, struct ovs_header,
then the attributes of OVS_FLOW_CMD_NEW/SET (include/linux/openvswitch.h: key, mask,
actions, ufid) or of OVS_PACKET_CMD_EXECUTE (packet, metadata key, actions).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# struct op_event's head in flow_ops.c.
OP_HEAD = struct.Struct("<QIIIIII")
OP_PUT, OP_EXECUTE = 1, 2
F_REQUEST_UNREADABLE = 1
# nlmsghdr (16), genlmsghdr (4), ovs_header (4).
_MESSAGE = struct.Struct("<IHHII BBH i")
_NLA = struct.Struct("<HH")
_NLA_TYPE_MASK = 0x3FFF
# OVS_FLOW_CMD_* and OVS_FLOW_ATTR_*.
FLOW_CMD_NEW, FLOW_CMD_SET = 1, 4
_FLOW_KEY, _FLOW_ACTIONS, _FLOW_MASK, _FLOW_UFID = 1, 2, 7, 10
# OVS_PACKET_CMD_EXECUTE and OVS_PACKET_ATTR_*.
PACKET_CMD_EXECUTE = 3
_PACKET_PACKET, _PACKET_KEY, _PACKET_ACTIONS = 1, 2, 3


@dataclass(frozen=True, slots=True)
class FlowOp:
    """A flow put or an execute, as the request to the kernel says it."""

    ktime_ns: int
    pid: int
    tid: int
    kind: int  # OP_PUT or OP_EXECUTE
    complete: bool  # False: the request could not be read whole (too large, unreadable)
    key: bytes | None = None  # a put's flow key; an execute's metadata key
    mask: bytes | None = None  # a put's
    actions: bytes | None = None
    ufid: bytes | None = None  # a put's, 16 bytes as OVS holds them
    create: bool = True  # a put: OVS_FLOW_CMD_NEW (not SET, a modify)
    packet: bytes | None = None  # an execute's
    pkt_size: int = 0  # an execute's packet length, from its attribute


def attributes(data: bytes | memoryview, start: int) -> dict[int, memoryview]:
    """Top-level netlink attributes from `start`, by type; a cut-off one is left out."""
    view = memoryview(data)
    found = {}
    at = start
    while at + 4 <= len(view):
        length, kind = _NLA.unpack_from(view, at)
        if length < 4 or at + length > len(view):
            break
        found[kind & _NLA_TYPE_MASK] = view[at + 4:at + length]
        at += (length + 3) & ~3
    return found


def _bytes(value: memoryview | None) -> bytes | None:
    return None if value is None else bytes(value)


def parse_op(raw: bytes | memoryview) -> FlowOp:
    """One event. An incomplete one (complete=False) cannot be tied to an upcall."""
    ktime, pid, tid, kind, size, length, flags = OP_HEAD.unpack_from(raw)
    data = memoryview(raw)[OP_HEAD.size:OP_HEAD.size + length]
    if flags & F_REQUEST_UNREADABLE or length < _MESSAGE.size:
        return FlowOp(ktime, pid, tid, kind, complete=False)
    message_len, *_, cmd, _, _, _ = _MESSAGE.unpack_from(data)
    found = attributes(data[:message_len], _MESSAGE.size)
    complete = length == size
    if kind == OP_PUT:
        return FlowOp(ktime, pid, tid, kind, complete, key=_bytes(found.get(_FLOW_KEY)),
                      mask=_bytes(found.get(_FLOW_MASK)),
                      actions=_bytes(found.get(_FLOW_ACTIONS)),
                      ufid=_bytes(found.get(_FLOW_UFID)), create=cmd != FLOW_CMD_SET)
    packet = found.get(_PACKET_PACKET)
    return FlowOp(ktime, pid, tid, kind, complete and cmd == PACKET_CMD_EXECUTE,
                  key=_bytes(found.get(_PACKET_KEY)), actions=_bytes(found.get(_PACKET_ACTIONS)),
                  packet=_bytes(packet), pkt_size=0 if packet is None else len(packet))
