"""The console view: one terse line per upcall, in the spirit of tcpdump.

The same lines serve a live capture and a file read back with -r. `-v` adds the key
as OVS prints it, `-x` a hex dump, and `--decode` scapy's full dissection.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

import dpkt

from upcall_capture import comment, pcapng
from upcall_capture.flowkey import KeyCache, decode_key
from upcall_capture.flowkey.layouts import Fields
from upcall_capture.probe.kernel_record import errno_text
from upcall_capture.probe.record import Upcall, parse
from upcall_capture.upcall_blocks import interface_name

PortNamer = Callable[[str, int], "str | None"]


@dataclass(frozen=True, slots=True)
class CapturedUpcall:
    """An upcall with what is shown beside it: its time, link type and interface."""

    upcall: Upcall
    wall_ns: int
    linktype: int
    interface: str
    port: int | None
    port_name: str | None
    packet_block: pcapng.Packet | None = None  # when read back from our own pcapng
    fields: Fields | None = None  # the key's, when they were decoded already


def from_record(record: bytes, clock_offset_ns: int, port_name: PortNamer) -> CapturedUpcall:
    upcall = parse(record)
    fields = decode_key(upcall.key, upcall.key_size).fields
    port = fields.get("in_port")
    name = port_name(upcall.dpif, port) if port is not None else None
    return CapturedUpcall(upcall, upcall.ktime_ns + clock_offset_ns,
                          comment.upcall_linktype(upcall, "eth.src" in fields),
                          interface_name(upcall.dpif, port, name), port, name, fields=fields)


def packet_summary(packet: bytes, linktype: int) -> str:
    """A short description of the packet, tcpdump style (dpkt: fast and forgiving)."""
    try:
        if linktype != pcapng.LINKTYPE_ETHERNET:
            ip_class = dpkt.ip6.IP6 if packet[:1] and packet[0] >> 4 == 6 else dpkt.ip.IP
            return _ip_summary(ip_class(packet), len(packet))
        frame = dpkt.ethernet.Ethernet(packet)
    except (dpkt.UnpackError, IndexError, ValueError):
        return f"malformed, length {len(packet)}"
    vlans = "".join(f"vlan {tag.id}, " for tag in getattr(frame, "vlan_tags", []))
    payload = frame.data
    if isinstance(payload, dpkt.arp.ARP):
        op = {1: "Request", 2: "Reply"}.get(payload.op, f"op {payload.op}")
        return (f"{vlans}ARP, {op} who-has {_addr(payload.tpa)} tell {_addr(payload.spa)}, "
                f"length {len(packet)}")
    if isinstance(payload, dpkt.ip.IP | dpkt.ip6.IP6):
        return vlans + _ip_summary(payload, len(packet))
    return f"{vlans}ethertype 0x{frame.type:04x}, length {len(packet)}"


def _ip_summary(ip, length: int) -> str:
    src, dst = _addr(ip.src), _addr(ip.dst)
    l4 = ip.data
    family = "IP6" if isinstance(ip, dpkt.ip6.IP6) else "IP"
    if isinstance(l4, dpkt.tcp.TCP | dpkt.udp.UDP):
        proto = "tcp" if isinstance(l4, dpkt.tcp.TCP) else "udp"
        return f"{family} {src}.{l4.sport} > {dst}.{l4.dport}: {proto}, length {length}"
    if isinstance(l4, dpkt.icmp.ICMP | dpkt.icmp6.ICMP6):
        return f"{family} {src} > {dst}: ICMP type {l4.type} code {l4.code}, length {length}"
    proto = getattr(ip, "p", getattr(ip, "nxt", 0))
    return f"{family} {src} > {dst}: proto {proto}, length {length}"


def _addr(raw: bytes) -> str:
    if len(raw) == 16:
        return socket.inet_ntop(socket.AF_INET6, raw)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    return raw.hex()


def clock_time(wall_ns: int) -> str:
    seconds, nanos = divmod(wall_ns, 1_000_000_000)
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{nanos:09d}"


def hex_dump(data: bytes) -> list[str]:
    """tcpdump -x: 16 bytes a line, in groups of two."""
    lines = []
    for offset in range(0, len(data), 16):
        chunk = data[offset:offset + 16].hex()
        groups = " ".join(chunk[i:i + 4] for i in range(0, len(chunk), 4))
        lines.append(f"\t0x{offset:04x}:  {groups}")
    return lines


def dissection(packet: bytes, linktype: int) -> str:
    """scapy's full dissection of the packet."""
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    if not packet:
        return "(no packet bytes)"  # scapy would show a default packet instead
    try:
        if linktype == pcapng.LINKTYPE_ETHERNET:
            layer = Ether(packet)
        else:
            layer = IPv6(packet) if packet[0] >> 4 == 6 else IP(packet)
        return layer.show(dump=True).rstrip("\n")
    except Exception as err:  # scapy raises struct.error and others on short packets
        return f"(scapy cannot dissect these {len(packet)} bytes: {err})"


