#!/usr/bin/env bash
# Regenerate man/upcall-capture.1 from the real argument parser (argparse-manpage).
# tests/test_manpage.py fails when the committed page is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
version=$("$PY" -c 'import upcall_capture; print(upcall_capture.__version__)')
"$PY" -c "from argparse_manpage.cli import main; main()" --module upcall_capture.cli --function build_parser \
    --project-name upcall-capture --prog upcall-capture --version "$version" \
    --description "capture Open vSwitch upcalls into pcapng" \
    --manual-section 1 --manual-title "User Commands" --include man/include.txt \
    --output "${1:-man/upcall-capture.1}"
