"""target.py: stapsdt notes read from real ELF files, and process look-ups."""

import subprocess
import time

import pytest
from conftest import build_c

from upcall_capture import target
from upcall_capture.errors import UsageError

PROBED_C = r"""
#include <sys/sdt.h>
#include <stdint.h>
#include <stddef.h>
int main(int argc, char **argv) {
    const char *dpif = argv[0];
    uint32_t size = argc;
    size_t key_len = argc * 8;
    DTRACE_PROBE6(dpif_recv, recv_upcall, dpif, (unsigned) argc, (void *) argv, size,
                  (void *) argv[0], key_len);
    DTRACE_PROBE(main, run_start);
    return 0;
}
"""


@pytest.fixture(scope="module")
def probed_binary(tmp_path_factory):
    return build_c(tmp_path_factory.mktemp("elf"), "p", PROBED_C)


def readelf_probes(path):
    out = subprocess.run(["readelf", "-n", str(path)], capture_output=True, text=True,
                         check=True).stdout
    probes, provider, name = [], None, None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Provider:"):
            provider = line.split(":", 1)[1].strip()
        elif line.startswith("Name:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("Arguments:"):
            probes.append((provider, name, line.split(":", 1)[1].strip()))
    return probes


def test_notes_match_readelf(probed_binary):
    found = target.stapsdt_probes(probed_binary.read_bytes())
    assert [(p.provider, p.name, p.args) for p in found] == readelf_probes(probed_binary)
    assert any(map(target.is_recv_upcall, found))
    recv = next(p for p in found if p.name == "recv_upcall")
    assert [a.split("@")[0] for a in recv.args.split()] == ["8", "4", "8", "4", "8", "8"]


def test_binary_without_probes():
    with open("/bin/true", "rb") as binary:
        assert target.stapsdt_probes(binary.read()) == []


@pytest.mark.parametrize("cut", [0, 4, 16, 63, 64, 200, 1000])
def test_truncated_or_garbage_elf_gives_no_probes(probed_binary, cut):
    data = probed_binary.read_bytes()
    assert target.stapsdt_probes(data[:cut]) == []
    assert target.stapsdt_probes(b"\x7fELF" + b"\xff" * cut) == []


def test_no_such_process():
    with pytest.raises(UsageError, match="no such process: 4194000"):
        target.process(4194000)


def test_process_without_probe_is_refused():
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(UsageError, match="has no dpif_recv:recv_upcall USDT probe"):
            target.check_probe(target.process(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()


def test_is_alive_sees_exit_and_zombies():
    proc = subprocess.Popen(["sleep", "30"])
    assert target.is_alive(proc.pid)
    proc.kill()
    # Not yet reaped: a zombie counts as exited.
    for _ in range(100):
        if not target.is_alive(proc.pid):
            break
        time.sleep(0.01)
    assert not target.is_alive(proc.pid)
    proc.wait()
    assert not target.is_alive(proc.pid)
