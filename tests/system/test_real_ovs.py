"""System test: upcall-capture on a real ovs-vswitchd (OVS 3.1, kernel datapath) in a qemu guest.

build-guest.sh makes (once, cached) a Debian guest with OVS built with USDT probes;
run-guest.sh boots it with the working tree's upcall_capture and guest-init.sh, which turns
on OVS's own upcall log (dpif:dbg), runs `python3 -m upcall_capture -w` while sending ARP,
ICMP, ND, UDP and TCP and ACTION upcalls, then stops it with SIGINT. Here every upcall OVS
logged while the tool was listening is matched one-to-one with the captured packets, and
the comments, packets and interfaces are checked against what OVS itself said.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from upcall_capture import pcapng
from upcall_capture.probe.usdt_args import args_reader, parse_spec

pytestmark = pytest.mark.system

HERE = Path(__file__).resolve().parent
# Kept after the run: the guest's console and everything it left (CI artifacts).
RUN_DIR = Path(os.environ.get("UPCALL_SYSTEM_RUN_DIR", "/tmp/upcall-capture-system"))
_TAILS = (
    ("guest console", "serial.log", 60),
    ("upcall-capture stderr", "results/capture.stderr", 30),
    ("upcall-capture --kernel stderr", "results/failed.stderr", 30),
    ("upcall-capture shed stderr", "results/shed.stderr", 30),
    ("ovs-vswitchd.log", "results/ovs-vswitchd.log", 30),
)

# ---------------------------------------------------------------------------------------------
# OVS's log: lib/dpif.c dpif_print_packet() logs "<dpif>: <type> upcall:", then the key in
# odp_flow_key_format text, then ofp_packet_to_string(): flow_format() of the packet and,
# for TCP/UDP/SCTP/ICMP/ICMPv6, " <proto>_csum:<hex>".

_LOG_HEAD = re.compile(
    r"^(?P<time>\S+?)\|\d+\|dpif(?:\((?P<thread>[^)]*)\))?\|DBG\|"
    r"(?P<dpif>\S+): (?P<type>miss|action|<unknown>) upcall:$"
)
_LOG_LINE_START = re.compile(r"^\d{4}-\d\d-\d\dT")
# lib/dpif.c logs upcalls, puts and executes at DBG under one rate limit, and failed
# operations at WARN under another: a drop notice at DBG means the oracle lost lines. The
# WARN one can come from the revalidator, whose puts of flows a flow_mod just deleted fail
# ("failed to put[modify] (No such file or directory)") in bursts.
_LOG_RATE_LIMITED = re.compile(r"\|dpif(?:\([^)]*\))?\|DBG\|Dropped \d+ log messages")


@dataclass
class LoggedUpcall:
    time: str
    thread: str | None
    dpif: str
    type: str
    key: str
    packet: str  # flow_format() text of the packet, with its checksum suffix


def parse_ovs_log(text: str) -> list[LoggedUpcall]:
    lines = text.splitlines()
    upcalls = []
    for i, line in enumerate(lines):
        head = _LOG_HEAD.match(line)
        if head is None:
            continue
        key, packet = lines[i + 1], lines[i + 2]
        assert not _LOG_LINE_START.match(key) and not _LOG_LINE_START.match(packet), line
        upcalls.append(
            LoggedUpcall(head["time"], head["thread"], head["dpif"], head["type"], key, packet)
        )
    return upcalls


@dataclass
class PacketDescription:
    protocols: set[str]  # flow_format's shorthand names: arp, icmp, icmp6, tcp6...
    fields: dict[str, str]
    checksum: tuple[str, int] | None  # ("udp", 0x5570) from " udp_csum:5570"


def parse_packet_description(text: str) -> PacketDescription:
    flow, _, suffix = text.partition(" ")
    protocols, fields = set(), {}
    for token in flow.split(","):
        name, sep, value = token.partition("=")
        if sep:
            fields[name] = value
        else:
            protocols.add(name)
    checksum = None
    if suffix:
        match = re.fullmatch(r"(\w+)_csum:([0-9a-f]+)", suffix)
        assert match, f"unexpected packet description suffix {suffix!r}"
        checksum = (match[1], int(match[2], 16))
    return PacketDescription(protocols, fields, checksum)


# ---------------------------------------------------------------------------------------------
# The capture, decoded by tshark (independently of the project's own pcapng reader).

# flow_format() field -> tshark fields that may carry it (the first present is used).
_FIELD_MAP: dict[str, tuple[str, ...]] = {
    "dl_src": ("eth.src",),
    "dl_dst": ("eth.dst",),
    "nw_src": ("ip.src",),
    "nw_dst": ("ip.dst",),
    "ipv6_src": ("ipv6.src",),
    "ipv6_dst": ("ipv6.dst",),
    "nw_ttl": ("ip.ttl", "ipv6.hlim"),
    "arp_spa": ("arp.src.proto_ipv4",),
    "arp_tpa": ("arp.dst.proto_ipv4",),
    "arp_op": ("arp.opcode",),
    "arp_sha": ("arp.src.hw_mac",),
    "arp_tha": ("arp.dst.hw_mac",),
    "tp_src": ("tcp.srcport", "udp.srcport"),
    "tp_dst": ("tcp.dstport", "udp.dstport"),
    "icmp_type": ("icmp.type", "icmpv6.type"),
    "icmp_code": ("icmp.code", "icmpv6.code"),
    "nd_target": ("icmpv6.nd.ns.target_address", "icmpv6.nd.na.target_address"),
}
# flow_format() shorthand -> the protocols tshark must have found in the frame.
_PROTOCOL_MAP: dict[str, tuple[str, ...]] = {
    "arp": ("arp",),
    "ip": ("ip",),
    "icmp": ("ip", "icmp"),
    "tcp": ("ip", "tcp"),
    "udp": ("ip", "udp"),
    "ipv6": ("ipv6",),
    "icmp6": ("ipv6", "icmpv6"),
    "tcp6": ("ipv6", "tcp"),
    "udp6": ("ipv6", "udp"),
}
_CHECKSUM_FIELDS = {"tcp": "tcp.checksum", "udp": "udp.checksum", "icmp": "icmp.checksum",
                    "icmp6": "icmpv6.checksum"}
_OTHER_FIELDS = ("frame.interface_name", "frame.comment", "frame.len", "frame.cap_len",
                 "frame.protocols", "ip.len", "ipv6.plen")
TSHARK_FIELDS = sorted(
    {f for names in _FIELD_MAP.values() for f in names}
    | set(_CHECKSUM_FIELDS.values())
    | set(_OTHER_FIELDS)
)

_COMMENT_HEAD = re.compile(
    r"^upcall (?P<type>\S+) dpif=(?P<dpif>\S+) in_port=(?P<port>\d+)(?:\((?P<name>[^)]*)\))?"
    r" pid=(?P<pid>\d+) tid=(?P<tid>\d+) thread=(?P<thread>.*) cpu=(?P<cpu>\d+)$"
)


@dataclass
class CapturedUpcall:
    index: int  # frame number, from 1
    interface: str
    comment: str
    layers: dict[str, str] = field(repr=False)  # first occurrence of each tshark field

    @property
    def head(self) -> re.Match[str]:
        head = _COMMENT_HEAD.match(self.comment.split("\n")[0])
        assert head, f"frame {self.index}: comment's first line is not an upcall header: " \
                     f"{self.comment!r}"
        return head

    @property
    def key(self) -> str:
        lines = self.comment.split("\n")
        return lines[1] if len(lines) > 1 else ""

    @property
    def type(self) -> str:
        return self.head["type"]


def read_capture(path: Path) -> tuple[list[CapturedUpcall], str]:
    """The packets of a pcapng as tshark decodes them, and tshark's complaints (if any)."""
    args = ["tshark", "-n", "-r", str(path), "-T", "json"]
    for name in TSHARK_FIELDS:
        args += ["-e", name]
    run = subprocess.run(args, capture_output=True, text=True, check=False)
    complaints = "\n".join(
        line for line in run.stderr.splitlines() if "Running as user" not in line
    )
    if run.returncode != 0:
        complaints += f"\ntshark exited with {run.returncode}"
    frames = json.loads(run.stdout) if run.stdout.strip() else []
    captured = []
    for number, frame in enumerate(frames, start=1):
        layers = {name: values[0] for name, values in frame["_source"]["layers"].items()}
        captured.append(CapturedUpcall(
            number, layers.get("frame.interface_name", ""), layers.get("frame.comment", ""),
            layers,
        ))
    return captured, complaints


