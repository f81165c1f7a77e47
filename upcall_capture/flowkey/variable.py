"""Payloads whose text depends on their values, not only on their layout.

Each formatter is `fn(data, fields, *args) -> text`: `data` is the whole key, the
args are offsets fixed by the key's shape, and `fields` (a dict, or None when only the
text is wanted) receives the structured values. Both the walker and the compiled
shape functions call these same functions.
"""

from __future__ import annotations

import struct

from upcall_capture.flowkey.layouts import Fields, hex_int

_ERSPAN = struct.Struct("<i")
_BE32 = struct.Struct(">I")
_NSH_BASE = struct.Struct(">BBBBI")
_NSH_MD1 = struct.Struct(">4I")
_NSH_NO_CONTEXT = (0, 0, 0, 0)
NSH_MDTYPE1 = 1


def _read_past(data: bytes, offset: int, size: int) -> bytes:
    """`size` bytes at `offset`, zero-filled past the key's end.

    OVS reads its fixed structs (erspan_metadata, gtpu_metadata) whatever the
    attribute's length; within the key that reads the following bytes, as here.
    """
    chunk = data[offset : offset + size]
    return chunk + bytes(size - len(chunk))


def spaced_hex(data: bytes, fields: Fields | None, offset: int, size: int) -> str:
    """Bytes as OVS's format_generic_odp_key() prints them: `01 02 03`."""
    return data[offset : offset + size].hex(" ")


def unknown_attr(data: bytes, fields: Fields | None, name: str, offset: int, size: int) -> str:
    """An attribute OVS prints as raw bytes; its payload is kept as field `name`."""
    payload = data[offset : offset + size]
    if fields is not None:
        fields[name] = payload
    return payload.hex(" ")


def plain_hex(data: bytes, fields: Fields | None, offset: int, size: int) -> str:
    """Leftover bytes, as OVS prints them: `0102ff`."""
    return data[offset : offset + size].hex()


def geneve_text(data: bytes, fields: Fields | None, offset: int, size: int) -> str:
    """Geneve options: `{class=..,type=..,len=N,0x..}` each, or OVS's error text."""
    if fields is not None:
        fields["tunnel.geneve"] = data[offset : offset + size]
    parts = []
    while size > 0:
        if size < 4:
            parts.append(f"opt len {size} less than minimum 4")
            break
        opt_class, opt_type, length_byte = struct.unpack_from(">HBB", data, offset)
        data_len = (length_byte & 0x1F) * 4
        opt_len = 4 + data_len
        if opt_len > size:
            parts.append(f"opt len {opt_len} greater than remaining {size}")
            break
        text = f"{{class={hex_int(opt_class)},type={hex_int(opt_type)},len={data_len}"
        if data_len:
            value = int.from_bytes(data[offset + 4 : offset + opt_len], "big")
            text += f",{hex_int(value)}"
        parts.append(text + "}")
        offset += opt_len
        size -= opt_len
    return "".join(parts)


def erspan_text(data: bytes, fields: Fields | None, offset: int) -> str:
    """ERSPAN metadata: an int version, then a be32 index (v1) or dir/hwid bits (v2)."""
    meta = _read_past(data, offset, 12)
    (version,) = _ERSPAN.unpack_from(meta)
    text = f"ver={version & 0xFF}"
    if fields is not None:
        fields["tunnel.erspan_ver"] = version & 0xFF
    if version == 1:
        (index,) = _BE32.unpack_from(meta, 4)
        text += f",idx={hex_int(index)}"
        if fields is not None:
            fields["tunnel.erspan_idx"] = index
    elif version == 2:
        # Little-endian bitfields of the md2 byte: o:1, gra:2, dir:1, hwid:4.
        bits = meta[11]
        direction, hwid = bits >> 3 & 1, bits >> 4
        text += f",dir={direction},hwid={hex_int(hwid)}"
        if fields is not None:
            fields["tunnel.erspan_dir"] = direction
            fields["tunnel.erspan_hwid"] = hwid
    return text


def gtpu_text(data: bytes, fields: Fields | None, offset: int) -> str:
    """GTP-U metadata: u8 flags, u8 message type."""
    flags, msgtype = _read_past(data, offset, 2)
    if fields is not None:
        fields["tunnel.gtpu_flags"] = flags
        fields["tunnel.gtpu_msgtype"] = msgtype
    return f"flags={hex_int(flags)},msgtype={msgtype}"


def nsh_text(data: bytes, fields: Fields | None, base_offset: int, md1_offset: int) -> str:
    """NSH from its last BASE and MD1 sub-attributes (-1: absent, all zero as in OVS)."""
    flags, ttl, mdtype, np, path = (
        _NSH_BASE.unpack_from(data, base_offset) if base_offset >= 0 else (0, 0, 0, 0, 0)
    )
    spi, si = path >> 8, path & 0xFF
    text = f"flags={flags},ttl={ttl},mdtype={mdtype},np={np},spi=0x{spi:x},si={si}"
    if fields is not None:
        fields.update(
            {
                "nsh.flags": flags,
                "nsh.ttl": ttl,
                "nsh.mdtype": mdtype,
                "nsh.np": np,
                "nsh.spi": spi,
                "nsh.si": si,
            }
        )
    if mdtype == NSH_MDTYPE1:
        context = _NSH_MD1.unpack_from(data, md1_offset) if md1_offset >= 0 else _NSH_NO_CONTEXT
        text += "".join(f",c{i}=0x{word:x}" for i, word in enumerate(context, 1))
        if fields is not None:
            fields.update({f"nsh.c{i}": word for i, word in enumerate(context, 1)})
    return text
