"""The filter compiler, without root: the --filter language, the key walk, the cBPF
interpreter against libpcap's own, and the generated C compiled natively with gcc and run
over the replayed records.

Expectations come from the replayed records' own description (samples/replay/upcalls.py
decodes each key independently) and from libpcap's pcap_offline_filter, never from the
code under test.
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import upcalls
from conftest import REPLAY_DIR, build_c
from hypothesis import given, settings
from hypothesis import strategies as st

from upcall_capture.errors import UsageError
from upcall_capture.filters import FilterError, FilterSpec, compile_filters, keywalk, pcap
from upcall_capture.filters.cbpf import Program
from upcall_capture.probe import loader
from upcall_capture.probe.record import HEADER, PKT_GAP_MAX, Upcall

RECORDS = upcalls.read_records(REPLAY_DIR / "mixed.upc")
PID, TID = 4242, 4243


def probe_upcall(replayed: upcalls.Upcall, *, thread: str = "handler1", snaplen: int = 1 << 20
                 ) -> Upcall:
    """A replayed upcall as the probe would record it."""
    return Upcall(ktime_ns=0, pid=PID, tid=TID, cpu=0, type=replayed.type, dpif=replayed.dpif,
                  thread=thread, flags=0, key=replayed.key, key_size=len(replayed.key),
                  packet=replayed.packet[:snaplen], pkt_size=len(replayed.packet))


UPCALLS = [probe_upcall(r) for r in RECORDS]


def nla(kind: int, payload: bytes) -> bytes:
    return struct.pack("<HH", 4 + len(payload), kind) + payload + bytes(-len(payload) % 4)


def matching(spec: FilterSpec, upcalls_: list[Upcall] = UPCALLS) -> list[int]:
    return [i for i, u in enumerate(upcalls_) if spec.matches(u)]


def expected(predicate: Callable[[upcalls.Upcall], bool]) -> list[int]:
    return [i for i, r in enumerate(RECORDS) if predicate(r)]


@functools.cache
def libpcap_program(expression: str, linktype: int) -> Program | None:
    try:
        return pcap.compile_expression(expression, linktype)
    except FilterError:
        return None


def libpcap_matches(expression: str, replayed: upcalls.Upcall) -> bool:
    """libpcap's own decision for one upcall, on the link type its key gives."""
    program = libpcap_program(expression, pcap.DLT_RAW if replayed.is_l3 else pcap.DLT_EN10MB)
    return program is not None and pcap.offline_filter(
        program, replayed.packet, len(replayed.packet)) != 0


def in_net(name: str, network: str) -> Callable[[upcalls.Upcall], bool]:
    net = ipaddress.ip_network(network)
    return lambda r: name in r.fields and r.fields[name] in net


# ---------------------------------------------------------------------------------------------
# --filter: what each term keeps, against the records' own description

OVS, TUN = upcalls.OVS_SYSTEM, upcalls.BR_TUN
CASES: list[tuple[list[str], Callable[[upcalls.Upcall], bool]]] = [
    (["dpif=system@ovs-system"], lambda r: r.dpif == OVS),
    (["dpif=system@br-tun,type=action"], lambda r: r.dpif == TUN and r.type == 1),
    (["type=miss"], lambda r: r.type == 0),
    (["type=1"], lambda r: r.type == 1),
    (["in_port=3"], lambda r: r.in_port == 3),
    (["in_port=2,dpif=system@br-tun"], lambda r: r.in_port == 2 and r.dpif == TUN),
    (["eth_type=0x86dd"], lambda r: r.fields["eth_type"] == 0x86DD),  # the inner one
    (["ipv4.src=10.0.0.0/16"], in_net("ipv4.src", "10.0.0.0/16")),
    (["ipv4.dst=192.0.2.0/255.255.255.0"], in_net("ipv4.dst", "192.0.2.0/24")),
    (["ipv4.dst=10.0.1.77/23"], in_net("ipv4.dst", "10.0.0.0/23")),
    (["ipv6.src=2001:db8:0:1::/64"], in_net("ipv6.src", "2001:db8:0:1::/64")),
    (["ipv6.dst=2001:db8:ffff::/48"], in_net("ipv6.dst", "2001:db8:ffff::/48")),
    (["proto=udp"], lambda r: r.fields.get("proto") == 17),
    (["proto=6,tp_dst=80"], lambda r: r.fields.get("proto") == 6 and r.fields.get("tp_dst") == 80),
    (["tp_src=0x8000/0x8000"], lambda r: r.fields.get("tp_src", 0) >= 0x8000),
    (["recirc_id=0x10/0xf0"], lambda r: r.fields["recirc_id"] & 0xF0 == 0x10),
    (["ct_state=+trk+est-rpl"], lambda r: r.fields["ct_state"] & 0x2A == 0x22),
    (["ct_state=0x21"], lambda r: r.fields["ct_state"] == 0x21),
    (["dpif=system@br-tun,type=action", "in_port=3,proto=tcp"],
     lambda r: (r.dpif == TUN and r.type == 1) or (r.in_port == 3 and r.fields.get("proto") == 6)),
]


