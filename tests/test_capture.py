"""Capture end to end: the real CLI, real eBPF on the replay source's real USDT probe."""

from __future__ import annotations

import dataclasses
import gzip
import random
import re
import signal
import subprocess
import time

import pytest
import upcalls  # samples/replay/upcalls.py: the replayed records
from conftest import (
    REPLAY_DIR,
    ROOT,
    SUMMARY,
    Tool,
    blocks_by_type,
    build_c,
    start_capture,
    tshark_count,
)

from upcall_capture import pcapng
from upcall_capture.flowkey import format_key
from upcall_capture.probe.record import MAX_KEY_CAP, MAX_SNAPLEN

pytestmark = pytest.mark.capture

BASIC = REPLAY_DIR / "basic.upc"
MIXED = REPLAY_DIR / "mixed.upc"


def read_capture(path):
    return blocks_by_type(path.read_bytes())


def capture(replay, tmp_path, records, *replay_args, tool_args=()):
    out = tmp_path / "out.pcapng"
    t_start = time.time_ns()
    source, tool = start_capture(replay, records, out, *replay_args, tool_args=tool_args)
    return source, tool, out, t_start


# The default ring, and one of 256 KiB that the records go round a few times: reads
# whose window runs past the ring's end into the second mapping of its pages.
@pytest.mark.parametrize("ring", [(), ("--buffer-pages", "64")], ids=["default", "wrapping"])
def test_every_upcall_byte_for_byte(replay, tmp_path, ring):
    records = upcalls.read_records(BASIC)
    fired = 2000
    source, tool, out, t_start = capture(replay, tmp_path, BASIC, "-n", str(fired), "-r", "5000",
                                         tool_args=ring)
    assert f"fired {fired} upcalls" in source.wait()
    status, stderr = tool.wait()  # the replay exited: the tool stops by itself
    t_end = time.time_ns()
    assert status == 0, stderr
    assert "exited" in stderr
    assert SUMMARY.search(stderr).groups() == (str(fired), "0")
    assert "ring buffer" not in stderr  # the advice on losses comes only with some

    _, interfaces, packets, stats = read_capture(out)
    assert len(packets) == fired
    assert tshark_count(out) == fired
    for i, packet in enumerate(packets):
        sent = records[i % len(records)]
        assert packet.data == sent.packet[:9216]
        assert packet.orig_len == len(sent.packet)
        assert packet.key == sent.key
        assert packet.inbound
        head, key_text = packet.comments[0].split("\n")[:2]
        assert head.startswith(f"upcall {('miss', 'action')[sent.type]} dpif={sent.dpif} ")
        assert f"pid={source.pid} " in head and "thread=handler1" in head
        assert key_text == format_key(sent.key)
        assert t_start <= packet.timestamp_ns <= t_end
        interface = interfaces[packet.interface_id]
        has_eth = "eth(" in key_text
        assert interface.linktype == (pcapng.LINKTYPE_ETHERNET if has_eth
                                      else pcapng.LINKTYPE_RAW)
        port = re.search(r"in_port\((\d+)\)", key_text).group(1)
        assert interface.name == f"port {port} ({sent.dpif})"
    assert [p.timestamp_ns for p in packets] == sorted(p.timestamp_ns for p in packets)
    assert sum(s.received for s in stats) == fired
    assert sum(s.dropped for s in stats) == 0
    assert len(stats) == len(interfaces)


def test_the_largest_caps_load_and_capture(replay, tmp_path):
    # recv_upcall.c's per-CPU scratch (the record, the names, the argument bytes) must fit
    # one per-CPU map value, 32 KiB, at the largest snaplen and key size the CLI takes.
    records = upcalls.read_records(BASIC)
    source, tool, out, _ = capture(
        replay, tmp_path, BASIC, "-n", str(len(records)),
        tool_args=("-s", str(MAX_SNAPLEN), "--key-size", str(MAX_KEY_CAP)))
    assert f"fired {len(records)} upcalls" in source.wait()
    status, stderr = tool.wait()
    assert status == 0, stderr

    _, _, packets, _ = read_capture(out)
    assert [(p.data, p.key) for p in packets] == [(r.packet, r.key) for r in records]


