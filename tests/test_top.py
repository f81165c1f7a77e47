"""--top: the sliding window and the screen's lines (pure), then the real full-screen
view in a real terminal (tmux), during a capture and from -r."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter

import pytest
import upcalls
from conftest import REPLAY_DIR, ROOT
from probe_records import storm

from upcall_capture import groups, pcapng
from upcall_capture.top import Snapshot, TopWindow, render
from upcall_capture.upcall_blocks import UpcallBlocks
from upcall_capture.view import from_record

SENT = upcalls.read_records(REPLAY_DIR / "mixed.upc")
NS = 1_000_000_000
T0 = 1_700_000_000 * NS


def items_at(second: int, count: int, start: int = 0):
    return [from_record(r, T0 + second * NS, lambda d, p: None)
            for r in storm(SENT, start + count, unique=True)[start:]]


def test_the_window_holds_the_last_whole_seconds():
    window = TopWindow(groups.DEFAULT_GROUPS, seconds=3)
    base = T0 // NS
    for second in range(6):
        window.add(items_at(0, 10 * (second + 1)), base + second)
        if second == 1:
            early = window.snapshot(base + 1, top=5)  # only second 0 has been
            assert (early.seconds, early.arrived) == (1, 10)
    snapshot = window.snapshot(base + 6, top=5)
    # Seconds 3, 4 and 5: 40 + 50 + 60; second 6 is still being counted.
    assert (snapshot.seconds, snapshot.arrived, snapshot.examined) == (3, 150, 150)
    assert snapshot.last_second == 60
    assert sum(count for _, count in snapshot.types) == 150


def test_items_of_a_file_count_in_their_own_seconds():
    window = TopWindow([groups.parse_group("in_port")], seconds=10)
    items = [from_record(r, T0 + (i // 100) * NS - 10**12, lambda d, p: None)
             for i, r in enumerate(storm(SENT, 300, unique=False))]
    window.add(items)  # no second given: each item's own (-r)
    seconds = sorted({item.wall_ns // NS for item in items})
    snapshot = window.snapshot(seconds[-1] + 1, top=3)
    assert snapshot.arrived == 300 and snapshot.last_second == 100
    ports = Counter(item.interface for item in items).most_common(3)
    assert [(e["value"], e["count"]) for e in snapshot.groups[0]["top"]] == ports


def test_failed_upcalls_have_a_rate_of_their_own():
    import errno

    from upcall_capture.probe.kernel_record import KernelEvent, failed_record

    frame = SENT[0].packet
    failed = KernelEvent(ktime_ns=1, kind=2, result=-errno.EAGAIN, cpu=0, portid=5,
                         pkt_size=len(frame), recirc_id=0, eth_type=0x0800, ct_state=0,
                         cmd=1, mru=0, datapath="ovs-system", device="veth-a", packet=frame)
    window = TopWindow(groups.DEFAULT_GROUPS, seconds=3)
    base = T0 // NS
    window.add(items_at(0, 7) + [from_record(failed_record(failed, 2), T0, lambda d, p: None)]
               * 3, base)
    types = dict(window.snapshot(base + 1, top=5).types)
    assert types["miss failed"] == 3 and sum(types.values()) == 10


def test_what_the_view_had_no_time_for_is_said():
    window = TopWindow(groups.DEFAULT_GROUPS, seconds=2)
    base = T0 // NS
    window.arrived(300, base)  # arrived, never examined
    window.add(items_at(0, 100), base, arrived=False)
    snapshot = window.snapshot(base + 1, top=3)
    lines = render(snapshot, 120, 40, "title")
    assert any("the view examined 33% of the upcalls" in line for line in lines)
    # A value's rate is its share of the examined ones times the rate of all.
    by_type = Counter(item.upcall.type_name for item in items_at(0, 100))
    assert f"miss {by_type['miss'] * 3:,}/s" in lines[lines.index(
        next(line for line in lines if line.startswith("type:")))]


@pytest.mark.parametrize("width, height", [(60, 20), (132, 45), (200, 12)])
def test_render_fits_the_screen(width, height):
    window = TopWindow(groups.DEFAULT_GROUPS)
    window.add(items_at(0, 500), T0 // NS)
    lines = render(window.snapshot(T0 // NS + 1, top=5), width, height, "t")
    assert len(lines) <= height and all(len(line) <= width for line in lines)
    assert any(line.startswith("by in_port") for line in lines)
    if width >= 100:
        assert any(" by " in line for line in lines)  # a second column


def test_an_empty_window_renders():
    snapshot = Snapshot(now_s=0, seconds=10, arrived=0, examined=0, last_second=0,
                        types=[], dpifs=[], groups=[])
    assert render(snapshot, 80, 24, "t")[1].startswith("upcalls: 0/s")


# --- in a real terminal -----------------------------------------------------------------

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Terminal:
    """A tmux session running one command; its exit status lands in a file."""

    def __init__(self, tmp_path, command: list[str], width: int = 132, height: int = 45):
        self.name = f"upcall-top-{time.monotonic_ns()}"
        self.status = tmp_path / "status"
        self.stderr = tmp_path / "stderr"
        line = (f"cd {shlex.quote(str(ROOT))} && {shlex.join(command)} "
                f"2>{shlex.quote(str(self.stderr))}; echo $? > {shlex.quote(str(self.status))}"
                "; sleep 60")
        subprocess.run(["tmux", "new-session", "-d", "-s", self.name, "-x", str(width),
                        "-y", str(height), line], check=True)
        # A tmux server already running may size new windows its own way.
        subprocess.run(["tmux", "resize-window", "-t", self.name, "-x", str(width),
                        "-y", str(height)], check=True)

    def screen(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name],
                              capture_output=True, text=True, check=True).stdout

    def wait_for(self, needle: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if needle in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"the screen never showed {needle!r}:\n{self.screen()}")

    def press(self, key: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, key], check=True)

    def exit_status(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status.exists() and self.status.read_text().strip():
                return int(self.status.read_text())
            time.sleep(0.2)
        raise AssertionError(f"the command never ended:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


@pytest.fixture
def terminal(tmp_path):
    opened = []

    def start(command: list[str]) -> Terminal:
        opened.append(Terminal(tmp_path, command))
        return opened[-1]

    yield start
    for term in opened:
        term.close()


TOOL = [sys.executable, "-m", "upcall_capture"]


@needs_tmux
@pytest.mark.capture
def test_top_during_a_capture_with_w(replay, terminal, tmp_path):
    out = tmp_path / "live.pcapng"
    source = replay(REPLAY_DIR / "mixed.upc", "-u", "-r", "5000", "-n", "10000000")
    term = terminal([*TOOL, "-p", str(source.pid), "--top", "-w", str(out)])
    term.wait_for("upcalls:")
    source.start()
    # curses redraws line by line: each needle is waited for, not read off one capture.
    for needle in ("port 1 (system@ovs-system)", "by ipv4.src/24", "handler1", " 0 lost, ",
                   "ring at most"):
        term.wait_for(needle)
    term.press("q")
    assert term.exit_status() == 0
    said = term.stderr.read_text()
    captured = int(said.split(" upcalls captured")[0].rsplit(" ", 1)[-1])
    assert captured > 0 and ", 0 lost" in said
    packets = [b for b in pcapng.iter_blocks(out.read_bytes()) if isinstance(b, pcapng.Packet)]
    assert len(packets) == captured  # q ended a complete file


@needs_tmux
def test_top_replays_a_file(terminal, tmp_path):
    records = storm(SENT, 3000, unique=True)
    blocks = UpcallBlocks(snaplen=9216, clock_offset_ns=T0, port_name=lambda d, p: None)
    data = pcapng.section_header(userappl="t", os="t", hardware="t")
    data += blocks.packets(records)  # storm(): 5 us apart
    data += blocks.statistics(4 * NS, start_ktime_ns=0)
    path = tmp_path / "storm.pcapng"
    path.write_bytes(data)
    term = terminal([*TOOL, "-r", str(path), "--top"])
    screen = term.wait_for("end of ")
    ports = Counter(item.interface for item in
                    (from_record(r, T0, lambda d, p: None) for r in records)).most_common(1)
    (name, count), = ports
    assert f"{count / 3000:.1%}" in screen.split(name)[0].splitlines()[-1]
    term.press("q")
    assert term.exit_status() == 0
