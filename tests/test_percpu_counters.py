"""PerCpuCounters against a real BPF per-CPU array: each counter summed over every CPU,
as bcc's own table.sum() gives it, in the order of the indices."""

import ctypes

import pytest

from upcall_capture.probe.percpu_counters import PerCpuCounters

pytestmark = pytest.mark.capture


def test_each_counter_is_summed_over_the_cpus_in_index_order():
    from bcc import BPF
    from bcc.libbcc import lib
    from bcc.utils import get_possible_cpus

    program = BPF(text=b"BPF_PERCPU_ARRAY(counters, u64, 6);\n"
                       b"int unused(void *ctx) { return 0; }")
    try:
        table = program["counters"]
        cpus = len(get_possible_cpus())
        # Values past 32 bits, different on each CPU and for each index.
        for index in range(6):
            values = [(index + 1) << 33 | (cpu + 1) * 7 for cpu in range(cpus)]
            table[ctypes.c_int(index)] = table.Leaf(*values)
        reader = PerCpuCounters(table.map_fd, 4, cpus, lib._name)
        expected = tuple(sum((index + 1) << 33 | (cpu + 1) * 7 for cpu in range(cpus))
                         for index in range(4))
        assert reader.read() == expected
        assert expected == tuple(int(table.sum(ctypes.c_int(i)).value) for i in range(4))
        table[ctypes.c_int(2)] = table.Leaf(*[5] * cpus)
        assert reader.read()[2] == 5 * cpus  # read again, not kept
    finally:
        program.cleanup()


def test_a_counter_that_cannot_be_read_is_an_error():
    from bcc import BPF
    from bcc.libbcc import lib
    from bcc.utils import get_possible_cpus

    program = BPF(text=b"BPF_PERCPU_ARRAY(counters, u64, 2);\n"
                       b"int unused(void *ctx) { return 0; }")
    try:
        reader = PerCpuCounters(program["counters"].map_fd, 3, len(get_possible_cpus()),
                                lib._name)
        with pytest.raises(OSError):
            reader.read()  # index 2 is past the array's end
    finally:
        program.cleanup()