def packet_disagreements(logged: LoggedUpcall, captured: CapturedUpcall) -> list[str]:
    """How the captured packet differs from OVS's description of it (empty: it agrees)."""
    described = parse_packet_description(logged.packet)
    layers = captured.layers
    problems = []
    frame_protocols = set(layers.get("frame.protocols", "").split(":"))
    for shorthand in described.protocols & _PROTOCOL_MAP.keys():
        missing = set(_PROTOCOL_MAP[shorthand]) - frame_protocols
        if missing:
            problems.append(f"OVS says {shorthand}, the frame has no {sorted(missing)}")
    for name, value in described.fields.items():
        tshark_value = next((layers[f] for f in _FIELD_MAP.get(name, ()) if f in layers), None)
        if name in _FIELD_MAP and tshark_value is None:
            problems.append(f"{name}={value} not in the frame")
        elif tshark_value is not None and not _same_value(value, tshark_value):
            problems.append(f"{name}: OVS {value}, frame {tshark_value}")
    if described.checksum is not None:
        proto, expected = described.checksum
        found = layers.get(_CHECKSUM_FIELDS[proto])
        if found is None or int(found, 16) != expected:
            problems.append(f"{proto} checksum: OVS {expected:#x}, frame {found}")
    problems += _length_problems(layers)
    return problems


