"""Accounting: every upcall fired is in the file or counted as lost there, exactly.

Why the probe counts its own losses: perf's lost callback under-reports. When a CPU's
ring is full the kernel only bumps a counter in that ring; the PERF_RECORD_LOST record
that tells userspace is written into the same ring later, with the next record that
fits on that CPU. If the traced thread moves to another CPU, or stops firing (the
burst ended, the process exited, the capture is stopping), that record never comes and
those losses are never reported. recv_upcall.c instead counts, per CPU, every probe hit
and every failed ring submit, so that after the probe is stopped and the ring drained,
fired = captured + lost + filtered holds exactly.
"""

from __future__ import annotations

import mmap
import re
import subprocess
from collections import Counter

import pytest
import upcalls  # samples/replay/upcalls.py
from conftest import REPLAY_DIR, SUMMARY_HEAD, Tool
from probe_records import probe_record

from upcall_capture import pcapng
from upcall_capture.upcall_blocks import UpcallBlocks

MIXED = REPLAY_DIR / "mixed.upc"
SUMMARY = re.compile(SUMMARY_HEAD + r"(?:, (\d+) filtered out)? \((\d+) fired\)")
FIRED = 200_000


@pytest.mark.capture
def test_overloaded_buffer_loses_upcalls_and_counts_every_one(replay, tmp_path):
    out = tmp_path / "out.pcapng"
    # One page a CPU holds a handful of records; two threads firing as fast as they can
    # overrun it many times over, whatever the machine.
    source = replay(MIXED, "-n", str(FIRED), "-T", "2")
    tool = Tool("-p", str(source.pid), "-w", str(out), "--buffer-pages", "1")
    tool.wait_listening()
    source.start()
    assert f"fired {FIRED} upcalls" in source.wait()
    status, stderr = tool.wait()
    assert status == 0, stderr
    captured, lost, filtered, fired = SUMMARY.search(stderr).groups()
    captured, lost, fired = int(captured), int(lost), int(fired)
    assert filtered is None
    assert fired == FIRED
    assert captured + lost == fired
    assert lost > 0 and captured > 0
    # The operator is told why, and what to do about it, on a line of its own.
    assert (f"upcall-capture: {lost} upcalls lost: the {mmap.PAGESIZE // 1024} KiB ring "
            "buffer (--buffer-pages 1) was full; a larger one holds a longer burst, and "
            "--filter or --no-outcomes make a capture lighter\n") in stderr

    data = out.read_bytes()
    assert pcapng.complete_length(data) == len(data)
    blocks = list(pcapng.iter_blocks(data))
    packets = [b for b in blocks if isinstance(b, pcapng.Packet)]
    stats = {b.interface_id: b for b in blocks if isinstance(b, pcapng.InterfaceStatistics)}
    interfaces = [b for b in blocks if isinstance(b, pcapng.InterfaceDescription)]
    assert len(packets) == captured
    assert sorted(stats) == list(range(len(interfaces)))
    assert sum(s.received for s in stats.values()) == captured
    # Every loss is in the file: on the packet after it (epb_dropcount) or, for losses
    # after the last packet, in the statistics of that packet's interface.
    assert sum(s.dropped for s in stats.values()) == lost
    carried = Counter()
    for packet in packets:
        carried[packet.interface_id] += packet.dropcount or 0
    assert sum(carried.values()) > 0
    only_in_statistics = {if_id: s.dropped - carried[if_id] for if_id, s in stats.items()
                          if s.dropped != carried[if_id]}
    assert set(only_in_statistics) <= {packets[-1].interface_id}
    assert all(count > 0 for count in only_in_statistics.values())

    done = subprocess.run(["tshark", "-r", str(out), "-T", "fields", "-e", "frame.number"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.split()) == captured


def test_the_advice_on_losses_gives_the_default_ring_in_mib():
    from upcall_capture.cli import _ring_was_full

    pages = (64 << 20) // mmap.PAGESIZE
    assert _ring_was_full(7, pages).startswith(
        f"7 upcalls lost: the 64 MiB ring buffer (--buffer-pages {pages}) was full;")


def test_losses_in_batches_without_packets_go_on_the_next_packet():
    # The capture loop hands over losses with whatever records a drain released, and
    # that may be none (the first drain, or records held back to put the ring in time
    # order). They happened before the next packet: that packet's epb_dropcount says so.
    first, second = upcalls.read_records(MIXED)[:2]
    blocks = UpcallBlocks(snaplen=9216, clock_offset_ns=0, port_name=lambda dpif, port: None)
    written = pcapng.section_header(userappl="t", os="t", hardware="t")
    written += blocks.packets([], dropped=5)  # before any packet
    written += blocks.packets([probe_record(first, ktime_ns=1000)], dropped=2)
    written += blocks.packets([], dropped=3)  # between two packets
    written += blocks.packets([probe_record(second, ktime_ns=2000)])
    written += blocks.packets([], dropped=4)  # after the last one
    written += blocks.statistics(3000, start_ktime_ns=0)
    parsed = list(pcapng.iter_blocks(written))
    packets = [b for b in parsed if isinstance(b, pcapng.Packet)]
    stats = [b for b in parsed if isinstance(b, pcapng.InterfaceStatistics)]
    assert [p.dropcount for p in packets] == [7, 3]
    assert sum(s.dropped for s in stats) == 5 + 2 + 3 + 4
    last = next(s for s in stats if s.interface_id == packets[-1].interface_id)
    carried_there = sum(p.dropcount for p in packets if p.interface_id == last.interface_id)
    assert last.dropped == carried_there + 4
