"""upcall_capture.actions: OVS 3.1's format_odp_actions() text of netlink action lists."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from actions_gen import generate, nla, u16, u32
from conftest import ovs_texts

from upcall_capture.actions import format_actions


def ip(text: str) -> bytes:
    return bytes(int(part) for part in text.split("."))


def mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


IPV4_KEY = ip("10.0.0.1") + ip("10.0.0.2") + bytes([6, 0, 64, 0])
TUNNEL_KEY = (nla(0, struct.pack(">Q", 5)) + nla(1, ip("1.1.1.1")) + nla(2, ip("2.2.2.2"))
              + nla(4, b"\x40") + nla(5) + nla(10, struct.pack(">H", 4789)))


def cookie(kind: int, body: bytes) -> bytes:
    return u16(kind) + bytes(22) + body + bytes(24 - len(body))


CASES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "drop"),
    ("output", nla(1, u32(3)), "3"),
    ("drop", nla(25, u32(7)), "drop"),
    ("recirc", nla(7, u32(0)) + nla(7, u32(0x1a)), "recirc(0),recirc(0x1a)"),
    ("hash", nla(8, u32(0) + u32(5)) + nla(8, u32(9) + u32(1)),
     "hash(l4(5)),hash(Unknown hash algorithm(9))"),
    ("push_vlan", nla(4, struct.pack(">HH", 0x8100, 0x1005)) + nla(4, struct.pack(
        ">HH", 0x88A8, 0x2005)), "push_vlan(vid=5,pcp=0),push_vlan(tpid=0x88a8,vid=5,pcp=1,cfi=0)"),
    ("pop_vlan trunc meter", nla(5) + nla(13, u32(100)) + nla(19, u32(2)),
     "pop_vlan,trunc(100),meter(2)"),
    ("bad length", nla(1, b"\x01\x02\x03"), "bad length 3, expected 4 for: action1(01 02 03)"),
    ("unknown type", nla(99, b"ab"), "bad length 2, expected -1 for: action99(61 62)"),
    ("leftover", nla(1, u32(1)) + b"\x01\x02", "1,***2 leftover bytes*** (0102)"),
    ("all leftover", b"\x02\x00\x01\x00", "<empty>,***4 leftover bytes*** (02000100)"),
    ("userspace", nla(2, nla(1, u32(7)) + nla(4) + nla(3, u32(9))),
     "userspace(pid=7,actions,tunnel_out_port=9)"),
    ("userspace no pid", nla(2, nla(4)), "userspace(error)"),
    ("userdata", nla(2, nla(1, u32(1)) + nla(2, b"\xab\xcd")), "userspace(pid=1,userdata(abcd))"),
    ("slow_path", nla(2, nla(1, u32(1)) + nla(2, cookie(2, bytes(4) + u32(0x21)))),
     "userspace(pid=1,slow_path(cfm,action))"),
    ("ipfix", nla(2, nla(1, u32(1)) + nla(2, cookie(4, u32(3)))),
     "userspace(pid=1,ipfix(output_port=3))"),
    ("flow_sample", nla(2, nla(1, u32(1)) + nla(2, cookie(
        3, u16(10) + bytes(2) + u32(1) + u32(2) + u32(3) + u32(4) + u32(1)))),
     "userspace(pid=1,flow_sample(probability=10,collector_set_id=1,obs_domain_id=2,"
     "obs_point_id=3,output_port=4,ingress))"),
    ("controller", nla(2, nla(1, u32(1)) + nla(2, cookie(
        5, bytes([1, 0]) + u16(1) + u32(3) + struct.pack(">Q", 0xBEEF) + u16(0) + u16(128)))),
     "userspace(pid=1,controller(reason=1,dont_send=1,continuation=0,recirc_id=3,"
     "rule_cookie=0xbeef,controller_id=0,max_len=128))"),
    ("sflow", nla(2, nla(1, u32(1)) + nla(2, cookie(1, struct.pack(">H", 0x2005) + bytes(2)
                                                    + u32(9)))),
     "userspace(pid=1,sFlow(vid=5,pcp=1,output=9))"),
    ("set ipv4", nla(3, nla(7, IPV4_KEY)),
     "set(ipv4(src=10.0.0.1,dst=10.0.0.2,proto=6,tos=0,ttl=64,frag=no))"),
    ("set tunnel", nla(3, nla(16, TUNNEL_KEY)),
     "set(tunnel(tun_id=0x5,src=1.1.1.1,dst=2.2.2.2,ttl=64,tp_dst=4789,flags(df|key)))"),
    ("set_masked ipv4", nla(11, nla(7, ip("10.0.0.1") + bytes(8) + ip("255.255.255.0")
                                    + bytes(8))), "set(ipv4(src=10.0.0.1/255.255.255.0))"),
    ("set_masked eth", nla(11, nla(4, mac("00:00:00:00:00:00") + mac("0a:00:00:00:00:01")
                                   + bytes(6) + b"\xff" * 6)),
     "set(eth(dst=0a:00:00:00:00:01))"),
    ("set_masked tcp", nla(11, nla(9, struct.pack(">HHHH", 80, 0, 0xFFFF, 0))),
     "set(tcp(src=80))"),
    ("set_masked ipv6 label", nla(11, nla(8, bytes(32) + struct.pack(">I", 5) + bytes(4)
                                          + bytes(32) + struct.pack(">I", 0xFFFFF) + bytes(4))),
     "set(ipv6(label=0x5))"),
    ("set_masked ct_mark", nla(11, nla(24, u32(1) + u32(0xFF))), "set(ct_mark(0x1/0xff))"),
    ("ct", nla(12, nla(1) + nla(2, u16(5)) + nla(3, u32(1) + u32(0xFFFFFFFF))),
     "ct(commit,zone=5,mark=0x1/0xffffffff)"),
    ("ct plain", nla(12), "ct"),
    ("ct helper nat", nla(12, nla(1) + nla(5, b"ftp\0") + nla(6, nla(1) + nla(3, ip("1.2.3.4"))
                                                          + nla(4, ip("1.2.3.9"))
                                                          + nla(5, u16(10)) + nla(9))),
     "ct(commit,helper=ftp,nat(src=1.2.3.4-1.2.3.9:10,random))"),
    ("ct nat ipv6", nla(12, nla(6, nla(2) + nla(3, bytes(15) + b"\x01") + nla(5, u16(80)))),
     "ct(nat(dst=[::1]:80))"),
    ("ct nat error", nla(12, nla(6, nla(1) + nla(2))),
     'ct(nat(error: Only one of "src" or "dst" may be present.))'),
    ("ct bad zone", nla(12, nla(2, b"\x01")), "ct(error)"),
    ("ct labels", nla(12, nla(4, u32(1) + bytes(12) + b"\xff" * 16)), "ct(label=0x1)"),
    ("mpls", nla(9, struct.pack(">IHH", 0x00014140, 0x8847, 0)) + nla(10, struct.pack(
        ">H", 0x800)), "push_mpls(label=20,tc=0,ttl=64,bos=1,eth_type=0x8847),"
     "pop_mpls(eth_type=0x800)"),
    ("add_mpls", nla(22, struct.pack(">IHH", 0x00014140, 0x8847, 1)),
     "add_mpls(label=20,tc=0,ttl=64,bos=1,eth_type=0x8847)"),
    ("sample", nla(6, nla(1, u32(0x7FFFFFFF)) + nla(2, nla(1, u32(2)))),
     "sample(sample=50.0%,actions(2))"),
    ("sample no actions", nla(6, nla(1, u32(1))), "sample(error)"),
    ("clone", nla(20, nla(16) + nla(1, u32(4))), "clone(ct_clear,4)"),
    ("clone empty", nla(20), "clone(drop)"),
    ("check_pkt_len", nla(21, nla(1, u16(1500)) + nla(2, nla(1, u32(1))) + nla(3)),
     "check_pkt_len(size=1500,gt(1),le(drop))"),
    ("push_eth pop_eth", nla(14, mac("00:00:00:00:00:01") + mac("00:00:00:00:00:02")) + nla(15),
     "push_eth(src=00:00:00:00:00:01,dst=00:00:00:00:00:02),pop_eth"),
    ("push_nsh", nla(17, nla(28, nla(1, bytes([0, 63, 1, 3]) + struct.pack(">I", 0x100FF))
                             + nla(2, bytes(16)))),
     "push_nsh(flags=0,ttl=63,mdtype=1,np=3,spi=0x100,si=255,c1=0x0,c2=0x0,c3=0x0,c4=0x0)"),
    ("pop_nsh", nla(18), "pop_nsh()"),
    ("tnl_pop lb_output", nla(24, u32(4)) + nla(26, u32(1)), "tnl_pop(4),lb_output(1)"),
]


@pytest.mark.parametrize("data, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_known_text(data: bytes, expected: str) -> None:
    assert format_actions(data) == expected


def test_tnl_push_vxlan() -> None:
    eth = mac("00:00:00:00:00:02") + mac("00:00:00:00:00:01") + b"\x08\x00"
    ipv4 = bytes([0x45, 0, 0, 50, 0, 0, 0x40, 0, 64, 17, 0, 0]) + ip("1.1.1.1") + ip("2.2.2.2")
    udp = struct.pack(">HHHH", 1234, 4789, 0, 0)
    vxlan = struct.pack(">II", 0x08000000, 0x7B << 8)
    header = eth + ipv4 + udp + vxlan
    data = nla(23, u32(4) + u32(1) + u32(len(header)) + u32(4) + header)
    assert format_actions(data) == (
        "tnl_push(tnl_port(4),header(size=50,type=4,eth(dst=00:00:00:00:00:02,"
        "src=00:00:00:00:00:01,dl_type=0x0800),ipv4(src=1.1.1.1,dst=2.2.2.2,proto=17,"
        "tos=0,ttl=64,frag=0x4000),udp(src=1234,dst=4789,csum=0x0),"
        "vxlan(flags=0x8000000,vni=0x7b)),out_port(1))")


def test_never_raises_on_garbage() -> None:
    import random

    rng = random.Random(5)
    for _ in range(2000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        assert isinstance(format_actions(data), str)


def test_generated_cases_match_ovs(ovs_format: Path) -> None:
    """Every kind, valid and malformed, as OVS 3.1's own format_odp_actions() prints it
    (tests/system/ovs-format.c, built with the guest's OVS tree)."""
    cases = generate(5000, seed=1)
    expected = ovs_texts(ovs_format, [f"A {case.hex()}" for case in cases])
    mismatches = [(case.hex(), want, format_actions(case))
                  for case, want in zip(cases, expected, strict=True)
                  if format_actions(case) != want]
    assert not mismatches[:5], f"{len(mismatches)} of {len(cases)} differ"
