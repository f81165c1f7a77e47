"""Raw probe records to pcapng blocks: interfaces, commented packets, statistics.

Pure (bytes in, bytes out). This is the hot path of a capture:
- per record: one header unpack, one cache look-up, and the packet block appended to
  one bytearray for the batch (its head packed, the packet bytes sliced in, the cached
  options after them), with no other object made per record;
- what only depends on what repeats in an upcall storm (the upcall's metadata and key)
  is built once and cached, bounded: the interface it goes to, and its encoded comment
  and key options;
- for a storm of new flows, where that cache misses every time, a new upcall costs the
  key's text (flowkey.format_key) and little more: the comment's first line, the
  interface and the port name are cached apart, per thread, CPU, dpif and port.
Records whose lengths disagree with their bytes (which the probe never makes) take a
slow path that still writes a well-formed block; so does the one packet that carries a
note (note_next), while every other packet pays nothing for the feature.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from upcall_capture import pcapng
from upcall_capture.flowkey import decode_key, format_key
from upcall_capture.probe.record import (
    FLAG_NAMES,
    FLAGS_OFFSET,
    HEADER_SIZE,
    PID_OFFSET,
    Upcall,
    header_format,
    header_offset,
    parse,
)

# ktime_ns, key_size, pid, tid, cpu, type, pkt_size, pkt_len, key_len, pkt_offset: the
# numbers of the record header that the hot path needs; the rest of the header (flags,
# comm, dpif) starts at FLAGS_OFFSET and runs into the key.
_NUMBERS = struct.Struct(header_format("flags"))

# Bounds the cache of encoded options: an entry is about a kilobyte (key bytes, comment
# and key option), so this is about 32 MB at most.
MAX_CACHED_OPTIONS = 32768
# Comment heads: one per thread, CPU, dpif and port.
MAX_CACHED_HEADS = 4096
# In a storm of new keys (a scan) no look-up hits, and looking up and keeping each
# upcall's options costs a sixth of describing it. After this many misses in a row only
# every SCAN_SAMPLE-th upcall goes through the cache, to notice when keys repeat again.
SCAN_AFTER_MISSES = 1024
SCAN_SAMPLE = 32


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


@dataclass
class Interface:
    dpif: str
    port: int | None
    linktype: int
    received: int = 0
    dropped: int = 0


def interface_name(dpif: str, port: int | None, port_name: str | None) -> str:
    if port_name:
        return f"{port_name} ({dpif})"
    if port is None:
        return f"no in_port ({dpif})"
    return f"port {port} ({dpif})"


def comment_head(upcall: Upcall, port: int | None, port_name: str | None) -> str:
    """The comment's first line: what the upcall was, and where."""
    where = "" if port is None else f" in_port={port}" + (f"({port_name})" if port_name else "")
    return (f"upcall {upcall.type_name} dpif={upcall.dpif}{where} pid={upcall.pid} "
            f"tid={upcall.tid} thread={upcall.thread} cpu={upcall.cpu}")


def comment(upcall: Upcall, key_text: str, port: int | None, port_name: str | None) -> str:
    """The packet comment: what the upcall was, then its key as OVS prints it."""
    lines = [comment_head(upcall, port, port_name), key_text]
    cut = []
    if len(upcall.packet) < upcall.pkt_size:
        cut.append(f"packet {len(upcall.packet)} of {upcall.pkt_size} bytes")
    if len(upcall.key) < upcall.key_size:
        cut.append(f"key {len(upcall.key)} of {upcall.key_size} bytes")
    if cut:
        lines.append("truncated: " + ", ".join(cut))
    unreadable = [name for flag, name in FLAG_NAMES.items() if upcall.flags & flag]
    if unreadable:
        lines.append("probe could not read: " + ", ".join(unreadable))
    return "\n".join(lines)


# EPB head: type, total length, interface, timestamp high and low, captured and original
# lengths; then the packet, padding, the cached options and the closing total length.
_EPB_HEAD = struct.Struct("<IIIIIII")
_EPB_TAIL = struct.Struct("<I")
_EPB_FIXED = 32  # 28-byte head and the 4-byte trailing length
# What _describe reads of a record: its numbers and flags (all but the names); and where
# the parts of the header that the comment's first line depends on start.
_DESCRIBE = struct.Struct(header_format("comm"))
_PKT_SIZE_AT, _COMM_AT = header_offset("pkt_size"), header_offset("comm")
_OPTION_HEAD = struct.Struct("<HH")
_MAX_OPTION_LENGTH = 0xFFFF
_KEY_PEN = struct.pack("<I", pcapng.KEY_OPTION_PEN)
# epb_flags (inbound) comes between the comment and the key, as packet_options() puts it.
_INBOUND_AND_KEY_HEAD = pcapng.packet_options(inbound=True)
_ENDOFOPT = b"\0\0\0\0"
_PADDING = (b"", b"\0\0\0", b"\0\0", b"\0")  # after n bytes of packet, by n % 4


