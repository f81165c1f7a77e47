"""Key attributes with a mask, as set_masked() prints them (OVS's format_odp_key_attr()
with verbose off). A field whose mask is all zeros is left out; a partial mask prints
as `value/mask`. `mask=None` is OVS's unmasked, non-verbose form (set_masked() of a
key too big to split), which still differs from the flowkey text: no tun_id, and
empty ct_mark(), ct_zone() and ct_label().

With `verbose` (odp_flow_format()'s verbose=true, vswitchd's dpif:dbg text) nothing
is left out: a wildcarded field prints as `value/0`, a wildcarded attribute too.

Works on payload bytes; nested keys (encap, tunnel, nsh) are walked within them.
"""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import Callable

from upcall_capture.actions.flags import (
    CT_STATE_NAMES,
    TCP_FLAG_NAMES,
    TUNNEL_FLAG_NAMES,
    flags_text,
    masked_flags_text,
)
from upcall_capture.actions.netlink import Attr, first_of_each, read, walk
from upcall_capture.actions.nsh import NshKey
from upcall_capture.flowkey import attrs
from upcall_capture.flowkey.layouts import hex_int

Mask = bytes | None

_NESTED, _VARIABLE = attrs.NESTED, attrs.VARIABLE
KEY_LENGTHS = tuple(spec.length for spec in attrs.KEY_ATTRS)
TUNNEL_LENGTHS = tuple(spec.length for spec in attrs.TUNNEL_ATTRS)
VXLAN_LENGTHS = tuple(spec.length for spec in attrs.VXLAN_ATTRS)
NSH_LENGTHS = tuple(spec.length for spec in attrs.NSH_ATTRS)

KEY_NAMES = (
    "unspec encap skb_priority in_port eth vlan eth_type ipv4 ipv6 tcp udp icmp icmpv6 arp "
    "nd skb_mark tunnel sctp tcp_flags dp_hash recirc_id mpls ct_state ct_zone ct_mark "
    "ct_label ct_tuple4 ct_tuple6 nsh packet_type nd_ext"
).split() + ["<error: kernel-only tunnel_info>"]

(UNSPEC, ENCAP, PRIORITY, IN_PORT, ETHERNET, VLAN, ETHERTYPE, IPV4, IPV6, TCP, UDP, ICMP,
 ICMPV6, ARP, ND, SKB_MARK, TUNNEL, SCTP, TCP_FLAGS, DP_HASH, RECIRC_ID, MPLS, CT_STATE,
 CT_ZONE, CT_MARK, CT_LABELS, CT_TUPLE4, CT_TUPLE6, NSH, PACKET_TYPE, ND_EXT) = range(31)

_FRAG = ("no", "first", "later")


def _chomp(text: str) -> str:
    return text[:-1] if text.endswith(",") else text


def spaced_hex(data: bytes) -> str:
    return data.hex(" ")


def _int(data: bytes) -> int:
    return int.from_bytes(data, "big")


def _u32(data: bytes) -> int:
    return struct.unpack("<I", data)[0]


def _u16(data: bytes) -> int:
    return struct.unpack("<H", data)[0]


# -- one field: formatter(name, key bytes, mask bytes or None, verbose) -> "name=...,"
# or "" (only without verbose, for a mask of zeros) --------------------------------

def _shown(mask: Mask) -> bool:
    return mask is None or any(mask)


def _full(mask: Mask) -> bool:
    return mask is None or mask.count(0xFF) == len(mask)


def _field(render: Callable[[bytes], str], mask_render: Callable[[bytes], str] | None = None):
    mask_render = mask_render or render

    def field(name: str, key: bytes, mask: Mask, verbose: bool) -> str:
        if not (verbose or _shown(mask)):
            return ""
        text = f"{name}={render(key)}"
        if not _full(mask):
            text += "/" + mask_render(mask)
        return text + ","

    return field


def _mac(b: bytes) -> str:
    return b.hex(":")


def _ntop6(b: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6, b)


