#!/usr/bin/env python3
"""Where a handoff's downtime goes, by the scheduler's own record.

Input: `perf script` of a `perf sched record -k CLOCK_MONOTONIC` taken around
`TAPIR_HANDOFF_TRACE=1 tapir bench --scenario handoff ...`, and that run's stderr (the
"handoff trace v3" lines: quiesce time, CLOCK_MONOTONIC ns, the source's and successor's
pids, first service in µs from the quiesce).

For every handoff, the window from the quiesce to the successor's first used entry (the
downtime) is split by what the two datapath processes' threads were doing:
  running   some thread of the source or the successor is on a CPU;
  waiting   none is on a CPU, and at least one is runnable (woken or preempted, not yet
            given a CPU): the time the scheduler kept the handoff waiting;
  idle      none is runnable: both wait for something outside (a frame, a timer).
and, for the waiting time, which tasks held the CPUs meanwhile.

Usage: handoff-sched.py PERF_SCRIPT_TXT BENCH_STDERR
"""

import bisect
import re
import sys
from collections import defaultdict

TRACE = re.compile(
    r"handoff trace v3 .*first service (\d+) .*quiesce at (\d+) ns .*source pid (\d+) successor pid (\d+)"
)
# perf script -F comm,tid,pid,cpu,time,event,trace: comm pid/tid [cpu] secs.usecs: event: fields
HEAD = re.compile(r"^\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+(\d+\.\d+):\s+(\S+):\s*(.*)$")
SWITCH = re.compile(
    r"prev_comm=(.*?) prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)"
)
WAKE = re.compile(r"comm=(.*?) pid=(\d+) prio=")


def load_handoffs(path):
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            m = TRACE.search(line)
            if m:
                served_us, q_ns, src, succ = (int(x) for x in m.groups())
                out.append((q_ns, q_ns + served_us * 1000, src, succ))
    return out


def load_sched(path):
    """Per tid: list of (start, end, state) intervals, state 'run' or 'wait'; per cpu: list
    of (start, end, comm) running intervals; tid -> process id."""
    tgid = {}
    comm_of = {}
    run_since = {}  # tid -> (t, cpu)
    wait_since = {}  # tid -> t
    intervals = defaultdict(list)
    cpu_run = defaultdict(list)
    cpu_cur = {}  # cpu -> (t, tid)
    with open(path, errors="replace") as f:
        for line in f:
            m = HEAD.match(line)
            if not m:
                continue
            # perf prints pid/tid.
            comm, pid, tid, cpu, ts, event, rest = m.groups()
            t = int(round(float(ts) * 1e9))
            tgid[int(tid)] = int(pid)
            comm_of[int(tid)] = comm
            cpu = int(cpu)
            if event == "sched:sched_switch":
                s = SWITCH.search(rest)
                if not s:
                    continue
                prev, state, nxt = int(s.group(2)), s.group(3), int(s.group(5))
                comm_of.setdefault(nxt, s.group(4))
                if prev in run_since:
                    intervals[prev].append((run_since.pop(prev)[0], t, "run"))
                if state.startswith("R"):
                    # Preempted: runnable from now.
                    wait_since[prev] = t
                if nxt in wait_since:
                    intervals[nxt].append((wait_since.pop(nxt), t, "wait"))
                run_since[nxt] = (t, cpu)
                if cpu in cpu_cur:
                    t0, who = cpu_cur[cpu]
                    cpu_run[cpu].append((t0, t, who))
                cpu_cur[cpu] = (t, nxt)
            elif event in ("sched:sched_waking", "sched:sched_wakeup_new"):
                w = WAKE.search(rest)
                if not w:
                    continue
                woken = int(w.group(2))
                if woken not in run_since:
                    wait_since.setdefault(woken, t)
    return intervals, cpu_run, tgid, comm_of


def spans_in(cpu_spans, ends, lo, hi):
    """The spans of one CPU (sorted, disjoint; `ends` their end times) overlapping lo..hi."""
    i = bisect.bisect_right(ends, lo)
    while i < len(cpu_spans) and cpu_spans[i][0] < hi:
        yield cpu_spans[i]
        i += 1


