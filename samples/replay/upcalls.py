#!/usr/bin/env python3
"""Realistic upcall records for the replay source, upcall-replay.c.

Each record is what the Linux kernel datapath hands ovs-vswitchd in an upcall: a real packet
(correct headers, lengths, IPv4 header and L4 checksums) and the netlink flow key the kernel
builds for it, attributes in the kernel's order (__ovs_nla_put_key in
net/openvswitch/flow_netlink.c): recirc_id, dp_hash, skb_priority, [tunnel], in_port, skb_mark,
ct_state, ct_zone, ct_mark, ct_label, [ct_tuple4/6], eth, [eth_type(tpid), vlan, encap(...)],
eth_type, ipv4 | ipv6 + ipv6_exthdrs (type 32) | arp, then tcp + tcp_flags | udp | icmp |
icmpv6 [+ nd]. L3 upcalls (from an L3 GRE port) have no eth attribute and their packet starts at
the IP header.

Record file format (integers little-endian, no padding anywhere):

    header   b"UPCREC1\\n"
    record   u16 dpif_len, u16 reserved (0), u32 type, u32 pkt_len, u32 key_len,
             i32 key_uniq_off, i32 pkt_uniq_off,
             then dpif_len bytes of the dpif name (no NUL), pkt_len packet bytes,
             key_len key bytes
    ...      records follow one another up to the end of the file

key_uniq_off and pkt_uniq_off locate one 4-byte field that is in both the key and the packet:
the IPv4 or ARP source address, or the low 32 bits of the IPv6 source. `upcall-replay -u`
writes a counter there on every fire so that every key differs while key and packet still
agree (the packet's checksums then go stale). -1 means the record has no such field.

Module API: Upcall, generate(mix, count, seed), write_records(path, upcalls),
read_records(path), key_fields(key). Command line:

    python samples/replay/upcalls.py --mix mixed --count 2000 --seed 1 -o mixed.upc
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import struct
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

FILE_MAGIC = b"UPCREC1\n"
_RECORD_HEADER = struct.Struct("<HHIIIii")

UPCALL_MISS = 0
UPCALL_ACTION = 1
OVS_SYSTEM = "system@ovs-system"
BR_TUN = "system@br-tun"
MIXES = ("basic", "mixed", "repeat")
DEFAULT_COUNTS = {"basic": 40, "mixed": 2000, "repeat": 4000}

# OVS_KEY_ATTR_* (include/uapi/linux/openvswitch.h).
ENCAP, PRIORITY, IN_PORT, ETHERNET, VLAN, ETHERTYPE, IPV4, IPV6 = 1, 2, 3, 4, 5, 6, 7, 8
TCP, UDP, ICMP, ICMPV6, ARP, ND, SKB_MARK, TUNNEL = 9, 10, 11, 12, 13, 14, 15, 16
TCP_FLAGS, DP_HASH, RECIRC_ID, CT_STATE, CT_ZONE, CT_MARK, CT_LABELS = 18, 19, 20, 22, 23, 24, 25
CT_ORIG_TUPLE_IPV4, CT_ORIG_TUPLE_IPV6, IPV6_EXTHDRS = 26, 27, 32
# OVS_TUNNEL_KEY_ATTR_*.
TUN_ID, TUN_IPV4_SRC, TUN_IPV4_DST, TUN_TTL, TUN_TP_SRC, TUN_TP_DST = 0, 1, 2, 4, 9, 10

ETH_IPV4, ETH_IPV6, ETH_ARP, ETH_VLAN, ETH_QINQ = 0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8
PROTO_ICMP, PROTO_TCP, PROTO_UDP, PROTO_ICMPV6 = 1, 6, 17, 58
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
CT_NEW, CT_EST, CT_RPL, CT_TRK = 0x01, 0x02, 0x08, 0x20
FRAG_NO, FRAG_FIRST, FRAG_LATER = 0, 1, 2
MAX_KEY_LEN = 640  # ODPUTIL_FLOW_KEY_BYTES: OVS never hands out a longer key


@dataclass(frozen=True)
class Upcall:
    """One upcall as the probe sees it; descriptive properties are read back from the key."""

    dpif: str
    type: int
    packet: bytes
    key: bytes
    key_uniq_off: int = -1
    pkt_uniq_off: int = -1

    @cached_property
    def fields(self) -> dict[str, Any]:
        """key_fields(self.key)."""
        return key_fields(self.key)

    @property
    def in_port(self) -> int:
        return self.fields["in_port"]

    @property
    def is_l3(self) -> bool:
        """True when the key has no eth attribute: the packet starts at the IP header."""
        return "eth.src" not in self.fields

    @property
    def kind(self) -> str:
        """E.g. "eth/ipv4/tcp", "vlan/ipv6/udp", "qinq/ipv4/icmp", "l3/ipv6/tcp", "eth/arp",
        "eth/ipv6/nd" (neighbour discovery), "eth/ipv4" (a later fragment: no L4)."""
        f = self.fields
        shape = "l3" if self.is_l3 else ("eth", "vlan", "qinq")[len(f["vlans"])]
        net = {ETH_IPV4: "ipv4", ETH_IPV6: "ipv6", ETH_ARP: "arp"}.get(f["eth_type"], "other")
        l4 = next((n for n in ("tcp", "udp", "icmp", "nd", "icmpv6") if n in f), None)
        return "/".join(p for p in (shape, net, l4) if p)


# --- the netlink flow key --------------------------------------------------------------------


def _nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("<HH", length, kind) + payload + bytes(-length % 4)


class _Key:
    """A key under construction that remembers where its unique-able field landed."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.uniq_off = -1

    def put(self, kind: int, payload: bytes, uniq_at: int | None = None) -> None:
        if uniq_at is not None:
            self.uniq_off = len(self.data) + 4 + uniq_at
        self.data += _nla(kind, payload)

    def extend(self, other: _Key) -> None:
        if other.uniq_off >= 0:
            self.uniq_off = len(self.data) + other.uniq_off
        self.data += other.data

    def nest(self, kind: int, inner: _Key) -> None:
        if inner.uniq_off >= 0:
            self.uniq_off = len(self.data) + 4 + inner.uniq_off
        self.data += _nla(kind, bytes(inner.data))


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def _be16(value: int) -> bytes:
    return struct.pack("!H", value)


