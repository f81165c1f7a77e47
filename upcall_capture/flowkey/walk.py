"""The general walk: netlink key bytes to a plan, and a plan to OVS's text.

The walk follows odp_flow_format() and its helpers in OVS's lib/odp-util.c, including
their treatment of malformed keys. It reads only attribute headers and produces a
`Plan`: literal text fixed by those headers, plus the places where values are printed
(a fixed `Layout` at an offset, or a formatter from `variable`). A plan therefore
depends only on the key's *shape*, which is what lets `shapes` compile it once and
reuse it for every key of the same shape.

ENCAP nests without limit, as in OVS (its formatter has no depth cap; only its text
parser does). The walk keeps its own stack instead of recursing, so depth costs memory
proportional to the key, never Python recursion.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from upcall_capture.flowkey import attrs
from upcall_capture.flowkey import layouts as lay
from upcall_capture.flowkey.layouts import Fields, Layout
from upcall_capture.flowkey.variable import (
    erspan_text,
    geneve_text,
    gtpu_text,
    nsh_text,
    plain_hex,
    spaced_hex,
    unknown_attr,
)

# Plan pieces are tuples tagged by their first item.
LITERAL = 0  # (LITERAL, text)
LAYOUT = 1  # (LAYOUT, layout, payload offset)
CALL = 2  # (CALL, formatter, args): formatter(data, fields, *args) -> text
CONST = 3  # (CONST, field name, value): a field fixed by the shape
MARKER = 4  # (MARKER,): the truncation marker, which names the key's real length

Piece = tuple[Any, ...]

_HEADER = struct.Struct("<I").unpack_from
_TYPE_MASK = 0x3FFF  # the top two bits of nla_type are flags (NLA_F_NESTED, NLA_F_NET_BYTEORDER)


def truncation_marker(captured: int, full_len: int) -> str:
    return f"<key truncated: captured {captured} of {full_len} bytes>"


@dataclass
class Plan:
    """What to print for one key shape. `headers` are the (offset, u32) of every
    attribute header the walk read: equal headers at equal offsets, in a key of equal
    captured length, give an equal plan."""

    captured: int
    truncated: bool
    pieces: list[Piece] = field(default_factory=list)
    headers: list[tuple[int, int]] = field(default_factory=list)

    @property
    def signature(self) -> tuple[Any, ...]:
        return (self.captured, self.truncated, tuple(self.headers))


@dataclass
class _Frame:
    """One level of key attributes: the top level or the inside of an encap()."""

    attributes: Iterator[tuple[int, int, int]]
    start: int
    end: int
    first: bool = True


class _Planner:
    def __init__(self, data: bytes, full_len: int) -> None:
        self.data = data
        self.full_len = full_len
        self.plan = Plan(len(data), full_len > len(data))
        self.pieces = self.plan.pieces

    # -- building blocks -------------------------------------------------------------

    def literal(self, text: str) -> None:
        self.pieces.append((LITERAL, text))

    def layout(self, layout: Layout, offset: int) -> None:
        self.pieces.append((LAYOUT, layout, offset))

    def call(self, formatter: Callable[..., str], *args: Any) -> None:
        self.pieces.append((CALL, formatter, args))

    def chomp(self) -> None:
        """OVS's ds_chomp(ds, ','): drop one trailing comma."""
        kind, *rest = self.pieces[-1]
        if kind == LITERAL and rest[0].endswith(","):
            text = rest[0][:-1]
            if text:
                self.pieces[-1] = (LITERAL, text)
            else:
                self.pieces.pop()

    def attributes(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """NL_ATTR_FOR_EACH over [start, end): yields (type, payload offset, size) and
        finally (-1, stop offset, bytes left). Stops at a header that does not fit, or
        at an attribute that runs past the captured bytes of a truncated key."""
        data, captured, pos = self.data, len(self.data), start
        while True:
            left = end - pos
            if left < 4 or pos + 4 > captured:
                break
            (header,) = _HEADER(data, pos)
            self.plan.headers.append((pos, header))
            nla_len = header & 0xFFFF
            if nla_len < 4 or nla_len > left or pos + nla_len > captured:
                break
            yield header >> 16 & _TYPE_MASK, pos + 4, nla_len - 4
            padded = (nla_len + 3) & ~3
            pos += padded if padded <= left else nla_len
        yield -1, pos, end - pos

    def bad_length(self, prefix: str, offset: int, size: int, expected: int) -> None:
        self.literal(f"{prefix}(bad key length {size}, expected {expected})(")
        self.call(spaced_hex, offset, size)
        self.literal(")")

    def unknown(self, attr_type: int, field_prefix: str, offset: int, size: int) -> None:
        self.literal(f"key{attr_type}(")
        self.call(unknown_attr, f"{field_prefix}key{attr_type}", offset, size)
        self.literal(")")

    # -- the top level and encap() ---------------------------------------------------

    def key(self) -> Plan:
        stack = [_Frame(self.attributes(0, self.full_len), 0, self.full_len)]
        while stack:
            frame = stack[-1]
            attr_type, offset, size = next(frame.attributes)
            if attr_type < 0:
                stack.pop()
                self.level_end(frame, offset, size, nested=bool(stack))
                continue
            spec = attrs.KEY_ATTRS[attr_type] if attr_type < len(attrs.KEY_ATTRS) else None
            if spec is not None and spec.length >= 0 and size != spec.length:
                self.bad_length("", offset, size, spec.length)
                continue
            if not frame.first:
                self.literal(",")
            frame.first = False
            if attr_type == attrs.ENCAP:
                self.literal("encap(")
                inner_end = offset + size
                if size:
                    stack.append(_Frame(self.attributes(offset, inner_end), offset, inner_end))
                else:
                    self.literal(")")
            elif spec is None:
                self.unknown(attr_type, "", offset, size)
            else:
                self.key_attr(attr_type, spec, offset, size)
        return self.plan

    def level_end(self, frame: _Frame, stop: int, left: int, nested: bool) -> None:
        if self.plan.truncated and not nested:
            # Whatever stopped the walk, the rest of the key was not captured.
            if self.pieces:
                self.literal(",")
            self.pieces.append((MARKER,))
            return
        if left:
            if left == frame.end - frame.start:
                self.literal("<empty>")
            self.literal(f",***{left} leftover bytes*** (")
            self.call(plain_hex, stop, left)
            self.literal(")")
        elif frame.end == frame.start:
            self.literal("<empty>")
        if nested:
            self.literal(")")

    def key_attr(self, attr_type: int, spec: attrs.AttrSpec, offset: int, size: int) -> None:
        if spec.layout is not None:
            self.layout(spec.layout, offset)
        elif attr_type == attrs.TUNNEL:
            self.tunnel(offset, size)
        elif attr_type == attrs.NSH:
            self.nsh(offset, size)
        elif attr_type == attrs.MPLS:
            self.mpls(offset, size)
        else:  # unspec and tunnel_info, whose expected length is 0
            self.literal(f"{spec.name}()")

    # -- attributes with inner structure ---------------------------------------------

    def mpls(self, offset: int, size: int) -> None:
        if not size or size % 4:
            self.literal(f"mpls((bad key length {size})")  # sic: OVS prints no ')' here
            return
        self.literal("mpls(")
        self.layout(lay.MPLS_TOP, offset)
        for lse in range(offset + 4, offset + size, 4):
            self.literal(",")
            self.layout(lay.MPLS_LSE, lse)
        self.literal(")")

    def tunnel(self, offset: int, size: int) -> None:
        self.literal("tunnel(")
        flags = 0
        for attr_type, sub, sub_size in self.attributes(offset, offset + size):
            if attr_type < 0:
                break
            if attr_type >= len(attrs.TUNNEL_ATTRS):
                self.unknown(attr_type, "tunnel.", sub, sub_size)
                self.literal(",")
                continue
            spec = attrs.TUNNEL_ATTRS[attr_type]
            if spec.length >= 0 and sub_size != spec.length:
                self.bad_length(f"key{attr_type}", sub, sub_size, spec.length)
                continue
            flags |= attrs.TUN_FLAG_OF_TYPE.get(attr_type, 0)
            if spec.layout is not None:
                self.layout(spec.layout, sub)
                self.literal(",")
            elif attr_type == attrs.TUN_GENEVE:
                self.literal("geneve(")
                self.call(geneve_text, sub, sub_size)
                self.literal("),")
            elif attr_type == attrs.TUN_VXLAN:
                self.literal("vxlan(")
                self.vxlan(sub, sub_size)
                self.literal("),")
            elif attr_type == attrs.TUN_ERSPAN:
                self.literal("erspan(")
                self.call(erspan_text, sub)
                self.literal("),")
            elif attr_type == attrs.TUN_GTPU:
                self.literal("gtpu(")
                self.call(gtpu_text, sub)
                self.literal("),")
            # df, csum and oam only set flags; pad prints nothing.
        names = "|".join(name for bit, name in attrs.TUN_FLAG_NAMES if flags & bit)
        self.literal(f"flags({names or 0}))")
        self.pieces.append((CONST, "tunnel.flags", flags))

    def vxlan(self, offset: int, size: int) -> None:
        for attr_type, sub, sub_size in self.attributes(offset, offset + size):
            if attr_type < 0:
                break
            spec = attrs.VXLAN_ATTRS[attr_type] if attr_type < len(attrs.VXLAN_ATTRS) else None
            if spec is not None and sub_size != spec.length:
                self.bad_length(f"key{attr_type}", sub, sub_size, spec.length)
            elif spec is not None and spec.layout is not None:
                self.layout(spec.layout, sub)
                self.literal(",")
            else:
                self.unknown(attr_type, "tunnel.vxlan_", sub, sub_size)
                self.literal(",")
        self.chomp()

    def nsh(self, offset: int, size: int) -> None:
        self.literal("nsh(")
        base = md1 = -1
        for attr_type, sub, sub_size in self.attributes(offset, offset + size):
            if attr_type < 0:
                break
            if attr_type >= len(attrs.NSH_ATTRS):
                continue  # OVS ignores unknown NSH attributes
            spec = attrs.NSH_ATTRS[attr_type]
            if spec.length >= 0 and sub_size != spec.length:
                self.bad_length(f"key{attr_type}", sub, sub_size, spec.length)
            elif attr_type == attrs.NSH_BASE:
                base = sub
            elif attr_type == attrs.NSH_MD1:
                md1 = sub
        self.call(nsh_text, base, md1)
        self.literal(")")


def plan_key(data: bytes, full_len: int) -> Plan:
    """Walk `data` (the first bytes of a `full_len`-byte key) into a plan."""
    return _Planner(data, full_len).key()


def render(plan: Plan, data: bytes, full_len: int, fields: Fields | None) -> str:
    """Carry out a plan for `data`; fill `fields` unless it is None."""
    out = []
    for piece in plan.pieces:
        kind = piece[0]
        if kind == LITERAL:
            out.append(piece[1])
        elif kind == LAYOUT:
            out.append(piece[1].render(data, piece[2], fields))
        elif kind == CALL:
            out.append(piece[1](data, fields, *piece[2]))
        elif kind == CONST:
            if fields is not None:
                fields[piece[1]] = piece[2]
        else:
            out.append(truncation_marker(plan.captured, full_len))
    return "".join(out)
