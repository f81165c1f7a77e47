"""Reliability: signals, full disks and bad input end cleanly, with valid files."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import zlib

import pytest
from conftest import REPLAY_DIR, ROOT, SUMMARY, Tool, start_capture

from upcall_capture import pcapng

MIXED = REPLAY_DIR / "mixed.upc"


def assert_valid(path):
    data = path.read_bytes()
    assert pcapng.complete_length(data) == len(data)
    done = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.number"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return [b for b in pcapng.iter_blocks(data) if isinstance(b, pcapng.Packet)]


def handles(pid: int, signum: int) -> bool:
    """Whether the process has a handler for signum (SigCgt in /proc/PID/status)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def one_line_error(stderr: str, needle: str) -> None:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if needle in line]
    assert len(errors) == 1, stderr


@pytest.mark.capture
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_under_load_leaves_every_counted_upcall(replay, tmp_path, signum):
    out = tmp_path / "out.pcapng"
    source, tool = start_capture(replay, MIXED, out, "-n", "500000", "-r", "50000")
    time.sleep(1.5)
    tool.proc.send_signal(signum)
    status, stderr = tool.wait()
    assert status == 0, stderr
    captured, lost = map(int, SUMMARY.search(stderr).groups())
    packets = assert_valid(out)
    assert len(packets) == captured > 10000
    stats = [b for b in pcapng.iter_blocks(out.read_bytes())
             if isinstance(b, pcapng.InterfaceStatistics)]
    assert sum(s.received for s in stats) == captured
    assert sum(s.dropped for s in stats) == lost


@pytest.mark.capture
def test_second_sigint_while_closing_keeps_the_file_valid(replay, tmp_path):
    out = tmp_path / "out.pcapng"
    source, tool = start_capture(replay, MIXED, out, "-n", "500000", "-r", "50000")
    time.sleep(1.0)
    tool.proc.send_signal(signal.SIGINT)
    time.sleep(0.005)
    tool.proc.send_signal(signal.SIGINT)
    status, stderr = tool.wait()
    assert status == 0, stderr
    assert SUMMARY.search(stderr), stderr
    assert len(assert_valid(out)) == int(SUMMARY.search(stderr).group(1))


