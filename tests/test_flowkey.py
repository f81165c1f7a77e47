"""Flow key decoder: every attribute, nesting, malformed keys, the shape cache, KeyCache.

Expected texts are written from OVS's formatting rules (lib/odp-util.c), independently
of the decoder's tables; keys are built with tests/keyenc.py.
"""

from __future__ import annotations

import ipaddress
import random
import struct

import keyenc as k
import pytest

from upcall_capture.flowkey import DecodedKey, KeyCache, decode_key, format_key
from upcall_capture.flowkey import shapes as shapes_module
from upcall_capture.flowkey.shapes import ShapeCache
from upcall_capture.flowkey.walk import plan_key, render


def hx(value: int) -> str:
    """C's %#x."""
    return hex(value) if value else "0"


def mac_text(address: bytes) -> str:
    return ":".join(f"{octet:02x}" for octet in address)


def check(key: bytes, text: str, fields: dict[str, object] | None = None) -> None:
    """The key prints as `text` on the walk and the compiled path, with these fields."""
    shapes = ShapeCache(compile_after=1)
    for _ in range(2):  # the first call compiles the shape, the second one uses it
        assert shapes.text(key, len(key)) == text
        decoded_text, decoded_fields = shapes.decode(key, len(key))
        assert decoded_text == text
        if fields is not None:
            assert decoded_fields == fields
    assert format_key(key) == text


MAC_A, MAC_B = "00:11:22:33:44:55", "fe:dc:ba:98:76:54"

