"""Hostile or broken upcalls, through real eBPF: marked, escaped or cut, never garbage.

The replay source fires what ovs-vswitchd could hand the probe on a bad day: a key and
packet whose lengths run into unreadable memory (-B), datapath names that are not UTF-8,
longer than the probe's 64-byte buffer or full of terminal control characters, and a
key longer than the key cap.
"""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import upcalls  # samples/replay/upcalls.py
from conftest import REPLAY_DIR, ROOT, SUMMARY, Replay, Tool

from upcall_capture import pcapng
from upcall_capture.flowkey import format_key

pytestmark = pytest.mark.capture

BASIC = REPLAY_DIR / "basic.upc"
# upcall-replay.c's -B upcall: 60 readable bytes of packet and 40 of key (copied from the
# first record), then a PROT_NONE page; it claims 1514 and 640 bytes.
HOSTILE_PACKET_SIZE, HOSTILE_PACKET_READABLE = 1514, 60
HOSTILE_KEY_SIZE, HOSTILE_KEY_READABLE = 640, 40
# A record in a replay file: this many bytes of numbers, then the dpif name (upcalls.py).
RECORD_HEADER_SIZE = 24
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # all but \t and \n


@dataclass
class Run:
    fired: str  # the replay's "fired N upcalls ..." line
    status: int
    stderr: str
    stdout: str
    interfaces: list[pcapng.InterfaceDescription]
    packets: list[pcapng.Packet]


def capture(replay_bin: Path, records: Path, out: Path, replay_args: list[str],
            tool_args: list[str]) -> Run:
    """Fire the records with the tool attached (-w out --print -v), until the replay exits.
    The replay fires no flow puts or executes here (test_outcomes.py has those), so
    outcomes are off: each upcall prints its line and its key."""
    source = Replay(replay_bin, records, *replay_args)
    try:
        tool = Tool("-p", str(source.pid), "-w", str(out), "--print", "-v", "--no-outcomes",
                    *tool_args, stdout=subprocess.PIPE)
        tool.wait_listening()
        source.start()
        fired = source.wait()
        stdout, stderr = tool.proc.communicate(timeout=60)
    finally:
        source.kill()
    data = out.read_bytes()
    assert pcapng.complete_length(data) == len(data)
    blocks = list(pcapng.iter_blocks(data))
    return Run(fired, tool.proc.returncode, "".join(tool.stderr_lines) + stderr, stdout,
               [b for b in blocks if isinstance(b, pcapng.InterfaceDescription)],
               [b for b in blocks if isinstance(b, pcapng.Packet)])


def assert_clean_exit(run: Run, count: int) -> None:
    assert run.status == 0, run.stderr
    assert "Traceback" not in run.stderr
    assert f"fired {count} upcalls" in run.fired
    assert SUMMARY.search(run.stderr).groups() == (str(count), "0")
    assert len(run.packets) == count


def tshark_comments(path: Path) -> list[str]:
    done = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.comment"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def write_named_records(path: Path, named: list[tuple[upcalls.Upcall, bytes]]) -> None:
    """A replay file whose dpif names are raw bytes, UTF-8 or not (upcalls.py takes str)."""
    parts = [upcalls.FILE_MAGIC]
    for upcall, dpif in named:
        placeholder = "x" * len(dpif)
        encoded = upcalls.encode_records([replace(upcall, dpif=placeholder)])
        record = encoded[len(upcalls.FILE_MAGIC):]
        name_at = slice(RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + len(dpif))
        assert record[name_at] == placeholder.encode()
        parts.append(record[:name_at.start] + dpif + record[name_at.stop:])
    path.write_bytes(b"".join(parts))


# --- a key and packet in unreadable memory (-B) ------------------------------------------


NORMAL = 12  # upcalls fired before the -B one


@pytest.fixture(scope="module")
def hostile_run(replay_bin, tmp_path_factory) -> tuple[Run, Path]:
    out = tmp_path_factory.mktemp("hostile") / "out.pcapng"
    return capture(replay_bin, BASIC, out, ["-n", str(NORMAL), "-r", "2000", "-B"], []), out


def test_unreadable_upcall_is_in_the_file_and_marked(hostile_run):
    run, out = hostile_run
    assert_clean_exit(run, NORMAL + 1)
    model = upcalls.read_records(BASIC)[0]
    hostile = run.packets[-1]  # fired after all the others
    captured_packet, captured_key = len(hostile.data), len(hostile.key)
    # The BPF read fails as a whole or gives the readable bytes: never what lies beyond.
    assert captured_packet <= HOSTILE_PACKET_READABLE
    assert hostile.data == model.packet[:captured_packet]
    assert captured_key <= HOSTILE_KEY_READABLE
    assert hostile.key == model.key[:captured_key]
    assert hostile.orig_len == HOSTILE_PACKET_SIZE
    head, key_text, *notes = hostile.comments[0].split("\n")
    assert head.startswith(f"upcall miss dpif={model.dpif} ")
    assert key_text.endswith(
        f"<key truncated: captured {captured_key} of {HOSTILE_KEY_SIZE} bytes>")
    assert f"truncated: packet {captured_packet} of {HOSTILE_PACKET_SIZE} bytes, " \
           f"key {captured_key} of {HOSTILE_KEY_SIZE} bytes" in notes
    unreadable = [note for note in notes if note.startswith("probe could not read: ")]
    assert len(unreadable) == 1
    if captured_packet < HOSTILE_PACKET_READABLE:
        assert "packet unreadable" in unreadable[0]
    if captured_key < HOSTILE_KEY_READABLE:
        assert "key unreadable" in unreadable[0]
    assert len(tshark_comments(out)) == NORMAL + 1


