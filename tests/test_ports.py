"""ports.py: dpctl/show parsing and the refresh policy."""

from conftest import ManualClock

from upcall_capture.ports import PortNames, parse_dpctl_show

DPCTL_SHOW = """\
system@ovs-system:
  lookups: hit:12 missed:7 lost:0
  flows: 3
  masks: hit:20 total:2 hit/pkt:1.05
  cache: hit:5 hit-rate:26.32%
  caches:
    masks-cache: size:256
  port 0: ovs-system (internal)
  port 1: br0 (internal)
  port 2: veth-a
  port 3: vxlan_sys_4789 (vxlan: packet_type=ptap)
system@br-tun:
  lookups: hit:0 missed:0 lost:0
  port 0: br-tun (internal)
  port 7: eth1
"""


def test_parse_dpctl_show():
    assert parse_dpctl_show(DPCTL_SHOW) == {
        ("system@ovs-system", 0): "ovs-system",
        ("system@ovs-system", 1): "br0",
        ("system@ovs-system", 2): "veth-a",
        ("system@ovs-system", 3): "vxlan_sys_4789",
        ("system@br-tun", 0): "br-tun",
        ("system@br-tun", 7): "eth1",
    }


def test_parse_ignores_noise():
    assert parse_dpctl_show("") == {}
    assert parse_dpctl_show("  port 1: orphan\nnot a datapath\n") == {}


def test_unknown_port_refreshes_at_most_every_interval():
    calls = []
    outputs = iter(["system@ovs-system:\n  port 1: br0 (internal)\n",
                    "system@ovs-system:\n  port 1: br0 (internal)\n  port 2: veth-a\n"])

    def fetch():
        calls.append(1)
        return next(outputs)

    clock = ManualClock(100.0)
    names = PortNames(fetch, refresh_interval=5.0, clock=clock)
    assert names.name("system@ovs-system", 1) == "br0"
    assert names.name("system@ovs-system", 2) is None  # unknown, but just fetched
    assert len(calls) == 1
    clock.now += 4.9
    assert names.name("system@ovs-system", 2) is None
    assert len(calls) == 1
    clock.now += 0.2
    assert names.name("system@ovs-system", 2) == "veth-a"
    assert len(calls) == 2
    assert names.name("system@ovs-system", 1) == "br0"  # known: no fetch
    assert len(calls) == 2
