"""--stats: what an upcall storm is made of.

Counts by type, datapath and port, the flow keys seen most (as OVS text), and the
upcall rate second by second. Keys are counted by their raw bytes and decoded only
for the report, so collecting costs a dictionary update per upcall.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable

from upcall_capture.flowkey import format_key
from upcall_capture.view import CapturedUpcall, clock_time

NS_PER_S = 1_000_000_000


class UpcallStats:
    def __init__(self) -> None:
        self.types: Counter[str] = Counter()
        self.dpifs: Counter[str] = Counter()
        self.ports: Counter[str] = Counter()
        self.keys: Counter[tuple[bytes, int]] = Counter()
        self.seconds: Counter[int] = Counter()
        self.lost = 0

    def add(self, items: Iterable[CapturedUpcall]) -> None:
        for item in items:
            upcall = item.upcall
            self.types[upcall.type_name if upcall.type >= 0 else "unknown"] += 1
            self.dpifs[upcall.dpif or "unknown"] += 1
            self.ports[item.interface] += 1
            if upcall.key:
                self.keys[(upcall.key, upcall.key_size)] += 1
            self.seconds[item.wall_ns // NS_PER_S] += 1

    def report(self, top: int = 10) -> dict:
        total = sum(self.types.values())
        first, last = (min(self.seconds), max(self.seconds)) if self.seconds else (0, -1)
        return {
            "upcalls": total,
            "lost": self.lost,
            "by_type": dict(self.types.most_common()),
            "by_dpif": dict(self.dpifs.most_common()),
            "by_port": dict(self.ports.most_common()),
            "distinct_keys": len(self.keys),
            "top_keys": [
                {"count": count, "key": format_key(key, size)}
                for (key, size), count in self.keys.most_common(top)
            ],
            # Every second from the first upcall to the last, quiet ones included.
            "rate_per_second": [
                {"time": second, "upcalls": self.seconds.get(second, 0)}
                for second in range(first, last + 1)
            ],
        }


def as_json(report: dict) -> str:
    return json.dumps(report, indent=2)


def as_text(report: dict) -> str:
    lines = [f"{report['upcalls']} upcalls, {report['lost']} lost, "
             f"{report['distinct_keys']} distinct keys"]
    for title, name in (("by type", "by_type"), ("by datapath", "by_dpif"),
                        ("by port", "by_port")):
        lines.append(f"{title}:")
        lines.extend(f"  {count:>10}  {label}" for label, count in report[name].items())
    lines.append(f"top {len(report['top_keys'])} flow keys:")
    lines.extend(f"  {entry['count']:>10}  {entry['key']}" for entry in report["top_keys"])
    lines.append("upcalls per second:")
    lines.extend(
        f"  {clock_time(entry['time'] * NS_PER_S)[:8]}  {entry['upcalls']:>10}"
        for entry in report["rate_per_second"]
    )
    return "\n".join(lines)


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