ATTRIBUTES = [
    (k.u32(k.PRIORITY, 0), "skb_priority(0)", {"skb_priority": 0}),
    (k.u32(k.PRIORITY, 7), "skb_priority(0x7)", {"skb_priority": 7}),
    (k.u32(k.IN_PORT, 0xFFFFFFFF), "in_port(4294967295)", {"in_port": 0xFFFFFFFF}),
    (k.u32(k.IN_PORT, 0), "in_port(0)", {"in_port": 0}),
    (k.u32(k.SKB_MARK, 0xDEAD), "skb_mark(0xdead)", {"skb_mark": 0xDEAD}),
    (k.u32(k.DP_HASH, 0x80000000), "dp_hash(0x80000000)", {"dp_hash": 0x80000000}),
    (k.u32(k.RECIRC_ID, 1), "recirc_id(0x1)", {"recirc_id": 1}),
    (k.u32(k.CT_STATE, 0x21), "ct_state(0x21)", {"ct_state": 0x21}),
    (k.u16(k.CT_ZONE, 0), "ct_zone(0)", {"ct_zone": 0}),
    (k.u16(k.CT_ZONE, 0xFFFF), "ct_zone(0xffff)", {"ct_zone": 0xFFFF}),
    (k.u32(k.CT_MARK, 0x10), "ct_mark(0x10)", {"ct_mark": 0x10}),
    (k.ct_label(0), "ct_label(0)", {"ct_label": 0}),
    (
        k.ct_label(1 << 127 | 5),
        "ct_label(0x80000000000000000000000000000005)",
        {"ct_label": 1 << 127 | 5},
    ),
    (
        k.eth(MAC_A, MAC_B),
        f"eth(src={MAC_A},dst={MAC_B})",
        {"eth.src": k.mac(MAC_A), "eth.dst": k.mac(MAC_B)},
    ),
    (
        k.vlan(100, 5),
        "vlan(vid=100,pcp=5)",
        {"vlan.tci": 0xB064, "vlan.vid": 100, "vlan.pcp": 5, "vlan.cfi": 1},
    ),
    (
        k.vlan(4095, 7, cfi=False),
        "vlan(vid=4095,pcp=7,cfi=0)",
        {"vlan.tci": 0xEFFF, "vlan.vid": 4095, "vlan.pcp": 7, "vlan.cfi": 0},
    ),
    (k.eth_type(0x0800), "eth_type(0x0800)", {"eth_type": 0x0800}),
    (k.eth_type(0x5), "eth_type(0x0005)", {"eth_type": 5}),
    (
        k.ipv4("10.0.0.1", "192.168.255.254", 17, tos=0, ttl=255, frag=0),
        "ipv4(src=10.0.0.1,dst=192.168.255.254,proto=17,tos=0,ttl=255,frag=no)",
        {
            "ipv4.src": 0x0A000001,
            "ipv4.dst": 0xC0A8FFFE,
            "ipv4.proto": 17,
            "ipv4.tos": 0,
            "ipv4.ttl": 255,
            "ipv4.frag": 0,
            "proto": 17,
        },
    ),
    (
        k.ipv4("0.0.0.0", "255.255.255.255", 1, tos=0xFC, ttl=0, frag=1),
        "ipv4(src=0.0.0.0,dst=255.255.255.255,proto=1,tos=0xfc,ttl=0,frag=first)",
        None,
    ),
    (k.ipv4("1.2.3.4", "5.6.7.8", 6, frag=2), None, None),
    (k.ipv4("1.2.3.4", "5.6.7.8", 6, frag=3), None, None),
    (
        k.ipv6("2001:db8::1", "ff02::1:ff00:2", 58, label=0xFFFFF, tclass=0x10, hlimit=255, frag=2),
        "ipv6(src=2001:db8::1,dst=ff02::1:ff00:2,label=0xfffff,proto=58,tclass=0x10,"
        "hlimit=255,frag=later)",
        {
            "ipv6.src": int(ipaddress.IPv6Address("2001:db8::1")),
            "ipv6.dst": int(ipaddress.IPv6Address("ff02::1:ff00:2")),
            "ipv6.label": 0xFFFFF,
            "ipv6.proto": 58,
            "ipv6.tclass": 0x10,
            "ipv6.hlimit": 255,
            "ipv6.frag": 2,
            "proto": 58,
        },
    ),
    # inet_ntop's forms, as OVS prints them: all zero, and IPv4-mapped.
    (
        k.ipv6("::", "::ffff:1.2.3.4", 6),
        "ipv6(src=::,dst=::ffff:1.2.3.4,label=0,proto=6,tclass=0,hlimit=64,frag=no)",
        None,
    ),
    (k.ports(k.TCP, 0, 65535), "tcp(src=0,dst=65535)", {"tp_src": 0, "tp_dst": 65535}),
    (k.ports(k.UDP, 53, 1024), "udp(src=53,dst=1024)", {"tp_src": 53, "tp_dst": 1024}),
    (k.ports(k.SCTP, 2905, 1), "sctp(src=2905,dst=1)", {"tp_src": 2905, "tp_dst": 1}),
    (k.icmp(k.ICMP, 8, 0), "icmp(type=8,code=0)", {"icmp.type": 8, "icmp.code": 0}),
    (k.icmp(k.ICMPV6, 135, 1), "icmpv6(type=135,code=1)", {"icmpv6.type": 135, "icmpv6.code": 1}),
    (
        k.arp("1.2.3.4", "5.6.7.8", 2, MAC_A, MAC_B),
        f"arp(sip=1.2.3.4,tip=5.6.7.8,op=2,sha={MAC_A},tha={MAC_B})",
        {
            "arp.sip": 0x01020304,
            "arp.tip": 0x05060708,
            "arp.op": 2,
            "arp.sha": k.mac(MAC_A),
            "arp.tha": k.mac(MAC_B),
        },
    ),
    (
        k.nd("fe80::1", MAC_A, MAC_B),
        f"nd(target=fe80::1,sll={MAC_A},tll={MAC_B})",
        {
            "nd.target": int(ipaddress.IPv6Address("fe80::1")),
            "nd.sll": k.mac(MAC_A),
            "nd.tll": k.mac(MAC_B),
        },
    ),
    (
        k.nd_ext(0, 2),
        "nd_ext(nd_reserved=0x0,nd_options_type=2)",
        {"nd_ext.nd_reserved": 0, "nd_ext.nd_options_type": 2},
    ),
    (k.nd_ext(0xABC, 1), "nd_ext(nd_reserved=0xabc,nd_options_type=1)", None),
    (k.be16(k.TCP_FLAGS, 0), "tcp_flags(0)", {"tcp_flags": 0}),
    (k.be16(k.TCP_FLAGS, 0x12), "tcp_flags(syn|ack)", {"tcp_flags": 0x12}),
    (
        k.be16(k.TCP_FLAGS, 0xFFF),
        "tcp_flags(fin|syn|rst|psh|ack|urg|ece|cwr|ns|[200]|[400]|[800])",
        None,
    ),
    (k.be16(k.TCP_FLAGS, 0xF001), "tcp_flags(fin|0xf000)", None),
    (k.be16(k.TCP_FLAGS, 0x3000), "tcp_flags(0x3000)", None),
    (
        k.mpls((100, 3, 64, 1)),
        "mpls(label=100,tc=3,ttl=64,bos=1)",
        {"mpls.label": 100, "mpls.tc": 3, "mpls.ttl": 64, "mpls.bos": 1},
    ),
    (
        k.mpls((1048575, 7, 255, 0), (16, 0, 1, 0), (17, 1, 2, 1)),
        "mpls(label=1048575,tc=7,ttl=255,bos=0,label=16,tc=0,ttl=1,bos=0,label=17,tc=1,ttl=2,bos=1)",
        {"mpls.label": 1048575, "mpls.tc": 7, "mpls.ttl": 255, "mpls.bos": 0},
    ),
    (
        k.ct_tuple4("10.0.0.1", "10.0.0.2", 1234, 80, 6),
        "ct_tuple4(src=10.0.0.1,dst=10.0.0.2,proto=6,tp_src=1234,tp_dst=80)",
        {
            "ct_tuple4.src": 0x0A000001,
            "ct_tuple4.dst": 0x0A000002,
            "ct_tuple4.proto": 6,
            "ct_tuple4.tp_src": 1234,
            "ct_tuple4.tp_dst": 80,
        },
    ),
    (
        k.ct_tuple6("2001:db8::1", "2001:db8::2", 546, 547, 17),
        "ct_tuple6(src=2001:db8::1,dst=2001:db8::2,proto=17,src_port=546,dst_port=547)",
        None,
    ),
    (
        k.packet_type(1, 0x800),
        "packet_type(ns=1,id=0x800)",
        {"packet_type.ns": 1, "packet_type.id": 0x800},
    ),
    (k.packet_type(0, 0), "packet_type(ns=0,id=0)", None),
    (
        k.nsh(0, 63, 1, 3, 0x1234, 255, [0x11223344, 0, 0, 0xFFFFFFFF]),
        "nsh(flags=0,ttl=63,mdtype=1,np=3,spi=0x1234,si=255,c1=0x11223344,c2=0x0,c3=0x0,"
        "c4=0xffffffff)",
        {
            "nsh.flags": 0,
            "nsh.ttl": 63,
            "nsh.mdtype": 1,
            "nsh.np": 3,
            "nsh.spi": 0x1234,
            "nsh.si": 255,
            "nsh.c1": 0x11223344,
            "nsh.c2": 0,
            "nsh.c3": 0,
            "nsh.c4": 0xFFFFFFFF,
        },
    ),
    # MD type 1 without an MD1 attribute: zero context; MD type 2: no context printed.
    (
        k.nsh(2, 1, 1, 1, 1, 1),
        "nsh(flags=2,ttl=1,mdtype=1,np=1,spi=0x1,si=1,c1=0x0,c2=0x0,c3=0x0,c4=0x0)",
        None,
    ),
    (k.nsh(0, 63, 2, 3, 0xFFFFFF, 0), "nsh(flags=0,ttl=63,mdtype=2,np=3,spi=0xffffff,si=0)", None),
    (k.nested(k.NSH), "nsh(flags=0,ttl=0,mdtype=0,np=0,spi=0x0,si=0)", None),
    # Unknown types: raw bytes, the kernel's IPv6 extension headers (32) among them.
    (k.attr(k.IPV6_EXTHDRS, b"\x00\x01"), "key32(00 01)", {"key32": b"\x00\x01"}),
    (k.attr(100), "key100()", {"key100": b""}),
    (k.attr(0x3FFF, b"\xff"), "key16383(ff)", {"key16383": b"\xff"}),
    (k.attr(0), "unspec()", {}),
    (k.attr(k.TUNNEL_INFO), "<error: kernel-only tunnel_info>()", {}),
    # The two top bits of nla_type are flags, not part of the type.
    (k.attr(0x8000 | k.IN_PORT, struct.pack("<I", 5)), "in_port(5)", {"in_port": 5}),
    (k.attr(0x4000 | k.IN_PORT, struct.pack("<I", 6)), "in_port(6)", {"in_port": 6}),
]


