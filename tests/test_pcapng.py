"""The pcapng writer and reader, checked against tshark, capinfos, editcap and scapy.

Expected values come from the packet specifications below, never from our own reader, except
where the reader itself is under test.
"""

from __future__ import annotations

import json
import mmap
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.utils import PcapNgReader

from upcall_capture import pcapng

ROOT_NOTICE = 'Running as user "root" and group "root". This could be dangerous.'


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/bootstrap.sh installs it)")
    return path


def run(args: list[str], stdin: bytes | None = None) -> tuple[str, list[str]]:
    """Run a Wireshark tool; return stdout and stderr lines other than the root notice."""
    result = subprocess.run(args, input=stdin, capture_output=True, timeout=60, check=False)
    stderr = [line for line in result.stderr.decode().splitlines() if line.strip() != ROOT_NOTICE]
    assert result.returncode == 0, f"{args} failed: {stderr}"
    return result.stdout.decode(), stderr


# ---------------------------------------------------------------------------------------------
# A capture with every feature: two interfaces (Ethernet and raw IP), comments, a truncated
# packet, drop counts, packets with and without direction, one without any option, keys, ISBs.

SHB = {"userappl": "upcall-capture 0.1", "os": "Linux 6.1.0", "hardware": "x86_64"}
SHB_COMMENT = "upcall-capture -w out.pcapng --filter dpif=system@ovs-system"


@dataclass(frozen=True)
class Interface:
    linktype: int
    name: str
    description: str | None = None
    filter: str | None = None
    snaplen: int = 9216


INTERFACES = [
    Interface(
        pcapng.LINKTYPE_ETHERNET,
        "eth0 (system@ovs-system)",
        "datapath port 2",
        "dpif=system@ovs-system",
    ),
    Interface(pcapng.LINKTYPE_RAW, "port 3 (system@ovs-system)"),
]

MISS = "miss system@ovs-system in_port 2 (eth0) pid 812 tid 830 handler1 cpu 1\nin_port(2),ü"
ACTION = "action system@ovs-system in_port 3 pid 812 tid 831 handler2 cpu 0\nin_port(3)"
KEY = bytes(range(1, 41))


def ethernet_frame(payload_len: int, sport: int = 40000) -> bytes:
    frame = (
        Ether(src="00:11:22:33:44:55", dst="66:77:88:99:aa:bb")
        / IP(src="10.0.0.1", dst="10.0.0.2")
        / TCP(sport=sport, dport=40001)
        / bytes(payload_len)
    )
    return bytes(frame)


IPV4_UDP = bytes(IP(src="10.1.0.1", dst="10.1.0.2") / UDP(sport=40002, dport=40003) / b"hello")
IPV6_UDP = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=40004, dport=40005) / b"ab")
JUMBO = ethernet_frame(1460)


@dataclass(frozen=True)
class PacketCase:
    interface: int
    timestamp_ns: int
    data: bytes
    orig_len: int
    protocols: str  # as tshark's frame.protocols shows the packet
    comment: str | None
    inbound: bool = True
    dropcount: int | None = None
    key: bytes | None = None
    with_options: bool = True


TCP_DATA = "eth:ethertype:ip:tcp:data"  # ports are unassigned: the payload shows as data
TCP_CUT = "eth:ethertype:ip:tcp"  # tshark leaves a cut segment's payload alone
PACKETS = [
    PacketCase(0, 1_700_000_000_123_456_789, ethernet_frame(37), 91, TCP_DATA, MISS, key=KEY),
    # Cut by the snaplen: 61 bytes kept of 1514, after 5 lost records.
    PacketCase(0, 1_700_000_001_000_000_001, JUMBO[:61], 1514, TCP_CUT, MISS, dropcount=5, key=KEY),
    PacketCase(
        1,
        1_700_000_002_999_999_999,
        IPV4_UDP,
        33,
        "raw:ip:udp:data",
        ACTION,
        inbound=False,
        key=b"\x07",
    ),
    PacketCase(
        1, 1_700_000_003_000_000_007, IPV6_UDP, 50, "raw:ipv6:udp:data", None, with_options=False
    ),
    PacketCase(
        0,
        1_700_000_004_500_000_000,
        ethernet_frame(42, sport=40010),
        96,
        TCP_DATA,
        "last",
        dropcount=0,
    ),
]
# Every padding length appears, so padding bugs show.
assert {len(case.data) % 4 for case in PACKETS} == {0, 1, 2, 3}


