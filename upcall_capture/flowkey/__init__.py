"""Netlink flow keys (OVS_KEY_ATTR_*) to Open vSwitch's own text, and to fields.

`format_key(data)` prints a key exactly as OVS's odp_flow_key_format() does, the text
of `ovs-dpctl dump-flows` and of vswitchd's upcall logs, malformed keys included:
`(bad key length N, expected M)(..)`, `***N leftover bytes*** (..)`, `<empty>`.
It never raises, whatever the bytes.

Truncated keys: `full_len` is the key's real length when `data` holds only its first
bytes (the capture cap). Every attribute that was captured whole is printed exactly as
OVS would print it; the walk stops at the first top-level attribute that was cut
(nested parts of a cut attribute are not printed either), and the text ends with
`,<key truncated: captured C of N bytes>` (no comma when nothing came before) instead
of OVS's leftover-bytes text. A `full_len` shorter than `data` cuts `data` to it.

`decode_key(data)` gives the same text and a flat dict of fields, from one walk.
Field names follow OVS's text: `recirc_id`, `dp_hash`, `skb_priority`, `in_port`,
`skb_mark`, `ct_state`, `ct_zone`, `ct_mark`, `ct_label` (int), `ct_tuple4.src` ...,
`tunnel.tun_id`, `tunnel.src`/`dst` (int), `tunnel.ipv6_src`/`ipv6_dst` (int),
`tunnel.tos`, `tunnel.ttl`, `tunnel.tp_src`/`tp_dst`, `tunnel.flags` (FLOW_TNL_F_* bits),
`tunnel.geneve` (bytes), `tunnel.vxlan_gbp_id`/`_flags`, `tunnel.erspan_ver`/`_idx`/
`_dir`/`_hwid`, `tunnel.gtpu_flags`/`_msgtype`, `eth.src`/`eth.dst` (bytes), `eth_type`,
`vlan.tci`/`vid`/`pcp`/`cfi`, `packet_type.ns`/`id`, `mpls.label`/`tc`/`ttl`/`bos` (top
of the stack), `ipv4.src`/`dst` (int), `ipv4.proto`/`tos`/`ttl`/`frag`, `ipv6.src`/`dst`
(128-bit int), `ipv6.label`/`proto`/`tclass`/`hlimit`/`frag`, `proto` (the L4 protocol
from ipv4 or ipv6), `tp_src`/`tp_dst` (tcp, udp or sctp), `tcp_flags`, `icmp.type`/
`code`, `icmpv6.type`/`code`, `arp.sip`/`tip` (int), `arp.op`, `arp.sha`/`tha` (bytes),
`nd.target` (int), `nd.sll`/`tll` (bytes), `nd_ext.nd_reserved`/`nd_options_type`,
`nsh.flags`/`ttl`/`mdtype`/`np`/`spi`/`si` and `nsh.c1`..`c4` (MD type 1), and
`keyN` (bytes) for an attribute type OVS does not know, such as the kernel's `key32`
(`tunnel.keyN` and `tunnel.vxlan_keyN` inside a tunnel). Attributes with a bad length
give no fields.

VLAN: fields are set in key order, so for a VLAN key the innermost encap() wins for
a name found at several depths: `eth_type` is the inner Ethernet type (as OpenFlow's
dl_type) and `vlan.vid` the inner VLAN's (QinQ), not 0x8100 and the outer tag.

`KeyCache` serves repeated keys (upcall storms) from a bounded dictionary. New keys of a
known shape go through a compiled per-shape function (see `shapes`), which is what
keeps a scan of new flows cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from upcall_capture.flowkey.layouts import Fields, FieldValue
from upcall_capture.flowkey.shapes import CompiledShape, ShapeCache

__all__ = ["DecodedKey", "FieldValue", "KeyCache", "decode_key", "format_key",
           "key_shape"]

_SHAPES = ShapeCache()


@dataclass(frozen=True, slots=True)
class DecodedKey:
    text: str
    fields: Fields


def _normalise(data: bytes, full_len: int | None) -> tuple[bytes, int]:
    if type(data) is not bytes:
        data = bytes(data)
    if full_len is None or full_len == len(data):
        return data, len(data)
    if full_len < len(data):
        data = data[: max(full_len, 0)]
        return data, len(data)
    return data, full_len


def format_key(data: bytes, full_len: int | None = None) -> str:
    """OVS's odp_flow_key_format() text of a netlink flow key."""
    data, full_len = _normalise(data, full_len)
    return _SHAPES.text(data, full_len)


def decode_key(data: bytes, full_len: int | None = None) -> DecodedKey:
    """The key's text (as `format_key`) and its fields, from one walk."""
    data, full_len = _normalise(data, full_len)
    text, fields = _SHAPES.decode(data, full_len)
    return DecodedKey(text, fields)


# key_shape(data): the shape of a whole key, when one is compiled here, else None (decode
# the key instead). Its `port(data)` and `has_eth` are the in_port and whether there is
# an eth() attribute, as the key's text would show them, for a fraction of its cost. The
# cache's method itself: a function around it cost a tenth of shedding an upcall.
key_shape: Callable[[bytes | memoryview], CompiledShape | None] = _SHAPES.whole


class KeyCache:
    """What `describe` makes of a key (its text, by default), by key bytes, bounded to
    about `maxsize` entries.

    Two generations: hits are served from the recent one, or promoted from the older
    one; when the recent one fills up it becomes the older one and the previous older
    one is dropped. That is LRU-like eviction at the cost of one dict look-up per hit.
    """

    def __init__(self, maxsize: int = 65536,
                 describe: Callable[[bytes, int | None], Any] = format_key) -> None:
        if maxsize < 2:
            raise ValueError("KeyCache maxsize must be at least 2")
        self.maxsize = maxsize
        self._describe = describe
        self._generation = maxsize // 2
        self._recent: dict[object, Any] = {}
        self._older: dict[object, Any] = {}

    def __len__(self) -> int:
        return len(self._recent) + len(self._older)

    def get(self, data: bytes, full_len: int | None = None) -> Any:
        if type(data) is not bytes:
            data = bytes(data)
        key: object = data if full_len is None or full_len == len(data) else (data, full_len)
        found = self._recent.get(key)
        if found is not None:
            return found
        found = self._older.get(key)
        if found is None:
            found = self._describe(data, full_len)
        if len(self._recent) >= self._generation:
            self._older = self._recent
            self._recent = {}
        self._recent[key] = found
        return found
