"""pcapng writer and reader: bytes in, bytes out, no I/O.

Follows the pcapng specification (draft-ietf-opsawg-pcapng). We write our own rather than
use a library's because dpkt's writer sets the original length to the captured length
(truncated upcalls would lose their real size) and scapy's writes microsecond timestamps only;
upcalls need nanoseconds and true lengths.

Writing: always little-endian, one section of unspecified length (the stream is written as it
goes), interfaces with if_tsresol=9 so every timestamp is in nanoseconds since the epoch.
`enhanced_packet` is the hot path; the options of a packet are built once by `packet_options`
and cached by the caller, with `dropcount_option` appended when records were lost.

The raw netlink flow key travels in a custom binary option (code 2989, copyable) carrying
Private Enterprise Number 32473, the IANA example PEN reserved for documentation (RFC 5612),
as this project owns no PEN. The PEN is in the section's byte order, as the spec requires.
tshark 4.0 reads past the option silently (not even `-V` shows it) and editcap copies it;
only our own reader decodes it (`Packet.key`). A flow put's megaflow mask travels the same
way, its value after the PEN starting with MASK_TAG (`Packet.mask`), and so does an
outcome left undecoded, tagged OUTCOME_TAG (`Packet.raw_outcome`). A key that starts
with their first byte, 0xff, is written after KEY_TAG, so that none is taken for them:
the probe copies whatever bytes the traced process passes, and a fuzzed key b"\xffout"
read back as no key at all. No key of OVS's is escaped in practice: its first byte is
the low byte of its first attribute's length, and none is 255 bytes long (or 511...):
those of fixed size are under 64 bytes, the others (nested, MPLS) a multiple of 4.

Reading: `iter_blocks` parses SHB, IDB, EPB, SPB and ISB of either byte order and yields other
block types with their framing only; `complete_length` gives the length of the leading run of
complete, well-formed blocks, used to truncate a file cut short by a write error.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # raw IPv4/IPv6, for L3 upcalls (keys without an eth attribute)

BLOCK_SHB = 0x0A0D0D0A
BLOCK_IDB = 0x00000001
BLOCK_SPB = 0x00000003
BLOCK_ISB = 0x00000005
BLOCK_EPB = 0x00000006

OPT_ENDOFOPT = 0
OPT_COMMENT = 1
OPT_CUSTOM_BINARY = 2989  # copyable custom option with binary data
SHB_HARDWARE = 2
SHB_OS = 3
SHB_USERAPPL = 4
IF_NAME = 2
IF_DESCRIPTION = 3
IF_TSRESOL = 9
IF_FILTER = 11
IF_TSOFFSET = 14
EPB_FLAGS = 2
EPB_DROPCOUNT = 4
ISB_STARTTIME = 2
ISB_ENDTIME = 3
ISB_IFRECV = 4
ISB_IFDROP = 5
ISB_FILTERACCEPT = 6

EPB_FLAG_INBOUND = 1  # bits 0-1 of epb_flags: 01 = inbound
KEY_OPTION_PEN = 32473  # RFC 5612 example PEN, see the module docstring
FILTER_TYPE_STRING = 0  # first octet of if_filter: the filter as text

_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_NS_PER_SECOND = 1_000_000_000
_MAX_OPTION_LENGTH = 0xFFFF

# Zero bytes that pad a field of length n to 32 bits, indexed by n % 4.
_PADDING = (b"", b"\0\0\0", b"\0\0", b"\0")

# ---------------------------------------------------------------------------------------------
# Writing (little-endian)

_pack_block_head = struct.Struct("<II").pack  # block type, total length
_pack_u32 = struct.Struct("<I").pack
_pack_u64 = struct.Struct("<Q").pack
_pack_option_head = struct.Struct("<HH").pack
_pack_timestamp = struct.Struct("<II").pack  # upper, lower 32 bits
_pack_shb_fields = struct.Struct("<IHHq").pack
_pack_idb_fields = struct.Struct("<HHI").pack
_pack_isb_fields = struct.Struct("<III").pack
_pack_epb_head = struct.Struct("<IIIIIII").pack  # type, length, if id, ts hi, ts lo, cap, orig
_pack_dropcount = struct.Struct("<HHQ").pack
_pack_endofopt_and_length = struct.Struct("<4xI").pack  # opt_endofopt (4 zero bytes), length

_EPB_FIXED = 32  # 28-byte header and the 4-byte trailing length
_ENDOFOPT = b"\0\0\0\0"

# The pieces of an EPB with options, for a hot path that appends a batch's blocks to one
# buffer: pack_epb_head(BLOCK_EPB, total, if_id, ts_hi, ts_lo, caplen, orig_len), the
# packet, PADDING[caplen & 3], the options (commented_key_options, comment_option, ...),
# then pack_options_end(total): opt_endofopt and the block's trailing length, where
# total = EPB_WITH_OPTIONS_FIXED + caplen + len(padding) + len(options).
EPB_WITH_OPTIONS_FIXED = _EPB_FIXED + len(_ENDOFOPT)
PADDING = _PADDING
pack_epb_head = _pack_epb_head
pack_options_end = _pack_endofopt_and_length


def _encode_text(text: str | bytes) -> bytes:
    # pcapng strings must be valid UTF-8; lone surrogates (from undecodable names) are shown
    # as backslash escapes rather than refused.
    if isinstance(text, bytes):
        return text
    return text.encode("utf-8", "backslashreplace")


def _option(code: int, value: bytes) -> bytes:
    if len(value) > _MAX_OPTION_LENGTH:
        raise ValueError(
            f"pcapng option {code} is {len(value)} bytes, over the {_MAX_OPTION_LENGTH} limit"
        )
    return _pack_option_head(code, len(value)) + value + _PADDING[len(value) & 3]


def _block(block_type: int, body: bytes) -> bytes:
    """Frame a body (already padded to 32 bits) as a block."""
    total = 12 + len(body)
    return _pack_block_head(block_type, total) + body + _pack_u32(total)


def _text_options(*pairs: tuple[int, str | bytes | None]) -> bytes:
    return b"".join(_option(code, _encode_text(text)) for code, text in pairs if text is not None)


def _split_timestamp(timestamp: int) -> bytes:
    return _pack_timestamp(timestamp >> 32, timestamp & 0xFFFFFFFF)


def section_header(*, userappl: str, os: str, hardware: str, comment: str | None = None) -> bytes:
    """A Section Header Block, version 1.0, little-endian, section length unspecified."""
    options = _text_options(
        (OPT_COMMENT, comment), (SHB_HARDWARE, hardware), (SHB_OS, os), (SHB_USERAPPL, userappl)
    )
    return _block(BLOCK_SHB, _pack_shb_fields(_BYTE_ORDER_MAGIC, 1, 0, -1) + options + _ENDOFOPT)


_TSRESOL_NANOSECONDS = _option(IF_TSRESOL, b"\x09")


def interface_description(
    linktype: int,
    snaplen: int,
    *,
    name: str,
    description: str | None = None,
    filter: str | None = None,
) -> bytes:
    """An Interface Description Block with nanosecond timestamps (if_tsresol=9).

    `filter` is stored in if_filter as text (filter type 0); Wireshark shows it as the
    capture filter.
    """
    options = _text_options((IF_NAME, name), (IF_DESCRIPTION, description))
    if filter is not None:
        options += _option(IF_FILTER, bytes((FILTER_TYPE_STRING,)) + _encode_text(filter))
    fields = _pack_idb_fields(linktype, 0, snaplen)
    return _block(BLOCK_IDB, fields + options + _TSRESOL_NANOSECONDS + _ENDOFOPT)


_INBOUND_OPTION = _option(EPB_FLAGS, _pack_u32(EPB_FLAG_INBOUND))
_KEY_OPTION_PEN = _pack_u32(KEY_OPTION_PEN)
MASK_TAG = b"\xffmsk"
OUTCOME_TAG = b"\xffout"
KEY_TAG = b"\xffkey"  # before a key that starts with 0xff, as the tags do
_OTHER_TAGS = (MASK_TAG, OUTCOME_TAG)
_TAG_START = 0xFF


def _key_value(key: bytes | memoryview) -> bytes | memoryview:
    """What follows the PEN in a key's option: the key, after KEY_TAG if it starts with
    0xff."""
    return KEY_TAG + key if key and key[0] == _TAG_START else key


def mask_option(mask: bytes) -> bytes:
    """The custom option that holds a flow put's megaflow mask."""
    return _option(OPT_CUSTOM_BINARY, _KEY_OPTION_PEN + MASK_TAG + mask)


