"""The kernel side's pure parts: event layout, failed-upcall records, errno names, the
comment and its reading back, result= filters, enqueue matching and the summary lines.

The BPF program itself runs only where the openvswitch module is (tests/system)."""

from __future__ import annotations

import errno
import re
import struct
import subprocess

import pytest
from conftest import build_c

from upcall_capture import comment, pcapng
from upcall_capture.filters import compile_filters
from upcall_capture.flowkey import format_key
from upcall_capture.kernel_side import DatapathLost, KernelSide, report
from upcall_capture.ports import parse_datapath_lost
from upcall_capture.probe import kernel_probe
from upcall_capture.probe.kernel_probe import KernelCounters
from upcall_capture.probe.kernel_record import (
    EV_ENQUEUE,
    EV_FAILED,
    EVENT_HEAD,
    KernelEvent,
    errno_number,
    errno_text,
    failed_record,
    match_key,
    parse_event,
)
from upcall_capture.probe.record import (
    F_FAILED,
    F_KERNEL,
    HEADER,
    Enqueue,
    parse,
    unpack_enqueue,
    with_enqueue,
)
from upcall_capture.queueing import EnqueueMatcher
from upcall_capture.upcall_blocks import UpcallBlocks

FRAME = bytes.fromhex("0200000000020200000000010800") + bytes(range(100))
VLAN_FRAME = FRAME[:12] + b"\x81\x00\x00\x64" + FRAME[12:]


def event(kind=EV_FAILED, *, ktime=1_000, result=-errno.EAGAIN, packet=FRAME, cmd=1,
          device="veth-a", portid=3541, ct_state=0) -> KernelEvent:
    return KernelEvent(ktime_ns=ktime, kind=kind, result=result, cpu=1, portid=portid,
                       pkt_size=len(packet) + 10, recirc_id=0, eth_type=0x0800,
                       ct_state=ct_state, cmd=cmd, mru=0, datapath="ovs-system",
                       device=device, packet=packet)


def recv_record(*, packet: bytes, ktime_ns: int = 10_000) -> bytes:
    """A received upcall as recv_upcall.c submits it (key: in_port(2),eth_type(0x0800))."""
    key = struct.pack("<HHI", 8, 3, 2) + struct.pack("<HH", 6, 6) + b"\x08\x00\0\0"
    return HEADER.pack(ktime_ns, len(key), 42, 43, 0, 0, len(packet),
                       len(packet), len(key), len(key), 0, b"handler1",
                       b"system@ovs-system") + key + packet


def blocks_of(out: bytes | bytearray) -> list:
    """The blocks UpcallBlocks made, read back (after a section header of their own)."""
    header = pcapng.section_header(userappl="test", os="test", hardware="test")
    return list(pcapng.iter_blocks(header + bytes(out)))


def raw_event(ev: KernelEvent) -> bytes:
    """As dp_upcall.c lays it out (eth_type in network byte order)."""
    return EVENT_HEAD.pack(
        ev.ktime_ns, ev.kind, ev.result, ev.cpu, ev.portid, ev.pkt_size, len(ev.packet),
        ev.recirc_id, int.from_bytes(ev.eth_type.to_bytes(2, "big"), "little"), ev.ct_state,
        ev.cmd, ev.mru, ev.datapath.encode(), ev.device.encode()) + ev.packet


