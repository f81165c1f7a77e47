#!/bin/bash
# The system test's guest side, run as init from the per-run disk (mounted on /run-disk by
# the cached root's /sbin/upcall-system-init). It starts real Open vSwitch on the kernel
# datapath, runs upcall-capture on it while sending traffic through two network namespaces,
# and leaves everything the host checks in /run-disk/results. Then it powers off.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PYTHONPATH=/run-disk/opt/upcall-capture PYTHONDONTWRITEBYTECODE=1
RESULTS=/run-disk/results
OVS_RUN=/var/run/openvswitch
mkdir -p "$RESULTS"
# Run from a copy, so that nothing holds the run disk open when it is unmounted.
if [ "$0" != /tmp/guest-init.sh ]; then
    mount -t tmpfs tmpfs /tmp && cp "$0" /tmp/guest-init.sh && exec /bin/bash /tmp/guest-init.sh
fi

# Each line with the guest's uptime, so that a slow or stuck phase shows in the console.
say() { echo "guest: [$(cut -d" " -f1 /proc/uptime)s] $*"; }

power_off() {
    echo "$1" >"$RESULTS/status"
    ovs-appctl -t ovs-vswitchd exit 2>/dev/null
    ovs-appctl -t ovsdb-server exit 2>/dev/null
    sync
    umount /run-disk || mount -o remount,ro /run-disk
    say "power off (status $1)"
    echo o >/proc/sysrq-trigger
    sleep 60
}

save_state() {
    ovs-appctl dpctl/show >"$RESULTS/dpctl-show.txt" 2>&1
    ovs-dpctl show >"$RESULTS/ovs-dpctl-show.txt" 2>&1
    dmesg >"$RESULTS/dmesg.txt" 2>&1
    cp "$OVS_RUN/ovs-vswitchd.pid" "$RESULTS/" 2>/dev/null
    # The probe sites' argument specs, as the tool reads them: what its BPF reader is
    # written for.
    python3 -c 'import sys; from upcall_capture.target import recv_upcall_sites
for site in recv_upcall_sites(int(sys.argv[1])): print(site.args)' \
        "$(cat "$OVS_RUN/ovs-vswitchd.pid")" >"$RESULTS/probe-args.txt" 2>&1
}

fail() {
    say "FAIL: $*"
    echo "$*" >"$RESULTS/failure"
    save_state
    power_off 1
}

now() { date -u +%Y-%m-%dT%H:%M:%S.%3NZ; }

mount_filesystems() {
    mount -t tmpfs tmpfs /run
    mount -t debugfs debugfs /sys/kernel/debug
    mount -t tracefs tracefs /sys/kernel/tracing
    mount -t bpf bpf /sys/fs/bpf
    ip link set lo up
}

start_ovs() {
    modprobe openvswitch || fail "modprobe openvswitch failed"
    mkdir -p "$OVS_RUN" /etc/openvswitch
    ovsdb-tool create /etc/openvswitch/conf.db /usr/local/share/openvswitch/vswitch.ovsschema
    ovsdb-server --remote=punix:$OVS_RUN/db.sock --pidfile --detach \
        --log-file="$RESULTS/ovsdb-server.log" || fail "ovsdb-server did not start"
    ovs-vsctl --no-wait init
    start_vswitchd
    # Every dpif debug message, the revalidators' flow dumps among them, shares one rate
    # limit of 600 a minute; dumps every 500 ms (the default) use up more than half of it,
    # and on a slow host the upcall messages then get dropped from the log the checks read.
    # Revalidating every 10 s instead leaves the budget to the upcalls.
    ovs-vsctl set Open_vSwitch . other_config:max-revalidator=10000
    ovs-vsctl add-br br0
}

# ovs-vswitchd, with what the database does not keep: the dpif debug log. OVS 3.1 trap:
# add-br right after its start can log "Overriding n-handler-threads to 0", and then the
# kernel drops every upcall; waiting first avoids it most times (check_upcalls_delivered
# restarts it the other times).
start_vswitchd() {
    ovs-vswitchd --pidfile --detach --log-file="$RESULTS/ovs-vswitchd.log" ||
        fail "ovs-vswitchd did not start"
    sleep 2
    ovs-appctl vlog/set dpif:file:dbg
    # The checks read every put and execute in that log. Its rate limit (start_ovs) still
    # dropped some on a slow host, and the notice comes with the next debug message, which
    # may never come: the later runs turn debug off.
    ovs-appctl vlog/disable-rate-limit dpif
}

