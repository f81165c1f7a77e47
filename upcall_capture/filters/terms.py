"""`--filter EXPR`: comma-separated name=value terms that must all match.

A term tests either the upcall's metadata (dpif, type, pid, tid, thread, result), which
the probe has before it copies anything, or a field of the flow key (keywalk.FIELDS), as
(value & mask) == wanted. A key field the key does not have never matches. `result` tells
upcalls ovs-vswitchd received (ok) from those the datapath failed to deliver (failed, or
one errno such as EAGAIN), which only the kernel side captures. `outcome` tells what the
handler did (put, execute, none, unknown: record.outcome_kind), known only once the
upcall leaves the outcomes stage: the probe lets every upcall through for it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from upcall_capture.filters import keywalk
from upcall_capture.filters.errors import FilterError
from upcall_capture.probe.kernel_record import errno_number

DPIF_NAME_MAX = 63  # the probe's dpif[64], NUL included
THREAD_NAME_MAX = 15  # the kernel's comm[16]

UPCALL_TYPES = {"miss": 0, "action": 1}
PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "gre": 47, "icmpv6": 58, "sctp": 132}
CT_STATE_FLAGS = {"new": 0x01, "est": 0x02, "rel": 0x04, "rpl": 0x08, "inv": 0x10,
                  "trk": 0x20, "snat": 0x40, "dnat": 0x80}

# Looks a port name up in the datapaths: (dpif, datapath port number), or None.
PortLookup = Callable[[str], "tuple[str, int] | None"]


class Upcall(Protocol):
    """What a filter reads of an upcall (upcall_capture.probe.record.Upcall has it all)."""

    dpif: str
    type: int
    pid: int
    tid: int
    thread: str
    key: bytes
    packet: bytes
    pkt_size: int
    enqueue: object  # probe.record.Enqueue | None: a failed upcall's `result` is -errno
    failed: bool  # made from the kernel side's FAILED event
    outcome: object  # None, or anything with .kind (record.Outcome, comment.OutcomeFields)


@dataclass(frozen=True)
class Term:
    name: str  # dpif, type, pid, tid, thread, or a keywalk field
    value: int | str
    mask: int = 0

    @property
    def in_key(self) -> bool:
        return self.name in keywalk.FIELDS

    def matches(self, upcall: Upcall, fields: dict[str, int]) -> bool:
        if self.name == "result":
            result = upcall.enqueue.result if upcall.failed else 0
            return result != 0 if self.value == "failed" else result == self.value
        if self.name == "outcome":
            return upcall.outcome is not None and upcall.outcome.kind == self.value
        if self.name in _META_STRINGS:
            return getattr(upcall, self.name) == self.value
        have = fields.get(self.name) if self.in_key else getattr(upcall, self.name)
        return have is not None and have & self.mask == self.value

    def c_condition(self) -> str:
        """A C condition over `rec`, the record, for a metadata term."""
        assert not self.in_key
        if self.name == "result":
            return "1" if self.value == 0 else "0"  # recv_upcall sees no failed upcall
        if self.name == "outcome":
            return "1"  # not known yet: decided after the outcomes stage
        if self.name in _META_STRINGS:
            raw = str(self.value).encode() + b"\0"
            member = _META_STRINGS[self.name]
            return "(" + " && ".join(f"(u8)rec->{member}[{i}] == {byte:#04x}"
                                     for i, byte in enumerate(raw)) + ")"
        assert isinstance(self.value, int)
        return f"rec->{self.name} == {self.value:#x}"

    def c_check(self, fail: str) -> str:
        """C statements that run `fail` unless the term holds; a key term reads the key
        through `at` (keywalk.walk_c) and a scratch `u8 *p`."""
        if not self.in_key:
            return f"    if (!({self.c_condition()})) {fail}"
        assert isinstance(self.value, int)
        field = keywalk.FIELDS[self.name]
        lines = [keywalk.c_locate(self.name, fail)]
        words = max(1, field.width // 32)
        for word in range(words):
            shift = 32 * (words - 1 - word)
            mask = self.mask >> shift & 0xFFFFFFFF
            value = self.value >> shift & 0xFFFFFFFF
            read = keywalk.c_value(self.name, word)
            if mask == (1 << min(field.width, 32)) - 1:
                lines.append(f"    if ({read} != {value:#x}) {fail}")
            elif mask:
                lines.append(f"    if (({read} & {mask:#x}) != {value:#x}) {fail}")
        return "\n".join(lines)


_META_STRINGS = {"dpif": "dpif", "thread": "comm"}
_NUMBER = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)")


def _number(text: str, bits: int, what: str) -> int:
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"{what} must be a number (decimal or 0x hex), not {text!r}")
    value = int(text, 0)
    if value >> bits:
        raise ValueError(f"{what} is {bits} bits: {text} is too large")
    return value


def _masked(text: str, bits: int, what: str, names: dict[str, int] | None = None
            ) -> tuple[int, int]:
    """N or N/MASK (or a name from names) as (value, mask)."""
    full = (1 << bits) - 1
    if names and text in names:
        return names[text], full
    value_text, slash, mask_text = text.partition("/")
    value = _number(value_text, bits, what)
    mask = _number(mask_text, bits, f"{what}'s mask") if slash else full
    return value & mask, mask


def _ct_state(text: str) -> tuple[int, int]:
    """A number[/mask], or OVS's flag form: +trk+est-new (only the named flags are tested)."""
    if text[:1] not in ("+", "-"):
        return _masked(text, 32, "ct_state")
    if not re.fullmatch(r"([+-][a-z]+)+", text):
        raise ValueError(f"ct_state flags look like +trk+est-new, not {text!r}")
    value = mask = 0
    for sign, name in re.findall(r"([+-])([a-z]+)", text):
        if name not in CT_STATE_FLAGS:
            raise ValueError(f"ct_state flag {name!r} is not one of "
                             f"{', '.join(CT_STATE_FLAGS)}")
        mask |= CT_STATE_FLAGS[name]
        value = value | CT_STATE_FLAGS[name] if sign == "+" else value & ~CT_STATE_FLAGS[name]
    return value, mask


