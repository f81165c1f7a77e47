"""upcall_blocks: the fast path writes exactly the blocks the plain pcapng writer would,
and its cache of options never serves one upcall's comment for another's."""

from __future__ import annotations

import random
import re
from dataclasses import replace

import pytest
import upcalls
from conftest import REPLAY_DIR, VECTORS
from probe_records import probe_record, storm

from upcall_capture import comment, pcapng, upcall_blocks
from upcall_capture.flowkey import decode_key, format_key
from upcall_capture.probe.record import (
    F_OUTCOME_SHED,
    FLAGS_OFFSET,
    HEADER_SIZE,
    UNKNOWN_TIMEOUT,
    Outcome,
    header_offset,
    parse,
    with_outcome,
)
from upcall_capture.upcall_blocks import UpcallBlocks, port_and_eth

SENT = upcalls.read_records(REPLAY_DIR / "mixed.upc")[:200]
SNAPLEN = 9216
OFFSET = 1_700_000_000_000_000_000
SHB = pcapng.section_header(userappl="t", os="t", hardware="t")


def record(upcall, index: int, *, cpu: int = 0, tid: int = 43, snaplen: int = SNAPLEN,
           gap: int = 0) -> bytes:
    """What recv_upcall.c submits; with gap bytes between key and packet, as when it read
    both at once from one netlink message."""
    return probe_record(upcall, ktime_ns=1000 + index, tid=tid, cpu=cpu, snaplen=snaplen,
                        gap=b"\xee" * gap)


def blocks_of(data: bytes):
    items = list(pcapng.iter_blocks(SHB + data))
    return ([b for b in items if isinstance(b, pcapng.InterfaceDescription)],
            [b for b in items if isinstance(b, pcapng.Packet)])


def new_blocks(**kwargs) -> UpcallBlocks:
    return UpcallBlocks(snaplen=SNAPLEN, clock_offset_ns=OFFSET,
                        port_name=lambda dpif, port: None, **kwargs)


def test_packets_are_the_plain_writers_blocks_byte_for_byte():
    blocks = new_blocks()
    # Views into one buffer, as the ring hands them out; some with bytes between key and
    # packet, the attribute headers that lie between them in OVS's netlink message.
    raw = [record(u, i, gap=i % 3 * 12) for i, u in enumerate(SENT)]
    buffer = b"".join(raw)
    views, pos = [], 0
    for item in raw:
        views.append(memoryview(buffer)[pos:pos + len(item)])
        pos += len(item)
    # The second batch is served from the cache where keys repeat.
    data = SHB + blocks.packets(views[:100]) + blocks.packets(views[100:])
    items = list(pcapng.iter_blocks(data))
    interfaces = [b for b in items if isinstance(b, pcapng.InterfaceDescription)]
    packets = [b for b in items if isinstance(b, pcapng.Packet)]
    assert len(packets) == len(SENT)
    for index, (packet, upcall) in enumerate(zip(packets, SENT, strict=True)):
        port = int(re.search(r"port (\d+)", interfaces[packet.interface_id].name).group(1))
        text = comment.text(parse(raw[index]), format_key(upcall.key), port, None)
        expected = pcapng.enhanced_packet(
            packet.interface_id, OFFSET + 1000 + index, upcall.packet, len(upcall.packet),
            pcapng.packet_options(comment=text, key=upcall.key))
        assert data[packet.offset:packet.offset + packet.length] == expected


def test_the_cache_tells_apart_what_the_comment_shows():
    upcall = SENT[0]
    blocks = new_blocks()
    data = blocks.packets([
        record(upcall, 0, cpu=0),
        record(upcall, 1, cpu=1),  # same key, other CPU
        record(upcall, 2, tid=44),  # same key, other thread
        record(upcall, 3, cpu=0),  # as the first
        record(upcall, 4, snaplen=20),  # cut: the comment says so
        record(upcall, 5, cpu=0),
    ])
    _, packets = blocks_of(data)
    heads = [p.comments[0].split("\n")[0] for p in packets]
    assert "cpu=0" in heads[0] and "cpu=1" in heads[1] and "tid=44" in heads[2]
    assert heads[3] == heads[0] == heads[5]
    assert "truncated: packet 20 of" in packets[4].comments[0]
    assert "truncated" not in packets[5].comments[0]
    assert [len(p.data) for p in packets] == [len(upcall.packet)] * 4 + [20, len(upcall.packet)]


