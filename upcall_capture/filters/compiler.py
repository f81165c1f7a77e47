"""From the command line's filters to the probe's C and the same test in Python.

The whole filter is (EXPR1 or EXPR2 ...) and PACKET_FILTER. In the probe:
- meta_match() runs before anything is copied: the metadata terms of each EXPR, ORed.
  It may let through what the key terms later reject, never the reverse;
- packet_match() runs after the copy: the key terms (with the metadata terms again when
  there are several EXPRs, for the OR to be exact), then the packet filter compiled for
  the packet's link type, which the key's eth attribute gives.
Only a packet filter that loops (protochain) cannot run in the probe; it then lets every
packet through and FilterSpec.userspace applies it.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from upcall_capture.filters import cbpf, keywalk, pcap
from upcall_capture.filters.cbpf import Program
from upcall_capture.filters.errors import FilterError
from upcall_capture.filters.terms import PortLookup, Term, Upcall, parse_expression

LINK_TYPES = (("ethernet", pcap.DLT_EN10MB, "Ethernet (L2)"),
              ("raw", pcap.DLT_RAW, "raw-IP (L3)"))


@dataclass(frozen=True)
class PacketFilter:
    """A tcpdump expression compiled for both link types an upcall can have. A link type's
    program is None when no packet of that type can match."""

    expression: str
    ethernet: Program | None
    raw: Program | None
    notes: tuple[str, ...]

    def matches(self, upcall: Upcall, ethernet: bool) -> bool:
        program = self.ethernet if ethernet else self.raw
        return program is not None and program.run(upcall.packet, upcall.pkt_size) != 0

    @property
    def in_kernel(self) -> bool:
        return not any(p is not None and p.loops for p in (self.ethernet, self.raw))


def compile_packet_filter(expression: str) -> PacketFilter:
    programs: dict[str, Program | None] = {}
    errors: dict[str, FilterError] = {}
    for name, linktype, _ in LINK_TYPES:
        try:
            programs[name] = pcap.compile_expression(expression, linktype)
        except FilterError as err:
            programs[name] = None
            try:
                # libpcap's optimizer refuses an expression that rejects every packet (`arp`
                # on raw IP): for one link type that is an answer, not an error.
                pcap.compile_expression(expression, linktype, optimize=False)
            except FilterError:
                errors[name] = err
    if programs["ethernet"] is None and programs["raw"] is None:
        raise errors.get("ethernet") or errors.get("raw") or FilterError(
            f"packet filter {expression!r}: expression rejects all packets")
    notes = [f"the packet filter cannot apply to {label} upcalls ({errors[name]}): "
             f"they are not captured" for name, _, label in LINK_TYPES if name in errors]
    if any(p is not None and p.loops for p in programs.values()):
        notes.append(f"the packet filter {expression!r} loops (protochain), which the probe "
                     f"cannot run: it is applied in userspace")
    return PacketFilter(expression, programs["ethernet"], programs["raw"], tuple(notes))


@dataclass(frozen=True)
class FilterSpec:
    """A compiled filter: C for the probe, and the same decision in Python."""

    alternatives: tuple[tuple[Term, ...], ...]  # ORed; each one's terms are ANDed
    packet: PacketFilter | None
    bpf_c: str  # defines meta_match() and packet_match() for recv_upcall.c
    notes: tuple[str, ...]  # to say once on stderr
    if_filter: str | None  # for the pcapng IDB's if_filter

    @property
    def _needs_key(self) -> bool:
        return self.packet is not None or any(t.in_key for alt in self.alternatives for t in alt)

    def matches(self, upcall: Upcall, ethernet: bool | None = None) -> bool:
        """The whole filter, as the probe and userspace together apply it.

        ethernet says whether the packet starts with an Ethernet header; by default, as in
        the probe, whether the key has an eth attribute. (A packet read back from a file
        made by another tool has no key: its interface's link type says.)
        """
        fields = keywalk.key_fields(upcall.key) if self._needs_key else {}
        if self.alternatives and not any(all(t.matches(upcall, fields) for t in alt)
                                         for alt in self.alternatives):
            return False
        if self.packet is None:
            return True
        return self.packet.matches(upcall, keywalk.ETH in fields if ethernet is None else ethernet)

    def _packet_matches(self, upcall: Upcall) -> bool:
        assert self.packet is not None
        return self.packet.matches(upcall, keywalk.ETH in keywalk.key_fields(upcall.key))

    @property
    def needs_outcome(self) -> bool:
        """A term tests the outcome: the whole filter runs again once it is known."""
        return any(t.name == "outcome" for alt in self.alternatives for t in alt)

    @property
    def userspace(self) -> Callable[[Upcall], bool] | None:
        """What the probe could not decide, to apply to every record it submits; None when
        the probe decides everything."""
        if self.packet is None or self.packet.in_kernel:
            return None
        return self._packet_matches


def compile_filters(meta: Sequence[str] = (), packet: str | None = None,
                    port_lookup: PortLookup | None = None) -> FilterSpec:
    """--filter EXPRs (ORed) and a tcpdump expression (None or blank: none).

    port_lookup(name) gives (dpif, datapath port number) for port=NAME. Raises FilterError
    on an unknown field, a bad value or an expression libpcap refuses.
    """
    alternatives = tuple(tuple(parse_expression(expr, port_lookup)) for expr in meta)
    expression = packet.strip() if packet and packet.strip() else None
    packet_filter = compile_packet_filter(expression) if expression else None
    texts = [f"--filter {shlex.quote(expr)}" for expr in meta]
    if_filter = " ".join([*texts, *([expression] if expression else [])]) or None
    return FilterSpec(
        alternatives=alternatives,
        packet=packet_filter,
        bpf_c=_bpf_c(alternatives, meta, packet_filter, if_filter),
        notes=packet_filter.notes if packet_filter else (),
        if_filter=if_filter,
    )


def _meta_condition(alternatives: Sequence[Sequence[Term]]) -> str:
    """C: true when the metadata terms of any alternative hold."""
    metas = [[t for t in alt if not t.in_key] for alt in alternatives]
    if not metas or any(not meta for meta in metas):
        return "1"
    return " ||\n           ".join("(" + " && ".join(t.c_condition() for t in meta) + ")"
                                  for meta in metas)


def _key_checks(alternatives: Sequence[Sequence[Term]], texts: Sequence[str]) -> list[str]:
    """C statements that return 0 unless an alternative holds, for packet_match().

    With one alternative its metadata terms were settled by meta_match(); with several,
    each is tried whole, in turn, so that the OR is exact. Every test leaves at once on
    failure: no flags, so the verifier follows one path per alternative.
    """
    if not any(t.in_key for alt in alternatives for t in alt):
        return []
    if len(alternatives) == 1:
        return [t.c_check("return 0;") for t in alternatives[0] if t.in_key]
    lines = []
    for number, (alt, text) in enumerate(zip(alternatives, texts, strict=True), 1):
        fail = f"goto fk_not_{number};"
        lines += [f"    /* --filter {_comment_text(text)} */"]
        lines += [t.c_check(fail) for t in alt] + ["    goto fk_matched;", f"fk_not_{number}:"]
    return lines + ["    return 0;", "fk_matched:"]


def _comment_text(text: str) -> str:
    """Text for a C comment: on one line, and never closing it."""
    return " ".join(text.replace("*/", "* /").split())


def _bpf_c(alternatives: tuple[tuple[Term, ...], ...], texts: Sequence[str],
           packet: PacketFilter | None, description: str | None) -> str:
    parts = [f"/* upcall_capture.filters: {_comment_text(description or 'everything')} */\n"]
    # The packet filter's result on each link type: C, or a constant.
    tests = {name: _packet_test(getattr(packet, name), name) for name, _, _ in LINK_TYPES
             } if packet else {}
    key_names = {t.name for alt in alternatives for t in alt if t.in_key}
    if len(set(tests.values())) > 1:
        key_names.add(keywalk.ETH)
    body = []
    if key_names:
        parts.append(keywalk.walk_c(key_names))
        body += ["    u32 at[FK_TYPES] = {};", "    u8 *p;", "    fk_walk(rec, at);"]
    programs = [getattr(packet, name) for name in tests]
    in_c = [(name, p) for name, p in zip(tests, programs, strict=True) if p and not p.loops]
    if in_c:
        parts.append(cbpf.C_PRELUDE)
        parts += [program.to_c(f"pcap_{name}") for name, program in in_c]
        body = _PACKET_BYTES + body  # declarations first: C wants no label before one
    body += _key_checks(alternatives, texts)
    if keywalk.ETH in key_names:
        body += [keywalk.c_locate(keywalk.ETH, f"return {tests['raw']};"),
                 f"    return {tests['ethernet']};"]
    else:
        body.append(f"    return {tests.get('ethernet', '1')};")
    parts.append("static __always_inline int meta_match(struct upcall_record *rec)\n{\n"
                 f"    return {_meta_condition(alternatives)};\n}}\n")
    parts.append("static __always_inline int packet_match(struct upcall_record *rec)\n{\n"
                 + "\n".join(body) + "\n}\n")
    return "\n".join(parts)


# The packet's bytes, found from the record's lengths as loaded from memory (volatile, as
# fk_walk() loads key_len): the verifier then carries one state through the filter, not one
# for each way the copies went. The bounds never fail; they are the verifier's.
_PACKET_BYTES = [
    "    u64 pkt_at = *(volatile u32 *)&rec->pkt_offset, len = *(volatile u32 *)&rec->pkt_len;",
    "    if (pkt_at > KEY_CAP + PKT_GAP_MAX || len > SNAPLEN)",
    "        return 1;",
    "    u8 *pkt = rec->data + pkt_at;",
]


def _packet_test(program: Program | None, name: str) -> str:
    """C for the packet filter's result on one link type: "0" when nothing of that type can
    match, "1" when userspace decides (the program loops), else a call."""
    if program is None:
        return "0"
    if program.loops:
        return "1"
    return f"pcap_{name}(pkt, len, rec->pkt_size) != 0"
