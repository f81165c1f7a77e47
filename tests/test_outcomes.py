"""Outcomes: what the handler did with each upcall (outcomes.py), its comment line, the
ops events (ops_record.py), --filter outcome= and --stats; and, through real eBPF on the
replay firing op_flow_put/op_flow_execute (-O), the whole capture."""

from __future__ import annotations

import json
import re
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import upcalls  # samples/replay/upcalls.py
from conftest import Tool
from probe_records import OUTPUT_1, probe_record, storm
from probe_records import execute_event as execute
from probe_records import put_event as put

from upcall_capture import comment, pcapng
from upcall_capture.actions import format_actions, format_megaflow
from upcall_capture.filters import FilterError, compile_filters
from upcall_capture.flowkey import format_key
from upcall_capture.outcomes import WINDOW_NS, Outcomes, report
from upcall_capture.probe.ops_probe import OpsCounters
from upcall_capture.probe.ops_record import OP_EXECUTE, OP_HEAD, OP_PUT, parse_op
from upcall_capture.probe.record import (
    DID_EXECUTE,
    DID_PUT,
    F_FAILED,
    F_KERNEL,
    F_OUTCOME_SHED,
    FLAGS_OFFSET,
    SHED_OUTCOME,
    UNKNOWN_CAPTURE_ENDED,
    UNKNOWN_EVENTS_LOST,
    UNKNOWN_SHED,
    UNKNOWN_TIMEOUT,
    UNKNOWN_WINDOW_FULL,
    UNMATCHED_ENQUEUE,
    Outcome,
    parse,
    unpack_outcome,
    with_enqueue,
    with_outcome,
)

REPLAY = Path(__file__).parent.parent / "samples" / "replay"
SENT = upcalls.read_records(REPLAY / "basic.upc")


def exact_mask(key: bytes) -> bytes:
    return bytes(0xFF if i % 4 else b for i, b in enumerate(key))  # not a real mask: bytes


def record(index: int, ktime_ns: int, tid: int = 43) -> bytes:
    return probe_record(SENT[index], ktime_ns=ktime_ns, tid=tid)


def outcomes_of(records: list[bytes]) -> list[Outcome]:
    return [unpack_outcome(r) for r in records]


def test_an_op_event_reads_back():
    key, packet = SENT[0].key, SENT[0].packet
    op = parse_op(put(key, exact_mask(key), ktime_ns=5, ufid=bytes(range(16))))
    assert (op.kind, op.tid, op.complete, op.key, op.ufid, op.actions, op.create) == \
        (OP_PUT, 43, True, key, bytes(range(16)), OUTPUT_1, True)
    op = parse_op(execute(packet, ktime_ns=6))
    assert (op.kind, op.packet, op.pkt_size, op.actions) == (OP_EXECUTE, packet, len(packet),
                                                             OUTPUT_1)
    # A request longer than what was copied of it (OPS_CAP) cannot be tied.
    whole = execute(packet, ktime_ns=6)
    ktime, pid, tid, kind, size, length, flags = OP_HEAD.unpack_from(whole)
    truncated = OP_HEAD.pack(ktime, pid, tid, kind, size + 100, length, flags) + \
        whole[OP_HEAD.size:]
    assert parse_op(whole).complete and not parse_op(truncated).complete


def test_puts_and_executes_are_tied_by_key_and_packet_in_a_batch():
    stage = Outcomes()
    a, b, c, d = (record(i, 1000 + i) for i in range(4))
    stage.add_ops([
        put(SENT[0].key, exact_mask(SENT[0].key), ktime_ns=2000, ufid=b"u" * 16),
        execute(SENT[0].packet, ktime_ns=2001),
        execute(SENT[1].packet, ktime_ns=2002),  # b: an execute alone
        # c: nothing: d's put settles it
        put(SENT[3].key, exact_mask(SENT[3].key), ktime_ns=2003, actions=b""),
    ], lost=0)
    out = stage.resolve([a, b, c, d], horizon_ns=3000)
    assert out[:3] == [with_outcome(a, Outcome(DID_PUT | DID_EXECUTE, handling_ns=1000,
                                                ufid=b"u" * 16, mask=exact_mask(SENT[0].key),
                                                put_actions=OUTPUT_1,
                                                execute_actions=OUTPUT_1)),
                       with_outcome(b, Outcome(DID_EXECUTE, handling_ns=1001,
                                               execute_actions=OUTPUT_1)),
                       with_outcome(c, Outcome(0))]
    # d has a put and may still get its execute: it waits, until a new batch on its
    # thread (a receive after ops) settles it.
    assert len(out) == 3
    e = record(4, 4000)
    out = stage.resolve([e], horizon_ns=4500)
    assert out == [with_outcome(d, Outcome(DID_PUT, handling_ns=1000, ufid=bytes(16),
                                           mask=exact_mask(SENT[3].key)))]
    assert stage.counts.put == 2 and stage.counts.execute == 2 and stage.counts.none == 1


def test_an_op_of_an_upcall_not_held_is_tied_to_no_other():
    # b and c have the same key; b was filtered out (or lost): its put and execute must
    # not be given to c, whose handler put nothing (the flow was b's).
    stage = Outcomes()
    same_key = replace(SENT[1], packet=SENT[1].packet[:-1] + b"\xee")
    c = probe_record(same_key, ktime_ns=1002)
    a = record(0, 1000)
    stage.add_ops([execute(SENT[1].packet, ktime_ns=2000),  # b's, bytes differ from c's
                   put(SENT[5].key, exact_mask(SENT[5].key), ktime_ns=2001)],  # nobody's
                  lost=0)
    out = stage.resolve([a, c], horizon_ns=2500) + stage.resolve([], horizon_ns=10**9)
    assert [o.did for o in outcomes_of(out)] == [0, 0]
    assert [o.unknown for o in outcomes_of(out)] == [UNKNOWN_TIMEOUT, UNKNOWN_TIMEOUT]
    assert stage.counts.unmatched_ops == 2


