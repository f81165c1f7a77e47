"""Port names from a real ovs-vswitchd (Debian's openvswitch-switch) on a netdev datapath.

Each test starts its own ovsdb-server and ovs-vswitchd in a private run directory, with
ovs-vswitchd in a network namespace of its own: its internal ports are tap devices that
outlive it, and there they vanish with the namespace and cannot clash with the host's.
The expected names come from `ovs-appctl dpif/show`, a different command and format from
the `dpctl/show` that the tool parses.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from upcall_capture.ports import PortNames, control_socket, dpctl_show, parse_dpctl_show

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
PROGRAMS = ("ovsdb-tool", "ovsdb-server", "ovs-vswitchd", "ovs-vsctl", "ovs-appctl", "unshare")
SUN_PATH_SIZE = 108
TIMEOUT = 10

# Two bridges share the one netdev datapath, so its port numbers span both.
BRIDGE_PORTS = {"br-a": ("a1", "a2"), "br-b": ("b1",)}

_DPIF_SHOW_DATAPATH = re.compile(r"^(\S+@\S+): ")
_DPIF_SHOW_PORT = re.compile(r"^ {4}(\S+) \S+/(\d+):")


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "a real ovs-vswitchd with tap ports needs root"
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing or not SCHEMA.exists():
        return f"Open vSwitch is not installed (apt-get install openvswitch-switch): {missing}"
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        return "cannot create a network namespace (unshare --net)"
    return None


@dataclass
class Ovs:
    rundir: Path
    env: dict[str, str]
    ovsdb: subprocess.Popen | None = None
    vswitchd: subprocess.Popen | None = None

    @property
    def db(self) -> str:
        return f"unix:{self.rundir / 'db.sock'}"

    def socket_of(self, program: str, process: subprocess.Popen) -> Path:
        """OVS's own name for a daemon's control socket."""
        return self.rundir / f"{program}.{process.pid}.ctl"

    def run(self, *command: str) -> str:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)
        if done.returncode != 0:
            logs = "".join(p.read_text()[-2000:] for p in sorted(self.rundir.glob("*.log")))
            raise AssertionError(f"{command} failed: {done.stderr}\n{logs}")
        return done.stdout

    def vsctl(self, *args: str) -> str:
        # Without --no-wait, ovs-vsctl returns once ovs-vswitchd has applied the change.
        return self.run("ovs-vsctl", f"--db={self.db}", f"--timeout={TIMEOUT}", *args)

    def dpif_show(self) -> dict[tuple[str, int], str]:
        """{(dpif, datapath port): name} of the bridges' ports, from `dpif/show`."""
        assert self.vswitchd is not None
        text = self.run("ovs-appctl", "-t", str(self.socket_of("ovs-vswitchd", self.vswitchd)),
                        "dpif/show")
        ports = {}
        dpif = None
        for line in text.splitlines():
            if m := _DPIF_SHOW_DATAPATH.match(line):
                dpif = m.group(1)
            elif m := _DPIF_SHOW_PORT.match(line):
                assert dpif is not None, text
                ports[(dpif, int(m.group(2)))] = m.group(1)
        return ports

    def port_of(self, name: str) -> tuple[str, int]:
        """(dpif, datapath port) of the port called `name`, from `dpif/show`."""
        (port,) = [port for port, named in self.dpif_show().items() if named == name]
        return port

    def start(self) -> None:
        conf = self.rundir / "conf.db"
        self.run("ovsdb-tool", "create", str(conf), str(SCHEMA))
        db_socket = self.rundir / "db.sock"
        self.ovsdb = self._daemon("ovsdb-server", "ovsdb-server", str(conf),
                                  f"--remote=punix:{db_socket}")
        # ovs-vsctl --retry backs off a whole second; the socket is usually there sooner.
        deadline = time.monotonic() + TIMEOUT
        while not db_socket.exists() and self.ovsdb.poll() is None:
            assert time.monotonic() < deadline, "ovsdb-server never made its socket"
            time.sleep(0.01)
        self.run("ovs-vsctl", f"--db={self.db}", "--no-wait", "init")
        # unshare execs ovs-vswitchd (no fork), so the process we hold is the vswitchd.
        self.vswitchd = self._daemon("ovs-vswitchd", "unshare", "--net", "ovs-vswitchd",
                                     self.db, "--disable-system")

    def _daemon(self, name: str, *command: str) -> subprocess.Popen:
        """`command` in the background, its log and output in the run directory as `name`."""
        with open(self.rundir / f"{name}.out", "w") as out:
            return subprocess.Popen([*command, f"--log-file={self.rundir / name}.log"],
                                    env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        for process in (self.vswitchd, self.ovsdb):
            if process is None:
                continue
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(params=["short", "long"])
def ovs(request, tmp_path: Path) -> Iterator[Ovs]:
    """A running ovsdb-server and ovs-vswitchd with BRIDGE_PORTS on a netdev datapath.

    "long": a run directory too long for a socket address, which OVS binds through
    /proc/self/fd; "short": an ordinary one (tmp_path's length depends on pytest).
    """
    if reason := _unavailable():
        pytest.skip(reason)
    if request.param == "short":
        rundir = Path(tempfile.mkdtemp(prefix="uc-ovs-", dir="/tmp"))
        request.addfinalizer(lambda: shutil.rmtree(rundir, ignore_errors=True))
    else:
        rundir = tmp_path / ("run-" + "d" * SUN_PATH_SIZE)
        rundir.mkdir()
    env = os.environ | {var: str(rundir) for var in
                        ("OVS_RUNDIR", "OVS_DBDIR", "OVS_LOGDIR", "OVS_SYSCONFDIR")}
    switch = Ovs(rundir, env)
    try:
        switch.start()
        assert switch.vswitchd is not None
        for bridge, ports in BRIDGE_PORTS.items():
            command = ["add-br", bridge, "--", "set", "Bridge", bridge, "datapath_type=netdev"]
            for port in ports:
                command += ["--", "add-port", bridge, port,
                            "--", "set", "Interface", port, "type=internal"]
            switch.vsctl(*command)
        socket_name = str(switch.socket_of("ovs-vswitchd", switch.vswitchd)).encode()
        assert (len(socket_name) >= SUN_PATH_SIZE) == (request.param == "long")
        assert (os.readlink(f"/proc/{switch.vswitchd.pid}/ns/net")
                != os.readlink("/proc/self/ns/net"))
        yield switch
    finally:
        switch.stop()


def test_control_socket_is_that_daemons_own(ovs: Ovs):
    assert ovs.vswitchd is not None and ovs.ovsdb is not None
    assert control_socket(ovs.vswitchd.pid) == str(ovs.socket_of("ovs-vswitchd", ovs.vswitchd))
    # Another OVS daemon beside it answers with its own socket, not the vswitchd's.
    assert control_socket(ovs.ovsdb.pid) == str(ovs.socket_of("ovsdb-server", ovs.ovsdb))


def test_dpctl_show_names_every_datapath_port(ovs: Ovs):
    assert ovs.vswitchd is not None
    text = dpctl_show(ovs.vswitchd.pid)
    assert text, "dpctl_show found no answer from the vswitchd"
    bridge_ports = ovs.dpif_show()
    expected_names = set(BRIDGE_PORTS) | set(itertools.chain(*BRIDGE_PORTS.values()))
    assert set(bridge_ports.values()) == expected_names
    (dpif,) = {dpif for dpif, _ in bridge_ports}
    # dpctl/show also lists the datapath's local port 0, named after the datapath.
    local_port = {(dpif, 0): dpif.split("@", 1)[1]}
    assert parse_dpctl_show(text) == bridge_ports | local_port


def test_port_names_learn_a_port_added_later(ovs: Ovs):
    assert ovs.vswitchd is not None
    pid = ovs.vswitchd.pid
    interval = 0.5
    fetched_at: list[float] = []

    def fetch() -> str:
        fetched_at.append(time.monotonic())
        return dpctl_show(pid)

    names = PortNames(fetch, refresh_interval=interval)
    a1 = ovs.port_of("a1")
    assert names.name(*a1) == "a1"

    ovs.vsctl("add-port", "br-b", "late", "--", "set", "Interface", "late", "type=internal")
    late = ovs.port_of("late")
    assert late != a1
    deadline = time.monotonic() + TIMEOUT
    while (named := names.name(*late)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert named == "late"
    assert names.name(*a1) == "a1"
    assert len(fetched_at) >= 2
    assert all(b - a >= interval for a, b in itertools.pairwise(fetched_at))