@dataclass(frozen=True)
class StatsCase:
    interface: int
    received: int
    dropped: int
    filter_accept: int | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    comment: str | None = None


END_NS = 1_700_000_005_000_000_001
STATS = [
    StatsCase(0, 12, 5, 10, 1_699_999_999_999_999_999, END_NS, "3 upcalls captured, 5 lost"),
    StatsCase(1, 2, 0),
]


def packet_block(case: PacketCase) -> bytes:
    if not case.with_options:
        return pcapng.enhanced_packet(case.interface, case.timestamp_ns, case.data, case.orig_len)
    # As the capture does it: options cached per upcall, drop count appended per packet.
    cached = pcapng.packet_options(comment=case.comment, inbound=case.inbound, key=case.key)
    if case.dropcount is not None:
        cached += pcapng.dropcount_option(case.dropcount)
    return pcapng.enhanced_packet(
        case.interface, case.timestamp_ns, case.data, case.orig_len, cached
    )


def sample_blocks() -> list[bytes]:
    blocks = [pcapng.section_header(**SHB, comment=SHB_COMMENT)]
    blocks += [
        pcapng.interface_description(
            i.linktype, i.snaplen, name=i.name, description=i.description, filter=i.filter
        )
        for i in INTERFACES
    ]
    blocks += [packet_block(case) for case in PACKETS]
    blocks += [
        pcapng.interface_statistics(
            s.interface,
            END_NS,
            received=s.received,
            dropped=s.dropped,
            filter_accept=s.filter_accept,
            start_ns=s.start_ns,
            end_ns=s.end_ns,
            comment=s.comment,
        )
        for s in STATS
    ]
    return blocks


SAMPLE = b"".join(sample_blocks())


def epoch_text(ns: int) -> str:
    return f"{ns // 10**9}.{ns % 10**9:09d}"


@pytest.fixture(scope="module")
def sample_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pcapng") / "sample.pcapng"
    path.write_bytes(SAMPLE)
    return path


# ---------------------------------------------------------------------------------------------
# tshark

FIELDS = [
    "frame.interface_id",
    "frame.interface_name",
    "frame.interface_description",
    "frame.time_epoch",
    "frame.len",
    "frame.cap_len",
    "frame.comment",
    "frame.drop_count",
    "frame.packet_flags_direction",
    "frame.protocols",
]


def tshark_packets(args: list[str], stdin: bytes | None = None) -> tuple[list[dict], list[str]]:
    command = [tool("tshark"), *args, "-T", "json"]
    for field in FIELDS:
        command += ["-e", field]
    stdout, stderr = run(command, stdin)
    return [packet["_source"]["layers"] for packet in json.loads(stdout)], stderr


@pytest.fixture(scope="module")
def tshark_read(sample_file: Path) -> tuple[list[dict], list[str]]:
    return tshark_packets(["-r", str(sample_file)])


def expected_tshark_fields(case: PacketCase) -> dict[str, list[str]]:
    interface = INTERFACES[case.interface]
    fields = {
        "frame.interface_id": [str(case.interface)],
        "frame.interface_name": [interface.name],
        "frame.time_epoch": [epoch_text(case.timestamp_ns)],
        "frame.len": [str(case.orig_len)],
        "frame.cap_len": [str(len(case.data))],
        "frame.protocols": [case.protocols],
    }
    if interface.description is not None:
        fields["frame.interface_description"] = [interface.description]
    if case.with_options and case.comment is not None:
        fields["frame.comment"] = [case.comment]
    if case.dropcount is not None:
        fields["frame.drop_count"] = [str(case.dropcount)]
    if case.with_options and case.inbound:
        fields["frame.packet_flags_direction"] = ["0x00000001"]
    return fields


def test_tshark_reads_every_packet_as_written(tshark_read: tuple[list[dict], list[str]]) -> None:
    packets, _ = tshark_read
    assert len(packets) == len(PACKETS)
    for number, (got, case) in enumerate(zip(packets, PACKETS, strict=True), 1):
        assert got == expected_tshark_fields(case), f"packet {number}"


