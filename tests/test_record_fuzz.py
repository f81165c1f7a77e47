"""Fuzzing the whole record path: probe records, sane or not, never make a bad file.

Records are laid out as recv_upcall.c lays them out (probe.record.HEADER, then key_len
key bytes, then pkt_len packet bytes from pkt_offset, which leaves room for the bytes
that lay between key and packet), with random and mutated keys, packets, flags, names
and numbers, and go through the pcapng writer (UpcallBlocks), reading back (-r) and the
console lines.

Two kinds of record. Those the BPF program can make (pkt_len = min(pkt_size, snaplen)
or 0 when unreadable, key_len the key bytes that follow) must come back from -r as they
went in. Malformed ones, whose length fields disagree with the bytes that follow or with
each other, cannot come from recv_upcall.c, but a record is data from the kernel and
must not be trusted with the file's integrity. The rule for them: what is captured is
the bytes actually present, never more than the length fields say; the original length
is never less than what was captured; and the file stays well formed, nothing raises.
For both, batching and the option cache write what each record alone would.

A modest budget for CI (deadline=None: machines are noisy).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path

import upcalls  # samples/replay/upcalls.py
from conftest import REPLAY_DIR
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upcall_capture import comment, pcapng
from upcall_capture.flowkey import format_key
from upcall_capture.probe.record import (
    DEFAULT_SNAPLEN,
    F_FAILED,
    F_KERNEL,
    F_KEY_UNREADABLE,
    F_OUTCOME,
    F_PKT_UNREADABLE,
    HEADER,
    HEADER_SIZE,
    MAX_KEY_CAP,
    MAX_SNAPLEN,
    PKT_GAP_MAX,
    UPCALL_TYPES,
    cstring,
    parse,
)
from upcall_capture.readback import read_upcalls
from upcall_capture.upcall_blocks import UpcallBlocks
from upcall_capture.view import ConsolePrinter, from_record

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SAMPLES = upcalls.read_records(REPLAY_DIR / "mixed.upc")[:60]
CLOCK_OFFSET_NS = 1_700_000_000_000_000_000  # wall clock minus CLOCK_MONOTONIC, about now
SECTION = pcapng.section_header(userappl="fuzz", os="fuzz", hardware="fuzz")
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)


def no_port_names(dpif: str, port: int) -> None:
    return None


@dataclass(frozen=True)
class Fields:
    """A record's header, field by field (the order of HEADER)."""

    ktime_ns: int
    key_size: int
    pid: int
    tid: int
    cpu: int
    type: int
    pkt_size: int
    pkt_len: int
    key_len: int
    pkt_offset: int
    flags: int
    comm: bytes
    dpif: bytes

    def record(self, body: bytes) -> bytes:
        return HEADER.pack(self.ktime_ns, self.key_size, self.pid, self.tid, self.cpu,
                           self.type, self.pkt_size, self.pkt_len, self.key_len,
                           self.pkt_offset, self.flags,
                           self.comm, self.dpif) + body


# Names as the kernel could hand them over: NUL-terminated or filling the whole field,
# UTF-8 or not, with control characters.
NAME_BYTES = st.one_of(
    st.sampled_from([b"system@ovs-system", b"system@br-tun", b"netdev@ovs-netdev"]),
    st.binary(max_size=80),
    st.text(max_size=40).map(lambda text: text.encode()),
)
THREADS = st.one_of(st.sampled_from([b"handler1", b"revalidator7", b""]), st.binary(max_size=20))


