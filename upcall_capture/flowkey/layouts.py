"""Fixed-size attribute payloads: how each is unpacked, printed and named.

A `Layout` is the single description of one fixed payload. The walker renders it
through a small function generated from it, and the shape compiler inlines the same
text and field expressions into one function per key shape, so the two paths cannot
drift apart.

Template language (kept tiny on purpose):
- `text` is the body of a Python f-string; `$name` is a value unpacked from the payload;
- `X(expr)` is C's `%#x`: `0` for zero, `0x..` otherwise (Python's `%#x` prints `0x0`);
- expressions may use `'` quotes but never `"` (the generated f-strings use `"`).
"""

from __future__ import annotations

import re
import socket
import struct
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any

FieldValue = int | bytes
Fields = dict[str, FieldValue]

_VAR = re.compile(r"\$(\w+)")
_HEX_MACRO = re.compile(r"(?<!\w)X\(([^()]*)\)")


class TcpFlagsText(dict[int, str]):
    """OVS's tcp_flags text per 16-bit value, filled on first use (at most 65,536 entries)."""

    NAMES = tuple("fin syn rst psh ack urg ece cwr ns [200] [400] [800]".split())

    def __missing__(self, value: int) -> str:
        names = [name for bit, name in enumerate(self.NAMES) if value >> bit & 1]
        unnamed = value & ~((1 << len(self.NAMES)) - 1)
        if unnamed:
            names.append(f"0x{unnamed:x}")
        text = "|".join(names) if names else "0"
        self[value] = text
        return text


def hex_int(value: int) -> str:
    """C's `%#x`, and also what OVS's ds_put_hex() prints for a big-endian byte string."""
    return hex(value) if value else "0"


# Names the templates may use, besides builtins.
TEMPLATE_GLOBALS: dict[str, Any] = {
    "_ntoa": socket.inet_ntoa,
    "_ntop6": partial(socket.inet_ntop, socket.AF_INET6),
    "_FRAG": ("no", "first", "later") + ("<error>",) * 253,
    "_TCPF": TcpFlagsText(),
    "_hex_int": hex_int,
}


def expand(template: str, prefix: str) -> str:
    """Template to Python source: `$name` becomes `<prefix>name`, `X(e)` becomes C's %#x."""
    source = _HEX_MACRO.sub(r"(hex(\1) if (\1) else '0')", template)
    return _VAR.sub(lambda m: prefix + m.group(1), source)


def fstring(body: str) -> str:
    return 'f"' + body + '"'


@dataclass(frozen=True)
class Layout:
    """One fixed payload: struct items in payload order, its text and its fields.

    `items` are (name, struct code); an empty name is padding (use an `x` code).
    `fields` are (field name, expression over $names), in the order they are set.
    """

    order: str
    items: tuple[tuple[str, str], ...]
    text: str
    fields: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if '"' in self.text or any('"' in expr for _, expr in self.fields):
            raise ValueError("layout templates must not contain double quotes")

    @cached_property
    def size(self) -> int:
        return struct.calcsize(self.order + "".join(code for _, code in self.items))

    @cached_property
    def values(self) -> tuple[tuple[str, str, int], ...]:
        """(name, code, offset in payload) of every non-padding item."""
        found, offset = [], 0
        for name, code in self.items:
            if name:
                found.append((name, code, offset))
            offset += struct.calcsize(self.order + code)
        return tuple(found)

    @cached_property
    def render(self) -> Any:
        """`render(data, offset, fields_or_None) -> text` for this payload at `offset`."""
        prefix = "v_"
        names = ", ".join(prefix + name for name, _, _ in self.values)
        lines = [
            "def render(data, offset, fields):",
            f"    ({names},) = _unpack(data, offset)",
            "    if fields is not None:",
        ]
        lines += [f"        fields[{name!r}] = {expand(e, prefix)}" for name, e in self.fields]
        lines += ["        pass", f"    return {fstring(expand(self.text, prefix))}"]
        fmt = self.order + "".join(code for _, code in self.items)
        namespace = dict(TEMPLATE_GLOBALS, _unpack=struct.Struct(fmt).unpack_from)
        exec("\n".join(lines), namespace)  # noqa: S102 - source built only from this module's tables
        return namespace.pop("render")  # the namespace must not hold its function: no cycle


def _counter(name: str, text_format: str = "X($v)", code: str = "I") -> Layout:
    """A host-order integer printed as `name(<text_format>)`."""
    return Layout("<", (("v", code),), f"{name}({{{text_format}}})", ((name, "$v"),))


def _be_int(var: str) -> str:
    return f"int.from_bytes({var}, 'big')"