@pytest.mark.parametrize(("meta", "predicate"), CASES, ids=[" ".join(m) for m, _ in CASES])
def test_filter_keeps_exactly_the_matching_upcalls(meta, predicate):
    want = expected(predicate)
    assert 0 < len(want) < len(RECORDS), "the case must select something, not everything"
    assert matching(compile_filters(meta)) == want


def test_metadata_terms_read_the_probe_fields():
    upcall = UPCALLS[0]
    assert compile_filters([f"pid={PID},tid={TID},thread=handler1"]).matches(upcall)
    for meta in (f"pid={PID + 1}", f"tid={PID}", "thread=handler12", "thread=handler"):
        assert not compile_filters([meta]).matches(upcall), meta


def test_port_name_is_its_dpif_and_number():
    ports = {"vxlan0": (TUN, 1), "tap2": (OVS, 2)}
    spec = compile_filters(["port=tap2"], port_lookup=ports.get)
    assert matching(spec) == expected(lambda r: r.dpif == OVS and r.in_port == 2)


ERRORS = [
    (["foo=1"], "unknown field 'foo'"),
    (["dpif=system@ovs-system,bogus.field=3"], "unknown field 'bogus.field'"),
    (["dpif"], "'dpif' is not name=value"),
    (["in_port=3,"], "'' is not name=value"),
    ([""], "--filter needs name=value"),
    (["tp_dst=70000"], "tp_dst is 16 bits"),
    (["proto=256"], "proto is 8 bits"),
    (["in_port=x"], "in_port must be a number"),
    (["in_port=3/0xz"], "in_port's mask must be a number"),
    (["type=bogus"], "type must be miss, action or a number"),
    (["pid=-1"], "pid must be a number"),
    (["ipv4.src=10.0.0.300"], "ipv4.src must be an IPv4 address"),
    (["ipv6.dst=10.0.0.1"], "ipv6.dst must be an IPv6 address"),
    (["ct_state=+trk+bogus"], "ct_state flag 'bogus'"),
    (["ct_state=+trk,est"], "'est' is not name=value"),
    (["ct_state=+trk est"], "ct_state flags look like"),
    (["thread=" + "h" * 16], "thread must be 1 to 15 bytes"),
    (["dpif=" + "d" * 64], "dpif must be 1 to 63 bytes"),
    (["port=eth9"], "no datapath port is named 'eth9'"),
]


@pytest.mark.parametrize(("meta", "message"), ERRORS, ids=[m[0][:30] for m, _ in ERRORS])
def test_bad_filter_is_one_line_that_names_the_problem(meta, message):
    with pytest.raises(FilterError) as caught:
        compile_filters(meta, port_lookup=lambda name: None)
    text = str(caught.value)
    assert message in text
    assert meta[0] in text  # which --filter it was
    assert "\n" not in text
    assert isinstance(caught.value, UsageError) and caught.value.exit_status == 2


def test_port_name_without_port_names_says_so():
    with pytest.raises(FilterError, match="port names"):
        compile_filters(["port=eth0"])


@pytest.mark.parametrize(("expression", "message"), [
    ("tcp prt 80", "syntax error"),
    ("tcp port", "syntax error"),
    ("host nosuchhost.invalid", "nosuchhost.invalid"),
    ("tcp and udp", "rejects all packets"),
    ("ip broadcast", "netmask"),
    ("inbound", "socket metadata"),
])
def test_bad_packet_filter_gives_libpcaps_message(expression, message):
    with pytest.raises(FilterError) as caught:
        compile_filters([], expression)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.exit_status == 2


# ---------------------------------------------------------------------------------------------
# The key walk: against the records' independent decoder, then its rules on odd keys

