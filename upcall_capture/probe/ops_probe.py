"""Loading flow_ops.c through bcc: a process's flow puts and executes, with their ring."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

from upcall_capture.errors import UsageError
from upcall_capture.probe.loader import RingProbe, import_bcc, program_text
from upcall_capture.target import usdt_probes

SOURCE = Path(__file__).with_name("flow_ops.c")
PROVIDER = "dpif_netlink_operate__"
PROBES = {"op_flow_put": "trace_op_flow_put", "op_flow_execute": "trace_op_flow_execute"}
# A request is copied up to this much: a 9000-byte jumbo frame's execute, with its key
# and actions; a put is a few hundred bytes.
OPS_CAP = 16384
# 16 MiB: a put is about 400 bytes, an execute its packet and 150 more.
DEFAULT_RING_PAGES = 4096
_SHEDDING = 2  # control[0]'s value for it (SHEDDING in flow_ops.c)


def missing_probes(pid: int) -> list[str]:
    """The probes of PROBES the process does not have."""
    present = {(probe.provider, probe.name) for probe in usdt_probes(pid)}
    return [f"{PROVIDER}:{name}" for name in PROBES if (PROVIDER, name) not in present]


@dataclass(frozen=True)
class OpsCounters:
    puts: int
    executes: int
    lost: int  # events that found the ring full
    shed: int  # events not copied while shedding (OpsProbe.shed)


class OpsProbe(RingProbe):
    """flow_ops.c attached to one process's op_flow_put and op_flow_execute."""

    def __init__(self, pid: int, *, ring_pages: int = DEFAULT_RING_PAGES) -> None:
        self.pid = pid
        self.ring_pages = ring_pages

    def attach(self) -> None:
        bcc = import_bcc()
        usdt = bcc.USDT(pid=self.pid)
        try:
            for name, function in PROBES.items():
                usdt.enable_probe(probe=f"{PROVIDER}:{name}", fn_name=function)
            self._bpf = bcc.BPF(text=program_text(SOURCE).encode(), usdt_contexts=[usdt],
                                cflags=[f"-DOPS_CAP={OPS_CAP}",
                                        f"-DRING_PAGES={self.ring_pages}", "-w"])
        except Exception as err:  # bcc raises a bare Exception
            self.close()
            raise UsageError(f"cannot attach to the flow put and execute probes of pid "
                             f"{self.pid}: {err}") from None
        self._start("op_events", "the flow operations' ring")

    def drain(self) -> list[memoryview]:
        return self._buffer.read()

    def shed(self, on: bool) -> None:
        """Count the ops but copy none (on), or copy them again; outcomes.py says which
        upcalls that leaves unknown."""
        self._bpf["control"][ctypes.c_int(0)] = ctypes.c_uint32(_SHEDDING if on else 0)

    def counters(self) -> OpsCounters:
        table = self._bpf["counters"]
        return OpsCounters(*(int(table.sum(ctypes.c_int(i)).value) for i in range(4)))