def test_two_handlers_are_paired_apart():
    stage = Outcomes()
    one = [record(i, 1000 + 2 * i, tid=1) for i in range(3)]
    two = [record(i, 1001 + 2 * i, tid=2) for i in range(3)]  # the same upcalls, interleaved
    ops = []
    for i in range(3):
        ops.append(put(SENT[i].key, exact_mask(SENT[i].key), ktime_ns=3000 + i, tid=2,
                       ufid=bytes([i]) * 16))
    ops.append(execute(SENT[2].packet, ktime_ns=4000, tid=1))
    stage.add_ops(ops, lost=0)
    merged = [r for pair in zip(one, two, strict=True) for r in pair]
    out = stage.resolve_all(merged)
    got = [(parse(r).tid, o.did, o.ufid) for r, o in zip(out, outcomes_of(out), strict=True)]
    assert got == [(1, 0, None), (2, DID_PUT, b"\0" * 16), (1, 0, None),
                   (2, DID_PUT, b"\1" * 16), (1, DID_EXECUTE, None), (2, DID_PUT, b"\2" * 16)]


def test_the_same_flow_twice_in_a_batch_goes_to_the_first_then_the_second():
    stage = Outcomes()
    first, second = record(0, 1000), record(0, 1001)
    stage.add_ops([put(SENT[0].key, exact_mask(SENT[0].key), ktime_ns=2000),
                   execute(SENT[0].packet, ktime_ns=2001),
                   execute(SENT[0].packet, ktime_ns=2002)], lost=0)
    out = outcomes_of(stage.resolve_all([first, second]))
    assert [o.did for o in out] == [DID_PUT | DID_EXECUTE, DID_EXECUTE]


def test_unknown_outcomes_say_why():
    stage = Outcomes(window_ns=1000, capacity=3)
    # No op comes for the first: its window closes.
    stage.add_ops([], lost=0)
    assert outcomes_of(stage.resolve([record(0, 100)], horizon_ns=1100))[0].unknown == \
        UNKNOWN_TIMEOUT
    # Too many waiting: the oldest leaves.
    out = stage.resolve([record(i, 2000 + i) for i in range(4)], horizon_ns=2010)
    assert [o.unknown for o in outcomes_of(out)] == [UNKNOWN_WINDOW_FULL]
    # The end of the capture.
    assert {o.unknown for o in outcomes_of(stage.resolve_all([]))} == {UNKNOWN_CAPTURE_ENDED}
    # Ops events lost after an upcall came: settled with no op, it is not "none".
    stage = Outcomes()
    stage.add_ops([], lost=0)
    a, b = record(0, 1000), record(1, 1001)
    stage.resolve([a, b], horizon_ns=1500)
    stage.add_ops([put(SENT[1].key, exact_mask(SENT[1].key), ktime_ns=2000)], lost=5)
    out = outcomes_of(stage.resolve_all([]))
    assert [(o.did, o.unknown) for o in out] == [(0, UNKNOWN_EVENTS_LOST), (DID_PUT, 0)]


def test_while_ops_are_shed_no_outcome_is_guessed():
    stage = Outcomes(window_ns=10_000)
    # Before the shedding, on one handler: a and c have puts; b's turn ended (c's put)
    # before it began; d's did not, and it saw no op. z, another handler's, saw no op
    # either, and keeps the others waiting behind it.
    z = probe_record(SENT[6], ktime_ns=999, tid=45)
    a, b, c, d = (record(i, 1000 + i) for i in range(4))
    stage.add_ops([put(SENT[0].key, exact_mask(SENT[0].key), ktime_ns=1100),
                   put(SENT[2].key, exact_mask(SENT[2].key), ktime_ns=1200)], lost=0)
    assert stage.resolve([z, a, b, c, d], horizon_ns=1300) == []
    # The shedding begins where the upcalls taken end (1300), not at the switch (1500):
    # every op before it is in hand, and it cuts their turns short, well within the
    # window. e, received while shedding, is not kept waiting for ops either.
    stage.shed(True, now_ns=1500)
    out = stage.resolve([], horizon_ns=1400)
    e = record(4, 1600)
    stage.add_ops([], lost=0)
    out += stage.resolve([e], horizon_ns=1700)
    assert [(o.did, o.unknown) for o in outcomes_of(out)] == [
        (0, UNKNOWN_SHED), (DID_PUT, 0), (0, 0), (DID_PUT, 0), (0, UNKNOWN_SHED),
        (0, UNKNOWN_SHED)]
    assert [parse(r).ktime_ns for r in out] == [999, 1000, 1001, 1002, 1003, 1600]
    stage.shed(False, now_ns=2000)
    # f: received after, by another handler: its put is copied again, and tied.
    f = probe_record(SENT[5], ktime_ns=2100, tid=44)
    stage.add_ops([put(SENT[5].key, exact_mask(SENT[5].key), ktime_ns=2200, tid=44)], lost=0)
    assert stage.resolve([f], horizon_ns=2300) == []  # it may still get its execute
    out = stage.resolve_all([])
    assert [(o.did, o.unknown) for o in outcomes_of(out)] == [(DID_PUT, 0)]
    assert stage.counts.unknown == {UNKNOWN_SHED: 3} and stage.counts.none == 1


def test_upcalls_not_taken_when_a_shedding_begins_pass_shed_and_their_ops_are_dropped():
    # At a storm's start the ring holds upcalls not taken yet, and the ops ring their
    # ops, copied before the probe stopped copying (1500). The shedding begins at the
    # end of what was taken (1300): those upcalls pass as shed, untied, and their ops
    # are dropped unread and counted, whether parsed already (1350) or still in the ring
    # (1450); a's put (1100) stays.
    stage = Outcomes()
    a = record(0, 1000)
    stage.add_ops([put(SENT[0].key, exact_mask(SENT[0].key), ktime_ns=1100),
                   put(SENT[1].key, exact_mask(SENT[1].key), ktime_ns=1350)], lost=0)
    assert stage.resolve([a], horizon_ns=1300) == []  # a may still get its execute
    stage.shed(True, now_ns=1500)
    b, c = record(1, 1320), record(2, 1400)
    stage.add_ops([put(SENT[2].key, exact_mask(SENT[2].key), ktime_ns=1450)], lost=0)
    out = stage.resolve([b, c], horizon_ns=1600)
    assert [(parse(r).ktime_ns, o.did, o.unknown)
            for r, o in zip(out, outcomes_of(out), strict=True)] == \
        [(1000, DID_PUT, 0), (1320, 0, UNKNOWN_SHED), (1400, 0, UNKNOWN_SHED)]
    assert stage.counts.dropped_ops == 2 and stage.counts.unmatched_ops == 0
    assert report(stage.counts, OpsCounters(0, 0, 0, 5)).endswith("; 7 not copied "
                                                                   "(capture overloaded)")


