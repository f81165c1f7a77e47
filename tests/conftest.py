"""Shared fixtures: the project root, the replay source, running the real CLI, building C."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REPLAY_DIR = ROOT / "samples" / "replay"
REPLAY_BIN = REPLAY_DIR / "upcall-replay"
sys.path.insert(0, str(REPLAY_DIR))
# OVS's own text for 978 keys: shared test data beside the project, never copied into it.
VECTORS = ROOT.parent / "shared" / "flowkeys" / "vectors.tsv"


def read_vectors() -> list[tuple[bytes, str]]:
    """(key, OVS's text) of every vector; [] where the file is absent. '-' is the empty key."""
    if not VECTORS.is_file():
        return []
    return [(b"" if hex_key == "-" else bytes.fromhex(hex_key), text)
            for hex_key, text in (line.split("\t") for line in VECTORS.read_text().splitlines())]


# The capture's closing line, up to its losses (captured, lost); K without key text only
# when it had to shed decoding. Tests that read more of the line add to SUMMARY_HEAD.
SUMMARY_HEAD = r"(\d+) upcalls captured(?:, \d+ without key text)?, (\d+) lost"
SUMMARY = re.compile(SUMMARY_HEAD)


def blocks_by_type(data: bytes):
    """A pcapng's blocks, and its interfaces, packets and statistics blocks apart."""
    from upcall_capture import pcapng

    blocks = list(pcapng.iter_blocks(data))
    return (blocks, [b for b in blocks if isinstance(b, pcapng.InterfaceDescription)],
            [b for b in blocks if isinstance(b, pcapng.Packet)],
            [b for b in blocks if isinstance(b, pcapng.InterfaceStatistics)])


def tshark_count(path) -> int:
    """The frames tshark reads in a file: it must read it whole, without an error."""
    done = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.number"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return len(done.stdout.split())


def build_c(directory: Path, output: str, source: str,
            flags: tuple[str, ...] = ("-O2",)) -> Path:
    """`source` built by gcc with `flags` into directory/output; the test is skipped where
    there is no gcc, and fails with gcc's messages where the source does not build."""
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    source_path = directory / f"{Path(output).stem}.c"
    source_path.write_text(source)
    built = directory / output
    done = subprocess.run(["gcc", *flags, "-o", str(built), str(source_path)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return built


class ManualClock:
    """A clock that moves only when a test moves it (its `now`)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _capture_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "capture tests attach eBPF: they need root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not installed (python3-bpfcc)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _capture_unavailable()
    if reason:
        for item in items:
            if "capture" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def replay_bin() -> Path:
    subprocess.run(["make", "-s", "-C", str(REPLAY_DIR)], check=True)
    return REPLAY_BIN


class Replay:
    """The replay source, started paused (-S) so that the capture attaches first."""

    def __init__(self, replay_bin: Path, records: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(replay_bin), "-S", *args, str(records)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.pid = self.proc.pid
        # Ready once it says it waits (as bench_capture.Replay waits): a test that
        # attached bcc at once met a process not yet exec'd, without the probe ("cannot
        # enable the USDT probe"), once in CI. (Or until it exits, if it fails to start.)
        self.proc.stderr.readline()

    def start(self) -> None:
        os.kill(self.pid, signal.SIGUSR1)

    def wait(self, timeout: float = 60) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Tool:
    """upcall-capture run as a user runs it, through its command line."""

    @staticmethod
    def command() -> list[str]:
        return [sys.executable, "-m", "upcall_capture"]

    def __init__(self, *args: str, stdout=subprocess.DEVNULL) -> None:
        self.proc = subprocess.Popen(
            [*self.command(), *args],
            stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        self.stderr_lines: list[str] = []

    def wait_for(self, needle: str, timeout: float = 60) -> str:
        """The first line on the tool's stderr that contains needle."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"tool exited before saying {needle!r}: "
                                     f"{self.stderr_lines}")
            self.stderr_lines.append(line)
            if needle in line:
                return line
        raise AssertionError(f"tool never said {needle!r}")

    def wait_listening(self, timeout: float = 60) -> None:
        self.wait_for("listening on dpif_recv:recv_upcall", timeout)

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, "".join(self.stderr_lines) + err


@pytest.fixture
def replay(replay_bin):
    """Starts replay sources (paused), killed at the end of the test; `binary` may be a
    copy of the replay program under another name."""
    started = []

    def start(records: Path, *args: str, binary: Path = replay_bin) -> Replay:
        source = Replay(binary, records, *args)
        started.append(source)
        return source

    yield start
    for source in started:
        source.kill()


def start_capture(replay, records: Path, out: Path, *replay_args: str,
                  tool_args: tuple[str, ...] = ()) -> tuple[Replay, Tool]:
    """A replay source and the tool writing `out` from it, listening, then firing."""
    source = replay(records, *replay_args)
    tool = Tool("-p", str(source.pid), "-w", str(out), *tool_args)
    tool.wait_listening()
    source.start()
    return source, tool


@pytest.fixture(scope="session")
def ovs_format() -> Path:
    """OVS 3.1's own text for actions and megaflows: tests/system/ovs-format.c, which
    build-guest.sh builds (once, cached) with the guest's OVS tree. Skipped without root,
    which building needs; a build that fails is a failure."""
    if os.geteuid() != 0:
        pytest.skip("building OVS's formatter (tests/system/build-guest.sh) needs root")
    done = subprocess.run(["bash", str(ROOT / "tests" / "system" / "build-guest.sh")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(done.stdout.strip()) / "ovs-format"


def ovs_texts(ovs_format: Path, requests: list[str]) -> list[str]:
    """What ovs-format prints for each request line (`A hex`, `K key mask`, `k key`): one
    run for them all."""
    done = subprocess.run([str(ovs_format)], input="".join(r + "\n" for r in requests).encode(),
                          capture_output=True, check=True, timeout=600)
    # ct helper and timeout names are raw bytes in OVS's text: kept as surrogates.
    lines = done.stdout.decode("utf-8", "surrogateescape").split("\n")[:-1]
    assert len(lines) == len(requests)
    return lines