# The two namespaces and their sysctls: no router solicitations or RAs, and neighbour
# entries that stay reachable for the whole run, so that the kernel sends nothing on its
# own while the capture starts and stops (the checks compare exact sets of upcalls).
make_namespace() {
    local ns=$1 port=$2 v4=$3 v6=$4
    ip netns add "$ns"
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.default.accept_ra=0 \
        net.ipv6.conf.default.router_solicitations=0
    ip link add "$port" type veth peer name eth0 netns "$ns"
    ip netns exec "$ns" sysctl -qw net.ipv4.neigh.eth0.base_reachable_time_ms=3600000 \
        net.ipv6.neigh.eth0.base_reachable_time_ms=3600000
    sysctl -qw "net.ipv6.conf.$port.disable_ipv6=1"
    ovs-vsctl add-port br0 "$port"
    ip link set "$port" up
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip addr add "$v4/24" dev eth0
    ip netns exec "$ns" ip addr add "$v6/64" dev eth0 nodad
    ip netns exec "$ns" ip link set eth0 up
}

# A VLAN 100 subinterface in a namespace, so that tagged frames cross br0 (a trunk port by
# default). IPv4 only: IPv6 would send neighbour discovery of its own at any time.
add_vlan() {
    local ns=$1 v4=$2
    ip netns exec "$ns" ip link add link eth0 name eth0.100 type vlan id 100
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.eth0/100.disable_ipv6=1 \
        net.ipv4.neigh.eth0/100.base_reachable_time_ms=3600000
    ip netns exec "$ns" ip addr add "$v4/24" dev eth0.100
    ip netns exec "$ns" ip link set eth0.100 up
}

# A ping whose upcalls the datapath must not lose. When it loses them, OVS is not receiving
# upcalls (the trap above, seen even after the wait in a CI run): ovs-vswitchd is started
# again, with the bridge and ports the database keeps, up to twice.
check_upcalls_delivered() {
    local attempt before
    for attempt in 1 2 3; do
        before=$(datapath_lost)
        ip netns exec ns-a ping -c 2 -W 5 10.0.0.2 >/dev/null || say "warm-up ping failed"
        say "datapath after warm-up: $(ovs-dpctl show | grep lookups)"
        [ "$(datapath_lost)" = "$before" ] && return 0
        grep -i "n-handler-threads" "$RESULTS/ovs-vswitchd.log" >&2
        [ "$attempt" = 3 ] && break
        say "the datapath lost upcalls: restarting ovs-vswitchd"
        local pid
        pid=$(cat "$OVS_RUN/ovs-vswitchd.pid")
        ovs-appctl exit || fail "ovs-vswitchd did not exit"
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        start_vswitchd
    done
    fail "the datapath lost upcalls before the capture started ($(datapath_lost) lost):" \
         "OVS is not receiving upcalls (OVS 3.1 n-handler-threads trap?), not a fault of" \
         "the tool"
}

# Starts the tool with the given options, writing NAME.pcapng with its stderr in
# NAME.stderr, and waits for it to listen; TOOL_PID is its pid.
start_tool() {
    local name=$1
    shift
    python3 -m upcall_capture "$@" -w "$RESULTS/$name.pcapng" 2>"$RESULTS/$name.stderr" &
    TOOL_PID=$!
    local waited=0
    until grep -q "listening on dpif_recv:recv_upcall" "$RESULTS/$name.stderr"; do
        kill -0 "$TOOL_PID" 2>/dev/null || { cat "$RESULTS/$name.stderr"; fail "the tool ($name) exited early"; }
        [ $waited -ge 600 ] && fail "the tool ($name) did not report listening in 600 s"
        sleep 1
        waited=$((waited + 1))
    done
    say "tool ($name) listening after ${waited}s"
}

# Stops the tool with SIGINT, as an operator would, and keeps its exit status in NAME.exit.
stop_tool() {
    local name=$1
    kill -INT "$TOOL_PID"
    local waited=0
    while kill -0 "$TOOL_PID" 2>/dev/null; do
        [ $waited -ge 120 ] && { kill -KILL "$TOOL_PID"; fail "the tool ($name) did not stop on SIGINT"; }
        sleep 1
        waited=$((waited + 1))
    done
    wait "$TOOL_PID"
    echo $? >"$RESULTS/$name.exit"
}

start_capture() {
    start_tool capture
    now >"$RESULTS/capture-start"
}

stop_capture() {
    # A quiet moment, so that no upcall straddles the end of the window.
    sleep 2
    now >"$RESULTS/capture-stop"
    stop_tool capture
}