def test_records_leave_in_order_failed_ones_at_once_and_a_put_still_waits():
    stage = Outcomes()
    failed_flags = struct.pack("<I", F_FAILED | F_KERNEL)
    failed = record(2, 1500)
    failed = with_enqueue(failed[:48] + failed_flags + failed[52:], UNMATCHED_ENQUEUE)
    stage.add_ops([put(SENT[0].key, exact_mask(SENT[0].key), ktime_ns=1200)], lost=0)
    out = stage.resolve([record(0, 1000), failed], horizon_ns=2000)
    assert out == []  # the put's upcall may still get its execute, and it comes first
    out = stage.resolve([], horizon_ns=1000 + WINDOW_NS)
    assert len(out) == 2 and out[1] == failed
    assert unpack_outcome(out[0]).did == DID_PUT


def test_an_outcome_and_an_enqueue_are_both_read_back():
    outcome = Outcome(DID_PUT, handling_ns=12, ufid=bytes(range(16)), mask=b"m" * 8,
                      put_actions=OUTPUT_1)
    both = with_enqueue(with_outcome(record(0, 5), outcome), UNMATCHED_ENQUEUE)
    upcall = parse(both)
    assert upcall.outcome == outcome and upcall.enqueue == UNMATCHED_ENQUEUE
    assert upcall.packet == SENT[0].packet and upcall.key == SENT[0].key


def test_ufid_text_is_ovs_uuid_format():
    # OVS prints a ufid's four host-order u32 words as a UUID (odp_format_ufid()).
    ufid = struct.pack("<4I", 0x75EE3768, 0xC1CF457B, 0xBB15B1B0, 0x119108AC)
    assert comment.ufid_text(ufid) == "75ee3768-c1cf-457b-bb15-b1b0119108ac"


@pytest.mark.parametrize("outcome, text", [
    (Outcome(0), "no flow installed"),
    (Outcome(0, UNKNOWN_TIMEOUT), "outcome unknown: its handler did nothing more within "
                                  "the window"),
    (Outcome(DID_EXECUTE, handling_ns=41_000, execute_actions=OUTPUT_1),
     "no flow installed; executed actions=1; handled in 0.041000 ms"),
])
def test_outcome_lines(outcome, text):
    assert comment.outcome_line(outcome, SENT[0].key) == text
    read = comment.parse_outcome(text)
    assert (read.did, read.unknown, read.handling_ns) == \
        (outcome.did, bool(outcome.unknown), outcome.handling_ns)


def test_a_put_line_has_ufid_megaflow_and_actions_and_reads_back():
    key = SENT[3].key
    mask = bytes(0xFF for _ in key)
    outcome = Outcome(DID_PUT | DID_EXECUTE, handling_ns=1_234_567, ufid=bytes(range(16)),
                      mask=mask, put_actions=OUTPUT_1, execute_actions=OUTPUT_1)
    text = comment.outcome_line(outcome, key)
    megaflow = format_megaflow(key, mask)
    assert text == (f"flow put ufid:{comment.ufid_text(bytes(range(16)))} megaflow={megaflow}"
                    f" actions=1; executed actions=1; handled in 1.234567 ms")
    read = comment.parse_outcome(text)
    assert (read.kind, read.megaflow, read.put_actions, read.execute_actions,
            read.handling_ns) == ("put", megaflow, "1", "1", 1_234_567)
    # A put without a ufid (a kernel without ufid support) says so and reads back.
    no_ufid = comment.outcome_line(replace(outcome, ufid=None), key)
    assert no_ufid.startswith("flow put ufid:? megaflow=")
    assert (comment.parse_outcome(no_ufid).kind, comment.parse_outcome(no_ufid).ufid) == \
        ("put", None)
    # A megaflow with spaces in it (an unknown attribute) reads back whole.
    spaced = "in_port(1),key32(00 00/ff ff)"
    read = comment.parse_outcome(text.replace(megaflow, spaced))
    assert read.megaflow == spaced and read.put_actions == "1"


@pytest.mark.parametrize("value, kinds", [
    ("put", {"put"}), ("execute", {"execute"}), ("none", {"none"}),
    ("unknown", {"unknown"}), ("any", {"put", "execute", "none", "unknown", None}),
])
def test_outcome_filter(value, kinds):
    spec = compile_filters([f"outcome={value}"])
    assert spec.needs_outcome == (value != "any")
    cases = {"put": Outcome(DID_PUT), "execute": Outcome(DID_EXECUTE), "none": Outcome(0),
             "unknown": Outcome(0, UNKNOWN_TIMEOUT), None: None}
    base = parse(record(0, 1))
    matched = {kind for kind, outcome in cases.items()
               if spec.matches(replace(base, outcome=outcome))}
    assert matched == kinds


def test_outcome_filter_error_names_the_choices():
    with pytest.raises(FilterError, match="outcome must be put, execute, none, unknown or any"):
        compile_filters(["outcome=installed"])


def test_summary_line():
    stage = Outcomes()
    stage.add_ops([], lost=0)
    stage.resolve_all([record(0, 1)])
    lost, shed = OpsCounters(0, 0, 3, 0), OpsCounters(0, 0, 0, 7)
    assert report(stage.counts, lost) == ("outcomes: 0 flow puts, 0 executes, 0 with no flow "
                                          "installed, 1 unknown (1 capture ended); 3 flow "
                                          "operation events lost (ring full)")
    assert report(stage.counts, shed).endswith(" (1 capture ended); 7 not copied (capture "
                                               "overloaded)")
    assert format_actions(OUTPUT_1) == "1"


