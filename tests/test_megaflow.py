"""format_megaflow: a flow key with its mask, as OVS 3.1's odp_flow_format() prints it
(verbose off: the text of ovs-dpctl dump-flows; verbose on: vswitchd's dpif:dbg log)."""

from __future__ import annotations

import random
import socket
import struct
from pathlib import Path

import pytest
import upcalls
from conftest import REPLAY_DIR, ovs_texts, read_vectors
from probe_records import storm

from upcall_capture.actions import format_megaflow

_NLA = struct.Struct("<HH")
# Which attributes are nested, by where they are: in a key (OVS_KEY_ATTR_ENCAP holds a
# key, OVS_KEY_ATTR_TUNNEL tunnel attributes) and in a tunnel (its VXLAN options).
_KEY, _TUNNEL, _VXLAN = "key", "tunnel", "vxlan"
_NESTED = {_KEY: {1: _KEY, 16: _TUNNEL}, _TUNNEL: {11: _VXLAN}, _VXLAN: {}}


def _attributes(data: bytes):
    at = 0
    while at + 4 <= len(data):
        length, kind = _NLA.unpack_from(data, at)
        if length < 4 or at + length > len(data):
            return
        yield kind, data[at + 4:at + length]
        at += (length + 3) & ~3


def _attribute(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _NLA.pack(length, kind) + payload + bytes(-length % 4)


def random_mask(key: bytes, rng: random.Random, within: str = _KEY) -> bytes:
    """A mask of the key's shape: each attribute wildcarded, exact, partly masked or (at
    the top) left out, as OVS makes megaflow masks. Inside a nested attribute OVS's mask
    has every attribute the key has: where one is missing, OVS 3.1 reads past it."""
    parts = []
    for kind, payload in _attributes(key):
        choice = rng.random()
        inner = _NESTED[within].get(kind)
        if inner is not None:  # (a flat mask of a nested key is not a megaflow's)
            parts.append(_attribute(kind, random_mask(payload, rng, inner)))
        elif choice < 0.1 and within == _KEY:
            continue  # no mask attribute: wildcarded
        elif choice < 0.3:
            parts.append(_attribute(kind, bytes(len(payload))))
        elif choice < 0.6:
            parts.append(_attribute(kind, b"\xff" * len(payload)))
        else:
            parts.append(_attribute(kind, bytes(
                rng.choice((0, 0xFF, 0xF0, rng.randrange(256))) for _ in payload)))
    return b"".join(parts)


def keys() -> list[bytes]:
    """Keys of every shape the project knows: the replay's upcalls (unique ones too) and
    the shared vectors where they are present."""
    sent = upcalls.read_records(REPLAY_DIR / "mixed.upc")
    from upcall_capture.probe.record import parse

    replayed = [parse(record).key for record in storm(sent, 600, unique=True)]
    # With a mask, OVS asserts (and aborts) on an eth_type attribute that is not 2 bytes
    # long, as some malformed vectors have: those are left out.
    return [key for key in dict.fromkeys(replayed + [key for key, _ in read_vectors()])
            if all(len(payload) == 2 for kind, payload in _attributes(key) if kind == 6)]


def test_known_megaflow():
    key = bytes.fromhex("08000300020000000600060008000000"
                        "10000700" "0a000000" "0a000002" "11004000")
    mask = bytes.fromhex("08000300ffffffff06000600ffff0000"
                         "10000700" "ffffff00" "00000000" "ff000000")
    # An exact in_port, an eth_type it must keep, a /24 source, the rest wildcarded.
    assert format_megaflow(key, mask) == \
        "in_port(2),eth_type(0x0800),ipv4(src=10.0.0.0/255.255.255.0,proto=17)"


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


def test_known_verbose_megaflow():
    # A flow put as vswitchd's dpif:dbg log shows it: an MLD report, most of it wildcarded.
    key = b"".join(_attribute(kind, payload) for kind, payload in (
        (20, _u32(0)), (19, _u32(0)), (2, _u32(0)), (3, _u32(2)), (15, _u32(0)),
        (22, _u32(0)), (23, bytes(2)), (24, _u32(0)), (25, bytes(16)),
        (4, bytes.fromhex("020000000001" "333300000016")), (6, b"\x86\xdd"),
        (8, bytes(16) + socket.inet_pton(socket.AF_INET6, "ff02::16") + bytes(4)
         + bytes([58, 0, 1, 0])),
        (12, bytes([143, 0]))))
    mask = b"".join(_attribute(kind, payload) for kind, payload in (
        (20, b"\xff" * 4), (19, bytes(4)), (2, bytes(4)), (3, b"\xff" * 4), (15, bytes(4)),
        (22, bytes(4)), (23, bytes(2)), (24, bytes(4)), (25, bytes(16)),
        (4, b"\xff" * 12), (6, b"\xff" * 2), (8, bytes(39) + b"\xff"), (12, bytes(2))))
    assert format_megaflow(key, mask, verbose=True) == (
        "recirc_id(0),dp_hash(0/0),skb_priority(0/0),in_port(2),skb_mark(0/0),ct_state(0/0),"
        "ct_zone(0/0),ct_mark(0/0),ct_label(0/0),"
        "eth(src=02:00:00:00:00:01,dst=33:33:00:00:00:16),eth_type(0x86dd),"
        "ipv6(src=::/::,dst=ff02::16/::,label=0/0,proto=58/0,tclass=0/0,hlimit=1/0,frag=no),"
        "icmpv6(type=143/0,code=0/0)")
    assert format_megaflow(key, mask) == (
        "recirc_id(0),in_port(2),eth(src=02:00:00:00:00:01,dst=33:33:00:00:00:16),"
        "eth_type(0x86dd),ipv6(frag=no)")


def test_known_verbose_quirks():
    key = bytes.fromhex("08000300020000000600060008000000"
                        "10000700" "0a000000" "0a000002" "11004000")
    mask = bytes.fromhex("08000300ffffffff06000600ffff0000"
                         "10000700" "ffffff00" "00000000" "ff000000")
    # A wildcarded frag is left out even so: OVS's format_frag() ignores verbose.
    assert format_megaflow(key, mask, verbose=True) == \
        "in_port(2),eth_type(0x0800),ipv4(src=10.0.0.0/255.255.255.0,dst=10.0.0.2/0.0.0.0," \
        "proto=17,tos=0/0,ttl=64/0)"
    # ct_state as a number; a vlan's wildcarded pcp; an encap the mask leaves out,
    # printed as no mask at all (not as a wildcarded one).
    inner = _attribute(6, b"\x08\x00") + _attribute(7, bytes.fromhex("0a0000010a00000206004000"))
    key = (_attribute(22, _u32(0x22)) + _attribute(4, bytes(range(12)))
           + _attribute(6, b"\x81\x00") + _attribute(5, b"\x10\x64") + _attribute(1, inner))
    mask = (_attribute(22, _u32(0x3F)) + _attribute(4, b"\xff" * 12)
            + _attribute(6, b"\xff\xff") + _attribute(5, b"\x1f\xff"))
    encap = "encap(eth_type(0x0800),ipv4(src=10.0.0.1,dst=10.0.0.2,proto=6,tos=0,ttl=64,frag=no))"
    assert format_megaflow(key, mask, verbose=True) == \
        "ct_state(0x22/0x3f),eth(src=00:01:02:03:04:05,dst=06:07:08:09:0a:0b)," \
        f"eth_type(0x8100),vlan(vid=100,pcp=0/0x0),{encap}"
    assert format_megaflow(key, mask) == \
        "ct_state(-new+est-rel-rpl-inv+trk),eth(src=00:01:02:03:04:05,dst=06:07:08:09:0a:0b)," \
        f"eth_type(0x8100),vlan(vid=100),{encap}"
    # A tunnel: a wildcarded tun_id (a be64, which OVS prints apart) and ttl.
    tunnel = (_attribute(0, (5).to_bytes(8, "big")) + _attribute(2, bytes([192, 0, 2, 1]))
              + _attribute(4, b"\x40") + _attribute(5, b"") + _attribute(10, b"\x12\xb5"))
    tunnel_mask = (_attribute(0, bytes(8)) + _attribute(2, b"\xff" * 4) + _attribute(4, b"\0")
                   + _attribute(10, b"\xff\xff"))
    key = _attribute(16, tunnel) + _attribute(3, _u32(3))
    mask = _attribute(16, tunnel_mask) + _attribute(3, b"\xff" * 4)
    assert format_megaflow(key, mask, verbose=True) == \
        "tunnel(tun_id=0x5/0,dst=192.0.2.1,ttl=64/0,tp_dst=4789,flags(+key)),in_port(3)"
    assert format_megaflow(key, mask) == "tunnel(dst=192.0.2.1,tp_dst=4789,flags(+key)),in_port(3)"


def generated_cases() -> list[tuple[bytes, bytes]]:
    """Every key with two random masks."""
    rng = random.Random(7)
    cases = [(key, random_mask(key, rng)) for key in keys() for _ in range(2)]
    assert len(cases) >= 1000
    return cases


def without_nested(mask: bytes) -> bytes:
    """The mask with its top-level nested attributes (encap, tunnel, nsh) left out."""
    return b"".join(_attribute(kind, payload) for kind, payload in _attributes(mask)
                    if kind not in (1, 16, 29))


def assert_matches_ovs(ovs_format: Path, cases: list[tuple[bytes, bytes]],
                       verbose: bool) -> None:
    """format_megaflow() prints what ovs-format's K (or, verbose, V) lines print."""
    letter = "V" if verbose else "K"
    if verbose:
        # An ovs-format built before it had V lines answers them with its usage.
        probe = ovs_texts(ovs_format, [f"V {cases[0][0].hex()} {cases[0][1].hex()}"])[0]
        if "lines start with A, K or k" in probe:
            pytest.skip(f"{ovs_format} predates verbose megaflows (V lines): rebuild it")
    expected = ovs_texts(ovs_format, [f"{letter} {key.hex()} {mask.hex()}"
                                      for key, mask in cases])
    mismatches = [(key.hex(), mask.hex(), want, got)
                  for (key, mask), want in zip(cases, expected, strict=True)
                  if (got := format_megaflow(key, mask, verbose)) != want]
    assert not mismatches[:3], f"{len(mismatches)} of {len(cases)} differ"


def test_generated_masks_match_ovs(ovs_format: Path) -> None:
    assert_matches_ovs(ovs_format, generated_cases(), verbose=False)


def test_generated_verbose_masks_match_ovs(ovs_format: Path) -> None:
    assert_matches_ovs(ovs_format, generated_cases(), verbose=True)


@pytest.mark.parametrize("verbose", [False, True], ids=["terse", "verbose"])
def test_masks_without_nested_attributes_match_ovs(ovs_format: Path, verbose: bool) -> None:
    # OVS makes up an empty mask for a nested attribute the mask does not have.
    cases = [(key, left) for key, mask in generated_cases()
             if (left := without_nested(mask)) != mask]
    assert len(cases) >= 300
    assert_matches_ovs(ovs_format, cases, verbose)
