"""--stats: what an upcall storm is made of.

Counts by type and datapath, by field groups (port, addresses and prefixes, protocol
and port, tunnel, recirc_id, ct_state, handler: see groups.py), the flow keys seen
most (as OVS text), and the upcall rate second by second. Every table is bounded
(counting.HeavyHitters), so a 10-million-upcall storm of new flows fits in memory; a
table that had to drop values says how far off its counts may be.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from upcall_capture.comment import outcome_fields
from upcall_capture.counting import DistinctCount, HeavyHitters, Quantiles
from upcall_capture.flowkey import KeyCache, decode_key, format_key
from upcall_capture.flowkey.layouts import Fields
from upcall_capture.groups import DEFAULT_GROUPS, Group
from upcall_capture.probe.kernel_record import errno_text
from upcall_capture.view import clock_time

if TYPE_CHECKING:
    from upcall_capture.view import CapturedUpcall

NS_PER_S = 1_000_000_000
GROUP_CAPACITY = 1000  # values a group's table keeps exactly (twice that before pruning)
KEY_CAPACITY = 5000


def key_fields_cache() -> KeyCache:
    """The decoded fields of keys, served from a cache in a storm of repeated keys."""
    return KeyCache(maxsize=16384, describe=lambda key, size: decode_key(key, size).fields)


def fields_of(items: Sequence[CapturedUpcall], cache: KeyCache) -> list[Fields]:
    """Each item's key fields: decoded already (a live capture), or through `cache`."""
    empty: Fields = {}
    return [item.fields if item.fields is not None else
            cache.get(item.upcall.key, item.upcall.key_size) if item.upcall.key else empty
            for item in items]


class GroupCounts:
    """One group's table: its values' counts and the upcalls that had none."""

    def __init__(self, group: Group, capacity: int = GROUP_CAPACITY) -> None:
        self.group = group
        self.table = HeavyHitters(capacity)
        self.without = 0

    def add(self, items: Sequence[CapturedUpcall], fields: Sequence[Fields]) -> None:
        values = self.group.values(items, fields)
        present = [value for value in values if value is not None]
        self.without += len(values) - len(present)
        self.table.update(present)

    def merge(self, other: GroupCounts) -> None:
        self.table.merge(other.table)
        self.without += other.without

    def report(self, total: int, top: int) -> dict:
        return {
            "name": self.group.name,
            "with": self.table.total,
            "without": self.without,
            "approximate": not self.table.exact,
            "max_error": self.table.error,
            "top": [{"value": self.group.label(value), "count": count,
                     "share": count / total if total else 0.0}
                    for value, count in self.table.most_common(top)],
        }


