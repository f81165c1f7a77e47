"""One pcapng section's interfaces: their ids, their description blocks, and the counts
that go into their statistics blocks at the end. Pure.

An interface is known by an identity (any hashable: the capture's is (dpif, port,
link type), -r -w's is (name, link type)) and gets the next id on first use. The capture
and -r -w both keep one; with worker processes, the main process's table is the one
owner of ids, and `adopt_batch` fits a worker's blocks to it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from upcall_capture import pcapng


@dataclass
class Interface:
    identity: Hashable
    description: bytes  # its IDB
    received: int = 0
    dropped: int = 0


class InterfaceTable:
    def __init__(self, entries: Sequence[tuple[Hashable, bytes]] = ()) -> None:
        self.interfaces: list[Interface] = []
        self._ids: dict[Hashable, int] = {}
        for identity, description in entries:
            self.add(identity, description)

    def __len__(self) -> int:
        return len(self.interfaces)

    def find(self, identity: Hashable) -> int | None:
        return self._ids.get(identity)

    def add(self, identity: Hashable, description: bytes) -> int:
        if_id = self._ids[identity] = len(self.interfaces)
        self.interfaces.append(Interface(identity, description))
        return if_id

    def charge_after_last(self, dropped: int, last: int | None) -> bool:
        """Losses after the section's last packet, which no later packet carries: the ISB
        of that packet's interface (`last`, or else the newest) counts them. False when
        there is no interface to count them."""
        if last is None and not self.interfaces:
            return False
        self.interfaces[-1 if last is None else last].dropped += dropped
        return True

    def statistics(self, timestamp_ns: int, *, start_ns: int | None = None,
                   end_ns: int | None = None, filtered: bool = False,
                   datapath_comments: dict[str, str] | None = None) -> bytes:
        """One ISB per interface. `filtered`: a filter was applied, and every packet an
        interface received passed it. `datapath_comments`: a comment for the ISBs of each
        datapath's interfaces (an identity starts with its dpif)."""
        comments = datapath_comments or {}
        return b"".join(
            pcapng.interface_statistics(
                if_id, timestamp_ns, received=interface.received, dropped=interface.dropped,
                filter_accept=interface.received if filtered else None,
                start_ns=start_ns, end_ns=end_ns,
                comment=comments.get(interface.identity[0]) if isinstance(
                    interface.identity, tuple) and interface.identity else None)
            for if_id, interface in enumerate(self.interfaces))


@dataclass(frozen=True)
class WorkerBatch:
    """Blocks that a worker built with its own copy of the table, and what they need to go
    into a section whose table may have moved on: the worker's table (identity and IDB
    of each of its ids), the ids whose IDBs it wrote into these blocks, in order, and
    (worker id, received, dropped) of every interface that the batch's packets used."""

    blocks: bytes
    interfaces: list[tuple[Hashable, bytes]]
    emitted: list[int]
    counts: list[tuple[int, int, int]]


def adopt_batch(table: InterfaceTable, batch: WorkerBatch) -> tuple[bytes, dict[int, int]]:
    """The batch's blocks on the table's ids, the table counting their packets and taking
    in what is new; and the worker id to table id mapping.

    Usually the worker's ids are the table's (it was sent the table, and the interfaces
    it added come next): the blocks go out as they are. Otherwise (two workers added
    interfaces at once, or the file rotated under the batch) they are rewritten block by
    block, each new interface's IDB before its first packet so that ids follow the order
    of IDBs, as pcapng numbers them: rare."""
    if _fits(table, batch):
        for worker_id in batch.emitted:
            table.add(*batch.interfaces[worker_id])
        mapping = {worker_id: worker_id for worker_id, _, _ in batch.counts}
        blocks = batch.blocks
    else:
        blocks, mapping = _rewritten(table, batch)
    for worker_id, received, dropped in batch.counts:
        interface = table.interfaces[mapping[worker_id]]
        interface.received += received
        interface.dropped += dropped
    return blocks, mapping


def _fits(table: InterfaceTable, batch: WorkerBatch) -> bool:
    """Whether the worker's ids are the table's: each IDB it wrote is of an interface the
    table has not got, in the table's next place; every other one it used has its id."""
    next_id = len(table)
    for worker_id in batch.emitted:
        if worker_id != next_id or table.find(batch.interfaces[worker_id][0]) is not None:
            return False
        next_id += 1
    emitted = set(batch.emitted)
    return all(worker_id in emitted or table.find(batch.interfaces[worker_id][0]) == worker_id
               for worker_id, _, _ in batch.counts)


def _rewritten(table: InterfaceTable, batch: WorkerBatch) -> tuple[bytes, dict[int, int]]:
    out = bytearray()
    mapping: dict[int, int] = {}
    view = memoryview(batch.blocks)
    for block_type, offset, length in pcapng.block_spans(view):
        block = view[offset:offset + length]
        if block_type == pcapng.BLOCK_IDB:
            continue  # the table's own, below, where it has none yet
        if block_type == pcapng.BLOCK_EPB:
            worker_id = pcapng.epb_interface(block)
            if_id = mapping.get(worker_id)
            if if_id is None:
                identity, description = batch.interfaces[worker_id]
                if_id = table.find(identity)
                if if_id is None:
                    if_id = table.add(identity, description)
                    out += description
                mapping[worker_id] = if_id
            out += pcapng.with_epb_interface(block, if_id)
        else:
            out += block
    return bytes(out), mapping