@pytest.mark.parametrize(("key", "text", "fields"), ATTRIBUTES)
def test_each_attribute_prints_as_ovs(
    key: bytes, text: str | None, fields: dict[str, object] | None
) -> None:
    if text is None:  # frag values: no, first, later, then OVS's "<error>"
        frag = key[-1]
        text = format_key(key)
        assert text.endswith(f",frag={('no', 'first', 'later')[frag] if frag < 3 else '<error>'})")
    check(key, text, fields)


TUNNELS = [
    (b"", "tunnel(flags(0))"),
    (k.tun_id(0), "tunnel(tun_id=0x0,flags(key))"),
    (k.tun_id(0xFEDCBA9876543210), "tunnel(tun_id=0xfedcba9876543210,flags(key))"),
    (
        k.attr(k.TUN_OAM)
        + k.attr(k.TUN_IPV4_SRC, k.ip4("1.1.1.1"))
        + k.attr(k.TUN_CSUM)
        + k.attr(k.TUN_IPV4_DST, k.ip4("2.2.2.2"))
        + k.u8(k.TUN_TOS, 3)
        + k.u8(k.TUN_TTL, 64)
        + k.attr(k.TUN_DF),
        "tunnel(src=1.1.1.1,dst=2.2.2.2,tos=0x3,ttl=64,flags(oam|df|csum))",
    ),
    (
        k.be16(k.TUN_TP_DST, 4789) + k.be16(k.TUN_TP_SRC, 0) + k.u8(k.TUN_TOS, 0),
        "tunnel(tp_dst=4789,tp_src=0,tos=0,flags(0))",
    ),
    (
        k.attr(k.TUN_IPV6_SRC, k.ip6("2001::1")) + k.attr(k.TUN_IPV6_DST, k.ip6("fe80::2")),
        "tunnel(ipv6_src=2001::1,ipv6_dst=fe80::2,flags(0))",
    ),
    (
        k.attr(
            k.TUN_GENEVE,
            k.geneve_opt(0x102, 0x80, b"\x00\x00\x00\x0a")
            + k.geneve_opt(0, 0, b"")
            + k.geneve_opt(0xFFFF, 1, bytes(8)),
        ),
        "tunnel(geneve({class=0x102,type=0x80,len=4,0xa}{class=0,type=0,len=0}"
        "{class=0xffff,type=0x1,len=8,0}),flags(0))",
    ),
    (k.attr(k.TUN_GENEVE), "tunnel(geneve(),flags(0))"),
    (
        k.attr(k.TUN_GENEVE, b"\x01\x02\x03"),
        "tunnel(geneve(opt len 3 less than minimum 4),flags(0))",
    ),
    (
        k.attr(k.TUN_GENEVE, k.geneve_opt(1, 2, bytes(4)) + b"\x00\x01\x02\x02\x00\x00"),
        "tunnel(geneve({class=0x1,type=0x2,len=4,0}opt len 12 greater than remaining 6),flags(0))",
    ),
    (k.vxlan_gbp(10, 0xB), "tunnel(vxlan(gbp(id=10,flags=0xb)),flags(0))"),
    (k.nested(k.TUN_VXLAN), "tunnel(vxlan(),flags(0))"),
    (k.nested(k.TUN_VXLAN, k.attr(2)), "tunnel(vxlan(key2()),flags(0))"),
    (
        k.nested(k.TUN_VXLAN, k.attr(9, b"\x01\x02"), k.u32(1, 7)),
        "tunnel(vxlan(key9(01 02),gbp(id=7,flags=0)),flags(0))",
    ),
    (
        k.nested(k.TUN_VXLAN, k.u32(2, 7)),
        "tunnel(vxlan(key2(bad key length 4, expected 0)(07 00 00 00)),flags(0))",
    ),
    (k.erspan_v1(0xFFFFF), "tunnel(erspan(ver=1,idx=0xfffff),flags(0))"),
    (k.erspan_v2(0, 0), "tunnel(erspan(ver=2,dir=0,hwid=0),flags(0))"),
    (k.erspan_v2(1, 0xF), "tunnel(erspan(ver=2,dir=1,hwid=0xf),flags(0))"),
    (k.erspan_v2(1, 0x6), "tunnel(erspan(ver=2,dir=1,hwid=0x6),flags(0))"),
    (k.erspan_v2(0, 0x1), "tunnel(erspan(ver=2,dir=0,hwid=0x1),flags(0))"),
    (k.attr(k.TUN_ERSPAN, struct.pack("<i", 3) + bytes(8)), "tunnel(erspan(ver=3),flags(0))"),
    (k.gtpu(0x30, 255), "tunnel(gtpu(flags=0x30,msgtype=255),flags(0))"),
    (k.gtpu(0, 1), "tunnel(gtpu(flags=0,msgtype=1),flags(0))"),
    # Bad lengths inside a tunnel name the type and are followed by no comma.
    (
        k.attr(k.TUN_IPV4_SRC, b"\x0a\x00") + k.u8(k.TUN_TTL, 5),
        "tunnel(key1(bad key length 2, expected 4)(0a 00)ttl=5,flags(0))",
    ),
    (k.attr(k.TUN_DF, b"\x01"), "tunnel(key5(bad key length 1, expected 0)(01)flags(0))"),
    (k.attr(k.TUN_PAD), "tunnel(flags(0))"),
    (
        k.attr(k.TUN_PAD, bytes(4)),
        "tunnel(key14(bad key length 4, expected 0)(00 00 00 00)flags(0))",
    ),
    (
        k.attr(17, b"\xaa") + k.attr(99) + k.u8(k.TUN_TTL, 1),
        "tunnel(key17(aa),key99(),ttl=1,flags(0))",
    ),
    # Bytes after the last whole sub-attribute are ignored (no leftover text in a tunnel).
    (k.u8(k.TUN_TTL, 9) + b"\x01\x02", "tunnel(ttl=9,flags(0))"),
]


