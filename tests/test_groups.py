"""Field groups and --stats over them: values, labels, prefixes, bounded tables, checked
against counts made independently (samples/replay/upcalls.py's own key walker)."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest
import upcalls
from conftest import REPLAY_DIR
from probe_records import storm

from upcall_capture import groups
from upcall_capture.stats import UpcallStats, as_text
from upcall_capture.view import from_record

SENT = upcalls.read_records(REPLAY_DIR / "mixed.upc")


def captured(records):
    return [from_record(record, 0, lambda dpif, port: f"v{port}" if port < 3 else None)
            for record in records]


def report_group(report: dict, name: str) -> dict:
    return next(group for group in report["groups"] if group["name"] == name)


@pytest.mark.parametrize("text, error", [
    ("nosuch", "unknown field 'nosuch'"),
    ("tp_dst/8", "only ipv4.src"),
    ("ipv4.src/0", "a length from 1 to 128"),
    ("ipv4.src/x", "a length from 1 to 128"),
    ("ipv4.src,", "unknown field ''"),
])
def test_bad_groups(text, error):
    with pytest.raises(ValueError, match=error):
        groups.parse_group(text)


def test_labels():
    def label(name, value):
        return groups.parse_group(name).label(value)
    assert label("ipv4.src", (4, 0x0A000102)) == "10.0.1.2"
    assert label("ipv6.dst/64", (6, 0x20010DB8 << 96)) == "2001:db8::/64"
    assert label("ipv4.src/64", (4, 0x0A000000)) == "10.0.0.0/32"  # clamped to the address
    assert label("proto", 6) == "tcp" and label("proto", 99) == "99"
    assert label("recirc_id", 0) == "0" and label("recirc_id", 0x36) == "0x36"
    assert label("ct_state", 0x21) == "0x21 (+new+trk)"
    assert label("ct_state", 0) == "0 (not tracked)"
    assert label("eth_type", 0x86DD) == "0x86dd"
    assert label("proto,tp_dst", (17, 53)) == "proto=udp tp_dst=53"
    assert label("proto,tp_dst", (1, None)) == "proto=icmp"


def test_prefix_values_mask_the_host_bits():
    items = captured(storm(SENT, 600, unique=True))
    group = groups.parse_group("ipv4.src/23")
    fields = [item.fields for item in items]
    seen = {value for value in group.values(items, fields) if value is not None}
    expected = {(4, int(ipaddress.ip_network(f"{f['ipv4.src']}/23", strict=False)
                        .network_address))
                for f in map(upcalls.key_fields, (i.upcall.key for i in items))
                if "ipv4.src" in f}
    assert seen == expected


def test_stats_match_independent_counts():
    records = storm(SENT, 3000, unique=True)
    items = captured(records)
    stats = UpcallStats(list(groups.DEFAULT_GROUPS) + [groups.parse_group("ipv4.src/16")])
    for start in range(0, len(items), 256):
        stats.add(items[start:start + 256])
    report = stats.report(top=5)
    keys = [upcalls.key_fields(item.upcall.key) for item in items]

    def port_label(item, key):  # as captured() names ports, and interface_name() says
        port, dpif = key["in_port"], item.upcall.dpif
        return f"v{port} ({dpif})" if port < 3 else f"port {port} ({dpif})"
    ports = Counter(port_label(item, key) for item, key in zip(items, keys, strict=True))
    by_port = report_group(report, "in_port")
    assert [(e["value"], e["count"]) for e in by_port["top"]] == ports.most_common(5)
    assert by_port["top"][0]["share"] == ports.most_common(1)[0][1] / len(items)

    sources = Counter(str(ipaddress.ip_network(f"{f['ipv4.src']}/16", strict=False))
                      for f in keys if "ipv4.src" in f)
    by_prefix = report_group(report, "ipv4.src/16")
    assert [(e["value"], e["count"]) for e in by_prefix["top"]] == sources.most_common(5)
    assert by_prefix["without"] == sum("ipv4.src" not in f for f in keys)

    services = Counter((f["proto"], f.get("tp_dst")) for f in keys if "proto" in f)
    by_service = report_group(report, "proto,tp_dst")
    assert sum(e["count"] for e in by_service["top"]) == \
        sum(count for _, count in services.most_common(5))

    threads = report_group(report, "thread")
    assert threads["top"] == [{"value": "handler1", "count": 3000, "share": 1.0}]
    assert report["distinct_keys"] == len({item.upcall.key for item in items})


def test_a_storm_of_new_flows_stays_bounded_and_says_so():
    items = captured(storm(SENT, 6000, unique=True))
    stats = UpcallStats(group_capacity=50, key_capacity=50)
    for start in range(0, len(items), 500):
        stats.add(items[start:start + 500])
    assert all(len(g.table.counts) < 100 for g in stats.groups)
    assert len(stats.keys.counts) < 100
    report = stats.report(top=3)
    sources = report_group(report, "ipv4.src")
    assert sources["approximate"] and sources["max_error"] > 0
    ports = report_group(report, "in_port")
    true = Counter(item.interface for item in items).most_common(1)[0]
    assert ports["top"][0]["value"] == true[0]
    text = as_text(report)
    assert f"by ipv4.src, {sources['without']} upcalls without it (approximate: each " \
           f"count may be low by up to {sources['max_error']}):" in text
    assert "top flow keys (approximate" in text