PRIORITY = _counter("skb_priority")
SKB_MARK = _counter("skb_mark")
DP_HASH = _counter("dp_hash")
RECIRC_ID = _counter("recirc_id")
CT_STATE = _counter("ct_state")
CT_MARK = _counter("ct_mark")
CT_ZONE = _counter("ct_zone", code="H")
IN_PORT = _counter("in_port", text_format="$v")

ETHERNET = Layout(
    ">",
    (("src", "6s"), ("dst", "6s")),
    "eth(src={$src.hex(':')},dst={$dst.hex(':')})",
    (("eth.src", "$src"), ("eth.dst", "$dst")),
)
VLAN = Layout(
    ">",
    (("tci", "H"),),
    "vlan(vid={$tci & 4095},pcp={$tci >> 13}{'' if $tci & 4096 else ',cfi=0'})",
    (
        ("vlan.tci", "$tci"),
        ("vlan.vid", "$tci & 4095"),
        ("vlan.pcp", "$tci >> 13"),
        ("vlan.cfi", "$tci >> 12 & 1"),
    ),
)
ETHERTYPE = Layout(">", (("v", "H"),), "eth_type(0x{$v:04x})", (("eth_type", "$v"),))
IPV4 = Layout(
    ">",
    (("src", "4s"), ("dst", "4s"), ("proto", "B"), ("tos", "B"), ("ttl", "B"), ("frag", "B")),
    "ipv4(src={_ntoa($src)},dst={_ntoa($dst)},proto={$proto},tos={X($tos)},ttl={$ttl},"
    "frag={_FRAG[$frag]})",
    (
        ("ipv4.src", _be_int("$src")),
        ("ipv4.dst", _be_int("$dst")),
        ("ipv4.proto", "$proto"),
        ("ipv4.tos", "$tos"),
        ("ipv4.ttl", "$ttl"),
        ("ipv4.frag", "$frag"),
        ("proto", "$proto"),
    ),
)
IPV6 = Layout(
    ">",
    (
        ("src", "16s"),
        ("dst", "16s"),
        ("label", "I"),
        ("proto", "B"),
        ("tclass", "B"),
        ("hlimit", "B"),
        ("frag", "B"),
    ),
    "ipv6(src={_ntop6($src)},dst={_ntop6($dst)},label={X($label)},proto={$proto},"
    "tclass={X($tclass)},hlimit={$hlimit},frag={_FRAG[$frag]})",
    (
        ("ipv6.src", _be_int("$src")),
        ("ipv6.dst", _be_int("$dst")),
        ("ipv6.label", "$label"),
        ("ipv6.proto", "$proto"),
        ("ipv6.tclass", "$tclass"),
        ("ipv6.hlimit", "$hlimit"),
        ("ipv6.frag", "$frag"),
        ("proto", "$proto"),
    ),
)


def _ports(name: str) -> Layout:
    return Layout(
        ">",
        (("src", "H"), ("dst", "H")),
        f"{name}(src={{$src}},dst={{$dst}})",
        (("tp_src", "$src"), ("tp_dst", "$dst")),
    )


def _icmp(name: str) -> Layout:
    return Layout(
        ">",
        (("type", "B"), ("code", "B")),
        f"{name}(type={{$type}},code={{$code}})",
        ((f"{name}.type", "$type"), (f"{name}.code", "$code")),
    )