def raw_outcome_option(trailer: bytes) -> bytes:
    """The custom option that holds an outcome not decoded (record.py's OUTCOME trailer)."""
    return _option(OPT_CUSTOM_BINARY, _KEY_OPTION_PEN + OUTCOME_TAG + trailer)


def dropcount_option(dropped: int) -> bytes:
    """The epb_dropcount option: records lost on this interface since its previous packet."""
    return _pack_dropcount(EPB_DROPCOUNT, 8, dropped)


def packet_options(
    *,
    comment: str | bytes | None = None,
    inbound: bool = True,
    dropcount: int | None = None,
    key: bytes | None = None,
    more_comments: tuple[str | bytes, ...] = (),
    mask: bytes | None = None,
) -> bytes:
    """Encoded EPB options without the closing opt_endofopt, for `enhanced_packet`.

    A bytes `comment` must already be UTF-8. `inbound=False` omits epb_flags (direction not
    stated) rather than claiming outbound. `key` and `mask` are stored in the custom options
    described in the module docstring; `more_comments` follow the first, each an option.
    """
    parts = []
    if comment is not None:
        parts.append(_option(OPT_COMMENT, _encode_text(comment)))
    if inbound:
        parts.append(_INBOUND_OPTION)
    if dropcount is not None:
        parts.append(dropcount_option(dropcount))
    if key is not None:
        parts.append(_option(OPT_CUSTOM_BINARY, _KEY_OPTION_PEN + _key_value(key)))
    parts += (_option(OPT_COMMENT, _encode_text(text)) for text in more_comments)
    if mask is not None:
        parts.append(mask_option(mask))
    return b"".join(parts)