@dataclass(frozen=True, slots=True)
class _Described:
    """What a packet's metadata and key make of it: its interface and its options, the
    latter followed by opt_endofopt, ready to go after the packet and its padding."""

    if_id: int
    interface: Interface
    tail: bytes


def _packet_apart(out: bytearray, described: _Described, timestamp: int,
                  packet: bytes | memoryview, original_length: int, dropped: int,
                  extra_options: bytes = b"") -> None:
    """A packet block built on its own rather than from the cached tail alone: one that
    carries losses (epb_dropcount) or options of its own."""
    described.interface.dropped += dropped
    options = described.tail[:-len(_ENDOFOPT)] + extra_options
    if dropped:
        options += pcapng.dropcount_option(dropped)
    out += pcapng.enhanced_packet(described.if_id, timestamp, bytes(packet), original_length,
                                  options)


class UpcallBlocks:
    """Turns batches of raw records into pcapng blocks for one section."""

    def __init__(self, *, snaplen: int, clock_offset_ns: int, port_name: PortNamer,
                 if_filter: str | None = None) -> None:
        self.snaplen = snaplen
        self.clock_offset_ns = clock_offset_ns
        self.port_name = port_name
        self.if_filter = if_filter
        self.interfaces: list[Interface] = []
        self._interface_ids: dict[tuple[str, int | None, int], int] = {}
        # Two generations, as in flowkey.KeyCache: hits come from the recent one or are
        # promoted from the older one; a full recent one becomes the older one.
        self._described: dict[tuple, _Described] = {}
        self._described_older: dict[tuple, _Described] = {}
        self._misses = 0  # look-ups in a row that missed
        self._heads: dict[tuple, tuple[int, bytes]] = {}
        self._last_interface: Interface | None = None
        # Losses no packet has carried yet; at the end, the last packet's interface's.
        self._pending_drops = 0
        # Losses seen before any packet had an interface to carry them.
        self.unattributed_drops = 0
        # A comment option for the next packet alone (note_next), or None.
        self._note: bytes | None = None

    def note_next(self, text: str) -> None:
        """Give the next packet `text` as a comment of its own, after its usual one (which
        stays first, as readers of these files expect): say what happened before it."""
        self._note = pcapng.packet_options(comment=text, inbound=False)

    def packets(self, records: Sequence[bytes | memoryview], dropped: int = 0) -> bytearray:
        """Blocks for records in time order (a bytearray: copying a batch of megabytes
        into bytes would only cost time and memory).

        `dropped` are losses since the previous call. They happened before these records,
        so the first packet carries them as its epb_dropcount, with any still pending;
        without a record they wait for the next packet, or for statistics()."""
        out = bytearray()
        dropped += self._pending_drops
        self._pending_drops = 0
        cache = self._described
        offset = self.clock_offset_ns
        unpack = _NUMBERS.unpack_from
        pack_head = _EPB_HEAD.pack
        pack_tail = _EPB_TAIL.pack
        padding = _PADDING
        misses, scan_after, scan_sample = self._misses, SCAN_AFTER_MISSES, SCAN_SAMPLE
        described = None
        if self._note is not None and records:
            described = self._slow_packet(out, records[0], dropped, self._note)
            self._note = None
            dropped = 0
            records = records[1:]
        for record in records:
            (ktime, key_size, pid, tid, cpu, type_, pkt_size, pkt_len, key_len,
             pkt_offset) = unpack(record)
            key_end = HEADER_SIZE + key_len
            packet_at = HEADER_SIZE + pkt_offset
            packet_end = packet_at + pkt_len
            if packet_end > len(record) or pkt_offset < key_len or pkt_len > pkt_size:
                described = self._slow_packet(out, record, dropped)
                dropped = 0
                continue
            if misses >= scan_after and misses % scan_sample:
                described = self._describe(record, out)
                misses += 1
            else:
                # What the comment and interface depend on: the flags, thread, dpif and
                # key bytes, the numbers other than time and lengths, and the packet's
                # lengths only when it was cut (the comment says so).
                cache_key = (bytes(record[FLAGS_OFFSET:key_end]), key_size, pid, tid, cpu,
                             type_, pkt_size << 32 | pkt_len if pkt_len < pkt_size else -1)
                described = cache.get(cache_key)
                if described is None:
                    described = self._described_older.get(cache_key)
                    if described is None:
                        described = self._describe(record, out)
                        misses += 1
                    else:
                        misses = 0
                    if len(cache) >= MAX_CACHED_OPTIONS // 2:
                        self._described_older = cache
                        cache = self._described = {}
                    cache[cache_key] = described
                else:
                    misses = 0
            described.interface.received += 1
            timestamp = ktime + offset
            if dropped:
                _packet_apart(out, described, timestamp, record[packet_at:packet_end],
                              pkt_size, dropped)
                dropped = 0
                continue
            pad = padding[pkt_len & 3]
            tail = described.tail
            total = _EPB_FIXED + pkt_len + len(pad) + len(tail)
            out += pack_head(pcapng.BLOCK_EPB, total, described.if_id, timestamp >> 32,
                             timestamp & 0xFFFFFFFF, pkt_len, pkt_size)
            out += record[packet_at:packet_end]
            out += pad
            out += tail
            out += pack_tail(total)
        if described is not None:
            self._last_interface = described.interface
        self._pending_drops = dropped
        self._misses = misses
        return out

    def _slow_packet(self, out: bytearray, record: bytes | memoryview, dropped: int,
                     extra_options: bytes = b"") -> _Described:
        """A packet built on its own: one that carries a note, or a record whose lengths
        disagree with its bytes or each other. recv_upcall.c makes none of the latter, but
        a record is not trusted with the file's integrity: the packet is the bytes
        present, its original length at least that. Not cached: the comment depends on
        the lengths."""
        upcall = parse(record)
        described = self._describe(record, out)
        described.interface.received += 1
        _packet_apart(out, described, upcall.ktime_ns + self.clock_offset_ns, upcall.packet,
                      max(upcall.pkt_size, len(upcall.packet)), dropped, extra_options)
        return described

    def _charge_to_last(self, dropped: int) -> None:
        """Losses after the last packet: no later packet carries them, so the ISB does."""
        interface = self._last_interface or (self.interfaces[-1] if self.interfaces else None)
        if interface is not None:
            interface.dropped += dropped
        else:
            self.unattributed_drops += dropped

    def _describe(self, record: bytes | memoryview, out: bytearray) -> _Described:
        """Interface and options for an upcall not in the cache.

        In a storm of new flows this runs for every upcall, so the usual case (nothing
        cut, nothing unreadable) takes a shorter way: the key's text alone, and the
        comment's first line, interface and port name from a cache of their own, as
        they depend only on the thread, dpif and port.
        """
        (_, key_size, _, _, _, _, pkt_size, pkt_len, key_len, _,
         flags) = _DESCRIBE.unpack_from(record)
        if flags or key_len != key_size or pkt_len != pkt_size:
            return self._describe_in_full(record, out)
        key = bytes(record[HEADER_SIZE:HEADER_SIZE + key_len])
        key_text = format_key(key, key_size)
        port, has_eth = port_and_eth(key_text)
        linktype = pcapng.LINKTYPE_ETHERNET if has_eth or not key else pcapng.LINKTYPE_RAW
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
            first_line = comment_head(upcall, port, name) + "\n"
            head = heads[head_key] = (if_id, first_line.encode("utf-8", "backslashreplace"))
        if_id, head_text = head
        text = head_text + key_text.encode()
        if len(text) > _MAX_OPTION_LENGTH:
            return self._describe_in_full(record, out)  # which says what is wrong
        tail = b"".join((
            _OPTION_HEAD.pack(pcapng.OPT_COMMENT, len(text)), text, _PADDING[len(text) & 3],
            _INBOUND_AND_KEY_HEAD, _OPTION_HEAD.pack(pcapng.OPT_CUSTOM_BINARY, len(key) + 4),
            _KEY_PEN, key, _PADDING[len(key) & 3], _ENDOFOPT))
        return _Described(if_id, self.interfaces[if_id], tail)

    def _describe_in_full(self, record: bytes | memoryview, out: bytearray) -> _Described:
        upcall = parse(record)
        decoded = decode_key(upcall.key, upcall.key_size)
        port = decoded.fields.get("in_port")
        linktype = pcapng.LINKTYPE_ETHERNET if "eth.src" in decoded.fields or not upcall.key \
            else pcapng.LINKTYPE_RAW
        name = self.port_name(upcall.dpif, port) if port is not None else None
        if_id = self._interface(upcall.dpif, port, linktype, name, out)
        text = comment(upcall, decoded.text, port, name)
        options = pcapng.packet_options(comment=text, key=upcall.key)
        return _Described(if_id, self.interfaces[if_id], options + _ENDOFOPT)

    def _interface(self, dpif: str, port: int | None, linktype: int, name: str | None,
                   out: bytearray) -> int:
        ident = (dpif, port, linktype)
        if_id = self._interface_ids.get(ident)
        if if_id is None:
            if_id = self._interface_ids[ident] = len(self.interfaces)
            self.interfaces.append(Interface(dpif, port, linktype))
            out += pcapng.interface_description(
                linktype, self.snaplen, name=interface_name(dpif, port, name),
                filter=self.if_filter,
            )
        return if_id

    def statistics(self, ktime_ns: int, *, start_ktime_ns: int) -> bytes:
        """One ISB per interface, for the end of the section."""
        if self._pending_drops:
            self._charge_to_last(self._pending_drops)
            self._pending_drops = 0
        return b"".join(
            pcapng.interface_statistics(
                if_id, ktime_ns + self.clock_offset_ns,
                received=interface.received, dropped=interface.dropped,
                # With a filter, every packet an interface received passed it.
                filter_accept=interface.received if self.if_filter else None,
                start_ns=start_ktime_ns + self.clock_offset_ns,
                end_ns=ktime_ns + self.clock_offset_ns,
            )
            for if_id, interface in enumerate(self.interfaces)
        )