def test_event_head_is_dp_upcall_c_struct(tmp_path):
    """EVENT_HEAD has the offsets and size of struct event_head as gcc lays out the
    declaration in dp_upcall.c."""
    found = re.search(r"struct event_head \{.*?\n\};", kernel_probe.SOURCE.read_text(), re.S)
    fields = re.findall(r"^\s+\w+ (\w+)(?:\[\w+\])?;", found[0], re.M)
    program = build_c(tmp_path, "layout", "\n".join([
        "#include <stdio.h>", "#include <stddef.h>", "#include <stdint.h>",
        "typedef uint64_t u64; typedef uint32_t u32; typedef int32_t s32;",
        "typedef uint16_t u16; typedef uint8_t u8;", "#define NAME_LEN 16", found[0],
        "int main(void) {",
        *[f'printf("%zu\\n", offsetof(struct event_head, {f}));' for f in fields],
        'printf("%zu\\n", sizeof(struct event_head)); return 0; }']))
    offsets = [int(n) for n in subprocess.check_output([str(program)]).split()]
    # Each field's offset is the size of the format before it ("2x" is the pad field;
    # the "4x" at the end, the struct's trailing padding).
    codes = re.findall(r"\d*[A-Za-z]", EVENT_HEAD.format[1:])[:-1]
    assert offsets == [struct.calcsize("<" + "".join(codes[:i])) for i in range(len(codes))] \
        + [EVENT_HEAD.size]


def test_an_event_reads_back_as_it_was_laid_out():
    ev = event(ct_state=0x21)
    assert parse_event(raw_event(ev)) == ev
    assert ev.dpif == "system@ovs-system" and ev.upcall_type == 0
    assert event(cmd=2).upcall_type == 1  # OVS_PACKET_CMD_ACTION


def test_errno_names_and_reasons():
    assert errno_text(-errno.EAGAIN) == "EAGAIN (handler socket full)"
    assert errno_text(-errno.ENOTCONN) == "ENOTCONN (no handler socket)"
    assert errno_text(-errno.EPERM) == "EPERM"
    assert errno_text(-4000) == "error 4000"
    assert errno_number("eagain") == errno.EAGAIN
    assert errno_number("failed") is None and errno_number("EWHAT") is None


def test_a_failed_upcall_is_a_record_with_the_tracepoint_key_fields():
    upcall = parse(failed_record(event(ct_state=0x21), in_port=2))
    assert upcall.flags == F_FAILED | F_KERNEL and upcall.failed
    assert (upcall.dpif, upcall.type, upcall.cpu, upcall.pid, upcall.thread) == \
        ("system@ovs-system", 0, 1, 0, "")
    assert upcall.packet == FRAME and upcall.pkt_size == len(FRAME) + 10
    assert format_key(upcall.key) == "recirc_id(0),in_port(2),ct_state(0x21),eth_type(0x0800)"
    assert upcall.enqueue == Enqueue(None, -errno.EAGAIN, 3541, "veth-a", 0)
    # A device that is no datapath port (yet): no in_port.
    assert format_key(parse(failed_record(event(), None)).key) == \
        "recirc_id(0),eth_type(0x0800)"


def test_failed_upcall_comment_and_block_read_back():
    blocks = UpcallBlocks(snaplen=9216, clock_offset_ns=0,
                          port_name=lambda dpif, port: {2: "veth-a"}.get(port))
    out = bytes(blocks.packets([failed_record(event(), 2), failed_record(
        event(result=-errno.ENOTCONN, portid=0), 2)]))
    packets = [b for b in blocks_of(out) if isinstance(b, pcapng.Packet)]
    idb = next(b for b in blocks_of(out) if isinstance(b, pcapng.InterfaceDescription))
    assert idb.linktype == pcapng.LINKTYPE_ETHERNET and idb.name == "veth-a (system@ovs-system)"
    assert packets[0].comments == [
        "upcall failed: EAGAIN (handler socket full) miss dpif=system@ovs-system "
        "in_port=2(veth-a) portid=3541 cpu=1\n"
        "tracepoint key fields (not a full key): recirc_id(0),in_port(2),eth_type(0x0800)\n"
        "truncated: packet 114 of 124 bytes (the linear part of the kernel's skb)"]
    # Not cached as a received upcall's comment would be: the errno is the upcall's own.
    assert packets[1].comments[0].startswith("upcall failed: ENOTCONN (no handler socket)")
    said = comment.parse(packets[1].comments[0])
    assert said.failure == Enqueue(None, -errno.ENOTCONN, 0, "veth-a", 0)
    assert (said.port, said.dpif, said.upcall_type, said.cpu) == (2, "system@ovs-system", 0, 1)