def comment_option(comment: bytes, tail: bytes = b"", after: bytes = b"") -> bytes:
    """An opt_comment of UTF-8 bytes (`comment` and then `tail`), padded: one more comment
    for a packet's options; `after` follows it. In one join: the outcome comment of every
    upcall in a storm is built so (its text and its handling time, then a put's mask)."""
    length = len(comment) + len(tail)
    return b"".join((_pack_option_head(OPT_COMMENT, length), comment, tail,
                     _PADDING[length & 3], after))


def commented_key_options(comment: bytes, key: bytes | memoryview, tail: bytes = b"") -> bytes:
    """A commented, inbound packet's options with its key; the comment is `comment` and
    then `tail`, UTF-8 already. The same bytes as packet_options(comment=..., key=...),
    in one join: a storm of new flows builds every upcall's so (the comment's first line,
    then the key's text)."""
    length = len(comment) + len(tail)
    key = _key_value(key)
    if length > _MAX_OPTION_LENGTH or len(key) + 4 > _MAX_OPTION_LENGTH:
        raise ValueError("pcapng option over the 65535-byte limit")
    return b"".join((
        _pack_option_head(OPT_COMMENT, length), comment, tail, _PADDING[length & 3],
        _INBOUND_OPTION, _pack_option_head(OPT_CUSTOM_BINARY, len(key) + 4),
        _KEY_OPTION_PEN, key, _PADDING[len(key) & 3]))


def commented_key_options_around(comment: bytes, key_length: int) -> tuple[bytes, bytes]:
    """commented_key_options()'s bytes before and after a key of `key_length` bytes that
    does not start with 0xff (KEY_TAG): the same for every key of a shape, so a packet's
    can be cached."""
    options = commented_key_options(comment, bytes(key_length))
    after = _PADDING[key_length & 3]
    return options[:len(options) - key_length - len(after)], after


def enhanced_packet(
    interface_id: int, timestamp_ns: int, data: bytes, orig_len: int, options: bytes = b""
) -> bytes:
    """An Enhanced Packet Block; `options` comes from `packet_options` (+ `dropcount_option`).

    The timestamp is in the interface's units: nanoseconds for interfaces made here.
    """
    caplen = len(data)
    if orig_len < caplen:
        raise ValueError(f"original length {orig_len} is less than captured length {caplen}")
    pad = _PADDING[caplen & 3]
    try:
        if options:
            total = _EPB_FIXED + caplen + len(pad) + len(options) + 4
            tail = _pack_endofopt_and_length(total)
        else:
            total = _EPB_FIXED + caplen + len(pad)
            tail = _pack_u32(total)
        head = _pack_epb_head(
            BLOCK_EPB,
            total,
            interface_id,
            timestamp_ns >> 32,
            timestamp_ns & 0xFFFFFFFF,
            caplen,
            orig_len,
        )
    except struct.error as err:
        raise ValueError(f"enhanced packet field out of range: {err}") from None
    return b"".join((head, data, pad, options, tail))