@pytest.mark.parametrize(("inner", "text"), TUNNELS)
def test_tunnel_attributes(inner: bytes, text: str) -> None:
    key = k.attr(k.TUNNEL, inner)
    check(key, text)


def test_tunnel_fields() -> None:
    inner = (
        k.tun_id(42)
        + k.attr(k.TUN_IPV4_SRC, k.ip4("10.0.0.1"))
        + k.attr(k.TUN_IPV6_DST, k.ip6("2001::2"))
        + k.u8(k.TUN_TOS, 4)
        + k.u8(k.TUN_TTL, 64)
        + k.be16(k.TUN_TP_SRC, 5000)
        + k.be16(k.TUN_TP_DST, 6081)
        + k.attr(k.TUN_CSUM)
        + k.vxlan_gbp(7, 1)
        + k.erspan_v2(1, 3)
        + k.gtpu(0x32, 1)
    )
    fields = decode_key(k.tunnel(inner)).fields
    assert fields == {
        "tunnel.tun_id": 42,
        "tunnel.src": 0x0A000001,
        "tunnel.ipv6_dst": int(ipaddress.IPv6Address("2001::2")),
        "tunnel.tos": 4,
        "tunnel.ttl": 64,
        "tunnel.tp_src": 5000,
        "tunnel.tp_dst": 6081,
        "tunnel.vxlan_gbp_id": 7,
        "tunnel.vxlan_gbp_flags": 1,
        "tunnel.erspan_ver": 2,
        "tunnel.erspan_dir": 1,
        "tunnel.erspan_hwid": 3,
        "tunnel.gtpu_flags": 0x32,
        "tunnel.gtpu_msgtype": 1,
        "tunnel.flags": 0b1100,  # csum | key
    }


