"""Raw probe records to pcapng blocks: interfaces, commented packets, statistics.

Pure (bytes in, bytes out), but for one budget of time: which new outcome texts are made
depends on the clocks it is given, unless `outcome_text_share` is 1. This is the hot path
of a capture:
- per record: one header unpack, one cache look-up, and the packet block's pieces (its
  head packed, the packet bytes sliced, the cached options) appended to the batch's
  list, which is joined once at the end: five appends cost less than adding each piece
  to a bytearray, which grows and copies as it goes (a repeated key 2.04 -> 1.71 µs in
  one process, one written without text 3.15 -> 2.78);
- what only depends on what repeats in an upcall storm (the upcall's metadata and key)
  is built once and cached, bounded: the interface it goes to, and its encoded comment
  and key options;
- for a storm of new flows, where that cache misses every time, a new upcall costs the
  key's text (flowkey.format_key) and little more: the comment's first line, the
  interface and the port name are cached apart, per thread, CPU, dpif and port.
Records whose lengths disagree with their bytes (which the probe never makes) take a
slow path that still writes a well-formed block; so does the one packet that carries a
note (note_next), while every other packet pays nothing for the feature.

With `decode=False` (the capture is overloaded: see workers.py), an upcall whose key is
not in the cache is written without the key's text, which is the expensive part: its
comment says so and its raw key is kept, and the interface comes from the key's shape
(flowkey.key_shape). Such packets are counted in `undecoded`.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Callable, Sequence

from upcall_capture import comment, pcapng
from upcall_capture.flowkey import decode_key, format_key, key_shape
from upcall_capture.interfaces import Interface, InterfaceTable
from upcall_capture.probe.record import (
    DID_PUT,
    ENQUEUE_TRAILER,
    F_FAILED,
    F_KERNEL,
    F_OUTCOME,
    F_OUTCOME_SHED,
    FLAGS_OFFSET,
    HEADER,
    HEADER_SIZE,
    PID_OFFSET,
    UNKNOWN_SHED,
    UNREADABLE,
    Outcome,
    header_format,
    header_offset,
    outcome_mask,
    outcome_span,
    parse,
    unpack_enqueue,
    unpack_outcome,
)

# Bounds the cache of encoded options: an entry is about a kilobyte (key bytes, comment
# and key option), so this is about 18 MB at most. With the outcome texts' cache (below)
# it keeps a worker under 60 MB: at 32,768 and 16,384, a worker reached 76 MB in a storm
# of new flows with outcomes on (100,000/s for 10 s), and 58 MB at 16,384 and 8,192.
# Each generation must hold a storm's flows on every CPU they come from: at 10,240, the
# 8,000 entries of 4,000 flows on two CPUs went out of the cache and were described
# again, and the worker took 3.31 µs an upcall instead of 2.40.
MAX_CACHED_OPTIONS = 16384
# Comment heads: one per thread, CPU, dpif and port.
MAX_CACHED_HEADS = 4096
# In a storm of new keys (a scan) no look-up hits, and looking up and keeping each
# upcall's options costs a sixth of describing it. After this many misses in a row only
# every SCAN_SAMPLE-th upcall goes through the cache, to notice when keys repeat again.
# As many as the cache's recent generation holds: a storm of a few thousand flows starts
# with as many misses, and at 1,024, 2,913 of 4,000 flows were described outside the
# cache, so that once keys were shed each went once more without its text (bench-targets,
# 4,000,000 at 200,000/s). A scan's first 8,192 keys cost a sixth more, and no more RSS:
# a long scan fills the cache with its samples anyway.
SCAN_AFTER_MISSES = MAX_CACHED_OPTIONS // 2
SCAN_SAMPLE = 32
# With decode=False, a key not in the cache is decoded all the same (and cached) when it
# was seen lately: a storm that repeats gets its keys' text while the capture stays busy,
# and a scan of new keys pays for none. (Decoding one miss in 8, as before, left a storm
# of 4,000 repeated flows at 200,000/s 3% to 5% without text.) Keys are remembered by
# hash, where a collision only decodes a key early, up to this many: those shed, and
# those decoded into the cache, shedding or not, as the same key on another CPU (the
# handler thread moved) is a comment not cached yet. Forgotten once decoded, a storm of
# 4,000 flows shed from a cold start, each on one CPU and then the other, left 7,977
# upcalls without text (then 3,968, one a flow at most). Remembered only while shedding,
# each of 4,000 repeated flows went once without text when the traced thread moved to
# the other CPU after the shedding began (every bench-targets run at 200,000/s: 4,000,
# all on that CPU). Twice the options cache: 2.2 MB of hashes, where 65,536 took 4.4 MB
# (with it, and a request ring of 8 MiB, a worker reached 64 MB at 100,000 new flows/s;
# at 32,768 with 4 MiB, 58 MB).
MAX_SEEN_KEYS = 32768


def port_and_eth(key_text: str) -> tuple[int | None, bool]:
    """The in_port and whether there is an eth() attribute, read back from a key's OVS
    text: what the interface depends on, without the decoder's fields (which cost more
    than the text). The text shows them exactly when the decoder's fields have them: not
    for an attribute of the wrong length or one cut short; the last in_port wins."""
    port = None
    at = _find_attribute(key_text, "in_port(", last=True)
    if at >= 0:
        digits = key_text[at + 8:key_text.find(")", at)]
        port = int(digits) if digits.isdigit() else None
    return port, _find_attribute(key_text, "eth(", last=False) >= 0


def _find_attribute(text: str, name: str, *, last: bool) -> int:
    """Where `name` starts as an attribute's name rather than as the tail of another's,
    or -1. (str.find and a look at one character: a regular expression costs more than
    the rest of describing a new upcall.)"""
    at = text.rfind(name) if last else text.find(name)
    while at > 0 and (text[at - 1].isalnum() or text[at - 1] in "_."):
        at = text.rfind(name, 0, at) if last else text.find(name, at + 1)
    return at


PortNamer = Callable[[str, int], "str | None"]


# Trailers after the packet (an outcome, the kernel side's enqueue) and a shed outcome:
# each record's own, with comments of their own after the upcall's. The described cache
# ignores them, so that an upcall's comment serves whether its outcome was shed, known or
# off: keyed by them, a storm whose outcomes went from shed to tied and back (outcomes.py)
# missed the cache at each turn, in bursts that left repeated keys without text.
_TRAILERS = F_KERNEL | F_OUTCOME
_OWN_COMMENTS = _TRAILERS | F_OUTCOME_SHED


_UNMATCHED_OPTION = pcapng.comment_option(comment.UNMATCHED_LINE.encode())
_QUEUED = struct.Struct("<q")
# The part of the enqueue comment after the time, by the trailer's bytes after the time:
# one entry per handler socket, device and MRU.
_WHERE: dict[bytes, bytes] = {}
MAX_CACHED_WHERE = 1024
# Outcome texts, about a kilobyte each (a put's is its megaflow's, by key).
MAX_CACHED_WHAT = 8192
# The share of the time that passes which new outcome texts' CPU may take, in batches
# whose keys are decoded (none in the others): a new flow's megaflow text is dear (0.08 ms
# on a slow host), and key texts come first. A count a batch (16, before) is no bound on
# time, as batch sizes follow the rate, and it starved bursts: a few hundred new flows
# after a quiet spell came as one or two batches and got 16 or 32 texts from an idle
# worker. Time left unused is kept for such a burst: up to OUTCOME_TEXT_CREDIT_S (some
# 600 texts).
OUTCOME_TEXT_SHARE = 0.15
OUTCOME_TEXT_CREDIT_S = 0.05
# The comment option of each unknown outcome, by reason: a line with no time.
_UNKNOWN_OPTIONS = {reason: pcapng.comment_option(comment.outcome_what(Outcome(0, reason),
                                                                        b"").encode())
                    for reason in comment.UNKNOWN_REASONS}
_UNDECODED_OUTCOME = pcapng.comment_option(comment.OUTCOME_NOT_DECODED.encode())
# The outcome's comment of an upcall whose ops were not copied: in a storm, every one's.
_SHED_OUTCOME = _UNKNOWN_OPTIONS[UNKNOWN_SHED]
_KEY_LEN = struct.Struct("<I")
_KEY_LEN_AT = header_offset("key_len")
_HANDLING = struct.Struct("<q")
_HANDLING_AT = 4  # in OUTCOME_HEAD, after did, unknown, flags and a pad byte


class _OutcomeLines:
    """Outcome comments. A text is made once per flow (the megaflow's text is dear: 0.08 ms
    for a new flow) and only while there is time for it: its CPU time (`cpu_clock`, the
    thread's) is at most `share` of the time that passes (`clock`); 1 or more: all the
    time needed. Past it, the raw outcome is written instead, for -r to decode."""

    def __init__(self, share: float, clock: Callable[[], float],
                 cpu_clock: Callable[[], float]) -> None:
        # The comment without its handling time, and a put's mask option, by the
        # trailer's bytes other than that time and by the key (a put's megaflow is the
        # key's).
        self.texts: dict[bytes, tuple[bytes, bytes]] = {}
        self.share = share
        self.credit = math.inf if share >= 1 else OUTCOME_TEXT_CREDIT_S  # seconds
        self.making = False  # new texts may be made in this batch (start_batch)
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._refilled = clock()

    def start_batch(self, making: bool) -> None:
        now = self._clock()
        if self.share < 1:
            self.credit = min(OUTCOME_TEXT_CREDIT_S,
                              self.credit + self.share * (now - self._refilled))
        self._refilled = now
        self.making = making

    def option(self, record: bytes | memoryview, flags: int) -> bytes:
        """The record's outcome comment (and a put's mask); `flags` are the record's."""
        span = outcome_span(record, flags)
        if span is None:
            return b""
        start, end = span
        unknown = _UNKNOWN_OPTIONS.get(record[start + 1])
        if unknown is not None:  # in an overloaded storm, every upcall's
            return unknown
        handling = _HANDLING.unpack_from(record, start + _HANDLING_AT)[0]
        put = record[start] & DID_PUT
        # Only a put's text depends on the key: in a storm of new flows, the other
        # outcomes are a few entries.
        key = bytes(record[HEADER_SIZE:HEADER_SIZE +
                           _KEY_LEN.unpack_from(record, _KEY_LEN_AT)[0]]) if put else b""
        cache_key = b"".join((record[start:start + _HANDLING_AT],
                              record[start + _HANDLING_AT + _HANDLING.size:end], key))
        cached = self.texts.get(cache_key)
        if cached is None:
            if not self.making or self.credit <= 0:
                return _UNDECODED_OUTCOME + pcapng.raw_outcome_option(bytes(record[start:end]))
            if len(self.texts) >= MAX_CACHED_WHAT:
                self.texts.clear()
            started = self._cpu_clock()
            what = comment.outcome_what(unpack_outcome(record), key).encode(
                "utf-8", "backslashreplace")
            # A put's mask follows, so that -r can print its megaflow whole.
            mask = pcapng.mask_option(outcome_mask(record, start)) if put else b""
            cached = self.texts[cache_key] = what, mask
            self.credit -= self._cpu_clock() - started
        what, mask = cached
        return pcapng.comment_option(what, comment.handled_text(None if handling < 0
                                                                 else handling), mask)


