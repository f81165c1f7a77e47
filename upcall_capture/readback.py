"""Reading captures back (-r): our own pcapng, any pcapng, or a classic pcap.

Our files carry each upcall's metadata in the comment's first line and the raw key in
a custom option, so an upcall read back is the same `Upcall` the probe produced. Other
files give packets only: their upcall fields are unknown (type -1, no key).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Iterator

from upcall_capture import pcapng
from upcall_capture.errors import UsageError
from upcall_capture.probe.record import Upcall
from upcall_capture.view import CapturedUpcall

_HEAD = re.compile(
    r"^upcall (?P<type>\S+) dpif=(?P<dpif>\S*)(?: in_port=(?P<port>\d+)(?:\((?P<name>[^)]*)\))?)?"
    r" pid=(?P<pid>\d+) tid=(?P<tid>\d+) thread=(?P<thread>\S*) cpu=(?P<cpu>\d+)"
)
_TYPES = {"miss": 0, "action": 1}
_GZIP_MAGIC = b"\x1f\x8b"
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


def parse_comment_head(line: str) -> dict | None:
    """The fields of a comment's first line, as upcall_blocks.comment() writes it."""
    m = _HEAD.match(line)
    return m.groupdict() if m else None


def read_upcalls(path: str) -> Iterator[CapturedUpcall]:
    try:
        with open(path, "rb") as file:
            data = file.read()
        if data[:2] == _GZIP_MAGIC:
            # Leniently: a capture cut short (a full disk) has no gzip trailer.
            data = zlib.decompressobj(31).decompress(data)
    except (OSError, zlib.error) as err:
        raise UsageError(f"{path}: {getattr(err, 'strerror', None) or err}") from None
    if data[:4] == _PCAPNG_MAGIC:
        yield from _from_pcapng(path, data)
    else:
        yield from _from_pcap(path, data)


def _from_pcapng(path: str, data: bytes) -> Iterator[CapturedUpcall]:
    interfaces: list[pcapng.InterfaceDescription] = []
    try:
        for block in pcapng.iter_blocks(data):
            if isinstance(block, pcapng.SectionHeader):
                interfaces = []
            elif isinstance(block, pcapng.InterfaceDescription):
                interfaces.append(block)
            elif isinstance(block, pcapng.Packet):
                interface = interfaces[block.interface_id]
                yield _upcall_from_block(block, interface)
    except pcapng.TruncatedBlock:
        return  # a file cut short: everything before the cut has been read
    except pcapng.PcapngError as err:
        raise UsageError(f"{path}: {err}") from None


def _upcall_from_block(block: pcapng.Packet, interface: pcapng.InterfaceDescription
                       ) -> CapturedUpcall:
    comment = block.comments[0] if block.comments else ""
    head = parse_comment_head(comment.split("\n", 1)[0])
    key = block.key or b""
    if head:
        upcall = Upcall(
            ktime_ns=0, pid=int(head["pid"]), tid=int(head["tid"]), cpu=int(head["cpu"]),
            type=_TYPES.get(head["type"], int(head["type"]) if head["type"].isdigit() else -1),
            dpif=head["dpif"], thread=head["thread"], flags=0,
            key=key, key_size=_key_size(comment, len(key)),
            packet=block.data, pkt_size=block.orig_len,
        )
        port = int(head["port"]) if head["port"] else None
        name = head["name"]
    else:
        upcall = Upcall(ktime_ns=0, pid=0, tid=0, cpu=0, type=-1, dpif="", thread="", flags=0,
                        key=key, key_size=len(key), packet=block.data, pkt_size=block.orig_len)
        port, name = None, None
    return CapturedUpcall(upcall, block.timestamp_ns or 0, interface.linktype,
                          interface.name or f"interface {block.interface_id}", port, name, block)


_KEY_CUT = re.compile(r"\bkey (\d+) of (\d+) bytes")


def _key_size(comment: str, captured: int) -> int:
    m = _KEY_CUT.search(comment)
    return int(m.group(2)) if m else captured


def _from_pcap(path: str, data: bytes) -> Iterator[CapturedUpcall]:
    # Classic pcap: scapy reads it (every link type and both timestamp precisions).
    import io

    from scapy.utils import RawPcapReader

    try:
        reader = RawPcapReader(io.BytesIO(data))
    except Exception as err:  # scapy raises Scapy_Exception for a bad magic
        raise UsageError(f"{path}: not a pcap or pcapng file ({err})") from None
    scale = 1 if getattr(reader, "nano", False) else 1000
    with reader:
        for packet, meta in reader:
            wall_ns = (meta.sec * 1_000_000_000) + meta.usec * scale
            upcall = Upcall(ktime_ns=0, pid=0, tid=0, cpu=0, type=-1, dpif="", thread="",
                            flags=0, key=b"", key_size=0, packet=packet, pkt_size=meta.wirelen)
            yield CapturedUpcall(upcall, wall_ns, reader.linktype, path, None, None, None)


class Rewriter:
    """Blocks for a subset of a capture read back (-r with -w): the same packets,
    comments, keys and interfaces, in a new section."""

    def __init__(self, snaplen: int = 0) -> None:
        self.snaplen = snaplen
        self._interfaces: dict[tuple[str, int], int] = {}
        self.received: list[int] = []
        self.dropped: list[int] = []  # the packets' epb_dropcounts, summed per interface

    def blocks(self, items: Iterable[CapturedUpcall]) -> bytes:
        out = []
        for item in items:
            ident = (item.interface, item.linktype)
            if_id = self._interfaces.get(ident)
            if if_id is None:
                if_id = self._interfaces[ident] = len(self.received)
                self.received.append(0)
                self.dropped.append(0)
                out.append(pcapng.interface_description(item.linktype, self.snaplen,
                                                        name=item.interface))
            self.received[if_id] += 1
            block = item.packet_block
            options = b""
            if block is not None:
                self.dropped[if_id] += block.dropcount or 0
                options = pcapng.packet_options(
                    comment="\n\n".join(block.comments) or None, key=block.key,
                    inbound=block.inbound, dropcount=block.dropcount)
            upcall = item.upcall
            out.append(pcapng.enhanced_packet(if_id, item.wall_ns, upcall.packet,
                                              upcall.pkt_size, options))
        return b"".join(out)

    def statistics(self, timestamp_ns: int) -> bytes:
        return b"".join(
            pcapng.interface_statistics(if_id, timestamp_ns, received=count, dropped=dropped)
            for if_id, (count, dropped) in enumerate(zip(self.received, self.dropped,
                                                         strict=True))
        )
