"""man/upcall-capture.1 is generated from the real parser and must not go stale."""

import datetime
import os
import re
import shutil
import subprocess

import pytest
from conftest import ROOT

from upcall_capture.cli import build_parser

PAGE = ROOT / "man" / "upcall-capture.1"


def test_man_page_is_current(tmp_path):
    committed = PAGE.read_text()
    date = re.search(r'^\.TH \S+ "1" "([\d\\-]+)"', committed).group(1).replace("\\-", "-")
    epoch = int(datetime.datetime.fromisoformat(date).replace(
        tzinfo=datetime.UTC).timestamp())
    fresh = tmp_path / "page.1"
    subprocess.run(["bash", str(ROOT / "scripts" / "make-manpage.sh"), str(fresh)], check=True,
                   env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch),
                        "PYTHON": str(ROOT / ".venv" / "bin" / "python")})
    assert fresh.read_text() == committed, "stale: run scripts/make-manpage.sh"


def test_man_page_documents_every_option():
    # Without roff's font changes and dashes: \fB\-\-pid\fR is --pid.
    page = re.sub(r"\\f[BIRP]|\\[,/]", "", PAGE.read_text()).replace("\\-", "-")
    for action in build_parser()._actions:
        for option in action.option_strings:
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", page), option


def test_man_page_renders():
    if not shutil.which("man"):
        pytest.skip("man is not installed")
    done = subprocess.run(["man", "-l", str(PAGE)], capture_output=True, text=True,
                          env={**os.environ, "MANWIDTH": "80", "MAN_KEEP_STDERR": "1"})
    assert done.returncode == 0, done.stderr
    assert "upcall-capture" in done.stdout and "--snaplen" in done.stdout
    assert "warning" not in done.stderr.lower()
