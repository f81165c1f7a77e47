"""A small netlink flow key encoder, for tests and benchmarks only.

Builds OVS_KEY_ATTR_* attributes as the Linux kernel lays them out (little-endian
headers and host-order fields, network-order packet fields), so tests can make keys
from values and check that the decoder gives those values back.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable

# OVS_KEY_ATTR_*
ENCAP, PRIORITY, IN_PORT, ETHERNET, VLAN, ETHERTYPE, IPV4, IPV6 = 1, 2, 3, 4, 5, 6, 7, 8
TCP, UDP, ICMP, ICMPV6, ARP, ND, SKB_MARK, TUNNEL, SCTP = 9, 10, 11, 12, 13, 14, 15, 16, 17
TCP_FLAGS, DP_HASH, RECIRC_ID, MPLS, CT_STATE, CT_ZONE, CT_MARK = 18, 19, 20, 21, 22, 23, 24
CT_LABELS, CT_TUPLE4, CT_TUPLE6, NSH, PACKET_TYPE, ND_EXT, TUNNEL_INFO = 25, 26, 27, 28, 29, 30, 31
IPV6_EXTHDRS = 32

# OVS_TUNNEL_KEY_ATTR_*
TUN_ID, TUN_IPV4_SRC, TUN_IPV4_DST, TUN_TOS, TUN_TTL, TUN_DF, TUN_CSUM, TUN_OAM = range(8)
TUN_GENEVE, TUN_TP_SRC, TUN_TP_DST, TUN_VXLAN, TUN_IPV6_SRC, TUN_IPV6_DST = range(8, 14)
TUN_PAD, TUN_ERSPAN, TUN_GTPU = 14, 15, 16


def attr(attr_type: int, payload: bytes = b"", nla_len: int | None = None) -> bytes:
    """One attribute, padded to 4 bytes; `nla_len` overrides the header's length."""
    length = 4 + len(payload) if nla_len is None else nla_len
    return struct.pack("<HH", length, attr_type) + payload + bytes(-(4 + len(payload)) % 4)


def nested(attr_type: int, *children: bytes) -> bytes:
    return attr(attr_type, b"".join(children))


def u8(attr_type: int, value: int) -> bytes:
    return attr(attr_type, struct.pack("B", value))


def u16(attr_type: int, value: int) -> bytes:
    return attr(attr_type, struct.pack("<H", value))


def u32(attr_type: int, value: int) -> bytes:
    return attr(attr_type, struct.pack("<I", value))


def be16(attr_type: int, value: int) -> bytes:
    return attr(attr_type, struct.pack(">H", value))


def be32(attr_type: int, value: int) -> bytes:
    return attr(attr_type, struct.pack(">I", value))


def ip4(address: str | int) -> bytes:
    return ipaddress.IPv4Address(address).packed


def ip6(address: str | int) -> bytes:
    return ipaddress.IPv6Address(address).packed


def mac(address: str) -> bytes:
    return bytes.fromhex(address.replace(":", ""))


# -- key attributes ------------------------------------------------------------------


def eth(src: str, dst: str) -> bytes:
    return attr(ETHERNET, mac(src) + mac(dst))


def vlan(vid: int, pcp: int = 0, cfi: bool = True) -> bytes:
    return be16(VLAN, pcp << 13 | int(cfi) << 12 | vid)


def eth_type(value: int) -> bytes:
    return be16(ETHERTYPE, value)


def ipv4(src: str, dst: str, proto: int, tos: int = 0, ttl: int = 64, frag: int = 0) -> bytes:
    return attr(IPV4, ip4(src) + ip4(dst) + bytes([proto, tos, ttl, frag]))


def ipv6(
    src: str,
    dst: str,
    proto: int,
    label: int = 0,
    tclass: int = 0,
    hlimit: int = 64,
    frag: int = 0,
) -> bytes:
    fixed = struct.pack(">I4B", label, proto, tclass, hlimit, frag)
    return attr(IPV6, ip6(src) + ip6(dst) + fixed)