def test_short_erspan_reads_what_follows_like_ovs() -> None:
    """OVS reads a whole erspan_metadata whatever the attribute's length."""
    short = k.attr(k.TUN_ERSPAN, struct.pack("<i", 1))  # version 1, no index
    following = k.u8(k.TUN_TTL, 7)  # its bytes 05 00 04 00 07 ... become the index
    assert format_key(k.tunnel(short + following)) == (
        "tunnel(erspan(ver=1,idx=0x5000400),ttl=7,flags(0))"
    )
    # At the very end of the key, the missing bytes read as zero.
    assert format_key(k.tunnel(short)) == "tunnel(erspan(ver=1,idx=0),flags(0))"


# Payload lengths OVS expects (ovs_flow_key_attr_lens); 0 where its table has no entry.
EXPECTED_LENGTHS = {
    0: 0, 2: 4, 3: 4, 4: 12, 5: 2, 6: 2, 7: 12, 8: 40, 9: 4, 10: 4, 11: 2, 12: 2, 13: 24,
    14: 28, 15: 4, 17: 4, 18: 2, 19: 4, 20: 4, 22: 4, 23: 2, 24: 4, 25: 16, 26: 16, 27: 40,
    29: 4, 30: 8, 31: 0,
}  # fmt: skip


@pytest.mark.parametrize("attr_type", sorted(EXPECTED_LENGTHS))
def test_bad_lengths_print_ovs_error_between_neighbours(attr_type: int) -> None:
    expected = EXPECTED_LENGTHS[attr_type]
    for size in {max(expected - 1, 0), expected + 1, expected + 5} - {expected}:
        payload = bytes(range(1, size + 1))
        key = k.u32(k.IN_PORT, 1) + k.attr(attr_type, payload) + k.u32(k.SKB_MARK, 0)
        spaced = " ".join(f"{b:02x}" for b in payload)
        bad = f"(bad key length {size}, expected {expected})({spaced})"
        check(key, f"in_port(1){bad},skb_mark(0)", {"in_port": 1, "skb_mark": 0})


