"""Netlink datapath actions (OVS_ACTION_ATTR_*) to Open vSwitch's own text.

`format_actions(data)` prints an action list exactly as OVS 3.1's format_odp_actions()
does (with no port names), the text of `ovs-dpctl dump-flows` and vswitchd's logs:
`drop` for an empty list, `bad length N, expected M for: actionT(..)` for a fixed-size
action of the wrong size or an unknown type, `***N leftover bytes*** (..)` after the
last well-formed attribute, `userspace(error)`-style text where OVS's nested parse
fails. It never raises, whatever the bytes.

Types follow OVS 3.1's userspace numbering: 23 is tnl_push, 24 tnl_pop, 25 drop and
26 lb_output, so the kernel's later dec_ttl (23) prints as OVS 3.1 would print it.

`format_megaflow(key, mask)` prints a flow key with its mask as odp_flow_format() does
with verbose off, the megaflow text of `ovs-dpctl dump-flows`: `ipv4(src=10.0.0.1/
255.255.255.0,...)`, exact fields without a mask, wildcarded fields and attributes left
out as OVS leaves them out. `format_megaflow(key, mask, verbose=True)` is its verbose
text, that of vswitchd's dpif:dbg log of flow puts: wildcarded fields and attributes
printed with their zero mask (`dp_hash(0/0)`, `ipv6(src=::/::,...)`), ct_state as a
number.

Where OVS trusts a length it reads past an attribute (a set() key longer than the
action, a short tnl_push), this reads the bytes that follow in `data`, as OVS does,
and zeros past its end, where OVS reads whatever memory follows. Strings (ct helper,
timeout) are OVS's bytes decoded as UTF-8 with surrogate escapes.
"""

from __future__ import annotations

from upcall_capture.actions.masked import flow_text
from upcall_capture.actions.text import list_text

__all__ = ["format_actions", "format_megaflow"]


def format_actions(data: bytes) -> str:
    """OVS's format_odp_actions() text of a netlink action list."""
    data = bytes(data)
    try:
        return list_text(data, 0, len(data))
    except Exception as error:  # a bug here must not take a capture down
        return f"<actions not decoded: {type(error).__name__}: {data.hex()}>"


def format_megaflow(key: bytes, mask: bytes, verbose: bool = False) -> str:
    """OVS's odp_flow_format() text of a key with its mask."""
    key, mask = bytes(key), bytes(mask)
    try:
        return flow_text(key, mask, verbose)
    except Exception as error:  # as in format_actions
        return f"<megaflow not decoded: {type(error).__name__}: {key.hex()} {mask.hex()}>"