def test_a_received_upcall_gets_its_enqueue_as_a_second_comment():
    record = recv_record(packet=FRAME)
    blocks = UpcallBlocks(snaplen=9216, clock_offset_ns=0, port_name=lambda d, p: None)
    annotated = [with_enqueue(record, Enqueue(1_234_567, 0, 77, "veth-a", 0)),
                 with_enqueue(record, Enqueue(None, 0, None, "", 0))]
    plain, *packets = [b for b in blocks_of(blocks.packets([record]) +
                                            blocks.packets(annotated))
                       if isinstance(b, pcapng.Packet)]
    # The first comment is the one it has without the kernel side; the packet is the same.
    assert [p.comments[0] for p in packets] == [plain.comments[0]] * 2
    assert [p.data for p in packets] == [plain.data] * 2
    assert packets[0].comments[1] == ("kernel: queued 1.234567 ms in veth-a portid=77 "
                                      "(ovs_dp_upcall to recv_upcall)")
    assert packets[1].comments[1] == comment.UNMATCHED_LINE
    assert comment.parse_enqueue(packets[0].comments[1]) == Enqueue(1_234_567, 0, 77,
                                                                     "veth-a", 0)
    assert comment.parse_enqueue(packets[1].comments[1]).queued_ns is None
    assert parse(annotated[0]).enqueue.queued_ns == 1_234_567


@pytest.mark.parametrize(("expression", "ok", "eagain", "enotconn"), [
    ("result=ok", True, False, False),
    ("result=failed", False, True, True),
    ("result=any", True, True, True),
    ("result=EAGAIN", False, True, False),
    ("result=failed,in_port=3", False, False, False),
    ("result=failed,in_port=2", False, True, True),
])
def test_result_filter(expression, ok, eagain, enotconn):
    spec = compile_filters([expression])
    received = parse(with_enqueue(recv_record(packet=FRAME), Enqueue(5, 0, 1, "veth-a", 0)))
    failed = [parse(failed_record(event(result=-code), 2))
              for code in (errno.EAGAIN, errno.ENOTCONN)]
    assert [spec.matches(u, True) for u in (received, *failed)] == [ok, eagain, enotconn]
    # In the probe a received upcall is never a failed one.
    if expression == "result=failed":
        assert "0" in spec.bpf_c


def test_result_filter_errors_name_the_choices():
    from upcall_capture.filters import FilterError

    with pytest.raises(FilterError, match="ok, failed, any or an errno name"):
        compile_filters(["result=maybe"])


def enqueue(matcher: EnqueueMatcher, ev: KernelEvent) -> None:
    """An ENQUEUE event into the matcher, as KernelSide reads it from the ring."""
    matcher.add(ev.ktime_ns, ev.upcall_type, ev.packet, ev.portid, ev.mru, ev.device.encode())


def match(matcher: EnqueueMatcher, upcall_type: int, packet: bytes, ktime_ns: int) -> Enqueue:
    return unpack_enqueue(matcher.match(upcall_type, packet, ktime_ns))


def test_enqueues_match_in_order_vlan_tags_aside():
    matcher = EnqueueMatcher()
    enqueue(matcher, event(EV_ENQUEUE, ktime=100, result=0, packet=FRAME[:64], portid=1))
    enqueue(matcher, event(EV_ENQUEUE, ktime=200, result=0, packet=FRAME[:64], portid=2))
    enqueue(matcher, event(EV_ENQUEUE, ktime=300, result=0, packet=FRAME[:64], cmd=2, portid=3))
    # The same bytes: the oldest first; an action upcall does not take a miss's.
    assert match(matcher, 1, FRAME, 1_000).portid == 3
    assert match(matcher, 0, VLAN_FRAME, 1_000) == Enqueue(900, 0, 1, "veth-a", 0)
    assert match(matcher, 0, FRAME, 1_000).queued_ns == 800
    assert match(matcher, 0, FRAME, 1_000).queued_ns is None
    assert (matcher.matched, matcher.unmatched, len(matcher)) == (3, 1, 0)


