#!/usr/bin/env bash
# Records the reference scenarios of `tapir bench` with perf (software cpu-clock events: the
# only kind this VM offers) on the datapath's CPU, and renders SVG flamegraphs with inferno.
#
#   flamegraphs/record.sh            # all reference scenarios, every engine
#   flamegraphs/record.sh tx 64      # one scenario
#
# Needs root, perf (Debian: linux-perf) and inferno (cargo install inferno).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { echo "perf is missing (apt-get install linux-perf)" >&2; exit 1; }
command -v inferno-flamegraph >/dev/null || cargo install inferno --locked
cargo build --release --quiet
out=flamegraphs
cpus=$(nproc)
dp_cpu=$((cpus - 1))   # tapir bench pins queue pair 0's worker (and the floor) to the last CPU

record() { # scenario frame engine
    local scenario=$1 frame=$2 engine=$3 name="$1-$2-$3"
    echo "== $name"
    ./target/release/tapir bench --scenario "$scenario" --frame "$frame" --queues 1 \
        --engines "$engine" --duration 8 --repeats 1 >"/tmp/tapir-$name.txt" 2>/dev/null &
    local bench=$!
    sleep 3
    perf record -q -e cpu-clock -F 2999 -g -C "$dp_cpu" -o "/tmp/tapir-$name.perf" -- sleep 3 2>/dev/null
    wait "$bench"
    perf script -i "/tmp/tapir-$name.perf" 2>/dev/null | inferno-collapse-perf >"/tmp/tapir-$name.folded"
    inferno-flamegraph --title "tapir bench $scenario $frame B, $engine (CPU $dp_cpu)" \
        <"/tmp/tapir-$name.folded" >"$out/$name.svg"
    rm -f "/tmp/tapir-$name.perf"
}

if [ $# -eq 2 ]; then
    for e in uring classic floor; do record "$1" "$2" "$e"; done
else
    for s in "tx 64" "tx-drop 64" "rx 64" "tx 65536" "rx 65536"; do
        for e in uring classic floor; do record $s "$e"; done
    done
fi
