"""tcpdump's filter language, compiled by the real libpcap (through ctypes), as tcpdump does.

pcap_open_dead() gives a handle without a device: its programs test a VLAN tag in the
packet bytes, where an upcall's packet carries it, rather than in Linux socket metadata.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from upcall_capture.filters.cbpf import Insn, Program
from upcall_capture.filters.errors import FilterError

DLT_EN10MB = 1
# libpcap's DLT_RAW is 12 on Linux (14 on OpenBSD); it writes it to files as LINKTYPE_RAW
# (101), a number pcap_open_dead() refuses.
DLT_RAW = 12
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
SNAPLEN = 262144  # libpcap's maximum; a matching program returns it


class _BpfInsn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn))]


class _PacketHeader(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long),
                ("caplen", ctypes.c_uint32), ("len", ctypes.c_uint32)]


@functools.cache
def _libpcap() -> ctypes.CDLL:
    name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        raise FilterError("a packet filter needs libpcap: install libpcap0.8 (Debian/Ubuntu) "
                          "or libpcap (Fedora/RHEL)") from None
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p,
                                 ctypes.c_int, ctypes.c_uint32]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
    lib.pcap_offline_filter.argtypes = [ctypes.POINTER(_BpfProgram),
                                        ctypes.POINTER(_PacketHeader), ctypes.c_char_p]
    return lib


def compile_expression(expression: str, linktype: int, optimize: bool = True) -> Program:
    """pcap_compile (netmask unknown) for linktype; FilterError with libpcap's own message
    when it refuses the expression."""
    lib = _libpcap()
    handle = lib.pcap_open_dead(linktype, SNAPLEN)
    if not handle:
        raise FilterError(f"libpcap cannot open a handle for link type {linktype}")
    program = _BpfProgram()
    try:
        if lib.pcap_compile(handle, ctypes.byref(program), expression.encode(), int(optimize),
                            PCAP_NETMASK_UNKNOWN) < 0:
            message = lib.pcap_geterr(handle).decode(errors="replace")
            raise FilterError(f"packet filter {expression!r}: {message}")
        insns = [Insn(i.code, i.jt, i.jf, i.k) for i in program.bf_insns[:program.bf_len]]
        lib.pcap_freecode(ctypes.byref(program))
    finally:
        lib.pcap_close(handle)
    return Program(insns)


def offline_filter(program: Program, packet: bytes, wirelen: int) -> int:
    """libpcap's own interpreter (pcap_offline_filter) over the same program: the reference
    that Program.run() and the probe's C must agree with."""
    insns = (_BpfInsn * len(program.insns))(
        *((i.code, i.jt, i.jf, i.k) for i in program.insns))
    bpf = _BpfProgram(len(insns), insns)
    header = _PacketHeader(0, 0, len(packet), wirelen)
    return _libpcap().pcap_offline_filter(ctypes.byref(bpf), ctypes.byref(header), packet)
