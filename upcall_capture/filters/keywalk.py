"""The flow key fields a filter tests, found by one walk of the netlink attributes.

The walk exists twice, in Python (key_fields) and in C for the probe (walk_c and
c_locate), and both follow the one table below and these rules, so that the kernel and
userspace agree on every key, malformed ones included:
- attributes are read in order; ENCAP is stepped into (its attributes follow in place, so
  a VLAN frame's inner attributes count), any other nested attribute (the tunnel) is
  stepped over;
- a header shorter than 4 bytes, or an attribute that runs past the copied key, ends it;
- of each attribute type only the last one counts (eth_type is thus the innermost one of
  a VLAN frame, as in OVS's own flow); it gives its fields if its payload has exactly the
  expected size;
- a field several attribute types carry (proto: ipv4 or ipv6; tp_src and tp_dst: tcp, udp
  or sctp) comes from the first of them, in the table's order, that gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

ENCAP = 1
NLA_TYPE_MASK = 0x3FFF
IN_PORT, ETHERNET, ETHERTYPE, IPV4, IPV6, TCP, UDP, SCTP, RECIRC_ID, CT_STATE = (
    3, 4, 6, 7, 8, 9, 10, 17, 20, 22)
# Payload size of each attribute type a field comes from.
ATTR_SIZES = {IN_PORT: 4, ETHERNET: 12, ETHERTYPE: 2, IPV4: 12, IPV6: 40, TCP: 4, UDP: 4,
              SCTP: 4, RECIRC_ID: 4, CT_STATE: 4}


@dataclass(frozen=True)
class Field:
    name: str  # as the filter names it
    width: int  # bits; 0 for "eth", which only says whether the key has an eth attribute
    sources: tuple[tuple[int, int], ...]  # (attribute type, offset in its payload), in turn
    big_endian: bool = True


def _ports(offset: int) -> tuple[tuple[int, int], ...]:
    return ((TCP, offset), (UDP, offset), (SCTP, offset))


ETH = "eth"
FIELDS: dict[str, Field] = {f.name: f for f in (
    Field("in_port", 32, ((IN_PORT, 0),), big_endian=False),
    Field(ETH, 0, ((ETHERNET, 0),)),
    Field("eth_type", 16, ((ETHERTYPE, 0),)),
    Field("ipv4.src", 32, ((IPV4, 0),)),
    Field("ipv4.dst", 32, ((IPV4, 4),)),
    Field("ipv6.src", 128, ((IPV6, 0),)),
    Field("ipv6.dst", 128, ((IPV6, 16),)),
    Field("proto", 8, ((IPV4, 8), (IPV6, 36))),
    Field("tp_src", 16, _ports(0)),
    Field("tp_dst", 16, _ports(2)),
    Field("recirc_id", 32, ((RECIRC_ID, 0),), big_endian=False),
    Field("ct_state", 32, ((CT_STATE, 0),), big_endian=False),
)}


def last_attributes(key: bytes) -> dict[int, tuple[int, int]]:
    """{attribute type: (offset, length)} of the last attribute of each type."""
    last: dict[int, tuple[int, int]] = {}
    offset, end = 0, len(key)
    while offset + 4 <= end:
        length = key[offset] | key[offset + 1] << 8
        kind = (key[offset + 2] | key[offset + 3] << 8) & NLA_TYPE_MASK
        if length < 4 or length > end - offset:
            break
        last[kind] = (offset, length)
        offset += 4 if kind == ENCAP else (length + 3) & ~3
    return last


def key_fields(key: bytes) -> dict[str, int]:
    """{field name: value} for the fields the key gives; "eth" is 1 when it has an eth
    attribute (the packet starts with an Ethernet header, else with the IP header)."""
    last = last_attributes(key)
    fields: dict[str, int] = {}
    for field in FIELDS.values():
        for kind, offset in field.sources:
            found = last.get(kind)
            if found is not None and found[1] == 4 + ATTR_SIZES[kind]:
                start = found[0] + 4 + offset
                raw = key[start:start + field.width // 8]
                fields[field.name] = (int.from_bytes(raw, "big" if field.big_endian else "little")
                                      if field.width else 1)
                break
    return fields


# The C walk only notes where the last attribute of each type is, in at[type] (+1, so that
# 0 means none), and the fields are read from there afterwards: a loop body without any
# per-type branch keeps the verifier's work to a few states per round. Every byte read is
# at an offset checked against KEY_CAP on a copy the compiler cannot see through, so that
# the verifier finds the bound on the very register that addresses the record.
_WALK_C = """\
#define FK_OPAQUE(v) asm volatile("" : "+r"(v))
#define FK_TYPES {types}