def test_tshark_reads_the_file_without_warnings(tshark_read: tuple[list[dict], list[str]]) -> None:
    # The custom key option and every other option must be accepted silently.
    _, stderr = tshark_read
    assert stderr == []


@pytest.mark.parametrize("source", [["-r", "-"], ["-i", "-"]], ids=["read-stdin", "live-pipe"])
def test_tshark_reads_the_stream_through_a_pipe(source: list[str]) -> None:
    # `upcall-capture -w - | wireshark -k -i -` goes through dumpcap's pipe reader (-i -).
    packets, _ = tshark_packets(source, stdin=SAMPLE)
    got = [
        (p["frame.time_epoch"], p["frame.interface_name"], p.get("frame.comment")) for p in packets
    ]
    want = [
        (
            [epoch_text(c.timestamp_ns)],
            [INTERFACES[c.interface].name],
            [c.comment] if c.with_options and c.comment is not None else None,
        )
        for c in PACKETS
    ]
    assert got == want


def capinfos_interfaces(report: str) -> list[dict[str, str]]:
    """The `Interface #N info:` sections of a capinfos report, as key = value maps."""
    interfaces: list[dict[str, str]] = []
    for line in report.splitlines():
        if line.startswith("Interface #"):
            interfaces.append({})
        elif interfaces and " = " in line and line.startswith(" "):
            key, value = line.strip().split(" = ", 1)
            interfaces[-1][key] = value
    return interfaces


def test_capinfos_shows_section_header_interfaces_and_statistics(sample_file: Path) -> None:
    report, _ = run([tool("capinfos"), str(sample_file)])
    assert f"Capture hardware:    {SHB['hardware']}\n" in report
    assert f"Capture oper-sys:    {SHB['os']}\n" in report
    assert f"Capture application: {SHB['userappl']}\n" in report
    assert f"Capture comment:     {SHB_COMMENT}\n" in report
    interfaces = capinfos_interfaces(report)
    assert len(interfaces) == len(INTERFACES)
    for got, want, encapsulation in zip(
        interfaces, INTERFACES, ["Ethernet (1 - ether)", "Raw IP (7 - rawip)"], strict=True
    ):
        assert got["Name"] == want.name
        assert got.get("Description") == want.description
        assert got.get("Filter string") == want.filter
        assert got["Encapsulation"] == encapsulation
        assert got["Capture length"] == str(want.snaplen)
        assert got["Time precision"] == "nanoseconds (9)"
        assert got["Number of stat entries"] == "1"


def test_editcap_keeps_comments_and_the_custom_key_option(
    sample_file: Path, tmp_path: Path
) -> None:
    # Wireshark's own writer re-encodes what its reader understood of each option.
    copy = tmp_path / "copy.pcapng"
    run([tool("editcap"), "-F", "pcapng", str(sample_file), str(copy)])
    packets = [b for b in pcapng.iter_blocks(copy.read_bytes()) if isinstance(b, pcapng.Packet)]
    assert [(p.key, p.comments, p.data) for p in packets] == [
        (c.key, [c.comment] if c.with_options and c.comment else [], c.data) for c in PACKETS
    ]


# ---------------------------------------------------------------------------------------------
# scapy


def test_scapy_reads_every_packet_as_written(sample_file: Path) -> None:
    with PcapNgReader(str(sample_file)) as reader:
        packets = list(reader)
    assert len(packets) == len(PACKETS)
    for got, case in zip(packets, PACKETS, strict=True):
        assert bytes(got) == case.data
        assert got.wirelen == case.orig_len
        assert got.time == Decimal(epoch_text(case.timestamp_ns))  # exact, not a float
        assert got.sniffed_on == INTERFACES[case.interface].name
        want_comments = [case.comment.encode()] if case.with_options and case.comment else None
        assert got.comments == want_comments
        assert got.direction == (1 if case.with_options and case.inbound else None)
    assert isinstance(packets[0], Ether) and packets[0].haslayer(TCP)
    assert isinstance(packets[2], IP) and packets[2][UDP].dport == 40003  # raw IP link type


# ---------------------------------------------------------------------------------------------
# Our reader