def test_losses_go_on_the_first_packet_and_into_the_statistics():
    blocks = new_blocks()
    data = blocks.packets([record(u, i) for i, u in enumerate(SENT[:3])], dropped=7)
    _, packets = blocks_of(data)
    assert [p.dropcount for p in packets] == [7, None, None]
    assert packets[0].data == SENT[0].packet
    assert blocks.packets([], dropped=2) == b""  # after the last packet: for the ISB
    data += blocks.statistics(10**6, start_ktime_ns=0)
    statistics = [b for b in pcapng.iter_blocks(SHB + data)
                  if isinstance(b, pcapng.InterfaceStatistics)]
    assert sum(s.dropped for s in statistics) == 9
    assert sum(s.received for s in statistics) == 3


def test_the_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(upcall_blocks, "MAX_CACHED_OPTIONS", 16)
    blocks = new_blocks()
    batch = [record(u, i, tid=1000 + i) for i, u in enumerate(SENT)]
    _, packets = blocks_of(b"".join(blocks.packets(batch) for _ in range(3)))
    assert [f"tid={1000 + i % len(SENT)} " in p.comments[0] for i, p in enumerate(packets)] \
        == [True] * 3 * len(SENT)
    assert len(blocks._described) + len(blocks._described_older) <= 16


def test_a_scan_of_new_upcalls_skips_the_cache_until_they_repeat(monkeypatch):
    monkeypatch.setattr(upcall_blocks, "SCAN_AFTER_MISSES", 16)
    monkeypatch.setattr(upcall_blocks, "SCAN_SAMPLE", 4)
    blocks = new_blocks()
    scan = [record(u, i, tid=1000 + i) for i, u in enumerate(SENT)]  # no two alike
    again = [record(u, len(SENT) + i, tid=1000 + i) for i, u in enumerate(SENT)]
    data = blocks.packets(scan)
    # After 16 misses in a row, only every 4th upcall was looked up and kept.
    assert len(blocks._described) < len(SENT) // 2
    data += blocks.packets(again)
    # The first upcalls of the scan come again: a sampled look-up hits, and from then on
    # every upcall's options are kept.
    assert len(blocks._described) == len(SENT)
    _, packets = blocks_of(data)
    assert len(packets) == 2 * len(SENT)
    for i, packet in enumerate(packets):
        upcall = SENT[i % len(SENT)]
        assert f"tid={1000 + i % len(SENT)} " in packet.comments[0]
        assert packet.comments[0].endswith(format_key(upcall.key))
        assert (packet.data, packet.key) == (upcall.packet, upcall.key)


def test_while_keys_are_shed_a_scan_that_comes_again_is_decoded_and_kept(monkeypatch):
    # Shedding from a cold start, a storm of 200 flows three times over: each goes
    # without its text once, is decoded when it comes again, and then kept. (Decoded
    # outside the cache's sample, a key was shed again on its third sighting; and once
    # decoded, it was shed again on a CPU it had not been seen on.)
    monkeypatch.setattr(upcall_blocks, "SCAN_AFTER_MISSES", 16)
    monkeypatch.setattr(upcall_blocks, "SCAN_SAMPLE", 4)
    blocks = new_blocks()
    # No two alike; each pass on another CPU, as a handler thread may move: the comment
    # says which, so each pass's upcalls are new to the cache.
    data = b"".join(blocks.packets([record(u, 0, tid=1000 + i, cpu=cpu)
                                    for i, u in enumerate(SENT)], decode=False)
                    for cpu in (0, 1, 0))
    _, packets = blocks_of(data)
    not_decoded = [i for i, p in enumerate(packets)
                   if p.comments[0].split("\n")[1] == comment.NOT_DECODED]
    assert blocks.undecoded == len(not_decoded) <= len(SENT)
    assert all(i < len(SENT) for i in not_decoded)  # only on the first pass
    assert len(not_decoded) > len(SENT) // 2  # most were shed: the test means something