class UpcallStats:
    def __init__(self, groups: Sequence[Group] = DEFAULT_GROUPS, *,
                 group_capacity: int = GROUP_CAPACITY, key_capacity: int = KEY_CAPACITY
                 ) -> None:
        self.types: Counter[str] = Counter()
        self.dpifs: Counter[str] = Counter()
        self.groups = [GroupCounts(group, group_capacity) for group in groups]
        self.keys = HeavyHitters(key_capacity)
        self.distinct_keys = DistinctCount()
        self.seconds: Counter[int] = Counter()
        self.lost = 0
        # The kernel side's: failed upcalls, by errno, port and handler socket; and each
        # handler's queueing delays.
        self.failures: dict[str, Counter[str]] = {
            "errno": Counter(), "port": Counter(), "portid": Counter()}
        self.delays: dict[str, Quantiles] = {}
        self.delay_unknown = 0
        # Outcomes (what the handlers did): by kind, the megaflows put, handling delays.
        self.outcomes: Counter[str] = Counter()
        self.megaflows = HeavyHitters(key_capacity)
        self.handling: dict[str, Quantiles] = {}
        self._fields = key_fields_cache()

    def add(self, items: Iterable[CapturedUpcall]) -> None:
        items = list(items)
        if any(item.upcall.enqueue is not None for item in items):
            items = self._kernel_side(items)
        if any(item.upcall.outcome is not None for item in items):
            self._outcomes(items)
        for item in items:
            upcall = item.upcall
            self.types[upcall.type_name if upcall.type >= 0 else "unknown"] += 1
            self.dpifs[upcall.dpif or "unknown"] += 1
            self.seconds[item.wall_ns // NS_PER_S] += 1
        fields = fields_of(items, self._fields)
        for group in self.groups:
            group.add(items, fields)
        keys = [(item.upcall.key, item.upcall.key_size) for item in items if item.upcall.key]
        self.keys.update(keys)
        self.distinct_keys.update(keys)

    def _kernel_side(self, items: list[CapturedUpcall]) -> list[CapturedUpcall]:
        """Count what the kernel side says; the received upcalls, for everything else."""
        received = []
        for item in items:
            enqueue = item.upcall.enqueue
            if enqueue is None:
                received.append(item)
            elif item.upcall.failed:
                self.failures["errno"][errno_text(enqueue.result)] += 1
                self.failures["port"][item.interface] += 1
                self.failures["portid"][str(enqueue.portid)] += 1
            else:
                received.append(item)
                if enqueue.queued_ns is None:
                    self.delay_unknown += 1
                else:
                    handler = item.upcall.thread or "unknown"
                    self.delays.setdefault(handler, Quantiles()).add(enqueue.queued_ns)
        return received

    def _outcomes(self, items: list[CapturedUpcall]) -> None:
        megaflows = []
        for item in items:
            upcall = item.upcall
            if upcall.outcome is None:
                continue
            outcome = outcome_fields(upcall.outcome, upcall.key)
            self.outcomes[outcome.kind] += 1
            if outcome.megaflow is not None:
                megaflows.append(f"{outcome.megaflow} actions:{outcome.put_actions}")
            if outcome.handling_ns is not None:
                handler = upcall.thread or "unknown"
                self.handling.setdefault(handler, Quantiles()).add(outcome.handling_ns)
        self.megaflows.update(megaflows)

    def _outcomes_report(self, top: int) -> dict:
        return {
            "by_kind": dict(self.outcomes.most_common()),
            "top_megaflows_approximate": not self.megaflows.exact,
            "top_megaflows_max_error": self.megaflows.error,
            "top_megaflows": [{"count": count, "megaflow": megaflow}
                              for megaflow, count in self.megaflows.most_common(top)],
            "handling_delay_ms": [
                {"handler": handler, "upcalls": q.count, "median": q.quantile(0.5) / 1e6,
                 "p99": q.quantile(0.99) / 1e6, "max": q.maximum / 1e6}
                for handler, q in sorted(self.handling.items())],
        }

    def _kernel_report(self) -> dict:
        return {
            "failed": sum(self.failures["errno"].values()),
            **{f"failed_by_{name}": dict(counts.most_common())
               for name, counts in self.failures.items()},
            "queueing_delay_unknown": self.delay_unknown,
            "queueing_delay_ms": [
                {"handler": handler, "upcalls": q.count, "median": q.quantile(0.5) / 1e6,
                 "p99": q.quantile(0.99) / 1e6, "max": q.maximum / 1e6}
                for handler, q in sorted(self.delays.items())],
        }

    def report(self, top: int = 10) -> dict:
        total = sum(self.types.values())
        first, last = (min(self.seconds), max(self.seconds)) if self.seconds else (0, -1)
        return {
            "upcalls": total,
            "lost": self.lost,
            "by_type": dict(self.types.most_common()),
            "by_dpif": dict(self.dpifs.most_common()),
            "groups": [group.report(total, top) for group in self.groups],
            "distinct_keys": self.distinct_keys.value(),
            "distinct_keys_approximate": not self.distinct_keys.exact,
            "top_keys_approximate": not self.keys.exact,
            "top_keys_max_error": self.keys.error,
            "top_keys": [
                {"count": count, "key": format_key(key, size)}
                for (key, size), count in self.keys.most_common(top)
            ],
            # Every second from the first upcall to the last, quiet ones included.
            "rate_per_second": [
                {"time": second, "upcalls": self.seconds.get(second, 0)}
                for second in range(first, last + 1)
            ],
            "kernel": self._kernel_report(),
            "outcomes": self._outcomes_report(top),
        }


def as_json(report: dict) -> str:
    return json.dumps(report, indent=2)


def _approximate(error: int) -> str:
    return f" (approximate: each count may be low by up to {error})" if error else ""


def _none_frequent(error: int) -> str:
    # What is left when every value was rare: a scan's sources, a storm's new keys.
    return f"  (every one rare: none seen more than {error} times)"


def group_lines(group: dict) -> list[str]:
    """A group's title and its top values, with counts and shares of all upcalls."""
    without = f", {group['without']} upcalls without it" if group["without"] else ""
    lines = [f"by {group['name']}{without}{_approximate(group['max_error'])}:"]
    lines.extend(f"  {entry['count']:>10} {entry['share']:>6.1%}  {entry['value']}"
                 for entry in group["top"])
    if not group["top"]:
        lines.append(_none_frequent(group["max_error"]))
    return lines


def as_text(report: dict) -> str:
    about = "about " if report["distinct_keys_approximate"] else ""
    lines = [f"{report['upcalls']} upcalls, {report['lost']} lost, "
             f"{about}{report['distinct_keys']} distinct keys"]
    for title, name in (("by type", "by_type"), ("by datapath", "by_dpif")):
        lines.append(f"{title}:")
        lines.extend(f"  {count:>10}  {label}" for label, count in report[name].items())
    for group in report["groups"]:
        if group["with"]:  # a group no upcall had a value for (no IPv6, say) says nothing
            lines.extend(group_lines(group))
    lines.append(f"top flow keys{_approximate(report['top_keys_max_error'])}:")
    lines.extend(f"  {entry['count']:>10}  {entry['key']}" for entry in report["top_keys"])
    if not report["top_keys"] and report["distinct_keys"]:
        lines.append(_none_frequent(report["top_keys_max_error"]))
    lines.extend(_kernel_lines(report["kernel"]))
    lines.extend(_outcome_lines(report["outcomes"]))
    lines.append("upcalls per second:")
    lines.extend(
        f"  {clock_time(entry['time'] * NS_PER_S)[:8]}  {entry['upcalls']:>10}"
        for entry in report["rate_per_second"]
    )
    return "\n".join(lines)


def _kernel_lines(kernel: dict) -> list[str]:
    """The kernel side's part: failed upcalls and queueing delays (when it had any)."""
    lines = []
    if kernel["failed"]:
        lines.append(f"{kernel['failed']} failed upcalls (never received by ovs-vswitchd):")
        for title in ("errno", "port", "portid"):
            lines.append(f"  by {'handler socket portid' if title == 'portid' else title}:")
            lines.extend(f"    {count:>10}  {label}"
                         for label, count in kernel[f"failed_by_{title}"].items())
    if kernel["queueing_delay_ms"]:
        unknown = kernel["queueing_delay_unknown"]
        lines.append("queueing delay in the kernel, ms (within 1%)" +
                     (f", {unknown} upcalls not matched to their enqueue" if unknown else "")
                     + ":")
        lines.extend(_delay_table(kernel["queueing_delay_ms"]))
    return lines


def _delay_table(rows: list[dict]) -> list[str]:
    """Per-handler delays: median, p99 and max, in ms."""
    lines = [f"  {'handler':<16} {'upcalls':>10} {'median':>10} {'p99':>10} {'max':>10}"]
    lines.extend(f"  {d['handler']:<16} {d['upcalls']:>10} {d['median']:>10.3f} "
                 f"{d['p99']:>10.3f} {d['max']:>10.3f}" for d in rows)
    return lines


_OUTCOME_TITLES = {"put": "flow put", "execute": "executed, no flow installed",
                   "none": "no flow installed", "unknown": "outcome unknown"}


def _outcome_lines(outcomes: dict) -> list[str]:
    """What the handlers did (when the capture had outcomes)."""
    if not outcomes["by_kind"]:
        return []
    lines = ["outcomes (what the handlers did):"]
    lines.extend(f"  {count:>10}  {_OUTCOME_TITLES.get(kind, kind)}"
                 for kind, count in outcomes["by_kind"].items())
    if outcomes["top_megaflows"]:
        lines.append("top megaflows installed"
                     f"{_approximate(outcomes['top_megaflows_max_error'])}:")
        lines.extend(f"  {entry['count']:>10}  {entry['megaflow']}"
                     for entry in outcomes["top_megaflows"])
    if outcomes["handling_delay_ms"]:
        lines.append("handling delay, recv_upcall to the first put or execute, ms "
                     "(within 1%):")
        lines.extend(_delay_table(outcomes["handling_delay_ms"]))
    return lines


class StatsOutput:
    """Collects statistics during a live capture."""

    def __init__(self, stats: UpcallStats, to_captured) -> None:
        self.stats = stats
        self.to_captured = to_captured
        self.ended: str | None = None

    def prepare(self, records, dropped: int) -> None:
        return None

    def packets(self, records, dropped: int = 0, prepared: object = None) -> None:
        self.stats.lost += dropped
        self.stats.add(map(self.to_captured, records))

    def finish(self, end_ktime_ns: int, start_ktime_ns: int) -> None:
        pass

    def gap(self, note: str) -> None:
        pass  # counts have no place for a note

    def flush(self) -> None:
        pass  # nothing is held back
