"""Describing on worker processes: the same bytes as one process, whatever the number of
workers; ids fitted to the main table when workers disagree; shedding that keeps every
packet, says so, and that -r -w makes good. Real worker processes, no probe."""

from __future__ import annotations

import subprocess
import sys

import pytest
import upcalls
from conftest import REPLAY_DIR, read_vectors
from probe_records import storm

from upcall_capture import comment, pcapng, workers
from upcall_capture.capture import InlineBlocks, PooledBlocks
from upcall_capture.flowkey import format_key, key_shape
from upcall_capture.interfaces import InterfaceTable, WorkerBatch, adopt_batch
from upcall_capture.ports import no_port_names
from upcall_capture.probe.record import (
    DID_EXECUTE,
    DID_PUT,
    UNKNOWN_TIMEOUT,
    Outcome,
    parse,
    with_outcome,
)
from upcall_capture.upcall_blocks import UpcallBlocks, port_and_eth

# Nothing shed (outcome texts here; keys are shed only as the ring fills): what is
# shed depends on each worker's caches.
SETTINGS = workers.BlockSettings(snaplen=9216, clock_offset_ns=1_700_000_000 * 10**9,
                                 if_filter="type=miss", port_names=False,
                                 outcome_text_share=1.0)
SHB = pcapng.section_header(userappl="t", os="t", hardware="t")
MIXED = upcalls.read_records(REPLAY_DIR / "mixed.upc")


def inline_builder() -> InlineBlocks:
    return InlineBlocks(lambda: UpcallBlocks(
        snaplen=SETTINGS.snaplen, clock_offset_ns=SETTINGS.clock_offset_ns,
        port_name=no_port_names, if_filter=SETTINGS.if_filter,
        outcome_text_share=SETTINGS.outcome_text_share))


def section(builder, batches: list[list[bytes]], *, ahead: int = 1, drops: int = 0) -> bytes:
    """A whole section built by `builder`, with up to `ahead` batches handed out before
    the first is taken back (as the reader runs ahead of the writer)."""
    out = bytearray(SHB)
    prepared = []
    for index, batch in enumerate(batches):
        prepared.append(builder.prepare(batch, drops if index % 5 == 0 else 0,
                                        "after a gap" if index == 3 else None))
        if len(prepared) >= ahead:
            out += builder.blocks(prepared.pop(0))
    for ready in prepared:
        out += builder.blocks(ready)
    out += builder.blocks(builder.prepare([], 7, None))  # losses after the last packet
    return bytes(out + builder.statistics(10**12, 0, final=True))


def in_batches(records: list[bytes], size: int = 97) -> list[list[memoryview]]:
    views = [memoryview(record) for record in records]
    return [views[start:start + size] for start in range(0, len(views), size)]


def with_outcomes(records: list[bytes]) -> list[bytes]:
    """Each record with an outcome, of every kind in turn (a put's mask: the key's)."""
    out = []
    for index, record in enumerate(records):
        key = parse(record).key
        outcome = [Outcome(DID_PUT | DID_EXECUTE, handling_ns=index, ufid=bytes(16),
                           mask=key, put_actions=b"", execute_actions=b""),
                   Outcome(DID_EXECUTE, handling_ns=index), Outcome(0),
                   Outcome(0, UNKNOWN_TIMEOUT)][index % 4]
        out.append(with_outcome(record, outcome))
    return out


@pytest.mark.parametrize("cpus, chosen", [(1, 1), (2, 1), (3, 2), (5, 4), (64, 4)])
def test_workers_by_default_one_per_core_but_one_and_at_most_four(monkeypatch, cpus,
                                                                   chosen):
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert workers.default_count() == chosen


@pytest.mark.parametrize("unique, outcomes", [(False, False), (True, False), (True, True)],
                         ids=["repeated", "unique", "outcomes"])
def test_any_number_of_workers_writes_the_bytes_of_one_process(unique, outcomes):
    records = storm(MIXED, 3000, unique=unique)
    batches = in_batches(with_outcomes(records) if outcomes else records)
    expected = section(inline_builder(), batches, drops=3)
    for count in (1, 2):
        pool = workers.WorkerPool(count, SETTINGS)
        try:
            # Several batches out at once: two workers then meet new interfaces at the
            # same time and guess the same ids, and the main table must sort them out.
            got = section(PooledBlocks(pool, SETTINGS, lambda: 1), batches, ahead=6,
                          drops=3)
        finally:
            pool.close()
        assert got == expected, f"{count} workers"
        assert pool.undecoded == 0