def test_more_datapaths_than_the_probe_keeps_names_of(replay, tmp_path):
    # recv_upcall.c keeps four dpif names a CPU: with seven, in no order, names come and go
    # from its slots, and each upcall must still carry its own.
    names = [f"system@dp{n}" for n in range(7)]
    rng = random.Random(7)
    records = [dataclasses.replace(r, dpif=rng.choice(names))
               for r in upcalls.read_records(BASIC) * 20]
    path = tmp_path / "datapaths.upc"
    upcalls.write_records(path, records)
    source, tool, out, _ = capture(replay, tmp_path, path, "-n", str(len(records)))
    assert f"fired {len(records)} upcalls" in source.wait()
    status, stderr = tool.wait()
    assert status == 0, stderr

    _, _, packets, _ = read_capture(out)
    assert [p.comments[0].split(" ")[2] for p in packets] == [f"dpif={r.dpif}" for r in records]


def test_count_stops_exactly(replay, tmp_path):
    source, tool, out, _ = capture(replay, tmp_path, BASIC, "-n", "500", "-r", "2000", "-k",
                                   tool_args=("-c", "123"))
    status, stderr = tool.wait()
    assert status == 0, stderr
    assert SUMMARY.search(stderr).group(1) == "123"
    _, _, packets, _ = read_capture(out)
    assert len(packets) == 123
    assert tshark_count(out) == 123
    records = upcalls.read_records(BASIC)
    assert [p.data for p in packets] == [records[i % len(records)].packet for i in range(123)]


def test_sigint_in_the_middle_leaves_a_valid_file(replay, tmp_path):
    source, tool, out, _ = capture(replay, tmp_path, MIXED, "-n", "20000", "-r", "5000")
    time.sleep(1.0)
    tool.proc.send_signal(signal.SIGINT)
    status, stderr = tool.wait()
    assert status == 0, stderr
    captured, lost = map(int, SUMMARY.search(stderr).groups())
    data = out.read_bytes()
    assert pcapng.complete_length(data) == len(data)
    _, interfaces, packets, stats = read_capture(out)
    assert 0 < len(packets) == captured < 20000
    assert lost == 0
    assert tshark_count(out) == captured
    assert len(stats) == len(interfaces) and sum(s.received for s in stats) == captured


def test_threads_on_several_cpus_are_merged_in_time_order(replay, tmp_path):
    fired = 6000
    source, tool, out, _ = capture(replay, tmp_path, MIXED, "-n", str(fired), "-r", "20000",
                                   "-T", "4")
    source.wait()
    status, stderr = tool.wait()
    assert status == 0, stderr
    _, _, packets, _ = read_capture(out)
    assert len(packets) == fired
    stamps = [p.timestamp_ns for p in packets]
    assert stamps == sorted(stamps)
    threads = {re.search(r"thread=(\S+)", p.comments[0]).group(1) for p in packets}
    assert threads == {"handler1", "handler2", "handler3", "handler4"}


def test_pipe_to_tshark(replay, tmp_path):
    source = replay(BASIC, "-n", "300", "-r", "3000")
    tool = Tool("-p", str(source.pid), "-w", "-", stdout=subprocess.PIPE)
    # tshark's own output goes to a file: a pipe nobody reads would stall it, and so us.
    with open(tmp_path / "tshark.out", "w") as shown:
        # -i -: tshark reads the pipe as a live capture, as `wireshark -k -i -` does.
        reader = subprocess.Popen(["tshark", "-i", "-", "-T", "fields", "-e", "frame.comment"],
                                  stdin=tool.proc.stdout, stdout=shown,
                                  stderr=subprocess.DEVNULL)
    tool.proc.stdout.close()
    tool.wait_listening()
    source.start()
    source.wait()
    status, stderr = tool.wait()
    assert reader.wait(timeout=60) == 0
    assert status == 0, stderr
    assert (tmp_path / "tshark.out").read_text().count("upcall ") == 300