def test_a_shed_scan_writes_what_the_loop_for_every_record_writes(monkeypatch):
    # _build_shed_scan writes most records of a scan itself, and hands the others on to
    # _build: the same bytes as _build for every record, with records of each kind that
    # it must hand on, losses between batches, and a scan that ends (its keys come again).
    monkeypatch.setattr(upcall_blocks, "SCAN_AFTER_MISSES", 16)
    monkeypatch.setattr(upcall_blocks, "SCAN_SAMPLE", 4)
    rng = random.Random(11)  # fixed: a failure must be reproducible
    flows = storm(SENT, 1500, unique=True)
    records = []
    for index, flow in enumerate(flows):
        kind = rng.randrange(10)
        if kind < 4:  # the outcome shed, as in every storm too big to decode
            flow = bytearray(flow)
            flow[FLAGS_OFFSET] |= F_OUTCOME_SHED
        elif kind == 4:  # an outcome of its own
            flow = with_outcome(flow, Outcome(0, UNKNOWN_TIMEOUT))
        elif kind == 5:  # a key seen before
            flow = flows[rng.randrange(index + 1)]
        elif kind == 6:  # a packet cut by the snaplen
            flow = record(SENT[index % len(SENT)], index, snaplen=40)
        elif kind == 7:  # a key whose last attribute is broken: no shape compiled
            upcall = SENT[index % len(SENT)]
            flow = record(replace(upcall, key=upcall.key[:-1] + b"\xff"), index)
        records.append(bytes(flow))
    batches, start = [], 0
    while start < len(records):
        size = rng.randrange(1, 200)
        batches.append((records[start:start + size], rng.choice([0, 0, 0, 3])))
        start += size
    # The scan is over: a key decoded at its start comes again, and new ones after it in
    # the same batch start the count of misses again.
    batches.append(([flows[0], *storm(SENT, 1600, unique=True)[1500:]], 0))
    batches.append((flows[:300], 0))

    def written() -> tuple[bytes, int, int]:
        blocks = new_blocks()
        data = b"".join(blocks.packets([memoryview(r) for r in batch], dropped, decode=False)
                        for batch, dropped in batches)
        return data, blocks.undecoded, blocks._misses

    written()  # the key shapes seen twice are compiled (flowkey's cache, for the process)
    scanned = written()
    monkeypatch.setattr(UpcallBlocks, "_build_shed_scan",
                        lambda self, records, out, dropped:
                        self._build(records, out, dropped, False))
    assert written() == scanned
    assert scanned[1] > len(flows) // 3  # the scan's loop wrote most of them


def test_a_shed_scan_writes_most_records_itself(monkeypatch):
    # Its cache is the one _shed fills, under keys of the same form: else it would hand
    # every record on to _build, and write the same bytes, only slower.
    monkeypatch.setattr(upcall_blocks, "SCAN_AFTER_MISSES", 16)
    given, handed_on = [], []  # records given to the scan's loop, and handed on by it
    build, build_shed_scan = UpcallBlocks._build, UpcallBlocks._build_shed_scan

    def counted_scan(self, records, *rest):
        given.extend(records)
        monkeypatch.setattr(UpcallBlocks, "_build", lambda self, records, *rest:
                            handed_on.extend(records) or build(self, records, *rest))
        try:
            return build_shed_scan(self, records, *rest)
        finally:
            monkeypatch.setattr(UpcallBlocks, "_build", build)

    monkeypatch.setattr(UpcallBlocks, "_build_shed_scan", counted_scan)
    flows = storm(SENT, 3000, unique=True)
    blocks = new_blocks()
    for start in range(0, len(flows), 256):
        blocks.packets(flows[start:start + 256], decode=False)
    assert len(given) > len(flows) // 2
    # One in SCAN_SAMPLE is handed on to be looked up, and the first of each comment head.
    assert len(handed_on) < len(given) // 8


