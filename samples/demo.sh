#!/usr/bin/env bash
# The demo: replay realistic upcalls through the real dpif_recv:recv_upcall probe,
# capture them with upcall-capture into a pcapng, and show the file with tshark.
# Run by `bash scripts/bootstrap.sh demo` (as root, after set-up).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/upcall-demo.pcapng}
RECORDS=samples/replay/basic.upc
COUNT=$(.venv/bin/python -c 'import sys; sys.path.insert(0, "samples/replay"); import upcalls
print(len(upcalls.read_records(sys.argv[1])))' "$RECORDS")
rm -f "$OUT"
log=$(mktemp)
trap 'kill "$replay" 2>/dev/null || true; rm -f "$log"' EXIT

# The replay source waits for SIGUSR1, so that the capture is attached before it fires;
# -O: after each batch, the flow puts and executes a handler would ask for (outcomes).
samples/replay/upcall-replay -S -k -O -r 200 "$RECORDS" >/dev/null &
replay=$!
.venv/bin/upcall-capture -p "$replay" -w "$OUT" -c "$COUNT" 2>"$log" &
capture=$!
for _ in $(seq 100); do grep -q listening "$log" && break; sleep 0.1; done
cat "$log"
kill -USR1 "$replay"
wait "$capture"
grep -E "upcalls captured|outcomes:" "$log"

echo
echo "== $OUT, as tshark reads it (interface, packet, comment) =="
tshark -r "$OUT" -T fields -E separator=' | ' -e frame.number -e frame.interface_name \
    -e _ws.col.Info -e frame.comment -c 12 2>/dev/null
echo
echo "Open it in Wireshark: wireshark $OUT"
echo "Read it back with the keys: .venv/bin/upcall-capture -r $OUT -v"
echo "Summarize it:               .venv/bin/upcall-capture -r $OUT --stats"