def test_upcalls_around_the_unreadable_one_are_intact(hostile_run):
    run, _ = hostile_run
    records = upcalls.read_records(BASIC)
    for packet, sent in zip(run.packets[:-1], records[:NORMAL], strict=True):
        assert (packet.data, packet.orig_len, packet.key) == \
            (sent.packet, len(sent.packet), sent.key)
        assert "probe could not read" not in packet.comments[0]
        assert "truncated" not in packet.comments[0]


def test_unreadable_upcall_on_the_console_and_read_back(hostile_run):
    run, out = hostile_run
    lines = run.stdout.splitlines()
    assert len(lines) == 2 * (NORMAL + 1)  # --print -v: one line and its key for each upcall
    assert lines[-1] == "\t" + run.packets[-1].comments[0].split("\n")[1]
    done = subprocess.run([*Tool.command(), "-r", str(out), "-v", "-x", "--decode"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


# --- datapath names: not UTF-8, too long, control characters -----------------------------

NOT_UTF8 = b"system@ovs-\xff\xfe"
# 88 bytes: the probe keeps 63 (and a NUL), cutting the 28th "é" after its first byte.
OVERLONG = ("system@x" + "é" * 40).encode()
CONTROL = b"system@\x1b[31mred\x07"
ESCAPED = {
    NOT_UTF8: r"system@ovs-\xff\xfe",
    OVERLONG: "system@x" + "é" * 27 + r"\xc3",
    CONTROL: r"system@\x1b[31mred\x07",
}


@pytest.fixture(scope="module")
def names_run(replay_bin, tmp_path_factory) -> tuple[Run, dict[bytes, upcalls.Upcall]]:
    tmp = tmp_path_factory.mktemp("names")
    models = upcalls.read_records(BASIC)[:len(ESCAPED)]
    sent = dict(zip(ESCAPED, models, strict=True))
    write_named_records(tmp / "names.upc", list((model, name) for name, model in sent.items()))
    run = capture(replay_bin, tmp / "names.upc", tmp / "out.pcapng", ["-r", "1000"],
                  ["--no-port-names"])
    return run, sent


@pytest.mark.parametrize("name", [NOT_UTF8, OVERLONG], ids=["not-utf8", "overlong"])
def test_odd_dpif_names_are_escaped(names_run, name):
    run, sent = names_run
    assert_clean_exit(run, len(ESCAPED))
    index = list(sent).index(name)
    packet = run.packets[index]
    escaped = ESCAPED[name]
    assert packet.data == sent[name].packet
    assert packet.comments[0].startswith(f"upcall miss dpif={escaped} in_port=")
    port = re.search(r" in_port=(\d+) ", packet.comments[0]).group(1)
    assert run.interfaces[packet.interface_id].name == f"port {port} ({escaped})"
    assert f"port {port} ({escaped}) " in run.stdout.splitlines()[2 * index]


def test_control_characters_in_dpif_names_are_escaped(names_run):
    # A kernel datapath may be named with any byte but '/', ':' and whitespace, and its
    # name reaches the operator's terminal: escape sequences must not.
    run, sent = names_run
    assert_clean_exit(run, len(ESCAPED))
    packet = run.packets[list(sent).index(CONTROL)]
    head = packet.comments[0].split("\n")[0]
    interface = run.interfaces[packet.interface_id].name
    assert not CONTROL_CHARACTERS.search(head)
    assert not CONTROL_CHARACTERS.search(interface)
    assert not CONTROL_CHARACTERS.search(run.stdout)
    assert f"dpif={ESCAPED[CONTROL]} " in head
    assert f"({ESCAPED[CONTROL]})" in interface


# --- a key longer than --key-size -------------------------------------------------------

KEY_CAP = 640
SNAPLEN = 64
# An attribute type OVS does not know, 36 bytes a piece, to lengthen a real key.
FILLER = struct.pack("<HH", 36, 60) + bytes(range(32))


def test_key_longer_than_the_key_cap(replay_bin, tmp_path):
    model = next(u for u in upcalls.read_records(BASIC) if len(u.packet) > SNAPLEN)
    long_key = model.key + FILLER * ((900 - len(model.key)) // len(FILLER) + 1)
    assert len(long_key) > KEY_CAP
    write_named_records(tmp_path / "long.upc",
                        [(replace(model, key=long_key), model.dpif.encode())])
    run = capture(replay_bin, tmp_path / "long.upc", tmp_path / "out.pcapng",
                  ["-n", "3", "-r", "1000"],
                  ["--key-size", str(KEY_CAP), "-s", str(SNAPLEN)])
    assert_clean_exit(run, 3)
    for packet in run.packets:
        assert packet.key == long_key[:KEY_CAP]
        assert (packet.data, packet.orig_len) == (model.packet[:SNAPLEN], len(model.packet))
        _, key_text, *notes = packet.comments[0].split("\n")
        assert key_text == format_key(long_key[:KEY_CAP], len(long_key))
        assert key_text.endswith(f"<key truncated: captured {KEY_CAP} of {len(long_key)} bytes>")
        assert key_text.startswith(format_key(model.key) + ",")  # the real part, whole
        assert notes == [f"truncated: packet {SNAPLEN} of {len(model.packet)} bytes, "
                         f"key {KEY_CAP} of {len(long_key)} bytes"]
