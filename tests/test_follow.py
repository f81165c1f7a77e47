"""--follow: the capture outlives ovs-vswitchd restarts, in one file (real eBPF, replay source).

The replay binary is copied into the test's directory as `ovs-vswitchd`: its processes are
then named ovs-vswitchd, and their executable path belongs to this test alone.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import REPLAY_DIR, SUMMARY_HEAD, Replay, Tool, blocks_by_type, tshark_count
from test_upcall_blocks import SENT, blocks_of, new_blocks, record

from upcall_capture import pcapng
from upcall_capture.target import VSWITCHD, is_alive

BASIC = REPLAY_DIR / "basic.upc"
SUMMARY = re.compile(SUMMARY_HEAD + r" .*; (\d+) restarts? followed")
GAP_NOTE = re.compile(r"after a gap: ovs-vswitchd pid (\d+) exited at \d\d:\d\d:\d\d\.\d{3}, "
                      r"pid (\d+) attached at \d\d:\d\d:\d\d\.\d{3}")


@pytest.fixture
def vswitchd(replay, replay_bin, tmp_path):
    """Starts replay sources from a copy of the replay binary named ovs-vswitchd."""
    directory = tmp_path / "sbin"
    directory.mkdir()
    binary = directory / VSWITCHD
    shutil.copy2(replay_bin, binary)
    return lambda *args: replay(BASIC, *args, binary=binary)


def fire(source: Replay, count: int) -> None:
    source.start()
    assert f"fired {count} upcalls" in source.wait()


def read_packets(path: Path):
    data = path.read_bytes()
    assert pcapng.complete_length(data) == len(data)
    blocks, _, packets, _ = blocks_by_type(data)
    assert tshark_count(path) == len(packets)
    return blocks, packets


@pytest.mark.capture
def test_follows_a_restart_into_the_same_section(vswitchd, tmp_path):
    first_count, second_count = 300, 200
    out = tmp_path / "out.pcapng"
    first = vswitchd("-n", str(first_count), "-r", "3000")
    tool = Tool("-p", str(first.pid), "--follow", "-w", str(out))
    tool.wait_listening()
    fire(first, first_count)
    tool.wait_for("waiting for a new")
    second = vswitchd("-n", str(second_count), "-r", "3000")
    tool.wait_for(f"listening on dpif_recv:recv_upcall in {VSWITCHD} (pid {second.pid})")
    fire(second, second_count)
    tool.wait_for(f"(pid {second.pid}) exited; waiting")
    tool.proc.send_signal(signal.SIGTERM)
    status, stderr = tool.wait()
    assert status == 0, stderr
    assert SUMMARY.search(stderr).groups() == (str(first_count + second_count), "0", "1")

    blocks, packets = read_packets(out)
    assert sum(isinstance(b, pcapng.SectionHeader) for b in blocks) == 1
    assert len(packets) == first_count + second_count
    pids = [re.search(r" pid=(\d+) ", p.comments[0]).group(1) for p in packets]
    assert pids == [str(first.pid)] * first_count + [str(second.pid)] * second_count
    # Each packet's comments: the upcall, its outcome (unknown: the replay fired no ops
    # here), then any note.
    noted = [i for i, p in enumerate(packets) if len(p.comments) > 2]
    assert noted == [first_count]
    gap = GAP_NOTE.fullmatch(packets[first_count].comments[2])
    assert gap and gap.groups() == (str(first.pid), str(second.pid))
    assert packets[first_count].comments[0].startswith("upcall ")  # its own comment stays first
    # The second process's upcalls reuse the interfaces the first one's made.
    interfaces = [b for b in blocks if isinstance(b, pcapng.InterfaceDescription)]
    assert len({i.name for i in interfaces}) == len(interfaces)
    stats = [b for b in blocks if isinstance(b, pcapng.InterfaceStatistics)]
    assert len(stats) == len(interfaces)
    assert sum(s.received for s in stats) == first_count + second_count


@pytest.mark.capture
def test_sigterm_while_waiting_closes_a_valid_file(vswitchd, tmp_path):
    out = tmp_path / "out.pcapng"
    first = vswitchd("-n", "150", "-r", "3000")
    tool = Tool("-p", str(first.pid), "--follow", "-w", str(out))
    tool.wait_listening()
    fire(first, 150)
    tool.wait_for("waiting for a new")
    tool.proc.send_signal(signal.SIGTERM)
    status, stderr = tool.wait()
    assert status == 0, stderr
    assert SUMMARY.search(stderr).groups() == ("150", "0", "0")
    _, packets = read_packets(out)
    assert len(packets) == 150
    assert all(len(p.comments) == 2 for p in packets)  # the upcall's, its outcome's: no note


def _other_vswitchd_running() -> bool:
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == VSWITCHD \
                    and is_alive(int(entry.name)):
                return True
        except OSError:
            continue
    return False


@pytest.mark.capture
def test_by_name_passes_over_one_without_the_probe(vswitchd, tmp_path):
    if _other_vswitchd_running():
        pytest.skip("another ovs-vswitchd runs here: the by-name default would see it")
    first = vswitchd("-n", "40", "-r", "2000")
    tool = Tool("--follow", stdout=subprocess.PIPE)
    tool.wait_listening()
    fire(first, 40)
    tool.wait_for(f"waiting for a new {VSWITCHD}")
    # A process named ovs-vswitchd that is not one: no probe in it.
    impostor_dir = tmp_path / "impostor"
    impostor_dir.mkdir()
    shutil.copy2(shutil.which("sleep"), impostor_dir / VSWITCHD)
    impostor = subprocess.Popen([str(impostor_dir / VSWITCHD), "60"])
    try:
        tool.wait_for(f"(pid {impostor.pid}) has no dpif_recv:recv_upcall USDT probe")
        impostor.kill()
        impostor.wait()
        second = vswitchd("-n", "30", "-r", "2000")
        tool.wait_for(f"listening on dpif_recv:recv_upcall in {VSWITCHD} "
                            f"(pid {second.pid})")
        fire(second, 30)
        tool.wait_for(f"(pid {second.pid}) exited; waiting")
    finally:
        impostor.kill()
        impostor.wait()
    tool.proc.send_signal(signal.SIGINT)
    lines, _ = tool.proc.communicate(timeout=60)
    assert tool.proc.returncode == 0
    lines = lines.splitlines()
    assert len(lines) == 40 + 1 + 30
    gap = GAP_NOTE.fullmatch(lines[40].strip("()"))
    assert gap and gap.groups() == (str(first.pid), str(second.pid))
    assert not any(line.startswith("(") for i, line in enumerate(lines) if i != 40)


def test_follow_with_dropped_privileges_is_refused():
    done = subprocess.run([*Tool.command(), "--follow", "-Z", "nobody"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "--follow cannot be used with -Z" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_note_goes_to_the_next_packet_alone():
    raw = [record(u, i) for i, u in enumerate(SENT[:3])]
    plain = new_blocks()
    _, expected = blocks_of(bytes(plain.packets(raw, dropped=2)))
    noted = new_blocks()
    noted.note_next("after a gap: something")
    assert noted.packets([], dropped=2) == b""  # no packet yet: the note waits
    _, packets = blocks_of(bytes(noted.packets(raw)) + bytes(noted.packets(raw[:1])))
    later = packets.pop()
    assert later.comments == expected[0].comments  # the note was given once
    assert packets[0].comments == [*expected[0].comments, "after a gap: something"]
    assert packets[0].dropcount == expected[0].dropcount == 2
    assert (packets[0].data, packets[0].key, packets[0].timestamp_ns) == \
        (expected[0].data, expected[0].key, expected[0].timestamp_ns)
    def contents(packet):
        return packet.interface_id, packet.timestamp_ns, packet.data, packet.options

    assert [contents(p) for p in packets[1:]] == [contents(p) for p in expected[1:]]