def test_iter_blocks_reads_back_what_was_written() -> None:
    blocks = list(pcapng.iter_blocks(SAMPLE))
    sizes = [len(b) for b in sample_blocks()]
    assert [b.length for b in blocks] == sizes
    assert [b.offset for b in blocks] == [sum(sizes[:i]) for i in range(len(sizes))]

    shb, *rest = blocks
    assert isinstance(shb, pcapng.SectionHeader)
    assert (shb.big_endian, shb.version, shb.section_length) == (False, (1, 0), -1)
    assert (shb.userappl, shb.os, shb.hardware) == (SHB["userappl"], SHB["os"], SHB["hardware"])
    assert shb.comments == [SHB_COMMENT]

    idbs = rest[: len(INTERFACES)]
    for index, (idb, want) in enumerate(zip(idbs, INTERFACES, strict=True)):
        assert isinstance(idb, pcapng.InterfaceDescription)
        assert (idb.interface_id, idb.linktype, idb.snaplen) == (index, want.linktype, want.snaplen)
        assert (idb.name, idb.description, idb.filter) == (want.name, want.description, want.filter)
        assert (idb.units_per_second, idb.tsoffset) == (10**9, 0)

    packets = rest[len(INTERFACES) : len(INTERFACES) + len(PACKETS)]
    for packet, case in zip(packets, PACKETS, strict=True):
        assert isinstance(packet, pcapng.Packet)
        assert (packet.interface_id, packet.timestamp_ns) == (case.interface, case.timestamp_ns)
        assert (packet.data, packet.orig_len) == (case.data, case.orig_len)
        has_comment = case.with_options and case.comment is not None
        assert packet.comments == ([case.comment] if has_comment else [])
        assert packet.inbound == (case.with_options and case.inbound)
        assert packet.dropcount == case.dropcount
        assert packet.key == case.key

    isbs = rest[len(INTERFACES) + len(PACKETS) :]
    assert [
        StatsCase(
            i.interface_id,
            i.received,
            i.dropped,
            i.filter_accept,
            i.start_ns,
            i.end_ns,
            i.comments[0] if i.comments else None,
        )
        for i in isbs
        if isinstance(i, pcapng.InterfaceStatistics)
    ] == STATS
    assert all(i.timestamp_ns == END_NS for i in isbs)


def test_statistics_use_the_option_codes_of_the_specification() -> None:
    # Read back by our own reader only (neither tshark nor scapy shows ISB values), so check
    # the raw options against the specification's codes rather than the module's constants.
    (isb, _) = [b for b in pcapng.iter_blocks(SAMPLE) if b.type == 5]
    stats = STATS[0]
    u64 = struct.Struct("<Q").pack
    assert isb.options == {
        1: [stats.comment.encode()],
        2: [struct.pack("<II", stats.start_ns >> 32, stats.start_ns & 0xFFFFFFFF)],
        3: [struct.pack("<II", stats.end_ns >> 32, stats.end_ns & 0xFFFFFFFF)],
        4: [u64(stats.received)],
        5: [u64(stats.dropped)],
        6: [u64(stats.filter_accept)],
    }


def be_option(code: int, value: bytes) -> bytes:
    return struct.pack(">HH", code, len(value)) + value + bytes(-len(value) % 4)


def be_block(block_type: int, body: bytes) -> bytes:
    return struct.pack(">II", block_type, len(body) + 12) + body + struct.pack(">I", len(body) + 12)


END = be_option(0, b"")
# A big-endian section, as another tool on another machine might write: microsecond and
# 1/1024-second interfaces, an if_tsoffset, an EPB, an SPB cut by the snaplen, an ISB.
BIG_ENDIAN = b"".join(
    [
        be_block(0x0A0D0D0A, struct.pack(">IHHq", 0x1A2B3C4D, 1, 0, -1) + END),
        be_block(
            1,
            struct.pack(">HHI", 1, 0, 62)
            + be_option(2, b"em1\0junk")
            + be_option(9, b"\x06")
            + be_option(14, struct.pack(">q", 100))
            + END,
        ),
        be_block(1, struct.pack(">HHI", 101, 0, 0) + be_option(9, b"\x8a") + END),
        be_block(
            6,
            struct.pack(">IIIII", 0, 0, 1_500_000, 3, 3)
            + b"abc\0"
            + be_option(2, struct.pack(">I", 1))
            + be_option(4, struct.pack(">Q", 9))
            + be_option(2989, struct.pack(">I", 32473) + b"key")
            + END,
        ),
        be_block(6, struct.pack(">IIIII", 1, 0, 3 * 1024 + 512, 1, 1) + b"E\0\0\0"),
        # 62 bytes kept of 100 by the snaplen, then 2 bytes of padding.
        be_block(3, struct.pack(">I", 100) + bytes(range(62)) + bytes(2)),
        be_block(
            5, struct.pack(">III", 0, 0, 2_000_000) + be_option(4, struct.pack(">Q", 3)) + END
        ),
    ]
)


