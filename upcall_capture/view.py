"""The console view: one terse line per upcall, in the spirit of tcpdump."""

from __future__ import annotations

import socket
import time

import dpkt

from upcall_capture.flowkey import decode_key
from upcall_capture.probe.record import parse
from upcall_capture.upcall_blocks import interface_name


def packet_summary(packet: bytes, l3: bool) -> str:
    """A short description of the packet, tcpdump style (dpkt: fast and forgiving)."""
    try:
        if l3:
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


def upcall_line(*, wall_ns: int, dpif: str, type_name: str, port: int | None,
                port_name: str | None, thread: str, packet: bytes, l3: bool) -> str:
    where = interface_name(dpif, port, port_name)
    return (f"{clock_time(wall_ns)} {type_name} {where} {thread}: "
            f"{packet_summary(packet, l3)}")


class ConsoleOutput:
    """Prints one line per upcall to a text stream."""

    def __init__(self, stream, *, clock_offset_ns: int, port_name) -> None:
        self.stream = stream
        self.clock_offset_ns = clock_offset_ns
        self.port_name = port_name
        self.ended: str | None = None

    def packets(self, records: list[bytes], dropped: int = 0) -> None:
        if self.ended:
            return
        lines = []
        if dropped:
            lines.append(f"({dropped} upcalls lost)")
        for record in records:
            upcall = parse(record)
            fields = decode_key(upcall.key, upcall.key_size).fields
            port = fields.get("in_port")
            lines.append(upcall_line(
                wall_ns=upcall.ktime_ns + self.clock_offset_ns, dpif=upcall.dpif,
                type_name=upcall.type_name, port=port,
                port_name=self.port_name(upcall.dpif, port) if port is not None else None,
                thread=upcall.thread, packet=upcall.packet,
                l3=bool(upcall.key) and "eth.src" not in fields,
            ))
        try:
            if lines:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
        except BrokenPipeError:
            self.ended = "the output's reader went away"  # as in: upcall-capture | head

    def finish(self, end_ktime_ns: int, start_ktime_ns: int) -> None:
        if not self.ended:
            self.stream.flush()