def test_an_upcall_never_takes_a_later_enqueue():
    matcher = EnqueueMatcher()
    enqueue(matcher, event(EV_ENQUEUE, ktime=500, result=0))
    assert match(matcher, 0, FRAME, 400).queued_ns is None
    assert match(matcher, 0, FRAME, 600).queued_ns == 100


def test_a_failed_upcalls_enqueue_is_forgotten():
    matcher = EnqueueMatcher()
    enqueue(matcher, event(EV_ENQUEUE, ktime=100, result=0))
    enqueue(matcher, event(EV_ENQUEUE, ktime=200, result=0))
    matcher.forget(event(EV_FAILED, ktime=100))
    assert match(matcher, 0, FRAME, 1_000).queued_ns == 800
    assert len(matcher) == 0


def test_waiting_enqueues_are_bounded_in_number_and_age():
    matcher = EnqueueMatcher(capacity=100, max_age_ns=10_000)
    for n in range(250):
        enqueue(matcher, event(EV_ENQUEUE, ktime=n, result=0, packet=n.to_bytes(4, "big") * 16))
    assert len(matcher) == 100 and matcher.expired == 150
    assert match(matcher, 0, (5).to_bytes(4, "big") * 16, 300).queued_ns is None  # evicted
    assert match(matcher, 0, (200).to_bytes(4, "big") * 16, 300).queued_ns == 100
    match(matcher, 0, b"other", 20_000)  # 10 us later: all the rest are too old
    assert len(matcher) == 0 and matcher.expired == 249


def test_match_key_strips_one_tag_and_keeps_60_bytes():
    assert match_key(0, VLAN_FRAME) == match_key(0, FRAME) == (0, FRAME[:60])
    assert match_key(0, FRAME[:42]) == (0, FRAME[:42])


def test_datapath_lost_counter_from_dpctl_show():
    text = ("system@ovs-system:\n  lookups: hit:12 missed:3078 lost:3073\n  flows: 0\n"
            "  port 0: ovs-system (internal)\n  port 2: veth-a\nsystem@other:\n"
            "  lookups: hit:0 missed:0 lost:5\n")
    assert parse_datapath_lost(text) == {"system@ovs-system": 3073, "system@other": 5}


class FakeProbe:
    """The ring's contents as dp_upcall.c would submit them (the BPF program itself runs
    in the system test only: this host has no openvswitch module)."""

    def __init__(self, batches):
        self.batches = list(batches)

    def attach(self):
        pass

    def drain(self):
        return self.batches.pop(0) if self.batches else []

    def stop(self):
        return self.drain()


def test_kernel_side_turns_events_into_records_and_annotations():
    shows = iter([
        "system@ovs-system:\n  lookups: hit:0 missed:0 lost:10\n  port 2: veth-a\n",
        "system@ovs-system:\n  lookups: hit:0 missed:0 lost:12\n  port 2: veth-a\n",
    ])
    enqueue_a = event(EV_ENQUEUE, ktime=100, result=0, packet=FRAME[:64])
    failed = event(EV_FAILED, ktime=150, packet=FRAME[:40] + b"x" * 74)
    enqueue_failed = event(EV_ENQUEUE, ktime=150, result=0, packet=failed.packet[:64])
    side = KernelSide(FakeProbe([[raw_event(enqueue_a), raw_event(enqueue_failed),
                                  raw_event(failed)]]), lambda: next(shows),
                      keep=lambda upcall: True)
    side.attach()
    assert side.lost_at_start == {"system@ovs-system": 10}
    records = side.drain()
    assert [parse(r).enqueue.result for r in records] == [-errno.EAGAIN]
    assert format_key(parse(records[0]).key) == "recirc_id(0),in_port(2),eth_type(0x0800)"
    assert len(side.matcher) == 1  # the failed upcall's enqueue is not waited for
    received = recv_record(packet=FRAME, ktime_ns=400)
    annotated = side.annotate([records[0], received])
    assert annotated[0] == records[0]
    assert parse(annotated[1]).enqueue.queued_ns == 300
    assert side.stop() == []
    assert side.lost == [DatapathLost("system@ovs-system", 10, 12)]


