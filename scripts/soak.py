#!/usr/bin/env python3
"""Soak test: a long capture at a high rate with rotation, checking memory and accounting.

Not part of the default test run (it takes minutes and gigabytes of writes). As root:

    .venv/bin/python scripts/soak.py                  # 10 minutes at 100,000 upcalls/s
    .venv/bin/python scripts/soak.py --minutes 2      # a quick check of the script itself

The replay source fires exactly rate x duration upcalls with unique keys (so every
cache in the tool fills to its bound), from two handler threads that move between CPUs,
while upcall-capture writes a ring of files (-C 100 -W 5). The tool's resident memory
(its whole process tree) is sampled every few seconds. At the end:

- memory is flat: the largest RSS of the last window (a minute, or a quarter of a short
  run) is within 10% of the largest RSS of the second window (the first is warm-up:
  compiling the probe and filling caches);
- accounting is exact: the replay's fired count = the tool's fired count = captured +
  lost + filtered;
- every kept file is well formed, its statistics count its packets, and tshark reads
  exactly as many packets as our reader.

It prints one paragraph (for the README) and exits 0 when everything holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from upcall_capture import __version__, pcapng  # noqa: E402

REPLAY_DIR = ROOT / "samples" / "replay"
SUMMARY = re.compile(
    r"(\d+) upcalls captured, (\d+) lost(?:, (\d+) filtered out)? \((\d+) fired\)")
FIRED = re.compile(r"fired (\d+) upcalls in ([\d.]+) s")
MEMORY_TOLERANCE = 0.10
MAX_WINDOW_SECONDS = 60
STARTUP_TIMEOUT_SECONDS = 120
EXIT_GRACE_SECONDS = 300


@dataclass(frozen=True)
class Sample:
    elapsed: float  # seconds since the replay started firing
    rss_bytes: int


@dataclass(frozen=True)
class KeptFile:
    name: str
    packets: int
    valid: bool
    problem: str | None = None


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (the tool forks a capturing child with -Z)."""
    pids, index = [pid], 0
    while index < len(pids):
        for task in Path(f"/proc/{pids[index]}/task").glob("*"):
            try:
                pids += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
        index += 1
    return pids


def rss_bytes(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        if match:
            total += int(match.group(1)) * 1024
    return total


def window_max(samples: list[Sample], start: float, end: float) -> int:
    values = [s.rss_bytes for s in samples if start <= s.elapsed < end]
    return max(values, default=0)


def check_file(path: Path) -> KeptFile:
    data = path.read_bytes()
    if pcapng.complete_length(data) != len(data):
        return KeptFile(path.name, 0, False, "not a whole number of well-formed blocks")
    packets = received = 0
    for block in pcapng.iter_blocks(data):
        if isinstance(block, pcapng.Packet):
            packets += 1
        elif isinstance(block, pcapng.InterfaceStatistics):
            received += block.received or 0
    if received != packets:
        return KeptFile(path.name, packets, False,
                        f"statistics count {received} packets, the file holds {packets}")
    done = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.number"],
                          capture_output=True, text=True, check=False)
    shown = len(done.stdout.split())
    if done.returncode != 0 or shown != packets:
        return KeptFile(path.name, packets, False,
                        f"tshark read {shown} packets (exit {done.returncode})")
    return KeptFile(path.name, packets, True)