def test_bad_length_first_takes_no_comma() -> None:
    check(k.attr(k.IN_PORT, b"\x01"), "(bad key length 1, expected 4)(01)", {})
    check(
        k.attr(k.IN_PORT, b"\x01") + k.u32(k.SKB_MARK, 2),
        "(bad key length 1, expected 4)(01)skb_mark(0x2)",
    )


@pytest.mark.parametrize(
    ("key", "text"),
    [
        (b"", "<empty>"),
        (k.u32(k.IN_PORT, 1) + b"\xab\xcd", "in_port(1),***2 leftover bytes*** (abcd)"),
        (k.u32(k.IN_PORT, 1) + b"\x01", "in_port(1),***1 leftover bytes*** (01)"),
        (b"\x08\x00\x03", "<empty>,***3 leftover bytes*** (080003)"),
        # nla_len below the header size, and above what is left.
        (b"\x03\x00\x03\x00\x00\x00\x00\x00", "<empty>,***8 leftover bytes*** (0300030000000000)"),
        (
            k.u32(k.IN_PORT, 1) + b"\x64\x00\x0f\x00\x01\x00\x00\x00",
            "in_port(1),***8 leftover bytes*** (64000f0001000000)",
        ),
        # An attribute whose padding is missing at the end of the key still counts.
        (k.attr(k.ICMP, b"\x01\x02")[:6], "icmp(type=1,code=2)"),
        (k.attr(k.MPLS, b"\x00\x00\x64\x41\x00\x00"), "mpls((bad key length 6)"),
        (k.attr(k.MPLS) + k.u32(k.IN_PORT, 1), "mpls((bad key length 0),in_port(1)"),
        (k.encap(), "encap()"),
        (
            k.encap(k.eth_type(0x800), b"\x07\x00"),
            "encap(eth_type(0x0800),***2 leftover bytes*** (0700))",
        ),
        (
            k.attr(k.ENCAP, b"\xff\xff\xff\xff\x01"),
            "encap(<empty>,***5 leftover bytes*** (ffffffff01))",
        ),
        (
            k.attr(k.NSH, k.attr(1, b"\x00\x3f\x01") + k.attr(7, b"\x01") + k.attr(3, b"\x09")),
            "nsh(key1(bad key length 3, expected 8)(00 3f 01)"
            "flags=0,ttl=0,mdtype=0,np=0,spi=0x0,si=0)",
        ),
    ],
)
def test_malformed_keys_print_as_ovs(key: bytes, text: str) -> None:
    check(key, text)