def test_key_walk_agrees_with_the_replayed_keys():
    for record in RECORDS:
        fields = keywalk.key_fields(record.key)
        theirs = record.fields
        assert ("eth" in fields) == (not record.is_l3)
        assert fields["in_port"] == theirs["in_port"]
        assert fields["eth_type"] == theirs["eth_type"]
        assert fields["recirc_id"] == theirs["recirc_id"]
        assert fields["ct_state"] == theirs["ct_state"]
        for name in ("ipv4.src", "ipv4.dst", "ipv6.src", "ipv6.dst"):
            assert fields.get(name) == (int(theirs[name]) if name in theirs else None), name
        for name in ("proto", "tp_src", "tp_dst"):
            assert fields.get(name) == theirs.get(name), name


IN_PORT_3 = nla(3, struct.pack("<I", 3))


@pytest.mark.parametrize(("key", "fields"), [
    # the type's two flag bits are not part of it
    (nla(3 | 0x8000, struct.pack("<I", 7)), {"in_port": 7}),
    # a later attribute of a type replaces the earlier one, even when it is bad
    (IN_PORT_3 + nla(3, struct.pack("<I", 9)), {"in_port": 9}),
    (IN_PORT_3 + nla(3, bytes(8)), {}),
    # an attribute past the key's end, or a header under 4 bytes, ends the walk
    (IN_PORT_3 + nla(6, b"\x08\x00")[:5], {"in_port": 3}),
    (IN_PORT_3 + struct.pack("<HH", 2, 6) + nla(6, b"\x08\x00"), {"in_port": 3}),
    # the tunnel is stepped over (its TOS attribute is type 3 too), ENCAP stepped into
    (nla(16, nla(3, struct.pack("<I", 5))) + IN_PORT_3, {"in_port": 3}),
    (nla(16, nla(3, struct.pack("<I", 5))), {}),
    (nla(6, b"\x81\x00") + nla(1, nla(6, b"\x86\xdd")), {"eth_type": 0x86DD}),
    # proto from ipv4 before ipv6; ports from the first of tcp, udp, sctp
    (nla(8, bytes(36) + b"\x11" + bytes(3)) + nla(7, bytes(8) + b"\x06" + bytes(3)),
     {"proto": 6, "ipv4.src": 0, "ipv4.dst": 0, "ipv6.src": 0, "ipv6.dst": 0}),
    (nla(17, b"\x00\x01\x00\x02") + nla(10, b"\x00\x03\x00\x04"), {"tp_src": 3, "tp_dst": 4}),
    (nla(4, bytes(12)), {"eth": 1}),
    (nla(4, bytes(6)), {}),
    (b"", {}),
])
def test_key_walk_rules(key, fields):
    assert keywalk.key_fields(key) == fields


# ---------------------------------------------------------------------------------------------
# The packet filter: our cBPF interpreter against libpcap's, on the same programs

EXPRESSIONS = [
    "tcp port 80", "vlan and tcp port 80", "vlan 200 and udp", "vlan and vlan and tcp",
    "udp or icmp", "tcp[tcpflags] & tcp-syn != 0", "icmp[icmptype] = icmp-echo",
    "arp", "not ip and not ip6", "ip[2:2] % (ip[8] & 7) < 3", "ip[0] << ip[1] = 0",
    "ip[0] >> ip[9] = 0", "ip or not ip",
    "len > 100", "greater 1000", "less 80", "ip[2:2] / (ip[8] & 7) > 10", "ip[8] - ip[9] * 2 = 52",
    "tcp[((tcp[12] & 0xf0) >> 2):4] = 0x47455420", "ip6 protochain 6", "ip protochain 17",
    "net 10.0.0.0/8 and (port 443 or portrange 8000-9000)", "ether broadcast", "ip[8] ^ 64 = 0",
    "ip[0] & 0xf != 5 or ip[1] | 2 = 2", "ip6[6] = 58 and ip6[40] = 135", "-(ip[8]) > 0",
]


def packets_with_snaps() -> list[tuple[upcalls.Upcall, bytes]]:
    """Every replayed packet whole, and many cut short the way -s cuts them."""
    cut = [(r, r.packet[:n]) for i, r in enumerate(RECORDS[:400])
           for n in (0, 13, 14 + i % 30, 34 + i % 40, 60)]
    return [(r, r.packet) for r in RECORDS] + cut


PACKETS = packets_with_snaps()