def _enqueue_option(record: bytes | memoryview) -> bytes:
    at = len(record) - ENQUEUE_TRAILER.size
    queued = _QUEUED.unpack_from(record, at)[0]
    if queued < 0:
        return _UNMATCHED_OPTION
    rest = bytes(record[at + _QUEUED.size:])
    where = _WHERE.get(rest)
    if where is None:
        if len(_WHERE) >= MAX_CACHED_WHERE:
            _WHERE.clear()
        where = _WHERE[rest] = comment.enqueue_where(unpack_enqueue(record))
    return pcapng.comment_option(comment.queued_line(queued, where))


def interface_name(dpif: str, port: int | None, port_name: str | None) -> str:
    if port_name:
        return f"{port_name} ({dpif})"
    if port is None:
        return f"no in_port ({dpif})"
    return f"port {port} ({dpif})"


# What the hot path and _describe read of a record: its numbers and flags (all but the
# names, which start after the flags and run into the key); and where the parts of the
# header that the comment's first line depends on start.
_DESCRIBE = struct.Struct(header_format("comm"))
_PKT_SIZE_AT, _COMM_AT = header_offset("pkt_size"), header_offset("comm")
_NAMES = struct.Struct(header_format(start="comm"))  # comm, dpif
_NOT_DECODED = comment.NOT_DECODED.encode()
# What the loops over a batch's records bind locally to write a packet block: its head
# packed, its end packed, the padding after its packet, and its fixed size.
_EPB_WRITING = (pcapng.pack_epb_head, pcapng.pack_options_end, pcapng.PADDING,
                pcapng.EPB_WITH_OPTIONS_FIXED)