def key_fields(key: bytes) -> dict[str, Any]:
    """The fields of a flow key as a flat dict, names in OVS's style.

    Keys, where the attribute is present: recirc_id, dp_hash, skb_priority, in_port,
    skb_mark, ct_state, ct_zone, ct_mark, tunnel (True), eth.src, eth.dst, vlans (VLAN ids,
    outermost first; always present), eth_type (the innermost), ipv4.src/ipv4.dst or
    ipv6.src/ipv6.dst, proto, frag (0 no, 1 first, 2 later), tp_src, tp_dst, tcp_flags,
    icmp.type, icmp.code, arp.sip, arp.tip, arp.op, nd.target, and the markers tcp, udp,
    icmp, icmpv6, nd (True). Addresses are ipaddress objects, MACs "aa:bb:.." strings, the
    rest ints. Made for tests that compute on their own which records a filter should keep;
    not a general decoder.
    """
    fields: dict[str, Any] = {"vlans": ()}
    _walk_key(key, fields)
    return fields


def _walk_key(data: bytes, fields: dict[str, Any]) -> None:
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("<HH", data, offset)
        if length < 4 or offset + length > len(data):
            raise ValueError(f"bad netlink attribute at offset {offset}")
        payload = data[offset + 4 : offset + length]
        _read_attr(kind & 0x3FFF, payload, fields)
        offset += (length + 3) & ~3


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _read_attr(kind: int, p: bytes, f: dict[str, Any]) -> None:
    simple_u32 = {RECIRC_ID: "recirc_id", DP_HASH: "dp_hash", PRIORITY: "skb_priority",
                  IN_PORT: "in_port", SKB_MARK: "skb_mark", CT_STATE: "ct_state",
                  CT_MARK: "ct_mark"}
    if kind in simple_u32:
        f[simple_u32[kind]] = struct.unpack("<I", p)[0]
    elif kind == CT_ZONE:
        f["ct_zone"] = struct.unpack("<H", p)[0]
    elif kind == TUNNEL:
        f["tunnel"] = True
    elif kind == ETHERNET:
        f["eth.src"], f["eth.dst"] = _mac(p[:6]), _mac(p[6:12])
    elif kind == ETHERTYPE:
        f["eth_type"] = struct.unpack("!H", p)[0]
    elif kind == VLAN:
        f["vlans"] = (*f["vlans"], struct.unpack("!H", p)[0] & 0x0FFF)
    elif kind == ENCAP:
        _walk_key(p, f)
    elif kind == IPV4:  # src, dst, proto, tos, ttl, frag
        f["ipv4.src"], f["ipv4.dst"] = ipaddress.IPv4Address(p[:4]), ipaddress.IPv4Address(p[4:8])
        f["proto"], f["frag"] = p[8], p[11]
    elif kind == IPV6:  # src, dst, label, proto, tclass, hlimit, frag
        f["ipv6.src"] = ipaddress.IPv6Address(p[:16])
        f["ipv6.dst"] = ipaddress.IPv6Address(p[16:32])
        f["proto"], f["frag"] = p[36], p[39]
    elif kind in (TCP, UDP):
        f["tcp" if kind == TCP else "udp"] = True
        f["tp_src"], f["tp_dst"] = struct.unpack("!HH", p)
    elif kind == TCP_FLAGS:
        f["tcp_flags"] = struct.unpack("!H", p)[0]
    elif kind in (ICMP, ICMPV6):
        f["icmp" if kind == ICMP else "icmpv6"] = True
        f["icmp.type"], f["icmp.code"] = p[0], p[1]
    elif kind == ARP:
        f["arp.sip"], f["arp.tip"] = ipaddress.IPv4Address(p[:4]), ipaddress.IPv4Address(p[4:8])
        f["arp.op"] = struct.unpack("!H", p[8:10])[0]
    elif kind == ND:
        f["nd"] = True
        f["nd.target"] = ipaddress.IPv6Address(p[:16])