# One TCP exchange: a server in ns-b echoes one message from a client in ns-a.
tcp_echo() {
    local addr=$1 port=$2
    ip netns exec ns-b python3 - "$addr" "$port" <<'SERVER' &
import socket
import sys
addr, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((addr, port))
srv.listen()
srv.settimeout(120)  # a client that never came must not hang the guest
conn, _ = srv.accept()
conn.sendall(conn.recv(100))
conn.close()
srv.close()
SERVER
    local server=$!
    sleep 1
    ip netns exec ns-a python3 - "$addr" "$port" <<'CLIENT' || say "TCP to $addr port $port failed"
import socket
import sys
import time
addr, port = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 60  # the server's python may start slowly under emulation
while True:
    try:
        tcp = socket.create_connection((addr, port), timeout=10)
        break
    except ConnectionRefusedError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.5)
tcp.sendall(b"upcall tcp")
tcp.recv(100)
tcp.close()
CLIENT
    wait "$server" || say "the TCP server on $addr port $port saw no client"
}

# A few packets of each kind: OVS logs at most 600 dpif messages a minute. NORMAL's megaflows
# are wide, so each phase starts with an empty datapath flow table, and the UDP flows go
# in first: they make OVS match on the IP protocol, so UDP and TCP get megaflows of their own.
send_traffic() {
    local a="ip netns exec ns-a" b="ip netns exec ns-b"
    ovs-ofctl add-flow br0 "udp,tp_dst=6000,actions=controller,normal"
    ovs-ofctl add-flow br0 "udp6,tp_dst=6000,actions=controller,normal"
    $a ip neigh flush all
    $b ip neigh flush all
    ovs-dpctl del-flows
    say "traffic: ARP + ICMP"
    $a ping -c 3 -i 0.5 -W 5 10.0.0.2 >/dev/null || say "ping failed"
    ovs-dpctl del-flows
    say "traffic: IPv6 ND + ICMPv6"
    $a ping -6 -c 3 -i 0.5 -W 5 fd00::2 >/dev/null || say "ping -6 failed"
    say "traffic: UDP and TCP over IPv4 and IPv6"
    ovs-dpctl del-flows
    for addr in 10.0.0.2 fd00::2; do
        $a python3 - "$addr" <<'UDP' || say "UDP to $addr failed"
import socket
import sys
addr = sys.argv[1]
udp = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
for i in range(3):
    udp.sendto(b"upcall udp %d" % i, (addr, 5000))
UDP
        tcp_echo "$addr" 7000
    done
    say "traffic: UDP to port 6000 through actions=controller (ACTION upcalls)"
    ovs-dpctl del-flows
    $a python3 -c '
import socket, time
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(5):
    udp.sendto(b"upcall action %d" % i, ("10.0.0.2", 6000))
    time.sleep(0.2)
'
    say "traffic: ARP + ICMP in VLAN 100"
    ovs-dpctl del-flows
    $a ping -c 3 -i 0.5 -W 5 10.1.0.2 >/dev/null || say "VLAN ping failed"
    say "traffic: TCP to port 7100 through conntrack (recirculated upcalls)"
    ovs-ofctl add-flow br0 "priority=100,tcp,tp_dst=7100,actions=ct(table=1)"
    ovs-ofctl add-flow br0 "priority=100,tcp,tp_src=7100,actions=ct(table=1)"
    ovs-ofctl add-flow br0 "table=1,priority=100,tcp,ct_state=+trk+new,actions=ct(commit),normal"
    ovs-ofctl add-flow br0 "table=1,priority=10,actions=normal"
    ovs-dpctl del-flows
    tcp_echo 10.0.0.2 7100
}

# The host kills a guest that runs too long and then learns nothing: fail first, with the
# state saved and the phase it was in on the console.
watchdog() {
    sleep "$1"
    fail "the guest's run took over $1 s (the console shows the phase it was in)"
}

datapath_lost() { ovs-dpctl show | sed -n 's/.*lost:\([0-9]*\).*/\1/p' | head -1; }

