"""Counting in bounded memory: the most frequent values, and how many distinct ones.

A storm of new flows has as many distinct keys (and source addresses) as upcalls, so
exact counters would grow with the capture. These stay exact while the values fit and
say how far off they may be once they do not.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence

_MASK64 = (1 << 64) - 1


class HeavyHitters:
    """Counts of values, exact while fewer than 2 * capacity distinct values were seen.

    Beyond that, Misra-Gries in batches: when the table reaches 2 * capacity entries,
    the (capacity+1)-th largest count d is taken off every entry and the ones left at
    zero go. Every count is then low by at most `error`, the sum of those d, which is
    never more than total / (capacity + 1): any value with a larger share than that is
    still in the table.
    """

    def __init__(self, capacity: int = 1000) -> None:
        self.capacity = capacity
        self.counts: Counter[Hashable] = Counter()
        self.total = 0
        self.error = 0

    @property
    def exact(self) -> bool:
        return self.error == 0

    def update(self, values: Sequence[Hashable]) -> None:
        self.total += len(values)
        self.counts.update(values)  # at C speed: a storm's batch at a time
        if len(self.counts) >= 2 * self.capacity:
            self._prune()

    def merge(self, other: HeavyHitters) -> None:
        """Add another table's counts (a sliding window's seconds); errors add up."""
        self.total += other.total
        self.error += other.error
        self.counts.update(other.counts)
        if len(self.counts) >= 2 * self.capacity:
            self._prune()

    def _prune(self) -> None:
        cut = heapq.nlargest(self.capacity + 1, self.counts.values())[-1]
        self.error += cut
        self.counts = Counter({value: count - cut for value, count in self.counts.items()
                               if count > cut})

    def most_common(self, n: int) -> list[tuple[Hashable, int]]:
        return self.counts.most_common(n)


def _mix64(value: int) -> int:
    """splitmix64's finaliser: Python's hash of an int is the int, far from uniform."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK64
    return value ^ (value >> 31)


class DistinctCount:
    """How many distinct values: exact (by 64-bit hash) up to `exact_limit`, then a
    HyperLogLog estimate with 4,096 registers, a standard error of about 1.6%.
    `exact_limit` must be well above the register count (no small-range correction)."""

    INDEX_BITS = 12

    def __init__(self, exact_limit: int = 100_000) -> None:
        self.exact_limit = exact_limit
        self._hashes: set[int] | None = set()
        self._registers = bytearray(1 << self.INDEX_BITS)

    @property
    def exact(self) -> bool:
        return self._hashes is not None

    def update(self, values: Iterable[Hashable]) -> None:
        hashes = [_mix64(hash(value) & _MASK64) for value in values]
        if self._hashes is not None:
            self._hashes.update(hashes)
            if len(self._hashes) <= self.exact_limit:
                return
            hashes, self._hashes = list(self._hashes), None
        registers, bits = self._registers, self.INDEX_BITS
        index_mask, width = (1 << bits) - 1, 64 - bits
        for hashed in hashes:
            index, rest = hashed & index_mask, hashed >> bits
            rank = width - rest.bit_length() + 1  # position of the first 1 bit
            if rank > registers[index]:
                registers[index] = rank

    def value(self) -> int:
        if self._hashes is not None:
            return len(self._hashes)
        # Past exact_limit (far more than the registers), no small-range correction.
        registers = self._registers
        m = len(registers)
        return round(0.7213 / (1 + 1.079 / m) * m * m / sum(2.0 ** -r for r in registers))


class Quantiles:
    """Quantiles of positive numbers (nanoseconds), in bounded memory: counts by
    logarithmic bucket, each 1% wide, so that a quantile is off by at most 1%; the maximum
    is exact."""

    RATIO = 1.01

    def __init__(self) -> None:
        self.buckets: Counter[int] = Counter()
        self.count = 0
        self.maximum = 0
        self._log_ratio = math.log(self.RATIO)

    def add(self, value: int) -> None:
        self.buckets[int(math.log(max(value, 1)) / self._log_ratio)] += 1
        self.count += 1
        self.maximum = max(self.maximum, value)

    def quantile(self, q: float) -> float:
        """The q-quantile (0 < q <= 1): the upper edge of the bucket that holds it."""
        rank = q * self.count
        seen = 0
        for bucket in sorted(self.buckets):
            seen += self.buckets[bucket]
            if seen >= rank:
                return min(self.RATIO ** (bucket + 1), self.maximum)
        return float(self.maximum)
