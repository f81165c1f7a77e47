"""The replay source: upcall-replay.c (the USDT probe) and upcalls.py (its records).

Packets are parsed with dpkt and the keys with this file's own netlink walk, so a record
generator bug cannot hide behind the same bug in the checker.
"""

from __future__ import annotations

import ctypes
import importlib.util
import ipaddress
import os
import re
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import dpkt
import pytest

REPLAY_DIR = Path(__file__).resolve().parent.parent / "samples" / "replay"
BINARY = REPLAY_DIR / "upcall-replay"
BASIC = REPLAY_DIR / "basic.upc"
MIXED = REPLAY_DIR / "mixed.upc"
SUMMARY = re.compile(r"fired (\d+) upcalls in \d+\.\d{3} s \(\d+/s\)\n")

# OVS_KEY_ATTR_* numbers, spelled out here independently of upcalls.py.
A_ENCAP, A_PRIORITY, A_IN_PORT, A_ETHERNET, A_VLAN, A_ETHERTYPE = 1, 2, 3, 4, 5, 6
A_IPV4, A_IPV6, A_TCP, A_UDP, A_ICMP, A_ICMPV6, A_ARP, A_ND = 7, 8, 9, 10, 11, 12, 13, 14
A_SKB_MARK, A_TUNNEL, A_TCP_FLAGS, A_DP_HASH, A_RECIRC_ID = 15, 16, 18, 19, 20
A_CT_STATE, A_CT_ZONE, A_CT_MARK, A_CT_LABELS, A_CT_TUPLE4, A_CT_TUPLE6 = 22, 23, 24, 25, 26, 27
A_IPV6_EXTHDRS = 32
PAYLOAD_SIZES = {A_PRIORITY: 4, A_IN_PORT: 4, A_ETHERNET: 12, A_VLAN: 2, A_ETHERTYPE: 2,
                 A_IPV4: 12, A_IPV6: 40, A_TCP: 4, A_UDP: 4, A_ICMP: 2, A_ICMPV6: 2, A_ARP: 24,
                 A_ND: 28, A_SKB_MARK: 4, A_TCP_FLAGS: 2, A_DP_HASH: 4, A_RECIRC_ID: 4,
                 A_CT_STATE: 4, A_CT_ZONE: 2, A_CT_MARK: 4, A_CT_LABELS: 16, A_CT_TUPLE4: 16,
                 A_CT_TUPLE6: 40, A_IPV6_EXTHDRS: 2}


