"""Command line: parse, check, then wire the probe, the outputs and the capture loop."""

from __future__ import annotations

import argparse
import functools
import mmap
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable

from upcall_capture import (
    __version__,
    groups,
    pcapng,
    privileges,
    readback,
    target,
    top,
    tuning,
    workers,
)
from upcall_capture.actions import format_actions
from upcall_capture.capture import (
    Capture,
    InlineBlocks,
    PcapngOutput,
    PooledBlocks,
    Rotation,
    UserspaceFiltered,
    clock_offset_ns,
    rotated_name,
)
from upcall_capture.errors import CaptureError, UsageError
from upcall_capture.filters import FilterSpec, compile_filters
from upcall_capture.flowkey import format_key
from upcall_capture.follow import Follower
from upcall_capture.kernel_side import KernelSide
from upcall_capture.outcomes import WINDOW_NS, HandlerOps
from upcall_capture.ports import PortNames, dpctl_show, no_port_names, parse_dpctl_show
from upcall_capture.probe import kernel_probe, loader, ops_probe
from upcall_capture.probe.record import (
    DEFAULT_KEY_CAP,
    DEFAULT_SNAPLEN,
    MAX_KEY_CAP,
    MAX_SNAPLEN,
    MIN_KEY_CAP,
)
from upcall_capture.sink import open_file, open_stdout
from upcall_capture.stats import StatsOutput, UpcallStats, as_json, as_text
from upcall_capture.upcall_blocks import UpcallBlocks
from upcall_capture.view import ConsoleOutput, ConsolePrinter, from_record

PROG = "upcall-capture"

EXAMPLES = f"""\
examples:
  # capture from the running ovs-vswitchd into a file, until Ctrl-C
  {PROG} -w upcalls.pcapng
  # one process, stop after 1000 upcalls
  {PROG} -p 1234 -w out.pcapng -c 1000
  # one line per upcall on the terminal
  {PROG}
  # watch live in Wireshark, or tshark
  {PROG} -w - | wireshark -k -i -
  {PROG} -w - | tshark -i -
  # only the flow misses of one datapath
  {PROG} -w x.pcapng --filter dpif=system@ovs-system,type=miss
  # TCP port 80 upcalls from either of two ports
  {PROG} -w x.pcapng --filter port=eth0 --filter port=eth1 tcp port 80
  # a ring of ten files of 100 MB; a new file every hour
  {PROG} -w x.pcapng -C 100 -W 10
  {PROG} -w x.pcapng -G 3600
  # read a capture back with the keys, action upcalls only
  {PROG} -r x.pcapng -v --filter type=action
  # the upcalls whose handler installed no flow, with what it did instead
  {PROG} -r x.pcapng -v --filter outcome=none --filter outcome=execute
  # what an upcall storm was made of: ports, sources, protocols, handlers...
  {PROG} -r x.pcapng --stats
  # ...counted by source /16 and destination port together
  {PROG} -r x.pcapng --stats --stats-by ipv4.src/16,tp_dst
  # watch a storm live, full screen (q quits), writing it to a file too
  {PROG} --top -w x.pcapng
  # replay a capture's storm in that view
  {PROG} -r x.pcapng --top
  # print a netlink flow key (from a log) as OVS does
  {PROG} --decode-key 0800030001000000
  # print a netlink actions list as OVS does
  {PROG} --decode-actions 0800010002000000
"""