def test_kernel_side_filters_failed_upcalls_with_the_whole_filter():
    spec = compile_filters(["in_port=3"])
    side = KernelSide(FakeProbe([[raw_event(event())]]),
                      lambda: "system@ovs-system:\n  lookups: hit:0 missed:0 lost:0\n"
                              "  port 2: veth-a\n",
                      keep=lambda upcall: spec.matches(upcall, True))
    side.attach()
    assert side.drain() == [] and side.filtered == 1


def counters(**given) -> KernelCounters:
    return KernelCounters(**{"enqueued": 0, "enqueue_lost": 0, "failed": 0, "failed_lost": 0,
                             "unpaired": 0, **given})


def test_summary_lines_put_the_datapath_count_beside_the_captured_one():
    matcher = EnqueueMatcher()
    lost = [DatapathLost("system@ovs-system", 0, 3078)]
    assert report(lost, 3078, counters(failed=3078), 0, matcher) == [
        "datapath lost 3078 upcalls during the capture; 3078 failed upcalls captured"]
    line = report(lost, 3000, counters(failed=3078, failed_lost=78), 0, matcher)[0]
    assert line.endswith("(78 found the tool's kernel ring full)")
    line = report(lost, 3000, counters(failed=3078), 0, matcher)[0]
    assert "not explained" in line
    matcher.matched, matcher.unmatched = 9, 1
    assert report([], 0, counters(), 0, matcher) == [
        "0 failed upcalls captured (the datapath's lost: counter could not be read)",
        "queueing delay known for 9 of 10 received upcalls"]


def test_unavailable_says_why_in_one_line():
    reason = kernel_probe.unavailable()
    # This host has no openvswitch module; the guest of the system test has it all.
    assert reason is None or "\n" not in reason


def test_header_is_unchanged_by_the_kernel_side():
    # Failed and annotated records keep recv_upcall.c's layout: the merge and the
    # workers take them as they are.
    record = failed_record(event(), 2)
    assert HEADER.unpack_from(record)[0] == 1_000


def test_quantiles_are_within_one_percent():
    from upcall_capture.counting import Quantiles

    q = Quantiles()
    values = [1_000 * n for n in range(1, 10_001)]  # 1 us .. 10 ms
    for value in values:
        q.add(value)
    assert q.count == 10_000 and q.maximum == 10_000_000
    for share in (0.5, 0.99):
        exact = values[int(share * len(values)) - 1]
        assert exact <= q.quantile(share) <= exact * 1.0101


def read_back_file(blocks: bytes, tmp_path):
    from upcall_capture.readback import read_upcalls

    path = tmp_path / "k.pcapng"
    path.write_bytes(pcapng.section_header(userappl="t", os="t", hardware="t") + blocks)
    return list(read_upcalls(str(path)))