def test_console_lines(replay):
    source = replay(BASIC, "-n", "40", "-r", "1000")
    tool = Tool("-p", str(source.pid), stdout=subprocess.PIPE)
    tool.wait_listening()
    source.start()
    source.wait()
    out, err = tool.proc.communicate(timeout=60)
    lines = out.splitlines()
    assert len(lines) == 40
    records = upcalls.read_records(BASIC)
    for line, sent in zip(lines, records, strict=False):
        assert f" {('miss', 'action')[sent.type]} " in line
        assert f"({sent.dpif}) handler1: " in line


@pytest.mark.parametrize("args, message", [
    (["-p", "4194000"], "no such process: 4194000"),
    (["-p", "1"], "has no dpif_recv:recv_upcall USDT probe"),
])
def test_bad_targets_fail_in_one_line(args, message):
    done = subprocess.run([*Tool.command(), *args], capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr


def test_rotation_by_size_in_a_ring(replay, tmp_path):
    source = replay(MIXED, "-n", "6000", "-r", "20000")
    tool = Tool("-p", str(source.pid), "-w", str(tmp_path / "out.pcapng"), "-C", "1", "-W", "3")
    tool.wait_listening()
    source.start()
    source.wait()
    status, stderr = tool.wait()
    assert status == 0, stderr
    captured = int(SUMMARY.search(stderr).group(1))
    files = sorted(tmp_path.glob("out-*.pcapng"))
    assert [f.name for f in files] == ["out-000.pcapng", "out-001.pcapng", "out-002.pcapng"]
    counts = []
    for path in files:
        data = path.read_bytes()
        assert pcapng.complete_length(data) == len(data)
        assert tshark_count(path) >= 1
        blocks = list(pcapng.iter_blocks(data))
        assert isinstance(blocks[0], pcapng.SectionHeader)
        packets = [b for b in blocks if isinstance(b, pcapng.Packet)]
        stats = [b for b in blocks if isinstance(b, pcapng.InterfaceStatistics)]
        assert sum(s.received for s in stats) == len(packets)
        # A file closes at the first batch past 1 MB: it holds a whole batch at most more.
        counts.append(len(packets))
    # 6000 mixed upcalls are about 6 MB: the ring turned over, so the files hold the last
    # ones only, and fewer than were captured.
    assert sum(counts) < captured == 6000


def test_rotation_by_time(replay, tmp_path):
    source = replay(MIXED, "-n", "5000", "-r", "2000")
    tool = Tool("-p", str(source.pid), "-w", str(tmp_path / "t.pcapng"), "-G", "1")
    tool.wait_listening()
    source.start()
    source.wait()
    status, stderr = tool.wait()
    assert status == 0, stderr
    files = sorted(tmp_path.glob("t-*.pcapng"))
    assert len(files) >= 2
    assert sum(tshark_count(path) for path in files) == 5000


def test_status_line_on_a_terminal(replay, tmp_path):
    import os
    import pty

    source = replay(MIXED, "-n", "12000", "-r", "4000")
    controller, terminal = pty.openpty()
    tool = subprocess.Popen([*Tool.command(), "-p", str(source.pid), "-w",
                             str(tmp_path / "s.pcapng")], stderr=terminal, cwd=ROOT)
    os.close(terminal)
    seen = b""
    while b"listening" not in seen:
        seen += os.read(controller, 4096)
    source.start()
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the tool exited and closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    assert tool.wait(timeout=60) == 0
    statuses = re.findall(rb"\r\x1b\[K(\d+) captured, 0 lost, 0 filtered, ([\d,]+)/s, ", seen)
    assert len(statuses) >= 2  # refreshed about once a second over three seconds
    counts = [int(n) for n, _ in statuses]
    assert counts == sorted(counts) and 0 < counts[-1] <= 12000
    assert b"12000 upcalls captured, 0 lost" in seen


def test_gzip_output_opens_in_tshark(replay, tmp_path):
    out = tmp_path / "out.pcapng.gz"
    source, tool = start_capture(replay, MIXED, out, "-n", "3000", "-r", "10000")
    source.wait()
    status, stderr = tool.wait()
    assert status == 0, stderr
    data = gzip.decompress(out.read_bytes())  # a complete gzip stream, trailer included
    assert pcapng.complete_length(data) == len(data)
    assert len(out.read_bytes()) < len(data) / 2
    assert tshark_count(out) == 3000
    packets = [b for b in pcapng.iter_blocks(data) if isinstance(b, pcapng.Packet)]
    records = upcalls.read_records(MIXED)
    assert [p.key for p in packets] == [records[i % len(records)].key for i in range(3000)]


# An emitter of our own making, as simple as can be: its dpif name, packet and key are
# constants, in pages the process never touches itself, which the probe cannot fault in.
CONSTANT_DPIF_C = r"""
#include <sys/sdt.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
struct nlattr;
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    /* 64 KiB apart: no fault-around of a neighbouring page maps them in by chance. */
    static const unsigned char packet[60] __attribute__((aligned(65536))) = {
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4, 5, 6, 0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1};
    static const unsigned char key[8] __attribute__((aligned(65536))) = {
        8, 0, 3, 0, 7, 0, 0, 0};  /* in_port(7) */
    struct timespec pause = {0, 200000};
    sigset_t start;  /* fire once the tool is listening, however long attaching took */
    int sig;
    sigemptyset(&start);
    sigaddset(&start, SIGUSR1);
    sigprocmask(SIG_BLOCK, &start, NULL);
    sigwait(&start, &sig);
    for (int i = 0; i < n; i++) {
        unsigned type = i & 1;
        uint32_t size = sizeof(packet);
        size_t key_len = sizeof(key);
        DTRACE_PROBE6(dpif_recv, recv_upcall, "system@ovs-system", type, (void *) packet,
                      size, (const struct nlattr *) key, key_len);
        nanosleep(&pause, NULL);
    }
    return 0;
}
"""


def test_constants_in_pages_the_probe_cannot_fault_in(tmp_path):
    emitter = subprocess.Popen([str(build_c(tmp_path, "emit", CONSTANT_DPIF_C)), "2000"])
    out = tmp_path / "out.pcapng"
    tool = Tool("-p", str(emitter.pid), "-w", str(out))
    tool.wait_listening()
    emitter.send_signal(signal.SIGUSR1)
    status, stderr = tool.wait()
    emitter.wait()
    assert status == 0, stderr
    assert "upcall-capture: outcomes unavailable (the process has no " \
        "dpif_netlink_operate__:op_flow_put or dpif_netlink_operate__:op_flow_execute " \
        "probe): " in stderr
    _, interfaces, packets, _ = read_capture(out)
    assert len(packets) == 2000
    assert [i.name for i in interfaces] == ["port 7 (system@ovs-system)"]
    canned = bytes([0xff] * 6 + [1, 2, 3, 4, 5, 6, 8, 6, 0, 1, 8, 0, 6, 4, 0, 1]).ljust(60, b"\0")
    assert all(p.data == canned and p.key == bytes([8, 0, 3, 0, 7, 0, 0, 0]) for p in packets)
    for packet in packets:
        head, key_text = packet.comments[0].split("\n")
        assert head.startswith("upcall ") and " dpif=system@ovs-system in_port=7 " in head
        assert key_text == "in_port(7)"
