"""The packet comment: what an upcall was, written for each packet and read back by -r.

Pure text. The comment's lines, in order:
1. the head: `upcall miss dpif=system@ovs-system in_port=2(veth-a) pid=.. tid=.. thread=..
   cpu=..`;
2. the key as OVS prints it, or, when the capture was too busy to decode it, the
   NOT_DECODED line (the raw key is in the packet's key option, and `-r FILE -w NEW`
   writes the text in);
3. maybe `truncated: packet C of N bytes, key C of N bytes`;
4. maybe `probe could not read: ...`.
With outcomes on, a received upcall has a comment of its own saying what its handler did
(outcome_line): `flow put ufid:.. megaflow=.. actions=..; executed actions=..; handled in
0.041000 ms`, `no flow installed` or `outcome unknown: ..`.
With the kernel side on, a received upcall has a comment of its own, ENQUEUE_LINE:
how long it waited in the kernel (kept apart so that the first one, which repeats in a
storm, stays cached). A failed upcall, which ovs-vswitchd never received, has one comment:
`upcall failed: EAGAIN (handler socket full) miss dpif=.. in_port=2(veth-a) portid=..
cpu=..`, then the key fields the kernel's tracepoint gives, then maybe `truncated: ...`.

The link-type rule lives here too, since the comment's in_port and the packet's interface
come from the same reading of the key: a key without an eth() attribute is an L3 upcall,
whose packet starts at the IP header.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from upcall_capture import pcapng
from upcall_capture.actions import format_actions, format_megaflow
from upcall_capture.probe.kernel_record import errno_number, errno_text
from upcall_capture.probe.record import (
    DID_EXECUTE,
    DID_PUT,
    FLAG_NAMES,
    UNKNOWN_CAPTURE_ENDED,
    UNKNOWN_EVENTS_LOST,
    UNKNOWN_SHED,
    UNKNOWN_TIMEOUT,
    UNKNOWN_WINDOW_FULL,
    UNMATCHED_ENQUEUE,
    UPCALL_TYPES,
    Enqueue,
    Outcome,
    Upcall,
    outcome_kind,
)

NOT_DECODED = ("key not decoded: the capture was overloaded "
               "(the raw key is kept; upcall-capture -r FILE -w NEW adds the text)")
OUTCOME_NOT_DECODED = ("outcome not decoded: the capture was overloaded (the raw outcome "
                       "is kept; upcall-capture -r FILE -w NEW adds the text)")

_TYPE_NUMBERS = {name: number for number, name in UPCALL_TYPES.items()}
_HEAD = re.compile(
    r"^upcall (?P<type>\S+) dpif=(?P<dpif>\S*)(?: in_port=(?P<port>\d+)(?:\((?P<name>[^)]*)\))?)?"
    r" pid=(?P<pid>\d+) tid=(?P<tid>\d+) thread=(?P<thread>\S*) cpu=(?P<cpu>\d+)"
)
_KEY_CUT = re.compile(r"\bkey (\d+) of (\d+) bytes")
_FAILED_HEAD = re.compile(
    r"^upcall failed: (?P<errno>E[A-Z0-9]+|error -?\d+)(?: \([^)]*\))? (?P<type>\S+) "
    r"dpif=(?P<dpif>\S*)(?: in_port=(?P<port>\d+)(?:\((?P<name>[^)]*)\))?)?"
    r"(?: device=(?P<device>\S+))? portid=(?P<portid>\d+|\?)(?: mru=(?P<mru>\d+))?"
    r" cpu=(?P<cpu>\d+)"
)
TRACEPOINT_KEY = "tracepoint key fields (not a full key): "
_QUEUED = re.compile(r"^kernel: queued (?P<ms>\d+\.\d{6}) ms in (?P<device>\S*) "
                     r"portid=(?P<portid>\d+)(?: mru=(?P<mru>\d+))?")
UNMATCHED_LINE = ("kernel: queueing delay unknown: no enqueue by the datapath matched this "
                  "upcall's packet")


def linktype(has_eth: bool, key: bytes) -> int:
    """Ethernet, or raw IP for an L3 upcall (a key without eth(); an empty key is taken
    for Ethernet, as nothing says otherwise)."""
    return pcapng.LINKTYPE_ETHERNET if has_eth or not key else pcapng.LINKTYPE_RAW


def upcall_linktype(upcall: Upcall, has_eth: bool) -> int:
    """linktype() for an upcall: a failed upcall's key (the tracepoint's fields) has no
    eth(), but its packet is a frame all the same."""
    return pcapng.LINKTYPE_ETHERNET if upcall.failed else linktype(has_eth, upcall.key)


def head(upcall: Upcall, port: int | None, port_name: str | None) -> str:
    """The first line: what the upcall was, and where."""
    where = "" if port is None else f" in_port={port}" + (f"({port_name})" if port_name else "")
    return (f"upcall {upcall.type_name} dpif={upcall.dpif}{where} pid={upcall.pid} "
            f"tid={upcall.tid} thread={upcall.thread} cpu={upcall.cpu}")


def text(upcall: Upcall, key_text: str, port: int | None, port_name: str | None) -> str:
    """The whole comment of a decoded key."""
    lines = [head(upcall, port, port_name), key_text]
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


def failed_head(upcall: Upcall, port: int | None, port_name: str | None) -> str:
    """The first line of a failed upcall's comment."""
    enqueue = upcall.enqueue
    if port is not None:
        where = f" in_port={port}({port_name or enqueue.device})"
    else:
        where = f" device={enqueue.device or '?'}"
    mru = f" mru={enqueue.mru}" if enqueue.mru else ""
    return (f"upcall failed: {errno_text(enqueue.result)} {upcall.type_name} "
            f"dpif={upcall.dpif}{where} portid={_or_unknown(enqueue.portid)}{mru} "
            f"cpu={upcall.cpu}")