@pytest.mark.parametrize("expression", EXPRESSIONS)
def test_interpreter_agrees_with_libpcap(expression):
    spec = compile_filters([], expression)
    programs = {pcap.DLT_EN10MB: spec.packet.ethernet, pcap.DLT_RAW: spec.packet.raw}
    matched = 0
    for record, data in PACKETS:
        program = programs[pcap.DLT_RAW if record.is_l3 else pcap.DLT_EN10MB]
        if program is None:
            continue
        ours = program.run(data, len(record.packet))
        assert ours == pcap.offline_filter(program, data, len(record.packet)), (
            record.kind, len(data))
        matched += ours != 0
    assert matched, "the expression must match some packet"


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120), extra=st.integers(0, 2000),
       expression=st.sampled_from(EXPRESSIONS))
def test_interpreter_agrees_with_libpcap_on_any_bytes(data, extra, expression):
    for linktype in (pcap.DLT_EN10MB, pcap.DLT_RAW):
        try:
            program = pcap.compile_expression(expression, linktype)
        except FilterError:
            continue
        assert program.run(data, len(data) + extra) == pcap.offline_filter(
            program, data, len(data) + extra)


@pytest.mark.parametrize("expression", ["tcp port 80", "vlan and udp", "ip6 protochain 6"])
def test_packet_filter_picks_the_link_type_from_the_key(expression):
    spec = compile_filters([], expression)
    assert matching(spec) == expected(lambda r: libpcap_matches(expression, r))


def test_filter_that_raw_ip_refuses_never_matches_l3_upcalls_and_says_so():
    spec = compile_filters([], "vlan and tcp port 80")
    assert spec.packet.raw is None
    assert any("raw-IP (L3)" in note and "not captured" in note for note in spec.notes)
    assert matching(spec) == expected(
        lambda r: not r.is_l3 and libpcap_matches("vlan and tcp port 80", r))


def test_filter_that_rejects_all_raw_ip_is_not_an_error():
    spec = compile_filters([], "arp")
    assert spec.packet.raw is None and not spec.notes
    want = expected(lambda r: libpcap_matches("arp", r))
    assert want and matching(spec) == want


def test_looping_filter_is_left_to_userspace_and_said_once():
    spec = compile_filters(["dpif=system@ovs-system"], "ip6 protochain 6")
    assert len([n for n in spec.notes if "userspace" in n]) == 1
    assert spec.userspace is not None
    kept = [i for i, u in enumerate(UPCALLS) if spec.userspace(u)]
    assert kept == expected(lambda r: libpcap_matches("ip6 protochain 6", r))
    assert compile_filters([], "tcp port 80").userspace is None
    assert compile_filters(["in_port=3,thread=handler1"]).userspace is None


def test_link_type_can_be_given_for_packets_without_a_key():
    spec = compile_filters([], "tcp port 80")
    keyless = [Upcall(**{**{n: getattr(u, n) for n in Upcall.__slots__}, "key": b""})
               for u in UPCALLS]
    for ethernet in (True, False):
        want = [i for i, (u, r) in enumerate(zip(keyless, RECORDS, strict=True))
                if r.is_l3 != ethernet and spec.matches(UPCALLS[i])]
        got = [i for i, (u, r) in enumerate(zip(keyless, RECORDS, strict=True))
               if r.is_l3 != ethernet and spec.matches(u, ethernet=ethernet)]
        assert want and got == want
    assert not any(spec.matches(u) for u, r in zip(keyless, RECORDS, strict=True) if not r.is_l3)


def test_everything_without_filters():
    spec = compile_filters([], None)
    assert matching(spec) == list(range(len(UPCALLS)))
    assert spec.if_filter is None and spec.userspace is None and not spec.notes
    assert compile_filters([], "  ").packet is None


def test_if_filter_text():
    assert compile_filters([], "tcp port 80").if_filter == "tcp port 80"
    assert compile_filters(["dpif=system@br-tun,type=action", "in_port=3"], "udp").if_filter == (
        "--filter dpif=system@br-tun,type=action --filter in_port=3 udp")
    assert compile_filters(["thread=handler 1"]).if_filter == "--filter 'thread=handler 1'"


# ---------------------------------------------------------------------------------------------
# The generated C, compiled natively by gcc and run over records laid out as the probe's

