"""Conformance: every key in ../shared/flowkeys/vectors.tsv, with the text OVS printed."""

from __future__ import annotations

import pytest
from conftest import VECTORS, read_vectors

from upcall_capture.flowkey import KeyCache, decode_key, format_key
from upcall_capture.flowkey.shapes import ShapeCache


def _load() -> list[tuple[int, bytes, str]]:
    if not VECTORS.is_file():
        pytest.skip(f"conformance vectors not found at {VECTORS} (shared test data, not shipped)")
    return [(number, key, text) for number, (key, text) in enumerate(read_vectors(), 1)]


@pytest.fixture(scope="module")
def vectors() -> list[tuple[int, bytes, str]]:
    return _load()


def _report(failures: list[str]) -> str:
    return f"{len(failures)} keys differ from OVS; first ones:\n" + "\n".join(failures[:10])


def test_format_key_matches_ovs(vectors: list[tuple[int, bytes, str]]) -> None:
    failures = [
        f"line {n}: {data.hex()}\n  want {want}\n  got  {got}"
        for n, data, want in vectors
        if (got := format_key(data)) != want
    ]
    assert not failures, _report(failures)


def test_walk_and_compiled_shape_both_match_ovs(vectors: list[tuple[int, bytes, str]]) -> None:
    """A shape is walked the first two times it is seen and compiled from then on."""
    shapes = ShapeCache(compile_after=2)
    failures = []
    for n, data, want in vectors:
        walked = [shapes.text(data, len(data)) for _ in range(2)]
        compiled = shapes.text(data, len(data))
        if walked != [want, want] or compiled != want:
            failures.append(f"line {n}: want {want}\n  walked {walked}\n  compiled {compiled}")
    assert not failures, _report(failures)


def test_decode_text_and_fields_agree_between_walk_and_compiled(
    vectors: list[tuple[int, bytes, str]],
) -> None:
    shapes = ShapeCache(compile_after=2)
    failures = []
    for n, data, want in vectors:
        runs = [shapes.decode(data, len(data)) for _ in range(3)]
        if any(text != want for text, _ in runs) or runs[0][1] != runs[2][1]:
            failures.append(f"line {n}: {runs[0]} / {runs[2]}")
    assert not failures, _report(failures)


def test_public_decode_and_cache_match_ovs(vectors: list[tuple[int, bytes, str]]) -> None:
    cache = KeyCache(maxsize=256)
    failures = [
        f"line {n}: {want}"
        for n, data, want in vectors
        if decode_key(data).text != want or cache.get(data) != want or cache.get(data) != want
    ]
    assert not failures, _report(failures)
