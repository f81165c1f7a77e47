"""The probe's record layout, and putting records from several CPUs into probe-time order.

One struct format mirrors `struct upcall_record` in recv_upcall.c. Records are decoded
here rather than by bcc: bcc 0.26's automatic event decoding rejects byte arrays, and
one `unpack_from` per record is faster anyway.
"""

from __future__ import annotations

import bisect
import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter

# struct upcall_record's header (recv_upcall.c), field by field; then key_len bytes of key,
# and pkt_len of packet from pkt_offset on. Offsets and partial formats used elsewhere are
# computed from this, so that a change to the layout is made here once.
HEADER_FIELDS = (
    ("ktime_ns", "Q"), ("key_size", "Q"), ("pid", "I"), ("tid", "I"), ("cpu", "I"),
    ("type", "I"), ("pkt_size", "I"), ("pkt_len", "I"), ("key_len", "I"),
    ("pkt_offset", "I"), ("flags", "I"), ("comm", "16s"), ("dpif", "64s"),
)


def header_format(before: str | None = None, *, start: str | None = None) -> str:
    """The struct format of the header's fields from the one named `start` (the first)
    up to the one named `before` (the end)."""
    names = [name for name, _ in HEADER_FIELDS]
    first = names.index(start) if start is not None else 0
    end = names.index(before) if before is not None else len(names)
    return "<" + "".join(code for _, code in HEADER_FIELDS[first:end])


def header_offset(name: str) -> int:
    """offsetof(struct upcall_record, name)."""
    return struct.calcsize(header_format(name))


HEADER = struct.Struct(header_format())
HEADER_SIZE = HEADER.size  # offsetof(struct upcall_record, data)
KTIME = struct.Struct("<Q")

UPCALL_TYPES = {0: "miss", 1: "action"}

# Record flags (F_* in recv_upcall.c): what the probe could not read.
F_ARG_UNREADABLE = 1
F_DPIF_UNREADABLE = 2
F_KEY_UNREADABLE = 4
F_PKT_UNREADABLE = 8
UNREADABLE = F_ARG_UNREADABLE | F_DPIF_UNREADABLE | F_KEY_UNREADABLE | F_PKT_UNREADABLE
# Flags the capture sets when the kernel side is on (kernel_record.py makes such records):
F_KERNEL = 16  # an ENQUEUE trailer follows the packet: what the kernel side saw of it
F_FAILED = 32  # a failed upcall, made from the kernel's event: ovs-vswitchd never saw it
# Set by the capture when outcomes are on (outcomes.py): an OUTCOME trailer follows the
# packet, before any ENQUEUE trailer.
F_OUTCOME = 64
# Set by recv_upcall.c while the capture sheds outcomes (outcomes.py): this upcall's is
# unknown, and it has no OUTCOME trailer.
F_OUTCOME_SHED = 128
FLAG_NAMES = {
    F_ARG_UNREADABLE: "probe arguments unreadable",
    F_DPIF_UNREADABLE: "dpif name unreadable",
    F_KEY_UNREADABLE: "key unreadable",
    F_PKT_UNREADABLE: "packet unreadable",
}

# Caps the BPF program is compiled with. The per-CPU record buffer must fit in one
# per-CPU map value (32 KiB), which bounds snaplen + key cap.
DEFAULT_SNAPLEN = 9216  # a 9000-byte jumbo frame and its headers
MAX_SNAPLEN = 16384
DEFAULT_KEY_CAP = 1024  # OVS's own ODPUTIL_FLOW_KEY_BYTES is 640
MIN_KEY_CAP = 640
MAX_KEY_CAP = 2048
# At most this many bytes that lie between key and packet in the traced process are
# copied with them, to read both at once (recv_upcall.c).
PKT_GAP_MAX = 256


@dataclass(frozen=True, slots=True)
class Upcall:
    """One upcall as the probe saw it."""

    ktime_ns: int
    pid: int
    tid: int
    cpu: int
    type: int
    dpif: str
    thread: str
    flags: int
    key: bytes
    key_size: int  # real length; len(key) is what was captured
    packet: bytes
    pkt_size: int  # real length; len(packet) is what was captured
    enqueue: Enqueue | None = None  # the kernel side's view (F_KERNEL), if it was on
    # What the handler did with it (F_OUTCOME), if known; read back from a file, a
    # comment.OutcomeFields.
    outcome: Outcome | None = None

    @property
    def type_name(self) -> str:
        return UPCALL_TYPES.get(self.type, str(self.type))

    @property
    def failed(self) -> bool:
        """A failed upcall (F_FAILED), made from the kernel side's event."""
        return bool(self.flags & F_FAILED) and self.enqueue is not None