STUB = """\
#include <stddef.h>
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
#define __always_inline inline __attribute__((always_inline))
#define KEY_CAP {key_cap}
#define SNAPLEN {snaplen}
#define PKT_GAP_MAX {gap_max}
#define DPIF_NAME_LEN 64
{record_struct}
{filters}
int run_meta(struct upcall_record *rec) {{ return meta_match(rec); }}
int run_packet(struct upcall_record *rec) {{ return packet_match(rec); }}
"""


def record_struct() -> str:
    """struct upcall_record exactly as recv_upcall.c declares it."""
    found = re.search(r"struct upcall_record \{.*?\n\};", loader.SOURCE.read_text(), re.S)
    assert found is not None
    return found.group(0)


class NativeFilter:
    """spec.bpf_c built by gcc (warnings are errors) into a library, called on records."""

    def __init__(self, spec: FilterSpec, tmp_path: Path, key_cap: int = 1024,
                 snaplen: int = 9216) -> None:
        source = STUB.format(key_cap=key_cap, snaplen=snaplen, gap_max=PKT_GAP_MAX,
                             record_struct=record_struct(), filters=spec.bpf_c)
        library = build_c(tmp_path, "filter.so", source,
                          ("-O2", "-Wall", "-Werror", "-shared", "-fPIC"))
        self.lib = ctypes.CDLL(str(library))
        self.buffer = ctypes.create_string_buffer(HEADER.size + key_cap + PKT_GAP_MAX + snaplen)
        self.key_cap, self.snaplen = key_cap, snaplen

    def matches(self, upcall: Upcall, gap: bytes = b"") -> bool:
        """What the probe would do: meta_match() first, then packet_match() on the copy;
        with gap between key and packet, as when it read both at once."""
        key, packet = upcall.key[:self.key_cap], upcall.packet[:self.snaplen]
        HEADER.pack_into(self.buffer, 0, 0, len(upcall.key), upcall.pid, upcall.tid, 0,
                         upcall.type, upcall.pkt_size, len(packet), len(key),
                         len(key) + len(gap), 0, upcall.thread.encode(), upcall.dpif.encode())
        data = key + gap + packet
        self.buffer[HEADER.size:HEADER.size + len(data)] = data
        return bool(self.lib.run_meta(self.buffer) and self.lib.run_packet(self.buffer))


NATIVE_CASES = [
    ([], "tcp port 80"),
    ([], "vlan and udp"),
    ([], "tcp[((tcp[12] & 0xf0) >> 2):4] = 0x47455420 or ip[0] << ip[1] = 0 or len > 1400"),
    (["dpif=system@ovs-system"], None),
    (["dpif=system@br-tun,type=action"], None),
    (["in_port=3,ipv4.src=10.0.0.0/16,tp_dst=0x8000/0x8000"], None),
    (["ipv6.src=2001:db8:0:1::/64,proto=tcp", "eth_type=0x0806"], "not udp"),
    (["ct_state=+trk-rpl,recirc_id=0x10/0xf0", "thread=handler1,pid=4242,tid=4243"], None),
    (["dpif=system@br-tun"], "ip6 protochain 6"),
]


@pytest.mark.parametrize(("meta", "expression"), NATIVE_CASES,
                         ids=[" ".join(m) + f" {e}" for m, e in NATIVE_CASES])
def test_generated_c_decides_as_python_does(meta, expression, tmp_path):
    spec = compile_filters(meta, expression)
    native = NativeFilter(spec, tmp_path)
    in_kernel = spec.matches if spec.userspace is None else (
        lambda u: compile_filters(meta).matches(u))  # a looping packet filter passes the probe
    # Some with the bytes that lie between key and packet in OVS's netlink message.
    gaps = [b"\xee" * (index % 3 * 12) for index in range(len(UPCALLS))]
    decided = [native.matches(u, gap) for u, gap in zip(UPCALLS, gaps, strict=True)]
    assert decided == [in_kernel(u) for u in UPCALLS]
    assert any(decided)


def test_generated_c_on_cut_packets(tmp_path):
    spec = compile_filters(["in_port=2", "proto=17"], "tcp port 80 or udp port 53 or greater 1000")
    native = NativeFilter(spec, tmp_path, key_cap=640, snaplen=40)
    cut = [probe_upcall(r, snaplen=40) for r in RECORDS]
    decisions = [spec.matches(u) for u in cut]
    assert [native.matches(u) for u in cut] == decisions
    assert decisions != [spec.matches(u) for u in UPCALLS], "cutting must change something"