class ConsolePrinter:
    """Writes upcalls as text lines."""

    def __init__(self, stream: TextIO, *, verbose: bool = False, hexdump: bool = False,
                 dissect: bool = False) -> None:
        self.stream = stream
        self.verbose = verbose
        self.hexdump = hexdump
        self.dissect = dissect
        # -v in an upcall storm prints the same few thousand keys over and over.
        self._key_text = KeyCache(maxsize=8192).get

    def lines(self, item: CapturedUpcall) -> list[str]:
        upcall = item.upcall
        who = f" {upcall.thread}" if upcall.thread else ""
        kind = f" {upcall.type_name}" if upcall.type >= 0 else ""
        if upcall.failed:
            who = f" failed {errno_text(upcall.enqueue.result)}"
        lines = [f"{clock_time(item.wall_ns)}{kind} {item.interface}{who}: "
                 f"{packet_summary(upcall.packet, item.linktype)}"]
        if self.verbose and (upcall.key or upcall.type >= 0):
            key_text = self._key_text(upcall.key, upcall.key_size)
            lines.append("\t" + (comment.TRACEPOINT_KEY + key_text if upcall.failed
                                 else key_text))
        if self.verbose and upcall.outcome is not None:
            lines.append("\t" + comment.outcome_fields(upcall.outcome, upcall.key).text)
        if self.verbose and upcall.enqueue is not None and not upcall.failed:
            lines.append("\t" + comment.enqueue_line(upcall.enqueue))
        if self.hexdump:
            lines.extend(hex_dump(upcall.packet))
        if self.dissect:
            lines.append(dissection(upcall.packet, item.linktype))
        return lines

    def show(self, items: Iterable[CapturedUpcall], note: str | None = None) -> None:
        lines = [f"({note})"] if note else []
        for item in items:
            lines.extend(self.lines(item))
        if lines:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()


class ConsoleOutput:
    """The live capture's console: records in, lines out."""

    def __init__(self, printer: ConsolePrinter, *, clock_offset_ns: int,
                 port_name: PortNamer) -> None:
        self.printer = printer
        self.clock_offset_ns = clock_offset_ns
        self.port_name = port_name
        self.ended: str | None = None

    def prepare(self, records, dropped: int) -> None:
        return None

    def packets(self, records, dropped: int = 0, prepared: object = None) -> None:
        self._show((from_record(r, self.clock_offset_ns, self.port_name) for r in records),
                   f"{dropped} upcalls lost" if dropped else None)

    def gap(self, note: str) -> None:
        """The capture resumed after a gap (--follow): say so at once, as a line."""
        self._show((), note)

    def _show(self, items: Iterable[CapturedUpcall], note: str | None) -> None:
        if self.ended:
            return
        try:
            self.printer.show(items, note=note)
        except BrokenPipeError:
            self.ended = "the output's reader went away"  # as in: upcall-capture | head

    def finish(self, end_ktime_ns: int, start_ktime_ns: int) -> None:
        pass

    def flush(self) -> None:
        pass  # nothing is held back
