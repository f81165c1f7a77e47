"""counting: heavy hitters and distinct counts in bounded memory, with honest error bounds."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from upcall_capture.counting import DistinctCount, HeavyHitters


def feed(table: HeavyHitters, values: list, batch: int) -> None:
    for start in range(0, len(values), batch):
        table.update(values[start:start + batch])


def test_exact_while_the_values_fit():
    values = [n % 37 for n in range(5000)]
    table = HeavyHitters(capacity=20)  # 37 distinct < 2 * 20
    feed(table, values, 100)
    assert table.exact and table.error == 0
    assert dict(table.counts) == Counter(values)
    assert table.total == 5000


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=3000), st.integers(1, 30), st.integers(1, 200))
def test_counts_are_low_by_at_most_the_error(values, capacity, batch):
    table = HeavyHitters(capacity)
    feed(table, values, batch)
    true = Counter(values)
    assert table.total == len(values)
    assert len(table.counts) < 2 * capacity  # bounded
    assert table.error <= len(values) / (capacity + 1)
    for value, count in true.items():
        kept = table.counts.get(value, 0)
        assert kept <= count <= kept + table.error
        if count > table.error:
            assert value in table.counts  # a heavy hitter is never lost


def test_a_heavy_value_survives_a_scan():
    # 30% of a stream of otherwise unique values: the shape of an upcall storm's port.
    values = [("port", 1) if n % 10 < 3 else n for n in range(100_000)]
    random.Random(1).shuffle(values)
    table = HeavyHitters(capacity=100)
    feed(table, values, 256)
    (top, count), = table.most_common(1)
    assert top == ("port", 1)
    assert count <= 30_000 <= count + table.error
    assert not table.exact and len(table.counts) < 200


def test_merge_adds_counts_and_errors():
    a, b = HeavyHitters(5), HeavyHitters(5)
    feed(a, list(range(40)) + [7] * 50, 10)
    feed(b, list(range(100, 140)) + [7] * 30, 10)
    errors = a.error + b.error
    a.merge(b)
    assert a.total == 160
    assert a.error >= errors and a.counts[7] <= 81 <= a.counts[7] + a.error  # 7 is in range(40)


def test_distinct_exact_then_estimated():
    small = DistinctCount(exact_limit=1000)
    small.update([b"k%d" % (n % 700) for n in range(5000)])
    assert small.exact and small.value() == 700
    big = DistinctCount(exact_limit=10_000)
    for start in range(0, 300_000, 1000):
        big.update([(b"key", n) for n in range(start, start + 1000)])
        big.update([(b"key", n) for n in range(start, start + 1000, 7)])  # repeats
    assert not big.exact
    assert big.value() == pytest.approx(300_000, rel=0.06)  # 1.6% standard error


def test_distinct_of_small_ints_is_not_skewed():
    # Python hashes an int to itself: the mixer must spread them over the registers.
    counter = DistinctCount(exact_limit=5000)
    counter.update(range(200_000))
    assert counter.value() == pytest.approx(200_000, rel=0.06)