eth_field = _field(_mac)
ipv4_field = _field(socket.inet_ntoa)
in6_field = _field(_ntop6)
u8x_field = _field(lambda b: hex_int(b[0]))
u8u_field = _field(lambda b: str(b[0]), lambda b: hex_int(b[0]))
be16_field = _field(lambda b: str(_int(b)), lambda b: hex_int(_int(b)))
be16x_field = _field(lambda b: hex_int(_int(b)))


def be64_field(name: str, key: bytes, mask: Mask, verbose: bool) -> str:
    # Without a mask OVS takes the mask as zero here, so verbose-off text omits it.
    if not verbose and (mask is None or not any(mask)):
        return ""
    text = f"{name}=0x{_int(key):x}"
    if not _full(mask):
        text += f"/{hex_int(_int(mask))}"
    return text + ","


def label_field(name: str, key: bytes, mask: Mask, verbose: bool) -> str:
    if not verbose and mask is not None and not any(mask):
        return ""
    text = f"{name}={hex_int(_int(key))}"
    if mask is not None and _int(mask) & 0xFFFFF != 0xFFFFF:
        text += f"/{hex_int(_int(mask))}"
    return text + ","


def frag_field(name: str, key: bytes, mask: Mask, verbose: bool) -> str:
    # OVS's format_frag() ignores verbose: a wildcarded frag is left out even then.
    if mask is not None and not mask[0]:
        return ""
    if mask is not None and mask[0] != 0xFF:
        return f"error: partial mask not supported for frag ({hex_int(mask[0])}),"
    return f"{name}={_FRAG[key[0]] if key[0] < 3 else '<error>'},"


def nd_reserved_field(name: str, key: bytes, mask: Mask, verbose: bool) -> str:
    return f"{name}=0x{_int(key):x},"  # OVS prints it as if fully masked


FieldText = Callable[[str, bytes, Mask, bool], str]
Field = tuple[FieldText, str, int, int]

STRUCTS: dict[int, tuple[Field, ...]] = {
    ETHERNET: ((eth_field, "src", 0, 6), (eth_field, "dst", 6, 6)),
    IPV4: ((ipv4_field, "src", 0, 4), (ipv4_field, "dst", 4, 4), (u8u_field, "proto", 8, 1),
           (u8x_field, "tos", 9, 1), (u8u_field, "ttl", 10, 1), (frag_field, "frag", 11, 1)),
    IPV6: ((in6_field, "src", 0, 16), (in6_field, "dst", 16, 16),
           (label_field, "label", 32, 4), (u8u_field, "proto", 36, 1),
           (u8x_field, "tclass", 37, 1), (u8u_field, "hlimit", 38, 1),
           (frag_field, "frag", 39, 1)),
    ICMP: ((u8u_field, "type", 0, 1), (u8u_field, "code", 1, 1)),
    ARP: ((ipv4_field, "sip", 0, 4), (ipv4_field, "tip", 4, 4), (be16_field, "op", 8, 2),
          (eth_field, "sha", 10, 6), (eth_field, "tha", 16, 6)),
    ND: ((in6_field, "target", 0, 16), (eth_field, "sll", 16, 6), (eth_field, "tll", 22, 6)),
    ND_EXT: ((nd_reserved_field, "nd_reserved", 0, 4), (u8u_field, "nd_options_type", 4, 1)),
    CT_TUPLE4: ((ipv4_field, "src", 0, 4), (ipv4_field, "dst", 4, 4),
                (u8u_field, "proto", 12, 1), (be16_field, "tp_src", 8, 2),
                (be16_field, "tp_dst", 10, 2)),
    CT_TUPLE6: ((in6_field, "src", 0, 16), (in6_field, "dst", 16, 16),
                (u8u_field, "proto", 36, 1), (be16_field, "src_port", 32, 2),
                (be16_field, "dst_port", 34, 2)),
}
_PORTS = ((be16_field, "src", 0, 2), (be16_field, "dst", 2, 2))
STRUCTS.update({TCP: _PORTS, UDP: _PORTS, SCTP: _PORTS, ICMPV6: STRUCTS[ICMP]})