def test_iter_blocks_reads_big_endian_and_converts_timestamps_to_ns() -> None:
    # Our own little-endian section follows: a new section resets interfaces and byte order.
    blocks = list(pcapng.iter_blocks(BIG_ENDIAN + SAMPLE))
    shb, em1, raw, epb, epb2, spb, isb, our_shb = blocks[:8]
    assert shb.big_endian and not our_shb.big_endian
    assert em1.name == "em1"  # a string stops at a zero octet
    assert (em1.units_per_second, em1.tsoffset, raw.units_per_second) == (10**6, 100, 1024)
    assert epb.timestamp_ns == 101_500_000_000
    assert (epb.data, epb.inbound, epb.dropcount, epb.key) == (b"abc", True, 9, b"key")
    assert (epb2.interface_id, epb2.timestamp_ns, epb2.data) == (1, 3_500_000_000, b"E")
    assert (spb.timestamp_ns, spb.data, spb.orig_len) == (None, bytes(range(62)), 100)
    assert (isb.timestamp_ns, isb.received, isb.dropped) == (102_000_000_000, 3, None)
    our_packets = [b for b in blocks[8:] if isinstance(b, pcapng.Packet)]
    assert [p.timestamp_ns for p in our_packets] == [c.timestamp_ns for c in PACKETS]


def test_big_endian_sample_agrees_with_tshark(tmp_path: Path) -> None:
    # Keeps the hand-made big-endian bytes above honest.
    path = tmp_path / "be.pcapng"
    path.write_bytes(BIG_ENDIAN)
    packets, _ = tshark_packets(["-r", str(path)])
    fields = ["frame.time_epoch", "frame.len", "frame.cap_len", "frame.drop_count"]
    assert [[p.get(field) for field in fields] for p in packets] == [
        [["101.500000000"], ["3"], ["3"], ["9"]],
        [["3.500000000"], ["1"], ["1"], None],
        [None, ["100"], ["62"], None],  # a simple packet has no timestamp
    ]
    assert packets[0]["frame.interface_name"] == ["em1"]
    assert packets[0]["frame.packet_flags_direction"] == ["0x00000001"]


def test_iter_blocks_reports_a_truncated_tail_after_the_complete_blocks() -> None:
    sizes = [len(b) for b in sample_blocks()]
    cut = sum(sizes[:4]) + 10
    seen = []
    with pytest.raises(pcapng.TruncatedBlock) as error:
        for block in pcapng.iter_blocks(SAMPLE[:cut]):
            seen.append(block.offset)
    assert seen == [sum(sizes[:i]) for i in range(4)]
    assert error.value.offset == sum(sizes[:4])