ODD_KEYS = [
    (IN_PORT_3 + nla(3, bytes(8)), False),  # the last in_port is bad
    (nla(3, struct.pack("<I", 2)), True),
    (nla(16, nla(3, struct.pack("<I", 2))), False),  # a tunnel's TOS is not in_port
    (nla(3, struct.pack("<I", 2)) + struct.pack("<HH", 200, 6), True),  # runs past the end
    (nla(7, bytes([10, 1, 2, 3]) + bytes(8))[:10], False),  # cut by the key cap
    (nla(7, bytes([10, 1, 2, 3]) + bytes(8)), True),
    (nla(6, b"\x81\x00") + nla(1, nla(6, b"\x86\xdd")), True),  # inside ENCAP
    (nla(1, nla(8, bytes(36) + b"\x11" + bytes(3))), True),
    (nla(1, nla(8, bytes(36) + b"\x11" + bytes(2))), False),
    (b"\x04", False),
]


def test_generated_c_on_odd_keys(tmp_path):
    spec = compile_filters(["in_port=2", "proto=17", "ipv4.src=10.0.0.0/8", "eth_type=0x86dd"])
    native = NativeFilter(spec, tmp_path)
    base = {name: getattr(UPCALLS[0], name) for name in Upcall.__slots__}
    for key, matches in ODD_KEYS:
        upcall = Upcall(**{**base, "key": key, "key_size": len(key)})
        assert spec.matches(upcall) == matches, key.hex()
        assert native.matches(upcall) == matches, key.hex()


# Random keys, malformed ones included: the C walk and the Python walk must agree on every
# field, present or not, and on its value.

FIELD_TERMS = {
    "in_port": ["0/0", "1/1"], "recirc_id": ["0/0", "1/1"], "ct_state": ["0/0", "+new"],
    "eth_type": ["0/0", "0x100/0x100"], "proto": ["0/0", "1/1"], "tp_src": ["0/0", "1/1"],
    "tp_dst": ["0/0", "0x8000/0x8000"], "ipv4.src": ["0.0.0.0/0", "128.0.0.0/1"],
    "ipv4.dst": ["0.0.0.0/0", "0.0.0.0/1"], "ipv6.src": ["::/0", "8000::/1"],
    "ipv6.dst": ["::/0", "::/1"],
}


@pytest.fixture(scope="module")
def native_terms(tmp_path_factory):
    """One natively built filter per key term (OR would hide which field decided)."""
    built = []
    for name, values in FIELD_TERMS.items():
        for value in values:
            spec = compile_filters([f"{name}={value}"])
            built.append((spec, NativeFilter(spec, tmp_path_factory.mktemp("term"))))
    # and the link type: a packet filter whose answer differs between Ethernet and raw IP
    spec = compile_filters([], "ether[0] & 1 = 0 or ip[0] & 1 = 1")
    built.append((spec, NativeFilter(spec, tmp_path_factory.mktemp("term"))))
    return built


ATTR_TYPES = [1, 3, 4, 6, 7, 8, 9, 10, 16, 17, 20, 22, 0x4003, 33]


def attributes(depth: int = 0) -> st.SearchStrategy[bytes]:
    sizes = {3: 4, 4: 12, 6: 2, 7: 12, 8: 40, 9: 4, 10: 4, 17: 4, 20: 4, 22: 4}
    right = st.sampled_from(ATTR_TYPES).flatmap(
        lambda kind: st.binary(min_size=sizes.get(kind & 0x3FFF, 4),
                               max_size=sizes.get(kind & 0x3FFF, 4)).map(lambda p: nla(kind, p)))
    wrong = st.builds(nla, st.sampled_from(ATTR_TYPES), st.binary(max_size=44))
    choices = [right, right, wrong, st.binary(min_size=1, max_size=6)]  # or a bad header
    if depth < 2:
        choices.append(st.deferred(lambda: attributes(depth + 1)).map(lambda k: nla(1, k)))
    return st.lists(st.one_of(choices), max_size=12).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(key=attributes(), cut=st.integers(0, 8))
def test_c_and_python_walk_random_keys_alike(native_terms, key, cut):
    key = key[:len(key) - cut] if cut else key
    base = {name: getattr(UPCALLS[1], name) for name in Upcall.__slots__}
    upcall = Upcall(**{**base, "key": key, "key_size": len(key)})
    for spec, native in native_terms:
        assert native.matches(upcall) == spec.matches(upcall), spec.if_filter