def fields_text(fields: tuple[Field, ...], key: bytes, mask: Mask, verbose: bool) -> str:
    return _chomp("".join(
        f(name, key[o : o + n], None if mask is None else mask[o : o + n], verbose)
        for f, name, o, n in fields))


# -- whole masks --------------------------------------------------------------------

_ALL_BYTES = frozenset({PRIORITY, IN_PORT, ETHERNET, VLAN, ETHERTYPE, IPV4, TCP, UDP, ICMP,
                        ICMPV6, ND, ND_EXT, SKB_MARK, TUNNEL, SCTP, DP_HASH, RECIRC_ID, MPLS,
                        CT_STATE, CT_ZONE, CT_MARK, CT_LABELS, PACKET_TYPE, NSH})
_PREFIX_BYTES = {ARP: 22, CT_TUPLE4: 13, CT_TUPLE6: 37}  # up to the last field


def mask_is(attr_type: int, mask: bytes, ones: bool) -> bool:
    """odp_mask_is_constant__(): all ones (exact) or all zeros (wildcard)?"""
    byte = 0xFF if ones else 0
    if attr_type in _ALL_BYTES:
        return mask.count(byte) == len(mask)
    if attr_type in _PREFIX_BYTES:
        return read(mask, 0, _PREFIX_BYTES[attr_type]).count(byte) == _PREFIX_BYTES[attr_type]
    if attr_type == TCP_FLAGS:
        return _int(read(mask, 0, 2)) & 0xFFF == (0xFFF if ones else 0)
    if attr_type == IPV6:
        m = read(mask, 0, 40)
        label = _int(m[32:36]) & 0xFFFFF
        return label == (0xFFFFF if ones else 0) and (m[:32] + m[36:]).count(byte) == 36
    return False


def _length_error(attr_type: int, key: bytes, mask: Mask, lengths: tuple[int, ...],
                  name_it: bool) -> str | None:
    """check_attr_len(): OVS's text for a key or mask of the wrong length, else None."""
    if attr_type >= len(lengths) or lengths[attr_type] < 0:
        return None
    expected = lengths[attr_type]
    bad_key = len(key) != expected
    bad_mask = mask is not None and len(mask) != expected
    if not (bad_key or bad_mask):
        return None
    text = f"key{attr_type}" if name_it else ""
    if bad_key:
        text += f"(bad key length {len(key)}, expected {expected})("
    text += spaced_hex(key)
    if mask is not None:
        text += "/"
        if bad_mask:
            text += f"(bad mask length {len(mask)}, expected {expected})("
        text += spaced_hex(mask)
    return text + ")"


def wildcard_mask(attr_type: int, key: bytes, lengths: tuple[int, ...]) -> bytes:
    """generate_all_wildcard_mask(): zeros as long as `key`; for a nested key, nothing.
    (OVS walks the nested key from its own header, which is longer than its payload,
    so the walk ends at once: an empty mask, which encap() prints as no mask at all.)"""
    if attr_type < len(lengths) and lengths[attr_type] == _NESTED:
        return b""
    return bytes(len(key))


# -- attribute bodies -----------------------------------------------------------------

def _u32_counter(key: bytes, mask: Mask, exact: bool) -> str:
    text = hex_int(_u32(key))
    return text if exact else text + "/" + hex_int(_u32(mask))


def _vlan_tci(tci: int, mask: int, verbose: bool) -> str:
    parts = []
    if verbose or tci & 0xFFF or mask & 0xFFF:
        parts.append(f"vid={tci & 0xFFF}" + ("" if mask & 0xFFF == 0xFFF else
                                             f"/0x{mask & 0xFFF:x}"))
    if verbose or tci >> 13 or mask >> 13:
        parts.append(f"pcp={tci >> 13}" + ("" if mask >> 13 == 7 else f"/0x{mask >> 13:x}"))
    if not tci & 0x1000:
        parts.append("cfi=0")
    return ",".join(parts)


def vlan_tci_text(tci: int, mask: int = 0xFFFF) -> str:
    """format_vlan_tci() with verbose off (push_vlan uses it too)."""
    return _vlan_tci(tci, mask, verbose=False)