def test_stats_count_failures_and_delays_per_handler_also_read_back(tmp_path):
    from upcall_capture.stats import UpcallStats, as_text

    blocks = UpcallBlocks(snaplen=9216, clock_offset_ns=0,
                          port_name=lambda dpif, port: {2: "veth-a"}.get(port))
    records = [failed_record(event(ktime=n), 2) for n in range(3)]
    records.append(failed_record(event(ktime=5, result=-errno.ENOBUFS, portid=9), 2))
    records += [with_enqueue(recv_record(packet=FRAME, ktime_ns=10 + n),
                             Enqueue(1_000_000 * (n + 1), 0, 77, "veth-a", 0))
                for n in range(100)]
    records.append(with_enqueue(recv_record(packet=FRAME, ktime_ns=500),
                                Enqueue(None, 0, None, "", 0)))
    items = read_back_file(bytes(blocks.packets(records)), tmp_path)
    assert [item.upcall.failed for item in items] == [True] * 4 + [False] * 101
    stats = UpcallStats()
    stats.add(items)
    report = stats.report()
    assert report["upcalls"] == 101  # received ones; failed upcalls are counted apart
    kernel = report["kernel"]
    assert kernel["failed"] == 4
    assert kernel["failed_by_errno"] == {"EAGAIN (handler socket full)": 3,
                                         "ENOBUFS (handler socket full)": 1}
    assert kernel["failed_by_port"] == {"veth-a (system@ovs-system)": 4}
    assert kernel["failed_by_portid"] == {"3541": 3, "9": 1}
    assert kernel["queueing_delay_unknown"] == 1
    (handler,) = kernel["queueing_delay_ms"]
    assert handler["handler"] == "handler1" and handler["upcalls"] == 100
    assert 50 <= handler["median"] <= 50 * 1.0101 and handler["max"] == 100
    assert 99 <= handler["p99"] <= 100
    text = as_text(report)
    assert "4 failed upcalls (never received by ovs-vswitchd):" in text
    assert re.search(r"handler1 +100 +50\.\d{3} +\d+\.\d{3} +100\.000", text)


def test_match_key_leaves_out_an_ipv4_tcp_or_udp_checksum():
    # At the tracepoint a locally sent packet's checksum is partial; userspace gets it done.
    udp = bytearray(bytes.fromhex("0200000000020200000000010800" "45000030000140004011f9b6"
                                  "0a0000010a000002" "4e2023280010") + b"\x12\x34" + bytes(30))
    done = bytearray(udp)
    done[40:42] = b"\xab\xcd"
    assert match_key(0, udp) == match_key(0, done)
    changed = bytearray(udp)
    changed[39] ^= 1  # the UDP length: a real difference
    assert match_key(0, udp) != match_key(0, changed)
    tcp = bytearray(udp)
    tcp[23] = 6
    tcp_done = bytearray(tcp)
    tcp_done[50:52] = b"\xab\xcd"
    assert match_key(0, tcp) == match_key(0, tcp_done)


# ---------------------------------------------------------------------------------------------
# The command line where the kernel side is not available (as on the machine the tests run
# on day to day: the system test covers the other case, in its guest).

needs_no_kernel_side = pytest.mark.skipif(
    kernel_probe.unavailable() is None, reason="this kernel has the kernel side's tracepoint")


@pytest.mark.capture
@needs_no_kernel_side
def test_without_the_kernel_side_one_line_says_so_and_the_capture_goes_on(replay, tmp_path):
    from conftest import REPLAY_DIR, start_capture, tshark_count

    out = tmp_path / "out.pcapng"
    source, tool = start_capture(replay, REPLAY_DIR / "basic.upc", out, tool_args=("-c", "10"))
    source.wait()
    status, stderr = tool.wait()
    assert status == 0, stderr
    said = [line for line in stderr.splitlines() if "kernel side" in line]
    assert len(said) == 1 and said[0].startswith("upcall-capture: kernel side unavailable (")
    assert "datapath lost" not in stderr  # no kernel side, no counter beside it
    assert tshark_count(out) == 10


@pytest.mark.capture
@needs_no_kernel_side
def test_kernel_makes_it_required(replay, tmp_path):
    from conftest import REPLAY_DIR, Tool

    source = replay(REPLAY_DIR / "basic.upc")
    out = tmp_path / "out.pcapng"
    status, stderr = Tool("-p", str(source.pid), "--kernel", "-w", str(out)).wait()
    assert status == 2
    assert stderr.startswith("upcall-capture: --kernel: the kernel side is unavailable: ")
    assert len(stderr.splitlines()) == 1 and "Traceback" not in stderr
    assert not out.exists()  # nothing half-written is left behind


def test_kernel_and_no_kernel_exclude_each_other():
    from conftest import Tool

    status, stderr = Tool("--kernel", "--no-kernel", "-w", "/tmp/x.pcapng").wait()
    assert status == 2 and "not allowed with argument" in stderr
