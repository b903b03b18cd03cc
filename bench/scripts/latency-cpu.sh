#!/usr/bin/env bash
# Where an idle round trip's CPU goes, per thread (issue 11, item 3): runs the latency scenario's
# idle rows one engine and placement at a time and, 1.2 s into each, reads every thread's
# scheduler run time (/proc/PID/task/TID/schedstat, ns) around a 1.5 s window (`window`) in
# which perf counts the machine's round trips (net:netif_receive_skb: each request passes the
# host stack once), syscalls and context switches. Prints medians over the repeats, per round trip.
#
#   bench/scripts/latency-cpu.sh                 # uring and classic, split and shared, 3 repeats
#   TAPIR=/path/to/tapir REPEATS=5 bench/scripts/latency-cpu.sh
#
# Needs root and perf (Debian: linux-perf); the machine otherwise quiet.
set -euo pipefail
tapir=${TAPIR:-$(dirname "$0")/../../target/release/tapir}
repeats=${REPEATS:-3}
window=1.5   # seconds counted per run
out=$(mktemp -d /tmp/tapir-latency-cpu.XXXXXX)
trap 'rm -rf "$out"' EXIT
snap() { for t in /proc/"$1"/task/*; do echo "$(cat "$t"/comm) $(cat "$t"/schedstat)"; done; }
for i in $(seq "$repeats"); do
    for p in split shared; do
        for e in uring classic; do
            tag=$p-$e-$i
            "$tapir" bench --scenario latency --engines "$e" --latency-placement "$p" \
                --busy-poll-us 0 --repeats 1 --latency-samples 60000 >/dev/null 2>&1 &
            bench=$!
            sleep 1.2
            snap "$bench" >"$out/s0-$tag"
            perf stat -x, -a -e net:netif_receive_skb,raw_syscalls:sys_enter,context-switches \
                -o "$out/c-$tag.csv" -- sleep "$window"
            snap "$bench" >"$out/s1-$tag"
            wait "$bench"
        done
    done
done
python3 - "$out" "$window" <<'PY'
import collections, glob, os, statistics as st, sys
d, window = sys.argv[1], float(sys.argv[2])
res = collections.defaultdict(list)
def threads(fn):
    t = collections.defaultdict(int)
    for line in open(fn):
        comm, run, _wait, _slices = line.split()
        t[comm] += int(run)
    return t
for f in sorted(glob.glob(os.path.join(d, "c-*.csv"))):
    tag = os.path.basename(f)[2:-4]
    p, e, _ = tag.split("-")
    rts, sys_, cs = [float(l.split(",")[0]) for l in open(f) if l.strip() and not l.startswith("#")]
    a, b = threads(os.path.join(d, f"s0-{tag}")), threads(os.path.join(d, f"s1-{tag}"))
    res[(p, e)].append((window * 1e6 / rts, sys_ / rts, cs / rts, {c: (b[c] - a[c]) / rts / 1000 for c in b}))
print("placement engine  mean round trip us  syscalls  ctx switches  CPU us per round trip: worker (tapir-qp0), echo, guest (netns)")
for (p, e), runs in sorted(res.items()):
    med = lambda k: st.median(r[3].get(k, 0) for r in runs)
    print(f"{p:9} {e:7} {st.median(r[0] for r in runs):8.1f} {st.median(r[1] for r in runs):17.1f} "
          f"{st.median(r[2] for r in runs):9.1f}       {med('tapir-qp0'):5.1f} {med('udpecho'):5.1f} {med('netns'):5.1f}")
PY