def _or_unknown(value: int | None) -> str:
    return "?" if value is None else str(value)


def failed_text(upcall: Upcall, key_text: str, port: int | None,
                port_name: str | None) -> str:
    lines = [failed_head(upcall, port, port_name), TRACEPOINT_KEY + key_text]
    if len(upcall.packet) < upcall.pkt_size:
        lines.append(f"truncated: packet {len(upcall.packet)} of {upcall.pkt_size} bytes "
                     "(the linear part of the kernel's skb)")
    return "\n".join(lines)


def enqueue_line(enqueue: Enqueue) -> str:
    """A received upcall's second comment: its wait in the kernel, ovs_dp_upcall() to
    recv_upcall, and the socket it waited in."""
    if enqueue.queued_ns is None:
        return UNMATCHED_LINE
    return queued_line(enqueue.queued_ns, enqueue_where(enqueue)).decode(
        "utf-8", "backslashreplace")


def enqueue_where(enqueue: Enqueue) -> bytes:
    """What follows the time in enqueue_line(): the same for every upcall of a socket."""
    mru = f" mru={enqueue.mru}" if enqueue.mru else ""
    return (f"{enqueue.device} portid={enqueue.portid}{mru} "
            "(ovs_dp_upcall to recv_upcall)").encode("utf-8", "backslashreplace")


def queued_line(queued_ns: int, where: bytes) -> bytes:
    """enqueue_line() of a matched upcall, from its parts (the hot path makes it so)."""
    return b"kernel: queued %d.%06d ms in " % divmod(queued_ns, 1_000_000) + where


def parse_enqueue(comment: str) -> Enqueue | None:
    """A received upcall's ENQUEUE comment read back, or None for another text."""
    if comment == UNMATCHED_LINE:
        return UNMATCHED_ENQUEUE
    found = _QUEUED.match(comment)
    if found is None:
        return None
    whole, fraction = found["ms"].split(".")
    return Enqueue(queued_ns=int(whole) * 1_000_000 + int(fraction), result=0,
                   portid=int(found["portid"]), device=found["device"],
                   mru=int(found["mru"] or 0))


@dataclass(frozen=True, slots=True)
class CommentFields:
    """What one of our comments says, read back."""

    upcall_type: int
    dpif: str
    port: int | None
    port_name: str | None
    pid: int
    tid: int
    thread: str
    cpu: int
    key_size: int | None  # the key's real length, when the comment says it was cut
    decoded: bool  # False: the key line is NOT_DECODED
    failure: Enqueue | None = None  # a failed upcall's errno, portid, device, MRU


def parse(comment: str) -> CommentFields | None:
    """The fields of one of our comments, or None for any other text."""
    lines = comment.split("\n")
    found = _HEAD.match(lines[0])
    if found is None:
        return _parse_failed(lines[0])
    fields = found.groupdict()
    kind = fields["type"]
    cut = next((m for line in lines[2:] if line.startswith("truncated: ")
                and (m := _KEY_CUT.search(line))), None)
    return CommentFields(
        upcall_type=_TYPE_NUMBERS.get(kind, int(kind) if kind.isdigit() else -1),
        dpif=fields["dpif"], port=int(fields["port"]) if fields["port"] else None,
        port_name=fields["name"], pid=int(fields["pid"]), tid=int(fields["tid"]),
        thread=fields["thread"], cpu=int(fields["cpu"]),
        key_size=int(cut.group(2)) if cut else None,
        decoded=len(lines) < 2 or lines[1] != NOT_DECODED,
    )


def _parse_failed(first_line: str) -> CommentFields | None:
    found = _FAILED_HEAD.match(first_line)
    if found is None:
        return None
    fields = found.groupdict()
    code = errno_number(fields["errno"]) if fields["errno"][0] == "E" else \
        int(fields["errno"].split()[1])
    kind = fields["type"]
    return CommentFields(
        upcall_type=_TYPE_NUMBERS.get(kind, int(kind) if kind.isdigit() else -1),
        dpif=fields["dpif"], port=int(fields["port"]) if fields["port"] else None,
        port_name=fields["name"], pid=0, tid=0, thread="", cpu=int(fields["cpu"]),
        key_size=None, decoded=True,
        failure=Enqueue(queued_ns=None, result=-(code or 0),
                        portid=None if fields["portid"] == "?" else int(fields["portid"]),
                        device=fields["device"] or fields["name"] or "",
                        mru=int(fields["mru"] or 0)),
    )


