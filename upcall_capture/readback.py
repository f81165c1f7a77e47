"""Reading captures back (-r): our own pcapng, any pcapng, or a classic pcap.

Our files carry each upcall's metadata in the comment's first line and the raw key in
a custom option, so an upcall read back is the same `Upcall` the probe produced. Other
files give packets only: their upcall fields are unknown (type -1, no key).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

from upcall_capture import comment, pcapng
from upcall_capture.errors import UsageError
from upcall_capture.flowkey import format_key
from upcall_capture.interfaces import InterfaceTable
from upcall_capture.probe.record import (
    DID_PUT,
    F_FAILED,
    F_KERNEL,
    F_OUTCOME,
    Outcome,
    Upcall,
    unpack_outcome_trailer,
)
from upcall_capture.view import CapturedUpcall

_GZIP_MAGIC = b"\x1f\x8b"
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"


def read_upcalls(path: str) -> Iterator[CapturedUpcall]:
    """The upcalls of a file, as they come. A plain file is mapped, not read: a capture of
    millions of upcalls does not have to fit in memory (the kernel pages it in and out).
    A gzipped one is decompressed whole."""
    try:
        with open(path, "rb") as file:
            data = file.read(2)
            if data == _GZIP_MAGIC:
                # Leniently: a capture cut short (a full disk) has no gzip trailer.
                data = zlib.decompressobj(31).decompress(data + file.read())
            elif os.fstat(file.fileno()).st_size:
                data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, zlib.error) as err:
        raise UsageError(f"{path}: {getattr(err, 'strerror', None) or err}") from None
    try:
        if data[:4] == _PCAPNG_MAGIC:
            yield from _from_pcapng(path, data)
        else:
            yield from _from_pcap(path, data)
    finally:
        if isinstance(data, mmap.mmap):
            with contextlib.suppress(BufferError):  # a view still held: unmapped by GC
                data.close()


def _from_pcapng(path: str, data: bytes | mmap.mmap) -> Iterator[CapturedUpcall]:
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
    said = comment.parse(block.comments[0]) if block.comments else None
    key = block.key or b""
    if said:
        enqueue = said.failure or next(
            (found for text in block.comments[1:] if (found := comment.parse_enqueue(text))),
            None)
        outcome = next((found for text in _comments_of(block, _undecoded_outcome(block))[1:]
                        if (found := comment.parse_outcome(text))), None)
        flags = F_FAILED | F_KERNEL if said.failure else F_KERNEL if enqueue else 0
        upcall = Upcall(
            ktime_ns=0, pid=said.pid, tid=said.tid, cpu=said.cpu, type=said.upcall_type,
            dpif=said.dpif, thread=said.thread, flags=flags | (F_OUTCOME if outcome else 0),
            key=key, key_size=said.key_size or len(key),
            packet=block.data, pkt_size=block.orig_len, enqueue=enqueue, outcome=outcome,
        )
        port, name = said.port, said.port_name
    else:
        upcall = Upcall(ktime_ns=0, pid=0, tid=0, cpu=0, type=-1, dpif="", thread="", flags=0,
                        key=key, key_size=len(key), packet=block.data, pkt_size=block.orig_len)
        port, name = None, None
    return CapturedUpcall(upcall, block.timestamp_ns or 0, interface.linktype,
                          interface.name or f"interface {block.interface_id}", port, name, block)


def _undecoded_outcome(block: pcapng.Packet) -> Outcome | None:
    """The outcome of a packet whose comment says it was not decoded, from its raw option."""
    raw = block.raw_outcome
    if raw is None or comment.OUTCOME_NOT_DECODED not in block.comments:
        return None
    return unpack_outcome_trailer(raw)


def _comments_of(block: pcapng.Packet, undecoded: Outcome | None) -> list[str]:
    """The packet's comments, an outcome not decoded (_undecoded_outcome) in its text."""
    if undecoded is None:
        return list(block.comments)
    text = comment.outcome_line(undecoded, block.key or b"")
    return [text if said == comment.OUTCOME_NOT_DECODED else said for said in block.comments]


def _from_pcap(path: str, data: bytes | mmap.mmap) -> Iterator[CapturedUpcall]:
    # Classic pcap: scapy reads it (every link type and both timestamp precisions).
    import io

    from scapy.utils import RawPcapReader

    try:
        reader = RawPcapReader(io.BytesIO(data) if isinstance(data, bytes) else path)
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
    comments, keys and interfaces, in a new section. A key the capture had no time to
    decode gets its text now; `decoded` counts them."""

    def __init__(self, snaplen: int = 0) -> None:
        self.snaplen = snaplen
        self.table = InterfaceTable()
        self.decoded = 0

    def blocks(self, items: Iterable[CapturedUpcall]) -> bytes:
        out = []
        table = self.table
        for item in items:
            identity = (item.interface, item.linktype)
            if_id = table.find(identity)
            if if_id is None:
                description = pcapng.interface_description(item.linktype, self.snaplen,
                                                           name=item.interface)
                if_id = table.add(identity, description)
                out.append(description)
            interface = table.interfaces[if_id]
            interface.received += 1
            block = item.packet_block
            options = b""
            if block is not None:
                interface.dropped += block.dropcount or 0
                undecoded = _undecoded_outcome(block)
                comments = self._comments(item, _comments_of(block, undecoded))
                mask = undecoded.mask if undecoded and undecoded.did & DID_PUT else block.mask
                options = pcapng.packet_options(
                    comment=comments[0] if comments else None, key=block.key,
                    inbound=block.inbound, dropcount=block.dropcount,
                    more_comments=tuple(comments[1:]), mask=mask)
            upcall = item.upcall
            out.append(pcapng.enhanced_packet(if_id, item.wall_ns, upcall.packet,
                                              upcall.pkt_size, options))
        return b"".join(out)

    def _comments(self, item: CapturedUpcall, comments: list[str]) -> list[str]:
        """The packet's comments, with its key's text if it was not decoded."""
        said = comment.parse(comments[0]) if comments else None
        if said is None or said.decoded or item.packet_block.key is None:
            return comments
        self.decoded += 1
        upcall = item.upcall
        return [comment.with_key_text(comments[0], format_key(upcall.key, upcall.key_size)),
                *comments[1:]]

    def statistics(self, timestamp_ns: int) -> bytes:
        return self.table.statistics(timestamp_ns)


@dataclass(frozen=True)
class ReadBackDone:
    count: int  # upcalls selected
    decoded: int  # keys that the capture had not decoded, written with their text


def read_back(items: Iterable[CapturedUpcall], *,
              keep: Callable[[CapturedUpcall], bool] | None = None, sink=None,
              consumers: Iterable[Callable[[list[CapturedUpcall]], None]] = (),
              limit: int | None = None, batch_size: int = 1000) -> ReadBackDone:
    """-r: the upcalls `keep` selects (the first `limit` of them), in batches, to each
    consumer (lines, statistics) and, with a sink, into a new section written to it."""
    if keep is not None:
        items = filter(keep, items)
    items = iter(items if limit is None else islice(items, limit))
    rewriter = Rewriter() if sink is not None else None
    consumers = list(consumers)
    count = 0
    last_ns = 0
    while batch := list(islice(items, batch_size)):
        if rewriter is not None:
            sink.write(rewriter.blocks(batch))
        for consume in consumers:
            consume(batch)
        count += len(batch)
        last_ns = batch[-1].wall_ns
    if rewriter is not None:
        sink.write(rewriter.statistics(last_ns))
    return ReadBackDone(count, rewriter.decoded if rewriter is not None else 0)
