"""Property tests: any bytes decode without an exception, on both paths, consistently.

A modest budget for CI; scripts/fuzz_flowkey.py is the long run.
"""

from __future__ import annotations

import ipaddress

import keyenc as k
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from upcall_capture.flowkey import decode_key, format_key
from upcall_capture.flowkey.shapes import ShapeCache

PROPERTY = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])



@st.composite
def mutated_keys(draw: st.DrawFn) -> bytes:
    """A real key with bytes changed, cut, inserted or spliced from another key."""
    key = bytearray(draw(st.sampled_from(k.SEED_KEYS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "cut", "insert", "splice"]))
        at = draw(st.integers(0, len(key)))
        if op == "set" and at < len(key):
            key[at] = draw(st.integers(0, 255))
        elif op == "cut":
            key = key[:at]
        elif op == "insert":
            key[at:at] = draw(st.binary(max_size=8))
        else:
            donor = draw(st.sampled_from(k.SEED_KEYS))
            start = draw(st.integers(0, len(donor)))
            key[at:at] = donor[start : start + draw(st.integers(0, 64))]
    return bytes(key)


# Attributes of any type and length, nested at random: reaches every table entry.
ANY_ATTRIBUTE = st.recursive(
    st.builds(k.attr, st.integers(0, 40), st.binary(max_size=48)),
    lambda children: st.builds(
        lambda attr_type, parts: k.nested(attr_type, *parts),
        st.sampled_from([k.ENCAP, k.TUNNEL, k.NSH, k.TUN_VXLAN]),
        st.lists(children, max_size=5),
    ),
    max_leaves=12,
)
STRUCTURED_KEYS = st.lists(ANY_ATTRIBUTE, max_size=8).map(b"".join)
ANY_KEY = st.one_of(st.binary(max_size=300), mutated_keys(), STRUCTURED_KEYS)


def _same_on_both_paths(key: bytes, full_len: int) -> str:
    shapes = ShapeCache(compile_after=1)
    walked = shapes.decode(key, full_len)
    assert shapes.text(key, full_len) == walked[0]  # compiled on the walk above
    assert shapes.decode(key, full_len) == walked
    return walked[0]


@PROPERTY
@given(ANY_KEY)
def test_any_key_decodes_alike_on_walk_and_compiled_path(key: bytes) -> None:
    text = _same_on_both_paths(key, len(key))
    assert text
    assert format_key(key) == decode_key(key).text == text


@PROPERTY
@given(ANY_KEY, st.integers(-10, 700))
def test_any_cut_of_any_key_decodes(key: bytes, full_len: int) -> None:
    text = format_key(key, full_len)
    assert decode_key(key, full_len).text == text
    if full_len > len(key):
        assert text.endswith(f"<key truncated: captured {len(key)} of {full_len} bytes>")
        _same_on_both_paths(key, full_len)
    else:
        assert text == format_key(key[: max(full_len, 0)])


ADDRESSES4 = st.integers(0, 2**32 - 1)
ADDRESSES6 = st.integers(2**112, 2**128 - 1)  # no inet_ntop IPv4-embedded forms
PORTS = st.integers(0, 65535)
BYTES8 = st.integers(0, 255)


@PROPERTY
@given(
    st.tuples(ADDRESSES4, ADDRESSES4, BYTES8, BYTES8, BYTES8),
    st.tuples(PORTS, PORTS),
    st.integers(0, 2**32 - 1),
    st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 7)), max_size=3),
)
def test_ipv4_keys_give_their_values_back(
    ip: tuple[int, int, int, int, int],
    ports: tuple[int, int],
    port_no: int,
    vlans: list[tuple[int, int]],
) -> None:
    src, dst, proto, tos, ttl = ip
    key = k.kernel_key(
        in_port=port_no,
        vlans=vlans,
        ethertype=0x0800,
        l3=k.ipv4(
            str(ipaddress.IPv4Address(src)), str(ipaddress.IPv4Address(dst)), proto, tos, ttl
        ),
        l4=k.ports(k.UDP, *ports),
    )
    decoded = decode_key(key)
    fields = decoded.fields
    assert (fields["ipv4.src"], fields["ipv4.dst"], fields["proto"]) == (src, dst, proto)
    assert (fields["ipv4.tos"], fields["ipv4.ttl"], fields["in_port"]) == (tos, ttl, port_no)
    assert (fields["tp_src"], fields["tp_dst"]) == ports
    assert fields["eth_type"] == 0x0800
    if vlans:
        assert (fields["vlan.vid"], fields["vlan.pcp"]) == vlans[-1]
    tos_text = hex(tos) if tos else "0"
    assert (
        f"ipv4(src={ipaddress.IPv4Address(src)},dst={ipaddress.IPv4Address(dst)},proto={proto},"
        f"tos={tos_text},ttl={ttl},frag=no),udp(src={ports[0]},dst={ports[1]})" + ")" * len(vlans)
    ) in decoded.text


@PROPERTY
@given(ADDRESSES6, ADDRESSES6, st.integers(0, 2**20 - 1), st.tuples(PORTS, PORTS))
def test_ipv6_keys_give_their_values_back(
    src: int, dst: int, label: int, ports: tuple[int, int]
) -> None:
    key = k.kernel_key(
        ethertype=0x86DD,
        l3=k.ipv6(str(ipaddress.IPv6Address(src)), str(ipaddress.IPv6Address(dst)), 6, label)
        + k.attr(k.IPV6_EXTHDRS, b"\x00\x00"),
        l4=k.ports(k.TCP, *ports),
    )
    decoded = decode_key(key)
    assert (decoded.fields["ipv6.src"], decoded.fields["ipv6.dst"]) == (src, dst)
    assert (decoded.fields["ipv6.label"], decoded.fields["tp_src"]) == (label, ports[0])
    label_text = hex(label) if label else "0"
    assert (
        f"ipv6(src={ipaddress.IPv6Address(src)},dst={ipaddress.IPv6Address(dst)},"
        f"label={label_text},proto=6,tclass=0,hlimit=64,frag=no),key32(00 00),"
        f"tcp(src={ports[0]},dst={ports[1]})"
    ) in decoded.text