# --- packets ---------------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _with_l4_checksum(segment: bytes, csum_at: int, pseudo: bytes, proto: int) -> bytes:
    """Fill in a TCP/UDP/ICMPv6 checksum over the IP pseudo-header."""
    csum = _checksum(pseudo + segment)
    if proto == PROTO_UDP and csum == 0:
        csum = 0xFFFF
    return segment[:csum_at] + _be16(csum) + segment[csum_at + 2 :]


def _pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!I3xB", length, proto)


@dataclass(frozen=True)
class _Conn:
    """Addresses and ports of one packet, and the client->server tuple conntrack would hold."""

    src: bytes
    dst: bytes
    sport: int
    dport: int
    from_server: bool

    @property
    def orig(self) -> tuple[bytes, bytes, int, int]:
        if self.from_server:
            return self.dst, self.src, self.dport, self.sport
        return self.src, self.dst, self.sport, self.dport


@dataclass(frozen=True)
class _Net:
    """The network part of an upcall: the packet from its L3 header on, and the key
    attributes from eth_type on. conn and ct_new serve the conntrack attributes."""

    eth_type: int
    packet: bytes
    key: _Key
    pkt_uniq_off: int
    conn: _Conn | None = None
    ct_new: bool = False


def _ipv4(conn: _Conn, proto: int, payload: bytes, *, tos: int, ttl: int, ident: int,
          frag_field: int, total_len: int | None = None) -> bytes:
    length = total_len if total_len is not None else 20 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, tos, length, ident, frag_field, ttl, proto, 0,
                         conn.src, conn.dst)
    return header[:10] + _be16(_checksum(header)) + header[12:] + payload


def _ipv6(conn: _Conn, proto: int, payload: bytes, *, tclass: int, label: int, hlimit: int
          ) -> bytes:
    first = (6 << 28) | (tclass << 20) | label
    return struct.pack("!IHBB", first, len(payload), proto, hlimit) + conn.src + conn.dst + payload


@dataclass(frozen=True)
class _Ports:
    """Datapath port numbers of one dpif: VM taps, the uplink (which carries VLANs), an L3
    GRE port, and a VXLAN port (0 for none)."""

    taps: tuple[int, ...]
    uplink: int
    gre: int
    vxlan: int = 0


