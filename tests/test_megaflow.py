"""format_megaflow: a flow key with its mask, as OVS 3.1's odp_flow_format() prints it
(verbose off: the text of ovs-dpctl dump-flows)."""

from __future__ import annotations

import random
import struct
from pathlib import Path

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


def test_generated_masks_match_ovs(ovs_format: Path) -> None:
    rng = random.Random(7)
    cases = [(key, random_mask(key, rng)) for key in keys() for _ in range(2)]
    assert len(cases) >= 1000
    expected = ovs_texts(ovs_format, [f"K {key.hex()} {mask.hex()}" for key, mask in cases])
    mismatches = [(key.hex(), mask.hex(), want, format_megaflow(key, mask))
                  for (key, mask), want in zip(cases, expected, strict=True)
                  if format_megaflow(key, mask) != want]
    assert not mismatches[:3], f"{len(mismatches)} of {len(cases)} differ"
