"""flow_ops.c's events: the netlink requests of a handler's flow puts and executes.

Pure. An event is a fixed head (struct op_event) and the first bytes of the request the
handler sent to the kernel: a netlink header, a generic netlink header, struct ovs_header,
then the attributes of OVS_FLOW_CMD_NEW/SET (include/linux/openvswitch.h: key, mask,
actions, ufid) or of OVS_PACKET_CMD_EXECUTE (packet, metadata key, actions).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# struct op_event's head in flow_ops.c.
OP_HEAD = struct.Struct("<QIIIIII")
_HEAD = OP_HEAD.size
OP_PUT, OP_EXECUTE = 1, 2
F_REQUEST_UNREADABLE = 1
# nlmsghdr (16), genlmsghdr (4), ovs_header (4).
_MESSAGE = struct.Struct("<IHHII BBH i")
_NLA = struct.Struct("<HH")
_CMD_AT = 16  # genlmsghdr.cmd, after the nlmsghdr
_NLA_TYPE_MASK = 0x3FFF
# OVS_FLOW_CMD_* and OVS_FLOW_ATTR_*.
FLOW_CMD_NEW, FLOW_CMD_SET = 1, 4
_FLOW_KEY, _FLOW_ACTIONS, _FLOW_MASK, _FLOW_UFID = 1, 2, 7, 9
# OVS_PACKET_CMD_EXECUTE and OVS_PACKET_ATTR_*.
PACKET_CMD_EXECUTE = 3
_PACKET_PACKET, _PACKET_KEY, _PACKET_ACTIONS = 1, 2, 3


class FlowOp(NamedTuple):  # a tuple: one is made per put and execute
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


def attributes(data: bytes, start: int, end: int) -> dict[int, bytes]:
    """Top-level netlink attributes of data[start:end], by type; a cut-off one is left
    out."""
    found = {}
    at = start
    unpack = _NLA.unpack_from
    while at + 4 <= end:
        length, kind = unpack(data, at)
        if length < 4 or at + length > end:
            break
        found[kind & _NLA_TYPE_MASK] = data[at + 4:at + length]
        at += (length + 3) & ~3
    return found


def parse_op(raw: bytes | memoryview) -> FlowOp:
    """One event. An incomplete one (complete=False) cannot be tied to an upcall. This
    runs for every put and execute: plain bytes and one walk of the attributes."""
    raw = bytes(raw)
    ktime, pid, tid, kind, size, length, flags = OP_HEAD.unpack_from(raw)
    if flags & F_REQUEST_UNREADABLE or length < _MESSAGE.size:
        return FlowOp(ktime, pid, tid, kind, False)
    # The ofpbuf's size is the message's: its nlmsg_len is set only when it is sent.
    cmd = raw[_HEAD + _CMD_AT]
    found = attributes(raw, _HEAD + _MESSAGE.size, _HEAD + length)
    complete = length == size
    get = found.get
    if kind == OP_PUT:
        return FlowOp(ktime, pid, tid, kind, complete, get(_FLOW_KEY), get(_FLOW_MASK),
                      get(_FLOW_ACTIONS), get(_FLOW_UFID), cmd != FLOW_CMD_SET)
    packet = get(_PACKET_PACKET)
    return FlowOp(ktime, pid, tid, kind, complete and cmd == PACKET_CMD_EXECUTE,
                  get(_PACKET_KEY), None, get(_PACKET_ACTIONS), None, True, packet,
                  0 if packet is None else len(packet))