def _same_value(ovs: str, tshark: str) -> bool:
    if ovs.isdigit() and tshark.isdigit():
        return int(ovs) == int(tshark)
    return ovs.lower() == tshark.lower()


def _length_problems(layers: dict[str, str]) -> list[str]:
    """The frame holds all of the packet: nothing cut, nothing added after the IP datagram."""
    frame_len, cap_len = int(layers["frame.len"]), int(layers["frame.cap_len"])
    problems = [] if frame_len == cap_len else [f"captured {cap_len} of {frame_len} bytes"]
    header = 14 + 4 * layers.get("frame.protocols", "").split(":").count("vlan")
    if "ip.len" in layers:
        expected = header + int(layers["ip.len"])
    elif "ipv6.plen" in layers:
        expected = header + 40 + int(layers["ipv6.plen"])
    else:
        return problems
    if frame_len != expected:
        problems.append(f"frame length {frame_len}, the IP header says {expected}")
    return problems


# ---------------------------------------------------------------------------------------------
# Matching logged and captured upcalls one-to-one.

@dataclass
class Matching:
    pairs: list[tuple[LoggedUpcall, CapturedUpcall]]
    only_logged: list[LoggedUpcall]
    only_captured: list[CapturedUpcall]


def match_upcalls(
    required: list[LoggedUpcall], others: list[LoggedUpcall], captured: list[CapturedUpcall]
) -> Matching:
    """Pairs logged and captured upcalls, each logged one (in log order) with the first
    unpaired captured one whose key text, packet and handler thread agree; then with one
    whose key text and packet agree; then the rest, on the key text or the packet alone, so
    that a wrong key, packet or thread still pairs and the tests below say which. The
    thread comes first because two handlers can receive upcalls of the same key and packet
    (an ARP request sent again, say) at nearly the same time, and log them in the other
    order. The type is not used: the same packet can make a
    miss and then an action upcall, and order tells them apart.

    `required` upcalls (logged while the tool listened) must all pair; `others` (logged
    before or after) only account for captured upcalls at the edges of that window, and are
    not reported when unpaired."""
    free = list(captured)
    pairs = []
    unpaired = [(True, u) for u in required] + [(False, u) for u in others]
    for agreement, same_thread in ((all, True), (all, False), (any, False)):
        left = []
        for is_required, entry in unpaired:
            def agrees(
                c: CapturedUpcall,
                entry: LoggedUpcall = entry,
                agreement: Callable[[tuple[bool, bool]], bool] = agreement,
                same_thread: bool = same_thread,
            ) -> bool:
                if same_thread:
                    head = _COMMENT_HEAD.match(c.comment.split("\n")[0])
                    if head is None or head["thread"] != entry.thread:
                        return False
                return agreement((c.key == entry.key, not packet_disagreements(entry, c)))

            chosen = _first(free, agrees)
            if chosen is None:
                left.append((is_required, entry))
            else:
                free.remove(chosen)
                pairs.append((entry, chosen))
        unpaired = left
    return Matching(pairs, [u for is_required, u in unpaired if is_required], free)


def _first(
    items: list[CapturedUpcall], test: Callable[[CapturedUpcall], bool]
) -> CapturedUpcall | None:
    return next((item for item in items if test(item)), None)


# ---------------------------------------------------------------------------------------------
# The guest run, shared by the tests.

@dataclass
class GuestRun:
    results: Path
    logged: list[LoggedUpcall]  # upcalls OVS logged while the tool was listening
    logged_outside: list[LoggedUpcall]  # and before or after that
    captured: list[CapturedUpcall]
    tshark_complaints: str
    tool_stderr: str
    ports: dict[str, dict[int, str]]  # dpif -> datapath port number -> name
    vswitchd_pid: int