def _worker_batch(identities: list, used: list[int], known: InterfaceTable) -> WorkerBatch:
    """A worker's blocks: packets on worker ids `used`, with IDBs for what `known` lacks."""
    table = InterfaceTable([(i.identity, i.description) for i in known.interfaces])
    out, emitted = bytearray(), []
    for identity in identities:
        if table.find(identity) is None:
            emitted.append(table.add(identity, _description(identity)))
            out += _description(identity)
    for number, worker_id in enumerate(used):
        out += pcapng.enhanced_packet(worker_id, number, bytes([number]), 1)
    counts = [(worker_id, used.count(worker_id), 0) for worker_id in sorted(set(used))]
    return WorkerBatch(bytes(out), [(i.identity, i.description) for i in table.interfaces],
                       emitted, counts)


def _description(identity) -> bytes:
    return pcapng.interface_description(pcapng.LINKTYPE_ETHERNET, 0, name=str(identity))


def _names_of_packets(data: bytes) -> list[str]:
    interfaces, names = [], []
    for block in pcapng.iter_blocks(SHB + data):
        if isinstance(block, pcapng.InterfaceDescription):
            interfaces.append(block.name)
        elif isinstance(block, pcapng.Packet):
            names.append(interfaces[block.interface_id])
    return names


def test_a_workers_guessed_ids_are_fitted_to_the_main_table():
    table = InterfaceTable()
    empty = InterfaceTable()
    # Both workers started from an empty table: each gave id 0 to what it saw first.
    first = _worker_batch(["a", "b"], [0, 1, 0], empty)
    second = _worker_batch(["c", "a"], [0, 1, 1], empty)
    out, _ = adopt_batch(table, first)
    assert out == first.blocks  # it guessed right: written as it is
    rewritten, mapping = adopt_batch(table, second)
    assert rewritten != second.blocks
    assert mapping == {0: 2, 1: 0}
    assert _names_of_packets(out + rewritten) == ["a", "b", "a", "c", "a", "a"]
    assert [(i.identity, i.received) for i in table.interfaces] == [("a", 4), ("b", 1),
                                                                     ("c", 1)]


def test_a_batch_built_before_the_file_rotated_goes_into_the_new_section():
    old = InterfaceTable([("a", _description("a")), ("b", _description("b"))])
    batch = _worker_batch(["b"], [1, 1], old)  # the worker still had the old table
    table = InterfaceTable()  # the new file's
    out, mapping = adopt_batch(table, batch)
    assert mapping == {1: 0}
    assert _names_of_packets(out) == ["b", "b"]


def test_shed_packets_are_all_written_counted_and_say_so():
    records = storm(MIXED, 2000, unique=True)
    batches = in_batches(records)
    pool = workers.WorkerPool(1, SETTINGS)
    pool.pace(ring_fill=1.0)  # the ring is full: nothing new is decoded
    try:
        data = section(PooledBlocks(pool, SETTINGS, lambda: 1), batches)
    finally:
        pool.close()
    packets = [b for b in pcapng.iter_blocks(data) if isinstance(b, pcapng.Packet)]
    assert len(packets) == len(records)
    said = [comment.parse(p.comments[0]) for p in packets]
    undecoded = [p for p, s in zip(packets, said, strict=True) if not s.decoded]
    # Most are shed: only the first of each shape is decoded (no key comes twice).
    assert len(undecoded) == pool.undecoded > len(records) // 2
    for packet in undecoded:
        assert packet.comments[0].split("\n")[1] == comment.NOT_DECODED
        assert packet.key  # the raw key is kept
    # Each packet is on the interface that decoding its key would have given it, and its
    # comment starts with the same line (thread, CPU, port: the storm changes CPU).
    expected = section(inline_builder(), batches)
    assert _names_of_packets(data[len(SHB):]) == _names_of_packets(expected[len(SHB):])
    decoded = [b for b in pcapng.iter_blocks(expected) if isinstance(b, pcapng.Packet)]
    heads = [p.comments[0].split("\n")[0] for p in packets]
    assert heads == [p.comments[0].split("\n")[0] for p in decoded]
    assert len(set(heads)) > 2


