"""record.TimeMerger: per-CPU runs back into probe-time order, up to a horizon."""

from __future__ import annotations

import random
import struct

import pytest

from upcall_capture.probe.record import TimeMerger, ktime


def rec(ktime_ns: int, tag: int = 0) -> bytes:
    return struct.pack("<QI", ktime_ns, tag)


def runs_from(times_by_cpu):
    return [[rec(t, cpu) for t in times] for cpu, times in enumerate(times_by_cpu)]


@pytest.mark.parametrize("seed", range(5))
def test_interleaved_runs_come_out_sorted_and_complete(seed):
    rng = random.Random(seed)
    times = rng.sample(range(1, 10**6), 3000)
    # Each ring is in time order on its own; which ring a record lands on is random.
    cpus = [sorted(t for i, t in enumerate(times) if i % 3 == cpu) for cpu in range(3)]
    merger = TimeMerger(slack_ns=0)
    merger.add(runs_from(cpus))
    out = merger.release(10**7)
    assert [ktime(r) for r in out] == sorted(times)


def test_runs_that_follow_one_another_are_concatenated_in_time_order():
    merger = TimeMerger(slack_ns=0)
    merger.add(runs_from([[50, 60, 70], [10, 20, 30], []]))
    assert [ktime(r) for r in merger.release(100)] == [10, 20, 30, 50, 60, 70]


def test_records_past_the_horizon_wait_for_the_next_drain():
    merger = TimeMerger(slack_ns=5)
    merger.add(runs_from([[10, 20, 96], [15, 94]]))
    assert [ktime(r) for r in merger.release(100)] == [10, 15, 20, 94]
    # A record fired before the held one but read later still comes out before it.
    merger.add(runs_from([[95, 130], [99]]))
    assert [ktime(r) for r in merger.release(200)] == [95, 96, 99, 130]
    assert merger.release(300) == []


def test_release_all_keeps_nothing_back():
    merger = TimeMerger()
    merger.add(runs_from([[10**12, 3 * 10**12], [2 * 10**12]]))
    assert [ktime(r) for r in merger.release_all()] == [10**12, 2 * 10**12, 3 * 10**12]
    assert merger.release_all() == []
