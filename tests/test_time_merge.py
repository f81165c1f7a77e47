"""record.TimeMerger: the ring's records back into probe-time order, up to a horizon."""

from __future__ import annotations

import random
import struct

import pytest

from upcall_capture.probe.record import TimeMerger, ktime


def rec(ktime_ns: int, cpu: int = 0) -> bytes:
    return struct.pack("<QI", ktime_ns, cpu)


def ring_order(times_by_cpu, rng):
    """The records as one ring holds them: each CPU's in time order, the CPUs' records
    interleaved at random (a probe reads the clock before it takes its place)."""
    queues = [[rec(t, cpu) for t in times] for cpu, times in enumerate(times_by_cpu)]
    ring = []
    while any(queues):
        ring.append(rng.choice([q for q in queues if q]).pop(0))
    return ring


@pytest.mark.parametrize("seed", range(5))
def test_interleaved_cpus_come_out_sorted_and_complete(seed):
    rng = random.Random(seed)
    times = rng.sample(range(1, 10**6), 3000)
    cpus = [sorted(t for i, t in enumerate(times) if i % 3 == cpu) for cpu in range(3)]
    merger = TimeMerger(slack_ns=0)
    merger.add(ring_order(cpus, rng))
    out = merger.release(10**7)
    assert [ktime(r) for r in out] == sorted(times)


def test_records_past_the_horizon_wait_for_the_next_drain():
    merger = TimeMerger(slack_ns=5)
    merger.add([rec(10), rec(15, 1), rec(20), rec(96), rec(94, 1)])
    assert [ktime(r) for r in merger.release(100)] == [10, 15, 20, 94]
    # A record fired before the held one but read later still comes out before it.
    merger.add([rec(95, 1), rec(130), rec(99, 1)])
    assert [ktime(r) for r in merger.release(200)] == [95, 96, 99, 130]
    assert merger.release(300) == []


def test_release_all_keeps_nothing_back():
    merger = TimeMerger()
    merger.add([rec(10**12), rec(3 * 10**12), rec(2 * 10**12, 1)])
    assert [ktime(r) for r in merger.release_all()] == [10**12, 2 * 10**12, 3 * 10**12]
    assert merger.release_all() == []