def test_qinq_inner_values_win_in_fields() -> None:
    key = k.kernel_key(
        vlans=[(100, 1), (200, 2)],
        ethertype=0x0800,
        l3=k.ipv4("10.1.1.1", "10.2.2.2", 17),
        l4=k.ports(k.UDP, 1, 2),
    )
    decoded = decode_key(key)
    assert decoded.text == (
        "recirc_id(0),dp_hash(0),skb_priority(0),in_port(1),skb_mark(0),"
        "eth(src=00:01:02:03:04:05,dst=10:11:12:13:14:15),eth_type(0x88a8),vlan(vid=100,pcp=1),"
        "encap(eth_type(0x8100),vlan(vid=200,pcp=2),encap(eth_type(0x0800),"
        "ipv4(src=10.1.1.1,dst=10.2.2.2,proto=17,tos=0,ttl=64,frag=no),udp(src=1,dst=2)))"
    )
    assert decoded.fields["eth_type"] == 0x0800
    assert (decoded.fields["vlan.vid"], decoded.fields["vlan.pcp"]) == (200, 2)
    assert (decoded.fields["proto"], decoded.fields["tp_dst"]) == (17, 2)


@pytest.mark.parametrize("depth", [1, 2, 50, 5000])
def test_encap_nests_at_any_depth_without_recursion(depth: int) -> None:
    key = k.eth_type(0x1234)
    for _ in range(depth):
        key = k.encap(key)
    assert format_key(key) == "encap(" * depth + "eth_type(0x1234)" + ")" * depth
    assert decode_key(key).fields == {"eth_type": 0x1234}


def _ipv4_tcp_key(rng: random.Random) -> tuple[bytes, str, dict[str, object]]:
    """A kernel-order IPv4/TCP key with random values, its text and some fields."""
    src, dst = rng.getrandbits(32), rng.getrandbits(32)
    sport, dport, flags = rng.getrandbits(16), rng.getrandbits(16), rng.getrandbits(12)
    eth_src, eth_dst = rng.randbytes(6), rng.randbytes(6)
    dp_hash, mark, state = rng.choice([0, rng.getrandbits(32)]), rng.getrandbits(32), 0x22
    key = k.kernel_key(
        dp_hash=dp_hash,
        in_port=7,
        conntrack=(state, 0, mark, 0),
        ethernet=(mac_text(eth_src), mac_text(eth_dst)),
        ethertype=0x0800,
        l3=k.ipv4(str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst)), 6, ttl=63),
        l4=k.ports(k.TCP, sport, dport) + k.be16(k.TCP_FLAGS, flags),
    )
    names = "fin syn rst psh ack urg ece cwr ns [200] [400] [800]".split()
    flag_text = "|".join(n for bit, n in enumerate(names) if flags >> bit & 1) or "0"
    text = (
        f"recirc_id(0),dp_hash({hx(dp_hash)}),skb_priority(0),in_port(7),skb_mark(0),"
        f"ct_state(0x22),ct_zone(0),ct_mark({hx(mark)}),ct_label(0),"
        f"eth(src={mac_text(eth_src)},dst={mac_text(eth_dst)}),eth_type(0x0800),"
        f"ipv4(src={ipaddress.IPv4Address(src)},dst={ipaddress.IPv4Address(dst)},proto=6,"
        f"tos=0,ttl=63,frag=no),tcp(src={sport},dst={dport}),tcp_flags({flag_text})"
    )
    fields = {"ipv4.src": src, "ipv4.dst": dst, "tp_src": sport, "tp_dst": dport}
    fields["dp_hash"] = dp_hash
    return key, text, fields


def test_many_keys_of_one_shape_keep_their_own_values() -> None:
    """The compiled shape serves every key of the shape, each with its values."""
    rng = random.Random(3)
    shapes = ShapeCache()
    for _ in range(300):
        key, text, fields = _ipv4_tcp_key(rng)
        assert shapes.text(key, len(key)) == text
        decoded_text, decoded_fields = shapes.decode(key, len(key))
        assert decoded_text == text
        assert {name: decoded_fields[name] for name in fields} == fields
    assert len(shapes) == 1


def test_a_shapes_shared_run_is_printed_for_its_own_bytes() -> None:
    """The run from skb_priority to ct_label is looked up by its bytes: keys that differ
    there (at its first value, its last or between) and keys that differ elsewhere (the
    addresses) each print their own text, as the walk prints it, also after the run
    texts have been emptied, as they are when full."""
    rng = random.Random(5)

    def new_key() -> bytes:
        return k.kernel_key(
            priority=rng.choice([0, 7]), in_port=rng.choice([1, 2]),
            conntrack=(0x22, 0, rng.choice([0, 9]), rng.choice([0, 1 << 127])),
            ethertype=0x0800, l3=k.ipv4(str(ipaddress.IPv4Address(rng.getrandbits(32))),
                                        "10.0.0.1", 6),
            l4=k.ports(k.TCP, 1, 2))

    key = new_key()
    assert shapes_module._runs(plan_key(key, len(key)).pieces)  # the test means something
    cache = ShapeCache(compile_after=1)
    keys = [new_key() for _ in range(2 * shapes_module.MAX_RUN_TEXTS)]
    for key in keys + keys[:100]:
        assert cache.text(key, len(key)) == render(plan_key(key, len(key)), key, len(key), None)
    assert len(cache) == 1