TCP = _ports("tcp")
UDP = _ports("udp")
SCTP = _ports("sctp")
ICMP = _icmp("icmp")
ICMPV6 = _icmp("icmpv6")
TCP_FLAGS = Layout(">", (("v", "H"),), "tcp_flags({_TCPF[$v]})", (("tcp_flags", "$v"),))
ARP = Layout(
    ">",
    (("sip", "4s"), ("tip", "4s"), ("op", "H"), ("sha", "6s"), ("tha", "6s"), ("", "2x")),
    "arp(sip={_ntoa($sip)},tip={_ntoa($tip)},op={$op},sha={$sha.hex(':')},tha={$tha.hex(':')})",
    (
        ("arp.sip", _be_int("$sip")),
        ("arp.tip", _be_int("$tip")),
        ("arp.op", "$op"),
        ("arp.sha", "$sha"),
        ("arp.tha", "$tha"),
    ),
)
ND = Layout(
    ">",
    (("target", "16s"), ("sll", "6s"), ("tll", "6s")),
    "nd(target={_ntop6($target)},sll={$sll.hex(':')},tll={$tll.hex(':')})",
    (("nd.target", _be_int("$target")), ("nd.sll", "$sll"), ("nd.tll", "$tll")),
)
ND_EXTENSIONS = Layout(
    ">",
    (("reserved", "I"), ("type", "B"), ("", "3x")),
    "nd_ext(nd_reserved=0x{$reserved:x},nd_options_type={$type})",
    (("nd_ext.nd_reserved", "$reserved"), ("nd_ext.nd_options_type", "$type")),
)
CT_LABELS = Layout(
    "<",
    (("v", "16s"),),
    "ct_label({_hex_int(int.from_bytes($v, 'little'))})",
    (("ct_label", "int.from_bytes($v, 'little')"),),
)
CT_TUPLE4 = Layout(
    ">",
    (("src", "4s"), ("dst", "4s"), ("sport", "H"), ("dport", "H"), ("proto", "B"), ("", "3x")),
    "ct_tuple4(src={_ntoa($src)},dst={_ntoa($dst)},proto={$proto},tp_src={$sport},tp_dst={$dport})",
    (
        ("ct_tuple4.src", _be_int("$src")),
        ("ct_tuple4.dst", _be_int("$dst")),
        ("ct_tuple4.proto", "$proto"),
        ("ct_tuple4.tp_src", "$sport"),
        ("ct_tuple4.tp_dst", "$dport"),
    ),
)
CT_TUPLE6 = Layout(
    ">",
    (("src", "16s"), ("dst", "16s"), ("sport", "H"), ("dport", "H"), ("proto", "B"), ("", "3x")),
    "ct_tuple6(src={_ntop6($src)},dst={_ntop6($dst)},proto={$proto},src_port={$sport},"
    "dst_port={$dport})",
    (
        ("ct_tuple6.src", _be_int("$src")),
        ("ct_tuple6.dst", _be_int("$dst")),
        ("ct_tuple6.proto", "$proto"),
        ("ct_tuple6.src_port", "$sport"),
        ("ct_tuple6.dst_port", "$dport"),
    ),
)
PACKET_TYPE = Layout(
    ">",
    (("v", "I"),),
    "packet_type(ns={$v >> 16},id={X($v & 65535)})",
    (("packet_type.ns", "$v >> 16"), ("packet_type.id", "$v & 65535")),
)

_MPLS_TEXT = "label={$lse >> 12},tc={$lse >> 9 & 7},ttl={$lse & 255},bos={$lse >> 8 & 1}"
# The top of the stack names the mpls.* fields, as OpenFlow's mpls_label matches it.
MPLS_TOP = Layout(
    ">",
    (("lse", "I"),),
    _MPLS_TEXT,
    (
        ("mpls.label", "$lse >> 12"),
        ("mpls.tc", "$lse >> 9 & 7"),
        ("mpls.ttl", "$lse & 255"),
        ("mpls.bos", "$lse >> 8 & 1"),
    ),
)
MPLS_LSE = Layout(">", (("lse", "I"),), _MPLS_TEXT)

# Tunnel sub-attributes print as `name=value`; the walker adds the separating commas.
TUN_ID = Layout(">", (("v", "Q"),), "tun_id=0x{$v:x}", (("tunnel.tun_id", "$v"),))
TUN_IPV4_SRC = Layout(">", (("v", "4s"),), "src={_ntoa($v)}", (("tunnel.src", _be_int("$v")),))
TUN_IPV4_DST = Layout(">", (("v", "4s"),), "dst={_ntoa($v)}", (("tunnel.dst", _be_int("$v")),))
TUN_TOS = Layout(">", (("v", "B"),), "tos={X($v)}", (("tunnel.tos", "$v"),))
TUN_TTL = Layout(">", (("v", "B"),), "ttl={$v}", (("tunnel.ttl", "$v"),))
TUN_TP_SRC = Layout(">", (("v", "H"),), "tp_src={$v}", (("tunnel.tp_src", "$v"),))
TUN_TP_DST = Layout(">", (("v", "H"),), "tp_dst={$v}", (("tunnel.tp_dst", "$v"),))
TUN_IPV6_SRC = Layout(
    ">", (("v", "16s"),), "ipv6_src={_ntop6($v)}", (("tunnel.ipv6_src", _be_int("$v")),)
)
TUN_IPV6_DST = Layout(
    ">", (("v", "16s"),), "ipv6_dst={_ntop6($v)}", (("tunnel.ipv6_dst", _be_int("$v")),)
)
VXLAN_GBP = Layout(
    "<",
    (("v", "I"),),
    "gbp(id={$v & 65535},flags={X($v >> 16 & 255)})",
    (("tunnel.vxlan_gbp_id", "$v & 65535"), ("tunnel.vxlan_gbp_flags", "$v >> 16 & 255")),
)
