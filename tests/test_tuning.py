"""tuning.py: what the tool does to its own process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from upcall_capture import tuning


def test_a_worker_gives_its_free_heap_back_once_an_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(tuning.time, "monotonic", lambda: clock[0])
    trimmer = tuning.HeapTrimmer(interval_s=1.0)
    trims = []
    trimmer._trim = lambda pad: trims.append(pad)
    trimmer.tick()
    assert trims == []  # not before the first interval has passed
    clock[0] += 1.0
    trimmer.tick()
    trimmer.tick()
    assert trims == [0]  # once, keeping no pad
    clock[0] += 0.5
    trimmer.tick()
    clock[0] += 0.5
    trimmer.tick()
    assert trims == [0, 0]



# A process that compiles a BPF program, then gives the compiler's pages back, and prints
# its file-backed resident memory (kB) before and after.
_COMPILE_AND_RELEASE = """
import sys
from bcc import BPF
from upcall_capture import tuning

def rss_file_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))

program = BPF(text=b"int f(void *ctx) { return 0; }")
before = rss_file_kb()
tuning.release_compiler_pages()
print(before, rss_file_kb())
"""


@pytest.mark.capture
def test_the_compilers_code_leaves_our_memory_while_another_process_maps_it_too():
    # Another bcc user on the host (here: one that compiled and waits) maps the same
    # pages: reclaiming them (MADV_PAGEOUT) then left all of them in our RSS, some 70 MB.
    holder = subprocess.Popen([sys.executable, "-c", "from bcc import BPF\n"
                               "BPF(text=b'int f(void *ctx) { return 0; }')\n"
                               "print('compiled', flush=True)\nimport time; time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "compiled"
        done = subprocess.run([sys.executable, "-c", _COMPILE_AND_RELEASE],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        before_kb, after_kb = map(int, done.stdout.split())
    finally:
        holder.kill()
        holder.wait()
    assert before_kb - after_kb > 30 * 1024, (before_kb, after_kb)


def _tasks(pid: int) -> list[int]:
    """A process's threads, and its children's, and theirs."""
    tasks = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    children = [int(child) for tid in tasks
                for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return tasks + [task for child in children for task in _tasks(child)]


@pytest.mark.capture
def test_the_capture_and_its_workers_run_as_batch_but_their_io_threads(replay, tmp_path):
    # Their threads wake without preempting the traced process's (tuning.schedule_as_batch),
    # but for the main process's three that wait on I/O and hand work on
    # (tuning.schedule_for_latency): sending to the worker, taking its replies, writing.
    from conftest import REPLAY_DIR, Tool

    source = replay(REPLAY_DIR / "mixed.upc", "-n", "200")
    tool = Tool("-p", str(source.pid), "-w", str(tmp_path / "out.pcapng"), "--workers", "1")
    tool.wait_listening()
    try:  # looked at before the source fires: its exit ends the capture
        main = _tasks(tool.proc.pid)
        main_threads = [int(tid) for tid in os.listdir(f"/proc/{tool.proc.pid}/task")]
        policies = {task: os.sched_getscheduler(task) for task in main}
    finally:
        source.start()
        status, stderr = tool.wait()
    assert status == 0, stderr
    worker = [task for task in main if task not in main_threads]
    assert worker, main
    assert {policies[task] for task in worker} == {os.SCHED_BATCH}, policies
    assert policies[tool.proc.pid] == os.SCHED_BATCH  # the thread that reads the ring
    others = sorted(policies[task] for task in main_threads)
    assert others.count(os.SCHED_OTHER) == 3, policies
    assert others.count(os.SCHED_BATCH) >= 2, policies  # the reader's, the output thread's


def test_the_main_process_hands_the_gil_on_within_a_millisecond():
    # tuning.shorten_switch_interval, as cli.py's before_attach() step leaves it: in a
    # process of its own, as it changes the caller's scheduling policy too.
    done = subprocess.run([sys.executable, "-c", "import sys\n"
                           "from upcall_capture import tuning\n"
                           "tuning.before_attach()\n"
                           "print(sys.getswitchinterval())"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(0.001)
