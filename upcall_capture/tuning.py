"""Process-wide tuning for a capture, in one place: what the tool does to its own process
(and the traced one's pages) so that an upcall storm costs it less.

cli.py calls `before_attach()` before the probe is compiled and attached (and before the
capture starts its threads and workers, which take its scheduling policy), and
`after_attach(pid)` once it is, for each process traced (--follow attaches again). A
describing worker (workers.py) calls `tune_gc()` as it starts, and `HeapTrimmer.tick()`
after each batch. The main process's threads that wait on I/O and hand work on (to a
worker, from it, to the disk) call `schedule_for_latency()` as they start.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import time

from upcall_capture.target import prefault_readonly_data


def before_attach() -> None:
    tune_malloc()
    schedule_as_batch()
    shorten_switch_interval()


def after_attach(pid: int) -> None:
    # Nothing runs the compiler again: give its pages back.
    release_compiler_pages()
    prefault_readonly_data(pid)
    tune_gc()


def schedule_as_batch() -> None:
    """Run the calling thread as SCHED_BATCH, and so every thread and worker it starts
    (but those that call schedule_for_latency()).

    The weight stays that of any other thread; what changes is that a thread of ours that
    wakes does not preempt the one running, and waits for the tick (1 to 4 ms) instead.
    In a storm the one running is often a handler of the traced ovs-vswitchd, which is
    left its slice; a capture is all throughput, and a tick is nothing to it. It also
    costs the capture less: in 20 alternating pairs of 2,500,000 new flows at 250,000/s,
    the main process took 4% to 7% less CPU (less in 17 of them) and the worker 1% to 2.5%
    less. Where the system refuses, nothing changes.
    """
    _schedule(os.SCHED_BATCH)


def schedule_for_latency() -> None:
    """Run the calling thread as SCHED_OTHER again: for the main process's threads that
    wait on I/O, then do a little and hand it on (a batch to a worker, a worker's
    blocks from it, a write to the disk). As SCHED_BATCH each woke up to a tick late, and
    the stages behind it waited: in a storm of 250,000 new flows/s the worker waited
    0.67 to 0.89 s of 10 for room to write its blocks, against 1.13 and 1.14 s, and the
    ring's reader 0.67 to 0.87 s for the output, against 1.57 and 2.05 (two runs each,
    beside a program spinning 3 ms of every 10). They take little CPU, and nothing of
    the traced program's slice while they wait."""
    _schedule(os.SCHED_OTHER)


def _schedule(policy: int) -> None:
    """The calling thread's scheduling policy; unchanged where the system refuses."""
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        pass


# The main process's GIL switch interval (Python's default is 5 ms).
SWITCH_INTERVAL_S = 0.001


def shorten_switch_interval() -> None:
    """Let a thread of the main process that comes back from a system call have the GIL
    within a millisecond, not five. Its reading thread holds the GIL for long spells;
    the others wait on I/O and then need it for a moment: with 5 ms, in a storm of
    250,000 new flows/s whose worker had batches enough (a deeper request ring than the
    2 MiB of then: channel.py), each direct write of 4 MiB took the writer's thread 8 to
    9 ms (3.5 for `dd`), and the writing was the capture's bottleneck (busy 8 s of 10);
    with 1 ms, 6 ms and 5 s. (Tried before the worker's request ring was deepened, at 0.5 ms,
    it lost more: the worker, waiting for batches, was the bottleneck then.)"""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


# glibc's mallopt() parameters, and the values the capture wants.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 8 << 20
_TRIM_THRESHOLD_BYTES = 32 << 20


def tune_malloc() -> None:
    """Serve the capture's recurring buffers from a heap that keeps its pages.

    A capture allocates and frees buffers of up to a few megabytes (ring copies, block
    batches) hundreds of times a second. By default glibc gives many of them pages of
    their own, or trims the heap under them, and every new page is a page fault: that was
    an eighth of the tool's CPU time in an upcall storm. Every such buffer is bounded
    (ring_buffer.READ_LIMIT, the output queue), so a heap that keeps up to 32 MB of free
    pages stays small. Fixing the mmap threshold also stops glibc from raising it.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


# madvise(2): reclaim these pages now (Linux 5.4 and later); drop our mapping of them.
_MADV_PAGEOUT = 21
_MADV_DONTNEED = 4
# The compiler bcc links: needed to build the BPF program, not to run it.
_COMPILER_LIBRARIES = ("libLLVM", "libclang")


def release_compiler_pages() -> None:
    """Give back the resident pages of LLVM's and clang's code once the program is loaded.

    They are some 70 MB of the tool's resident memory, a third of the budget, and nothing
    runs them again (--follow compiles again: they are read back in). Their code is
    dropped from our page tables (MADV_DONTNEED): clean pages of the file, mapped again
    from it if ever run. Reclaiming it (MADV_PAGEOUT, as for the rest) does nothing to a
    page that another process maps too, or that the kernel holds as a huge page, as it
    comes to once a long-lived process has mapped the library (khugepaged): then all of
    it stayed in our RSS, 196 MB in all here instead of 129. The rest (read-only data,
    relocated in place by the loader, so partly private) is only reclaimed: dropping it
    would lose those relocations. Where madvise cannot, nothing changes.
    """
    libc = ctypes.CDLL(None)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and any(name in fields[5] for name in _COMPILER_LIBRARIES):
            start, end = (int(value, 16) for value in fields[0].split("-"))
            code = fields[1] == "r-xp"  # executable and never written: the file's bytes
            libc.madvise(start, end - start, _MADV_DONTNEED if code else _MADV_PAGEOUT)


# Objects the cyclic garbage collector may allocate between two collections of its
# youngest generation (Python's default is 700).
GC_THRESHOLD = 50_000


def tune_gc() -> None:
    """Let the collector run less often. A storm allocates millions of objects that their
    reference counts free (nothing per upcall makes a cycle) and keeps caches of tens of
    thousands: at the default threshold, walking them took 8% of the CPU a new key costs.
    What is alive once the probe is attached (bcc's and the imports') is never walked."""
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])


# How often a describing worker gives its heap's free pages back.
TRIM_INTERVAL_S = 1.0


class HeapTrimmer:
    """Give glibc's free heap pages back to the system now and then (malloc_trim).

    A worker in a long storm of new flows with outcomes on reached 64 to 66 MB, over the
    60 MB a worker may take, while glibc held 19 MB of it free between the batches' large
    buffers and the caches' entries. A trim a second costs some hundreds of microseconds;
    pinning the mmap threshold instead (as the main process does) cost the worker 11% to
    18% more CPU, its batch buffers being mapped and faulted in afresh each time."""

    def __init__(self, interval_s: float = TRIM_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._next = time.monotonic() + interval_s
        try:
            self._trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # not glibc: nothing to trim
            self._trim = None

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self._next and self._trim is not None:
            self._next = now + self.interval_s
            self._trim(0)