_unpack_block_head = struct.Struct("<II").unpack_from
_unpack_u32 = struct.Struct("<I").unpack_from
_pack_into_u32 = struct.Struct("<I").pack_into


def block_spans(buf: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, int]]:
    """(block type, offset, total length) of each block in little-endian blocks that this
    module wrote: framing only, not checked (iter_blocks reads any file)."""
    pos, end = 0, len(buf)
    while pos + 8 <= end:
        block_type, length = _unpack_block_head(buf, pos)
        yield block_type, pos, length
        pos += length


def epb_interface(block: bytes | memoryview) -> int:
    """The interface id of an enhanced packet block written here."""
    return _unpack_u32(block, 8)[0]


def with_epb_interface(block: bytes | memoryview, interface_id: int) -> bytearray:
    """The enhanced packet block on another interface."""
    moved = bytearray(block)
    _pack_into_u32(moved, 8, interface_id)
    return moved


def interface_statistics(
    interface_id: int,
    timestamp_ns: int,
    *,
    received: int,
    dropped: int,
    filter_accept: int | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
    comment: str | None = None,
) -> bytes:
    """An Interface Statistics Block; times in the interface's units (nanoseconds here).

    received -> isb_ifrecv, dropped -> isb_ifdrop, filter_accept -> isb_filteraccept,
    start_ns/end_ns -> isb_starttime/isb_endtime.
    """
    options = [_text_options((OPT_COMMENT, comment))]
    if start_ns is not None:
        options.append(_option(ISB_STARTTIME, _split_timestamp(start_ns)))
    if end_ns is not None:
        options.append(_option(ISB_ENDTIME, _split_timestamp(end_ns)))
    options.append(_option(ISB_IFRECV, _pack_u64(received)))
    options.append(_option(ISB_IFDROP, _pack_u64(dropped)))
    if filter_accept is not None:
        options.append(_option(ISB_FILTERACCEPT, _pack_u64(filter_accept)))
    fields = _pack_isb_fields(interface_id, timestamp_ns >> 32, timestamp_ns & 0xFFFFFFFF)
    return _block(BLOCK_ISB, fields + b"".join(options) + _ENDOFOPT)


# ---------------------------------------------------------------------------------------------
# Reading (either byte order)


class PcapngError(ValueError):
    """The bytes are not well-formed pcapng; `offset` is where the faulty block starts."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"pcapng block at offset {offset}: {reason}")
        self.offset = offset
        self.reason = reason


class TruncatedBlock(PcapngError):
    """The buffer ends inside a block (a file still being written, or cut short)."""


Options = dict[int, list[bytes]]


def _text(values: list[bytes] | None) -> str | None:
    # Strings are not zero-terminated, but a reader must stop at a zero octet if there is one.
    if not values:
        return None
    return values[0].split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Block:
    """Any block: its type, where it starts, its total length and its raw options.

    Options map a code to the raw values (without padding) in file order. Blocks of types
    this reader does not parse come as plain `Block`s with no options.
    """

    type: int
    offset: int
    length: int
    options: Options

    @property
    def comments(self) -> list[str]:
        return [_text([value]) or "" for value in self.options.get(OPT_COMMENT, [])]


@dataclass(frozen=True, slots=True)
class SectionHeader(Block):
    big_endian: bool
    version: tuple[int, int]
    section_length: int  # -1 when not specified

    @property
    def hardware(self) -> str | None:
        return _text(self.options.get(SHB_HARDWARE))

    @property
    def os(self) -> str | None:
        return _text(self.options.get(SHB_OS))

    @property
    def userappl(self) -> str | None:
        return _text(self.options.get(SHB_USERAPPL))


@dataclass(frozen=True, slots=True)
class InterfaceDescription(Block):
    interface_id: int  # its index within the section
    linktype: int
    snaplen: int
    units_per_second: int  # from if_tsresol (10**6 when absent)
    tsoffset: int  # if_tsoffset, seconds

    @property
    def name(self) -> str | None:
        return _text(self.options.get(IF_NAME))

    @property
    def description(self) -> str | None:
        return _text(self.options.get(IF_DESCRIPTION))

    @property
    def filter(self) -> str | None:
        """The if_filter text when it is a filter string (type 0), else None."""
        values = self.options.get(IF_FILTER)
        if not values or values[0][:1] != bytes((FILTER_TYPE_STRING,)):
            return None
        return _text([values[0][1:]])

    def to_ns(self, timestamp: int) -> int:
        """A timestamp in this interface's units as nanoseconds since the epoch."""
        offset_ns = self.tsoffset * _NS_PER_SECOND
        if self.units_per_second == _NS_PER_SECOND:
            return timestamp + offset_ns
        return timestamp * _NS_PER_SECOND // self.units_per_second + offset_ns


