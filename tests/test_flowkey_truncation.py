"""Keys cut by the capture cap: whole attributes as OVS prints them, then a marker."""

from __future__ import annotations

import keyenc as k
import pytest

from upcall_capture.flowkey import KeyCache, decode_key, format_key
from upcall_capture.flowkey.shapes import ShapeCache

# A long kernel-order key, as its top-level attributes: tunnel, conntrack, QinQ, IPv6.
ATTRIBUTES = [
    k.u32(k.RECIRC_ID, 5),
    k.u32(k.DP_HASH, 0x1234),
    k.u32(k.PRIORITY, 0),
    k.tunnel(
        k.tun_id(0x99),
        k.attr(k.TUN_IPV4_SRC, k.ip4("192.0.2.1")),
        k.attr(k.TUN_IPV4_DST, k.ip4("192.0.2.2")),
        k.u8(k.TUN_TTL, 64),
        k.attr(k.TUN_GENEVE, k.geneve_opt(0x102, 0x80, b"\x00\x00\x00\x0b")),
        k.attr(k.TUN_CSUM),
    ),
    k.u32(k.IN_PORT, 4),
    k.u32(k.SKB_MARK, 0),
    k.u32(k.CT_STATE, 0x21),
    k.u16(k.CT_ZONE, 9),
    k.u32(k.CT_MARK, 0),
    k.ct_label(0xABC),
    k.ct_tuple6("2001:db8::10", "2001:db8::20", 40000, 443, 6),
    k.eth("00:01:02:03:04:05", "10:11:12:13:14:15"),
    k.eth_type(0x88A8),
    k.vlan(100, 3),
    k.encap(
        k.eth_type(0x8100),
        k.vlan(200, 0, cfi=False),
        k.encap(
            k.eth_type(0x86DD),
            k.ipv6("2001:db8::10", "2001:db8::20", 6, label=0x12345, hlimit=63),
            k.attr(k.IPV6_EXTHDRS, b"\x00\x00"),
            k.ports(k.TCP, 40000, 443),
            k.be16(k.TCP_FLAGS, 0x02),
        ),
    ),
]
KEY = b"".join(ATTRIBUTES)


def _whole_attributes(captured: int) -> int:
    """How many leading top-level attributes end within `captured` bytes."""
    offset = count = 0
    for attribute in ATTRIBUTES:
        nla_len = int.from_bytes(attribute[:2], "little")
        if offset + nla_len > captured:
            break
        offset += len(attribute)
        count += 1
    return count


def _expected(captured: int, full_len: int) -> tuple[str, dict[str, object]]:
    whole = decode_key(b"".join(ATTRIBUTES[: _whole_attributes(captured)]))
    prefix = whole.text + "," if _whole_attributes(captured) else ""
    return f"{prefix}<key truncated: captured {captured} of {full_len} bytes>", whole.fields


def test_the_key_is_long_and_decodes_whole() -> None:
    text = format_key(KEY)
    assert len(KEY) > 300
    assert "truncated" not in text and "leftover" not in text and "bad key" not in text


@pytest.mark.parametrize("walks", [1, 3])
def test_truncation_at_every_byte_offset(walks: int) -> None:
    """Each cut prints the attributes wholly captured, as in the whole key, then the marker.

    With `walks` 3, every cut shape is compiled on its first sighting and used twice.
    """
    full_text = format_key(KEY)
    shapes = ShapeCache(compile_after=1, max_shapes=2 * len(KEY))
    for captured in range(len(KEY)):
        data = KEY[:captured]
        text, fields = _expected(captured, len(KEY))
        assert full_text.startswith(text.rsplit("<key truncated", 1)[0])
        for _ in range(walks):
            assert shapes.text(data, len(KEY)) == text, captured
            assert shapes.decode(data, len(KEY)) == (text, fields), captured
        assert format_key(data, len(KEY)) == text


def test_marker_names_the_real_length() -> None:
    cut = KEY[:100]
    assert format_key(cut, 640).endswith(",<key truncated: captured 100 of 640 bytes>")
    assert format_key(cut, 641).endswith(",<key truncated: captured 100 of 641 bytes>")
    cache = KeyCache()
    assert cache.get(cut, 640) != cache.get(cut, 641)


def test_nothing_captured() -> None:
    assert format_key(b"", 200) == "<key truncated: captured 0 of 200 bytes>"
    assert format_key(KEY[:3], 200) == "<key truncated: captured 3 of 200 bytes>"


def test_whole_key_is_not_truncated() -> None:
    assert format_key(KEY, len(KEY)) == format_key(KEY)
    assert decode_key(KEY, len(KEY)) == decode_key(KEY)