# What a packet's metadata and key make of it: its interface's id, the interface, and its
# options (the comment and the key), ready to go after the packet and its padding; the
# record's own comments (_own_options) and opt_endofopt follow them. A tuple, unpacked in
# one step: the hit path of a storm is a few dozen steps a record.
_Entry = tuple[int, Interface, bytes]
# A batch's blocks as they are built: pieces, joined once at the end (packets()).
_Pieces = list[bytes | memoryview]


def _plain_key(record: bytes | memoryview, flags: int, key_size: int, key_len: int,
               pkt_size: int, pkt_len: int) -> bytes | None:
    """The key of a received upcall's record with nothing cut or unreadable (from the
    numbers in its header, and the record's length: a record cut short, which only the
    slow path meets, has its key cut too), else None."""
    key_end = HEADER_SIZE + key_len
    if flags & (UNREADABLE | F_FAILED) or key_len != key_size or pkt_len != pkt_size \
            or key_end > len(record):
        return None
    return bytes(record[HEADER_SIZE:key_end])


def _packet_apart(out: _Pieces, if_id: int, interface: Interface, options: bytes,
                  timestamp: int, packet: bytes | memoryview, original_length: int,
                  dropped: int) -> None:
    """A packet block built on its own: one that carries losses (epb_dropcount) or a
    note."""
    interface.dropped += dropped
    if dropped:
        options += pcapng.dropcount_option(dropped)
    out.append(pcapng.enhanced_packet(if_id, timestamp, bytes(packet), original_length, options))