@dataclass(frozen=True, slots=True)
class Packet(Block):
    """An Enhanced Packet Block, or a Simple Packet Block (no timestamp, no options)."""

    interface_id: int
    timestamp_ns: int | None
    data: bytes
    orig_len: int
    flags: int | None  # epb_flags
    dropcount: int | None  # epb_dropcount
    key: bytes | None  # the raw flow key from our custom option

    @property
    def inbound(self) -> bool:
        return self.flags is not None and self.flags & 3 == EPB_FLAG_INBOUND

    @property
    def mask(self) -> bytes | None:
        """A flow put's megaflow mask, from our custom option."""
        return self._tagged(MASK_TAG)

    @property
    def raw_outcome(self) -> bytes | None:
        """An outcome the capture did not decode, from our custom option."""
        return self._tagged(OUTCOME_TAG)

    def _tagged(self, tag: bytes) -> bytes | None:
        # In our byte order: only our writer, little-endian, makes these.
        for value in self.options.get(OPT_CUSTOM_BINARY, ()):
            if value[:8] == _KEY_OPTION_PEN + tag:
                return bytes(value[8:])
        return None


@dataclass(frozen=True, slots=True)
class InterfaceStatistics(Block):
    interface_id: int
    timestamp_ns: int
    received: int | None  # isb_ifrecv
    dropped: int | None  # isb_ifdrop
    filter_accept: int | None  # isb_filteraccept
    start_ns: int | None  # isb_starttime
    end_ns: int | None  # isb_endtime


class _ByteOrder:
    """The structs that read one section's byte order."""

    def __init__(self, prefix: str) -> None:
        self.big_endian = prefix == ">"
        self.u32 = struct.Struct(prefix + "I").unpack_from
        self.u64 = struct.Struct(prefix + "Q").unpack_from
        self.i64 = struct.Struct(prefix + "q").unpack_from
        self.pair = struct.Struct(prefix + "II").unpack_from  # block head; timestamp hi/lo
        self.option_head = struct.Struct(prefix + "HH").unpack_from
        self.shb = struct.Struct(prefix + "HHq").unpack_from
        self.idb = struct.Struct(prefix + "HHI").unpack_from
        self.epb = struct.Struct(prefix + "IIIII").unpack_from
        self.isb = struct.Struct(prefix + "III").unpack_from


_LITTLE = _ByteOrder("<")
_BIG = _ByteOrder(">")
_SHB_TYPE_BYTES = _pack_u32(BLOCK_SHB)  # a palindrome: the same in either byte order
_MAGIC_BYTES = {_pack_u32(_BYTE_ORDER_MAGIC): _LITTLE, struct.pack(">I", _BYTE_ORDER_MAGIC): _BIG}

# Smallest total length of each parsed block type: 12 bytes of framing plus fixed fields.
_MIN_LENGTH = {BLOCK_SHB: 28, BLOCK_IDB: 20, BLOCK_EPB: 32, BLOCK_SPB: 16, BLOCK_ISB: 24}
# Options read as numbers must have exactly this length.
_FIXED_OPTION_LENGTH = {
    BLOCK_IDB: {IF_TSRESOL: 1, IF_TSOFFSET: 8},
    BLOCK_EPB: {EPB_FLAGS: 4, EPB_DROPCOUNT: 8},
    BLOCK_ISB: {
        ISB_STARTTIME: 8,
        ISB_ENDTIME: 8,
        ISB_IFRECV: 8,
        ISB_IFDROP: 8,
        ISB_FILTERACCEPT: 8,
    },
}