def ports(attr_type: int, src: int, dst: int) -> bytes:
    return attr(attr_type, struct.pack(">HH", src, dst))


def icmp(attr_type: int, icmp_type: int, code: int) -> bytes:
    return attr(attr_type, bytes([icmp_type, code]))


def arp(sip: str, tip: str, op: int, sha: str, tha: str) -> bytes:
    return attr(ARP, ip4(sip) + ip4(tip) + struct.pack(">H", op) + mac(sha) + mac(tha) + bytes(2))


def nd(target: str, sll: str, tll: str) -> bytes:
    return attr(ND, ip6(target) + mac(sll) + mac(tll))


def nd_ext(reserved: int, options_type: int) -> bytes:
    return attr(ND_EXT, struct.pack(">IB3x", reserved, options_type))


def ct_label(value: int) -> bytes:
    return attr(CT_LABELS, value.to_bytes(16, "little"))


def ct_tuple4(src: str, dst: str, sport: int, dport: int, proto: int) -> bytes:
    return attr(CT_TUPLE4, ip4(src) + ip4(dst) + struct.pack(">HHB3x", sport, dport, proto))


def ct_tuple6(src: str, dst: str, sport: int, dport: int, proto: int) -> bytes:
    return attr(CT_TUPLE6, ip6(src) + ip6(dst) + struct.pack(">HHB3x", sport, dport, proto))


def mpls(*entries: tuple[int, int, int, int]) -> bytes:
    """Label stack entries as (label, tc, ttl, bos)."""
    words = (label << 12 | tc << 9 | bos << 8 | ttl for label, tc, ttl, bos in entries)
    return attr(MPLS, b"".join(struct.pack(">I", w) for w in words))


def packet_type(ns: int, type_id: int) -> bytes:
    return be32(PACKET_TYPE, ns << 16 | type_id)


def encap(*children: bytes) -> bytes:
    return nested(ENCAP, *children)


# -- tunnel ----------------------------------------------------------------------------


def tunnel(*children: bytes) -> bytes:
    return nested(TUNNEL, *children)


def tun_id(value: int) -> bytes:
    return attr(TUN_ID, struct.pack(">Q", value))


