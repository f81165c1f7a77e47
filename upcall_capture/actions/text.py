"""Action lists to text: format_odp_actions() and format_odp_action() of OVS 3.1."""

from __future__ import annotations

import struct
from collections.abc import Callable

from upcall_capture.actions import masked
from upcall_capture.actions.conntrack import ct_text
from upcall_capture.actions.netlink import Attr, Rule, header_at, parse_nested, read, walk
from upcall_capture.actions.nsh import push_nsh_text, set_nsh_text
from upcall_capture.actions.tnl_push import tnl_push_text
from upcall_capture.actions.userspace import userspace_text
from upcall_capture.flowkey import format_key
from upcall_capture.flowkey.layouts import hex_int

VARIABLE = -2

# OVS_ACTION_ATTR_* of OVS 3.1's userspace header: OVS's numbering from 23 on
# (tunnel_push, tunnel_pop, drop, lb_output) is not the kernel's.
(OUTPUT, USERSPACE, SET, PUSH_VLAN, POP_VLAN, SAMPLE, RECIRC, HASH, PUSH_MPLS, POP_MPLS,
 SET_MASKED, CT, TRUNC, PUSH_ETH, POP_ETH, CT_CLEAR, PUSH_NSH, POP_NSH, METER, CLONE,
 CHECK_PKT_LEN, ADD_MPLS, TUNNEL_PUSH, TUNNEL_POP, DROP, LB_OUTPUT) = range(1, 27)

Formatter = Callable[[bytes, Attr], str]


def _u32(data: bytes, a: Attr) -> int:
    return struct.unpack("<I", a.payload(data)[:4])[0]


def _be(data: bytes, a: Attr, start: int, end: int) -> int:
    return int.from_bytes(a.payload(data)[start:end], "big")


def list_text(data: bytes, start: int, length: int) -> str:
    """format_odp_actions() of the `length` bytes at `start`."""
    if not length:
        return "drop"
    found, stop, left = walk(data, start, length)
    text = ",".join(action_text(data, a) for a in found)
    if left:
        if left == length:
            text += "<empty>"
        text += f",***{left} leftover bytes*** ({read(data, stop, left).hex()})"
    return text


def generic_text(data: bytes, a: Attr) -> str:
    payload = a.payload(data)
    return f"action{a.type}" + (f"({payload.hex(' ')})" if payload else "")


def _set(data: bytes, a: Attr) -> str:
    # The payload is one key attribute; OVS trusts its length.
    nla_len, _ = header_at(data, a.offset)
    return f"set({format_key(read(data, a.offset, max(nla_len, 4)))})"


def _set_masked(data: bytes, a: Attr) -> str:
    nla_len, key_type = header_at(data, a.offset)
    inner = Attr(key_type, a.offset + 4, max(nla_len - 4, 0))
    if key_type == masked.NSH:
        return set_nsh_text(data, inner)
    payload = inner.payload(data)
    size = inner.size // 2
    if size <= 40:  # sizeof(struct ovs_key_ipv6): bigger keys (tunnel) print unmasked
        text = masked.key_attr_text(key_type, payload[:size], payload[size : 2 * size])
    else:
        text = masked.key_attr_text(key_type, payload, None)
    return f"set({text})"


def _hash(data: bytes, a: Attr) -> str:
    algorithm, basis = struct.unpack("<II", a.payload(data))
    names = {0: "l4", 1: "sym_l4"}
    inner = (f"{names[algorithm]}({basis})" if algorithm in names
             else f"Unknown hash algorithm({algorithm})")
    return f"hash({inner})"


def _push_vlan(data: bytes, a: Attr) -> str:
    tpid, tci = _be(data, a, 0, 2), _be(data, a, 2, 4)
    prefix = "" if tpid == 0x8100 else f"tpid=0x{tpid:04x},"
    return f"push_vlan({prefix}{masked.vlan_tci_text(tci)})"


def _mpls(name: str) -> Formatter:
    return lambda data, a: (f"{name}({masked.mpls_lse_text(_be(data, a, 0, 4))},"
                            f"eth_type=0x{_be(data, a, 4, 6):x})")


def _push_eth(data: bytes, a: Attr) -> str:
    payload = a.payload(data)
    return f"push_eth(src={payload[:6].hex(':')},dst={payload[6:12].hex(':')})"


def _sample(data: bytes, a: Attr) -> str:
    p = parse_nested(data, a, {1: Rule(4, 4, optional=False), 2: Rule(optional=False)})
    if p is None:
        return "sample(error)"
    percentage = 100.0 * _u32(data, p[1]) / 0xFFFFFFFF
    return (f"sample(sample={percentage:.1f}%,actions("
            f"{list_text(data, p[2].offset, p[2].size)}))")


def _check_pkt_len(data: bytes, a: Attr) -> str:
    nested = Rule(optional=False)
    p = parse_nested(data, a, {1: Rule(2, 2, optional=False), 2: nested, 3: nested})
    if p is None:
        return "check_pkt_len(error)"
    size = struct.unpack("<H", p[1].payload(data))[0]
    return (f"check_pkt_len(size={size},gt({list_text(data, p[2].offset, p[2].size)}),"
            f"le({list_text(data, p[3].offset, p[3].size)}))")


def _fixed(text: str) -> Formatter:
    return lambda data, a: text


# type: (expected payload length or VARIABLE, formatter)
ACTIONS: dict[int, tuple[int, Formatter]] = {
    OUTPUT: (4, lambda d, a: str(_u32(d, a))),
    USERSPACE: (VARIABLE, userspace_text),
    SET: (VARIABLE, _set),
    PUSH_VLAN: (4, _push_vlan),
    POP_VLAN: (0, _fixed("pop_vlan")),
    SAMPLE: (VARIABLE, _sample),
    RECIRC: (4, lambda d, a: f"recirc({hex_int(_u32(d, a))})"),
    HASH: (8, _hash),
    PUSH_MPLS: (8, _mpls("push_mpls")),
    POP_MPLS: (2, lambda d, a: f"pop_mpls(eth_type=0x{_be(d, a, 0, 2):x})"),
    SET_MASKED: (VARIABLE, _set_masked),
    CT: (VARIABLE, ct_text),
    TRUNC: (4, lambda d, a: f"trunc({_u32(d, a)})"),
    PUSH_ETH: (12, _push_eth),
    POP_ETH: (0, _fixed("pop_eth")),
    CT_CLEAR: (0, _fixed("ct_clear")),
    PUSH_NSH: (VARIABLE, push_nsh_text),
    POP_NSH: (0, _fixed("pop_nsh()")),
    METER: (4, lambda d, a: f"meter({_u32(d, a)})"),
    CLONE: (VARIABLE, lambda d, a: f"clone({list_text(d, a.offset, a.size)})"),
    CHECK_PKT_LEN: (VARIABLE, _check_pkt_len),
    ADD_MPLS: (8, _mpls("add_mpls")),
    TUNNEL_PUSH: (VARIABLE, tnl_push_text),
    TUNNEL_POP: (4, lambda d, a: f"tnl_pop({_u32(d, a)})"),
    DROP: (4, _fixed("drop")),  # OVS does not print the xlate error code
    LB_OUTPUT: (4, lambda d, a: f"lb_output({_u32(d, a)})"),
}


def action_text(data: bytes, a: Attr) -> str:
    expected, formatter = ACTIONS.get(a.type, (-1, generic_text))
    if expected != VARIABLE and a.size != expected:
        return f"bad length {a.size}, expected {expected} for: {generic_text(data, a)}"
    return formatter(data, a)
