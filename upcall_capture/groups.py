"""Field groups: what --stats and --top count upcalls by, beside the exact key.

A group is one field (`ipv4.src`), a prefix of an address field (`ipv4.src/24`), or
several fields counted together (`proto,tp_dst`). Its value for an upcall is raw (an
int, a tuple) so that counting costs a dictionary update; the label is made only for
the values shown. The names are those the filters know (--filter), so that a value
seen here can be filtered on, plus the tunnel's id and remote address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from upcall_capture.filters.terms import CT_STATE_FLAGS, PROTOCOLS
from upcall_capture.flowkey.layouts import Fields

if TYPE_CHECKING:
    from upcall_capture.view import CapturedUpcall

_PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}


def _hex(value: int) -> str:
    return f"{value:#x}" if value else "0"  # as OVS prints recirc_id and tun_id


def _ct_state(value: int) -> str:
    if not value:
        return "0 (not tracked)"
    flags = "".join(f"+{name}" for name, bit in CT_STATE_FLAGS.items() if value & bit)
    return f"{value:#x} ({flags})" if flags else f"{value:#x}"


def _address(value: tuple[int, int]) -> str:
    version, number = value
    return str(ipaddress.IPv4Address(number) if version == 4 else ipaddress.IPv6Address(number))


@dataclass(frozen=True)
class Field:
    """One field as a group counts it: its raw value for an upcall, and its label."""

    name: str
    value: Callable[[CapturedUpcall, Fields], Hashable | None]
    label: Callable[[Hashable], str] = str


def _key(name: str, label: Callable[[Hashable], str] = str) -> Field:
    return Field(name, lambda item, fields: fields.get(name), label)


def _meta(name: str, read: Callable[[CapturedUpcall], Hashable | None]) -> Field:
    return Field(name, lambda item, fields: read(item) or None)


def _tunnel_address(end: str) -> Field:
    def value(item: CapturedUpcall, fields: Fields) -> tuple[int, int] | None:
        if f"tunnel.{end}" in fields:
            return 4, fields[f"tunnel.{end}"]
        if f"tunnel.ipv6_{end}" in fields:
            return 6, fields[f"tunnel.ipv6_{end}"]
        return None
    return Field(f"tunnel.{end}", value, _address)


def _ip(name: str) -> Field:
    version = 4 if name.startswith("ipv4") else 6
    return Field(name, lambda item, fields: (version, fields[name]) if name in fields
                 else None, _address)


FIELDS: dict[str, Field] = {field.name: field for field in (
    _meta("dpif", lambda item: item.upcall.dpif),
    _meta("type", lambda item: item.upcall.type_name if item.upcall.type >= 0 else None),
    # The datapath port as its interface is named (port name and datapath).
    _meta("in_port", lambda item: item.interface),
    _meta("pid", lambda item: item.upcall.pid),
    _meta("tid", lambda item: item.upcall.tid),
    _meta("thread", lambda item: item.upcall.thread),  # the handler
    _key("recirc_id", _hex),
    _key("eth_type", lambda value: f"0x{value:04x}"),
    _ip("ipv4.src"), _ip("ipv4.dst"), _ip("ipv6.src"), _ip("ipv6.dst"),
    _key("proto", lambda value: _PROTOCOL_NAMES.get(value, str(value))),
    _key("tp_src"), _key("tp_dst"),
    _key("ct_state", _ct_state),
    _key("tunnel.tun_id", _hex),
    _tunnel_address("src"), _tunnel_address("dst"),
)}
# Fields that take /PREFIX: their values are (IP version, address).
PREFIXED = ("ipv4.src", "ipv4.dst", "ipv6.src", "ipv6.dst", "tunnel.src", "tunnel.dst")
_MAX_PREFIX = {4: 32, 6: 128}


def _prefixed(field: Field, length: int) -> Field:
    def value(item: CapturedUpcall, fields: Fields) -> tuple[int, int] | None:
        address = field.value(item, fields)
        if address is None:
            return None
        version, number = address
        bits = _MAX_PREFIX[version]
        return version, number >> (bits - min(length, bits)) << (bits - min(length, bits))

    def label(value: tuple[int, int]) -> str:
        return f"{_address(value)}/{min(length, _MAX_PREFIX[value[0]])}"
    return Field(f"{field.name}/{length}", value, label)


@dataclass(frozen=True)
class Group:
    """Upcalls counted by one field or several together (named `a,b`)."""

    fields: tuple[Field, ...]

    @property
    def name(self) -> str:
        return ",".join(field.name for field in self.fields)

    def values(self, items: Sequence[CapturedUpcall], fields: Sequence[Fields]
               ) -> list[Hashable]:
        """Each upcall's value, or None for an upcall without any of the fields."""
        if len(self.fields) == 1:
            read = self.fields[0].value
            return [read(item, key) for item, key in zip(items, fields, strict=True)]
        reads = [field.value for field in self.fields]
        out: list[Hashable] = []
        for item, key in zip(items, fields, strict=True):
            parts = tuple(read(item, key) for read in reads)
            out.append(None if parts.count(None) == len(parts) else parts)
        return out

    def label(self, value: Hashable) -> str:
        if len(self.fields) == 1:
            return self.fields[0].label(value)
        return " ".join(f"{field.name}={field.label(part)}"
                        for field, part in zip(self.fields, value, strict=True)
                        if part is not None)


def parse_group(text: str) -> Group:
    """`FIELD[/PREFIX][,FIELD...]` as --stats-by takes it; ValueError says what is wrong."""
    fields = []
    for part in text.split(","):
        name, slash, length_text = part.strip().partition("/")
        field = FIELDS.get(name)
        if field is None:
            raise ValueError(f"--stats-by: unknown field {name!r} (fields: "
                             f"{', '.join(FIELDS)})")
        if slash:
            if name not in PREFIXED:
                raise ValueError(f"--stats-by: only {', '.join(PREFIXED)} take /PREFIX, "
                                 f"not {name}")
            if not length_text.isdigit() or not 0 < int(length_text) <= 128:
                raise ValueError(f"--stats-by: {part.strip()!r}: the prefix must be a "
                                 "length from 1 to 128")
            field = _prefixed(field, int(length_text))
        fields.append(field)
    return Group(tuple(fields))


# What --stats and --top show without --stats-by.
DEFAULT_GROUPS = tuple(parse_group(text) for text in (
    "in_port", "eth_type", "ipv4.src", "ipv4.src/24", "ipv4.dst", "ipv4.dst/24",
    "ipv6.src", "ipv6.src/64", "ipv6.dst", "ipv6.dst/64", "proto,tp_dst",
    "tunnel.tun_id", "tunnel.src", "recirc_id", "ct_state", "thread",
))