def test_keys_decoded_before_the_shedding_keep_their_text_on_another_cpu():
    # A repeated storm decoded on one CPU; then the capture falls behind, keys are shed,
    # and the traced thread moves to the other CPU: the comment says which, so none of
    # these is in the cache. Each key was decoded already: decoded again, not shed.
    blocks = new_blocks()
    data = blocks.packets([record(u, 0, tid=1000 + i, cpu=0) for i, u in enumerate(SENT)])
    moved = [record(u, 1, tid=1000 + i, cpu=1) for i, u in enumerate(SENT)]
    _, packets = blocks_of(data + blocks.packets(moved, decode=False))
    assert blocks.undecoded == 0
    for upcall, packet in zip(SENT, packets[len(SENT):], strict=True):
        assert " cpu=1" in packet.comments[0].split("\n")[0]
        assert packet.comments[0].endswith(format_key(upcall.key))
    # A key never decoded is still shed: shedding itself is not what was turned off.
    blocks.packets(storm(SENT, len(SENT), unique=True), decode=False)
    assert blocks.undecoded > len(SENT) // 2


def test_a_storm_of_thousands_of_new_flows_is_kept_and_keeps_its_text_when_shed():
    # A storm's start is a few thousand misses in a row: still not a scan, so each key is
    # kept, and shedding later on another CPU does not take its text.
    flows = storm(SENT, 3000, unique=True)
    blocks = new_blocks()
    for start in range(0, len(flows), 256):
        blocks.packets(flows[start:start + 256])
    cpu_at = header_offset("cpu")
    moved = [bytearray(flow) for flow in flows]
    for flow in moved:
        flow[cpu_at] ^= 1
    blocks.packets([bytes(flow) for flow in moved], decode=False)
    assert blocks.undecoded == 0


def test_a_record_cut_within_its_key_says_the_key_was_cut():
    # The probe never makes one, but a record is not trusted: the key's text says how
    # much of it there is, rather than printing what is there as a whole key (it printed
    # "6 leftover bytes", as for a whole key that ends in a broken attribute).
    upcall = SENT[0]
    cut = record(upcall, 0)[:HEADER_SIZE + len(upcall.key) // 2]
    _, packets = blocks_of(new_blocks().packets([cut]))
    key_text = packets[0].comments[0].split("\n")[1]
    assert key_text == format_key(upcall.key[:len(upcall.key) // 2], len(upcall.key))
    assert key_text.endswith(f"<key truncated: captured {len(upcall.key) // 2} of "
                             f"{len(upcall.key)} bytes>")


@pytest.mark.parametrize("count", [0, 1])
def test_empty_and_single_batches(count):
    blocks = new_blocks()
    _, packets = blocks_of(blocks.packets([record(SENT[0], 0)] * count))
    assert len(packets) == count




def known_keys() -> list[bytes]:
    keys = [u.key for u in upcalls.read_records(REPLAY_DIR / "mixed.upc")]
    if VECTORS.exists():
        hex_keys = [line.split("\t", 1)[0] for line in VECTORS.read_text().splitlines()]
        keys += [bytes.fromhex(hex_key) for hex_key in hex_keys if hex_key not in ("", "-")]
    return keys


def test_port_and_eth_from_the_text_agree_with_the_decoders_fields():
    # The fast path reads them back from the text; the full path takes the fields.
    keys = known_keys()
    rng = random.Random(7)  # fixed: a failure must be reproducible
    # Cut keys too, and keys with a byte changed: bad lengths, unknown types.
    variants = [key[:rng.randrange(len(key) + 1)] for key in keys if key]
    for key in keys:
        if key:
            changed = bytearray(key)
            changed[rng.randrange(len(key))] = rng.randrange(256)
            variants.append(bytes(changed))
    for key in keys + variants:
        for full_len in (len(key), len(key) + 40):
            fields = decode_key(key, full_len).fields
            assert port_and_eth(format_key(key, full_len)) == \
                (fields.get("in_port"), "eth.src" in fields), key.hex()