class _Section:
    def __init__(self, order: _ByteOrder) -> None:
        self.order = order
        self.interfaces: list[InterfaceDescription] = []

    def interface(self, interface_id: int, offset: int) -> InterfaceDescription:
        if interface_id >= len(self.interfaces):
            raise PcapngError(offset, f"refers to interface {interface_id}, which is not defined")
        return self.interfaces[interface_id]


def _parse_options(
    body: memoryview, start: int, order: _ByteOrder, block_type: int, offset: int
) -> Options:
    options: Options = {}
    fixed = _FIXED_OPTION_LENGTH.get(block_type, {})
    pos, end = start, len(body)
    while end - pos >= 4:
        code, length = order.option_head(body, pos)
        if code == OPT_ENDOFOPT:
            break
        pos += 4
        if length > end - pos:
            raise PcapngError(offset, f"option {code} runs past the end of the block")
        if fixed.get(code, length) != length:
            raise PcapngError(offset, f"option {code} has length {length}, not {fixed[code]}")
        options.setdefault(code, []).append(bytes(body[pos : pos + length]))
        pos += (length + 3) & ~3
    return options


def _option_u64(options: Options, code: int, order: _ByteOrder) -> int | None:
    values = options.get(code)
    return order.u64(values[0])[0] if values else None


def _option_timestamp(options: Options, code: int, order: _ByteOrder) -> int | None:
    values = options.get(code)
    if not values:
        return None
    upper, lower = order.pair(values[0])
    return upper << 32 | lower


def _our_key(options: Options, order: _ByteOrder) -> bytes | None:
    for value in options.get(OPT_CUSTOM_BINARY, ()):
        if len(value) >= 4 and order.u32(value)[0] == KEY_OPTION_PEN:
            tag = value[4:8]
            if tag == KEY_TAG:
                return value[8:]
            if tag not in _OTHER_TAGS:  # files before KEY_TAG have unescaped keys too
                return value[4:]
    return None


def _read_section_header(
    body: memoryview, offset: int, length: int, order: _ByteOrder
) -> tuple[Block, _Section]:
    major, minor, section_length = order.shb(body, 4)
    if major != 1:
        raise PcapngError(offset, f"unsupported pcapng version {major}.{minor}")
    options = _parse_options(body, 16, order, BLOCK_SHB, offset)
    block = SectionHeader(
        BLOCK_SHB, offset, length, options, order.big_endian, (major, minor), section_length
    )
    return block, _Section(order)


def _read_interface(body: memoryview, offset: int, length: int, section: _Section) -> Block:
    order = section.order
    linktype, _reserved, snaplen = order.idb(body, 0)
    options = _parse_options(body, 8, order, BLOCK_IDB, offset)
    units_per_second = 10**6
    if IF_TSRESOL in options:
        resolution = options[IF_TSRESOL][0][0]
        exponent = resolution & 0x7F
        units_per_second = 2**exponent if resolution & 0x80 else 10**exponent
    tsoffset = 0
    if IF_TSOFFSET in options:
        tsoffset = order.i64(options[IF_TSOFFSET][0])[0]
    block = InterfaceDescription(
        BLOCK_IDB,
        offset,
        length,
        options,
        len(section.interfaces),
        linktype,
        snaplen,
        units_per_second,
        tsoffset,
    )
    section.interfaces.append(block)
    return block


def _read_enhanced_packet(body: memoryview, offset: int, length: int, section: _Section) -> Block:
    order = section.order
    interface_id, upper, lower, caplen, orig_len = order.epb(body, 0)
    if caplen > len(body) - 20:
        raise PcapngError(offset, f"captured length {caplen} runs past the end of the block")
    interface = section.interface(interface_id, offset)
    options = _parse_options(body, 20 + ((caplen + 3) & ~3), order, BLOCK_EPB, offset)
    flags = options.get(EPB_FLAGS)
    return Packet(
        BLOCK_EPB,
        offset,
        length,
        options,
        interface_id,
        interface.to_ns(upper << 32 | lower),
        bytes(body[20 : 20 + caplen]),
        orig_len,
        order.u32(flags[0])[0] if flags else None,
        _option_u64(options, EPB_DROPCOUNT, order),
        _our_key(options, order),
    )