def mpls_lse_text(lse: int) -> str:
    return f"label={lse >> 12},tc={lse >> 9 & 7},ttl={lse & 255},bos={lse >> 8 & 1}"


class _Unclosed(str):
    """A body after which OVS returns without the closing `)` (an MPLS length error)."""


def _mpls(key: bytes, mask: Mask, exact: bool) -> str:
    if not key or len(key) % 4:
        return _Unclosed(f"(bad key length {len(key)})")
    lses = struct.unpack(f">{len(key) // 4}I", key)
    if exact:
        return ",".join(mpls_lse_text(lse) for lse in lses)
    if len(mask) != len(key):
        return _Unclosed(f"(key length {len(key)} != mask length {len(mask)})")
    masks = struct.unpack(f">{len(key) // 4}I", mask)
    return ",".join(
        f"label={k >> 12}/0x{m >> 12:x},tc={k >> 9 & 7}/{m >> 9 & 7:x},"
        f"ttl={k & 255}/0x{m & 255:x},bos={k >> 8 & 1}/{m >> 8 & 1:x}"
        for k, m in zip(lses, masks, strict=True))


def _u128(key: bytes, mask: Mask, verbose: bool) -> str:
    if not verbose and (mask is None or not any(mask)):
        return ""
    text = hex_int(int.from_bytes(key, "little"))
    if not _full(mask):
        text += "/" + hex_int(int.from_bytes(mask, "little"))
    return text


def _ct_state(key: bytes, mask: Mask, exact: bool, verbose: bool) -> str:
    if verbose:  # OVS prints verbose ct_state as numbers, not flag names
        return _u32_counter(key, mask, exact)
    if exact:
        return flags_text(_u32(key), CT_STATE_NAMES)
    return masked_flags_text(_u32(key), _u32(mask) if any(mask) else 0, 0xFFFFFFFF,
                             CT_STATE_NAMES)


def _packet_type(key: bytes, mask: Mask, verbose: bool) -> str:
    value, m = _int(key), 0xFFFFFFFF if mask is None else _int(mask)
    return _chomp(be16_field("ns", (value >> 16).to_bytes(2, "big"),
                             (m >> 16).to_bytes(2, "big"), verbose)
                  + be16x_field("id", key[2:], (m & 0xFFFF).to_bytes(2, "big"), verbose))


def _nsh(key: bytes, mask: Mask) -> str:
    nsh = NshKey()
    nsh_mask = NshKey.all_ones()
    out = []
    mask_attrs = {} if mask is None else first_of_each(mask, 0, len(mask))
    for sub in walk(key, 0, len(key))[0]:
        sub_mask_attr = mask_attrs.get(sub.type)
        value = sub.payload(key)
        sub_mask = None if sub_mask_attr is None else sub_mask_attr.payload(mask)
        error = _length_error(sub.type, value, sub_mask, NSH_LENGTHS, True)
        if error is not None:
            out.append(error)
            continue
        nsh.update(sub.type, value)
        if sub_mask is not None:
            nsh_mask.update(sub.type, sub_mask)
    out.append(nsh.text() if mask is None else nsh.masked_text(nsh_mask))
    return "".join(out)