def wait_for(path: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise SystemExit(f"soak: the tool exited before listening:\n{path.read_text()}")
        time.sleep(0.2)
    raise SystemExit("soak: the tool never said it was listening")


def mib(value: int) -> str:
    return f"{value / 2**20:.0f} MiB"


def run(args: argparse.Namespace, work: Path) -> bool:
    subprocess.run(["make", "-s", "-C", str(REPLAY_DIR)], check=True)
    seconds = args.minutes * 60
    count = int(args.rate * seconds)
    window = min(MAX_WINDOW_SECONDS, seconds / 4)
    replay = subprocess.Popen(
        [str(REPLAY_DIR / "upcall-replay"), "-S", "-u", "-T", str(args.threads),
         "-n", str(count), "-r", str(args.rate), str(REPLAY_DIR / "mixed.upc")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    tool_log = work / "tool.log"
    with open(tool_log, "w") as log:
        tool = subprocess.Popen(
            [sys.executable, "-m", "upcall_capture", "-p", str(replay.pid),
             "-w", str(work / "soak.pcapng"), "-C", str(args.file_mb), "-W", str(args.files)],
            stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)
    samples: list[Sample] = []
    try:
        wait_for(tool_log, "listening on", tool, STARTUP_TIMEOUT_SECONDS)
        start = time.monotonic()
        os.kill(replay.pid, signal.SIGUSR1)
        deadline = start + seconds + EXIT_GRACE_SECONDS
        while tool.poll() is None and time.monotonic() < deadline:
            samples.append(Sample(time.monotonic() - start, rss_bytes(tool.pid)))
            time.sleep(args.sample_seconds)
        if tool.poll() is None:
            raise SystemExit("soak: the tool did not stop after the replay finished")
        fired_line = replay.communicate(timeout=60)[0]
    finally:
        for process in (tool, replay):
            if process.poll() is None:
                process.kill()
                process.wait()

    if args.samples is not None:
        args.samples.write_text("".join(f"{s.elapsed:.1f},{s.rss_bytes}\n" for s in samples))
    log_text = tool_log.read_text()
    summary = SUMMARY.search(log_text)
    fired_match = FIRED.search(fired_line)
    if summary is None or fired_match is None:
        print(f"soak: no summary from the tool or the replay:\n{log_text}\n{fired_line}")
        return False
    captured, lost, filtered, tool_fired = (int(g or 0) for g in summary.groups())
    replay_fired = int(fired_match.group(1))
    replay_seconds = float(fired_match.group(2))
    accounting_ok = (replay_fired == tool_fired == captured + lost + filtered == count
                     and tool.returncode == 0)

    kept = [check_file(path) for path in sorted(work.glob("soak-*.pcapng"))]
    files_ok = bool(kept) and len(kept) <= args.files and all(f.valid for f in kept)

    elapsed = samples[-1].elapsed if samples else 0.0
    baseline = window_max(samples, window, 2 * window)
    final = window_max(samples, max(elapsed - window, 2 * window), elapsed + 1)
    growth = (final - baseline) / baseline if baseline else float("inf")
    memory_ok = baseline > 0 and final > 0 and growth <= MEMORY_TOLERANCE

    ok = accounting_ok and files_ok and memory_ok
    uname = os.uname()
    problems = [f"{f.name}: {f.problem}" for f in kept if not f.valid]
    if not kept:
        problems.append("no files kept")
    if tool.returncode != 0:
        problems.append(f"the tool exited with status {tool.returncode}")
    print(
        f"Soak {'passed' if ok else 'FAILED'}: upcall-capture {__version__} ran "
        f"{elapsed / 60:.1f} minutes at {args.rate:,.0f} upcalls/s asked "
        f"({replay_fired / replay_seconds:,.0f}/s achieved; mixed records with unique keys "
        f"from {args.threads} handler threads), rotating -C {args.file_mb} -W {args.files}, "
        f"on Linux {uname.release} with {os.cpu_count()} CPUs. "
        f"Accounting {'exact' if accounting_ok else 'WRONG'}: {replay_fired:,} fired by the "
        f"replay, {tool_fired:,} counted by the probe = {captured:,} captured + {lost:,} lost"
        f" + {filtered:,} filtered. "
        f"Files {'valid' if files_ok else 'INVALID'}: the {len(kept)} kept hold "
        f"{sum(f.packets for f in kept):,} packets, each file well formed, its statistics "
        f"matching its packets, and read whole by tshark. "
        f"Memory {'flat' if memory_ok else 'NOT FLAT'}: the tool's RSS peaked at "
        f"{mib(baseline)} in the second {window:.0f} s and at {mib(final)} in the last "
        f"{window:.0f} s ({growth:+.1%}, limit +{MEMORY_TOLERANCE:.0%}; "
        f"{len(samples)} samples, every {args.sample_seconds:g} s)."
        + (f" Problems: {'; '.join(problems)}." if problems else "")
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10, help="how long to fire (10)")
    parser.add_argument("--rate", type=float, default=100_000,
                        help="upcalls per second (100000)")
    parser.add_argument("--threads", type=int, default=2, help="handler threads (2)")
    parser.add_argument("--file-mb", type=int, default=100, help="-C for the tool (100)")
    parser.add_argument("--files", type=int, default=5, help="-W for the tool (5)")
    parser.add_argument("--sample-seconds", type=float, default=2,
                        help="how often to sample the tool's RSS (2)")
    parser.add_argument("--samples", type=Path, metavar="CSV",
                        help="also write the RSS samples here (seconds,bytes per line)")
    parser.add_argument("--dir", type=Path,
                        help="where to write the capture (default: a new directory under "
                             "/var/tmp, removed afterwards)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: must be run as root (the tool attaches eBPF)", file=sys.stderr)
        return 2
    if args.minutes <= 0 or args.rate <= 0:
        print("soak: --minutes and --rate must be more than 0", file=sys.stderr)
        return 2
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        return 0 if run(args, args.dir) else 1
    work = Path(tempfile.mkdtemp(prefix="upcall-soak-", dir="/var/tmp"))
    try:
        return 0 if run(args, work) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
