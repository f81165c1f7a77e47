"""ct(...) and its nat(...) (format_odp_conntrack_action, format_odp_ct_nat)."""

from __future__ import annotations

import socket
import struct

from upcall_capture.actions.netlink import ANY, FLAG, U16, Attr, Rule, c_string, parse_nested
from upcall_capture.flowkey.layouts import hex_int

COMMIT, ZONE, MARK, LABELS, HELPER, NAT, FORCE_COMMIT, TIMEOUT = 1, 2, 3, 4, 5, 6, 7, 9
CT_POLICY = {
    COMMIT: FLAG, ZONE: U16, MARK: Rule(min_len=8), LABELS: Rule(min_len=32),
    HELPER: Rule(1, 16, string=True), NAT: ANY, FORCE_COMMIT: FLAG,
    TIMEOUT: Rule(1, 32, string=True),
}

SRC, DST, IP_MIN, IP_MAX, PROTO_MIN, PROTO_MAX, PERSISTENT, HASH, RANDOM = range(1, 10)
_ADDRESS = Rule(4, 16)
NAT_POLICY = {SRC: FLAG, DST: FLAG, IP_MIN: _ADDRESS, IP_MAX: _ADDRESS, PROTO_MIN: U16,
              PROTO_MAX: U16, PERSISTENT: FLAG, HASH: FLAG, RANDOM: FLAG}
_NAT_FLAGS = ((PERSISTENT, "persistent"), (HASH, "hash"), (RANDOM, "random"))


def _u16(data: bytes, attr: Attr | None) -> int:
    return struct.unpack("<H", attr.payload(data)[:2])[0] if attr else 0


def _nat_error(a: dict[int, Attr]) -> str | None:
    """OVS's checks, in its order; the text inside nat(...)."""
    if SRC not in a and DST not in a and a.keys() & {IP_MIN, IP_MAX, PROTO_MIN, PROTO_MAX,
                                                   PERSISTENT, HASH, RANDOM}:
        return 'error: options allowed only with "src" or "dst"'
    if SRC in a and DST in a:
        return 'error: Only one of "src" or "dst" may be present.'
    if IP_MIN not in a and PROTO_MIN in a:
        return "error: proto but no IP."
    if (IP_MIN not in a and IP_MAX in a) or (PROTO_MIN not in a and PROTO_MAX in a):
        return "error: range max without min."
    if IP_MIN in a and (a[IP_MIN].size not in (4, 16)
                        or (IP_MAX in a and a[IP_MAX].size != a[IP_MIN].size)):
        return "error: IP address sizes do not match"
    return None


def nat_text(data: bytes, attr: Attr) -> str:
    a = parse_nested(data, attr, NAT_POLICY)
    if a is None:
        return "nat(error: nl_parse_nested() failed.)"
    error = _nat_error(a)
    if error is not None:
        return f"nat({error})"
    addr_len = a[IP_MIN].size if IP_MIN in a else 0
    ip_min = a[IP_MIN].payload(data) if IP_MIN in a else bytes(addr_len)
    ip_max = a[IP_MAX].payload(data) if IP_MAX in a else bytes(addr_len)
    proto_min, proto_max = _u16(data, a.get(PROTO_MIN)), _u16(data, a.get(PROTO_MAX))
    if (any(ip_max) and ip_min > ip_max) or (proto_max and proto_min > proto_max):
        return "nat(range error)"
    if SRC not in a and DST not in a:
        return "nat"
    text = "nat(" + ("src" if SRC in a else "dst")
    if addr_len:
        text += "="
        if addr_len == 4:
            text += socket.inet_ntoa(ip_min)
            if any(ip_max) and ip_max != ip_min:
                text += "-" + socket.inet_ntoa(ip_max)
        else:
            def v6(b: bytes) -> str:
                address = socket.inet_ntop(socket.AF_INET6, b)
                return f"[{address}]" if proto_min else address
            text += v6(ip_min)
            if any(ip_max) and ip_max != ip_min:
                text += "-" + v6(ip_max)
        if proto_min:
            text += f":{proto_min}"
            if proto_max and proto_max != proto_min:
                text += f"-{proto_max}"
    text += "," + "".join(f"{name}," for t, name in _NAT_FLAGS if t in a)
    return text[:-1] + ")"


def ct_text(data: bytes, attr: Attr) -> str:
    a = parse_nested(data, attr, CT_POLICY)
    if a is None:
        return "ct(error)"
    zone = _u16(data, a.get(ZONE))
    parts = []
    if COMMIT in a:
        parts.append("commit")
    if FORCE_COMMIT in a:
        parts.append("force_commit")
    if zone:
        parts.append(f"zone={zone}")
    if MARK in a:
        value, mask = struct.unpack("<II", a[MARK].payload(data)[:8])
        parts.append(f"mark={hex_int(value)}/{hex_int(mask)}")
    if LABELS in a:
        labels = a[LABELS].payload(data)
        value, mask = int.from_bytes(labels[:16], "little"), int.from_bytes(labels[16:32], "little")
        parts.append(f"label={hex_int(value)}"
                     + ("" if mask == (1 << 128) - 1 else f"/{hex_int(mask)}"))
    if HELPER in a:
        parts.append(f"helper={c_string(data, a[HELPER])}")
    if TIMEOUT in a:
        parts.append(f"timeout={c_string(data, a[TIMEOUT])}")
    if NAT in a:
        parts.append(nat_text(data, a[NAT]))
    return f"ct({','.join(parts)})" if parts else "ct"