def _body(attr_type: int, key: bytes, mask: Mask, verbose: bool) -> str:
    """The text inside `name(...)`; an _Unclosed one where OVS stops before the `)`."""
    exact = True if mask is None else mask_is(attr_type, mask, ones=True)
    if attr_type in STRUCTS:
        return fields_text(STRUCTS[attr_type], key, mask, verbose)
    if attr_type in (PRIORITY, SKB_MARK, DP_HASH, RECIRC_ID):
        return _u32_counter(key, mask, exact)
    if attr_type in (CT_MARK, CT_ZONE):
        if not verbose and (mask is None or not any(mask)):
            return ""
        number = _u32 if attr_type == CT_MARK else _u16
        return hex_int(number(key)) + ("" if exact else "/" + hex_int(number(mask)))
    if attr_type == CT_STATE:
        return _ct_state(key, mask, exact, verbose)
    if attr_type == CT_LABELS:
        return _u128(key, mask, verbose)
    if attr_type == IN_PORT:
        return str(_u32(key)) if exact else f"{_u32(key)}/{hex_int(_u32(mask))}"
    if attr_type == PACKET_TYPE:
        return _packet_type(key, mask, verbose)
    if attr_type == VLAN:
        return _vlan_tci(_int(key), 0xFFFF if mask is None else _int(mask), verbose)
    if attr_type == ETHERTYPE:
        return f"0x{_int(key):04x}" + ("" if exact else f"/0x{_int(mask):04x}")
    if attr_type == TCP_FLAGS:
        if exact:
            return flags_text(_int(key), TCP_FLAG_NAMES)
        return masked_flags_text(_int(key), _int(mask) & 0xFFF, 0xFFF, TCP_FLAG_NAMES)
    if attr_type == MPLS:
        return _mpls(key, mask, exact)
    if attr_type == TUNNEL:
        return tunnel_text(key, mask, verbose)
    if attr_type == NSH:
        return _nsh(key, mask)
    if attr_type == ENCAP:
        if mask and key:
            return flow_text(key, mask, verbose)
        return flow_text(key, None, verbose) if key else ""
    text = spaced_hex(key)
    return text if exact else text + "/" + spaced_hex(mask)


def attr_name(attr_type: int) -> str:
    return KEY_NAMES[attr_type] if attr_type < len(KEY_NAMES) else f"key{attr_type}"


def attr_body_text(attr_type: int, key: bytes, mask: Mask, verbose: bool) -> str:
    """format_odp_key_attr__(): lengths already checked."""
    body = _body(attr_type, key, mask, verbose)
    return f"{attr_name(attr_type)}({body}" + ("" if isinstance(body, _Unclosed) else ")")


def key_attr_text(attr_type: int, key: bytes, mask: Mask) -> str:
    """format_odp_key_attr(attr, mask, verbose=false)."""
    error = _length_error(attr_type, key, mask, KEY_LENGTHS, False)
    return error if error is not None else attr_body_text(attr_type, key, mask, False)


# -- tunnel --------------------------------------------------------------------------

_TUN_FIELDS: dict[int, tuple[FieldText, str]] = {
    0: (be64_field, "tun_id"), 1: (ipv4_field, "src"), 2: (ipv4_field, "dst"),
    3: (u8x_field, "tos"), 4: (u8u_field, "ttl"), 9: (be16_field, "tp_src"),
    10: (be16_field, "tp_dst"), 12: (in6_field, "ipv6_src"), 13: (in6_field, "ipv6_dst"),
}
_TUN_FLAG_OF_TYPE = {0: 8, 5: 2, 6: 4, 7: 1}
_TUN_VXLAN, _TUN_GENEVE, _TUN_ERSPAN, _TUN_GTPU = 11, 8, 15, 16


def unknown_key_text(attr_type: int, key: bytes, mask: Mask) -> str:
    text = f"key{attr_type}({spaced_hex(key)}"
    if mask is not None and not mask_is(attr_type, mask, ones=True):
        text += "/" + spaced_hex(mask)
    return text + "),"


def _nested(key: bytes, mask: Mask, lengths: tuple[int, ...]):
    """Each attribute nested in `key`: (type, value, its mask, its length error or None)."""
    mask_attrs = None if mask is None else first_of_each(mask, 0, len(mask))
    for sub in walk(key, 0, len(key))[0]:
        value = sub.payload(key)
        sub_mask = _sub_mask(mask, mask_attrs, sub.type, value, lengths)
        yield sub.type, value, sub_mask, _length_error(sub.type, value, sub_mask, lengths,
                                                       True)