def geneve_opt(opt_class: int, opt_type: int, data: bytes) -> bytes:
    return struct.pack(">HBB", opt_class, opt_type, len(data) // 4) + data


def vxlan_gbp(gbp_id: int, flags: int) -> bytes:
    return nested(TUN_VXLAN, u32(1, flags << 16 | gbp_id))


def erspan_v1(index: int) -> bytes:
    return attr(TUN_ERSPAN, struct.pack("<i", 1) + struct.pack(">I", index) + bytes(4))


def erspan_v2(direction: int, hwid: int) -> bytes:
    return attr(TUN_ERSPAN, struct.pack("<i", 2) + bytes(7) + bytes([hwid << 4 | direction << 3]))


def gtpu(flags: int, msgtype: int) -> bytes:
    return attr(TUN_GTPU, bytes([flags, msgtype]))


# -- nsh -------------------------------------------------------------------------------


def nsh(
    flags: int, ttl: int, mdtype: int, np: int, spi: int, si: int, context: Iterable[int] = ()
) -> bytes:
    base = attr(1, struct.pack(">BBBBI", flags, ttl, mdtype, np, spi << 8 | si))
    words = tuple(context)
    md1 = attr(2, struct.pack(">4I", *words)) if words else b""
    return nested(NSH, base, md1)


# -- whole keys ------------------------------------------------------------------------


def kernel_key(
    *,
    in_port: int = 1,
    recirc_id: int = 0,
    dp_hash: int = 0,
    priority: int = 0,
    skb_mark: int = 0,
    tunnel_attrs: bytes = b"",
    conntrack: tuple[int, int, int, int] | None = None,
    ethernet: tuple[str, str] | None = ("00:01:02:03:04:05", "10:11:12:13:14:15"),
    vlans: Iterable[tuple[int, int]] = (),
    l3: bytes = b"",
    l4: bytes = b"",
    ethertype: int | None = None,
) -> bytes:
    """A key in the kernel's attribute order (see upcall-probe.md).

    `conntrack` is (ct_state, ct_zone, ct_mark, ct_label); `vlans` are (vid, pcp),
    outermost first, each wrapping the rest in encap(); `l3` and `l4` are attributes
    (l4 may hold several, e.g. tcp + tcp_flags).
    """
    meta = [u32(RECIRC_ID, recirc_id), u32(DP_HASH, dp_hash), u32(PRIORITY, priority)]
    if tunnel_attrs:
        meta.append(tunnel(tunnel_attrs))
    meta += [u32(IN_PORT, in_port), u32(SKB_MARK, skb_mark)]
    if conntrack is not None:
        state, zone, mark, label = conntrack
        meta += [u32(CT_STATE, state), u16(CT_ZONE, zone), u32(CT_MARK, mark), ct_label(label)]
    inner = ([] if ethertype is None else [eth_type(ethertype)]) + [l3, l4]
    tags = list(vlans)
    for depth in reversed(range(len(tags))):
        tpid = 0x88A8 if depth == 0 and len(tags) > 1 else 0x8100  # QinQ: 802.1ad outside
        inner = [eth_type(tpid), vlan(*tags[depth]), encap(*inner)]
    head = [eth(*ethernet)] if ethernet is not None else []
    return b"".join(meta + head + inner)


# Real-looking keys of every kind, for the property tests and the long fuzz run to
# mutate: kernel order, conntrack, QinQ with ND, every tunnel option, MPLS, NSH, ARP
# without Ethernet, packet_type and ct tuples.
SEED_KEYS = [
    kernel_key(
        conntrack=(0x22, 1, 2, 3),
        ethertype=0x0800,
        l3=ipv4("10.0.0.1", "10.0.0.2", 6),
        l4=ports(TCP, 1, 2) + be16(TCP_FLAGS, 0x18),
    ),
    kernel_key(
        vlans=[(5, 1), (6, 2)],
        ethertype=0x86DD,
        l3=ipv6("2001:db8::1", "2001:db8::2", 58) + attr(IPV6_EXTHDRS, b"\x00\x01"),
        l4=icmp(ICMPV6, 135, 0) + nd("2001:db8::3", "00:00:00:00:00:01", "00:00:00:00:00:02"),
    ),
    kernel_key(
        tunnel_attrs=tun_id(1)
        + attr(TUN_IPV6_SRC, ip6("2001::1"))
        + attr(TUN_GENEVE, geneve_opt(1, 2, b"\x00\x00\x00\x01"))
        + vxlan_gbp(1, 2)
        + erspan_v2(1, 2)
        + gtpu(1, 2)
        + attr(TUN_DF),
        ethertype=0x8847,
        l3=mpls((1, 2, 3, 0), (4, 5, 6, 1)),
    ),
    kernel_key(ethertype=0x894F, l3=nsh(1, 2, 1, 3, 4, 5, [6, 7, 8, 9])),
    kernel_key(
        ethernet=None,
        ethertype=0x0806,
        l3=arp("1.1.1.1", "2.2.2.2", 1, "00:00:00:00:00:01", "00:00:00:00:00:02"),
    ),
    u32(IN_PORT, 1) + packet_type(1, 0x800) + ct_tuple4("1.1.1.1", "2.2.2.2", 1, 2, 6),
    kernel_key(
        tunnel_attrs=tun_id(1)
        + attr(TUN_IPV4_SRC, ip4("1.1.1.1"))
        + attr(TUN_GENEVE, geneve_opt(1, 2, bytes(8)))
        + erspan_v1(5),
        ethertype=0x0800,
        l3=ipv4("10.0.0.1", "10.0.0.2", 17),
        l4=ports(UDP, 1, 2),
    ),
    u32(IN_PORT, 1) + packet_type(1, 0x800) + ct_tuple6("::1", "::2", 1, 2, 17),
]

