"""userspace(...) and the user_action_cookie that vswitchd puts in its userdata."""

from __future__ import annotations

import struct

from upcall_capture.actions.flags import SLOW_PATH_NAMES, flags_text
from upcall_capture.actions.netlink import ANY, U32, Attr, Rule, parse_nested
from upcall_capture.flowkey.layouts import hex_int

PID, USERDATA, EGRESS_TUN_PORT, ACTIONS = 1, 2, 3, 4
POLICY = {PID: Rule(4, 4, optional=False), USERDATA: ANY, EGRESS_TUN_PORT: U32, ACTIONS: ANY}

# struct user_action_cookie (48 bytes, host order): u16 type, u32 ofp_in_port at 4,
# the ofproto UUID at 8, then a union at 24 that the type selects.
COOKIE_SIZE = 48
SFLOW, SLOW_PATH, FLOW_SAMPLE, IPFIX, CONTROLLER = 1, 2, 3, 4, 5
_SAMPLE_DIRECTION = {1: ",ingress", 2: ",egress"}


def _sflow(c: bytes) -> str:
    (tci,) = struct.unpack_from(">H", c, 24)
    (output,) = struct.unpack_from("<I", c, 28)
    return f",sFlow(vid={tci & 0xFFF},pcp={tci >> 13},output={output})"


def _slow_path(c: bytes) -> str:
    (reason,) = struct.unpack_from("<I", c, 28)
    return f",slow_path({flags_text(reason, SLOW_PATH_NAMES, ',')})"


def _flow_sample(c: bytes) -> str:
    (probability,) = struct.unpack_from("<H", c, 24)
    collector, domain, point, port, direction = struct.unpack_from("<IIIII", c, 28)
    return (f",flow_sample(probability={probability},collector_set_id={collector},"
            f"obs_domain_id={domain},obs_point_id={point},output_port={port}"
            f"{_SAMPLE_DIRECTION.get(direction, '')})")


def _ipfix(c: bytes) -> str:
    (port,) = struct.unpack_from("<I", c, 24)
    return f",ipfix(output_port={port})"


def _controller(c: bytes) -> str:
    dont_send, continuation, reason, recirc_id = struct.unpack_from("<BBHI", c, 24)
    (rule_cookie,) = struct.unpack_from(">Q", c, 32)
    controller_id, max_len = struct.unpack_from("<HH", c, 40)
    return (f",controller(reason={reason},dont_send={int(bool(dont_send))},"
            f"continuation={int(bool(continuation))},recirc_id={recirc_id},"
            f"rule_cookie={hex_int(rule_cookie)},controller_id={controller_id},"
            f"max_len={max_len})")


_COOKIES = {SFLOW: _sflow, SLOW_PATH: _slow_path, FLOW_SAMPLE: _flow_sample, IPFIX: _ipfix,
            CONTROLLER: _controller}


def userdata_text(userdata: bytes) -> str:
    """A cookie of a known type as OVS decodes it, else the raw bytes."""
    if len(userdata) == COOKIE_SIZE:
        decode = _COOKIES.get(struct.unpack_from("<H", userdata)[0])
        if decode is not None:
            return decode(userdata)
    return f",userdata({userdata.hex()})"


def userspace_text(data: bytes, attr: Attr) -> str:
    a = parse_nested(data, attr, POLICY)
    if a is None:
        return "userspace(error)"
    (pid,) = struct.unpack("<I", a[PID].payload(data))
    text = f"userspace(pid={pid}"
    if USERDATA in a:
        text += userdata_text(a[USERDATA].payload(data))
    if ACTIONS in a:
        text += ",actions"
    if EGRESS_TUN_PORT in a:
        text += f",tunnel_out_port={struct.unpack('<I', a[EGRESS_TUN_PORT].payload(data))[0]}"
    return text + ")"