def corrupt(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


SIZES = [len(b) for b in sample_blocks()]
THIRD_BLOCK = sum(SIZES[:3])  # the first EPB
FIRST_FLAGS = SAMPLE.index(pcapng.packet_options(inbound=True), THIRD_BLOCK)
assert FIRST_FLAGS < THIRD_BLOCK + SIZES[3]


@pytest.mark.parametrize(
    ("data", "offset"),
    [
        # The trailing length of the first EPB disagrees with the leading one.
        (corrupt(SAMPLE, THIRD_BLOCK + SIZES[3] - 4, struct.pack("<I", 8)), THIRD_BLOCK),
        # A total length that is not a multiple of 4.
        (corrupt(SAMPLE, THIRD_BLOCK + 4, struct.pack("<I", SIZES[3] - 2)), THIRD_BLOCK),
        # An EPB on interface 7, which no IDB defined.
        (corrupt(SAMPLE, THIRD_BLOCK + 8, struct.pack("<I", 7)), THIRD_BLOCK),
        # An EPB too short for its fixed fields.
        (SAMPLE + struct.pack("<III", 6, 12, 12), len(SAMPLE)),
        # A captured length past the end of the block.
        (corrupt(SAMPLE, THIRD_BLOCK + 20, struct.pack("<I", 5000)), THIRD_BLOCK),
        # epb_flags with length 3 instead of 4.
        (corrupt(SAMPLE, FIRST_FLAGS, b"\x02\0\x03\0"), THIRD_BLOCK),
        # Zero bytes after the last block (a preallocated or half-written file).
        (SAMPLE + bytes(64), len(SAMPLE)),
        # A classic pcap file.
        (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1), 0),
        # An SHB with a bad byte-order magic.
        (corrupt(SAMPLE, 8, b"\0\0\0\0"), 0),
    ],
    ids=[
        "trailer",
        "unaligned",
        "interface",
        "short",
        "caplen",
        "option-length",
        "zeros",
        "pcap",
        "magic",
    ],
)
def test_malformed_blocks_are_errors_and_not_counted_complete(data: bytes, offset: int) -> None:
    with pytest.raises(pcapng.PcapngError) as error:
        list(pcapng.iter_blocks(data))
    assert not isinstance(error.value, pcapng.TruncatedBlock)
    assert error.value.offset == offset
    assert pcapng.complete_length(data) == offset


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(SAMPLE) - 1), st.integers(0, 255)), max_size=4))
def test_corrupted_files_raise_only_pcapng_errors(changes: list[tuple[int, int]]) -> None:
    data = bytearray(SAMPLE)
    for offset, value in changes:
        data[offset] = value
    try:
        blocks = list(pcapng.iter_blocks(data))
    except pcapng.PcapngError:
        blocks = None
    good = pcapng.complete_length(data)
    assert good % 4 == 0 and good <= len(data)
    if blocks is not None:
        assert good == len(data)


def test_complete_length_at_every_cut() -> None:
    boundaries = [sum(SIZES[:i]) for i in range(len(SIZES) + 1)]
    view = memoryview(SAMPLE)
    for cut in range(len(SAMPLE) + 1):
        want = max(b for b in boundaries if b <= cut)
        assert pcapng.complete_length(view[:cut]) == want, f"cut at {cut}"


def test_complete_length_works_on_an_mmap_that_is_then_truncated(tmp_path: Path) -> None:
    # How a writer repairs its file after ENOSPC: map it, measure, unmap, truncate.
    path = tmp_path / "partial.pcapng"
    path.write_bytes(SAMPLE + SAMPLE[THIRD_BLOCK : THIRD_BLOCK + 50])
    with path.open("r+b") as file:
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            good = pcapng.complete_length(mapped)
        file.truncate(good)  # the mmap closed cleanly: no view of it was left behind
    assert path.read_bytes() == SAMPLE


# ---------------------------------------------------------------------------------------------
# Writer edge cases


@settings(max_examples=150, deadline=None)
@given(
    interface_id=st.integers(0, len(INTERFACES) - 1),
    timestamp_ns=st.integers(0, 2**64 - 1),
    data=st.binary(max_size=70),
    extra=st.integers(0, 2**32 - 71),
    comment=st.none() | st.text(max_size=40),
    inbound=st.booleans(),
    dropcount=st.none() | st.integers(0, 2**64 - 1),
    key=st.none() | st.binary(max_size=30),
)
def test_enhanced_packet_round_trip(
    interface_id: int,
    timestamp_ns: int,
    data: bytes,
    extra: int,
    comment: str | None,
    inbound: bool,
    dropcount: int | None,
    key: bytes | None,
) -> None:
    options = pcapng.packet_options(comment=comment, inbound=inbound, key=key)
    if dropcount is not None:
        options += pcapng.dropcount_option(dropcount)
    block = pcapng.enhanced_packet(interface_id, timestamp_ns, data, len(data) + extra, options)
    assert len(block) % 4 == 0
    assert struct.unpack_from("<I", block, 4)[0] == len(block) == struct.unpack("<I", block[-4:])[0]
    (packet,) = list(pcapng.iter_blocks(SAMPLE[:THIRD_BLOCK] + block))[3:]  # after SHB, IDBs
    assert (packet.interface_id, packet.timestamp_ns) == (interface_id, timestamp_ns)
    assert (packet.data, packet.orig_len) == (data, len(data) + extra)
    # Readers stop a string at a zero octet, as the specification requires.
    assert packet.comments == ([] if comment is None else [comment.split("\0")[0]])
    assert (packet.inbound, packet.dropcount, packet.key) == (inbound, dropcount, key)
    # Header, padded data, then the options closed by opt_endofopt only when there are any.
    options_at = 28 + len(data) + (-len(data) % 4)
    assert block[options_at : options_at + len(options)] == options
    assert len(block) == options_at + (len(options) + 4 if options else 0) + 4
    assert block[options_at + len(options) : -4] == (bytes(4) if options else b"")


