"""Filters through the command line: the done-when cases of the filters issue, end to end.

Out of 2,000 mixed upcalls, each filter must capture exactly the matching ones, computed
here independently from the replayed records (for the packet filter, by libpcap's own
pcap_offline_filter).
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from types import SimpleNamespace

import pytest
import upcalls
from conftest import REPLAY_DIR, ROOT, SUMMARY_HEAD, Tool
from test_filters_capture import libpcap_matches

from upcall_capture import pcapng
from upcall_capture.view import clock_time

MIXED = REPLAY_DIR / "mixed.upc"
RECORDS = upcalls.read_records(MIXED)
SUMMARY = re.compile(SUMMARY_HEAD + r", (\d+) filtered out \((\d+) fired\)")


def captured(path) -> Counter:
    blocks = list(pcapng.iter_blocks(path.read_bytes()))
    return Counter((b.key, b.data) for b in blocks if isinstance(b, pcapng.Packet))


def expected(records) -> Counter:
    return Counter((r.key, r.packet) for r in records)


@pytest.mark.capture
@pytest.mark.parametrize("args, wanted", [
    (["--filter", "dpif=system@ovs-system"], lambda r: r.dpif == upcalls.OVS_SYSTEM),
    (["--filter", "dpif=system@br-tun,type=action"],
     lambda r: r.dpif == upcalls.BR_TUN and r.type == upcalls.UPCALL_ACTION),
    (["tcp", "port", "80"], libpcap_matches("tcp port 80")),
], ids=["dpif", "dpif-and-type", "tcp-port-80"])
def test_capture_exactly_the_matching_upcalls(replay, tmp_path, args, wanted):
    out = tmp_path / "out.pcapng"
    source = replay(MIXED, "-r", "10000")
    tool = Tool("-p", str(source.pid), "-w", str(out), *args)
    tool.wait_listening()
    source.start()
    source.wait()
    status, stderr = tool.wait()
    assert status == 0, stderr
    matching = [r for r in RECORDS if wanted(r)]
    assert 0 < len(matching) < len(RECORDS)
    assert captured(out) == expected(matching)
    got, lost, filtered, fired = map(int, SUMMARY.search(stderr).groups())
    assert (got, lost, filtered, fired) == (len(matching), 0, len(RECORDS) - len(matching),
                                            len(RECORDS))
    if "tcp" in args:  # over L2 and L3 upcalls alike
        assert any(r.is_l3 for r in matching) and any(not r.is_l3 for r in matching)
    blocks = list(pcapng.iter_blocks(out.read_bytes()))
    stats = [b for b in blocks if isinstance(b, pcapng.InterfaceStatistics)]
    assert sum(s.filter_accept for s in stats) == len(matching)
    interfaces = [b for b in blocks if isinstance(b, pcapng.InterfaceDescription)]
    assert interfaces and all(i.filter for i in interfaces)
    assert all(" ".join(args).split("=")[-1] in i.filter for i in interfaces)


def test_read_back_applies_the_same_filters():
    sample = ROOT / "samples" / "upcalls.pcapng"
    blocks = list(pcapng.iter_blocks(sample.read_bytes()))
    linktypes = [b.linktype for b in blocks if isinstance(b, pcapng.InterfaceDescription)]
    tcp = libpcap_matches("tcp")
    wanted = [
        b.timestamp_ns for b in blocks if isinstance(b, pcapng.Packet)
        and b.comments[0].startswith("upcall action ")
        and tcp(SimpleNamespace(packet=b.data,
                                is_l3=linktypes[b.interface_id] == pcapng.LINKTYPE_RAW))
    ]
    done = subprocess.run([*Tool.command(), "-r", str(sample), "--filter", "type=action",
                           "tcp"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    shown = [line.split()[0] for line in done.stdout.splitlines()]
    assert wanted and shown == [clock_time(ns) for ns in wanted]


@pytest.mark.parametrize("args, message", [
    (["--filter", "colour=blue"], "colour"),
    (["--filter", "type=sometimes"], "sometimes"),
    (["--filter", "ipv4.src=10.0.0.300"], "10.0.0.300"),
    (["tcp", "port", "eighty"], "eighty"),
    (["tcp", "and", "("], "syntax error"),
])
def test_bad_filters_fail_before_attaching(replay, args, message):
    source = replay(MIXED, "-n", "1")
    done = subprocess.run([*Tool.command(), "-p", str(source.pid), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "listening" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--filter", "foo=bar"], "unknown field 'foo'"),
    (["tcp", "port", "eighty"], "eighty"),
    (["--stats", "--stats-by", "nosuch"], "unknown field 'nosuch'"),
    (["--stats-by", "in_port"], "--stats-by needs --stats or --top"),
    (["--top"], "--top needs a terminal"),  # standard output is a pipe here
    (["--top", "-w", "-"], "--top needs the terminal: not with -w -"),
])
@pytest.mark.parametrize("pid", ["1", "4000000"])  # pid 1 has no probe; 4000000 is no pid
def test_options_are_checked_before_the_target(args, message, pid):
    done = subprocess.run([*Tool.command(), "-p", pid, *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