class _Generator:
    """Builds upcalls for one seed. Topology: two dpifs; VMs on taps, uplinks carrying VLANs,
    a VXLAN port on br-tun and an L3 GRE port on each dpif."""

    PORTS = {
        OVS_SYSTEM: _Ports(taps=(2, 3, 4), uplink=1, gre=5),
        BR_TUN: _Ports(taps=(), uplink=2, gre=3, vxlan=1),
    }
    SERVICES_TCP = (80, 80, 80, 443, 443, 22, 8080, 3306, 5432, 6379)
    SERVICES_UDP = (53, 53, 123, 443, 514, 5353)

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    # -- addresses

    def _vm_mac(self) -> bytes:
        return bytes([0xFA, 0x16, 0x3E]) + self.rng.randbytes(3)

    def _router_mac(self) -> bytes:
        return bytes([0x52, 0x54, 0x00, 0x12, 0x35, self.rng.choice((0x02, 0x03))])

    def _ipv4_pair(self) -> tuple[bytes, bytes]:
        local = bytes([10, 0, self.rng.randrange(0, 4), self.rng.randrange(2, 250)])
        remote = self.rng.choice(((192, 0, 2), (198, 51, 100), (203, 0, 113)))
        return local, bytes([*remote, self.rng.randrange(1, 255)])

    def _ipv6_pair(self) -> tuple[bytes, bytes]:
        local = bytes.fromhex("20010db8000000010000000000000000")[:8] + self.rng.randbytes(8)
        remote = bytes.fromhex("20010db8ffff00000000000000000000")[:12] + self.rng.randbytes(4)
        return local, remote

    def _conn(self, v6: bool, service: int) -> _Conn:
        local, remote = self._ipv6_pair() if v6 else self._ipv4_pair()
        outbound = self.rng.random() < 0.5
        src, dst = (local, remote) if outbound else (remote, local)
        from_server = self.rng.random() < 0.3
        ephemeral = self.rng.randrange(32768, 61000)
        sport, dport = (service, ephemeral) if from_server else (ephemeral, service)
        return _Conn(src, dst, sport, dport, from_server)

    # -- payloads

    def _payload(self, service: int, size: int, from_server: bool) -> bytes:
        if service in (80, 8080):
            text = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 4096\r\n\r\n"
                    if from_server else
                    b"GET /index.html HTTP/1.1\r\nHost: www.example.com\r\nAccept: */*\r\n\r\n")
            filler = b"<p>lorem ipsum dolor sit amet</p>\n" * (size // 34 + 1)
            return (text + filler)[:size]
        return self.rng.randbytes(size)

    def _dns(self, response: bool) -> bytes:
        name = self.rng.choice((b"www.example.com", b"mirror.example.org", b"ntp.example.net"))
        qname = b"".join(bytes([len(part)]) + part for part in name.split(b".")) + b"\0"
        flags, answers = (0x8180, 1) if response else (0x0100, 0)
        msg = struct.pack("!HHHHHH", self.rng.randrange(65536), flags, 1, answers, 0, 0)
        msg += qname + struct.pack("!HH", 1, 1)
        if response:
            msg += struct.pack("!HHHIH", 0xC00C, 1, 1, 300, 4) + bytes([93, 184, 216, 34])
        return msg

    # -- layer 3 and 4

    def tcp(self, v6: bool, service: int | None = None, flags: int | None = None,
            ip_len: int | None = None) -> _Net:
        conn = self._conn(v6, service or self.rng.choice(self.SERVICES_TCP))
        server_port = conn.sport if conn.from_server else conn.dport
        if flags is None:
            choices = ((SYN | ACK, ACK, PSH | ACK, FIN | ACK, RST | ACK) if conn.from_server
                       else (SYN, ACK, PSH | ACK, PSH | ACK, FIN | ACK, RST))
            flags = self.rng.choice(choices)
        ip_header = 40 if v6 else 20
        if flags & SYN:  # MSS, SACK permitted, timestamps, window scale
            options = (struct.pack("!BBH", 2, 4, 1460) + b"\x04\x02\x08\x0a"
                       + self.rng.randbytes(8) + b"\x01\x03\x03\x07")
        else:  # NOP NOP timestamps
            options = b"\x01\x01\x08\x0a" + self.rng.randbytes(8)
        header_len = 20 + len(options)
        if ip_len is not None:
            data_len = max(0, ip_len - ip_header - header_len)
        elif flags & PSH:
            small = self.rng.random() < 0.5
            data_len = self.rng.randrange(1, 300) if small else self.rng.randrange(300, 1449)
        else:
            data_len = 0
        segment = struct.pack("!HHIIBBHHH", conn.sport, conn.dport, self.rng.getrandbits(32),
                              self.rng.getrandbits(32) if flags & ACK else 0,
                              (header_len // 4) << 4, flags, self.rng.randrange(500, 65535), 0, 0)
        segment += options + self._payload(server_port, data_len, conn.from_server)
        l4 = _Key()
        l4.put(TCP, struct.pack("!HH", conn.sport, conn.dport))
        l4.put(TCP_FLAGS, _be16(flags))
        return self._ip(conn, PROTO_TCP, segment, 16, l4, ct_new=flags == SYN)

    def udp(self, v6: bool, service: int | None = None, ip_len: int | None = None) -> _Net:
        service = service or self.rng.choice(self.SERVICES_UDP)
        conn = self._conn(v6, service)
        ip_header = 40 if v6 else 20
        if ip_len is not None:
            data = self.rng.randbytes(max(0, ip_len - ip_header - 8))
        elif service == 53:
            data = self._dns(conn.from_server)
        elif service == 123:
            data = bytes([0x24 if conn.from_server else 0x23]) + self.rng.randbytes(47)
        elif service == 443:  # QUIC long header initial
            data = b"\xc3\x00\x00\x00\x01" + self.rng.randbytes(self.rng.randrange(1195, 1250))
        else:
            data = self.rng.randbytes(self.rng.randrange(20, 400))
        datagram = struct.pack("!HHHH", conn.sport, conn.dport, 8 + len(data), 0) + data
        l4 = _Key()
        l4.put(UDP, struct.pack("!HH", conn.sport, conn.dport))
        return self._ip(conn, PROTO_UDP, datagram, 6, l4, ct_new=not conn.from_server)

    def icmp_echo(self, v6: bool, size: int | None = None) -> _Net:
        conn = self._conn(v6, 0)
        kind = (128 if v6 else 8) if not conn.from_server else (129 if v6 else 0)
        data = self._payload(0, size if size is not None else 56, False)
        message = struct.pack("!BBHHH", kind, 0, 0, self.rng.randrange(65536),
                              self.rng.randrange(1, 200)) + data
        l4 = _Key()
        l4.put(ICMPV6 if v6 else ICMP, bytes([kind, 0]))
        return self._ip(conn, PROTO_ICMPV6 if v6 else PROTO_ICMP, message, 2, l4)

    def neighbour(self, advert: bool, mac: bytes) -> _Net:
        """An IPv6 neighbour solicitation (with source link-layer option) or advertisement."""
        me = _link_local(mac)
        target = bytes.fromhex("fe80000000000000f8163efffe") + self.rng.randbytes(3)
        if advert:
            conn = _Conn(target, me, 0, 0, True)
            body = struct.pack("!BBHI", 136, 0, 0, 0x60000000) + target + b"\x02\x01" + mac
            nd = target + bytes(6) + mac
        else:
            solicited_node = bytes.fromhex("ff0200000000000000000001ff") + target[13:]
            conn = _Conn(me, solicited_node, 0, 0, False)
            body = struct.pack("!BBHI", 135, 0, 0, 0) + target + b"\x01\x01" + mac
            nd = target + mac + bytes(6)
        l4 = _Key()
        l4.put(ICMPV6, bytes([body[0], 0]))
        l4.put(ND, nd)
        return self._ip(conn, PROTO_ICMPV6, body, 2, l4, hlimit=255)

    def udp_fragment(self, later: bool) -> _Net:
        """One fragment of a 3000-byte UDP datagram (frag=first carries the UDP header)."""
        conn = self._conn(False, self.rng.choice((53, 2049, 4739)))
        data = self.rng.randbytes(3000 - 8)
        pseudo = _pseudo_header(conn.src, conn.dst, PROTO_UDP, 8 + len(data))
        datagram = _with_l4_checksum(
            struct.pack("!HHHH", conn.sport, conn.dport, 8 + len(data), 0) + data, 6, pseudo,
            PROTO_UDP)
        first_len = 1480
        chunk = datagram[first_len:] if later else datagram[:first_len]
        frag_field = (first_len // 8) if later else 0x2000  # offset in 8-byte units, or MF
        ident = self.rng.randrange(65536)
        packet = _ipv4(conn, PROTO_UDP, chunk, tos=0, ttl=self.rng.choice((52, 57, 64)),
                       ident=ident, frag_field=frag_field)
        key = _Key()
        key.put(ETHERTYPE, _be16(ETH_IPV4))
        key.put(IPV4, conn.src + conn.dst + bytes([PROTO_UDP, 0, packet[8],
                                                   FRAG_LATER if later else FRAG_FIRST]),
                uniq_at=0)
        if not later:
            key.put(UDP, struct.pack("!HH", conn.sport, conn.dport))
        return _Net(ETH_IPV4, packet, key, 12)

    def _ip(self, conn: _Conn, proto: int, segment: bytes, csum_at: int, l4: _Key,
            hlimit: int | None = None, ct_new: bool = False) -> _Net:
        v6 = len(conn.src) == 16
        pseudo = (b"" if proto == PROTO_ICMP
                  else _pseudo_header(conn.src, conn.dst, proto, len(segment)))
        segment = _with_l4_checksum(segment, csum_at, pseudo, proto)
        key = _Key()
        if v6:
            key.put(ETHERTYPE, _be16(ETH_IPV6))
            if proto == PROTO_ICMPV6:  # ping and neighbour discovery: no class, no label
                tclass, label = 0, 0
            else:
                tclass, label = self.rng.choice((0, 0, 0, 0x10, 0xB8)), self.rng.getrandbits(20)
            hops = hlimit if hlimit is not None else self.rng.choice((64, 57, 255))
            packet = _ipv6(conn, proto, segment, tclass=tclass, label=label, hlimit=hops)
            key.put(IPV6, conn.src + conn.dst + struct.pack("!IBBBB", label, proto, tclass, hops,
                                                            FRAG_NO), uniq_at=12)
            key.put(IPV6_EXTHDRS, struct.pack("<H", 0))
            pkt_uniq = 8 + 12
        else:
            key.put(ETHERTYPE, _be16(ETH_IPV4))
            tos = self.rng.choice((0, 0, 0, 0x10, 0xB8))
            ttl = hlimit if hlimit is not None else self.rng.choice((64, 64, 128, 57, 52))
            packet = _ipv4(conn, proto, segment, tos=tos, ttl=ttl,
                           ident=self.rng.randrange(65536),
                           frag_field=0x4000 if proto == PROTO_TCP else 0)
            key.put(IPV4, conn.src + conn.dst + bytes([proto, tos, ttl, FRAG_NO]), uniq_at=0)
            pkt_uniq = 12
        key.extend(l4)
        return _Net(ETH_IPV6 if v6 else ETH_IPV4, packet, key, pkt_uniq, conn, ct_new)

    def arp(self, reply: bool, mac: bytes) -> tuple[_Net, bytes]:
        """An ARP request (to broadcast) or reply; returns it with its Ethernet destination."""
        sip, tip = self._ipv4_pair()
        peer = self._router_mac()
        tha = peer if reply else bytes(6)
        op = 2 if reply else 1
        packet = struct.pack("!HHBBH", 1, ETH_IPV4, 6, 4, op) + mac + sip + tha + tip
        key = _Key()
        key.put(ETHERTYPE, _be16(ETH_ARP))
        key.put(ARP, sip + tip + _be16(op) + mac + tha + bytes(2), uniq_at=0)
        return _Net(ETH_ARP, packet, key, 14), (peer if reply else b"\xff" * 6)

    # -- whole upcalls

    def upcall(self, shape: str, net_kind: str, *, dpif: str | None = None,
               upcall_type: int | None = None, ct: bool = False, **options: Any) -> Upcall:
        """shape: eth, vlan, qinq or l3; net_kind: tcp, tcp6, udp, udp6, icmp, icmp6, arp,
        arp-reply, ns, na, frag-first, frag-later. options go to the layer-4 builder."""
        rng = self.rng
        dpif = dpif or (OVS_SYSTEM if rng.random() < 0.7 else BR_TUN)
        upcall_type = upcall_type if upcall_type is not None else (
            UPCALL_ACTION if rng.random() < 0.2 else UPCALL_MISS)
        ports = self.PORTS[dpif]
        if shape == "l3":
            in_port, tunnel = ports.gre, self._tunnel(gre=True)
        elif shape in ("vlan", "qinq"):
            in_port, tunnel = ports.uplink, None
        else:
            in_port = rng.choice((*ports.taps, ports.uplink, ports.vxlan or ports.uplink))
            tunnel = self._tunnel(gre=False) if in_port == ports.vxlan else None
        src_mac = self._vm_mac() if in_port in ports.taps else self._router_mac()
        dst_mac = self._vm_mac()
        if net_kind in ("arp", "arp-reply"):
            net, dst_mac = self.arp(net_kind == "arp-reply", src_mac)
        elif net_kind in ("ns", "na"):
            net = self.neighbour(net_kind == "na", src_mac)
            if net_kind == "ns":  # the multicast MAC of the solicited-node address
                dst_mac = bytes([0x33, 0x33]) + net.packet[36:40]
        elif net_kind.startswith("frag-"):
            net = self.udp_fragment(net_kind == "frag-later")
        else:
            v6 = net_kind.endswith("6")
            build = {"tcp": self.tcp, "udp": self.udp, "icmp": self.icmp_echo}[net_kind.rstrip("6")]
            net = build(v6, **options)

        key = _Key()
        recirc_id = rng.randrange(1, 0x40) if ct else 0
        key.put(RECIRC_ID, _u32(recirc_id))
        key.put(DP_HASH, _u32(0))
        key.put(PRIORITY, _u32(0))
        if tunnel is not None:
            key.put(TUNNEL, tunnel)
        key.put(IN_PORT, _u32(in_port))
        key.put(SKB_MARK, _u32(0))
        self._put_conntrack(key, net if ct else None)
        packet_uniq = net.pkt_uniq_off
        if shape == "l3":
            key.extend(net.key)
            packet = net.packet
        else:
            key.put(ETHERNET, src_mac + dst_mac)
            vlans = self._vlans(shape)
            key.extend(_vlan_key(vlans, net.key))
            tags = b"".join(struct.pack("!HH", tpid, tci) for tpid, tci in vlans)
            packet = dst_mac + src_mac + tags + _be16(net.eth_type) + net.packet
            packet_uniq += 14 + len(tags)
            if in_port == ports.uplink and len(packet) < 60:  # the NIC pads short frames
                packet += bytes(60 - len(packet))
        assert len(key.data) <= MAX_KEY_LEN, f"{len(key.data)}-byte key for {shape}/{net_kind}"
        return Upcall(dpif, upcall_type, packet, bytes(key.data), key.uniq_off, packet_uniq)

    def _vlans(self, shape: str) -> list[tuple[int, int]]:
        pcp = self.rng.choice((0, 0, 0, 5))
        inner = (ETH_VLAN, (pcp << 13) | self.rng.choice((100, 101, 200, 300, 1024)))
        if shape == "vlan":
            return [inner]
        if shape == "qinq":
            return [(ETH_QINQ, self.rng.choice((10, 20, 3000))), inner]
        return []

    def _tunnel(self, gre: bool) -> bytes:
        """A kernel tunnel key: VXLAN (tun_id, src, dst, ttl, tp_src, tp_dst) or keyed GRE."""
        remote = bytes([172, 16, 0, self.rng.randrange(2, 40)])
        attrs = (_nla(TUN_ID, struct.pack("!Q", self.rng.choice((0x64, 0x3E9, 0x1F5))))
                 + _nla(TUN_IPV4_SRC, remote) + _nla(TUN_IPV4_DST, bytes([172, 16, 0, 1]))
                 + _nla(TUN_TTL, bytes([64])))
        if not gre:
            attrs += (_nla(TUN_TP_SRC, _be16(self.rng.randrange(32768, 61000)))
                      + _nla(TUN_TP_DST, _be16(4789)))
        return attrs

    def _put_conntrack(self, key: _Key, tracked: _Net | None) -> None:
        """ct_state..ct_label always (the kernel emits them, zero when untracked), and the
        original-direction tuple for a tracked TCP or UDP packet after recirculation."""
        conn = tracked.conn if tracked is not None else None
        if tracked is None or conn is None:
            state, zone, mark = 0, 0, 0
        else:
            state = (CT_TRK | (CT_NEW if tracked.ct_new else CT_EST)
                     | (CT_RPL if conn.from_server else 0))
            zone, mark = self.rng.choice((0, 5, 10)), self.rng.choice((0, 0, 1))
        key.put(CT_STATE, _u32(state))
        key.put(CT_ZONE, struct.pack("<H", zone))
        key.put(CT_MARK, _u32(mark))
        key.put(CT_LABELS, bytes(16))
        if tracked is not None and conn is not None:
            proto = tracked.packet[9] if tracked.eth_type == ETH_IPV4 else tracked.packet[6]
            src, dst, sport, dport = conn.orig
            tuple_attr = CT_ORIG_TUPLE_IPV4 if len(src) == 4 else CT_ORIG_TUPLE_IPV6
            key.put(tuple_attr, src + dst + struct.pack("!HHB3x", sport, dport, proto))


def _link_local(mac: bytes) -> bytes:
    """fe80::/64 with the modified EUI-64 interface id of mac."""
    return (bytes.fromhex("fe80000000000000") + bytes([mac[0] ^ 0x02]) + mac[1:3] + b"\xff\xfe"
            + mac[3:])


def _vlan_key(vlans: list[tuple[int, int]], inner: _Key) -> _Key:
    """eth_type(tpid), vlan(tci|CFI), encap(...) for each tag, outermost first."""
    for tpid, tci in reversed(vlans):
        outer = _Key()
        outer.put(ETHERTYPE, _be16(tpid))
        outer.put(VLAN, _be16(tci | 0x1000))
        outer.nest(ENCAP, inner)
        inner = outer
    return inner


# --- the mixes -------------------------------------------------------------------------------

# Every kind once in "mixed" (shape, kind, extra options), so any mix of >= 30 covers them all.
_MIXED_COVERAGE: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("eth", "tcp", {"service": 80, "flags": SYN}),
    ("eth", "tcp", {"service": 80, "flags": PSH | ACK, "ip_len": 1500}),
    ("eth", "tcp", {"service": 443, "flags": SYN | ACK}),
    ("eth", "tcp", {"service": 22, "flags": RST}),
    ("eth", "tcp", {"service": 80, "flags": FIN | ACK}),
    ("eth", "tcp", {"service": 80, "flags": PSH | ACK, "ip_len": 9000}),  # the jumbo
    ("eth", "udp", {"service": 53}),
    ("eth", "udp", {"service": 123}),
    ("eth", "icmp", {}),
    ("eth", "arp", {}),
    ("eth", "arp-reply", {}),
    ("eth", "tcp6", {"service": 80}),
    ("eth", "udp6", {"service": 443}),
    ("eth", "icmp6", {}),
    ("eth", "ns", {}),
    ("eth", "na", {}),
    ("eth", "frag-first", {}),
    ("eth", "frag-later", {}),
    ("vlan", "tcp", {"service": 80}),
    ("vlan", "udp", {}),
    ("vlan", "arp", {}),
    ("vlan", "tcp6", {}),
    ("qinq", "tcp", {"service": 80}),
    ("qinq", "icmp", {}),
    ("l3", "tcp", {"service": 80}),
    ("l3", "tcp6", {"service": 80}),
    ("l3", "udp", {}),
    ("l3", "udp6", {}),
    ("l3", "icmp", {}),
)
_SHAPE_WEIGHTS = {"eth": 70, "vlan": 14, "qinq": 4, "l3": 12}
_KIND_WEIGHTS = {"tcp": 40, "udp": 15, "icmp": 6, "arp": 5, "arp-reply": 3, "tcp6": 12,
                 "udp6": 6, "icmp6": 4, "ns": 3, "na": 2, "frag-first": 2, "frag-later": 2}
_L2_ONLY = {"arp", "arp-reply", "ns", "na", "frag-first", "frag-later"}

# The demo: a short, readable story, cycled.
_BASIC_SCRIPT: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("eth", "arp", {}),
    ("eth", "arp-reply", {}),
    ("eth", "icmp", {}),
    ("eth", "udp", {"service": 53}),
    ("eth", "tcp", {"service": 80, "flags": SYN}),
    ("eth", "tcp", {"service": 80, "flags": PSH | ACK}),
    ("eth", "ns", {}),
    ("eth", "icmp6", {}),
    ("eth", "tcp6", {"service": 443, "flags": SYN}),
    ("vlan", "tcp", {"service": 80}),
    ("l3", "udp", {"service": 123}),
    ("eth", "tcp", {"service": 22, "flags": SYN}),
)


def _weighted(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def generate(mix: str, count: int, seed: int) -> list[Upcall]:
    """count upcalls of a mix, reproducibly for a seed.

    basic: a small readable set for the demo; mixed: every kind above (two dpifs, both
    types, several ports, ct/recirculated flows, tunnels), then a weighted random mix;
    repeat: count distinct flows with packets up to full size (1500-byte IP), for throughput.
    """
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r} (choose from {', '.join(MIXES)})")
    if count < 0:
        raise ValueError("count must not be negative")
    gen = _Generator(seed)
    rng = gen.rng
    upcalls: list[Upcall] = []
    if mix == "basic":
        for index in range(count):
            shape, kind, options = _BASIC_SCRIPT[index % len(_BASIC_SCRIPT)]
            upcalls.append(gen.upcall(shape, kind, upcall_type=UPCALL_MISS, **options))
        return upcalls
    if mix == "mixed":
        for shape, kind, options in _MIXED_COVERAGE[:count]:
            upcalls.append(gen.upcall(shape, kind, **options))
        while len(upcalls) < count:
            kind = _weighted(rng, _KIND_WEIGHTS)
            shape = _weighted(rng, _SHAPE_WEIGHTS)
            if kind in _L2_ONLY and shape == "l3":
                shape = "eth"
            ct = kind in ("tcp", "tcp6", "udp", "udp6") and shape == "eth" and rng.random() < 0.15
            upcalls.append(gen.upcall(shape, kind, ct=ct))
        rng.shuffle(upcalls)
        return upcalls
    seen: set[bytes] = set()
    while len(upcalls) < count:
        kind = rng.choice(("tcp", "tcp", "tcp", "udp", "tcp6", "udp6"))
        shape = _weighted(rng, {"eth": 80, "vlan": 12, "l3": 8})
        ip_len = rng.randrange(60, 1501)
        options: dict[str, object] = {"ip_len": ip_len}
        if kind.startswith("tcp"):
            options["flags"] = PSH | ACK
        upcall = gen.upcall(shape, kind, **options)
        if upcall.key not in seen:
            seen.add(upcall.key)
            upcalls.append(upcall)
    return upcalls


# --- record files ----------------------------------------------------------------------------


def encode_records(upcalls: list[Upcall]) -> bytes:
    parts = [FILE_MAGIC]
    for up in upcalls:
        dpif = up.dpif.encode()
        parts.append(_RECORD_HEADER.pack(len(dpif), 0, up.type, len(up.packet), len(up.key),
                                         up.key_uniq_off, up.pkt_uniq_off))
        parts += (dpif, up.packet, up.key)
    return b"".join(parts)


def decode_records(data: bytes) -> list[Upcall]:
    if not data.startswith(FILE_MAGIC):
        raise ValueError("not an upcall record file (no UPCREC1 header)")
    upcalls = []
    offset = len(FILE_MAGIC)
    while offset < len(data):
        if offset + _RECORD_HEADER.size > len(data):
            raise ValueError(f"record {len(upcalls)}: truncated header")
        dpif_len, _, kind, pkt_len, key_len, key_uniq, pkt_uniq = _RECORD_HEADER.unpack_from(
            data, offset)
        offset += _RECORD_HEADER.size
        end = offset + dpif_len + pkt_len + key_len
        if end > len(data):
            raise ValueError(f"record {len(upcalls)}: truncated body")
        for name, where, size in (("key", key_uniq, key_len), ("packet", pkt_uniq, pkt_len)):
            if where != -1 and not 0 <= where <= size - 4:
                raise ValueError(f"record {len(upcalls)}: {name} unique offset {where} "
                                 f"outside its {size} bytes")
        dpif = data[offset : offset + dpif_len].decode()
        packet = data[offset + dpif_len : offset + dpif_len + pkt_len]
        key = data[offset + dpif_len + pkt_len : end]
        upcalls.append(Upcall(dpif, kind, packet, key, key_uniq, pkt_uniq))
        offset = end
    return upcalls


def write_records(path: str | Path, upcalls: list[Upcall]) -> None:
    Path(path).write_bytes(encode_records(upcalls))


def read_records(path: str | Path) -> list[Upcall]:
    return decode_records(Path(path).read_bytes())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a file of realistic upcall records for upcall-replay.")
    parser.add_argument("--mix", choices=MIXES, default="mixed",
                        help="basic: demo set; mixed: every kind of upcall; "
                             "repeat: distinct full-size flows for throughput runs")
    parser.add_argument("--count", type=int,
                        help="number of records (default: basic 40, mixed 2000, repeat 4000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("-o", "--output", required=True, help="record file to write")
    args = parser.parse_args(argv)
    count = DEFAULT_COUNTS[args.mix] if args.count is None else args.count
    if count < 0:
        parser.error("--count must not be negative")
    upcalls = generate(args.mix, count, args.seed)
    try:
        write_records(args.output, upcalls)
    except OSError as err:
        print(f"upcalls.py: cannot write {args.output}: {err.strerror}", file=sys.stderr)
        return 1
    print(f"upcalls.py: wrote {len(upcalls)} {args.mix} records to {args.output}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
