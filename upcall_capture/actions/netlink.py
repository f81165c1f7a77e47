"""Netlink attribute walking as OVS's lib/netlink does it, over offsets into one buffer.

Every offset is into the whole action list. Reads past the end of an attribute see
the bytes that follow it, as OVS's do (it trusts some lengths); reads past the end of
the buffer see zeros, where OVS would read whatever memory follows.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

_HEADER = struct.Struct("<HH")
_TYPE_MASK = 0x3FFF  # nla_type without NLA_F_NESTED and NLA_F_NET_BYTEORDER


def read(data: bytes, offset: int, size: int) -> bytes:
    """`size` bytes at `offset`, zero-filled past the end of `data`."""
    chunk = data[offset : offset + size] if offset >= 0 else b""
    return chunk + bytes(size - len(chunk)) if len(chunk) < size else chunk


class Attr(NamedTuple):  # a tuple: cheaper to make than a dataclass, and texts make many
    type: int
    offset: int  # of the payload
    size: int

    def payload(self, data: bytes) -> bytes:
        return read(data, self.offset, self.size)


def header_at(data: bytes, offset: int) -> tuple[int, int]:
    """(nla_len, type) of the header at `offset`."""
    nla_len, nla_type = _HEADER.unpack(read(data, offset, 4))
    return nla_len, nla_type & _TYPE_MASK


def walk(data: bytes, start: int, length: int) -> tuple[list[Attr], int, int]:
    """NL_ATTR_FOR_EACH over `length` bytes at `start`: the well-formed attributes,
    then the offset where the walk stopped and the bytes left there."""
    found: list[Attr] = []
    pos, left = start, length
    last_header = len(data) - 4  # a header at or before it is whole: no zero-filling
    while left >= 4:
        if 0 <= pos <= last_header:
            nla_len, nla_type = _HEADER.unpack_from(data, pos)
            nla_type &= _TYPE_MASK
        else:
            nla_len, nla_type = header_at(data, pos)
        if nla_len < 4 or nla_len > left:
            break
        found.append(Attr(nla_type, pos + 4, nla_len - 4))
        padded = (nla_len + 3) & ~3
        # OVS steps over the padding even when the list ends without it.
        left -= padded if padded <= left else nla_len
        pos += padded
    return found, pos, left


def first_of_each(data: bytes, start: int, length: int) -> dict[int, Attr]:
    """nl_attr_find__() of every type, from one walk: the first attribute of each."""
    found: dict[int, Attr] = {}
    for attr in walk(data, start, length)[0]:
        found.setdefault(attr.type, attr)
    return found


@dataclass(frozen=True, slots=True)
class Rule:
    """One nl_policy entry: allowed payload lengths; strings must be NUL-terminated
    and hold no other NUL."""

    min_len: int = 0
    max_len: int | None = None
    string: bool = False
    optional: bool = True

    def accepts(self, data: bytes, attr: Attr) -> bool:
        if attr.size < self.min_len or (self.max_len is not None and attr.size > self.max_len):
            return False
        if self.string:
            text = attr.payload(data)
            return text[-1] == 0 and 0 not in text[:-1]
        return True


FLAG = Rule()
U16 = Rule(2, 2)
U32 = Rule(4, 4)
ANY = Rule()


def parse_nested(data: bytes, attr: Attr, policy: dict[int, Rule]) -> dict[int, Attr] | None:
    """nl_parse_nested(): the last attribute of each type in `policy`, or None when one
    breaks its rule, bytes follow the attributes, or a required one is missing."""
    attrs, _, left = walk(data, attr.offset, attr.size)
    found: dict[int, Attr] = {}
    for sub in attrs:
        rule = policy.get(sub.type)
        if rule is None:
            continue
        if not rule.accepts(data, sub):
            return None
        found[sub.type] = sub
    if left or any(not rule.optional and t not in found for t, rule in policy.items()):
        return None
    return found


def c_string(data: bytes, attr: Attr) -> str:
    """A NUL-terminated payload as text; bytes that are not UTF-8 are kept as surrogate
    escapes, so `.encode('utf-8', 'surrogateescape')` gives back OVS's bytes."""
    return attr.payload(data)[:-1].decode("utf-8", "surrogateescape")