def test_blocks_carry_the_outcome_line_and_the_mask_and_r_w_keeps_them(tmp_path):
    from upcall_capture.upcall_blocks import UpcallBlocks

    key = SENT[3].key
    mask = bytes(0xFF for _ in key)
    put_outcome = Outcome(DID_PUT | DID_EXECUTE, handling_ns=2_000, ufid=bytes(range(16)),
                          mask=mask, put_actions=OUTPUT_1, execute_actions=OUTPUT_1)
    records = [with_outcome(record(3, 10), put_outcome),
               with_outcome(record(3, 20), Outcome(DID_EXECUTE, handling_ns=5,
                                                   execute_actions=OUTPUT_1)),
               with_outcome(record(4, 30), Outcome(0, UNKNOWN_TIMEOUT)),
               marked_shed(record(4, 40))]
    blocks = UpcallBlocks(snaplen=9216, clock_offset_ns=0, port_name=lambda d, p: None,
                          outcome_text_share=1.0)
    written = pcapng.section_header(userappl="t", os="t", hardware="t") + \
        bytes(blocks.packets(records)) + blocks.statistics(40, start_ktime_ns=0)
    path = tmp_path / "in.pcapng"
    path.write_bytes(written)
    rewritten = tmp_path / "out.pcapng"
    done = subprocess.run([*Tool.command(), "-r", str(path), "-w", str(rewritten)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for file in (path, rewritten):
        packets = [b for b in pcapng.iter_blocks(file.read_bytes())
                   if isinstance(b, pcapng.Packet)]
        assert [p.comments[1] for p in packets] == [
            comment.outcome_line(put_outcome, key),
            "no flow installed; executed actions=1; handled in 0.000005 ms",
            comment.outcome_line(Outcome(0, UNKNOWN_TIMEOUT), SENT[4].key),
            comment.UNKNOWN_OUTCOME + comment.UNKNOWN_REASONS[UNKNOWN_SHED]]
        assert [p.mask for p in packets] == [mask, None, None, None]
        assert [p.key for p in packets] == [key, key, SENT[4].key, SENT[4].key]


def test_outcomes_not_decoded_under_load_are_decoded_by_r_and_written_in_by_r_w(
        tmp_path, monkeypatch):
    from conftest import ManualClock

    from upcall_capture.upcall_blocks import OUTCOME_TEXT_CREDIT_S, UpcallBlocks

    records = []
    for index, raw in enumerate(storm(MIXED_SENT, 400, unique=True)):
        key = parse(raw).key
        records.append(with_outcome(raw, Outcome(
            DID_PUT | DID_EXECUTE, handling_ns=index, ufid=struct.pack("<4I", index, 1, 2, 3),
            mask=exact_mask(key), put_actions=OUTPUT_1, execute_actions=OUTPUT_1)))

    # Each new outcome text takes 1/64 s of the clock.
    clock = ManualClock()
    real_outcome_what = comment.outcome_what

    def outcome_what(*args):
        clock.now += 1 / 64
        return real_outcome_what(*args)

    monkeypatch.setattr(comment, "outcome_what", outcome_what)

    def written(name: str, batches: list[int], *, share: float = 1.0, pause_s: float = 0.0,
                decode: bool = True, outcome_texts: bool = True) -> Path:
        """The records in batches of the sizes given, `pause_s` of the clock before each
        but the first."""
        blocks = UpcallBlocks(snaplen=9216, clock_offset_ns=0, port_name=lambda d, p: None,
                              outcome_text_share=share, clock=clock, cpu_clock=clock)
        out, at = [pcapng.section_header(userappl="t", os="t", hardware="t")], 0
        for size in batches:
            if at:
                clock.now += pause_s
            out.append(bytes(blocks.packets(records[at:at + size], decode=decode,
                                            outcome_texts=outcome_texts)))
            at += size
        assert at == len(records)
        path = tmp_path / name
        path.write_bytes(b"".join((*out, blocks.statistics(10**13, start_ktime_ns=0))))
        return path

    def packets_of(path: Path) -> list[pcapng.Packet]:
        return [b for b in pcapng.iter_blocks(path.read_bytes()) if isinstance(b, pcapng.Packet)]

    def not_decoded(path: Path) -> list[pcapng.Packet]:
        found = [p for p in packets_of(path) if p.comments[1] == comment.OUTCOME_NOT_DECODED]
        assert all(p.raw_outcome and p.mask is None for p in found)
        return found

    # New texts take at most a share of the time that passes. The credit kept, 0.05 s,
    # makes 4 (the last leaves it at -0.0125 s). A batch 1 s later finds it whole again
    # (4 more). One 0.1 s later, at a share of 0.15, finds it at 0.15 x (0.1 + 4/64) s,
    # the pause and the texts' time, less the 0.0125 s overdrawn: 0.011875 s (1 more, and
    # the next two 1 each). None is made while keys are not decoded (the workers are
    # behind), and every one at a share of 1.
    assert OUTCOME_TEXT_CREDIT_S == 0.05
    for pause_s, made in ((1.0, 16), (0.1, 7)):
        path = written(f"loaded-{pause_s}.pcapng", [100] * 4, share=0.15, pause_s=pause_s)
        assert len(not_decoded(path)) == 400 - made, pause_s
    assert len(not_decoded(written("shed.pcapng", [100] * 4, decode=False))) == 400
    # Nor while outcome texts alone are shed (the workers are behind): keys are decoded.
    texts_shed = written("texts-shed.pcapng", [100] * 4, outcome_texts=False)
    assert len(not_decoded(texts_shed)) == 400
    assert all(comment.parse(p.comments[0]).decoded for p in packets_of(texts_shed))
    decoded = written("decoded.pcapng", [400])
    assert not not_decoded(decoded)
    shed = tmp_path / "shed.pcapng"
    assert len(packets_of(shed)) == 400
    # -r -v decodes them on the fly; -r -w writes them in: as if decoded at the time.
    expected = [p.comments[1] for p in packets_of(decoded)]
    shown = read_back(shed, "-v")
    assert all(f"\t{text}\n" in shown for text in expected)
    new = tmp_path / "new.pcapng"
    read_back(shed, "-w", str(new))
    again = packets_of(new)
    assert [p.comments[1] for p in again] == expected
    assert [p.mask for p in again] == [p.mask for p in packets_of(decoded)]
    assert not any(p.raw_outcome for p in again)


def marked_shed(record: bytes) -> bytes:
    """The record as recv_upcall.c makes it while outcomes are shed."""
    flags = struct.unpack_from("<I", record, FLAGS_OFFSET)[0] | F_OUTCOME_SHED
    return record[:FLAGS_OFFSET] + struct.pack("<I", flags) + record[FLAGS_OFFSET + 4:]


def test_a_record_marked_shed_passes_at_once_as_it_is():
    stage = Outcomes()
    stage.add_ops([], lost=0)
    marked = marked_shed(record(0, 1000))
    assert stage.resolve([marked], horizon_ns=1001) == [marked]
    assert stage.counts.unknown == {UNKNOWN_SHED: 1}
    assert parse(marked).outcome == SHED_OUTCOME and parse(marked).outcome.kind == "unknown"


def test_a_batch_that_all_passes_as_it_is_is_counted_and_its_ops_applied():
    # The stage's fast path (nothing waits, every record marked shed or failed) must do
    # what the record-by-record one does: count the shed ones, apply the ops before the
    # horizon (here an op of no upcall held, and one after the horizon that must wait),
    # and hand the records on as they are, in order.
    stage = Outcomes()
    failed = record(1, 1001)
    failed = failed[:FLAGS_OFFSET] + struct.pack(
        "<I", struct.unpack_from("<I", failed, FLAGS_OFFSET)[0] | F_FAILED) + \
        failed[FLAGS_OFFSET + 4:]
    batch = [marked_shed(record(0, 1000)), failed, marked_shed(record(2, 1002))]
    stage.add_ops([execute(SENT[0].packet, ktime_ns=1500, tid=99),
                   execute(SENT[0].packet, ktime_ns=2500, tid=99)], lost=0)
    assert stage.resolve(batch, horizon_ns=2000) == batch
    assert stage.counts.unknown == {UNKNOWN_SHED: 2} and stage.counts.unmatched_ops == 1
    # The next batch needs a look at each: the op held back applies in its turn.
    later = record(3, 3000)
    assert stage.resolve([marked_shed(record(4, 2200)), later], horizon_ns=4000) == \
        [marked_shed(record(4, 2200))]
    assert stage.counts.unknown == {UNKNOWN_SHED: 3} and stage.counts.unmatched_ops == 2


class _Switch:
    """What pace() reads of recv_upcall's probe and sets on both (the probes' switches,
    which the capture tests drive for real)."""

    def __init__(self) -> None:
        self.fill = 0.0
        self.on = False
        self.hooked = True  # the ops probes' uprobes are in the process
        self.can_rehook = True  # False: the process is gone

    def mark_outcomes_shed(self, on: bool) -> None:
        self.on = on

    shed = mark_outcomes_shed

    def unhook(self) -> bool:
        self.hooked = False
        return True

    def rehook(self) -> bool:
        self.hooked = self.can_rehook
        return self.hooked


def test_outcomes_are_shed_while_the_ring_fills_or_the_workers_fall_behind(monkeypatch):
    import upcall_capture.outcomes as outcomes

    now = [10**12]
    monkeypatch.setattr(outcomes.time, "monotonic_ns", lambda: now[0])
    recv, ops_probe = _Switch(), _Switch()
    ops = outcomes.HandlerOps(ops_probe)

    def pace(fill: float, behind: bool) -> bool:
        recv.fill = fill
        ops.pace(recv, behind)
        assert recv.on == ops_probe.on == ops.shedding != ops_probe.hooked
        return ops.shedding

    assert not pace(0.0, False)
    # Keys before outcomes: workers behind shed the ops with the ring nearly empty.
    assert pace(0.0, True)
    now[0] += outcomes.MIN_SHED_NS
    assert pace(0.0, True)  # still behind: no resume, however long it has lasted
    assert not pace(0.0, False)
    # The ring's own thresholds, as before.
    now[0] += outcomes.RECOVERED_NS
    assert pace(outcomes.SHED_ABOVE, False)
    now[0] += outcomes.MIN_SHED_NS
    assert pace(outcomes.SHED_ABOVE / 2, False)
    assert not pace(outcomes.SHED_UNTIL, False)
    # The probes cannot go back in (the process is gone): upcalls stay marked shed, none
    # waits for ops that no probe sees.
    now[0] += outcomes.RECOVERED_NS
    assert pace(outcomes.SHED_ABOVE, False)
    now[0] += outcomes.MIN_SHED_NS
    ops_probe.can_rehook = False
    assert pace(0.0, False)
    # The time they were out: 1 s, 1 s and 2 s, the last one still running.
    now[0] += 10**9
    assert ops.unhooked_s == 4.0


def test_an_upcall_described_once_keeps_its_key_text_whatever_its_outcome_carries():
    # A storm's outcomes go from shed to tied and back (HandlerOps.pace), so one flow's
    # upcalls come marked shed, with an outcome, with none: the key's text, described
    # once, serves them all, even in a batch whose new keys are not decoded (the workers
    # are behind). Keyed by what the record carries after its packet, the cache missed
    # at each turn, and such batches wrote repeated keys without their text.
    from upcall_capture.upcall_blocks import UpcallBlocks

    blocks = UpcallBlocks(snaplen=9216, clock_offset_ns=0, port_name=lambda d, p: None,
                          outcome_text_share=1.0)
    first = bytes(blocks.packets([marked_shed(record(0, 10))]))
    known = Outcome(DID_EXECUTE, handling_ns=5, execute_actions=OUTPUT_1)
    later = [with_outcome(record(0, 20), known), with_outcome(record(0, 30), Outcome(0)),
             with_enqueue(with_outcome(record(0, 40), known), UNMATCHED_ENQUEUE),
             record(0, 50), marked_shed(record(0, 60))]
    rest = bytes(blocks.packets(later, decode=False))
    assert blocks.undecoded == 0
    packets = [b for b in pcapng.iter_blocks(pcapng.section_header(
        userappl="t", os="t", hardware="t") + first + rest) if isinstance(b, pcapng.Packet)]
    key_text = format_key(SENT[0].key)
    assert [p.comments[0].split("\n")[1] for p in packets] == [key_text] * 6
    # Each its own outcome's comment (new outcome texts wait for a batch that decodes).
    shed_line = comment.UNKNOWN_OUTCOME + comment.UNKNOWN_REASONS[UNKNOWN_SHED]
    later = comment.OUTCOME_NOT_DECODED
    assert [p.comments[1:] for p in packets] == [
        [shed_line], [later], [later], [later, comment.UNMATCHED_LINE], [], [shed_line]]


# ---- the capture: real eBPF on the replay firing a handler's puts and executes (-O) ----

MIXED = REPLAY / "mixed.upc"
MIXED_SENT = upcalls.read_records(MIXED)
FIRES = 3000
# A ring of 128 MiB sheds ops only past an 8 MiB backlog (SHED_ABOVE), more than FIRES
# records of MIXED (1.6 MiB): a slow moment of a loaded machine cannot make the outcomes
# unknown.
NO_SHEDDING = ("--buffer-pages", "32768")
_NESTED = {1, 16}  # OVS_KEY_ATTR_ENCAP, OVS_KEY_ATTR_TUNNEL


def replay_mask(key: bytes) -> bytes:
    """The megaflow mask flow-ops.c puts for a key: exact, but IP TOS and TTL."""
    out = bytearray(key)
    at = 0
    while at + 4 <= len(key):
        length, kind = struct.unpack_from("<HH", key, at)
        if length < 4 or at + length > len(key):
            break
        kind &= 0x3FFF
        if kind in _NESTED:
            out[at + 4:at + length] = replay_mask(key[at + 4:at + length])
        else:
            out[at + 4:at + length] = b"\xff" * (length - 4)
            if kind == 7 and length - 4 >= 12:  # ipv4: tos, ttl
                out[at + 4 + 9:at + 4 + 11] = b"\0\0"
            elif kind == 8 and length - 4 >= 40:  # ipv6: tclass, hlimit
                out[at + 4 + 37:at + 4 + 39] = b"\0\0"
        at += (length + 3) & ~3
    return bytes(out)


def replay_ufid(key: bytes) -> bytes:
    """The ufid flow-ops.c gives a put of this key."""
    words = []
    x = 0xCBF29CE484222325
    for byte in key:
        x = (x ^ byte) * 0x100000001B3 % 2**64
    for _ in range(4):
        x ^= x >> 31
        x = x * 0xBF58476D1CE4E5B9 % 2**64
        words.append(x >> 17 & 0xFFFFFFFF)
    words[1] = words[1] & 0xFFFF0FFF | 0x4000
    words[2] = words[2] & 0x3FFFFFFF | 0x80000000
    return struct.pack("<4I", *words)


def fire_number(packet: bytes, fires: int = FIRES) -> int:
    """Which of `fires` fires of `upcall-replay -u` a packet is: its unique field says."""
    for k_offset in {u.pkt_uniq_off for u in MIXED_SENT}:
        k = int.from_bytes(packet[k_offset:k_offset + 4], "big") - 0x0A000000
        if 0 <= k < fires:
            sent = MIXED_SENT[k % len(MIXED_SENT)]
            if sent.pkt_uniq_off == k_offset and len(sent.packet) == len(packet):
                return k
    raise AssertionError(f"not a fire of the replay: {packet.hex()}")


def expected_line(k: int, key: bytes) -> str | None:
    """What the replay's handler did with fire k (flow-ops.h); None: nothing."""
    sent = MIXED_SENT[k % len(MIXED_SENT)]
    if sent.type != 0 or k % 16 == 15:
        return None
    in_port = upcalls.key_fields(key)["in_port"]
    actions = "2" if in_port == 1 else "1"
    if k % 16 == 7:
        return f"no flow installed; executed actions={actions}"
    return (f"flow put ufid:{comment.ufid_text(replay_ufid(key))} "
            f"megaflow={format_megaflow(key, replay_mask(key))} actions={actions}; "
            f"executed actions={actions}")


def captured(out: Path, fires: int = FIRES) -> list[tuple[int, str, str]]:
    """Each packet's fire number (of `fires`), handler thread and outcome comment."""
    found = []
    for block in pcapng.iter_blocks(out.read_bytes()):
        if isinstance(block, pcapng.Packet):
            said = comment.parse(block.comments[0])
            assert len(block.comments) == 2, block.comments
            found.append((fire_number(bytes(block.data), fires), said.thread, block.comments[1],
                          block.key))
    return found


def check_outcomes(packets, *, fires: int = FIRES) -> dict[str, int]:
    kinds = {}
    for k, _, text, key in packets:
        read = comment.parse_outcome(text)
        assert read is not None, text
        kinds[read.kind] = kinds.get(read.kind, 0) + 1
        expected = expected_line(k, key)
        if read.kind == "unknown":
            # Only where no later op of its handler could settle it: its last batch.
            assert expected is None and k >= fires - 2 * 64, (k, text)
        elif expected is None:
            assert text == comment.NO_FLOW, (k, text)
        else:
            assert text.startswith(expected + "; handled in "), (k, text, expected)
            assert 0 <= read.handling_ns < 1_000_000_000
    return kinds


def capture_mixed(replay, out: Path, *replay_args: str, tool_args: tuple[str, ...],
                  fires: int = FIRES) -> tuple[list[tuple[int, str, str]], str]:
    """`fires` upcalls of MIXED at 30,000/s with their puts and executes (-O), captured to
    `out`: its packets (captured()) and the tool's stderr. A replay kept running (-k)
    ends nothing, so then `tool_args` must hold -c, or the tool waits for its timeout."""
    from conftest import start_capture

    source, tool = start_capture(replay, MIXED, out, "-O", *replay_args, "-n", str(fires),
                                 "-r", "30000", tool_args=tool_args)
    status, stderr = tool.wait()  # the replay ends the capture, or -c does (replay -k)
    assert status == 0, stderr
    # Outcome texts the capture had no time for are written in by -r -w, as they would
    # have been; the others are those texts already.
    whole = out.with_name("whole.pcapng")
    read_back(out, "-w", str(whole))
    packets = captured(whole)
    live = captured(out)
    assert len(live) == len(packets)
    for (_, _, said, _), (_, _, text, _) in zip(live, packets, strict=True):
        assert said in (text, comment.OUTCOME_NOT_DECODED), (said, text)
    return packets, stderr


@pytest.mark.capture
def test_every_upcall_carries_what_its_handler_did(replay, tmp_path):
    out = tmp_path / "out.pcapng"
    packets, stderr = capture_mixed(replay, out, "-u", "-T", "2", tool_args=NO_SHEDDING)
    assert len(packets) == FIRES and {thread for _, thread, _, _ in packets} == \
        {"handler1", "handler2"}
    kinds = check_outcomes(packets)
    misses = [k for k in range(FIRES) if MIXED_SENT[k % len(MIXED_SENT)].type == 0]
    assert kinds["put"] == sum(1 for k in misses if k % 16 not in (7, 15))
    assert kinds["execute"] == sum(1 for k in misses if k % 16 == 7)
    summary = next(line for line in stderr.splitlines() if "outcomes:" in line)
    assert f"outcomes: {kinds['put']} flow puts, {kinds['put'] + kinds['execute']} executes" \
        in summary
    # -r -v shows them; --stats counts them, with the handling delays.
    shown = read_back(out, "-v")
    texts = {text for _, _, text, _ in packets}
    assert sum(1 for line in shown.splitlines() if line[1:] in texts) == FIRES
    report = json.loads(read_back(out, "--stats", "--stats-format", "json"))["outcomes"]
    assert report["by_kind"] == kinds
    assert {row["handler"] for row in report["handling_delay_ms"]} == {"handler1", "handler2"}
    assert sum(row["upcalls"] for row in report["handling_delay_ms"]) == \
        kinds["put"] + kinds["execute"]


def read_back(path: Path, *args: str) -> str:
    done = subprocess.run([*Tool.command(), "-r", str(path), *args], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.capture
def test_upcalls_no_op_settles_wait_the_outcome_window_then_say_so(replay, tmp_path):
    # The last fire (k % 16 == 15) gets no op, and nothing comes after it. With the replay
    # running on (-k), the capture does not end: it leaves when --outcome-window closes,
    # and -c ends the capture once every upcall has left.
    fires = FIRES - FIRES % 16
    assert (fires - 1) % 16 == 15
    out = tmp_path / "out.pcapng"
    packets, stderr = capture_mixed(replay, out, "-u", "-k", fires=fires,
                                    tool_args=("--outcome-window", "3000", "-c", str(fires),
                                               *NO_SHEDDING))
    # The last upcall waited the window, not 250 ms: the capture ended (the statistics'
    # end time) 3 s after it was received, at the earliest.
    blocks = list(pcapng.iter_blocks(out.read_bytes()))
    last_received = max(b.timestamp_ns for b in blocks if isinstance(b, pcapng.Packet))
    ended = max(b.end_ns for b in blocks if isinstance(b, pcapng.InterfaceStatistics))
    assert ended - last_received >= 2_990_000_000
    kinds = check_outcomes(packets, fires=fires)
    timed_out = comment.UNKNOWN_OUTCOME + comment.UNKNOWN_REASONS[UNKNOWN_TIMEOUT]
    assert kinds.get("unknown") and \
        sum(1 for _, _, text, _ in packets if text == timed_out) == kinds["unknown"]
    status, stderr = Tool("-p", "1", "--no-outcomes", "--outcome-window", "10",
                          "-w", str(tmp_path / "x")).wait()
    assert status == 2 and stderr == \
        "upcall-capture: --outcome-window needs outcomes: drop --no-outcomes\n"


@pytest.mark.capture
def test_ops_of_filtered_upcalls_are_tied_to_no_other(replay, tmp_path):
    packets, _ = capture_mixed(replay, tmp_path / "out.pcapng", "-u", "-T", "2",
                               tool_args=("--filter", "in_port=1", *NO_SHEDDING))
    assert packets and all(upcalls.key_fields(key)["in_port"] == 1
                           for _, _, _, key in packets)
    check_outcomes(packets)


@pytest.mark.capture
def test_filter_by_outcome(replay, tmp_path):
    packets, stderr = capture_mixed(replay, tmp_path / "out.pcapng", "-u",
                                    tool_args=("--filter", "outcome=execute", *NO_SHEDDING))
    assert sorted(k for k, _, _, _ in packets) == [
        k for k in range(FIRES) if MIXED_SENT[k % len(MIXED_SENT)].type == 0 and k % 16 == 7]
    check_outcomes(packets)
    assert f"{FIRES - len(packets)} filtered out" in stderr


@pytest.mark.capture
def test_outcomes_can_be_turned_off_or_required(replay, tmp_path):
    from conftest import REPLAY_DIR, start_capture

    out = tmp_path / "out.pcapng"
    source, tool = start_capture(replay, REPLAY_DIR / "basic.upc", out, "-O",
                                 tool_args=("--no-outcomes", "-c", "10"))
    source.wait()
    status, stderr = tool.wait()
    assert status == 0 and "outcomes" not in stderr
    assert all(len(b.comments) == 1 for b in pcapng.iter_blocks(out.read_bytes())
               if isinstance(b, pcapng.Packet))
    source = replay(REPLAY_DIR / "basic.upc")
    status, stderr = Tool("-p", str(source.pid), "--filter", "outcome=put", "--no-outcomes",
                          "-w", str(tmp_path / "y")).wait()
    assert status == 2 and "needs outcomes" in stderr and len(stderr.splitlines()) == 1


@pytest.mark.capture
def test_a_process_without_the_probes_is_said_and_outcomes_can_be_required(tmp_path):
    from conftest import build_c
    from test_capture import CONSTANT_DPIF_C

    emitter = subprocess.Popen([str(build_c(tmp_path, "emit", CONSTANT_DPIF_C)), "1"])
    try:
        status, stderr = Tool("-p", str(emitter.pid), "--outcomes",
                              "-w", str(tmp_path / "x.pcapng")).wait()
    finally:
        emitter.kill()
        emitter.wait()
    assert status == 2 and len(stderr.splitlines()) == 1, stderr
    assert stderr.startswith("upcall-capture: --outcomes: outcomes are unavailable: the "
                             "process has no dpif_netlink_operate__:op_flow_put or "
                             "dpif_netlink_operate__:op_flow_execute probe")


@pytest.mark.capture
def test_an_overloaded_capture_sheds_outcomes_never_guesses_and_says_so(replay, tmp_path):
    from conftest import SUMMARY

    # A ring of 16 pages (64 KiB) holds about 60 records: at 30,000/s it is more than
    # 1/16 full at reads (outcomes.SHED_ABOVE), and the capture sheds the ops until it
    # drains.
    packets, stderr = capture_mixed(replay, tmp_path / "out.pcapng", "-u",
                                    tool_args=("--buffer-pages", "16"))
    captured_count, lost = (int(n) for n in SUMMARY.search(stderr).groups()[:2])
    assert len(packets) == captured_count and captured_count + lost == FIRES
    shed_line = comment.UNKNOWN_OUTCOME + comment.UNKNOWN_REASONS[UNKNOWN_SHED]
    shed = [p for p in packets if p[2] == shed_line]
    assert shed, "the capture never shed: the test's ring is not small enough"
    assert f"{len(shed)} capture overloaded" in stderr
    # The probe counted the ops it did not copy before it was out of the process: there
    # were some.
    assert re.search(r"; [1-9]\d* not copied \(capture overloaded\); the probes were out "
                     r"for \d+\.\d s \(capture overloaded\)$", stderr, re.M)
    # Every other outcome is still exactly the replay's.
    check_outcomes([p for p in packets if p[2] != shed_line])


@pytest.mark.capture
def test_after_z_shed_ops_probes_stay_and_the_summary_does_not_say_they_left(
        replay, tmp_path):
    # -Z: the root parent holds the uprobes' fds as well, so they cannot leave; the capture
    # sheds as ever, and says nothing of probes out of the process. (--duration: the
    # replay, unreaped until the tool ends, is a zombie of root's, which an unprivileged
    # process cannot tell from a live one.)
    from conftest import SUMMARY

    packets, stderr = capture_mixed(replay, tmp_path / "out.pcapng", "-u",
                                    tool_args=("--buffer-pages", "16", "-Z", "nobody",
                                               "--duration", "3"))
    assert all(line.startswith("upcall-capture: ") for line in stderr.splitlines()), stderr
    captured_count, lost = (int(n) for n in SUMMARY.search(stderr).groups()[:2])
    assert len(packets) == captured_count and captured_count + lost == FIRES
    assert re.search(r"[1-9]\d* capture overloaded", stderr), stderr
    assert "the probes were out" not in stderr


@pytest.mark.capture
def test_shed_ops_probes_leave_the_traced_process_and_come_back(replay):
    import time

    from upcall_capture.probe.ops_probe import OpsProbe

    source = replay(MIXED, "-O", "-r", "5000", "-n", "100000")
    probe = OpsProbe(source.pid)
    probe.attach()
    try:
        source.start()

        def ops_in(seconds: float) -> int:
            before = probe.counters()
            time.sleep(seconds)
            after = probe.counters()
            return after.puts + after.executes + after.shed - \
                (before.puts + before.executes + before.shed)

        assert ops_in(0.3) > 500
        probe.shed(True)
        probe.unhook()
        probe.wait_unhooked()
        # Out of the process: nothing runs the program, not even to count a shed op.
        assert ops_in(0.3) == 0
        assert probe.rehook()
        assert ops_in(0.3) > 500
        # Twice over, as a storm does.
        probe.unhook()
        probe.wait_unhooked()
        assert ops_in(0.3) == 0
        assert probe.rehook()
        probe.shed(False)
        assert ops_in(0.3) > 500
    finally:
        probe.close()


@pytest.mark.capture
def test_probes_put_back_outlive_the_recv_upcall_probes_teardown(replay):
    import os

    from upcall_capture.probe.loader import RecvUpcallProbe
    from upcall_capture.probe.ops_probe import OpsProbe

    # bcc's teardown of a program closes again fd numbers it freed while loading it: a
    # uprobe put back at such a number lost its fd when the capture ended (recv_upcall's
    # probe is torn down first), and the ops probe's teardown then raised.
    source = replay(MIXED, "-O", "-n", "10", "-r", "10")
    recv = RecvUpcallProbe(source.pid, snaplen=64, key_cap=64, buffer_pages=16)
    recv.attach()
    ops = OpsProbe(source.pid)
    try:
        ops.attach()
        ops.unhook()
        assert ops.rehook()
        recv.close()
        for fd in ops._bpf.uprobe_fds.values():
            os.fstat(fd)  # still open
    finally:
        recv.close()
        ops.close()  # raised bcc's "Failed to detach BPF from uprobe"


@pytest.mark.capture
def test_a_backlog_at_the_end_leaves_a_read_at_a_time_whole_and_in_order(replay, tmp_path):
    import os
    import signal
    import time

    from upcall_capture import capture
    from upcall_capture.probe.ring_buffer import READ_LIMIT

    # The tool stopped (SIGSTOP) while the replay fires every upcall and exits: once it
    # goes on, its first read (one READ_LIMIT) is followed by finding the replay gone,
    # and the rest of the ring, more than a read (the packets alone are two), is the
    # last drain's. Less than 1/16 of the ring, and of the ops' ring: nothing is shed.
    fires = 10_000
    assert sum(len(MIXED_SENT[k % len(MIXED_SENT)].packet) for k in range(fires)) > \
        2 * READ_LIMIT
    out = tmp_path / "out.pcapng"
    source = replay(MIXED, "-O", "-u", "-T", "2", "-n", str(fires))
    tool = Tool("-p", str(source.pid), "-w", str(out), *NO_SHEDDING)
    tool.wait_listening()
    time.sleep(0.5)  # its loop runs
    os.kill(tool.proc.pid, signal.SIGSTOP)
    try:
        source.start()
        assert f"fired {fires} upcalls" in source.wait()
        # Past the loop's next look at whether the traced process lives (every 250 ms).
        time.sleep(capture.LIVENESS_INTERVAL_NS / 1e9 + 0.2)
    finally:
        os.kill(tool.proc.pid, signal.SIGCONT)
    status, stderr = tool.wait()
    assert status == 0, stderr
    whole = out.with_name("whole.pcapng")
    read_back(out, "-w", str(whole))
    packets = captured(whole, fires)
    # Every upcall, in the order fired on each handler thread, each with its outcome.
    assert len(packets) == fires, stderr
    for thread in ("handler1", "handler2"):
        numbers = [k for k, on, _, _ in packets if on == thread]
        assert numbers == sorted(numbers) and numbers
    check_outcomes(packets, fires=fires)
