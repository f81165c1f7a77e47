"""Raw probe records to pcapng blocks: interfaces, commented packets, statistics.

Pure (bytes in, bytes out). This is the hot path of a capture, so the per-record work
is one header unpack, one cache look-up and one packet block. Everything that only
depends on what repeats in an upcall storm (the upcall's metadata and its key) is
built once: the interface it goes to and its encoded comment and key options.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from upcall_capture import pcapng
from upcall_capture.flowkey import decode_key
from upcall_capture.probe.record import FLAG_NAMES, HEADER_SIZE, Upcall, parse

# ktime_ns, key_size, pid, tid, cpu, type, pkt_size, pkt_len, key_len: the numbers of
# the record header that the hot path needs.
_NUMBERS = struct.Struct("<QQIIIIIII")

# Bounds the cache of encoded options: an entry is about a kilobyte.
MAX_CACHED_OPTIONS = 65536

PortNamer = Callable[[str, int], "str | None"]


@dataclass
class Interface:
    dpif: str
    port: int | None
    linktype: int
    received: int = 0
    dropped: int = 0


def interface_name(dpif: str, port: int | None, port_name: str | None) -> str:
    if port_name:
        return f"{port_name} ({dpif})"
    if port is None:
        return f"no in_port ({dpif})"
    return f"port {port} ({dpif})"


def comment(upcall: Upcall, key_text: str, port: int | None, port_name: str | None) -> str:
    """The packet comment: what the upcall was, then its key as OVS prints it."""
    where = "" if port is None else f" in_port={port}" + (f"({port_name})" if port_name else "")
    lines = [
        f"upcall {upcall.type_name} dpif={upcall.dpif}{where} pid={upcall.pid} "
        f"tid={upcall.tid} thread={upcall.thread} cpu={upcall.cpu}",
        key_text,
    ]
    cut = []
    if len(upcall.packet) < upcall.pkt_size:
        cut.append(f"packet {len(upcall.packet)} of {upcall.pkt_size} bytes")
    if len(upcall.key) < upcall.key_size:
        cut.append(f"key {len(upcall.key)} of {upcall.key_size} bytes")
    if cut:
        lines.append("truncated: " + ", ".join(cut))
    unreadable = [name for flag, name in FLAG_NAMES.items() if upcall.flags & flag]
    if unreadable:
        lines.append("probe could not read: " + ", ".join(unreadable))
    return "\n".join(lines)


class UpcallBlocks:
    """Turns batches of raw records into pcapng blocks for one section."""

    def __init__(self, *, snaplen: int, clock_offset_ns: int, port_name: PortNamer,
                 if_filter: str | None = None) -> None:
        self.snaplen = snaplen
        self.clock_offset_ns = clock_offset_ns
        self.port_name = port_name
        self.if_filter = if_filter
        self.interfaces: list[Interface] = []
        self._interface_ids: dict[tuple[str, int | None, int], int] = {}
        self._options: dict[bytes, tuple[int, bytes]] = {}
        self._last_interface: Interface | None = None
        # Losses seen before any packet had an interface to carry them.
        self.unattributed_drops = 0

    def packets(self, records: list[bytes], dropped: int = 0) -> bytes:
        """Blocks for records in time order; `dropped` are losses since the last batch,
        charged to the first packet as its epb_dropcount."""
        out: list[bytes] = []
        cache = self._options
        enhanced_packet = pcapng.enhanced_packet
        offset = self.clock_offset_ns
        for record in records:
            ktime, key_size, _, _, _, _, pkt_size, pkt_len, key_len = _NUMBERS.unpack_from(record)
            key_end = HEADER_SIZE + key_len
            # What the comment and interface depend on: all but the time and lengths,
            # plus the lengths when something was cut.
            cache_key = record[8:32] + record[40:key_end]
            if pkt_len < pkt_size:
                cache_key += record[32:40]
            cached = cache.get(cache_key)
            if cached is None:
                cached = self._describe(record, out)
                if len(cache) >= MAX_CACHED_OPTIONS:
                    cache.clear()
                cache[cache_key] = cached
            if_id, options = cached
            interface = self.interfaces[if_id]
            interface.received += 1
            if dropped:
                interface.dropped += dropped
                options += pcapng.dropcount_option(dropped)
                dropped = 0
            out.append(enhanced_packet(if_id, ktime + offset,
                                       record[key_end:key_end + pkt_len], pkt_size, options))
            self._last_interface = interface
        if dropped:
            self._charge_to_last(dropped)
        return b"".join(out)

    def _charge_to_last(self, dropped: int) -> None:
        """Losses after the last packet: no later packet carries them, so the ISB does."""
        interface = self._last_interface or (self.interfaces[-1] if self.interfaces else None)
        if interface is not None:
            interface.dropped += dropped
        else:
            self.unattributed_drops += dropped

    def _describe(self, record: bytes, out: list[bytes]) -> tuple[int, bytes]:
        upcall = parse(record)
        decoded = decode_key(upcall.key, upcall.key_size)
        port = decoded.fields.get("in_port")
        linktype = pcapng.LINKTYPE_ETHERNET if "eth.src" in decoded.fields or not upcall.key \
            else pcapng.LINKTYPE_RAW
        name = self.port_name(upcall.dpif, port) if port is not None else None
        if_id = self._interface(upcall.dpif, port, linktype, name, out)
        text = comment(upcall, decoded.text, port, name)
        return if_id, pcapng.packet_options(comment=text, key=upcall.key)

    def _interface(self, dpif: str, port: int | None, linktype: int, name: str | None,
                   out: list[bytes]) -> int:
        ident = (dpif, port, linktype)
        if_id = self._interface_ids.get(ident)
        if if_id is None:
            if_id = self._interface_ids[ident] = len(self.interfaces)
            self.interfaces.append(Interface(dpif, port, linktype))
            out.append(pcapng.interface_description(
                linktype, self.snaplen, name=interface_name(dpif, port, name),
                filter=self.if_filter,
            ))
        return if_id

    def statistics(self, ktime_ns: int, *, start_ktime_ns: int) -> bytes:
        """One ISB per interface, for the end of the section."""
        return b"".join(
            pcapng.interface_statistics(
                if_id, ktime_ns + self.clock_offset_ns,
                received=interface.received, dropped=interface.dropped,
                start_ns=start_ktime_ns + self.clock_offset_ns,
                end_ns=ktime_ns + self.clock_offset_ns,
            )
            for if_id, interface in enumerate(self.interfaces)
        )