def with_key_text(comment: str, key_text: str) -> str:
    """A comment whose key was not decoded, with the key's text in its place."""
    first, rest = comment.split("\n", 1)
    return "\n".join((first, key_text, *rest.split("\n")[1:]))


NO_FLOW = "no flow installed"
UNKNOWN_OUTCOME = "outcome unknown: "
UNKNOWN_REASONS = {
    UNKNOWN_TIMEOUT: "its handler did nothing more within the window",
    UNKNOWN_EVENTS_LOST: "flow operation events were lost (their ring was full)",
    UNKNOWN_CAPTURE_ENDED: "the capture ended first",
    UNKNOWN_WINDOW_FULL: "too many upcalls were waiting for their outcome",
    UNKNOWN_SHED: "the capture was overloaded and did not copy its handler's flow "
                  "operations",
}
_OUTCOME = re.compile(
    r"^(?:flow (?P<verb>put|modify) ufid:(?P<ufid>[0-9a-f-]{36}|\?) megaflow=(?P<megaflow>.*?) "
    r"actions=(?P<put_actions>.*?)|no flow installed)"
    r"(?:; executed actions=(?P<execute_actions>.*?))?"
    r"(?:; handled in (?P<ms>\d+\.\d{6}) ms)?$")


def ufid_text(ufid: bytes) -> str:
    """A ufid as OVS prints it: its four host-order words as a UUID."""
    a, b, c, d = struct.unpack("<4I", ufid)
    return f"{a:08x}-{b >> 16:04x}-{b & 0xFFFF:04x}-{c >> 16:04x}-{c & 0xFFFF:04x}{d:08x}"


def outcome_what(outcome: Outcome, key: bytes) -> str:
    """outcome_line() without the handling time: what is the same for every upcall of a
    flow (the hot path caches it)."""
    if outcome.unknown:
        return UNKNOWN_OUTCOME + UNKNOWN_REASONS.get(outcome.unknown, str(outcome.unknown))
    parts = []
    if outcome.did & DID_PUT:
        verb = "put" if outcome.create else "modify"
        ufid = ufid_text(outcome.ufid) if outcome.ufid else "?"
        parts.append(f"flow {verb} ufid:{ufid} megaflow={format_megaflow(key, outcome.mask)} "
                     f"actions={format_actions(outcome.put_actions)}")
    else:
        parts.append(NO_FLOW)
    if outcome.did & DID_EXECUTE:
        parts.append(f"executed actions={format_actions(outcome.execute_actions)}")
    return "; ".join(parts)


def handled_text(handling_ns: int | None) -> bytes:
    if handling_ns is None:
        return b""
    return b"; handled in %d.%06d ms" % divmod(handling_ns, 1_000_000)


def outcome_line(outcome: Outcome, key: bytes) -> str:
    """What the handler did with the upcall, and how long after recv_upcall it did it."""
    return outcome_what(outcome, key) + handled_text(outcome.handling_ns).decode()


@dataclass(frozen=True, slots=True)
class OutcomeFields:
    """An outcome comment read back."""

    text: str  # the comment itself
    did: int  # DID_* bits
    unknown: bool
    handling_ns: int | None
    ufid: str | None = None
    megaflow: str | None = None
    put_actions: str | None = None
    execute_actions: str | None = None

    @property
    def kind(self) -> str:
        return outcome_kind(self.did, self.unknown)


def parse_outcome(comment: str) -> OutcomeFields | None:
    """An outcome comment read back, or None for another text."""
    if comment.startswith(UNKNOWN_OUTCOME):
        return OutcomeFields(comment, 0, True, None)
    found = _OUTCOME.match(comment)
    if found is None:
        return None
    did = (DID_PUT if found["verb"] else 0) | \
        (DID_EXECUTE if found["execute_actions"] is not None else 0)
    handling = None
    if found["ms"]:
        whole, fraction = found["ms"].split(".")
        handling = int(whole) * 1_000_000 + int(fraction)
    ufid = found["ufid"] if found["ufid"] != "?" else None
    return OutcomeFields(comment, did, False, handling, ufid, found["megaflow"],
                         found["put_actions"], found["execute_actions"])


def outcome_fields(outcome: Outcome | OutcomeFields, key: bytes) -> OutcomeFields:
    """An outcome as its comment says it: read back from a file already, or from a
    capture's record (its megaflow is its key's)."""
    if isinstance(outcome, OutcomeFields):
        return outcome
    return parse_outcome(outcome_line(outcome, key))