def test_keys_are_shed_as_the_ring_fills_and_outcomes_before_them():
    # Behind, the capture sheds outcomes (HandlerOps.pace) and the workers new outcome
    # texts: from half of max_in_flight out with the workers, and while keys are shed,
    # which is from a quarter of the ring on (the reader waits at max_in_flight, and the ring
    # holds the rest) down to 1/32.
    pool = workers.WorkerPool(1, SETTINGS, max_in_flight=8)
    try:
        builder = PooledBlocks(pool, SETTINGS, lambda: 1)
        records = storm(MIXED[:1], 8, unique=True)  # new keys of one shape
        first = builder.prepare(records[:3], 0, None)
        assert not pool.behind
        second = builder.prepare(records[3:4], 0, None)
        assert pool.behind
        pool.pace(0.0)
        assert pool.shedding.outcome_texts and not pool.shedding.keys
        builder.blocks(first)
        assert not pool.behind
        pool.pace(0.0)
        assert not pool.shedding.outcome_texts
        builder.blocks(second)
        for fill, decoding in ((workers.SHED_KEYS_ABOVE / 2, True),
                               (workers.SHED_KEYS_ABOVE, False),
                               (workers.SHED_KEYS_UNTIL * 2, False),
                               (workers.SHED_KEYS_UNTIL, True)):
            pool.pace(fill)
            assert (pool.decoding, pool.behind) == (decoding, not decoding), fill
            assert pool.shedding.outcome_texts == (not decoding)
            builder.blocks(builder.prepare(records[4:5] if decoding else records[5:8], 0,
                                           None))
        # The first batch sent while shedding: its three new keys, of a shape known by
        # then, are not decoded. The same keys again in the next one are: a key that
        # comes again gets its text while the capture is busy.
        assert pool.undecoded == 3
    finally:
        pool.close()


def test_shed_keys_come_back_once_the_ring_is_drained_unless_shed_again_soon():
    # A stall of the host sheds keys where the workers keep up: they come back as soon as
    # the ring is drained, busy as the workers are then. Shed again within TRIED_HOLD_S,
    # the storm is too big to decode: they wait for the workers to have room as well.
    now = [0]
    pool = workers.WorkerPool(1, SETTINGS, clock=lambda: now[0])
    worker = pool.workers[0]

    def after(seconds: float, busy: float, fill: float) -> bool:
        """Keys shed at a read `seconds` later, the worker `busy` that share of them."""
        now[0] += int(seconds * 1e9)
        worker.cpu_seconds += busy * seconds
        pool.pace(fill)
        return pool.shedding.keys

    try:
        window = workers.BUSY_WINDOW_S
        assert after(0.1, 1.0, workers.SHED_KEYS_ABOVE)
        assert after(window, 1.0, workers.SHED_KEYS_UNTIL * 2)  # not drained yet
        assert not after(window, 1.0, workers.SHED_KEYS_UNTIL)
        assert after(workers.TRIED_HOLD_S / 2, 1.0, workers.SHED_KEYS_ABOVE)  # too soon
        assert after(window, 1.0, workers.SHED_KEYS_UNTIL)  # so: busy, they wait
        assert after(window, workers.DECODE_AGAIN_BELOW * 1.5, workers.SHED_KEYS_UNTIL)
        assert not after(window, workers.DECODE_AGAIN_BELOW / 2, workers.SHED_KEYS_UNTIL)
        # Shed again long after they came back: a new stall, not the same storm.
        assert after(workers.TRIED_HOLD_S, 1.0, workers.SHED_KEYS_ABOVE)
        assert not after(window, 1.0, workers.SHED_KEYS_UNTIL)
    finally:
        pool.close()


def test_a_batch_sent_for_decoding_is_shed_once_the_capture_sheds():
    # The switch reaches the workers through memory they share (Shedding), so that
    # the batches already out (MAX_IN_FLIGHT records: some 100 ms of decoding) are shed
    # too: here the flag goes up while the pool itself still decodes, as it is once a
    # batch has gone out.
    records = storm(MIXED[:1], 300, unique=True)  # new keys of one shape
    pool = workers.WorkerPool(1, SETTINGS)
    try:
        builder = PooledBlocks(pool, SETTINGS, lambda: 1)
        builder.blocks(builder.prepare(records[:100], 0, None))
        assert pool.undecoded == 0 and pool.decoding
        pool.shedding.keys = True
        builder.blocks(builder.prepare(records[100:200], 0, None))
        assert pool.undecoded == 100
        pool.shedding.keys = False
        builder.blocks(builder.prepare(records[200:], 0, None))
        assert pool.undecoded == 100
        pool.pace(ring_fill=1.0)
        assert pool.shedding.keys
        pool.pace(ring_fill=0.0)
        assert not pool.shedding.keys
    finally:
        pool.close()