@pytest.mark.parametrize(
    "call",
    [
        lambda: pcapng.enhanced_packet(0, 0, b"abcd", 3),  # original shorter than captured
        lambda: pcapng.enhanced_packet(0, 2**64, b"", 0),
        lambda: pcapng.enhanced_packet(0, -1, b"", 0),
        lambda: pcapng.enhanced_packet(2**32, 0, b"", 0),
        lambda: pcapng.packet_options(comment="x" * 65536),
    ],
    ids=["orig-len", "ts-overflow", "ts-negative", "interface-id", "long-option"],
)
def test_invalid_values_are_refused(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()


def test_undecodable_names_are_written_as_valid_utf8() -> None:
    # A dpif or port name from os.fsdecode may hold lone surrogates.
    block = pcapng.interface_description(pcapng.LINKTYPE_ETHERNET, 0, name="br\udcff0")
    (idb,) = list(pcapng.iter_blocks(SAMPLE[: SIZES[0]] + block))[1:]
    assert idb.options[pcapng.IF_NAME][0].decode("utf-8") == "br\\udcff0"


@given(head=st.binary(max_size=40), tail=st.binary(max_size=40), key=st.binary(max_size=40))
def test_the_fast_commented_key_options_are_packet_options_bytes(head, tail, key):
    # The storm's paths build these in one join (a new key) and around a key (a shed
    # one): byte for byte what the general writer makes, at every padding.
    expected = pcapng.packet_options(comment=head + tail, key=key)
    assert pcapng.commented_key_options(head, key, tail) == expected
    if key[:1] != b"\xff":  # escaped (KEY_TAG); never a key of a compiled shape
        before, after = pcapng.commented_key_options_around(head + tail, len(key))
        assert before + key + after == expected


ONE_INTERFACE = (pcapng.section_header(userappl="t", os="t", hardware="t")
                 + pcapng.interface_description(pcapng.LINKTYPE_ETHERNET, 0, name="eth0"))


def read_packet(options: bytes) -> pcapng.Packet:
    block = pcapng.enhanced_packet(0, 0, b"abc", 3, options)
    (packet,) = [b for b in pcapng.iter_blocks(ONE_INTERFACE + block)
                 if isinstance(b, pcapng.Packet)]
    return packet


@pytest.mark.parametrize("key", [
    b"\xffout", b"\xffout\x00\x00\x00", b"\xffmsk", b"\xffkey\x01", b"\xff", b"\xff\x00",
    b"\x08\x00\x14\x00\x00\x00\x00\x00", b"",
])
def test_a_key_reads_back_as_itself_whatever_its_first_bytes(key):
    # The probe copies whatever bytes the traced process passes: a fuzzed key b"\xffout"
    # read back as no key at all, taken for an outcome's tag.
    for options in (
        pcapng.packet_options(comment="c", key=key, mask=b"mask"),
        pcapng.commented_key_options(b"c", key) + pcapng.mask_option(b"mask")
        + pcapng.raw_outcome_option(b"trailer"),
    ):
        packet = read_packet(options)
        assert (packet.key, packet.mask) == (key, b"mask")
    assert read_packet(pcapng.raw_outcome_option(b"trailer")).key is None


def test_a_key_that_starts_with_0xff_unescaped_still_reads_back():
    # As files written before KEY_TAG hold it, unless it starts with another tag.
    key = b"\xff\x00\x02\x00" + bytes(4)
    value = struct.pack("<I", pcapng.KEY_OPTION_PEN) + key
    option = struct.pack("<HH", pcapng.OPT_CUSTOM_BINARY, len(value)) + value
    assert read_packet(option).key == key