@dataclass(frozen=True, slots=True)
class Enqueue:
    """What the kernel side saw of an upcall: its queueing to the handler's socket."""

    queued_ns: int | None  # from ovs_dp_upcall() to recv_upcall; None: not matched
    result: int  # ovs_dp_upcall()'s return: 0, or -errno for a failed upcall
    portid: int | None  # the handler socket's netlink portid; None: not matched
    device: str  # the device the packet came in on ("" if not matched)
    mru: int  # the upcall's MRU (fragments reassembled by conntrack), 0 if none


# A received upcall that no enqueue by the datapath matched.
UNMATCHED_ENQUEUE = Enqueue(queued_ns=None, result=0, portid=None, device="", mru=0)

# The ENQUEUE trailer of an F_KERNEL record, after the packet: queued_ns (-1: not matched),
# result, portid (-1 as u32: not matched), mru, device name.
ENQUEUE_TRAILER = struct.Struct("<qiIH2x16s")
_UNMATCHED_PORTID = 0xFFFFFFFF


def pack_enqueue(enqueue: Enqueue) -> bytes:
    return ENQUEUE_TRAILER.pack(
        -1 if enqueue.queued_ns is None else enqueue.queued_ns, enqueue.result,
        _UNMATCHED_PORTID if enqueue.portid is None else enqueue.portid, enqueue.mru,
        enqueue.device.encode()[:15])


def unpack_enqueue(record: bytes | memoryview) -> Enqueue:
    queued, result, portid, mru, device = ENQUEUE_TRAILER.unpack_from(
        record, len(record) - ENQUEUE_TRAILER.size)
    return Enqueue(None if queued < 0 else queued, result,
                   None if portid == _UNMATCHED_PORTID else portid, cstring(device), mru)


def with_enqueue(record: bytes | memoryview, enqueue: Enqueue | bytes) -> bytes:
    """The record with the kernel side's view of it after its packet (flag F_KERNEL);
    `enqueue` may be packed already (pack_enqueue, ENQUEUE_TRAILER)."""
    flags = U32.unpack_from(record, FLAGS_OFFSET)[0] | F_KERNEL
    trailer = enqueue if isinstance(enqueue, bytes) else pack_enqueue(enqueue)
    return b"".join((record[:FLAGS_OFFSET], U32.pack(flags), record[FLAGS_OFFSET + 4:],
                     trailer))


# What a handler did with an upcall (Outcome.did): a flow put, an execute, both, or nothing.
DID_PUT, DID_EXECUTE = 1, 2
# Why an outcome is unknown (Outcome.unknown); 0: it is known.
(UNKNOWN_TIMEOUT, UNKNOWN_EVENTS_LOST, UNKNOWN_CAPTURE_ENDED, UNKNOWN_WINDOW_FULL,
 UNKNOWN_SHED) = range(1, 6)


def outcome_kind(did: int, unknown: bool) -> str:
    """put (a flow put, whatever else), execute (an execute with no put), none or
    unknown: the values of --filter outcome=."""
    if unknown:
        return "unknown"
    return "put" if did & DID_PUT else "execute" if did else "none"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What ovs-vswitchd's handler asked of the datapath for an upcall (outcomes.py)."""

    did: int  # DID_PUT | DID_EXECUTE bits; 0 with unknown == 0: no flow installed
    unknown: int = 0  # UNKNOWN_*: the outcome could not be tied to the upcall
    handling_ns: int | None = None  # recv_upcall to the handler's first op for it
    ufid: bytes | None = None  # the put's
    create: bool = True  # the put created the flow (not a modify)
    mask: bytes = b""  # the put's; its key is the upcall's own (OVS puts the same bytes)
    put_actions: bytes = b""
    execute_actions: bytes = b""

    @property
    def kind(self) -> str:
        return outcome_kind(self.did, bool(self.unknown))


SHED_OUTCOME = Outcome(0, UNKNOWN_SHED)  # an F_OUTCOME_SHED record's

# The OUTCOME trailer: did, unknown, put flags (1: ufid, 2: create), handling_ns (-1: none),
# ufid, the lengths of mask, put actions and execute actions; then those bytes, then the
# trailer's whole length (u32), so that it is found from the record's end.
OUTCOME_HEAD = struct.Struct("<BBBxq16sIII")
_TRAILER_LENGTH = struct.Struct("<I")
_LENGTHS = struct.Struct("<III")  # mask, put actions, execute actions: OUTCOME_HEAD's end
_MASK_LEN_AT = OUTCOME_HEAD.size - _LENGTHS.size
_TRAILER_FIXED = OUTCOME_HEAD.size + _TRAILER_LENGTH.size  # a trailer with no bytes between
_trailer_length_at, _lengths_at = _TRAILER_LENGTH.unpack_from, _LENGTHS.unpack_from
_ENQUEUE_SIZE, _TRAILER_LENGTH_SIZE = ENQUEUE_TRAILER.size, _TRAILER_LENGTH.size


