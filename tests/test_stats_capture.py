"""--stats on a real capture of the replay source's unique-key storm (a scan of new
flows): it names the port and the source prefix that cause the upcalls, with shares that
match counts made independently (the replay's own key walker) from the same records."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from collections import Counter

import pytest
import upcalls
from conftest import REPLAY_DIR, ROOT, Tool
from probe_records import storm

from upcall_capture.probe.record import parse

pytestmark = pytest.mark.capture

MIXED = REPLAY_DIR / "mixed.upc"
COUNT = 4000


def group(report: dict, name: str) -> dict:
    return next(g for g in report["groups"] if g["name"] == name)


def pairs(entries) -> list[tuple[str, int]]:
    return [(entry["value"], entry["count"]) for entry in entries]


def independent_counts() -> tuple[Counter, Counter, Counter]:
    """Upcalls by port (as the capture names a port it has no name for), by source /24
    and by source /16, from the records `upcall-replay -u` fires."""
    ports, by24, by16 = Counter(), Counter(), Counter()
    for record in storm(upcalls.read_records(MIXED), COUNT, unique=True):
        upcall = parse(record)
        key = upcalls.key_fields(upcall.key)
        ports[f"port {key['in_port']} ({upcall.dpif})"] += 1
        if "ipv4.src" in key:
            by24[str(ipaddress.ip_network(f"{key['ipv4.src']}/24", strict=False))] += 1
            by16[str(ipaddress.ip_network(f"{key['ipv4.src']}/16", strict=False))] += 1
    return ports, by24, by16


def test_stats_name_what_causes_a_storm(replay, tmp_path):
    out = tmp_path / "storm.pcapng"
    source = replay(MIXED, "-u", "-n", str(COUNT), "-r", "20000")
    tool = Tool("-p", str(source.pid), "-w", str(out), "--stats", "--stats-format", "json",
                "--stats-top", "3", stdout=subprocess.PIPE)
    tool.wait_listening()
    source.start()
    source.wait()
    stdout, stderr = tool.proc.communicate(timeout=60)
    assert tool.proc.returncode == 0, stderr
    ports, by24, by16 = independent_counts()

    live = json.loads(stdout)
    assert live["upcalls"] == COUNT and live["lost"] == 0
    in_port = group(live, "in_port")
    assert pairs(in_port["top"]) == ports.most_common(3)
    assert in_port["top"][0]["share"] == pytest.approx(ports.most_common(1)[0][1] / COUNT)
    sources = group(live, "ipv4.src/24")
    assert pairs(sources["top"]) == by24.most_common(3)
    assert sources["without"] == COUNT - sum(by24.values())
    assert not in_port["approximate"] and not sources["approximate"]

    # The file read back, counted by /16: the scan's one source prefix, named with its share.
    done = subprocess.run([sys.executable, "-m", "upcall_capture", "-r", str(out), "--stats",
                           "--stats-by", "ipv4.src/16", "--stats-by", "in_port"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    (prefix, count), = by16.most_common(1)
    assert prefix == "10.0.0.0/16"
    assert f"  {count:>10} {count / COUNT:>6.1%}  10.0.0.0/16" in done.stdout
    port, port_count = ports.most_common(1)[0]
    assert f"  {port_count:>10} {port_count / COUNT:>6.1%}  {port}" in done.stdout
    assert "by ipv4.src/24" not in done.stdout  # --stats-by replaces the default groups