def _run_script(args: list[str], what: str) -> str:
    run = subprocess.run(args, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        tail = "\n".join((run.stdout + run.stderr).splitlines()[-40:])
        pytest.fail(f"{what} failed (exit {run.returncode}):\n{tail}", pytrace=False)
    return run.stdout


def parse_dpctl_show(text: str) -> dict[str, dict[int, str]]:
    ports: dict[str, dict[int, str]] = {}
    dpif = None
    for line in text.splitlines():
        if re.fullmatch(r"\S+@\S+:", line):
            dpif = line[:-1]
            ports[dpif] = {}
        elif (port := re.fullmatch(r"\s+port (\d+): (\S+)(?: \(.*\))?", line)) and dpif:
            ports[dpif][int(port[1])] = port[2]
    return ports


@pytest.fixture(scope="module", autouse=True)
def logs_shown_on_failure(request: pytest.FixtureRequest):
    """After the module, if any of its tests failed, the tails of the guest's logs."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before or not RUN_DIR.exists():
        return
    plugins = request.config.pluginmanager
    terminal = plugins.get_plugin("terminalreporter")
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        terminal.write_sep("=", f"system test: guest run in {RUN_DIR}")
        for title, name, lines in _TAILS:
            terminal.write_sep("-", f"{title} (last {lines} lines)")
            terminal.write_line(_tail(RUN_DIR / name, lines))


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"({err.strerror})"
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def guest() -> GuestRun:
    if os.geteuid() != 0:
        pytest.skip("the system test needs root (debootstrap, chroot, apt-get)")
    shutil.rmtree(RUN_DIR, ignore_errors=True)  # never show an earlier run's logs
    guest_dir = _run_script(["bash", str(HERE / "build-guest.sh")], "building the guest").strip()
    _run_script(["bash", str(HERE / "run-guest.sh"), guest_dir, str(RUN_DIR)], "the guest run")
    results = RUN_DIR / "results"
    status = (results / "status").read_text().strip()
    if status != "0":
        failure = (results / "failure").read_text().strip()
        pytest.fail(f"the guest failed: {failure}", pytrace=False)

    log = (results / "ovs-vswitchd.log").read_text()
    if _LOG_RATE_LIMITED.search(log):
        pytest.fail("OVS rate-limited its upcall log: the guest sent too much traffic",
                    pytrace=False)
    start = (results / "capture-start").read_text().strip()
    stop = (results / "capture-stop").read_text().strip()
    logged, logged_outside = [], []
    for upcall in parse_ovs_log(log):
        (logged if start < upcall.time < stop else logged_outside).append(upcall)
    captured, complaints = read_capture(results / "capture.pcapng")
    return GuestRun(
        results=results,
        logged=logged,
        logged_outside=logged_outside,
        captured=captured,
        tshark_complaints=complaints,
        tool_stderr=(results / "capture.stderr").read_text(errors="replace"),
        ports=parse_dpctl_show((results / "dpctl-show.txt").read_text()),
        vswitchd_pid=int((results / "ovs-vswitchd.pid").read_text()),
    )


@pytest.fixture(scope="module")
def matching(guest: GuestRun) -> Matching:
    return match_upcalls(guest.logged, guest.logged_outside, guest.captured)


# ---------------------------------------------------------------------------------------------
# The checks.

def test_guest_traffic_made_every_kind_of_upcall(guest: GuestRun) -> None:
    # Guards the checks below: they mean little if the guest's traffic did not reach OVS.
    types = {u.type for u in guest.logged}
    protocols = set().union(*(parse_packet_description(u.packet).protocols for u in guest.logged))
    assert types == {"miss", "action"}
    assert {"arp", "icmp", "icmp6", "tcp", "udp", "tcp6", "udp6"} <= protocols
    assert any("nd(target=" in u.key for u in guest.logged), "no IPv6 neighbour discovery"
    assert any("vlan(vid=100," in u.key for u in guest.logged), "no VLAN-tagged upcall"
    assert any(re.search(r"recirc_id\(0x[1-9a-f][0-9a-f]*\)", u.key) and "ct_tuple4(" in u.key
               for u in guest.logged), "no upcall after conntrack recirculation"


def test_capture_is_valid_pcapng(guest: GuestRun) -> None:
    assert guest.tshark_complaints == ""
    assert guest.captured, "the capture has no packets"


def test_ovs_probe_arguments_take_one_read_per_base_register(guest: GuestRun) -> None:
    # The BPF reader is written for the site's spec (usdt_args.py), not bcc's readarg, and
    # memory operands on one base register take one read between them (each read costs
    # the traced ovs-vswitchd some 65 ns).
    specs = (guest.results / "probe-args.txt").read_text().splitlines()
    assert len(specs) == 1, specs
    reader = args_reader(specs, "x86_64")
    assert reader is not None, f"bcc's readarg would read {specs[0]}"
    bases = {o.register for o in parse_spec(specs[0]) if o.offset is not None}
    assert reader.count("bpf_probe_read_user(") == len(bases)


def test_tool_reports_every_upcall_and_none_lost(guest: GuestRun) -> None:
    summary = re.search(r"(\d+) upcalls captured, (\d+) lost", guest.tool_stderr)
    assert summary, f"no summary line in the tool's stderr:\n{guest.tool_stderr}"
    assert int(summary[2]) == 0
    assert int(summary[1]) == len(guest.captured)
    assert (guest.results / "capture.exit").read_text().strip() == "0"


def test_every_logged_upcall_is_captured_and_nothing_else(matching: Matching) -> None:
    missing = [f"{u.time} {u.type} {u.key}\n    {u.packet}" for u in matching.only_logged]
    extra = [f"frame {c.index}: {c.comment!r}" for c in matching.only_captured]
    assert not missing and not extra, (
        f"logged by OVS but not captured ({len(missing)}):\n{_listing(missing)}\n"
        f"captured but not logged by OVS ({len(extra)}):\n{_listing(extra)}"
    )


def test_key_text_is_ovs_key_text(matching: Matching) -> None:
    wrong = [
        f"frame {c.index}:\n  OVS:  {u.key}\n  tool: {c.key}\n" + " " * (8 + _diff_at(u.key, c.key))
        + "^"
        for u, c in matching.pairs if c.key != u.key
    ]
    assert not wrong, _listing(wrong)


def _diff_at(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def test_packet_agrees_with_ovs_description(matching: Matching) -> None:
    wrong = [
        f"frame {c.index} ({u.packet}): " + "; ".join(problems)
        for u, c in matching.pairs if (problems := packet_disagreements(u, c))
    ]
    assert not wrong, _listing(wrong)


def test_upcall_type_dpif_and_thread(guest: GuestRun, matching: Matching) -> None:
    wrong = []
    for u, c in matching.pairs:
        head = c.head
        said = (head["type"], head["dpif"], head["thread"], int(head["pid"]))
        truth = (u.type, u.dpif, u.thread, guest.vswitchd_pid)
        if said != truth:
            wrong.append(f"frame {c.index}: (type, dpif, thread, pid) {said}, OVS {truth}")
    assert not wrong, _listing(wrong)


def test_interfaces_are_real_port_names(guest: GuestRun, matching: Matching) -> None:
    # The port comes from OVS's own key text; its name from OVS's dpctl/show.
    wrong = []
    for u, c in matching.pairs:
        port = int(re.search(r"(?:^|,)in_port\((\d+)\)", u.key)[1])
        name = guest.ports[u.dpif][port]
        head = c.head
        expected = (f"{name} ({u.dpif})", port, name)
        found = (c.interface, int(head["port"]), head["name"])
        if found != expected:
            wrong.append(f"frame {c.index}: (interface, in_port, name) {found}, OVS {expected}")
    assert not wrong, _listing(wrong)


def _listing(problems: list[str], limit: int = 10) -> str:
    """The first few problems, one a line, and how many more there are."""
    more = [f"... and {len(problems) - limit} more"] if len(problems) > limit else []
    return "\n".join(problems[:limit] + more)


# ---------------------------------------------------------------------------------------------
# The kernel side. The first capture ran with it on by default (the guest's kernel has the
# tracepoint); the second (--kernel) while ovs-vswitchd was stopped, so that the datapath
# failed upcalls, which guest-init.sh counted in the datapath's lost: counter.

_QUEUED = re.compile(r"^kernel: queued (\d+\.\d{6}) ms in (\S+) portid=(\d+)")
_FAILED = re.compile(
    r"^upcall failed: EAGAIN \(handler socket full\) miss dpif=system@ovs-system "
    r"in_port=(\d+)\(veth-a\) portid=(\d+) cpu=\d+\n"
    r"tracepoint key fields \(not a full key\): recirc_id\(0\),in_port\((\d+)\),"
    r"eth_type\(0x0800\)$")
_FLOOD_PAYLOAD = re.compile(rb"upcall-failed (\d{6}) x{1379}")


def read_packets(path: Path) -> list[tuple[pcapng.Packet, str]]:
    """Our own reader: every comment of each packet (tshark's JSON gives the first)."""
    packets, names = [], []
    for block in pcapng.iter_blocks(path.read_bytes()):
        if isinstance(block, pcapng.InterfaceDescription):
            names.append(block.name)
        elif isinstance(block, pcapng.Packet):
            packets.append((block, names[block.interface_id]))
    return packets


def _wall(stamp: str) -> float:
    return datetime.strptime(stamp.strip(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=UTC).timestamp()


@dataclass
class FailedRun:
    results: Path
    packets: list[tuple[pcapng.Packet, str]]
    lost_grown: int
    longest_wait_s: float  # from the first packet sent to ovs-vswitchd's SIGCONT
    stderr: str
    veth_a: int  # its datapath port number


@pytest.fixture(scope="module")
def failed_run(guest: GuestRun) -> FailedRun:
    results = guest.results
    lost = [int((results / f"failed-lost-{when}").read_text()) for when in ("before", "after")]
    (dpif_ports,) = guest.ports.values()
    return FailedRun(
        results=results, packets=read_packets(results / "failed.pcapng"),
        lost_grown=lost[1] - lost[0],
        longest_wait_s=_wall((results / "failed-cont").read_text())
        - _wall((results / "failed-first-send").read_text()),
        stderr=(results / "failed.stderr").read_text(errors="replace"),
        veth_a=next(number for number, name in dpif_ports.items() if name == "veth-a"))


def test_received_upcalls_carry_their_queueing_delay(guest: GuestRun) -> None:
    packets = read_packets(guest.results / "capture.pcapng")
    assert packets
    for packet, _ in packets:
        assert len(packet.comments) == 3, packet.comments  # the upcall, its outcome, this
        found = _QUEUED.match(packet.comments[2])
        assert found, f"no matched enqueue: {packet.comments}"
        assert 0 < float(found[1]) < 10_000
        assert found[2] in ("veth-a", "veth-b")


def test_shed_outcomes_take_the_probes_out_of_ovs_vswitchd_and_back(guest: GuestRun) -> None:
    from upcall_capture import comment

    stderr = (guest.results / "shed.stderr").read_text(errors="replace")
    assert (guest.results / "shed.exit").read_text().strip() == "0", stderr
    # The burst was shed, and the probes were out for a while.
    assert re.search(r", [1-9]\d* unknown \(.*[1-9]\d* capture overloaded\).*; the probes were "
                     r"out for \d+\.\d s \(capture overloaded\)$", stderr, re.M), stderr
    # They went back in: the packet sent once the capture had caught up has its put and
    # execute tied again, not "capture overloaded".
    packets = read_packets(guest.results / "shed.pcapng")
    (marker,) = [p for p, _ in packets if b"upcall-after-shed" in p.data]
    read = comment.parse_outcome(marker.comments[1])
    assert read is not None and read.kind == "put", marker.comments
    assert read.execute_actions is not None, marker.comments


def test_every_failed_upcall_is_in_the_file(failed_run: FailedRun) -> None:
    # The guest sent until the counter had grown by 1,000 or more.
    assert failed_run.lost_grown >= 1000
    failed = [(p, name) for p, name in failed_run.packets
              if p.comments and p.comments[0].startswith("upcall failed: ")]
    assert len(failed) == failed_run.lost_grown
    numbers = []
    for packet, interface in failed:
        found = _FAILED.match(packet.comments[0])
        assert found, packet.comments[0]
        assert int(found[1]) == int(found[3]) == failed_run.veth_a
        assert interface == "veth-a (system@ovs-system)"
        # Exactly the frame sent: Ethernet, IPv4 10.0.0.1 -> 10.0.0.2, UDP, the payload.
        data = packet.data
        assert len(data) == packet.orig_len == 14 + 20 + 8 + 1400
        assert data[12:14] == b"\x08\x00" and data[26:34] == bytes([10, 0, 0, 1, 10, 0, 0, 2])
        payload = _FLOOD_PAYLOAD.fullmatch(data[42:])
        assert payload, data[42:80]
        number = int(payload[1])
        assert int.from_bytes(data[34:36], "big") == 20000 + number
        assert int.from_bytes(data[36:38], "big") == 9000
        numbers.append(number)
    assert len(set(numbers)) == len(numbers), "a packet was captured as failed twice"


def test_failed_capture_summary_matches_the_datapath(failed_run: FailedRun) -> None:
    grown = failed_run.lost_grown
    assert (f"datapath lost {grown} upcalls during the capture; {grown} failed upcalls "
            "captured\n") in failed_run.stderr, failed_run.stderr
    assert re.search(r"\b0 lost\b", failed_run.stderr), failed_run.stderr
    assert (failed_run.results / "failed.exit").read_text().strip() == "0"
    # The counter at both ends is in the file too: the section header and the ISBs.
    blocks = list(pcapng.iter_blocks((failed_run.results / "failed.pcapng").read_bytes()))
    start = int((failed_run.results / "failed-lost-before").read_text())
    assert blocks[0].comments[0].endswith(
        f"\ndatapath system@ovs-system lost: {start} at the start of the capture")
    ends = {b.comments[0] for b in blocks if isinstance(b, pcapng.InterfaceStatistics)}
    assert ends == {f"datapath system@ovs-system lost: {start} at the start of the capture, "
                    f"{start + grown} at its end"}


def test_upcalls_queued_while_stopped_waited_about_the_stop(failed_run: FailedRun) -> None:
    delays = []
    for packet, _ in failed_run.packets:
        if packet.comments[0].startswith("upcall miss") and \
                _FLOOD_PAYLOAD.fullmatch(packet.data[42:]):
            found = _QUEUED.match(packet.comments[-1])  # the kernel side's comment is last
            assert found, packet.comments
            delays.append(float(found[1]) / 1000)
    assert delays, "no flood packet got through once ovs-vswitchd continued"
    # The first packet sent waited longest: from its send (a millisecond before its
    # enqueue) until a handler read it after SIGCONT. Under TCG the handlers take seconds
    # to get through what queued meanwhile, the more with the flow-op probes of outcomes
    # attached (a uprobe per put and execute): one run read it 2.7 s after SIGCONT.
    longest = failed_run.longest_wait_s
    assert longest - 0.5 < max(delays) < longest + 5, (max(delays), longest)
    assert longest > 5  # the stop was long enough to tell from ordinary delays


# ---------------------------------------------------------------------------------------------
# Outcomes: what the handlers did with the upcalls, as OVS's dpif:dbg log says it (lib/dpif.c
# log_flow_message(), log_execute_message()):
#   <dpif>: [failed to ]put[create] [(error) ]ufid:<uuid> <verbose megaflow>, actions:<actions>
#   <dpif>: [failed to ]execute <actions>[ failed (error)] on packet <flow_format()>
#    with metadata <key> mtu <n>

_LOG_PUT = re.compile(
    r"^(?P<time>\S+?)\|\d+\|dpif\((?P<thread>handler\d+)\)\|DBG\|(?P<dpif>\S+): "
    r"(?:failed to )?put\[create\] (?:\([^)]*\) )?ufid:(?P<ufid>[0-9a-f-]{36}) "
    r"(?P<megaflow>.*), actions:(?P<actions>.*)$")
_LOG_EXECUTE = re.compile(
    r"^(?P<time>\S+?)\|\d+\|dpif\((?P<thread>handler\d+)\)\|DBG\|(?P<dpif>\S+): "
    r"(?:failed to )?execute (?P<actions>.*?)(?: failed \([^)]*\))? on packet (?P<packet>.*)$")


@dataclass
class CapturedOutcome:
    frame: int  # from 1
    thread: str
    key: bytes
    mask: bytes | None
    text: str  # the outcome comment


@dataclass
class Outcomes:
    # Logged by handlers while the tool listened, and for the upcalls at its edge (below)
    puts: list[re.Match[str]]
    executes: list[re.Match[str]]
    captured: list[CapturedOutcome]


# How long after `stop` a handler's op may come for an upcall the capture caught before
# it: the outcome window (250 ms), with room.
EDGE_S = 1.0


@pytest.fixture(scope="module")
def outcomes(guest: GuestRun) -> Outcomes:
    from upcall_capture import comment

    start = (guest.results / "capture-start").read_text().strip()
    stop = (guest.results / "capture-stop").read_text().strip()
    # The tool stops a moment after `stop` is taken, and may catch an upcall in between
    # (one CI run caught two, 19 and 30 ms after it, which the log's window left out).
    stop_ns = round(_wall(stop) * 1e9)
    captured = []
    for frame, (packet, _) in enumerate(read_packets(guest.results / "capture.pcapng"), 1):
        if packet.timestamp_ns >= stop_ns:
            break  # in time order: the rest came after the window too
        thread = re.search(r" thread=(\S+) ", packet.comments[0])[1]
        captured.append(CapturedOutcome(frame, thread, packet.key, packet.mask,
                                        packet.comments[1]))
    # An upcall caught just before `stop` has its ops logged just after it (one CI run:
    # an upcall at the very millisecond of `stop`, its put and execute 3 ms later). Those
    # ops count as the window's, as match_upcalls counts the upcalls at its edges: a put
    # by its ufid on a captured packet, and each handler's executes in order, as many as
    # its captured ones beyond the window's.
    log = (guest.results / "ovs-vswitchd.log").read_text().splitlines()
    start_s, stop_s = _wall(start), _wall(stop)
    puts, executes, puts_after, executes_after = [], [], [], []
    for line in log:
        for pattern, within, after in ((_LOG_PUT, puts, puts_after),
                                       (_LOG_EXECUTE, executes, executes_after)):
            if (m := pattern.match(line)) and start_s < (at := _wall(m["time"])) \
                    <= stop_s + EDGE_S:
                (within if at < stop_s else after).append(m)
    read = [(item, comment.parse_outcome(item.text)) for item in captured]
    ufids = {outcome.ufid for _, outcome in read if outcome is not None}
    puts += [m for m in puts_after if m["ufid"] in ufids]
    for thread in sorted({m["thread"] for m in executes + executes_after}):
        beyond = sum(1 for item, outcome in read if item.thread == thread
                     and outcome is not None and outcome.execute_actions is not None) \
            - sum(1 for m in executes if m["thread"] == thread)
        executes += [m for m in executes_after if m["thread"] == thread][:max(beyond, 0)]
    return Outcomes(puts, executes, captured)


def test_the_traffic_made_puts_and_executes_on_two_handlers(outcomes: Outcomes) -> None:
    assert len(outcomes.puts) >= 10 and len(outcomes.executes) >= 10
    assert len({m["thread"] for m in outcomes.puts + outcomes.executes}) == 2, \
        "the guest's OVS should run two handler threads"
    assert any("ct(" in m["actions"] for m in outcomes.puts), "no conntrack flow put"


def test_every_logged_put_is_on_its_upcall_with_ovs_megaflow_and_actions(
        outcomes: Outcomes) -> None:
    from upcall_capture import comment
    from upcall_capture.actions import format_megaflow

    by_ufid: dict[str, list[CapturedOutcome]] = {}
    for item in outcomes.captured:
        read = comment.parse_outcome(item.text)
        assert read is not None, f"frame {item.frame}: not an outcome: {item.text!r}"
        if read.ufid:
            by_ufid.setdefault(read.ufid, []).append(item)
    wrong = []
    for put in outcomes.puts:
        found = by_ufid.pop(put["ufid"], [])
        if len(found) != 1:
            wrong.append(f"ufid:{put['ufid']} ({put['thread']}) on {len(found)} packets")
            continue
        item = found[0]
        read = comment.parse_outcome(item.text)
        verbose = format_megaflow(item.key, item.mask, verbose=True)
        if (item.thread, verbose, read.put_actions) != (put["thread"], put["megaflow"],
                                                        put["actions"]):
            wrong.append(f"frame {item.frame} ufid:{put['ufid']}:\n"
                         f"  OVS:  {put['thread']} {put['megaflow']} actions:{put['actions']}\n"
                         f"  tool: {item.thread} {verbose} actions:{read.put_actions}")
        if read.megaflow != format_megaflow(item.key, item.mask):
            wrong.append(f"frame {item.frame}: the comment's megaflow is not the mask's")
    wrong += [f"frame {item.frame}: ufid:{ufid} put by no handler in OVS's log"
              for ufid, items in by_ufid.items() for item in items]
    assert not wrong, _listing(wrong)


def test_every_logged_execute_is_on_its_upcall_in_handler_order(
        guest: GuestRun, outcomes: Outcomes) -> None:
    from upcall_capture import comment

    wrong = []
    for thread in sorted({m["thread"] for m in outcomes.executes}):
        logged = [m for m in outcomes.executes if m["thread"] == thread]
        executed = [item for item in outcomes.captured if item.thread == thread and
                    comment.parse_outcome(item.text).execute_actions is not None]
        if len(logged) != len(executed):
            wrong.append(f"{thread}: OVS logged {len(logged)} executes, the capture has "
                         f"{len(executed)}")
            continue
        for execute, item in zip(logged, executed, strict=True):
            actions = comment.parse_outcome(item.text).execute_actions
            described = LoggedUpcall(execute["time"], thread, execute["dpif"], "", "",
                                     execute["packet"])
            problems = packet_disagreements(described, guest.captured[item.frame - 1])
            if actions != execute["actions"] or problems:
                wrong.append(f"frame {item.frame} ({thread}): OVS executed "
                             f"{execute['actions']} on {execute['packet']}; the tool says "
                             f"{actions}; {'; '.join(problems)}")
    assert not wrong, _listing(wrong)


def test_outcomes_are_unknown_only_where_no_later_op_could_settle_them(
        outcomes: Outcomes) -> None:
    # An upcall its handler did nothing for (a controller action upcall, say) is settled
    # by the handler's next op; after a handler's last op, only the window closes.
    from upcall_capture import comment

    kinds = [(item, comment.parse_outcome(item.text).kind) for item in outcomes.captured]
    assert sum(1 for _, kind in kinds if kind == "put") == len(outcomes.puts)
    last_op = {item.thread: item.frame for item, kind in kinds if kind in ("put", "execute")}
    early = [f"frame {item.frame} ({item.thread}): {item.text}" for item, kind in kinds
             if kind == "unknown" and item.frame < last_op.get(item.thread, 0)]
    assert not early, _listing(early)