# Failed upcalls: with ovs-vswitchd stopped, 1,400-byte packets of new flows fill the
# handler sockets and the datapath fails the rest (EAGAIN), counting them in lost:. A second
# capture, with --kernel, must hold every one of them. The dpif debug log is off for it: it
# could not keep up with thousands of upcalls anyway (600 messages a minute).
capture_failed_upcalls() {
    ovs-appctl vlog/set dpif:file:info
    ovs-ofctl del-flows br0
    ovs-ofctl add-flow br0 actions=normal
    ovs-dpctl del-flows
    start_tool failed --kernel
    # A socket that never reads takes the flood in ns-b: no ICMP port unreachable goes
    # back (which would make upcalls of its own), only drops when its buffer is full.
    ip netns exec ns-b python3 -c '
import socket, time
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sink.bind(("10.0.0.2", 9000))
time.sleep(3600)' &
    local sink=$!
    local vswitchd before sent=0
    vswitchd=$(cat "$OVS_RUN/ovs-vswitchd.pid")
    before=$(datapath_lost)
    echo "$before" >"$RESULTS/failed-lost-before"
    kill -STOP "$vswitchd"
    now >"$RESULTS/failed-stop"
    say "ovs-vswitchd stopped; datapath lost: $before"
    local flood_start waited_ms
    flood_start=$(date +%s%N)
    while [ $(( $(datapath_lost) - before )) -lt 1000 ] && [ $sent -lt 20000 ]; do
        ip netns exec ns-a python3 - "$sent" "$RESULTS/failed-first-send" <<'FLOOD'
import socket
import sys
import time
first = int(sys.argv[1])
if first == 0:  # when the first packet, the one that waits longest, is sent
    with open(sys.argv[2], "w") as stamp:
        stamp.write(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) +
                    ".%03dZ" % (time.time() % 1 * 1000))
for n in range(first, first + 1000):
    # A new flow each (its own source port), and bytes that say which packet it was.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("10.0.0.1", 20000 + n))
    sock.sendto(b"upcall-failed %06d " % n + b"x" * 1379, ("10.0.0.2", 9000))
    sock.close()
FLOOD
        sent=$((sent + 1000))
    done
    echo "$sent" >"$RESULTS/failed-sent"
    # So that the packets still queued wait a measurable while: 2 s more at least, and 6 s
    # from the first send in all, however fast the flood went (a fast hour sent 5,000 in
    # under 3 s, and the first packet's wait was then under the 5 s the test expects).
    waited_ms=$(( ($(date +%s%N) - flood_start) / 1000000 ))
    sleep $(( waited_ms < 4000 ? 6 - waited_ms / 1000 : 2 ))
    now >"$RESULTS/failed-cont"
    kill -CONT "$vswitchd"
    say "sent $sent packets; ovs-vswitchd continued; datapath lost: $(datapath_lost)"
    sleep 5  # its handlers read what the sockets held
    stop_tool failed
    kill "$sink"
    datapath_lost >"$RESULTS/failed-lost-after"
}

# Outcomes shed on real OVS: with ovs-vswitchd stopped, 300 small packets of new flows
# queue in its sockets, and once it goes on they come as a burst that fills a ring of 16
# pages (64 KiB) past 1/16, so the capture sheds outcomes and takes the put and execute
# probes out of ovs-vswitchd (OpsProbe.unhook). Once the ring is empty again they go back
# in, and the marker packet, a miss sent after that, must have its put tied again.
capture_shed_outcomes() {
    ovs-appctl vlog/set dpif:file:info  # a burst would rate-limit the debug log
    ovs-ofctl del-flows br0
    ovs-ofctl add-flow br0 actions=normal
    ovs-dpctl del-flows
    start_tool shed --buffer-pages 16
    ip netns exec ns-b python3 -c '
import socket, time
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sink.bind(("10.0.0.2", 9100))
time.sleep(3600)' &
    local sink vswitchd
    sink=$!
    vswitchd=$(cat "$OVS_RUN/ovs-vswitchd.pid")
    kill -STOP "$vswitchd"
    ip netns exec ns-a python3 - <<'BURST'
import socket
for n in range(300):  # a new flow each: its own source port
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("10.0.0.1", 30000 + n))
    sock.sendto(b"upcall-shed %04d" % n, ("10.0.0.2", 9100))
    sock.close()
BURST
    kill -CONT "$vswitchd"
    # A shedding lasts 1 s, twice as long when it comes back within 10 s: a few cycles.
    say "burst sent; waiting for the probes to go back in"
    sleep 12
    ovs-dpctl del-flows
    ip netns exec ns-a python3 -c '
import socket
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("10.0.0.1", 31000))
sock.sendto(b"upcall-after-shed", ("10.0.0.2", 9100))'
    sleep 3  # its put and execute, within the outcome window even under TCG
    stop_tool shed
    kill "$sink"
}

say "started"
watchdog "${GUEST_WATCHDOG_S:-1500}" &
mount_filesystems
start_ovs
make_namespace ns-a veth-a 10.0.0.1 fd00::1
make_namespace ns-b veth-b 10.0.0.2 fd00::2
add_vlan ns-a 10.1.0.1
add_vlan ns-b 10.1.0.2
check_upcalls_delivered
sleep 3
start_capture
sleep 1
send_traffic
stop_capture
save_state
capture_shed_outcomes
capture_failed_upcalls
say "done"
power_off 0