def clip(iv, lo, hi):
    a, b = max(iv[0], lo), min(iv[1], hi)
    return (a, b) if a < b else None


def union_len(spans):
    total, end = 0, None
    for a, b in sorted(spans):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def subtract(spans, minus):
    """Parts of `spans` (merged) outside `minus` (merged)."""
    out = []
    minus = sorted(minus)
    for a, b in merge(spans):
        cur = a
        for c, d in minus:
            if d <= cur or c >= b:
                continue
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
        if cur < b:
            out.append((cur, b))
    return out


def merge(spans):
    out = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def main():
    handoffs = load_handoffs(sys.argv[2])
    intervals, cpu_run, tgid, comm_of = load_sched(sys.argv[1])
    datapaths = {p for h in handoffs for p in h[2:]}
    for spans in cpu_run.values():
        spans.sort()
    cpu_ends = {c: [b for _, b, _ in spans] for c, spans in cpu_run.items()}
    by_pid = defaultdict(set)
    for t, p in tgid.items():
        by_pid[p].add(t)
    rows = []
    for q, end, src, succ in handoffs:
        tids = by_pid[src] | by_pid[succ]
        run, wait = [], []
        for tid in tids:
            for iv in intervals.get(tid, []):
                c = clip(iv, q, end)
                if c and iv[2] == "wait":
                    wait.append(c)
        # Running: from each CPU's own sequence of switches (consistent per CPU).
        runners = defaultdict(int)
        for cpu, spans in cpu_run.items():
            for a, b, who in spans_in(spans, cpu_ends[cpu], q, end):
                c = clip((a, b), q, end)
                if c and who in tids:
                    run.append(c)
                    role = "source" if tgid.get(who) == src else "successor"
                    runners[f"{role} {comm_of.get(who, '?')}"] += c[1] - c[0]
        run = merge(run)
        waiting = subtract(wait, run)
        holders = defaultdict(int)
        for cpu, spans in cpu_run.items():
            for a, b, who in spans_in(spans, cpu_ends[cpu], q, end):
                for w in waiting:
                    c = clip((a, b), w[0], w[1])
                    if c:
                        name = comm_of.get(who, "?")
                        if tgid.get(who) in (src, succ):
                            name = "(this handoff's datapaths) " + name
                        elif tgid.get(who) in datapaths:
                            name = "(an earlier datapath) " + name
                        holders[name] += c[1] - c[0]
        d = end - q
        r, w = union_len(run), union_len(waiting)
        rows.append((d, r, w, d - r - w, holders, runners))
    if not rows:
        sys.exit("no handoff trace lines with pids found")
    rows.sort(key=lambda x: x[0])
    n = len(rows)

    def show(label, sel):
        d = sum(x[0] for x in sel)
        r = sum(x[1] for x in sel)
        w = sum(x[2] for x in sel)
        i = sum(x[3] for x in sel)
        hold = defaultdict(int)
        for x in sel:
            for k, v in x[4].items():
                hold[k] += v
        top = sorted(hold.items(), key=lambda kv: -kv[1])[:6]
        # Two CPUs: holders' time adds up to at most twice the waiting time.
        print(
            f"{label}: {len(sel)} handoffs, downtime mean {d / len(sel) / 1e3:.0f} µs: "
            f"running {100 * r / d:.0f} %, waiting for a CPU {100 * w / d:.0f} %, "
            f"idle {100 * i / d:.0f} %"
        )
        tw = sum(hold.values()) or 1
        print(
            "   CPUs held while it waited: "
            + ", ".join(f"{k} {100 * v / tw:.0f} %" for k, v in top)
        )
        ran = defaultdict(int)
        for x in sel:
            for k, v in x[5].items():
                ran[k] += v
        print(
            "   CPU time of the datapaths' threads in it, per downtime: "
            + ", ".join(
                f"{k} {100 * v / d:.0f} %"
                for k, v in sorted(ran.items(), key=lambda kv: -kv[1])[:6]
            )
        )

    show("all", rows)
    show("fastest half", rows[: n // 2])
    show("slowest 10 %", rows[n - max(1, n // 10):])
    show("slowest 1 %", rows[n - max(1, n // 100):])


if __name__ == "__main__":
    main()
