"""upcall-capture --decode-key and --decode-actions: OVS's text for keys and actions an
operator holds."""

import subprocess
import sys

import pytest
from conftest import ROOT, VECTORS


def decode(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "upcall_capture", "--decode-key", *args],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_every_shared_vector_through_stdin():
    if not VECTORS.exists():
        pytest.skip(f"{VECTORS} is absent (it lives beside the project, in ../shared)")
    keys, texts = zip(*(line.split("\t", 1) for line in VECTORS.read_text().splitlines()),
                      strict=True)
    done = decode("-", stdin="\n".join(k or "-" for k in keys) + "\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == list(texts)


def test_one_key_as_argument():
    done = decode("0800030005000000100004000001020304051011121314150600060008000000")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ("in_port(5),eth(src=00:01:02:03:04:05,dst=10:11:12:13:14:15),"
                           "eth_type(0x0800)\n")


def test_dash_line_is_an_empty_key():
    assert decode("-", stdin="-\n0800030001000000\n").stdout == "<empty>\nin_port(1)\n"


def test_bad_hex_is_one_line_error():
    done = decode("-", stdin="0800030001000000\nzz12\n")
    assert done.returncode == 2
    assert done.stdout == "in_port(1)\n"
    assert done.stderr.strip() == "upcall-capture: line 2: not a hex flow key: 'zz12'"


def decode_actions(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "upcall_capture", "--decode-actions", *args],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_actions_as_argument_and_through_stdin():
    # output:2, then recirc(0x5); an empty list is OVS's "drop".
    assert decode_actions("08000100020000000800070005000000").stdout == "2,recirc(0x5)\n"
    done = decode_actions("-", stdin="-\n0800010003000000\nzz\n")
    assert done.returncode == 2
    assert done.stdout == "drop\n3\n"
    assert done.stderr.strip() == "upcall-capture: line 3: not a hex actions list: 'zz'"