def _vxlan(key: bytes, mask: Mask, verbose: bool) -> str:
    out = []
    for sub_type, value, sub_mask, error in _nested(key, mask, VXLAN_LENGTHS):
        if error is not None:
            out.append(error)
        elif sub_type == 1:
            gbp = _u32(value)
            m = None if sub_mask is None else _u32(sub_mask)
            out.append("gbp(" + _chomp(
                be16_field("id", (gbp & 0xFFFF).to_bytes(2, "big"),
                           None if m is None else (m & 0xFFFF).to_bytes(2, "big"), verbose)
                + u8x_field("flags", bytes([gbp >> 16 & 0xFF]),
                            None if m is None else bytes([m >> 16 & 0xFF]), verbose)) + "),")
        else:
            out.append(unknown_key_text(sub_type, value, sub_mask))
    return _chomp("".join(out))


def geneve_opts_text(opts: bytes, mask: Mask, verbose: bool = False) -> str:
    """format_geneve_opts() (tnl_push's header uses it with verbose off)."""
    out, pos, left = [], 0, len(opts)
    while left > 0:
        if left < 4:
            out.append(f"opt len {left} less than minimum 4")
            break
        opt = read(opts, pos, 4)
        data_len = (opt[3] & 0x1F) * 4
        m = None if mask is None else read(mask, pos, 4)
        length = 4 + data_len
        if length > left:
            out.append(f"opt len {length} greater than remaining {left}")
            break
        len_mask = None if m is None else bytes([0xFF if m[3] & 0x1F == 0x1F else m[3] & 0x1F])
        text = ("{" + be16x_field("class", opt[:2], None if m is None else m[:2], verbose)
                + u8x_field("type", opt[2:3], None if m is None else m[2:3], verbose)
                + u8u_field("len", bytes([data_len]), len_mask, verbose))
        value = read(opts, pos + 4, data_len)
        value_mask = None if mask is None else read(mask, pos + 4, data_len)
        if data_len and (verbose or _shown(value_mask)):
            text += hex_int(_int(value))
            if value_mask is not None and not _full(value_mask):
                text += "/" + hex_int(_int(value_mask))
        else:
            text = _chomp(text)
        out.append(text + "}")
        pos += length
        left -= length
    return "".join(out)


def _geneve(key: bytes, mask: Mask, verbose: bool) -> str:
    if mask is not None and len(mask) != len(key):
        return f"value len {len(key)} different from mask len {len(mask)}"
    return geneve_opts_text(key, mask, verbose)


def _erspan(key: bytes, mask: Mask, verbose: bool) -> str:
    opts = read(key, 0, 12)
    m = None if mask is None else read(mask, 0, 12)
    version = struct.unpack("<i", opts[:4])[0]
    text = u8u_field("ver", opts[:1], None if m is None else m[:1], verbose)
    if version == 1:
        text += f"idx={hex_int(_int(opts[4:8]))}"
        text += ("," if m is None else f"/{hex_int(_int(m[4:8]))},")
    elif version == 2:
        def dir_hwid(b: bytes) -> tuple[bytes, bytes]:
            return bytes([b[11] >> 3 & 1]), bytes([b[11] >> 4])
        d, h = dir_hwid(opts)
        dm, hm = dir_hwid(m) if m is not None else (None, None)
        text += u8u_field("dir", d, dm, verbose) + u8x_field("hwid", h, hm, verbose)
    return _chomp(text)


def _gtpu(key: bytes, mask: Mask, verbose: bool) -> str:
    opts = read(key, 0, 2)
    m = None if mask is None else read(mask, 0, 2)
    return _chomp(u8x_field("flags", opts[:1], None if m is None else m[:1], verbose)
                  + u8u_field("msgtype", opts[1:], None if m is None else m[1:], verbose))


_TUN_OPTIONS = {_TUN_VXLAN: ("vxlan", _vxlan), _TUN_GENEVE: ("geneve", _geneve),
                _TUN_ERSPAN: ("erspan", _erspan), _TUN_GTPU: ("gtpu", _gtpu)}


def _sub_mask(mask: Mask, mask_attrs: dict[int, Attr] | None, attr_type: int, value: bytes,
              lengths: tuple[int, ...]) -> Mask:
    if mask_attrs is None:
        return None
    found = mask_attrs.get(attr_type)
    return found.payload(mask) if found is not None else wildcard_mask(attr_type, value, lengths)