def test_a_worker_behind_makes_no_new_outcome_texts_and_decodes_keys_still():
    # The second shared byte: outcome texts wait while the workers are behind, keys not.
    records = with_outcomes(storm(MIXED[:1], 80, unique=True))
    pool = workers.WorkerPool(1, SETTINGS)
    try:
        builder = PooledBlocks(pool, SETTINGS, lambda: 1)
        pool.shedding.outcome_texts = True
        shed = builder.blocks(builder.prepare(records[:40], 0, None))
        pool.shedding.outcome_texts = False
        made = builder.blocks(builder.prepare(records[40:], 0, None))
    finally:
        pool.close()

    packets = [b for b in pcapng.iter_blocks(SHB + shed + made)
               if isinstance(b, pcapng.Packet)]
    assert all(comment.parse(p.comments[0]).decoded for p in packets)  # keys: text
    texts = [p.comments[1] for p in packets]
    # Unknown outcomes (every fourth) have no text to make: the same either way.
    assert texts[:40].count(comment.OUTCOME_NOT_DECODED) == 30
    assert comment.OUTCOME_NOT_DECODED not in texts[40:]
    assert pool.undecoded == 0


def test_read_back_writes_in_the_text_of_every_key_not_decoded(tmp_path):
    records = storm(MIXED, 600, unique=True)
    blocks = UpcallBlocks(snaplen=9216, clock_offset_ns=0, port_name=no_port_names)
    shed = tmp_path / "shed.pcapng"
    shed.write_bytes(SHB + blocks.packets([memoryview(r) for r in records], decode=False)
                     + blocks.statistics(10**12, start_ktime_ns=0))
    assert blocks.undecoded > 400
    new = tmp_path / "new.pcapng"
    done = subprocess.run([sys.executable, "-m", "upcall_capture", "-r", str(shed), "-w",
                           str(new)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"600 upcalls written to {new}, {blocks.undecoded} keys decoded now" in done.stderr
    packets = [b for b in pcapng.iter_blocks(new.read_bytes()) if isinstance(b, pcapng.Packet)]
    assert len(packets) == 600
    for packet in packets:
        lines = packet.comments[0].split("\n")
        assert lines[1] == format_key(packet.key)  # OVS's text, as the vectors show
        assert comment.parse(packet.comments[0]).decoded


def test_the_shape_tells_in_port_and_eth_as_the_text_does():
    vectors = read_vectors()  # empty where the shared vectors are absent
    keys = [u.key for u in MIXED] + [key for key, _ in vectors]
    checked = 0
    for key in keys:
        text = format_key(key)
        format_key(key)  # a shape is compiled on its second sighting
        shape = key_shape(key)
        if shape is not None:
            assert (shape.port(key), shape.has_eth) == port_and_eth(text), text
            checked += 1
    assert checked > len(MIXED) if vectors else checked == len(MIXED)


@pytest.mark.capture
def test_a_filling_ring_sheds_keys_not_packets_and_says_so(replay, tmp_path):
    # Real eBPF on the replay: a ring of 16 pages (64 KiB, some 60 records) is more than
    # a quarter full at reads at 30,000 new flows/s, so the capture's loop has the
    # workers shed keys (WorkerPool.pace). Every upcall fired is in the file or counted
    # lost, each with its key's text or marked, and the summary counts the marked ones.
    # Half a second of it: the worker reads the switch as each batch starts, and on a
    # loaded host (CI's) it started none within the 0.1 s that 3,000 took, so it decoded
    # them all once the ring was empty again.
    from conftest import SUMMARY, start_capture

    fires, out = 15_000, tmp_path / "out.pcapng"
    _, tool = start_capture(replay, REPLAY_DIR / "mixed.upc", out, "-u", "-n", str(fires),
                            "-r", "30000",
                            tool_args=("--buffer-pages", "16", "--workers", "1",
                                       "--no-outcomes"))
    status, stderr = tool.wait()
    assert status == 0, stderr
    captured_count, lost = (int(n) for n in SUMMARY.search(stderr).groups()[:2])
    assert captured_count + lost == fires
    packets = [b for b in pcapng.iter_blocks(out.read_bytes()) if isinstance(b, pcapng.Packet)]
    assert len(packets) == captured_count
    texts = [p.comments[0].split("\n")[1] for p in packets]
    marked = [p for p, text in zip(packets, texts, strict=True) if text == comment.NOT_DECODED]
    assert marked, "no key was shed: is the ring small enough, and the loop pacing them?"
    assert f", {len(marked)} without key text," in stderr
    assert all(text == format_key(p.key) for p, text in zip(packets, texts, strict=True)
               if text != comment.NOT_DECODED)


def test_a_pool_closes_at_once_with_replies_nobody_collected():
    # A capture ended by an error leaves batches out: more replies than are read ahead
    # (REPLIES_AHEAD) must not keep the worker, and so close(), waiting.
    import time

    pool = workers.WorkerPool(1, SETTINGS)
    builder = PooledBlocks(pool, SETTINGS, lambda: 1)
    for batch in in_batches(storm(MIXED, 40 * workers.REPLIES_AHEAD, unique=False), 20):
        builder.prepare(batch, 0, None)
    started = time.monotonic()
    pool.close()
    assert time.monotonic() - started < 3
    assert pool.workers[0].process.returncode == 0  # it ended of itself, not killed


def test_a_worker_gone_while_its_ring_is_full_ends_the_capture_not_a_wait():
    # The sender waits for room in the worker's request ring (channel.ByteRing): a worker
    # that died meanwhile must end that wait, and the capture must say so.
    import os
    import signal
    import time

    from upcall_capture import channel
    from upcall_capture.errors import CaptureError

    pool = workers.WorkerPool(1, SETTINGS)
    try:
        worker = pool.workers[0]
        builder = PooledBlocks(pool, SETTINGS, lambda: 1)
        builder.blocks(builder.prepare(storm(MIXED, 10, unique=False), 0, None))
        os.kill(worker.process.pid, signal.SIGSTOP)
        records = storm(MIXED, 16000, unique=True)
        batches = in_batches(records, 400)
        assert sum(map(len, records)) > 2 * channel.REQUEST_RING_BYTES  # more than it holds
        tickets = [builder.prepare(batch, 0, None) for batch in batches]
        time.sleep(0.2)  # the sender is now waiting for room, with batches still to send
        assert worker._sender.is_alive() and not worker._outbox.empty()
        os.kill(worker.process.pid, signal.SIGKILL)
        with pytest.raises(CaptureError, match="worker 0 exited"):
            builder.blocks(tickets[0])
        worker._sender.join(timeout=2)
        assert not worker._sender.is_alive()
    finally:
        started = time.monotonic()
        pool.close()
        assert time.monotonic() - started < 3


def _views_of(memory, roots: list) -> list[memoryview]:
    """The views of `memory` that anything reachable from `roots` holds (modules, and what
    only they reach, left out)."""
    import gc
    import types

    module_dicts = {id(vars(module)) for module in list(sys.modules.values()) if module}
    seen, found, todo = set(), [], list(roots)
    while todo:
        thing = todo.pop()
        if id(thing) in seen or id(thing) in module_dicts or \
                isinstance(thing, (types.ModuleType, type)):
            continue
        seen.add(id(thing))
        if isinstance(thing, memoryview):
            try:
                if thing.obj is memory:
                    found.append(thing)
            except ValueError:  # released: it holds nothing
                pass
            continue
        todo += gc.get_referents(thing)
    return found


def test_a_worker_keeps_nothing_of_the_ring_it_reads_its_batches_in():
    # A worker builds each batch where it lies in the ring it shares with the main process
    # (channel.receive_in_place), which writes the next batches there once the room is
    # given back: anything kept of it (a cache's key or value) would change under it.
    import mmap
    from array import array

    from upcall_capture import flowkey, upcall_blocks

    records = with_outcomes(storm(MIXED, 1200, unique=False)) + \
        storm(MIXED, 300, unique=True)  # repeated keys, outcomes, and new keys
    memory = mmap.mmap(-1, 1 << 20)  # as a worker maps it (channel.map_shared)
    ring = memoryview(memory).toreadonly()
    shedding = workers.Shedding()
    try:
        in_place = workers._Describer(SETTINGS, shedding)
        copied = workers._Describer(SETTINGS, shedding)
        for number, batch in enumerate(in_batches(records, 100)):
            blob = b"".join(batch)
            request = workers._Batch(0, [] if number == 0 else None, 1, 0, None,
                                     array("I", map(len, batch)).tobytes())
            memory[:len(blob)] = blob
            got = in_place.build(request, ring[:len(blob)])[1]
            memory[:len(blob)] = bytes(len(blob))  # the room written over
            assert got == copied.build(request, blob)[1], f"batch {number}"
        roots = [in_place, flowkey._SHAPES, upcall_blocks._WHERE]
        assert _views_of(memory, roots) == []
    finally:
        ring.release()
        shedding.close()
