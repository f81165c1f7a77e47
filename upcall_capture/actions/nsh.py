"""NSH: the key (set(nsh(...)) with or without a mask) and push_nsh()'s header."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from upcall_capture.actions.netlink import Attr, header_at, walk
from upcall_capture.flowkey.layouts import hex_int

BASE, MD1, MD2 = 1, 2, 3
NSH_MDTYPE1, NSH_MDTYPE2 = 1, 2
_LENGTHS = {0: 0, BASE: 8, MD1: 16}  # MD2 is variable; types above it are unknown
_CONTEXT_MAX = 244  # NSH_CTX_HDRS_MAX_LEN: the room push_nsh() has for metadata


@dataclass
class NshKey:
    """struct ovs_key_nsh."""

    flags: int = 0
    ttl: int = 0
    mdtype: int = 0
    np: int = 0
    path: int = 0
    context: tuple[int, ...] = (0, 0, 0, 0)

    @classmethod
    def all_ones(cls) -> NshKey:
        return cls(0xFF, 0xFF, 0xFF, 0xFF, 0xFFFFFFFF, (0xFFFFFFFF,) * 4)

    def update(self, attr_type: int, payload: bytes) -> None:
        if attr_type == BASE:
            self.flags, self.ttl, self.mdtype, self.np, self.path = struct.unpack(
                ">BBBBI", payload[:8])
        elif attr_type == MD1:
            self.context = struct.unpack(">4I", payload[:16])

    def text(self) -> str:
        """format_nsh_key()."""
        text = (f"flags={self.flags},ttl={self.ttl},mdtype={self.mdtype},np={self.np},"
                f"spi=0x{self.path >> 8:x},si={self.path & 0xFF}")
        if self.mdtype == NSH_MDTYPE1:
            text += "".join(f",c{i}=0x{c:x}" for i, c in enumerate(self.context, 1))
        return text

    def masked_text(self, mask: NshKey) -> str:
        """format_nsh_key_mask(): fields with a zero mask left out."""
        spi_mask = mask.path >> 8
        parts = [
            _u8("flags", self.flags, mask.flags),
            _u8("ttl", self.ttl, mask.ttl),
            _u8("mdtype", self.mdtype, mask.mdtype),
            _u8("np", self.np, mask.np),
            _be32("spi", self.path >> 8, 0xFFFFFFFF if spi_mask == 0xFFFFFF else spi_mask),
            _u8("si", self.path & 0xFF, mask.path & 0xFF),
        ]
        parts += [_be32(f"c{i}", c, m)
                  for i, (c, m) in enumerate(zip(self.context, mask.context, strict=True), 1)]
        return ",".join(p for p in parts if p)


def _u8(name: str, value: int, mask: int) -> str:
    if not mask:
        return ""
    return f"{name}={value}" if mask == 0xFF else f"{name}=0x{value:02x}/0x{mask:02x}"


def _be32(name: str, value: int, mask: int) -> str:
    if not mask:
        return ""
    return f"{name}=0x{value:x}" if mask == 0xFFFFFFFF else f"{name}=0x{value:x}/0x{mask:08x}"


def set_nsh_text(data: bytes, attr: Attr) -> str:
    """format_odp_set_nsh(): a masked NSH key (each sub-attribute holds value then mask).
    OVS prints nothing at all for a sub-attribute it does not expect."""
    nsh, mask = NshKey(), NshKey.all_ones()
    for sub in walk(data, attr.offset, attr.size)[0]:
        if sub.type >= MD2 or (sub.type in _LENGTHS and sub.size != 2 * _LENGTHS[sub.type]):
            return ""
        half = sub.size // 2
        payload = sub.payload(data)
        nsh.update(sub.type, payload[:half])
        mask.update(sub.type, payload[half:])
    return f"set(nsh({nsh.masked_text(mask)}))"


@dataclass
class _NshHeader:
    """The struct nsh_hdr that odp_nsh_hdr_from_attr() fills, as far as it gets."""

    flags: int = 0
    ttl: int = 0
    length: int = 0  # bytes, as the header's 6-bit word count gives it
    mdtype: int = 0
    np: int = 0
    path: int = 0
    metadata: bytearray = field(default_factory=lambda: bytearray(_CONTEXT_MAX))


def _nsh_header(data: bytes, attr: Attr) -> _NshHeader:
    """odp_nsh_hdr_from_attr() of the key attribute (OVS_KEY_ATTR_NSH, whatever its
    type) that opens the action. On any failure it returns early and leaves the length,
    flags and TTL zero; push_nsh() prints the header anyway."""
    hdr = _NshHeader()
    flags, ttl, mdlen = 0, 63, 0
    has_md1 = has_md2 = unknown = False
    nla_len, _ = header_at(data, attr.offset)
    for sub in walk(data, attr.offset + 4, max(nla_len - 4, 0))[0]:
        expected = _LENGTHS.get(sub.type, -1 if sub.type > MD2 else -2)
        if expected >= 0 and sub.size != expected:
            return hdr
        payload = sub.payload(data)
        if sub.type == BASE:
            flags, ttl, hdr.mdtype, hdr.np, hdr.path = struct.unpack(">BBBBI", payload)
        elif sub.type in (MD1, MD2):
            has_md1 |= sub.type == MD1
            has_md2 |= sub.type == MD2
            mdlen = sub.size
            if mdlen > _CONTEXT_MAX:
                return hdr
            hdr.metadata[:mdlen] = payload
        else:
            unknown = True
    if unknown or (has_md1 and hdr.mdtype != NSH_MDTYPE1) or (
            has_md2 and hdr.mdtype != NSH_MDTYPE2):
        return hdr
    hdr.flags, hdr.ttl = flags & 3, ttl & 0x3F
    hdr.length = ((8 + mdlen) >> 2 & 0x3F) << 2
    return hdr


def push_nsh_text(data: bytes, attr: Attr) -> str:
    hdr = _nsh_header(data, attr)
    text = (f"push_nsh(flags={hdr.flags},ttl={hdr.ttl},mdtype={hdr.mdtype},np={hdr.np},"
            f"spi=0x{hdr.path >> 8:x},si={hdr.path & 0xFF}")
    if hdr.mdtype == NSH_MDTYPE1:
        context = struct.unpack(">4I", hdr.metadata[:16])
        text += "".join(f",c{i}=0x{c:x}" for i, c in enumerate(context, 1))
    elif hdr.mdtype == NSH_MDTYPE2:
        # A failed parse leaves length 0, where OVS would read ~2**64 bytes and crash.
        mdlen = max(hdr.length - 8, 0)
        text += ",md2=" + hex_int(int.from_bytes(hdr.metadata[:mdlen], "big"))
    else:
        text += ",<error: unknown mdtype>"
    return text + ")"