def tunnel_text(key: bytes, mask: Mask, verbose: bool) -> str:
    """format_odp_tun_attr()."""
    out, flags, mask_flags = [], 0, 0
    for sub_type, value, sub_mask, error in _nested(key, mask, TUNNEL_LENGTHS):
        if error is not None:
            out.append(error)
            continue
        if sub_type in _TUN_FIELDS:
            formatter, name = _TUN_FIELDS[sub_type]
            out.append(formatter(name, value, sub_mask, verbose))
        elif sub_type in _TUN_OPTIONS:
            name, option_text = _TUN_OPTIONS[sub_type]
            out.append(f"{name}({option_text(value, sub_mask, verbose)}),")
        elif sub_type >= len(TUNNEL_LENGTHS):
            out.append(unknown_key_text(sub_type, value, sub_mask))
        flags |= _TUN_FLAG_OF_TYPE.get(sub_type, 0)
        if sub_type == 0 and sub_mask is not None:
            mask_flags |= 8
    if mask is not None:
        for sub in walk(mask, 0, len(mask))[0]:
            if sub.type in (5, 6, 7):
                mask_flags |= _TUN_FLAG_OF_TYPE[sub.type]
        if mask_flags or verbose:
            out.append(f"flags({masked_flags_text(flags, mask_flags, 0xF, TUNNEL_FLAG_NAMES)}),")
    else:
        out.append(f"flags({flags_text(flags, TUNNEL_FLAG_NAMES)}),")
    return _chomp("".join(out))


# -- a whole key (inside encap) -------------------------------------------------------

@functools.lru_cache(maxsize=8192)
def _attr_text(attr_type: int, key: bytes, mask: Mask, verbose: bool) -> str:
    """attr_body_text(), remembered: from one new flow to the next, most attributes of a
    megaflow (recirc_id, in_port, eth, the ct fields) are the same, and a megaflow's text
    is what a storm of new flows costs a worker most."""
    return attr_body_text(attr_type, key, mask, verbose)


def flow_text(key: bytes, mask: Mask, verbose: bool = False) -> str:
    """odp_flow_format(key, mask, verbose)."""
    if not key:
        return "<empty>"
    out: list[str] = []
    first = True
    has_eth_type = has_packet_type = False
    found, stop, left = walk(key, 0, len(key))
    # nl_attr_find__() of each key attribute's type in the mask, from one walk of it.
    mask_attrs = first_of_each(mask, 0, len(mask)) if mask else {}
    for a in found:
        value = a.payload(key)
        ma = mask_attrs.get(a.type)
        sub_mask = None if ma is None else ma.payload(mask)
        error = _length_error(a.type, value, sub_mask, KEY_LENGTHS, False)
        if error is not None:
            out.append(error)
            continue
        has_eth_type |= a.type == ETHERTYPE
        has_packet_type |= a.type == PACKET_TYPE
        nested = a.type < len(KEY_LENGTHS) and KEY_LENGTHS[a.type] == _NESTED
        wildcard = bool(mask) and (sub_mask is None or mask_is(a.type, sub_mask, ones=False))
        if verbose or not wildcard or nested:
            if wildcard and sub_mask is None:
                sub_mask = wildcard_mask(a.type, value, KEY_LENGTHS)
            out.append(("" if first else ",") + _attr_text(a.type, value, sub_mask, verbose))
            first = False
        elif a.type == ETHERNET and not has_packet_type:
            out.append(("" if first else ",") + "eth()")  # sic: `first` stays as it was
        elif a.type == PACKET_TYPE:
            has_packet_type = False
    if left:
        if left == len(key):
            out.append("<empty>")
        out.append(f",***{left} leftover bytes*** ({read(key, stop, left).hex()})")
    if not has_eth_type and mask is not None:
        ma = mask_attrs.get(ETHERTYPE)
        if ma is not None:
            out.append(f",eth_type(0/0x{_int(read(mask, ma.offset, 2)):04x})")
    return "".join(out)
