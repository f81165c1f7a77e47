"""Filters inside the real probe: real eBPF on the replay source's USDT probe.

The 2,000 mixed upcalls of samples/replay/mixed.upc are fired once; the records the probe
submits must be exactly those that match, computed here from the replayed records' own
description and, for packet filters, by libpcap's pcap_offline_filter. The probe's counters
must show that what it filtered out was never submitted: fired = filtered + received.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import upcalls
from conftest import REPLAY_DIR

from upcall_capture.filters import FilterError, compile_filters, pcap
from upcall_capture.probe import loader
from upcall_capture.probe.record import Upcall, parse

pytestmark = pytest.mark.capture

MIXED = REPLAY_DIR / "mixed.upc"
RECORDS = upcalls.read_records(MIXED)
OVS, TUN = upcalls.OVS_SYSTEM, upcalls.BR_TUN

if "packet_match(rec)" not in loader.SOURCE.read_text():
    pytest.skip("recv_upcall.c does not call packet_match(rec) yet (the filters patch)",
                allow_module_level=True)


@dataclass
class Run:
    received: list[Upcall]
    counters: loader.Counters
    replay_pid: int

    def identities(self) -> Counter:
        return Counter((u.dpif, u.type, bytes(u.key), bytes(u.packet)) for u in self.received)


def identities(records: list[upcalls.Upcall], snaplen: int = 1 << 20) -> Counter:
    return Counter((r.dpif, r.type, r.key, r.packet[:snaplen]) for r in records)


@pytest.fixture
def capture(replay):
    """Fire every mixed upcall once through a probe with the given filters."""

    def run(meta: list[str], expression: str | None = None, *, snaplen: int = 9216,
            key_cap: int = 1024, meta_for=None) -> Run:
        source = replay(MIXED, "-r", "20000")
        spec = compile_filters(meta_for(source.pid) if meta_for else meta, expression)
        probe = loader.RecvUpcallProbe(source.pid, snaplen=snaplen, key_cap=key_cap,
                                       buffer_pages=256, filter_c=spec.bpf_c)
        try:
            probe.attach()
            source.start()
            received = []
            while source.proc.poll() is None:
                received += [parse(bytes(r)) for r in probe.drain()]
            received += [parse(bytes(r)) for r in probe.stop()]
            counters = probe.counters()
        finally:
            probe.close()
        assert f"fired {len(RECORDS)} upcalls" in source.wait()
        if spec.userspace is not None:
            received = [u for u in received if spec.userspace(u)]
        return Run(received, counters, source.pid)

    return run


def libpcap_matches(expression: str, snaplen: int = 1 << 20) -> Callable[[upcalls.Upcall], bool]:
    programs = {}
    for linktype in (pcap.DLT_EN10MB, pcap.DLT_RAW):
        try:
            programs[linktype] = pcap.compile_expression(expression, linktype)
        except FilterError:
            programs[linktype] = None

    def matches(record: upcalls.Upcall) -> bool:
        program = programs[pcap.DLT_RAW if record.is_l3 else pcap.DLT_EN10MB]
        return program is not None and pcap.offline_filter(
            program, record.packet[:snaplen], len(record.packet)) != 0

    return matches


def in_net(record: upcalls.Upcall, name: str, network: str) -> bool:
    return name in record.fields and record.fields[name] in ipaddress.ip_network(network)


def check_in_kernel(run: Run, want: list[upcalls.Upcall], snaplen: int = 1 << 20) -> None:
    assert 0 < len(want) < len(RECORDS), "the case must select something, not everything"
    assert run.identities() == identities(want, snaplen)
    assert run.counters.fired == len(RECORDS)
    assert run.counters.lost == 0
    # What the probe filtered out was never submitted, and everything else was.
    assert run.counters.filtered == len(RECORDS) - len(want)


def test_one_datapath(capture):
    run = capture(["dpif=system@ovs-system"])
    check_in_kernel(run, [r for r in RECORDS if r.dpif == OVS])


def test_one_datapath_and_upcall_type(capture):
    run = capture(["dpif=system@br-tun,type=action"])
    check_in_kernel(run, [r for r in RECORDS if r.dpif == TUN and r.type == upcalls.UPCALL_ACTION])


def test_tcp_port_80_over_l2_and_l3_upcalls(capture):
    run = capture([], "tcp port 80")
    want = list(filter(libpcap_matches("tcp port 80"), RECORDS))
    check_in_kernel(run, want)
    assert {r.is_l3 for r in want} == {True, False}
    vlan_tcp80 = [r for r in RECORDS if r.kind.startswith("vlan/ipv4/tcp")
                  and 80 in (r.fields["tp_src"], r.fields["tp_dst"])]
    assert vlan_tcp80 and not set(identities(vlan_tcp80)) & set(run.identities())


def test_vlan_tagged_frames_as_tcpdump_sees_them(capture):
    run = capture([], "vlan and tcp port 80")
    want = list(filter(libpcap_matches("vlan and tcp port 80"), RECORDS))
    check_in_kernel(run, want)
    assert all(r.fields["vlans"] for r in want)


def test_key_fields_and_or(capture):
    run = capture(["in_port=3,ipv4.src=10.0.0.0/16,proto=tcp", "eth_type=0x86dd,tp_dst=53"])
    check_in_kernel(run, [
        r for r in RECORDS
        if (r.in_port == 3 and in_net(r, "ipv4.src", "10.0.0.0/16") and r.fields["proto"] == 6)
        or (r.fields["eth_type"] == 0x86DD and r.fields.get("tp_dst") == 53)])


def test_metadata_and_packet_filter_together(capture):
    packet_matches = libpcap_matches("udp or icmp6")
    run = capture(["dpif=system@br-tun", "type=action,ct_state=0"], "udp or icmp6")
    check_in_kernel(run, [r for r in RECORDS if packet_matches(r) and (
        r.dpif == TUN or (r.type == 1 and r.fields["ct_state"] == 0))])


def test_thread_and_pid_are_tested_in_the_probe(capture):
    run = capture([], meta_for=lambda pid: [f"pid={pid},thread=handler1"])
    assert run.identities() == identities(RECORDS)
    assert run.counters.filtered == 0
    run = capture(["thread=handler2"])
    assert run.received == [] and run.counters.filtered == run.counters.fired == len(RECORDS)


def test_cut_packets_with_the_largest_key_cap(capture):
    expression = "tcp[tcpflags] & tcp-syn != 0 or udp port 53"
    run = capture(["ipv4.dst=0.0.0.0/1", "ipv6.src=2001:db8::/32"], expression, snaplen=48,
                  key_cap=2048)
    packet_matches = libpcap_matches(expression, snaplen=48)
    check_in_kernel(run, [
        r for r in RECORDS if packet_matches(r)
        and (in_net(r, "ipv4.dst", "0.0.0.0/1") or in_net(r, "ipv6.src", "2001:db8::/32"))], 48)


def test_looping_packet_filter_is_applied_in_userspace(capture):
    run = capture(["dpif=system@ovs-system"], "ip6 protochain 6")
    # The probe applies the dpif test and lets the rest through; userspace decides.
    assert run.counters.filtered == sum(r.dpif != OVS for r in RECORDS)
    packet_matches = libpcap_matches("ip6 protochain 6")
    want = [r for r in RECORDS if r.dpif == OVS and packet_matches(r)]
    assert want and run.identities() == identities(want)


@pytest.mark.parametrize("reader", ["ours", "bcc"])
def test_every_upcall_comes_through_whole_with_either_argument_reader(capture, monkeypatch,
                                                                      reader):
    # The replay has one probe site, so the loader writes the reader itself; bcc's readarg
    # is what it falls back on for several sites or unparsed specs.
    if reader == "bcc":
        monkeypatch.setattr(loader, "args_reader", lambda specs, machine: None)
    run = capture([])
    assert run.identities() == identities(RECORDS)
    assert (run.counters.fired, run.counters.lost, run.counters.filtered) == (len(RECORDS), 0, 0)
