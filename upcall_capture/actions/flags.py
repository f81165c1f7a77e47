"""OVS's format_flags() and format_flags_masked() (lib/flow.c)."""

from __future__ import annotations

from collections.abc import Mapping


def _bits(value: int) -> list[int]:
    return [1 << i for i in range(value.bit_length()) if value >> i & 1]


def flags_text(value: int, names: Mapping[int, str], delimiter: str = "|") -> str:
    """Named bits lowest first, then the unnamed ones as one hex number; `0` for none."""
    if not value:
        return "0"
    parts = [names[bit] for bit in _bits(value) if bit in names]
    unnamed = sum(bit for bit in _bits(value) if bit not in names)
    if unnamed:
        parts.append(f"0x{unnamed:x}")
    return delimiter.join(parts)


def masked_flags_text(value: int, mask: int, max_mask: int, names: Mapping[int, str]) -> str:
    """`+name`/`-name` for each masked bit; plain flags for a full mask, `0/0` for none."""
    if mask == max_mask:
        return flags_text(value, names)
    if not mask:
        return "0/0"
    return "".join(("+" if value & bit else "-") + names.get(bit, "[Unknown]")
                   for bit in _bits(mask))


TCP_FLAG_NAMES = {1 << i: name for i, name in enumerate(
    "fin syn rst psh ack urg ece cwr ns [200] [400] [800]".split())}
CT_STATE_NAMES = {1: "new", 2: "est", 4: "rel", 8: "rpl", 0x10: "inv", 0x20: "trk",
                  0x40: "snat", 0x80: "dnat"}
TUNNEL_FLAG_NAMES = {1: "oam", 2: "df", 4: "csum", 8: "key"}
SLOW_PATH_NAMES = {1 << i: name for i, name in enumerate(
    "cfm bfd lacp stp lldp action match".split())}