class UpcallBlocks:
    """Turns batches of raw records into pcapng blocks for one section.

    `table` holds the section's interfaces; a worker passes its copy of the main
    process's. `emitted` lists the ids of the interfaces whose IDBs the last batch wrote.
    """

    def __init__(self, *, snaplen: int, clock_offset_ns: int, port_name: PortNamer,
                 if_filter: str | None = None, table: InterfaceTable | None = None,
                 outcome_text_share: float = OUTCOME_TEXT_SHARE,
                 clock: Callable[[], float] = time.monotonic,
                 cpu_clock: Callable[[], float] = time.thread_time) -> None:
        self.snaplen = snaplen
        self.clock_offset_ns = clock_offset_ns
        self.port_name = port_name
        self.if_filter = if_filter
        self.table = InterfaceTable() if table is None else table
        self.emitted: list[int] = []
        self.undecoded = 0  # packets written without their key's text
        self._outcomes = _OutcomeLines(outcome_text_share, clock, cpu_clock)
        self._seen_keys: set[int] = set()  # hashes of keys decoded or shed
        # Two generations, as in flowkey.KeyCache: hits come from the recent one or are
        # promoted from the older one; a full recent one becomes the older one.
        self._described: dict[tuple, _Entry] = {}
        self._described_older: dict[tuple, _Entry] = {}
        self._misses = 0  # look-ups in a row that missed
        self._heads: dict[tuple, tuple[int, bytes]] = {}
        # For keys written without text: interface and options before and after the key,
        # by the comment's first line and the key's shape.
        self._shed_parts: dict[tuple, tuple[int, Interface, bytes, bytes]] = {}
        self._last_interface: Interface | None = None
        # Losses no packet has carried yet; at the end, the last packet's interface's.
        self._pending_drops = 0
        # Losses seen before any packet had an interface to carry them.
        self.unattributed_drops = 0
        # A comment option for the next packet alone (note_next), or None.
        self._note: bytes | None = None

    @property
    def interfaces(self) -> list[Interface]:
        return self.table.interfaces

    @property
    def last_interface(self) -> Interface | None:
        """The interface of the last packet written."""
        return self._last_interface

    def note_next(self, text: str) -> None:
        """Give the next packet `text` as a comment of its own, after its usual one (which
        stays first, as readers of these files expect): say what happened before it."""
        self._note = pcapng.packet_options(comment=text, inbound=False)

    def packets(self, records: Sequence[bytes | memoryview], dropped: int = 0, *,
                decode: bool = True, outcome_texts: bool = True) -> bytes:
        """Blocks for records in time order. `decode=False`: keys not in the
        cache are written without their text; with it or `outcome_texts=False`, so are
        outcomes whose text is not. Records are bytes, or views of bytes.

        `dropped` are losses since the previous call. They happened before these records,
        so the first packet carries them as its epb_dropcount, with any still pending;
        without a record they wait for the next packet, or for statistics()."""
        out: _Pieces = []
        self.emitted = []
        self._outcomes.start_batch(decode and outcome_texts)
        dropped += self._pending_drops
        if self._note is not None and records:
            self._last_interface = self._slow_packet(out, records[0], dropped, self._note)
            self._note = None
            dropped = 0
            records = records[1:]
        if decode or self._misses < SCAN_AFTER_MISSES:
            self._pending_drops = self._build(records, out, dropped, decode)
        else:
            self._pending_drops = self._build_shed_scan(records, out, dropped)
        return b"".join(out)

    def _build(self, records: Sequence[bytes | memoryview], out: _Pieces, dropped: int,
               decode: bool) -> int:
        """packets()'s blocks of `records`, added to `out`; the losses still to carry."""
        add = out.append
        cache = self._described
        offset = self.clock_offset_ns
        unpack = _DESCRIBE.unpack_from
        pack_head, pack_end, padding, fixed = _EPB_WRITING
        shed_option = _SHED_OUTCOME
        misses, scan_after, scan_sample = self._misses, SCAN_AFTER_MISSES, SCAN_SAMPLE
        # Flag masks, made once a batch: per record, each cost as much as a look-up.
        unsheddable, described_flags = UNREADABLE | F_FAILED, ~_OWN_COMMENTS
        undecoded = 0
        interface = None
        for record in records:
            (ktime, key_size, pid, tid, cpu, type_, pkt_size, pkt_len, key_len,
             pkt_offset, flags) = unpack(record)
            key_end = HEADER_SIZE + key_len
            packet_at = HEADER_SIZE + pkt_offset
            packet_end = packet_at + pkt_len
            if packet_end > len(record) or pkt_offset < key_len or pkt_len > pkt_size:
                interface = self._slow_packet(out, record, dropped)
                dropped = 0
                continue
            # A whole key, read whole, that may go without its text.
            sheddable = not (decode or flags & unsheddable or key_len != key_size
                             or pkt_len != pkt_size)
            # In a scan of new keys, only one upcall in scan_sample looks in the cache;
            # while keys are shed, also one whose key comes again (_shed gives None), to
            # be decoded and kept there (else it alternated: decoded, shed, decoded...).
            scan_shed = sheddable and misses >= scan_after and misses % scan_sample
            entry = self._shed(record, key_end, (pid, tid, cpu, type_), out) \
                if scan_shed else None
            if entry is not None:
                misses += 1
                undecoded += 1
            else:
                looked = scan_shed or misses < scan_after or not misses % scan_sample
                if looked:
                    # What the comment and interface depend on: the flags but the
                    # trailers' and F_OUTCOME_SHED (each record's own comments:
                    # _own_options), thread, dpif and key bytes, the numbers other than
                    # time and lengths, and the packet's lengths only when it was cut
                    # (the comment says so).
                    cache_key = (flags & described_flags,
                                 bytes(record[FLAGS_OFFSET + 4:key_end]),
                                 key_size, pid, tid, cpu, type_,
                                 pkt_size << 32 | pkt_len if pkt_len < pkt_size else -1)
                    entry = cache.get(cache_key)
                    if entry is None:
                        entry = self._described_older.get(cache_key)
                        if entry is not None:
                            cache = self._remember(cache_key, entry)
                if entry is not None:
                    misses = 0
                else:
                    misses += 1
                    if sheddable and not scan_shed:
                        entry = self._shed(record, key_end, (pid, tid, cpu, type_), out)
                    if entry is not None:
                        undecoded += 1
                    else:
                        entry, decoded = self._describe(record, out, _plain_key(
                            record, flags, key_size, key_len, pkt_size, pkt_len))
                        if looked and decoded:
                            cache = self._remember(cache_key, entry)
                            # On another thread or CPU, it is decoded again, not shed.
                            self._seen_before(record[HEADER_SIZE:key_end])
            if_id, interface, options = entry
            interface.received += 1
            timestamp = ktime + offset
            if flags & _OWN_COMMENTS:  # what _own_options gives, without its call for
                # a record marked shed alone, as every record is in a storm's shedding
                options += shed_option if flags & _OWN_COMMENTS == F_OUTCOME_SHED else \
                    self._own_options(record, flags)
            if dropped:
                _packet_apart(out, if_id, interface, options, timestamp,
                              record[packet_at:packet_end], pkt_size, dropped)
                dropped = 0
                continue
            pad = padding[pkt_len & 3]
            total = fixed + pkt_len + len(pad) + len(options)
            add(pack_head(pcapng.BLOCK_EPB, total, if_id, timestamp >> 32,
                          timestamp & 0xFFFFFFFF, pkt_len, pkt_size))
            add(record[packet_at:packet_end])
            add(pad)
            add(options)
            add(pack_end(total))
        self._settle(interface, misses, undecoded)
        return dropped

    def _build_shed_scan(self, records: Sequence[bytes | memoryview], out: _Pieces,
                         dropped: int) -> int:
        """_build() in a scan of new keys while keys are shed: in a storm too big to
        decode, every batch, and nearly every record is one that _shed writes from its
        cache. Those are written here: _build's loop and _shed's way for them written
        out, without a call or a test that only other records need, and the header's
        names unpacked with its numbers (offline, 2.9 -> 2.55 µs a record). Any other
        record goes through _build alone, and so do the rest once a key is in the cache
        again: the scan is over."""
        add = out.append
        unpack = HEADER.unpack_from
        pack_head, pack_end, padding, fixed = _EPB_WRITING
        offset = self.clock_offset_ns
        shed_parts, seen = self._shed_parts, self._seen_keys
        shed_option = _SHED_OUTCOME
        shed_option_size = len(shed_option)
        misses, scan_sample = self._misses, SCAN_SAMPLE
        # Flags of records that _shed does not write from its cache, or that carry
        # comments of their own other than a shed outcome.
        elsewhere = UNREADABLE | F_FAILED | (_OWN_COMMENTS & ~F_OUTCOME_SHED)
        undecoded = 0
        interface = None
        for at, record in enumerate(records):
            (ktime, key_size, pid, tid, cpu, type_, pkt_size, pkt_len, key_len,
             pkt_offset, flags, comm, dpif) = unpack(record)
            key_end = HEADER_SIZE + key_len
            packet_at = HEADER_SIZE + pkt_offset
            packet_end = packet_at + pkt_len
            parts = None
            if not (dropped or flags & elsewhere or not misses % scan_sample
                    or key_len != key_size or pkt_len != pkt_size
                    or packet_end > len(record) or pkt_offset < key_len):
                key = record[HEADER_SIZE:key_end]
                shape = key_shape(key)
                if shape is not None:
                    parts = shed_parts.get((pid, tid, cpu, type_, comm, dpif, shape,
                                            shape.port(key)))
                    # Last, as in _shed: it remembers the key (_seen_before, written
                    # out without its call, as the rest of _shed's way is).
                    if parts is not None:
                        sighting = hash(key)
                        if sighting in seen:
                            parts = None
                        else:
                            if len(seen) >= MAX_SEEN_KEYS:
                                seen.clear()
                            seen.add(sighting)
            if parts is None:  # _build's, with what this loop leaves settled first
                self._settle(interface, misses, undecoded)
                interface, undecoded = None, 0
                dropped = self._build(records[at:at + 1], out, dropped, False)
                misses = self._misses
                if misses < SCAN_AFTER_MISSES:
                    return self._build(records[at + 1:], out, dropped, False)
                continue
            misses += 1
            undecoded += 1
            if_id, interface, before, after = parts
            interface.received += 1
            timestamp = ktime + offset
            pad = padding[pkt_len & 3]
            total = fixed + pkt_len + len(pad) + len(before) + key_len + len(after)
            shed = flags & F_OUTCOME_SHED
            if shed:
                total += shed_option_size
            add(pack_head(pcapng.BLOCK_EPB, total, if_id, timestamp >> 32,
                          timestamp & 0xFFFFFFFF, pkt_len, pkt_size))
            add(record[packet_at:packet_end])
            add(pad)
            add(before)
            add(key)
            add(after)
            if shed:
                add(shed_option)
            add(pack_end(total))
        self._settle(interface, misses, undecoded)
        return dropped

    def _settle(self, interface: Interface | None, misses: int, undecoded: int) -> None:
        """What a loop over a batch's records leaves for the next: the last packet's
        interface (None: it wrote none), the look-ups missed in a row, and the count of
        packets written without their key's text."""
        if interface is not None:
            self._last_interface = interface
        self._misses = misses
        self.undecoded += undecoded

    def _remember(self, cache_key: tuple, entry: _Entry) -> dict:
        """Cache a description; the recent generation (a new one when it was full)."""
        cache = self._described
        if len(cache) >= MAX_CACHED_OPTIONS // 2:
            self._described_older = cache
            cache = self._described = {}
        cache[cache_key] = entry
        return cache

    def _slow_packet(self, out: _Pieces, record: bytes | memoryview, dropped: int,
                     extra_options: bytes = b"") -> Interface:
        """A packet built on its own: one that carries a note, or a record whose lengths
        disagree with its bytes or each other. recv_upcall.c makes none of the latter, but
        a record is not trusted with the file's integrity: the packet is the bytes
        present, its original length at least that. Not cached: the comment depends on
        the lengths. Returns the packet's interface."""
        upcall = parse(record)
        (_, key_size, _, _, _, _, pkt_size, pkt_len, key_len, _,
         flags) = _DESCRIBE.unpack_from(record)
        (if_id, interface, options), _ = self._describe(record, out, _plain_key(
            record, flags, key_size, key_len, pkt_size, pkt_len))
        interface.received += 1
        _packet_apart(out, if_id, interface,
                      options + self._own_options(record, flags) + extra_options,
                      upcall.ktime_ns + self.clock_offset_ns, upcall.packet,
                      max(upcall.pkt_size, len(upcall.packet)), dropped)
        return interface

    def _own_options(self, record: bytes | memoryview, flags: int) -> bytes:
        """A received upcall's comments after its first: its outcome (shed, or as the
        trailer has it) and its wait in the kernel, when it has them. This runs for every
        upcall while either is on. (A failed upcall's comment says what its enqueue was.)"""
        if flags & F_FAILED:
            return b""
        options = _SHED_OUTCOME if flags & F_OUTCOME_SHED else \
            self._outcomes.option(record, flags) if flags & F_OUTCOME else b""
        return (options + _enqueue_option(record)) if flags & F_KERNEL else options

    def _charge_to_last(self, dropped: int) -> None:
        last = self._last_interface
        if not self.table.charge_after_last(
                dropped, None if last is None else self.table.find(last.identity)):
            self.unattributed_drops += dropped

    def _describe(self, record: bytes | memoryview, out: _Pieces, key: bytes | None
                  ) -> tuple[_Entry, bool]:
        """Interface and options for an upcall not in the cache, and whether they may be
        cached (False for a failed upcall). `key`: what _plain_key gives.

        In a storm of new flows this runs for every upcall, so the usual case (nothing
        cut, nothing unreadable) takes a shorter way: the key's text alone (and from a
        compiled shape, its port and eth() without a search of the text: an eighth of
        this), and the comment's first line, interface and port name from a cache of
        their own, as they depend only on the thread, dpif and port.
        """
        if key is None:
            return self._describe_in_full(record, out)
        shape = key_shape(key)
        if shape is not None:  # it knows where the in_port is: no search of the text
            key_text, port, has_eth = shape.text(key, len(key)), shape.port(key), \
                shape.has_eth
        else:
            key_text = format_key(key)
            port, has_eth = port_and_eth(key_text)
        if_id, head_text = self._head(record, port, comment.linktype(has_eth, key), out)
        try:
            options = pcapng.commented_key_options(head_text, key, key_text.encode())
        except ValueError:
            return self._describe_in_full(record, out)  # which says what is wrong
        return (if_id, self.table.interfaces[if_id], options), True

    def _shed(self, record: bytes | memoryview, key_end: int, thread: tuple[int, ...],
              out: _Pieces) -> _Entry | None:
        """The interface and options of a received upcall's whole key written without its
        text, or None for one to decode after all: a key seen so lately, or one whose
        shape is not known yet. In a storm too big to decode this runs for every upcall:
        the options but the key's bytes are cached by what they depend on (the comment's
        first line, and the shape). `thread`: the record's pid, tid, cpu and type."""
        key = record[HEADER_SIZE:key_end]
        # The same key on another CPU or thread is another comment, not in the cache yet.
        if self._seen_before(key):
            return None
        shape = key_shape(key)
        if shape is None:
            return None
        port = shape.port(key)
        parts_key = (*thread, *_NAMES.unpack_from(record, _COMM_AT), shape, port)
        parts = self._shed_parts.get(parts_key)
        if parts is None:
            if_id, head_text = self._head(record, port, comment.linktype(shape.has_eth, key),
                                          out)
            # Never escaped (pcapng.KEY_TAG): a shape is compiled for well-formed keys
            # only, and no well-formed first attribute is 255 bytes long (or 511...).
            before, after = pcapng.commented_key_options_around(head_text + _NOT_DECODED,
                                                                len(key))
            if len(self._shed_parts) >= MAX_CACHED_HEADS:
                self._shed_parts.clear()
            parts = self._shed_parts[parts_key] = (if_id, self.table.interfaces[if_id],
                                                   before, after)
        if_id, interface, before, after = parts
        return if_id, interface, b"".join((before, key, after))

    def _seen_before(self, key: bytes | memoryview) -> bool:
        """Whether the key was decoded or shed lately (by hash: a view of bytes is hashed
        without a copy); it is remembered from now on."""
        seen, sighting = self._seen_keys, hash(key)
        if sighting in seen:
            return True
        if len(seen) >= MAX_SEEN_KEYS:
            seen.clear()
        seen.add(sighting)
        return False

    def _head(self, record: bytes | memoryview, port: int | None, linktype: int,
              out: _Pieces) -> tuple[int, bytes]:
        """The interface id and the comment's first line (with its newline), cached by
        what they depend on."""
        heads = self._heads
        head_key = (bytes(record[PID_OFFSET:_PKT_SIZE_AT]), bytes(record[_COMM_AT:HEADER_SIZE]),
                    port, linktype)
        head = heads.get(head_key)
        if head is None:
            upcall = parse(record)
            name = self.port_name(upcall.dpif, port) if port is not None else None
            if_id = self._interface(upcall.dpif, port, linktype, name, out)
            if len(heads) >= MAX_CACHED_HEADS:
                heads.clear()
            first_line = comment.head(upcall, port, name) + "\n"
            head = heads[head_key] = (if_id, first_line.encode("utf-8", "backslashreplace"))
        return head

    def _describe_in_full(self, record: bytes | memoryview, out: _Pieces
                          ) -> tuple[_Entry, bool]:
        upcall = parse(record)
        decoded = decode_key(upcall.key, upcall.key_size)
        port = decoded.fields.get("in_port")
        linktype = comment.upcall_linktype(upcall, "eth.src" in decoded.fields)
        name = self.port_name(upcall.dpif, port) if port is not None else None
        if_id = self._interface(upcall.dpif, port, linktype, name, out)
        if upcall.failed:
            text = comment.failed_text(upcall, decoded.text, port, name)
        else:
            text = comment.text(upcall, decoded.text, port, name)
        options = pcapng.packet_options(comment=text, key=upcall.key)
        # A failed upcall's comment has its errno and portid: it is not cached.
        return (if_id, self.table.interfaces[if_id], options), not upcall.failed

    def _interface(self, dpif: str, port: int | None, linktype: int, name: str | None,
                   out: _Pieces) -> int:
        identity = (dpif, port, linktype)
        if_id = self.table.find(identity)
        if if_id is None:
            description = pcapng.interface_description(
                linktype, self.snaplen, name=interface_name(dpif, port, name),
                filter=self.if_filter,
            )
            if_id = self.table.add(identity, description)
            self.emitted.append(if_id)
            out.append(description)
        return if_id

    def statistics(self, ktime_ns: int, *, start_ktime_ns: int,
                   datapath_comments: dict[str, str] | None = None) -> bytes:
        """One ISB per interface, for the end of the section."""
        self.settle_drops()
        offset = self.clock_offset_ns
        return self.table.statistics(ktime_ns + offset, start_ns=start_ktime_ns + offset,
                                     end_ns=ktime_ns + offset, filtered=bool(self.if_filter),
                                     datapath_comments=datapath_comments)

    def settle_drops(self) -> None:
        """Losses that no packet came after to carry: the last packet's interface has them."""
        if self._pending_drops:
            self._charge_to_last(self._pending_drops)
            self._pending_drops = 0
