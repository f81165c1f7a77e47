"""flow_ops.c's events: the netlink requests of a handler's flow puts and executes.

Pure. An event is a fixed head (struct op_event) and the first bytes of the request the
handler sent to the kernel: a netlink header, a generic netlink header, struct ovs_header,
then the attributes of OVS_FLOW_CMD_NEW/SET (include/linux/openvswitch.h: key, mask,
actions, ufid) or of OVS_PACKET_CMD_EXECUTE (packet, metadata key, actions). The head
says where each top-level attribute's payload is (flow_ops.c walks them).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# struct op_event's head in flow_ops.c: numbers, then ATTR_TYPES attribute spans.
OP_HEAD = struct.Struct("<QIIIIII")
ATTR_TYPES = 10
_HEAD = OP_HEAD.size + 2 * 2 * ATTR_TYPES  # u16 (at, len) by type; at 0: absent
OP_PUT, OP_EXECUTE = 1, 2
F_REQUEST_UNREADABLE = 1
# nlmsghdr (16), genlmsghdr (4), ovs_header (4).
MESSAGE_SIZE = 24
_CMD_AT = 16  # genlmsghdr.cmd, after the nlmsghdr
# OVS_FLOW_CMD_* and OVS_FLOW_ATTR_*.
FLOW_CMD_NEW, FLOW_CMD_SET = 1, 4
_FLOW_KEY, _FLOW_ACTIONS, _FLOW_MASK, _FLOW_UFID = 1, 2, 7, 9
# OVS_PACKET_CMD_EXECUTE and OVS_PACKET_ATTR_*.
PACKET_CMD_EXECUTE = 3
_PACKET_PACKET, _PACKET_KEY, _PACKET_ACTIONS = 1, 2, 3
# The spans a put and an execute use, from the attribute table: (at, len) of each type.
_PUT_SPANS = struct.Struct(f"<{4 * _FLOW_KEY}x 4H {4 * (_FLOW_MASK - _FLOW_ACTIONS - 1)}x"
                           f" 2H {4 * (_FLOW_UFID - _FLOW_MASK - 1)}x 2H")
_EXECUTE_SPANS = struct.Struct(f"<{4 * _PACKET_PACKET}x 6H")


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


def parse_op(raw: bytes | memoryview) -> FlowOp:
    """One event. An incomplete one (complete=False) cannot be tied to an upcall. This
    runs for every put and execute: one copy and a few slices."""
    raw = bytes(raw)
    ktime, pid, tid, kind, size, length, flags = OP_HEAD.unpack_from(raw)
    if flags & F_REQUEST_UNREADABLE or length < MESSAGE_SIZE:
        return FlowOp(ktime, pid, tid, kind, False)
    # The ofpbuf's size is the message's: its nlmsg_len is set only when it is sent.
    cmd = raw[_HEAD + _CMD_AT]
    complete = length == size
    if kind == OP_PUT:
        key_at, key_len, actions_at, actions_len, mask_at, mask_len, ufid_at, ufid_len = \
            _PUT_SPANS.unpack_from(raw, OP_HEAD.size)
        return FlowOp(ktime, pid, tid, kind, complete, _payload(raw, key_at, key_len),
                      _payload(raw, mask_at, mask_len), _payload(raw, actions_at, actions_len),
                      _payload(raw, ufid_at, ufid_len), cmd != FLOW_CMD_SET)
    packet_at, packet_len, key_at, key_len, actions_at, actions_len = \
        _EXECUTE_SPANS.unpack_from(raw, OP_HEAD.size)
    return FlowOp(ktime, pid, tid, kind, complete and cmd == PACKET_CMD_EXECUTE,
                  _payload(raw, key_at, key_len), None, _payload(raw, actions_at, actions_len),
                  None, True, _payload(raw, packet_at, packet_len),
                  packet_len if packet_at else 0)


def _payload(raw: bytes, at: int, length: int) -> bytes | None:
    """An attribute's payload, by its span in the event's head (at 0: absent)."""
    return raw[_HEAD + at:_HEAD + at + length] if at else None