static __always_inline u32 fk_be16(u8 *p) {{ return (u32)p[0] << 8 | p[1]; }}
static __always_inline u32 fk_be32(u8 *p)
{{ return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }}
static __always_inline u32 fk_le32(u8 *p)
{{ return (u32)p[3] << 24 | (u32)p[2] << 16 | (u32)p[1] << 8 | p[0]; }}

/* Each attribute takes at least 4 bytes of at most KEY_CAP: the bound never cuts a walk. */
static __always_inline void fk_walk(struct upcall_record *rec, u32 *at)
{{
    u64 end = *(volatile u32 *)&rec->key_len, off = 0;    /* see packet_match() */
    for (u32 i = 0; i < KEY_CAP / 4; i++) {{
        FK_OPAQUE(off);
        if (off > KEY_CAP - 4 || off + 4 > end)
            break;
        u8 *a = rec->data + off;
        u32 nla_len = a[0] | (u32)a[1] << 8;
        u32 type = (a[2] | (u32)a[3] << 8) & 0x3fff;
        if (nla_len < 4 || nla_len > end - off)
            break;
        if (type < FK_TYPES)
            at[type] = off + 1;
        off += type == 1 ? 4 : (nla_len + 3) & ~3;    /* ENCAP: step in */
    }}
}}

/* The payload of the last attribute of a type, found at at + 1 by fk_walk(), if it is
 * exactly size bytes long; else NULL. */
static __always_inline u8 *fk_attr(struct upcall_record *rec, u64 at, u32 size)
{{
    if (!at)
        return NULL;
    at -= 1;
    FK_OPAQUE(at);
    if (at > KEY_CAP - 4 - size)
        return NULL;
    u8 *a = rec->data + at;
    if ((a[0] | (u32)a[1] << 8) != 4 + size)
        return NULL;
    return a + 4;
}}
"""


def walk_c(names: set[str]) -> str:
    """C for fk_walk(rec, at) and fk_attr(), sized for the fields named; to be called as
    `u32 at[FK_TYPES] = {}; fk_walk(rec, at);`."""
    types = max(kind for name in names for kind, _ in FIELDS[name].sources) + 1
    return _WALK_C.format(types=types)


def c_locate(name: str, fail: str) -> str:
    """C statements that point `p` at the field's bytes, or run `fail` (e.g. "return 0;")
    when the key does not give it."""
    sources = FIELDS[name].sources
    finds = [f"(p = fk_attr(rec, at[{kind}], {ATTR_SIZES[kind]}))" for kind, _ in sources]
    offsets = {offset for _, offset in sources}
    if len(offsets) == 1:
        lines = [f"    if (!{' && !'.join(finds)}) {fail}"]
        lines += [f"    p += {offset};" for offset in offsets if offset]
        return "\n".join(lines)
    lines = [f"    {'if' if i == 0 else 'else if'} ({find}) p += {offset};"
             for i, (find, (_, offset)) in enumerate(zip(finds, sources, strict=True))]
    return "\n".join([*lines, f"    else {fail}"])


def c_value(name: str, word: int = 0) -> str:
    """C for the field's value (one u32 word of a 128-bit field) once c_locate found it."""
    field = FIELDS[name]
    if field.width == 8:
        return "p[0]"
    if field.width == 16:
        return "fk_be16(p)"
    at = f"p + {4 * word}" if word else "p"
    return f"fk_be32({at})" if field.big_endian else f"fk_le32({at})"