def _read_simple_packet(body: memoryview, offset: int, length: int, section: _Section) -> Block:
    (orig_len,) = section.order.u32(body, 0)
    snaplen = section.interface(0, offset).snaplen
    caplen = min(orig_len, len(body) - 4, snaplen or orig_len)
    return Packet(
        BLOCK_SPB,
        offset,
        length,
        {},
        0,
        None,
        bytes(body[4 : 4 + caplen]),
        orig_len,
        None,
        None,
        None,
    )


def _read_statistics(body: memoryview, offset: int, length: int, section: _Section) -> Block:
    order = section.order
    interface_id, upper, lower = order.isb(body, 0)
    interface = section.interface(interface_id, offset)
    options = _parse_options(body, 12, order, BLOCK_ISB, offset)
    start = _option_timestamp(options, ISB_STARTTIME, order)
    end = _option_timestamp(options, ISB_ENDTIME, order)
    return InterfaceStatistics(
        BLOCK_ISB,
        offset,
        length,
        options,
        interface_id,
        interface.to_ns(upper << 32 | lower),
        _option_u64(options, ISB_IFRECV, order),
        _option_u64(options, ISB_IFDROP, order),
        _option_u64(options, ISB_FILTERACCEPT, order),
        None if start is None else interface.to_ns(start),
        None if end is None else interface.to_ns(end),
    )


_READERS = {
    BLOCK_IDB: _read_interface,
    BLOCK_EPB: _read_enhanced_packet,
    BLOCK_SPB: _read_simple_packet,
    BLOCK_ISB: _read_statistics,
}


def iter_blocks(buf: bytes | bytearray | memoryview) -> Iterator[Block]:
    """Yield each block of a pcapng buffer in order, sections of either byte order.

    Raises TruncatedBlock when the buffer ends inside a block, after yielding every complete
    block before it, and PcapngError on a malformed block. Timestamps come as nanoseconds
    since the epoch, whatever the interface's if_tsresol and if_tsoffset.
    """
    view = memoryview(buf).cast("B")
    end = len(view)
    pos = 0
    section: _Section | None = None
    while pos < end:
        available = end - pos
        if view[pos : pos + min(4, available)] == _SHB_TYPE_BYTES[:available]:
            if available < 12:
                raise TruncatedBlock(pos, "the buffer ends inside the section header")
            order = _MAGIC_BYTES.get(bytes(view[pos + 8 : pos + 12]))
            if order is None:
                raise PcapngError(pos, "section header without a valid byte-order magic")
        elif section is None:
            raise PcapngError(pos, "not pcapng: no section header block at the start")
        else:
            order = section.order
        if available < 8:
            raise TruncatedBlock(pos, "the buffer ends inside the block header")
        block_type, length = order.pair(view, pos)
        if length < _MIN_LENGTH.get(block_type, 12) or length % 4:
            raise PcapngError(pos, f"invalid total length {length} for block type {block_type:#x}")
        if length > available:
            raise TruncatedBlock(pos, f"the buffer ends {length - available} bytes short")
        if order.u32(view, pos + length - 4)[0] != length:
            raise PcapngError(pos, "trailing block length differs from the leading one")
        body = view[pos + 8 : pos + length - 4]
        if block_type == BLOCK_SHB:
            block, section = _read_section_header(body, pos, length, order)
        elif (reader := _READERS.get(block_type)) is not None:
            assert section is not None  # set by the first block, which must be an SHB
            block = reader(body, pos, length, section)
        else:
            block = Block(block_type, pos, length, {})
        yield block
        pos += length


def complete_length(buf: bytes | bytearray | memoryview) -> int:
    """Length of the leading run of complete, well-formed blocks: where to truncate a file
    whose last write was cut short. 0 when the buffer does not start with a section header."""
    good = 0
    try:
        for block in iter_blocks(buf):
            good = block.offset + block.length
    except PcapngError:
        pass
    return good