@pytest.mark.capture
def test_signal_before_attach_leaves_a_valid_empty_file(replay, tmp_path):
    out = tmp_path / "out.pcapng"
    source = replay(MIXED, "-n", "10")
    tool = Tool("-p", str(source.pid), "-w", str(out))
    # Once the tool handles SIGTERM it is about to compile and attach: it stops at once.
    deadline = time.monotonic() + 30
    while not handles(tool.proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
        time.sleep(0.005)
    tool.proc.send_signal(signal.SIGTERM)
    status, stderr = tool.wait()
    assert status == 0, stderr
    assert "Traceback" not in stderr
    assert assert_valid(out) == []


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.capture
@pytest.mark.parametrize("name", ["out.pcapng", "out.pcapng.gz"])
def test_full_disk(replay, small_disk, name):
    out = small_disk / name
    # Unique keys: compressed, repeated ones would take long to fill even a small disk.
    source, tool = start_capture(replay, MIXED, out, "-n", "100000", "-r", "20000", "-u", "-k")
    status, stderr = tool.wait()
    assert status == 1, stderr
    one_line_error(stderr, "No space left on device")
    written = int(re.search(r"; (\d+) written to ", stderr).group(1))
    assert SUMMARY.search(stderr)
    if name.endswith(".gz"):
        # The gzip stream ends at the last complete batch (no trailer): it decompresses.
        data = zlib.decompressobj(31).decompress(out.read_bytes())
        assert pcapng.complete_length(data) == len(data)
        packets = [b for b in pcapng.iter_blocks(data) if isinstance(b, pcapng.Packet)]
    else:
        packets = assert_valid(out)
    assert 0 < len(packets) == written


def run_tool(*args, **kwargs):
    return subprocess.run([*Tool.command(), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, **kwargs)


@pytest.mark.parametrize("args, status, message", [
    (["-s", "0"], 2, "snaplen must be from 1 to 16384"),
    (["-s", "70000"], 2, "snaplen must be from 1 to 16384"),
    (["--key-size", "100"], 2, "key size must be from 640 to 2048"),
    (["--buffer-pages", "3"], 2, "--buffer-pages must be a power of two"),
    (["-p", "abc"], 2, "pid must be a number"),
    (["-w", "/nonexistent/dir/x.pcapng", "-p", "1"], 2, None),
])
def test_bad_arguments(args, status, message):
    done = run_tool(*args)
    assert done.returncode == status
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    if message:
        assert message in done.stderr


@pytest.mark.capture
def test_unwritable_path_fails_before_attaching(replay, tmp_path):
    source = replay(MIXED, "-n", "10")
    done = run_tool("-p", str(source.pid), "-w", str(tmp_path / "missing" / "x.pcapng"))
    assert done.returncode == 2
    one_line_error(done.stderr, "No such file or directory")
    assert "listening" not in done.stderr


def test_not_root():
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root to become another user")
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *Tool.command(),
         "-p", "1"], capture_output=True, text=True, cwd=ROOT, timeout=60,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 2
    one_line_error(done.stderr, "must be run as root")


def test_no_bcc(tmp_path):
    # The same package, run by a Python that has no bcc (no system site-packages).
    python = shutil.which("python3", path="/root/.pyenv/shims:/usr/local/bin")
    probe = subprocess.run([python or "", "-c", "import bcc"], capture_output=True) \
        if python else None
    if probe is None or probe.returncode == 0:
        pytest.skip("no Python without bcc on this machine")
    site = subprocess.run([str(ROOT / ".venv/bin/python"), "-c",
                           "import scapy, dpkt, os; print(os.path.dirname(os.path.dirname("
                           "scapy.__file__)))"], capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{site}"}
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        done = subprocess.run([python, "-m", "upcall_capture", "-p", str(sleeper.pid)],
                              capture_output=True, text=True, env=env, timeout=60)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert done.returncode == 2
    one_line_error(done.stderr, "bcc is not installed")


@pytest.mark.capture
def test_drop_privileges_after_attach(replay, tmp_path):
    out = tmp_path / "out.pcapng"
    source = replay(MIXED, "-n", "3000", "-r", "3000")
    tool = Tool("-p", str(source.pid), "-w", str(out), "-Z", "nobody")
    tool.wait_listening()
    # The capturing child; its root parent only waits to remove the uprobes afterwards.
    child = open(f"/proc/{tool.proc.pid}/task/{tool.proc.pid}/children").read().split()[0]
    status_lines = open(f"/proc/{child}/status").read().splitlines()
    uid = next(line for line in status_lines if line.startswith("Uid:")).split()[1:]
    caps = next(line for line in status_lines if line.startswith("CapEff:")).split()[1]
    assert uid == ["65534"] * 4
    assert int(caps, 16) == (1 << 38) | (1 << 39)  # CAP_PERFMON and CAP_BPF, nothing else
    source.start()
    source.wait()
    status, stderr = tool.wait()
    assert status == 0, stderr
    assert SUMMARY.search(stderr).groups() == ("3000", "0")
    assert len(assert_valid(out)) == 3000


def test_unknown_user():
    done = run_tool("-Z", "no-such-user-here", "-p", "1")
    assert done.returncode == 2
    one_line_error(done.stderr, "-Z: no such user: no-such-user-here")


def test_missing_kernel_headers_and_uprobes_are_one_line_errors(monkeypatch):
    from upcall_capture.errors import UsageError
    from upcall_capture.probe import loader

    if os.geteuid() != 0:
        pytest.skip("the root check comes first")
    real_uname = os.uname()
    fake = os.uname_result((*real_uname[:2], "0.0.0-no-such-kernel", *real_uname[3:]))
    monkeypatch.setattr(os, "uname", lambda: fake)
    real_exists = loader.Path.exists
    monkeypatch.setattr(loader.Path, "exists",
                        lambda self: False if "kheaders" in str(self) else real_exists(self))
    with pytest.raises(UsageError, match="no kernel headers for 0.0.0-no-such-kernel: "
                                         "bcc compiles against them"):
        loader.check_environment()
    monkeypatch.setattr(os, "uname", lambda: real_uname)
    monkeypatch.setattr(loader.Path, "exists",
                        lambda self: False if "uprobe_events" in str(self) else real_exists(self))
    with pytest.raises(UsageError, match="uprobes are unavailable: mount tracefs"):
        loader.check_environment()