def pack_outcome(outcome: Outcome) -> bytes:
    return pack_outcome_fields(outcome.did, outcome.unknown, outcome.handling_ns, outcome.ufid,
                               outcome.create, outcome.mask, outcome.put_actions,
                               outcome.execute_actions)


def pack_outcome_fields(did: int, unknown: int, handling_ns: int | None, ufid: bytes | None,
                        create: bool, mask: bytes, put_actions: bytes,
                        execute_actions: bytes) -> bytes:
    """pack_outcome() of an Outcome's fields (the capture's hot path makes none)."""
    flags = (1 if ufid is not None else 0) | (2 if create else 0)
    return b"".join((
        OUTCOME_HEAD.pack(did, unknown, flags, -1 if handling_ns is None else handling_ns,
                          ufid or bytes(16), len(mask), len(put_actions),
                          len(execute_actions)),
        mask, put_actions, execute_actions,
        _TRAILER_LENGTH.pack(OUTCOME_HEAD.size + len(mask) + len(put_actions) +
                             len(execute_actions) + _TRAILER_LENGTH.size)))


def unpack_outcome(record: bytes | memoryview) -> Outcome | None:
    """The record's outcome (F_OUTCOME); None if its trailer does not hold together."""
    span = outcome_span(record)
    return None if span is None else _outcome_at(record, span[0])


def unpack_outcome_trailer(trailer: bytes) -> Outcome | None:
    """An OUTCOME trailer on its own (pcapng.raw_outcome_option's); None if it does not
    hold together."""
    if len(trailer) < _TRAILER_LENGTH.size or \
            _TRAILER_LENGTH.unpack_from(trailer, len(trailer) - _TRAILER_LENGTH.size)[0] \
            != len(trailer) or not _holds_together(trailer, 0, len(trailer)):
        return None
    return _outcome_at(trailer, 0)


def _outcome_at(data: bytes | memoryview, at: int) -> Outcome:
    did, unknown, flags, handling, ufid, mask_len, put_len, execute_len = \
        OUTCOME_HEAD.unpack_from(data, at)
    at += OUTCOME_HEAD.size
    mask = bytes(data[at:at + mask_len])
    at += mask_len
    put_actions = bytes(data[at:at + put_len])
    at += put_len
    return Outcome(did, unknown, None if handling < 0 else handling,
                   ufid if flags & 1 else None, bool(flags & 2), mask, put_actions,
                   bytes(data[at:at + execute_len]))


def outcome_span(record: bytes | memoryview, flags: int | None = None
                 ) -> tuple[int, int] | None:
    """Where the record's OUTCOME trailer lies (F_OUTCOME): (start, end). None if its
    lengths do not add up: the flag is the capture's, but a corrupt record may carry it.
    `flags`: the record's, when the caller has them unpacked already. (Every upcall's
    outcome comment starts here: the sizes are module constants.)"""
    if flags is None:
        flags = U32.unpack_from(record, FLAGS_OFFSET)[0]
    end = len(record) - (_ENQUEUE_SIZE if flags & F_KERNEL else 0)
    at = end - _TRAILER_LENGTH_SIZE  # the trailer's own length, at its end
    start = end - _trailer_length_at(record, at)[0] if at >= HEADER_SIZE else -1
    if start < HEADER_SIZE or not _holds_together(record, start, end):
        return None
    return start, end


def _holds_together(data: bytes | memoryview, start: int, end: int) -> bool:
    """data[start:end] is as long as the OUTCOME trailer there says."""
    length = end - start
    return length >= _TRAILER_FIXED and \
        _TRAILER_FIXED + sum(_lengths_at(data, start + _MASK_LEN_AT)) == length


def outcome_mask(record: bytes | memoryview, start: int) -> bytes:
    """The mask of the OUTCOME trailer at `start` (outcome_span), without unpacking it all."""
    length = U32.unpack_from(record, start + _MASK_LEN_AT)[0]
    return bytes(record[start + OUTCOME_HEAD.size:start + OUTCOME_HEAD.size + length])


def with_outcome(record: bytes | memoryview, outcome: Outcome | bytes,
                 flags: int | None = None) -> bytes:
    """The record with its outcome after its packet (flag F_OUTCOME). It is given its
    outcome before the kernel side's enqueue (kernel_side.annotate), which stays last.
    `flags` are the record's, when the caller has them unpacked already."""
    flags = (U32.unpack_from(record, FLAGS_OFFSET)[0] if flags is None else flags) | F_OUTCOME
    trailer = outcome if isinstance(outcome, bytes) else pack_outcome(outcome)
    return b"".join((record[:FLAGS_OFFSET], U32.pack(flags), record[FLAGS_OFFSET + 4:],
                     trailer))