def test_run_texts_stay_bounded(monkeypatch) -> None:
    monkeypatch.setattr(shapes_module, "MAX_RUN_TEXTS", 8)
    runs = shapes_module.RunTexts()
    tables = [runs.table() for _ in range(3)]
    for number in range(40):
        table = tables[number % 3]
        assert runs.keep(table, bytes([number]), str(number)) == str(number)
        assert table[bytes([number])] == str(number)
        assert sum(map(len, tables)) <= 8
    del table, tables
    assert not list(runs._tables)  # a table goes with what held it


def test_shapes_of_equal_length_are_told_apart() -> None:
    """udp (4 bytes) and icmp (2 bytes + 2 padding) keys have the same length."""
    shapes = ShapeCache(compile_after=1)
    udp = k.kernel_key(
        ethertype=0x800, l3=k.ipv4("1.1.1.1", "2.2.2.2", 17), l4=k.ports(k.UDP, 3, 4)
    )
    icmp = k.kernel_key(
        ethertype=0x800, l3=k.ipv4("1.1.1.1", "2.2.2.2", 1), l4=k.icmp(k.ICMP, 3, 4)
    )
    assert len(udp) == len(icmp)
    for _ in range(3):
        assert shapes.text(udp, len(udp)).endswith(",udp(src=3,dst=4)")
        assert shapes.text(icmp, len(icmp)).endswith(",icmp(type=3,code=4)")
    assert len(shapes) == 2


def test_shape_cache_stays_bounded() -> None:
    shapes = ShapeCache(max_shapes=4, compile_after=1)
    for port in range(20):
        key = k.u32(k.IN_PORT, port) + k.attr(100 + port)  # a new shape each time
        assert shapes.text(key, len(key)) == f"in_port({port}),key{100 + port}()"
        assert len(shapes) <= 4


def test_key_cache_serves_repeats_and_stays_bounded() -> None:
    cache = KeyCache(maxsize=100)
    keys = [k.u32(k.IN_PORT, n) + k.u32(k.SKB_MARK, n) for n in range(1000)]
    for n, key in enumerate(keys):
        assert cache.get(key) == f"in_port({n}),skb_mark({hx(n)})"
        assert len(cache) <= 100
    last = keys[-1]
    assert cache.get(last) is cache.get(last)  # served from the cache, not re-made
    assert cache.get(keys[0]) == "in_port(0),skb_mark(0)"  # evicted, then made again


def test_key_cache_keeps_truncated_and_whole_keys_apart() -> None:
    cache = KeyCache()
    key = k.u32(k.IN_PORT, 1)
    assert cache.get(key) == "in_port(1)"
    assert cache.get(key, 20) == "in_port(1),<key truncated: captured 8 of 20 bytes>"
    assert cache.get(key, 8) == "in_port(1)"
    assert cache.get(bytearray(key)) == "in_port(1)"


def test_key_cache_rejects_a_useless_size() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        KeyCache(maxsize=1)


def test_full_len_shorter_than_data_drops_the_extra_bytes() -> None:
    key = k.u32(k.IN_PORT, 1) + k.u32(k.SKB_MARK, 2)
    assert format_key(key, 8) == "in_port(1)"
    assert format_key(key + b"junk", len(key)) == "in_port(1),skb_mark(0x2)"
    assert format_key(key, 0) == "<empty>"
    assert format_key(key, -5) == "<empty>"


def test_any_bytes_like_input() -> None:
    key = k.u32(k.IN_PORT, 3)
    assert format_key(bytearray(key)) == format_key(memoryview(key)) == "in_port(3)"
    assert decode_key(memoryview(key)) == DecodedKey("in_port(3)", {"in_port": 3})
