"""Netlink flow key attribute tables (include/linux/openvswitch.h, OVS's odp-util.c).

Each table is indexed by attribute type up to its context's maximum. A type above the
maximum is unknown: OVS does not check its length and prints it as `keyN(hex)`. A type
within range that OVS's length table leaves unset expects an empty payload.
"""

from __future__ import annotations

from dataclasses import dataclass

from upcall_capture.flowkey import layouts as lay
from upcall_capture.flowkey.layouts import Layout

VARIABLE = -2
NESTED = -3


@dataclass(frozen=True)
class AttrSpec:
    name: str
    length: int  # payload bytes OVS expects, or VARIABLE / NESTED
    layout: Layout | None = None

    def __post_init__(self) -> None:
        if self.layout is not None and self.layout.size != self.length:
            raise ValueError(f"{self.name}: layout is {self.layout.size} bytes, not {self.length}")


def _fixed(layout: Layout) -> AttrSpec:
    """A fixed payload; its name is part of the layout's text."""
    return AttrSpec("", layout.size, layout)


# OVS_KEY_ATTR_*
ENCAP, TUNNEL, MPLS, NSH = 1, 16, 21, 28
KEY_ATTRS: tuple[AttrSpec, ...] = (
    AttrSpec("unspec", 0),
    AttrSpec("encap", NESTED),
    _fixed(lay.PRIORITY),
    _fixed(lay.IN_PORT),
    _fixed(lay.ETHERNET),
    _fixed(lay.VLAN),
    _fixed(lay.ETHERTYPE),
    _fixed(lay.IPV4),
    _fixed(lay.IPV6),
    _fixed(lay.TCP),
    _fixed(lay.UDP),
    _fixed(lay.ICMP),
    _fixed(lay.ICMPV6),
    _fixed(lay.ARP),
    _fixed(lay.ND),
    _fixed(lay.SKB_MARK),
    AttrSpec("tunnel", NESTED),
    _fixed(lay.SCTP),
    _fixed(lay.TCP_FLAGS),
    _fixed(lay.DP_HASH),
    _fixed(lay.RECIRC_ID),
    AttrSpec("mpls", VARIABLE),
    _fixed(lay.CT_STATE),
    _fixed(lay.CT_ZONE),
    _fixed(lay.CT_MARK),
    _fixed(lay.CT_LABELS),
    _fixed(lay.CT_TUPLE4),
    _fixed(lay.CT_TUPLE6),
    AttrSpec("nsh", NESTED),
    _fixed(lay.PACKET_TYPE),
    _fixed(lay.ND_EXTENSIONS),
    AttrSpec("<error: kernel-only tunnel_info>", 0),
)

# OVS_TUNNEL_KEY_ATTR_*
TUN_ID, TUN_GENEVE, TUN_VXLAN, TUN_ERSPAN, TUN_GTPU = 0, 8, 11, 15, 16
# FLOW_TNL_F_* bits, in the order OVS prints them, and the attributes that set them.
TUN_FLAG_NAMES = ((1, "oam"), (2, "df"), (4, "csum"), (8, "key"))
TUN_FLAG_OF_TYPE = {TUN_ID: 8, 5: 2, 6: 4, 7: 1}
TUNNEL_ATTRS: tuple[AttrSpec, ...] = (
    _fixed(lay.TUN_ID),
    _fixed(lay.TUN_IPV4_SRC),
    _fixed(lay.TUN_IPV4_DST),
    _fixed(lay.TUN_TOS),
    _fixed(lay.TUN_TTL),
    AttrSpec("df", 0),
    AttrSpec("csum", 0),
    AttrSpec("oam", 0),
    AttrSpec("geneve", VARIABLE),
    _fixed(lay.TUN_TP_SRC),
    _fixed(lay.TUN_TP_DST),
    AttrSpec("vxlan", NESTED),
    _fixed(lay.TUN_IPV6_SRC),
    _fixed(lay.TUN_IPV6_DST),
    AttrSpec("pad", 0),
    AttrSpec("erspan", VARIABLE),
    AttrSpec("gtpu", VARIABLE),
)

# OVS_VXLAN_EXT_*: only GBP (1) is known; the others up to GPE (8) expect no payload.
VXLAN_GBP = 1
VXLAN_ATTRS: tuple[AttrSpec, ...] = tuple(
    _fixed(lay.VXLAN_GBP) if t == VXLAN_GBP else AttrSpec(f"key{t}", 0) for t in range(9)
)

# OVS_NSH_KEY_ATTR_*
NSH_BASE, NSH_MD1 = 1, 2
NSH_ATTRS: tuple[AttrSpec, ...] = (
    AttrSpec("unspec", 0),
    AttrSpec("base", 8),
    AttrSpec("md1", 16),
    AttrSpec("md2", VARIABLE),
)
