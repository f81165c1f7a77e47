"""Reading captures back (-r), rewriting them (-r -w), --stats and the console lines.

Captures are made by the real pipeline stages from records laid out as the probe lays
them out, so these run without root.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import Counter

import pytest
import upcalls
from conftest import REPLAY_DIR, ROOT
from probe_records import probe_record

from upcall_capture import pcapng
from upcall_capture.flowkey import decode_key, format_key
from upcall_capture.readback import read_upcalls
from upcall_capture.upcall_blocks import UpcallBlocks

RECORDS = upcalls.read_records(REPLAY_DIR / "mixed.upc")[:300]
T0 = 1_700_000_000_000_000_000


def indexed_record(upcall, index: int) -> bytes:
    """The record of the index-th upcall, from one of three handler threads on two CPUs."""
    return probe_record(upcall, ktime_ns=1000 + index * 1_000_000, tid=43 + index % 3,
                        cpu=index % 2, thread=f"handler{index % 3 + 1}")


def write_capture(path, records=RECORDS, lost_before: dict[int, int] | None = None):
    """lost_before: {index: n}, n records lost just before that one (its epb_dropcount)."""
    blocks = UpcallBlocks(snaplen=9216, clock_offset_ns=T0, port_name=lambda d, p: None)
    raw = [indexed_record(u, i) for i, u in enumerate(records)]
    cuts = sorted(lost_before or {})
    data = pcapng.section_header(userappl="t", os="t", hardware="t")
    for start, end in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        data += blocks.packets(raw[start:end], dropped=(lost_before or {}).get(start, 0))
    data += blocks.statistics(2000 + len(raw) * 1_000_000, start_ktime_ns=0)
    path.write_bytes(data)
    return path


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "upcall_capture", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, **kwargs)


def test_read_back_gives_the_same_upcalls(tmp_path):
    items = list(read_upcalls(str(write_capture(tmp_path / "c.pcapng"))))
    assert len(items) == len(RECORDS)
    for index, (item, sent) in enumerate(zip(items, RECORDS, strict=True)):
        upcall = item.upcall
        assert (upcall.dpif, upcall.type, upcall.key, upcall.packet) == \
            (sent.dpif, sent.type, sent.key, sent.packet)
        assert (upcall.pid, upcall.tid, upcall.cpu) == (42, 43 + index % 3, index % 2)
        assert upcall.thread == f"handler{index % 3 + 1}"
        assert item.wall_ns == T0 + 1000 + index * 1_000_000
        assert item.port == decode_key(sent.key).fields["in_port"]
        assert item.linktype == (pcapng.LINKTYPE_RAW if sent.is_l3 else pcapng.LINKTYPE_ETHERNET)


def test_verbose_lines_show_every_key(tmp_path):
    capture = write_capture(tmp_path / "c.pcapng")
    done = run_cli("-r", str(capture), "-v")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 * len(RECORDS)
    for head, key_line, sent in zip(lines[::2], lines[1::2], RECORDS, strict=True):
        assert f" {('miss', 'action')[sent.type]} " in head
        assert key_line == "\t" + format_key(sent.key)


def test_hex_dump_and_dissection(tmp_path):
    capture = write_capture(tmp_path / "c.pcapng", RECORDS[:1])
    done = run_cli("-r", str(capture), "-x", "--decode")
    packet = RECORDS[0].packet
    dump = [line for line in done.stdout.splitlines() if line.startswith("\t0x")]
    assert len(dump) == (len(packet) + 15) // 16
    assert bytes.fromhex("".join(line.split(":", 1)[1] for line in dump)
                         .replace(" ", "")) == packet
    assert "###[" in done.stdout


def test_rewrite_keeps_comments_keys_and_interfaces(tmp_path):
    capture = write_capture(tmp_path / "c.pcapng")
    out = tmp_path / "subset.pcapng"
    done = run_cli("-r", str(capture), "-w", str(out), "-c", "120")
    assert done.returncode == 0, done.stderr
    original = [b for b in pcapng.iter_blocks(capture.read_bytes())
                if isinstance(b, pcapng.Packet)][:120]
    rewritten = list(read_upcalls(str(out)))
    assert len(rewritten) == 120
    names = {i.interface_id: i.name for i in pcapng.iter_blocks(capture.read_bytes())
             if isinstance(i, pcapng.InterfaceDescription)}
    for block, item in zip(original, rewritten, strict=True):
        assert item.packet_block.comments == block.comments
        assert item.packet_block.key == block.key
        assert item.packet_block.timestamp_ns == block.timestamp_ns
        assert item.interface == names[block.interface_id]


def test_rewrite_sums_the_packets_dropcounts_into_each_interfaces_statistics(tmp_path):
    lost_before = {40: 7, 200: 3}
    capture = write_capture(tmp_path / "c.pcapng", lost_before=lost_before)
    out = tmp_path / "all.pcapng"
    done = run_cli("-r", str(capture), "-w", str(out))
    assert done.returncode == 0, done.stderr
    blocks = list(pcapng.iter_blocks(out.read_bytes()))
    packets = [b for b in blocks if isinstance(b, pcapng.Packet)]
    assert [p.dropcount for p in packets if p.dropcount] == [7, 3]
    dropped = Counter()
    for packet in packets:
        dropped[packet.interface_id] += packet.dropcount or 0
    statistics = {b.interface_id: b for b in blocks if isinstance(b, pcapng.InterfaceStatistics)}
    assert {i: s.dropped for i, s in statistics.items() if s.dropped} == dict(dropped - Counter())
    assert sum(s.dropped for s in statistics.values()) == 10


def test_gzip_and_classic_pcap(tmp_path):
    capture = write_capture(tmp_path / "c.pcapng")
    zipped = tmp_path / "c.pcapng.gz"
    zipped.write_bytes(gzip.compress(capture.read_bytes()))
    assert [i.upcall.key for i in read_upcalls(str(zipped))] == [r.key for r in RECORDS]
    from scapy.layers.l2 import Ether
    from scapy.utils import wrpcap
    classic = tmp_path / "c.pcap"
    wrpcap(str(classic), [Ether(r.packet) for r in RECORDS if not r.is_l3][:5])
    items = list(read_upcalls(str(classic)))
    assert [i.upcall.packet for i in items] == [r.packet for r in RECORDS if not r.is_l3][:5]
    assert all(i.upcall.type == -1 and i.upcall.key == b"" for i in items)


def test_not_a_capture(tmp_path):
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"hello, world" * 10)
    done = run_cli("-r", str(bogus))
    assert done.returncode == 2
    assert "not a pcap or pcapng file" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_stats(tmp_path, fmt):
    capture = write_capture(tmp_path / "c.pcapng")
    done = run_cli("-r", str(capture), "--stats", "--stats-format", fmt, "--stats-top", "3",
                   "-w", str(tmp_path / "discard.pcapng"))
    assert done.returncode == 0, done.stderr
    types = Counter(("miss", "action")[r.type] for r in RECORDS)
    keys = Counter(r.key for r in RECORDS).most_common(3)
    if fmt == "json":
        report = json.loads(done.stdout)
        assert report["upcalls"] == len(RECORDS)
        assert report["by_type"] == dict(types)
        assert report["by_dpif"] == dict(Counter(r.dpif for r in RECORDS))
        ports = next(group for group in report["groups"] if group["name"] == "in_port")
        assert ports["with"] == len(RECORDS) and ports["without"] == 0
        assert [k["count"] for k in report["top_keys"]] == [count for _, count in keys]
        assert report["top_keys"][0]["key"] == format_key(keys[0][0])
        assert sum(s["upcalls"] for s in report["rate_per_second"]) == len(RECORDS)
    else:
        assert f"{len(RECORDS)} upcalls, 0 lost" in done.stdout
        assert format_key(keys[0][0]) in done.stdout


def test_a_large_file_is_read_without_holding_it_in_memory(tmp_path):
    import tracemalloc

    path = write_capture(tmp_path / "large.pcapng", RECORDS * 100)  # 30,000 upcalls
    size = path.stat().st_size
    assert size > 10_000_000
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_upcalls(str(path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 30_000
    # The file is mapped, not read into one bytes object: what Python holds at a time
    # is one upcall and the interfaces, far less than the file.
    assert peak < size // 10, (peak, size)