# Control characters in a name would reach the operator's terminal (escape sequences) or
# break the comment's lines: they are shown as \xNN, like bytes that are not UTF-8.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)}


PID_OFFSET = header_offset("pid")
FLAGS_OFFSET = header_offset("flags")
_DPIF_AT = header_offset("dpif")
U32 = struct.Struct("<I")
_POINTER = struct.Struct("<Q")


def unread_dpif_address(record: bytes | memoryview) -> int | None:
    """The address of a dpif name the probe could not read (it left it in the field)."""
    if U32.unpack_from(record, FLAGS_OFFSET)[0] & F_DPIF_UNREADABLE:
        return _POINTER.unpack_from(record, _DPIF_AT)[0]
    return None


def with_dpif(record: bytes | memoryview, name: bytes) -> bytes:
    """The record with the dpif name read by other means, and its flag cleared."""
    flags = U32.unpack_from(record, FLAGS_OFFSET)[0] & ~F_DPIF_UNREADABLE
    field = name[:63].ljust(64, b"\0")
    return b"".join((record[:FLAGS_OFFSET], U32.pack(flags), record[FLAGS_OFFSET + 4:_DPIF_AT],
                     field, record[_DPIF_AT + 64:]))


def cstring(raw: bytes) -> str:
    """A NUL-terminated C string as text; bytes that are not UTF-8, and control
    characters, are escaped."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace").translate(_CONTROLS)


def parse(record: bytes | memoryview) -> Upcall:
    """Decode one raw record into an Upcall (the slow, readable path).

    A record may be a view into a larger buffer; key and packet come out as bytes of
    their own."""
    (ktime, key_size, pid, tid, cpu, type_, pkt_size, pkt_len, key_len, pkt_offset, flags,
     comm, dpif) = HEADER.unpack_from(record)
    packet_at = HEADER_SIZE + pkt_offset
    return Upcall(
        ktime_ns=ktime, pid=pid, tid=tid, cpu=cpu, type=type_,
        dpif=cstring(dpif), thread=cstring(comm), flags=flags,
        key=bytes(record[HEADER_SIZE:HEADER_SIZE + key_len]), key_size=key_size,
        packet=bytes(record[packet_at:packet_at + pkt_len]), pkt_size=pkt_size,
        enqueue=unpack_enqueue(record) if flags & F_KERNEL else None,
        outcome=unpack_outcome(record) if flags & F_OUTCOME else
        SHED_OUTCOME if flags & F_OUTCOME_SHED else None,
    )


def ktime(record: bytes) -> int:
    return KTIME.unpack_from(record)[0]


_FLAGS_LOW_BYTE = itemgetter(FLAGS_OFFSET)  # every F_* flag is in it


@functools.cache
def _lacking(mask: int) -> bytes:
    """The byte values with none of mask's bits."""
    return bytes(value for value in range(256) if not value & mask)


def count_flagged(records: Sequence[bytes | memoryview], *masks: int) -> tuple[int, ...]:
    """How many records have any of the flags in each mask, counted in C: a stage that
    passes most batches whole looks at each record's flags this way (a Python loop over
    them cost as much as the rest of such a stage). The flags are read once for all the
    masks: in a storm each read of a record's flags is a cache miss."""
    flags = bytes(map(_FLAGS_LOW_BYTE, records))
    return tuple(len(flags.translate(None, _lacking(mask))) for mask in masks)


# Sort key: a 1-tuple (ktime,) straight from C, no Python call per record.
_ktime_key = KTIME.unpack_from


class TimeMerger:
    """Puts records back into probe-time order.

    Each CPU's records reach the ring in time order, but two CPUs can interleave: a probe
    reads the clock some hundreds of nanoseconds before it reserves its place in the ring.
    After a drain, every record fired before the drain began is in hand (give or take one
    still being written on another CPU, hence the slack). Records up to that horizon are
    released in time order; later ones wait for the next drain. The records are nearly in
    order already, and Timsort sorts such a list in about one pass.
    """

    def __init__(self, slack_ns: int = 2_000_000) -> None:
        self.slack_ns = slack_ns
        self._held: list = []

    def add(self, records: list) -> None:
        self._held += records

    def release(self, drain_start_ns: int) -> list:
        """Records fired before drain_start_ns - slack, in time order."""
        merged = self.release_all()
        cut = bisect.bisect_left(merged, (drain_start_ns - self.slack_ns,), key=_ktime_key)
        self._held = merged[cut:]
        return merged[:cut]

    def release_all(self) -> list:
        held, self._held = self._held, []
        held.sort(key=_ktime_key)
        return held