def _network(text: str, version: int, what: str) -> tuple[int, int]:
    kind = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    try:
        network = kind(text, strict=False)
    except ValueError:
        raise ValueError(f"{what} must be an IPv{version} address, optionally /prefix, "
                         f"not {text!r}") from None
    return int(network.network_address), int(network.netmask)


def _string(text: str, longest: int, what: str) -> str:
    if not text or len(text.encode()) > longest:
        raise ValueError(f"{what} must be 1 to {longest} bytes long")
    return text


def _meta_number(text: str, what: str, names: dict[str, int] | None = None) -> int:
    if names and text in names:
        return names[text]
    try:
        return _number(text, 32, what)
    except ValueError:
        if names:
            raise ValueError(f"{what} must be {', '.join(names)} or a number, not {text!r}"
                             ) from None
        raise


def _key_term(name: str, text: str) -> Term:
    field = keywalk.FIELDS[name]
    if name.startswith("ipv"):
        value, mask = _network(text, 4 if name.startswith("ipv4") else 6, name)
    elif name == "ct_state":
        value, mask = _ct_state(text)
    else:
        value, mask = _masked(text, field.width, name, PROTOCOLS if name == "proto" else None)
    return Term(name, value, mask)


META_NAMES = ("dpif", "type", "in_port", "port", "pid", "tid", "thread", "result",
              "outcome")
OUTCOMES = ("put", "execute", "none", "unknown")
KEY_NAMES = tuple(name for name in keywalk.FIELDS if name not in (keywalk.ETH, "in_port"))
NAMES = META_NAMES + KEY_NAMES


def parse_term(text: str, port_lookup: PortLookup | None) -> list[Term]:
    """One name=value; port=NAME becomes its dpif and in_port."""
    name, equals, value = (part.strip() for part in text.partition("="))
    if not equals or not name:
        raise ValueError(f"{text.strip()!r} is not name=value")
    if name == "dpif":
        return [Term(name, _string(value, DPIF_NAME_MAX, name))]
    if name == "thread":
        return [Term(name, _string(value, THREAD_NAME_MAX, name))]
    if name == "type":
        return [Term(name, _meta_number(value, name, UPCALL_TYPES), 0xFFFFFFFF)]
    if name in ("pid", "tid"):
        return [Term(name, _meta_number(value, name), 0xFFFFFFFF)]
    if name == "result":
        return _result_terms(value)
    if name == "outcome":
        if value == "any":
            return []
        if value not in OUTCOMES:
            raise ValueError(f"outcome must be {', '.join(OUTCOMES)} or any, not {value!r}")
        return [Term("outcome", value)]
    if name == "port":
        if port_lookup is None:
            raise ValueError("port=NAME needs the datapath's port names, which are not "
                             "available (use in_port=NUMBER)")
        found = port_lookup(value)
        if found is None:
            raise ValueError(f"no datapath port is named {value!r}")
        dpif, number = found
        return [Term("dpif", dpif), Term("in_port", number, 0xFFFFFFFF)]
    if name in keywalk.FIELDS and name != keywalk.ETH:
        return [_key_term(name, value)]
    raise ValueError(f"unknown field {name!r} (fields: {', '.join(NAMES)})")


def _result_terms(text: str) -> list[Term]:
    """result=ok|failed|any, or an errno name (a failed upcall with that error)."""
    if text == "any":
        return []
    if text == "ok":
        return [Term("result", 0)]
    if text == "failed":
        return [Term("result", "failed")]
    code = errno_number(text)
    if code is None:
        raise ValueError(f"result must be ok, failed, any or an errno name such as EAGAIN, "
                         f"not {text!r}")
    return [Term("result", -code)]


def parse_expression(expression: str, port_lookup: PortLookup | None = None) -> list[Term]:
    """The terms of one --filter EXPR, all of which must match."""
    if not expression.strip():
        raise FilterError("--filter needs name=value terms, e.g. --filter dpif=system@ovs-system")
    terms: list[Term] = []
    for text in expression.split(","):
        try:
            terms += parse_term(text, port_lookup)
        except ValueError as err:
            raise FilterError(f"--filter {expression!r}: {err}") from None
    return terms
