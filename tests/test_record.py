"""probe.record: a record whose dpif name the probe could not read (it left the name's
address in the field), read back and completed as capture.DpifNames does; records
counted by their flags; parts of the header read on their own."""

from __future__ import annotations

import struct

import upcalls
from conftest import REPLAY_DIR
from probe_records import probe_record

from upcall_capture.probe.record import (
    F_DPIF_UNREADABLE,
    F_FAILED,
    F_KEY_UNREADABLE,
    F_OUTCOME_SHED,
    HEADER,
    HEADER_FIELDS,
    count_flagged,
    header_format,
    header_offset,
    parse,
    unread_dpif_address,
    with_dpif,
)

UPCALL = upcalls.read_records(REPLAY_DIR / "mixed.upc")[0]
ADDRESS = 0x5555_1234_5678
NAMES = [name for name, _ in HEADER_FIELDS]


def unread_dpif_record(flags: int, gap: bytes) -> bytes:
    """As recv_upcall.c submits it when the dpif name is not resident."""
    record = probe_record(UPCALL, ktime_ns=7, gap=gap)
    fields = dict(zip(NAMES, HEADER.unpack_from(record), strict=True))
    fields.update(flags=flags, dpif=ADDRESS.to_bytes(8, "little"))
    return HEADER.pack(*fields.values()) + record[HEADER.size:]


def test_an_unread_dpif_name_is_found_by_its_address_and_filled_in():
    # A gap moves pkt_offset off key_len: no field beside flags may be taken for it.
    record = unread_dpif_record(F_DPIF_UNREADABLE | F_KEY_UNREADABLE, gap=b"\xee" * 6)
    assert unread_dpif_address(record) == ADDRESS
    completed = with_dpif(record, b"system@ovs-system")
    assert unread_dpif_address(completed) is None
    upcall = parse(completed)
    assert upcall.dpif == "system@ovs-system"
    assert upcall.flags == F_KEY_UNREADABLE
    assert (upcall.key, upcall.packet) == (UPCALL.key, UPCALL.packet)
    assert (upcall.thread, upcall.pid, upcall.ktime_ns) == ("handler1", 42, 7)


def test_a_read_dpif_name_has_no_address():
    assert unread_dpif_address(probe_record(UPCALL, ktime_ns=7, gap=b"\xee" * 6)) is None


def test_records_are_counted_by_any_flag_of_a_mask():
    flags = [0, F_OUTCOME_SHED, F_FAILED | F_KEY_UNREADABLE, F_OUTCOME_SHED | F_DPIF_UNREADABLE,
             F_DPIF_UNREADABLE]
    records = [memoryview(unread_dpif_record(f, gap=b"")) for f in flags]
    assert count_flagged(records, F_OUTCOME_SHED) == (2,)
    assert count_flagged(records, F_FAILED | F_OUTCOME_SHED, F_OUTCOME_SHED) == (3, 2)
    assert count_flagged(records, F_DPIF_UNREADABLE) == (2,)
    assert count_flagged(records, F_KEY_UNREADABLE | F_DPIF_UNREADABLE) == (3,)
    assert count_flagged([], F_FAILED) == (0,)


def test_a_part_of_the_header_reads_what_the_whole_header_reads_there():
    record = probe_record(UPCALL, ktime_ns=7, gap=b"")
    fields = HEADER.unpack_from(record)
    for start, before in (("comm", None), ("pid", "pkt_size"), (None, "comm")):
        part = struct.Struct(header_format(before, start=start))
        first = NAMES.index(start) if start else 0
        end = NAMES.index(before) if before else len(NAMES)
        at = header_offset(start) if start else 0
        assert part.unpack_from(record, at) == fields[first:end]
        assert at + part.size == (header_offset(before) if before else HEADER.size)
