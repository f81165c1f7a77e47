"""Flow key decoder speed: keys per second for new keys (a scan) and repeated keys.

    .venv/bin/python benchmarks/bench_flowkey.py [--keys N] [--rounds R]

Keys are kernel-order keys built with tests/keyenc.py, in the shapes an upcall storm
brings (IPv4/TCP with conntrack, IPv6/TCP with the kernel's type 32, VLAN, a Geneve
tunnel). "new keys" gives every call a key never seen before, only its values differ
(what a scan does); "repeated keys" cycles through a working set of 1,000 keys through
KeyCache; "first sight" is the general walk that a key of a never-seen shape costs.
Each figure is the best of R rounds.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import keyenc as k  # noqa: E402

from upcall_capture.flowkey import KeyCache, decode_key, format_key  # noqa: E402
from upcall_capture.flowkey.walk import plan_key, render  # noqa: E402

REPEATED_WORKING_SET = 1000


def _mac(rng: random.Random) -> str:
    return ":".join(f"{b:02x}" for b in rng.randbytes(6))


def _ip4(rng: random.Random) -> str:
    return str(ipaddress.IPv4Address(rng.getrandbits(32)))


def _ip6(rng: random.Random) -> str:
    return str(ipaddress.IPv6Address(0x2001_0DB8 << 96 | rng.getrandbits(96)))


def ipv4_tcp(rng: random.Random) -> bytes:
    return k.kernel_key(
        in_port=rng.randrange(1, 64),
        conntrack=(0x21, 0, 0, 0),
        ethernet=(_mac(rng), _mac(rng)),
        ethertype=0x0800,
        l3=k.ipv4(_ip4(rng), _ip4(rng), 6, ttl=rng.randrange(1, 256)),
        l4=k.ports(k.TCP, rng.getrandbits(16), 80) + k.be16(k.TCP_FLAGS, 0x02),
    )


def ipv6_tcp(rng: random.Random) -> bytes:
    return k.kernel_key(
        in_port=rng.randrange(1, 64),
        conntrack=(0x21, 0, 0, 0),
        ethernet=(_mac(rng), _mac(rng)),
        ethertype=0x86DD,
        l3=k.ipv6(_ip6(rng), _ip6(rng), 6, label=rng.getrandbits(20))
        + k.attr(k.IPV6_EXTHDRS, b"\x00\x00"),
        l4=k.ports(k.TCP, rng.getrandbits(16), 443) + k.be16(k.TCP_FLAGS, 0x02),
    )


def vlan_udp(rng: random.Random) -> bytes:
    return k.kernel_key(
        ethernet=(_mac(rng), _mac(rng)),
        vlans=[(rng.randrange(4096), rng.randrange(8))],
        ethertype=0x0800,
        l3=k.ipv4(_ip4(rng), _ip4(rng), 17),
        l4=k.ports(k.UDP, rng.getrandbits(16), 53),
    )


def geneve_udp(rng: random.Random) -> bytes:
    return k.kernel_key(
        tunnel_attrs=k.tun_id(rng.getrandbits(24))
        + k.attr(k.TUN_IPV4_SRC, k.ip4(_ip4(rng)))
        + k.attr(k.TUN_IPV4_DST, k.ip4(_ip4(rng)))
        + k.u8(k.TUN_TTL, 64)
        + k.be16(k.TUN_TP_SRC, rng.getrandbits(16))
        + k.be16(k.TUN_TP_DST, 6081)
        + k.attr(k.TUN_GENEVE, k.geneve_opt(0x102, 0x80, rng.randbytes(4)))
        + k.attr(k.TUN_CSUM),
        ethernet=(_mac(rng), _mac(rng)),
        ethertype=0x0800,
        l3=k.ipv4(_ip4(rng), _ip4(rng), 17),
        l4=k.ports(k.UDP, rng.getrandbits(16), 4789),
    )


FAMILIES: dict[str, Callable[[random.Random], bytes]] = {
    "ipv4/tcp+ct": ipv4_tcp,
    "ipv6/tcp+ct+key32": ipv6_tcp,
    "vlan ipv4/udp": vlan_udp,
    "geneve ipv4/udp": geneve_udp,
}


def best_per_key(run: Callable[[], None], count: int, rounds: int) -> float:
    """Best seconds per key over `rounds` runs of `run` (which handles `count` keys)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / count


def measure(family: Callable[[random.Random], bytes], count: int, rounds: int) -> dict[str, float]:
    rng = random.Random(1)
    # Fresh keys for every round, so "new keys" never meet a key seen before.
    batches = [[family(rng) for _ in range(count)] for _ in range(rounds + 1)]
    format_key(batches[0][0])  # teach the shape, as the first upcalls of a storm do
    format_key(batches[0][1])
    fresh = iter(batches)

    def new_keys_cached() -> None:
        cache, text = KeyCache(), None
        for key in next(fresh):
            text = cache.get(key)
        del text

    def new_keys_decode() -> None:
        for key in batches[0]:
            decode_key(key)

    working_set = batches[0][:REPEATED_WORKING_SET]
    cache = KeyCache()
    for key in working_set:
        cache.get(key)
    repeats = max(1, count // len(working_set))

    def repeated() -> None:
        text = cache.get
        for _ in range(repeats):
            for key in working_set:
                text(key)

    def first_sight() -> None:
        for key in batches[0][: count // 10]:
            render(plan_key(key, len(key)), key, len(key), None)

    return {
        "new keys, KeyCache.get": best_per_key(new_keys_cached, count, rounds),
        "new keys, decode_key": best_per_key(new_keys_decode, count, rounds),
        "repeated keys, KeyCache.get": best_per_key(repeated, repeats * len(working_set), rounds),
        "first sight (general walk)": best_per_key(first_sight, count // 10, rounds),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=50_000, help="keys per round (50000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; best is kept (3)")
    args = parser.parse_args(argv)
    if args.keys < 10 or args.rounds < 1:
        parser.error("need --keys >= 10 and --rounds >= 1")
    print(f"python {sys.version.split()[0]}, {args.keys} keys x {args.rounds} rounds")
    print(f"{'key shape':<20} {'bytes':>5}  {'case':<30} {'us/key':>7} {'keys/s':>10}")
    for name, family in FAMILIES.items():
        size = len(family(random.Random(0)))
        for case, seconds in measure(family, args.keys, args.rounds).items():
            print(f"{name:<20} {size:>5}  {case:<30} {seconds * 1e6:>7.2f} {1 / seconds:>10,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
