"""Long mutation fuzz of the flow key decoder (not part of CI).

    .venv/bin/python scripts/fuzz_flowkey.py [--cases 1000000] [--jobs 2] [--seed 1]

Seeds are the shared conformance keys (../shared/flowkeys/vectors.tsv, when present)
and kernel-order keys from tests/keyenc.py. Each case mutates a seed (bytes set, cut,
inserted, spliced from another key, attribute headers rewritten, slices wrapped in
nested attributes, or plain random bytes), picks a whole, cut or over-long key length,
and checks that:
- format_key and decode_key raise nothing and agree;
- the public path (compiled shapes once a shape repeats) gives the same text and
  fields as the general walk;
- a key with full_len beyond the captured bytes ends with the truncation marker.
Prints one summary line; exits 1 with the failing key on the first problem.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import keyenc as k  # noqa: E402

from upcall_capture.flowkey import decode_key, format_key  # noqa: E402
from upcall_capture.flowkey.walk import plan_key, render  # noqa: E402

VECTORS = ROOT / ".." / "shared" / "flowkeys" / "vectors.tsv"
NESTING_TYPES = (k.ENCAP, k.TUNNEL, k.NSH, k.TUN_VXLAN)


def seed_keys() -> list[bytes]:
    keys = list(k.SEED_KEYS)
    if VECTORS.is_file():
        for line in VECTORS.read_text().splitlines():
            hex_key = line.split("\t")[0]
            keys.append(b"" if hex_key == "-" else bytes.fromhex(hex_key))
    return keys


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    if rng.random() < 0.05:
        return rng.randbytes(rng.randrange(64))
    key = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        at = rng.randrange(len(key) + 1)
        if op == 0 and key:
            key[at % len(key)] = rng.randrange(256)
        elif op == 1:
            key = key[:at]
        elif op == 2:
            key[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            donor = rng.choice(seeds)
            start = rng.randrange(len(donor) + 1)
            key[at:at] = donor[start : start + rng.randrange(80)]
        elif op == 4 and at + 4 <= len(key):
            # A header at a 4-byte boundary, with a plausible or wild length and type.
            at &= ~3
            nla_len = rng.choice([0, 3, 4, 5, 8, len(key) - at, rng.randrange(65536)])
            struct.pack_into("<HH", key, at, nla_len & 0xFFFF, rng.randrange(65536))
        elif op == 5:
            end = rng.randrange(at, len(key) + 1)
            inner = bytes(key[at:end])
            wrapped = k.nested(rng.choice(NESTING_TYPES), inner)
            key[at:end] = wrapped
        else:
            key += rng.choice(seeds)[: rng.randrange(40)]
    return bytes(key)


@dataclass
class Result:
    cases: int = 0
    truncated: int = 0
    slowest: float = 0.0
    failure: str = ""


def check_case(data: bytes, full_len: int | None) -> None:
    text = format_key(data, full_len)
    decoded = decode_key(data, full_len)
    assert decoded.text == text, "decode_key text differs from format_key"
    captured = data if full_len is None or full_len >= len(data) else data[: max(full_len, 0)]
    whole = len(captured) if full_len is None or full_len < len(data) else full_len
    fields: dict[str, object] = {}
    walked = render(plan_key(captured, whole), captured, whole, fields)
    assert walked == text, f"walk gives {walked!r}"
    assert fields == decoded.fields, f"walk gives fields {fields!r}"
    if whole > len(captured):
        assert text.endswith(f"<key truncated: captured {len(captured)} of {whole} bytes>")


def run(seed: int, cases: int) -> Result:
    rng = random.Random(seed)
    seeds = seed_keys()
    result = Result()
    for _ in range(cases):
        data = mutate(rng, seeds)
        mode = rng.random()
        full_len = None if mode < 0.6 else len(data) + rng.randint(-8, 200)
        start = time.perf_counter()
        try:
            check_case(data, full_len)
        except Exception:  # noqa: BLE001 - any exception is the finding
            result.failure = (
                f"key {data.hex() or '-'} full_len {full_len}\n{traceback.format_exc()}"
            )
            return result
        result.slowest = max(result.slowest, time.perf_counter() - start)
        result.cases += 1
        result.truncated += full_len is not None and full_len > len(data)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1_000_000, help="cases in all (1000000)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--seed", type=int, default=1, help="base random seed (1)")
    args = parser.parse_args(argv)
    if args.cases < 1 or args.jobs < 1:
        parser.error("need --cases >= 1 and --jobs >= 1")
    start = time.monotonic()
    shares = [args.cases // args.jobs + (i < args.cases % args.jobs) for i in range(args.jobs)]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, [args.seed + i for i in range(args.jobs)], shares))
    failures = [r.failure for r in results if r.failure]
    done = sum(r.cases for r in results)
    summary = (
        f"fuzz_flowkey: {done} cases ({sum(r.truncated for r in results)} truncated), "
        f"{len(failures)} failures, slowest case {max(r.slowest for r in results) * 1e3:.1f} ms, "
        f"seed {args.seed}, {args.jobs} jobs, {time.monotonic() - start:.0f} s"
    )
    print(summary)
    if failures:
        print(failures[0], file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
