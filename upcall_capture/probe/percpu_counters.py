"""A BPF per-CPU array of u64 counters, summed over the CPUs: one lookup a counter, made
with the GIL held.

Why not bcc's `table.sum()`: it makes several ctypes calls a counter, and each hands the
GIL back and takes it again, so that in a storm the main process's other threads (output,
the workers' senders and receivers) run in between. The capture reads seven counters
after every read of recv_upcall's ring. In a storm at 200,000/s the outcomes' lost count
alone (four counters, summed with dataclasses.astuple() then) took 81 to 116 µs of the
reading thread's CPU a read; 38 to 54 µs with these lookups and a plain sum.
"""

from __future__ import annotations

import ctypes
import os


def _lookup_function(library: str):
    """libbcc's bpf_lookup_elem(fd, key, value), called without releasing the GIL."""
    function = ctypes.PyDLL(library, use_errno=True).bpf_lookup_elem
    function.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    function.restype = ctypes.c_int
    return function


class PerCpuCounters:
    """The counters at indices 0..count-1 of a BPF_PERCPU_ARRAY of u64, whose fd is
    `map_fd` (it stays bcc's), on a machine of `possible_cpus` possible CPUs (the value a
    lookup fills has one u64 for each)."""

    def __init__(self, map_fd: int, count: int, possible_cpus: int, library: str) -> None:
        self._lookup = _lookup_function(library)
        self._fd = map_fd
        self._keys = [ctypes.c_uint32(index) for index in range(count)]
        self._values = (ctypes.c_uint64 * possible_cpus)()

    def read(self) -> tuple[int, ...]:
        lookup, fd, values = self._lookup, self._fd, self._values
        totals = []
        for key in self._keys:
            if lookup(fd, ctypes.byref(key), values) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, os.strerror(errno))
            totals.append(sum(values))
        return tuple(totals)