def _load_upcalls() -> ModuleType:
    spec = importlib.util.spec_from_file_location("upcalls", REPLAY_DIR / "upcalls.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["upcalls"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


upcalls = _load_upcalls()


@pytest.fixture(scope="module")
def replay_binary() -> Path:
    subprocess.run(["make", "-s", "-C", str(REPLAY_DIR)], check=True)
    return BINARY


def all_sample_upcalls() -> list:
    return upcalls.read_records(BASIC) + upcalls.read_records(MIXED)


# --- the binary and its probe ----------------------------------------------------------------


def stapsdt_notes(binary: Path) -> list[tuple[str, str, str, list[str]]]:
    """(provider, name, semaphore, argument specs) of each stapsdt note."""
    text = subprocess.run(["readelf", "-n", str(binary)], capture_output=True, text=True,
                          check=True).stdout
    notes = re.findall(r"Provider: (\S+)\s+Name: (\S+)\s+Location: .*?Semaphore: (0x[0-9a-f]+)"
                       r"\s+Arguments:([^\n]*)", text)
    return [(prov, name, sem, args.split()) for prov, name, sem, args in notes]


def test_probe_note_has_ovs_argument_sizes(replay_binary: Path) -> None:
    notes = stapsdt_notes(replay_binary)
    upcall_notes = [n for n in notes if n[:2] == ("dpif_recv", "recv_upcall")]
    assert upcall_notes, "no dpif_recv:recv_upcall note"
    for _, _, semaphore, args in upcall_notes:
        # OVS's own build: 8@%rdx 4@%ecx 8@%rax 4@12(%rbx) 8@576(%rbx) 8@584(%rbx)
        assert [spec.split("@")[0] for spec in args] == ["8", "4", "8", "4", "8", "8"]
        assert int(semaphore, 16) == 0
    for name in ("run_start", "poll_block"):
        assert any(n[:2] == ("main", name) and n[3] == [] for n in notes), name


# --- the record files ------------------------------------------------------------------------


@pytest.mark.parametrize("path", [BASIC, MIXED], ids=lambda p: p.name)
def test_record_file_round_trips(path: Path, tmp_path: Path) -> None:
    records = upcalls.read_records(path)
    assert records
    copy = tmp_path / "copy.upc"
    upcalls.write_records(copy, records)
    assert copy.read_bytes() == path.read_bytes()
    assert upcalls.read_records(copy) == records


def test_record_layout_is_the_documented_one(tmp_path: Path) -> None:
    record = upcalls.Upcall("system@br-tun", 1, b"\x01\x02\x03\x04\x05", b"\x08\x00\x03\x00"
                            b"\x07\x00\x00\x00", key_uniq_off=-1, pkt_uniq_off=1)
    path = tmp_path / "one.upc"
    upcalls.write_records(path, [record])
    assert path.read_bytes() == (b"UPCREC1\n" + struct.pack("<HHIIIii", 13, 0, 1, 5, 8, -1, 1)
                                 + b"system@br-tun" + record.packet + record.key)


@pytest.mark.parametrize("damage", ["magic", "truncated", "offset"])
def test_damaged_record_files_are_refused(damage: str) -> None:
    good = upcalls.encode_records(upcalls.read_records(BASIC)[:2])
    bad = {"magic": b"UPCREC2\n" + good[8:], "truncated": good[:-3],
           "offset": good[:8] + good[8:24] + struct.pack("<i", 4000) + good[28:]}[damage]
    with pytest.raises(ValueError):
        upcalls.decode_records(bad)


def test_committed_files_are_what_the_generator_makes() -> None:
    assert upcalls.read_records(MIXED) == upcalls.generate("mixed", 2000, 1)
    assert upcalls.read_records(BASIC) == upcalls.generate("basic", 40, 1)
    assert sum(p.stat().st_size for p in (BASIC, MIXED)) < 2_000_000


def test_mixed_file_has_what_the_filter_tests_need() -> None:
    records = upcalls.read_records(MIXED)
    assert len(records) == 2000
    assert {r.dpif for r in records} == {"system@ovs-system", "system@br-tun"}
    for dpif in ("system@ovs-system", "system@br-tun"):
        assert {r.type for r in records if r.dpif == dpif} == {0, 1}
        assert len({r.in_port for r in records if r.dpif == dpif}) >= 3
    kinds = {r.kind for r in records}
    assert {"eth/ipv4/tcp", "eth/ipv4/udp", "eth/ipv4/icmp", "eth/arp", "eth/ipv6/tcp",
            "eth/ipv6/udp", "eth/ipv6/icmpv6", "eth/ipv6/nd", "vlan/ipv4/tcp", "qinq/ipv4/tcp",
            "l3/ipv4/tcp", "l3/ipv6/tcp", "l3/ipv4/udp", "l3/ipv6/udp"} <= kinds
    port80 = {r.kind for r in records if 80 in (r.fields.get("tp_src"), r.fields.get("tp_dst"))
              and r.fields.get("proto") == 6}
    assert {"eth/ipv4/tcp", "eth/ipv6/tcp", "vlan/ipv4/tcp", "l3/ipv4/tcp", "l3/ipv6/tcp"} <= port80
    assert {r.fields["frag"] for r in records if "frag" in r.fields} == {0, 1, 2}
    assert any(r.fields.get("ct_state") for r in records)
    assert max(len(r.packet) for r in records) >= 9000
    assert any(1400 <= len(r.packet) <= 1522 for r in records)


def test_repeat_mix_has_distinct_flows_up_to_full_size() -> None:
    records = upcalls.generate("repeat", 1500, 7)
    assert len({r.key for r in records}) == 1500
    assert max(len(r.packet) for r in records) <= 1522
    assert any(len(r.packet) >= 1400 for r in records)
    assert upcalls.generate("repeat", 50, 7) == records[:50]


# --- keys agree with packets -----------------------------------------------------------------


def netlink_attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset < len(data):
        length, kind = struct.unpack_from("<HH", data, offset)
        assert length >= 4 and offset + length <= len(data), f"bad attribute at {offset}"
        yield kind & 0x3FFF, data[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    assert offset == len(data)


def ones_complement_ok(data: bytes) -> bool:
    """True when data, checksum included, sums to 0xffff (a valid Internet checksum)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def expect_l4(attrs: list[tuple[int, bytes]], ip: dpkt.Packet, src: bytes, dst: bytes,
              v6: bool) -> None:
    """The attributes after ipv4/ipv6 must describe ip's transport header, and its
    checksum must be right."""
    proto = ip.nxt if v6 else ip.p
    segment = bytes(ip.data)
    pseudo = (src + dst + struct.pack("!I3xB", len(segment), proto) if v6
              else src + dst + struct.pack("!BBH", 0, proto, len(segment)))
    if proto == 6:
        tcp = dpkt.tcp.TCP(segment)
        assert attrs == [(A_TCP, struct.pack("!HH", tcp.sport, tcp.dport)),
                         (A_TCP_FLAGS, struct.pack("!H", tcp.flags & 0x0FFF))]
        assert ones_complement_ok(pseudo + segment)
    elif proto == 17:
        udp = dpkt.udp.UDP(segment)
        assert attrs == [(A_UDP, struct.pack("!HH", udp.sport, udp.dport))]
        assert udp.ulen == len(segment)
        assert ones_complement_ok(pseudo + segment)
    elif proto == 1:
        assert attrs == [(A_ICMP, segment[:2])]
        assert ones_complement_ok(segment)
    elif proto == 58:
        assert attrs[0] == (A_ICMPV6, segment[:2])
        assert ones_complement_ok(pseudo + segment)
        if segment[0] in (135, 136):  # neighbour solicitation / advertisement
            target, options = segment[8:24], segment[24:]
            lladdr = {options[i]: options[i + 2 : i + 8] for i in range(0, len(options), 8)}
            sll, tll = lladdr.get(1, bytes(6)), lladdr.get(2, bytes(6))
            assert attrs[1:] == [(A_ND, target + sll + tll)]
        else:
            assert attrs[1:] == []
    else:
        raise AssertionError(f"unexpected protocol {proto}")


def expect_network(attrs: list[tuple[int, bytes]], eth_type: int, l3: bytes) -> None:
    """attrs from eth_type on must describe the packet l3 (which starts at its L3 header)."""
    assert attrs[0] == (A_ETHERTYPE, struct.pack("!H", eth_type))
    if eth_type == 0x0800:
        ip = dpkt.ip.IP(l3)
        assert ip.len <= len(l3) and not any(l3[ip.len :])  # only zero padding after
        assert ones_complement_ok(l3[: ip.hl * 4])
        frag = 2 if ip.offset else (1 if ip.mf else 0)
        assert attrs[1] == (A_IPV4, ip.src + ip.dst + bytes([ip.p, ip.tos, ip.ttl, frag]))
        if frag == 2:
            assert attrs[2:] == []  # later fragments carry no L4 key
        elif frag == 1:
            udp = dpkt.udp.UDP(bytes(ip.data))
            assert attrs[2:] == [(A_UDP, struct.pack("!HH", udp.sport, udp.dport))]
        else:
            expect_l4(attrs[2:], ip, ip.src, ip.dst, v6=False)
    elif eth_type == 0x86DD:
        ip6 = dpkt.ip6.IP6(l3)
        assert 40 + ip6.plen == len(l3)
        label, tclass = ip6.flow, ip6.fc
        assert attrs[1] == (A_IPV6, ip6.src + ip6.dst
                            + struct.pack("!IBBBB", label, ip6.nxt, tclass, ip6.hlim, 0))
        assert attrs[2] == (A_IPV6_EXTHDRS, b"\0\0")
        expect_l4(attrs[3:], ip6, ip6.src, ip6.dst, v6=True)
    elif eth_type == 0x0806:
        arp = dpkt.arp.ARP(l3)
        assert attrs[1:] == [(A_ARP, arp.spa + arp.tpa + struct.pack("!H", arp.op) + arp.sha
                              + arp.tha + b"\0\0")]
    else:
        raise AssertionError(f"unexpected eth_type {eth_type:#x}")


def check_record(record) -> None:
    top = list(netlink_attrs(record.key))
    for kind, payload in top:
        if kind in PAYLOAD_SIZES:
            assert len(payload) == PAYLOAD_SIZES[kind], kind
    types = [kind for kind, _ in top]
    # Metadata, in the kernel's order; tunnel and the ct tuple only sometimes.
    metadata = [A_RECIRC_ID, A_DP_HASH, A_PRIORITY, A_TUNNEL, A_IN_PORT, A_SKB_MARK,
                A_CT_STATE, A_CT_ZONE, A_CT_MARK, A_CT_LABELS, A_CT_TUPLE4, A_CT_TUPLE6]
    head = [t for t in types if t in metadata]
    assert head == [t for t in metadata if t in head]
    assert {A_RECIRC_ID, A_DP_HASH, A_PRIORITY, A_IN_PORT, A_SKB_MARK, A_CT_STATE} <= set(head)
    assert types[: len(head)] == head
    rest = top[len(head) :]
    if A_CT_TUPLE4 in head or A_CT_TUPLE6 in head:
        assert dict(top)[A_CT_STATE] != b"\0\0\0\0"  # only tracked packets have a tuple

    if rest[0][0] != A_ETHERNET:  # L3 upcall: the packet starts at the IP header
        version = record.packet[0] >> 4
        expect_network(rest, {4: 0x0800, 6: 0x86DD}[version], record.packet)
        assert record.is_l3
        return
    packet = record.packet
    assert rest[0] == (A_ETHERNET, packet[6:12] + packet[0:6])  # src first in the key
    attrs, offset = rest[1:], 12
    eth_type = struct.unpack_from("!H", packet, offset)[0]
    while eth_type in (0x8100, 0x88A8):
        tci = struct.unpack_from("!H", packet, offset + 2)[0]
        assert attrs[:2] == [(A_ETHERTYPE, struct.pack("!H", eth_type)),
                             (A_VLAN, struct.pack("!H", tci | 0x1000))]
        assert attrs[2][0] == A_ENCAP and len(attrs) == 3
        attrs = list(netlink_attrs(attrs[2][1]))
        offset += 4
        eth_type = struct.unpack_from("!H", packet, offset)[0]
    expect_network(attrs, eth_type, packet[offset + 2 :])
    assert not record.is_l3


SOURCES = {
    "basic.upc": lambda: upcalls.read_records(BASIC),
    "mixed.upc": lambda: upcalls.read_records(MIXED),
    "mixed-seed9": lambda: upcalls.generate("mixed", 2000, 9),
    "repeat-seed5": lambda: upcalls.generate("repeat", 600, 5),
}


@pytest.mark.parametrize("source", SOURCES)
def test_keys_agree_with_packets(source: str) -> None:
    records = SOURCES[source]()
    for index, record in enumerate(records):
        try:
            check_record(record)
        except AssertionError as err:
            raise AssertionError(f"{source} record {index} ({record.kind}): {err}") from err


def unique_field_in_packet(record) -> int:
    """Where the unique field must be in the packet: IPv4/ARP source, IPv6 source low 32."""
    offset = 0 if record.is_l3 else 12
    while not record.is_l3 and record.packet[offset : offset + 2] in (b"\x81\x00", b"\x88\xa8"):
        offset += 4
    l3 = offset if record.is_l3 else offset + 2
    eth_type = record.fields["eth_type"]
    return l3 + {0x0800: 12, 0x0806: 14, 0x86DD: 20}[eth_type]


def test_unique_offsets_point_at_the_same_field() -> None:
    for record in all_sample_upcalls() + upcalls.generate("repeat", 300, 2):
        if record.key_uniq_off == -1:
            assert record.pkt_uniq_off == -1
            continue
        assert record.pkt_uniq_off == unique_field_in_packet(record), record.kind
        value = record.key[record.key_uniq_off : record.key_uniq_off + 4]
        assert value == record.packet[record.pkt_uniq_off : record.pkt_uniq_off + 4]
        # Overwriting it as upcall-replay -u does changes the key's source address.
        new = bytes([10, 9, 8, 7])
        key = record.key[: record.key_uniq_off] + new + record.key[record.key_uniq_off + 4 :]
        fields = upcalls.key_fields(key)
        source = (fields.get("ipv4.src") or fields.get("arp.sip") or fields["ipv6.src"]).packed
        assert source[-4:] == new


def test_key_fields_reads_back_what_was_built() -> None:
    for record in upcalls.read_records(MIXED):
        fields = record.fields
        in_port = dict(netlink_attrs(record.key))[A_IN_PORT]
        assert fields["in_port"] == struct.unpack("<I", in_port)[0]
        if "ipv4.src" in fields:
            l3 = record.packet if record.is_l3 else record.packet[record.pkt_uniq_off - 12 :]
            assert fields["ipv4.dst"] == ipaddress.IPv4Address(l3[16:20])


# --- the decoder being written alongside -----------------------------------------------------


def test_every_sample_key_decodes_cleanly() -> None:
    flowkey = pytest.importorskip("upcall_capture.flowkey")
    format_key = getattr(flowkey, "format_key", None)
    if format_key is None:
        pytest.skip("upcall_capture.flowkey.format_key does not exist yet")
    for record in all_sample_upcalls():
        text = format_key(record.key)
        assert "bad key length" not in text and "leftover" not in text, text
        assert f"in_port({record.in_port})" in text, text


# --- running upcall-replay -------------------------------------------------------------------


def run_replay(binary: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60)


def fired(result: subprocess.CompletedProcess[str]) -> int:
    assert result.returncode == 0, result.stderr
    match = SUMMARY.fullmatch(result.stdout)
    assert match, result.stdout
    return int(match.group(1))


def test_replay_fires_the_requested_count(replay_binary: Path) -> None:
    assert fired(run_replay(replay_binary, "-n", "1000", "-r", "0", str(MIXED))) == 1000
    assert fired(run_replay(replay_binary, "-n", "25", "-r", "2000", str(BASIC))) == 25
    assert fired(run_replay(replay_binary, "-n", "7", "-T", "3", "-u", str(MIXED))) == 7
    assert fired(run_replay(replay_binary, "-n", "3", "-T", "4", "-r", "100", str(BASIC))) == 3
    assert fired(run_replay(replay_binary, "-n", "0", str(BASIC))) == 0


def test_replay_defaults_to_every_record_once(replay_binary: Path) -> None:
    both = len(upcalls.read_records(BASIC)) + len(upcalls.read_records(MIXED))
    assert fired(run_replay(replay_binary, str(BASIC), str(MIXED))) == both
    assert fired(run_replay(replay_binary, "-B", str(BASIC))) == 41  # plus the hostile one


def test_replay_waits_for_sigusr1_and_keeps_running(replay_binary: Path) -> None:
    proc = subprocess.Popen([str(replay_binary), "-S", "-k", "-n", "50", str(BASIC)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "waiting for SIGUSR1" in proc.stderr.readline()
        assert proc.poll() is None
        proc.send_signal(signal.SIGUSR1)
        assert SUMMARY.fullmatch(proc.stdout.readline()).group(1) == "50"
        assert proc.poll() is None  # -k: still there after firing
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_replay_stops_early_on_sigterm(replay_binary: Path) -> None:
    proc = subprocess.Popen([str(replay_binary), "-S", "-r", "100", "-n", "100000", str(BASIC)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stderr.readline()
        proc.send_signal(signal.SIGUSR1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert int(SUMMARY.fullmatch(out).group(1)) < 100000
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("args", [["-n", "x"], ["-T", "0"], ["-r", "-5"], ["-q"], ["-n"], [],
                                  ["/nonexistent.upc"], [str(REPLAY_DIR / "upcalls.py")]])
def test_replay_errors_are_one_line(replay_binary: Path, args: list[str]) -> None:
    result = run_replay(replay_binary, *args)
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("upcall-replay: "), result.stderr


def test_replay_refuses_a_truncated_file(replay_binary: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.upc"
    path.write_bytes(BASIC.read_bytes()[:-1])
    result = run_replay(replay_binary, str(path))
    assert result.returncode != 0 and "truncated" in result.stderr


# --- bcc attached to the real probe (root) ---------------------------------------------------

BPF_TEXT = r"""
#include <uapi/linux/ptrace.h>
struct event {
    s32 rc; u32 type; u32 pkt_size; s32 key_rc; u64 key_len; s32 pkt_rc; u32 pad;
    char comm[16]; char dpif[32]; u8 key[1024]; u8 pkt[512];
};
BPF_PERCPU_ARRAY(scratch, struct event, 1);
BPF_PERF_OUTPUT(events);
int on_upcall(struct pt_regs *ctx) {
    int zero = 0;
    u64 dpif = 0, pkt = 0, key = 0;
    struct event *e = scratch.lookup(&zero);
    if (!e)
        return 0;
    e->type = 0; e->pkt_size = 0; e->key_len = 0;
    e->rc = bpf_usdt_readarg(1, ctx, &dpif) | bpf_usdt_readarg(2, ctx, &e->type)
          | bpf_usdt_readarg(3, ctx, &pkt) | bpf_usdt_readarg(4, ctx, &e->pkt_size)
          | bpf_usdt_readarg(5, ctx, &key) | bpf_usdt_readarg(6, ctx, &e->key_len);
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    bpf_probe_read_user_str(e->dpif, sizeof(e->dpif), (void *)dpif);
    u32 key_len = e->key_len > 640 ? 640 : e->key_len;
    asm volatile("" : "+r"(key_len));
    e->key_rc = bpf_probe_read_user(e->key, key_len & 1023, (void *)key);
    u32 pkt_len = e->pkt_size > 256 ? 256 : e->pkt_size;
    asm volatile("" : "+r"(pkt_len));
    e->pkt_rc = bpf_probe_read_user(e->pkt, pkt_len & 511, (void *)pkt);
    events.perf_submit(ctx, e, sizeof(*e));
    return 0;
}
"""


class Event(ctypes.Structure):
    _fields_ = [("rc", ctypes.c_int32), ("type", ctypes.c_uint32), ("pkt_size", ctypes.c_uint32),
                ("key_rc", ctypes.c_int32), ("key_len", ctypes.c_uint64),
                ("pkt_rc", ctypes.c_int32), ("pad", ctypes.c_uint32),
                ("comm", ctypes.c_char * 16), ("dpif", ctypes.c_char * 32),
                ("key", ctypes.c_uint8 * 1024), ("pkt", ctypes.c_uint8 * 512)]


@pytest.mark.capture
def test_bcc_reads_every_upcall_with_exact_argument_sizes(replay_binary: Path) -> None:
    """-T 2 -u then -B, read through bcc: every argument reads with its exact size, keys and
    packets are the records' with the counter in the unique field, the hostile one faults."""
    if os.geteuid() != 0:
        pytest.skip("needs root to attach eBPF")
    bcc = pytest.importorskip("bcc")
    records = upcalls.read_records(MIXED)
    count = 3000
    proc = subprocess.Popen([str(replay_binary), "-S", "-T", "2", "-u", "-B", "-r", "20000",
                             "-n", str(count), str(MIXED)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events: list[Event] = []
    try:
        proc.stderr.readline()
        usdt = bcc.USDT(pid=proc.pid)
        usdt.enable_probe("recv_upcall", "on_upcall")
        bpf = bcc.BPF(text=BPF_TEXT.encode(), usdt_contexts=[usdt])
        # 8 MiB a CPU holds every event of the run (some 5 MB): with 1 MiB, this reader
        # (a Python call per event) lost 222 of them on a busy moment of a CI run.
        bpf[b"events"].open_perf_buffer(
            lambda cpu, data, size: events.append(Event.from_buffer_copy(
                ctypes.string_at(data, ctypes.sizeof(Event)))), page_cnt=2048)
        proc.send_signal(signal.SIGUSR1)
        while proc.poll() is None:
            bpf.perf_buffer_poll(timeout=50)
        bpf.perf_buffer_poll(timeout=100)
        assert SUMMARY.fullmatch(proc.stdout.read()).group(1) == str(count + 1)
    finally:
        proc.kill()
        proc.wait()

    assert len(events) == count + 1
    hostile = [e for e in events if (e.pkt_size, e.key_len) == (1514, 640)]
    assert len(hostile) == 1
    assert hostile[0].rc == 0 and hostile[0].key_rc < 0 and hostile[0].pkt_rc < 0
    fired_numbers = set()
    for event in events:
        if event is hostile[0]:
            continue
        assert (event.rc, event.key_rc, event.pkt_rc) == (0, 0, 0)
        assert event.comm in (b"handler1", b"handler2")
        k = fire_number(records, count, bytes(event.key[: event.key_len]))
        assert k is not None and k not in fired_numbers
        fired_numbers.add(k)
        record = records[k % len(records)]
        packet = stamped(record.packet, record.pkt_uniq_off, k)
        assert bytes(event.pkt[: min(256, event.pkt_size)]) == packet[:256]
        assert (event.dpif.decode(), event.type, event.pkt_size) == (
            record.dpif, record.type, len(record.packet))
    assert fired_numbers == set(range(count))


def stamped(data: bytes, offset: int, k: int) -> bytes:
    """data with upcall-replay -u's value for fire k at offset."""
    return data[:offset] + struct.pack("!I", 0x0A000000 + k) + data[offset + 4 :]


def fire_number(records: list, count: int, key: bytes) -> int | None:
    """Which fire k of a -u run produced key: record k mod n, stamped with k."""
    for offset in {r.key_uniq_off for r in records if r.key_uniq_off >= 0}:
        if offset + 4 > len(key):
            continue
        k = struct.unpack_from("!I", key, offset)[0] - 0x0A000000
        if 0 <= k < count:
            record = records[k % len(records)]
            if record.key_uniq_off == offset and key == stamped(record.key, offset, k):
                return k
    return None