@st.composite
def payloads(draw: st.DrawFn, real: list[bytes], cap: int) -> bytes:
    """A real key or packet, maybe cut, extended or with bytes changed; or random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=min(cap, 600)))
    data = bytearray(draw(st.sampled_from(real)))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["set", "cut", "insert"]))
        if op == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data[:cap])


KEYS = payloads([u.key for u in SAMPLES], MAX_KEY_CAP)
PACKETS = payloads([u.packet for u in SAMPLES], MAX_SNAPLEN)


@st.composite
def lengths(draw: st.DrawFn, actual: int, bits: int) -> int:
    """A length field for `actual` bytes: right, or off by a little, or anything."""
    return draw(st.one_of(
        st.just(actual),
        st.integers(max(actual - 8, 0), actual + 8),
        st.integers(0, 2**bits - 1),
    ))


def probe_packet(packet: bytes, snaplen: int, flags: int) -> tuple[int, bytes]:
    """As recv_upcall.c copies a packet: pkt_size, and the bytes it captures."""
    return len(packet), b"" if flags & F_PKT_UNREADABLE else packet[:snaplen]


@st.composite
def probe_records(draw: st.DrawFn, snaplen: int | None) -> bytes:
    """A record as recv_upcall.c makes it with this snaplen; None: with any lengths."""
    key, packet = draw(KEYS), draw(PACKETS)
    flags = draw(st.one_of(st.integers(0, 15), U32))
    if snaplen is not None:
        # F_KERNEL, F_FAILED and F_OUTCOME mark records the capture makes itself (the
        # kernel side's and the outcomes stage's), never one of recv_upcall.c's.
        flags &= ~(F_KERNEL | F_FAILED | F_OUTCOME)
        key = b"" if flags & F_KEY_UNREADABLE else key
        key_len, key_size = len(key), draw(st.one_of(st.just(len(key)), U32))
        key_size = max(key_size, key_len)
        pkt_size, packet = probe_packet(packet, snaplen, flags)
        pkt_len = len(packet)
        # Read at once, key and packet come with what lay between them in OVS's message.
        both_read = not flags & (F_KEY_UNREADABLE | F_PKT_UNREADABLE)
        gap = draw(st.binary(max_size=PKT_GAP_MAX)) if both_read else b""
        pkt_offset = key_len + len(gap)
        tail: bytes | int = b""
    else:
        key_len, key_size = draw(lengths(len(key), 32)), draw(U64)
        gap = draw(st.binary(max_size=16))
        pkt_offset = draw(lengths(len(key) + len(gap), 32))
        pkt_len, pkt_size = draw(lengths(len(packet), 32)), draw(U32)
        # Ending early, or with bytes past what the lengths cover.
        tail = draw(st.one_of(st.binary(max_size=8), st.integers(1, 64)))
    fields = Fields(
        # bpf_ktime_get_ns(): ns since boot; far from 2**64 even with the wall-clock offset.
        ktime_ns=draw(st.integers(0, 2**62)), key_size=key_size,
        pid=draw(U32), tid=draw(U32), cpu=draw(st.integers(0, 4096)),
        type=draw(st.one_of(st.sampled_from(sorted(UPCALL_TYPES)), U32)),
        pkt_size=pkt_size, pkt_len=pkt_len, key_len=key_len, pkt_offset=pkt_offset,
        flags=flags, comm=draw(THREADS), dpif=draw(NAME_BYTES),
    )
    body = key + gap + packet
    body = body[:-tail] if isinstance(tail, int) else body + tail
    return fields.record(body)


SNAPLENS = st.one_of(st.just(DEFAULT_SNAPLEN), st.integers(1, 200))


@st.composite
def batches(draw: st.DrawFn, sane: bool) -> list[bytes]:
    """Records, some of them variants of others (a new time and packet with the same
    metadata and key), as in an upcall storm where the option cache is used."""
    snaplen = draw(SNAPLENS) if sane else None
    records = draw(st.lists(probe_records(snaplen), min_size=1, max_size=6))
    for _ in range(draw(st.integers(0, 6))):
        base = draw(st.sampled_from(records))
        fields = Fields(*HEADER.unpack_from(base))
        if sane:
            pkt_size, packet = probe_packet(draw(PACKETS), snaplen, fields.flags)
            pkt_len = len(packet)
        else:
            packet = draw(PACKETS)
            # Few sizes, so that variants share one while their captured lengths differ.
            pkt_size, pkt_len = draw(st.one_of(st.sampled_from([0, 60, 1514]), U32)), len(packet)
        key_and_gap = base[HEADER_SIZE:HEADER_SIZE + fields.pkt_offset]
        fields = replace(fields, ktime_ns=draw(st.integers(0, 2**62)), pkt_size=pkt_size,
                         pkt_len=pkt_len)
        records.append(fields.record(key_and_gap + packet))
    return records


def ring_views(records: list[bytes]) -> list[memoryview]:
    """The records as the loader hands them over: views into one buffer read from a ring."""
    ring = memoryview(b"".join(records))
    views, at = [], 0
    for record in records:
        views.append(ring[at:at + len(record)])
        at += len(record)
    return views


def write(records: list[bytes], dropped: int = 0, *, as_views: bool = False) -> bytes:
    blocks = UpcallBlocks(snaplen=DEFAULT_SNAPLEN, clock_offset_ns=CLOCK_OFFSET_NS,
                          port_name=no_port_names)
    batch = ring_views(records) if as_views else records
    return SECTION + blocks.packets(batch, dropped) + blocks.statistics(2**62, start_ktime_ns=0)


def parsed(data: bytes) -> tuple[list[pcapng.Packet], list[pcapng.InterfaceDescription],
                                 list[pcapng.InterfaceStatistics]]:
    assert pcapng.complete_length(data) == len(data)
    blocks = list(pcapng.iter_blocks(data))
    return ([b for b in blocks if isinstance(b, pcapng.Packet)],
            [b for b in blocks if isinstance(b, pcapng.InterfaceDescription)],
            [b for b in blocks if isinstance(b, pcapng.InterfaceStatistics)])


def present(record: bytes) -> tuple[bytes, bytes]:
    """The key and packet bytes a record really holds, within its length fields."""
    fields = Fields(*HEADER.unpack_from(record))
    packet_at = HEADER_SIZE + fields.pkt_offset
    return (record[HEADER_SIZE:HEADER_SIZE + fields.key_len],
            record[packet_at:packet_at + fields.pkt_len])


def check_file(records: list[bytes], dropped: int, as_views: bool) -> None:
    """The file is well formed and holds every record, as much of it as is there."""
    packets, interfaces, stats = parsed(write(records, dropped, as_views=as_views))
    assert len(packets) == len(records)
    for packet, record in zip(packets, records, strict=True):
        fields = Fields(*HEADER.unpack_from(record))
        key, body = present(record)
        assert body.startswith(packet.data)
        assert packet.orig_len >= len(packet.data)
        assert packet.key == key
        assert packet.timestamp_ns == fields.ktime_ns + CLOCK_OFFSET_NS
        assert packet.inbound
        assert packet.comments[0].startswith("upcall ")
        assert interfaces[packet.interface_id].name
    assert len(stats) == len(interfaces)
    assert sum(s.received for s in stats) == len(records)
    assert sum(s.dropped for s in stats) == dropped
    assert sum(p.dropcount or 0 for p in packets) == dropped


def check_batching(records: list[bytes]) -> None:
    """Batches and the option cache write what each record alone would."""
    batched, interfaces, _ = parsed(write(records, as_views=True))
    for packet, record in zip(batched, records, strict=True):
        (alone,), (interface,), _ = parsed(write([record]))
        assert (packet.comments, packet.key, packet.data, packet.orig_len) == \
            (alone.comments, alone.key, alone.data, alone.orig_len)
        batched_interface = interfaces[packet.interface_id]
        assert (batched_interface.name, batched_interface.linktype) == \
            (interface.name, interface.linktype)


def whitespace_free(name: str) -> bool:
    return not any(char.isspace() for char in name)


def check_read_back(records: list[bytes], directory: Path, sane: bool) -> None:
    """-r gives every upcall back, with its metadata when the names allow."""
    path = directory / "records.pcapng"
    path.write_bytes(write(records))
    items = list(read_upcalls(str(path)))
    assert len(items) == len(records)
    for item, record in zip(items, records, strict=True):
        fields = Fields(*HEADER.unpack_from(record))
        key, body = present(record)
        upcall = item.upcall
        assert upcall.key == key
        assert body.startswith(upcall.packet)
        # Names from real datapaths and threads hold no whitespace (the kernel refuses it
        # in device names); for them the comment's first line gives every field back.
        dpif, thread = cstring(fields.dpif), cstring(fields.comm)
        if parse(record).failed:
            # A failed upcall (the kernel side's, made by the capture): no handler had it,
            # and its comment says what the kernel said instead.
            device = parse(record).enqueue.device
            if whitespace_free(dpif) and whitespace_free(device) and ")" not in device:
                assert upcall.failed
                assert (upcall.cpu, upcall.type, upcall.dpif) == (fields.cpu, fields.type, dpif)
        elif whitespace_free(dpif) and whitespace_free(thread):
            assert (upcall.pid, upcall.tid, upcall.cpu, upcall.type) == \
                (fields.pid, fields.tid, fields.cpu, fields.type)
            assert (upcall.dpif, upcall.thread) == (dpif, thread)
            if sane:
                assert (upcall.key_size, upcall.pkt_size) == (fields.key_size, fields.pkt_size)


@FUZZ
@given(batches(sane=True), st.integers(0, 2**40), st.booleans())
def test_probe_records_make_a_file_that_reads_back(tmp_path_factory, records: list[bytes],
                                                    dropped: int, as_views: bool) -> None:
    check_file(records, dropped, as_views)
    check_batching(records)
    check_read_back(records, tmp_path_factory.mktemp("sane"), sane=True)


@FUZZ
@given(batches(sane=False), st.integers(0, 2**40), st.booleans())
def test_malformed_records_still_make_a_well_formed_file(
        tmp_path_factory, records: list[bytes], dropped: int, as_views: bool) -> None:
    check_file(records, dropped, as_views)
    check_batching(records)
    check_read_back(records, tmp_path_factory.mktemp("malformed"), sane=False)


@FUZZ
@given(st.one_of(SNAPLENS, st.none()).flatmap(probe_records), st.booleans())
def test_console_lines_for_any_record(record: bytes, dissect: bool) -> None:
    item = from_record(ring_views([record])[0], CLOCK_OFFSET_NS, no_port_names)
    key, body = present(record)
    assert item.upcall.key == key
    assert body.startswith(item.upcall.packet)
    lines = ConsolePrinter(io.StringIO(), verbose=True, hexdump=True,
                           dissect=dissect).lines(item)
    assert f" {item.upcall.type_name} " in lines[0]
    prefix = comment.TRACEPOINT_KEY if item.upcall.failed else ""
    assert lines[1] == "\t" + prefix + format_key(key, item.upcall.key_size)
    hex_lines = [line for line in lines if line.startswith("\t0x")]
    assert bytes.fromhex("".join(line.split(":", 1)[1] for line in hex_lines)) == \
        item.upcall.packet