def _ranged(low: int, high: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} must be from {low} to {high}, not {value}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, like every other error, instead of argparse's usage block.
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def _group(text: str) -> groups.Group:
    try:
        return groups.parse_group(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--stats-by: ")) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Capture Open vSwitch upcalls (the dpif_recv:recv_upcall USDT probe of "
                    "ovs-vswitchd) into pcapng, with each upcall's flow key as a packet comment.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target_group = parser.add_argument_group("target")
    target_group.add_argument(
        "-p", "--pid", type=_ranged(1, 2**22, "pid"),
        help="trace this ovs-vswitchd (default: the only one running)")
    target_group.add_argument(
        "--follow", action="store_true",
        help="when the traced ovs-vswitchd exits, wait for a new one and go on in the same "
             "output, the first upcall after the gap carrying a comment that says so. The "
             "new one is, without -p, the only process named ovs-vswitchd; with -p, the "
             "process running the same executable (/proc/PID/exe) as the traced one. "
             "Either way it must have started after the traced one; while there are none "
             "or several, the capture waits (Ctrl-C ends it); one without the probe is "
             "passed over. Needs root throughout: not with -Z")
    target_group.add_argument(
        "-Z", dest="user", metavar="USER",
        help="once the probe is attached and the file open, run as USER (keeping only the "
             "CAP_BPF and CAP_PERFMON capabilities it needs to read the probe's counters)")

    output = parser.add_argument_group("output")
    output.add_argument(
        "-w", dest="write", metavar="FILE",
        help="write pcapng to FILE ('-' for standard output; a name ending in .gz is "
             "gzip-compressed, which Wireshark opens as is); without it, print one line per "
             "upcall")
    output.add_argument(
        "--overwrite", action="store_true",
        help="replace FILE if it exists (by default an existing file is never overwritten)")
    output.add_argument(
        "--print", action="store_true", dest="print_lines",
        help="print one line per upcall on standard output even with -w or --stats")
    output.add_argument(
        "--no-port-names", action="store_true",
        help="do not ask ovs-vswitchd (ovs-appctl dpctl/show) for datapath port names")
    output.add_argument(
        "-r", dest="read", metavar="FILE",
        help="read upcalls from FILE (this tool's pcapng, or any pcap or pcapng, gzipped or "
             "not) instead of capturing; with -w, write the selected ones to a new file")
    output.add_argument(
        "-v", "--verbose", action="store_true",
        help="print each upcall's flow key, as OVS prints it, under its line")
    output.add_argument("-x", dest="hexdump", action="store_true",
                        help="print each packet in hex under its line")
    output.add_argument("--decode", action="store_true",
                        help="print scapy's full dissection of each packet")
    output.add_argument(
        "--stats", action="store_true",
        help="at the end, print counts by type and datapath, the top values of field groups "
             "(in_port, eth_type, IPv4 and IPv6 addresses and their /24 and /64 prefixes, "
             "proto with tp_dst, tunnel id and remote, recirc_id, ct_state, handler "
             "thread) with their shares, the top flow keys and the upcall rate per second; "
             "counts stay in bounded memory, and a table that had to drop values says how "
             "far off its counts may be")
    output.add_argument(
        "--stats-by", action="append", metavar="FIELD[,FIELD]", type=_group,
        help="with --stats or --top, count by these groups instead of the default ones: a "
             "field --filter knows (and tunnel.tun_id, tunnel.src, tunnel.dst), an address "
             "with /PREFIX, or fields counted together, e.g. ipv4.src/16 or "
             "ipv4.src,tp_dst; may be repeated")
    output.add_argument("--stats-format", choices=("text", "json"), default="text",
                        help="text (default) or json, for scripts")
    output.add_argument("--stats-top", type=_ranged(1, 10000, "--stats-top"), default=10,
                        metavar="N",
                        help="how many values of each group and flow keys --stats lists "
                             "(default 10)")
    output.add_argument(
        "--top", action="store_true",
        help="a live full-screen view on the terminal, refreshed every second: the upcall "
             "rate by type and datapath, the top values of the field groups over the last "
             f"{top.WINDOW_S} seconds, the capture's own losses and the ring's fill; q "
             "quits. With -r, the file is played at the pace of its own time")

    capture = parser.add_argument_group("capture")
    capture.add_argument(
        "-c", "--count", type=_ranged(1, 2**63, "count"),
        help="stop after writing this many upcalls")
    capture.add_argument(
        "--duration", type=_positive_float, metavar="SECONDS",
        help="stop after this many seconds")
    output.add_argument(
        "-C", dest="file_size", type=_ranged(1, 10**6, "-C"), metavar="MB",
        help="start a new file when the current one reaches MB million bytes; files are "
             "named FILE with -NNN before the extension (out-000.pcapng, out-001.pcapng...)")
    output.add_argument(
        "-G", dest="rotate_seconds", type=_ranged(1, 10**7, "-G"), metavar="SECONDS",
        help="start a new file every SECONDS seconds (named as with -C)")
    output.add_argument(
        "-W", dest="file_count", type=_ranged(1, 10**6, "-W"), metavar="N",
        help="with -C or -G, keep a ring of N files, reusing the oldest name")
    capture.add_argument(
        "-s", "--snaplen", type=_ranged(1, MAX_SNAPLEN, "snaplen"), default=DEFAULT_SNAPLEN,
        help=f"copy at most this many bytes of each packet (default {DEFAULT_SNAPLEN}, "
             f"max {MAX_SNAPLEN}: a 9000-byte jumbo frame fits)")
    capture.add_argument(
        "--key-size", type=_ranged(MIN_KEY_CAP, MAX_KEY_CAP, "key size"),
        default=DEFAULT_KEY_CAP, metavar="BYTES",
        help=f"copy at most this many bytes of each flow key (default {DEFAULT_KEY_CAP}, "
             f"from {MIN_KEY_CAP} to {MAX_KEY_CAP})")
    capture.add_argument(
        "--workers", type=_ranged(0, 256, "--workers"), metavar="N",
        default=workers.default_count(),
        help="processes that describe upcalls (decode keys, write comments) beside the one "
             "that reads the probe and writes the file (default: one for each core but one, "
             f"at least one and at most {workers.DEFAULT_MAX_WORKERS}); 0 does it all in one "
             "process. When they fall behind, upcalls are written without their key's text, "
             "which the comment says, rather than lost; -r FILE -w NEW writes the text in")
    kernel = capture.add_mutually_exclusive_group()
    kernel.add_argument(
        "--kernel", action="store_true",
        help="require the kernel side: failed upcalls (the datapath's lost: counter) in the "
             "capture, and each upcall's queueing delay. By default it is used where the "
             "kernel has it (the openvswitch module's ovs_dp_upcall tracepoint, Linux 5.14 "
             "and later), and one line says when it is not")
    kernel.add_argument(
        "--no-kernel", action="store_true",
        help="capture only the upcalls ovs-vswitchd received (recv_upcall), not the "
             "kernel side")
    outcomes = capture.add_mutually_exclusive_group()
    outcomes.add_argument(
        "--outcomes", action="store_true",
        help="require outcomes: what the handler did with each upcall (the flow it put, "
             "with megaflow, actions and ufid, or the packet it executed) and how long "
             "after receiving it, in a comment line of each packet. By default they are "
             "captured where ovs-vswitchd has the probes dpif_netlink_operate__:op_flow_put "
             "and op_flow_execute, and one line says when it has not")
    outcomes.add_argument(
        "--no-outcomes", action="store_true",
        help="do not capture outcomes (each upcall is then written without waiting up to "
             "the outcome window for its handler's flow operations)")
    capture.add_argument(
        "--outcome-window", type=_ranged(1, 60_000, "--outcome-window"), metavar="MS",
        help="how long an upcall waits for what its handler did, in milliseconds "
             f"(default {WINDOW_NS // 1_000_000}); past it, an upcall that saw no flow "
             "operation says its outcome is unknown. Longer for the handlers of a loaded "
             "host, shorter to see packets sooner")
    capture.add_argument(
        "--buffer-pages", type=_ranged(1, 1 << 20, "buffer pages"), metavar="PAGES",
        default=loader.DEFAULT_BUFFER_PAGES,
        help="pages in the ring buffer that all CPUs share, a power of two (default "
             f"{loader.DEFAULT_BUFFER_PAGES}, that is 64 MiB of locked memory)")

    selection = parser.add_argument_group(
        "filters",
        "What to capture, decided inside the probe before anything is copied where possible. "
        "Terms of one --filter (comma-separated) must all match; a repeated --filter adds an "
        "alternative (OR). The packet filter (trailing arguments, tcpdump's language, compiled "
        "by libpcap for Ethernet or, for L3 upcalls, raw IP) must match too.")
    selection.add_argument(
        "--filter", action="append", metavar="EXPR",
        help="name=value terms: dpif=, type=miss|action|N, in_port=N, port=NAME, pid=, tid=, "
             "result=ok|failed|any|ERRNO (failed upcalls are the kernel side's), "
             "outcome=put|execute|none|unknown (what the handler did; execute: executed "
             "with no flow installed), "
             "thread=, and key fields recirc_id, eth_type, proto, tp_src, tp_dst (numbers take "
             "/MASK), ipv4.src, ipv4.dst, ipv6.src, ipv6.dst (with /PREFIX), ct_state (N[/M] "
             "or flags like +trk+est-new)")
    selection.add_argument(
        "expression", nargs="*", metavar="EXPRESSION",
        help="a packet filter as tcpdump takes it, e.g. tcp port 80")

    tools = parser.add_argument_group("tools")
    tools.add_argument(
        "--decode-key", metavar="HEX",
        help="print the OVS text of a netlink flow key given in hex, and exit; '-' reads "
             "one key per line from standard input ('-' alone on a line is an empty key)")
    tools.add_argument(
        "--decode-actions", metavar="HEX",
        help="print the OVS text of a netlink datapath actions list given in hex, and "
             "exit; '-' reads one list per line ('-' alone on a line is an empty one: drop)")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.decode_key is not None:
            return decode_hex(args.decode_key, format_key, "flow key")
        if args.decode_actions is not None:
            return decode_hex(args.decode_actions, format_actions, "actions list")
        argv = argv if argv is not None else sys.argv[1:]
        if args.read is not None:
            return read_back(args, argv)
        return capture(args, argv)
    except (UsageError, CaptureError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return err.exit_status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Standard output's reader left (| head): stop quietly, as tcpdump does, and keep
        # Python from complaining when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def decode_hex(source: str, describe: Callable[[bytes], str], what: str) -> int:
    """--decode-key, --decode-actions: hex in (or one per line from stdin), OVS text out."""
    lines: Iterable[str] = sys.stdin if source == "-" else [source]
    for number, line in enumerate(lines, 1):
        line = line.strip()
        try:
            data = b"" if line == "-" else bytes.fromhex(line)
        except ValueError:
            raise UsageError(f"line {number}: not a hex {what}: {line[:40]!r}") from None
        sys.stdout.write(describe(data) + "\n")
    sys.stdout.flush()
    return 0


def capture(args: argparse.Namespace, argv: list[str]) -> int:
    if args.buffer_pages & (args.buffer_pages - 1):
        raise UsageError(f"--buffer-pages must be a power of two, not {args.buffer_pages}")
    rotation = _rotation(args)
    user = privileges.user_ids(args.user) if args.user else None
    if args.follow and user is not None:
        raise UsageError("--follow cannot be used with -Z: attaching to a new "
                         f"{target.VSWITCHD} needs root")
    _check_views(args)
    # Every option is checked before the target is looked up, but port=NAME asks it.
    find_target = functools.cache(
        lambda: target.process(args.pid) if args.pid else target.find_vswitchd())
    spec = _compile_filters(args, lambda: dpctl_show(find_target().pid))
    if args.no_outcomes and spec and spec.needs_outcome:
        raise UsageError("--filter outcome=... needs outcomes: drop --no-outcomes")
    if args.no_outcomes and args.outcome_window is not None:
        raise UsageError("--outcome-window needs outcomes: drop --no-outcomes")
    loader.check_environment()
    process = find_target()
    target.check_probe(process)
    if args.outcomes or (spec and spec.needs_outcome):
        _check_ops_probes(args, process.pid)

    # Asked of the process traced at the time: with --follow, the successor. Asked once
    # now, while it answers: upcalls fail when ovs-vswitchd is stuck, and then it does not.
    known_ports = "" if args.no_port_names else dpctl_show(process.pid)
    port_name = no_port_names if args.no_port_names else \
        PortNames(lambda: dpctl_show(run.target_pid), known=known_ports).name
    offset = clock_offset_ns()
    outputs = []
    sink = None
    if args.write is not None:
        first = rotated_name(args.write, 0, args.file_count) if rotation else args.write
        sink = open_stdout() if args.write == "-" else open_file(first, overwrite=args.overwrite)
    if _prints_lines(args):
        outputs.append(ConsoleOutput(_printer(args), clock_offset_ns=offset,
                                     port_name=port_name))
    def to_captured(record: bytes):
        return from_record(record, offset, port_name)

    group_list = _groups(args)
    stats = UpcallStats(group_list) if args.stats else None
    if stats is not None:
        outputs.append(StatsOutput(stats, to_captured))
    top_view = None
    if args.top:
        window = top.TopWindow(group_list)
        outputs.append(top.TopOutput(window, to_captured))
        top_view = top.TopView(window, f"{PROG} --top: {process.comm} (pid {process.pid})",
                               lambda: time.time_ns() // top.NS_PER_S, args.stats_top)

    def make_probe(pid: int) -> loader.RecvUpcallProbe | UserspaceFiltered:
        probe = loader.RecvUpcallProbe(
            pid, snaplen=args.snaplen, key_cap=args.key_size,
            buffer_pages=args.buffer_pages,
            filter_c=spec.bpf_c if spec else loader.MATCH_ALL,
        )
        return UserspaceFiltered(probe, spec.userspace) if spec and spec.userspace else probe

    probe = make_probe(process.pid)
    status = StatusLine(sys.stderr, outputs) if sink is not None and sink.truncatable \
        and sys.stderr.isatty() and top_view is None else None

    def say(text: str) -> None:
        if top_view is not None:
            top_view.notes.append(text)  # stderr would scribble over the screen
        else:
            print(f"{PROG}: {text}", file=sys.stderr, flush=True)

    follower = Follower(
        process, same_exe=args.pid is not None, make_probe=make_probe, say=say,
        attached=tuning.after_attach,
    ) if args.follow else None
    progress = status if top_view is None else \
        top.LiveStatus(top_view, lambda: run.probe.peak_fill())
    run = Capture(probe, outputs, target_pid=process.pid, count=args.count,
                  duration=args.duration, progress=progress, follower=follower,
                  max_pending=workers.MAX_IN_FLIGHT if args.workers else 8192)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: run.request_stop(
            signal.Signals(signum).name))
    tuning.before_attach()
    try:
        probe.attach()
        run.kernel = _kernel_side(args, spec, lambda: dpctl_show(run.target_pid), say)
        run.ops = _handler_ops(args, spec, process.pid, say)
    except UsageError:
        if sink is not None:
            sink.discard()
        raise
    tuning.after_attach(process.pid)

    def work() -> int:
        pool = None
        if sink is not None:
            if_filter = spec.if_filter if spec else None
            if args.workers:
                pool = workers.WorkerPool(args.workers, workers.BlockSettings(
                    snaplen=args.snaplen, clock_offset_ns=offset, if_filter=if_filter,
                    port_names=not args.no_port_names,
                    known_ports=(process.pid, known_ports)))
                builder = PooledBlocks(pool, pool.settings, lambda: run.target_pid)
                run.describers = pool
            else:
                builder = InlineBlocks(lambda: UpcallBlocks(
                    snaplen=args.snaplen, clock_offset_ns=offset, port_name=port_name,
                    if_filter=if_filter))
            outputs.insert(0, PcapngOutput(
                builder, sink, _section_header(argv, run.kernel), rotation=rotation,
                datapath_comments=lambda: _datapath_comments(run.kernel),
                open_next=lambda index: open_file(
                    rotated_name(args.write, index, args.file_count),
                    # A ring reuses the names this run made.
                    overwrite=args.overwrite or index >= (args.file_count or index + 1)),
            ))
        if status is not None:
            status.pool = pool
        print(f"{PROG}: listening on {target.PROBE_PROVIDER}:{target.PROBE_NAME} in "
              f"{process.comm} (pid {process.pid}), snapshot length {args.snaplen} bytes, "
              f"key size {args.key_size} bytes", file=sys.stderr, flush=True)
        screen = None
        if top_view is not None:
            screen = top.TopScreen(top_view.lines, lambda: run.request_stop("q pressed"))
            screen.start()
        try:
            summary = run.run()
        finally:
            if screen is not None:
                screen.close()
            if pool is not None:
                pool.close()
        if status is not None:
            status.clear()
        return _report(summary, run, outputs, stats, args, pool)

    try:
        return work() if user is None else privileges.run_as(*user, work)
    finally:
        run.probe.close()  # with --follow, the last one attached
        if run.kernel is not None:
            run.kernel.close()
        if run.ops is not None:
            run.ops.close()


def _kernel_side(args: argparse.Namespace, spec: FilterSpec | None, show, say
                 ) -> KernelSide | None:
    """The kernel side, attached; or None, said in one line (an error with --kernel)."""
    if args.no_kernel:
        return None
    reason = kernel_probe.unavailable()
    if reason is None:
        kernel = KernelSide(kernel_probe.KernelProbe(), show,
                            keep=(lambda upcall: spec.matches(upcall, True)) if spec else None)
        try:
            kernel.attach()
            return kernel
        except UsageError as err:
            reason = str(err)
    if args.kernel:
        raise UsageError(f"--kernel: the kernel side is unavailable: {reason}")
    say(f"kernel side unavailable ({reason}): capturing the upcalls ovs-vswitchd receives, "
        "without failed upcalls or queueing delays")
    return None


def _check_ops_probes(args: argparse.Namespace, pid: int) -> None:
    """Outcomes are required: the process must have their probes."""
    missing = ops_probe.missing_probes(pid)
    if missing:
        raise UsageError(f"{'--outcomes' if args.outcomes else '--filter outcome='}: "
                         f"outcomes are unavailable: {_no_probes(missing)}")


def _no_probes(missing: list[str]) -> str:
    return f"the process has no {' or '.join(missing)} probe"


def _handler_ops(args: argparse.Namespace, spec: FilterSpec | None, pid: int, say
                 ) -> HandlerOps | None:
    """The flow put and execute probes, attached; or None, said in one line (an error
    with --outcomes)."""
    keep = spec.matches if spec and spec.needs_outcome else None
    if args.no_outcomes:
        return None
    missing = ops_probe.missing_probes(pid)
    reason = _no_probes(missing) if missing else None
    if reason is None:
        window_ns = WINDOW_NS if args.outcome_window is None else \
            args.outcome_window * 1_000_000
        ops = HandlerOps(ops_probe.OpsProbe(pid), keep=keep, window_ns=window_ns)
        try:
            ops.attach()
            return ops
        except UsageError as err:
            reason = str(err)
    if args.outcomes or keep:
        raise UsageError(f"{'--outcomes' if args.outcomes else '--filter outcome='}: "
                         f"outcomes are unavailable: {reason}")
    say(f"outcomes unavailable ({reason}): upcalls are written without what the handler "
        "did with them")
    return None


def _datapath_comments(kernel: KernelSide | None) -> dict[str, str]:
    """The ISBs' comments: each datapath's lost: counter at the start and the end."""
    if kernel is None:
        return {}
    return {lost.dpif: f"datapath {lost.dpif} lost: {lost.start} at the start of the "
                       f"capture, " + (f"{lost.end} at its end" if lost.end is not None
                                       else "unreadable at its end")
            for lost in kernel.lost}


def _report(summary, run: Capture, outputs: list, stats: UpcallStats | None,
            args: argparse.Namespace, pool: workers.WorkerPool | None) -> int:
    """The closing lines on stderr (and --stats); the exit status."""
    ended = [output for output in outputs if output.ended]
    if summary.stop_reason == run.TARGET_EXITED or ended:
        print(f"{PROG}: {summary.stop_reason}", file=sys.stderr)
    line = summary.line()
    failed = [output for output in ended if getattr(output, "error", None)]
    if failed:
        line += f"; {failed[0].written} written to {args.write}"
    if pool is not None:
        line += f"; {_workers_busy(pool)}"
    print(f"{PROG}: {line}", file=sys.stderr)
    if summary.lost:
        print(f"{PROG}: {_ring_was_full(summary.lost, args.buffer_pages)}", file=sys.stderr)
    for kernel_line in summary.kernel or ():
        print(f"{PROG}: {kernel_line}", file=sys.stderr)
    if summary.outcomes:
        print(f"{PROG}: {summary.outcomes}", file=sys.stderr)
    if stats is not None:
        _print_stats(stats, args)
    return failed[0].error.exit_status if failed else 0


def _ring_was_full(lost: int, pages: int) -> str:
    """What `lost` means, and what to do about it: the probe counts an upcall lost only
    when the ring had no room for its record, in a burst longer than the ring holds or a
    storm faster than the capture."""
    kib = pages * mmap.PAGESIZE // 1024
    size = f"{kib // 1024} MiB" if kib >= 1024 else f"{kib} KiB"
    return (f"{lost} upcalls lost: the {size} ring buffer (--buffer-pages {pages}) was "
            "full; a larger one holds a longer burst, and --filter or --no-outcomes make a "
            "capture lighter")


def _workers_busy(pool: workers.WorkerPool) -> str:
    count = len(pool.workers)
    return f"{count} worker{'' if count == 1 else 's'} {pool.busy():.0%} busy"


class StatusLine:
    """One line on a terminal's stderr, rewritten in place about once a second."""

    def __init__(self, stream, outputs) -> None:
        self.stream = stream
        self.outputs = outputs
        self.pool: workers.WorkerPool | None = None
        self._last = (0, 0.0)

    def __call__(self, captured: int, counters: loader.Counters, elapsed: float) -> None:
        rate = (captured - self._last[0]) / max(elapsed - self._last[1], 1e-9)
        self._last = (captured, elapsed)
        output = self.outputs[0]
        size = output.sink.good_bytes / 1e6
        line = (f"\r\033[K{captured} captured, {counters.lost} lost, "
                f"{counters.filtered} filtered, {rate:,.0f}/s, {elapsed:,.0f} s, {size:,.1f} MB")
        if self.pool is not None:
            line += f", {output.undecoded} without key text, {_workers_busy(self.pool)}"
        self.stream.write(line)
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\033[K")
        self.stream.flush()


def _compile_filters(args: argparse.Namespace, dpctl_text) -> FilterSpec | None:
    """The --filter and packet filter, or None; notes said once on stderr."""
    expression = " ".join(args.expression)
    if not args.filter and not expression.strip():
        return None

    def port_lookup(name: str) -> tuple[str, int] | None:
        if dpctl_text is None:
            raise UsageError("port=NAME needs a running ovs-vswitchd to name ports; "
                             "use dpif=...,in_port=N")
        ports = parse_dpctl_show(dpctl_text())
        return next((dpif_port for dpif_port, port in ports.items() if port == name), None)

    spec = compile_filters(args.filter or [], expression or None, port_lookup=port_lookup)
    for note in spec.notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    return spec


def _rotation(args: argparse.Namespace) -> Rotation | None:
    if args.file_size is None and args.rotate_seconds is None:
        if args.file_count is not None:
            raise UsageError("-W needs -C or -G")
        return None
    if args.write in (None, "-"):
        raise UsageError("-C and -G need -w FILE")
    return Rotation(
        max_bytes=args.file_size * 1_000_000 if args.file_size else None,
        interval_ns=args.rotate_seconds * 1_000_000_000 if args.rotate_seconds else None,
        ring=args.file_count,
    )


def _groups(args: argparse.Namespace) -> tuple[groups.Group, ...]:
    """What --stats and --top count by: --stats-by, or the default groups."""
    return tuple(args.stats_by or groups.DEFAULT_GROUPS)


def _check_views(args: argparse.Namespace) -> None:
    """--stats-by, --top and --print: what they need and what they exclude."""
    if args.stats_by and not (args.stats or args.top):
        raise UsageError("--stats-by needs --stats or --top")
    if not args.top:
        return
    if args.write == "-":
        raise UsageError("--top needs the terminal: not with -w -")
    if args.print_lines:
        raise UsageError("--top and --print both need the terminal")
    top.check_terminal(sys.stdout)


def read_back(args: argparse.Namespace, argv: list[str]) -> int:
    _check_views(args)
    spec = _compile_filters(args, None)
    sink = None
    if args.write is not None:
        sink = open_stdout() if args.write == "-" else open_file(args.write,
                                                                 overwrite=args.overwrite)
        sink.write(_section_header(argv))
    group_list = _groups(args)
    stats = UpcallStats(group_list) if args.stats else None
    consumers = [_printer(args).show] if _prints_lines(args) else []
    if stats is not None:
        consumers.append(stats.add)

    def keep(item) -> bool:
        # A packet from another tool's file has no key: its interface's link type says.
        upcall = item.upcall
        return spec.matches(upcall, None if upcall.key else
                            item.linktype == pcapng.LINKTYPE_ETHERNET)

    def read(items) -> readback.ReadBackDone:
        return readback.read_back(items, keep=keep if spec is not None else None, sink=sink,
                                  consumers=consumers, limit=args.count)

    items = readback.read_upcalls(args.read)
    done = read(items) if not args.top else _read_back_on_top(args, items, group_list,
                                                              consumers, read)
    if sink is not None:
        sink.close()
        decoded = f", {done.decoded} keys decoded now" if done.decoded else ""
        print(f"{PROG}: {done.count} upcalls written to {args.write}{decoded}", file=sys.stderr)
    if stats is not None:
        _print_stats(stats, args)
    return 0


def _read_back_on_top(args: argparse.Namespace, items, group_list, consumers: list,
                      read) -> readback.ReadBackDone:
    """-r with --top: the file played into the view at the pace of its own time; at its
    end the view stays until q."""
    replay = top.Replay()
    stopped = threading.Event()
    window = top.TopWindow(group_list)
    consumers.append(window.add)
    view = top.TopView(window, f"{PROG} --top: {args.read}", replay.now_s, args.stats_top)
    view.status = [f"playing {args.read} at the pace of its own time"]
    screen = top.TopScreen(view.lines, stopped.set)
    screen.start()
    try:
        done = read(replay.paced(items, stopped))
        view.status = [f"end of {args.read}: {done.count:,} upcalls read"]
        stopped.wait()
    finally:
        screen.close()
    return done


def _prints_lines(args: argparse.Namespace) -> bool:
    """One line per upcall: without -w (and without --stats or --top, which replace
    them), or with --print."""
    return args.print_lines or (args.write is None and not args.stats and not args.top)


def _printer(args: argparse.Namespace) -> ConsolePrinter:
    return ConsolePrinter(sys.stdout, verbose=args.verbose, hexdump=args.hexdump,
                          dissect=args.decode)


def _print_stats(stats: UpcallStats, args: argparse.Namespace) -> None:
    report = stats.report(args.stats_top)
    text = as_json(report) if args.stats_format == "json" else as_text(report)
    # With -w - the pcapng owns standard output.
    print(text, file=sys.stderr if args.write == "-" else sys.stdout)


def _section_header(argv: list[str], kernel: KernelSide | None = None) -> bytes:
    uname = os.uname()
    comment = shlex.join([PROG, *argv])
    if kernel is not None:
        comment += "".join(f"\ndatapath {dpif} lost: {lost} at the start of the capture"
                           for dpif, lost in sorted(kernel.lost_at_start.items()))
    return pcapng.section_header(
        userappl=f"{PROG} {__version__}",
        os=f"{uname.sysname} {uname.release}",
        hardware=uname.machine,
        comment=comment,
    )
