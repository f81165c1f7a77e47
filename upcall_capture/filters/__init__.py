"""Filters: which upcalls to capture, decided inside the probe where possible.

    spec = compile_filters(["dpif=system@ovs-system,type=miss"], "tcp port 80")
    RecvUpcallProbe(pid, ..., filter_c=spec.bpf_c)   # the probe filters before copying
    spec.userspace                                   # None, or a test for each record
    spec.matches(upcall)                             # the whole filter in Python (-r, tests)

See compiler.py for where each part runs, terms.py for the --filter language and cbpf.py
for the packet filter's two forms (Python and C).
"""

from upcall_capture.filters.compiler import FilterSpec, PacketFilter, compile_filters
from upcall_capture.filters.errors import FilterError
from upcall_capture.filters.terms import NAMES, PortLookup, Upcall

__all__ = ["NAMES", "FilterError", "FilterSpec", "PacketFilter", "PortLookup", "Upcall",
           "compile_filters"]
