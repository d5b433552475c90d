#!/usr/bin/env python3
"""Where the CPU time goes: per-thread CPU use of running processes, sampled from /proc.

    python3 gpu/threadprof.py --match TEXT [--interval 0.5] [--max-seconds 120] [--busy 0.5]

Every INTERVAL seconds it reads utime+stime of every thread of every process whose command line
contains TEXT, until no such process is left (or MAX_SECONDS pass). It then takes the busy
intervals (total CPU at least BUSY x the busiest interval's: the bandwidth phase of a sweep, not its
start-up) and prints, per process and thread name, the average CPU use over them, 100% being one
core busy all the time. Threads are grouped by name with their number in the group, so 'txs0-io*'
(the shim's I/O workers) and NCCL's proxy threads show as lines of their own.
"""

import argparse
import os
import re
import time

TICK = os.sysconf("SC_CLK_TCK")


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _threads(pid):
    """{tid: (name, cpu seconds)} of one process."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        # comm is in parentheses and may hold spaces; the fields after it are space separated.
        lp, rp = s.find("("), s.rfind(")")
        name = s[lp + 1 : rp]
        rest = s[rp + 2 :].split()
        out[int(tid)] = (name, (int(rest[11]) + int(rest[12])) / TICK)
    return out


def group_name(name):
    """Thread names that differ only by digits share a group: txs0-io3 -> txs0-io*."""
    return re.sub(r"\d+$", "*", name)


def snapshot(match, own):
    snap = {}
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == own:
            continue
        cl = _cmdline(d)
        if match in cl and "threadprof.py" not in cl:  # not this sampler, nor a wrapper of it
            for tid, (name, cpu) in _threads(d).items():
                snap[(int(d), tid)] = (name, cpu)
    return snap


def busy_intervals(samples, busy):
    """samples: [(seconds, {(pid, tid): (name, cpu)})]. Returns the busy intervals as
    [(dt, {(pid, tid): (name, cpu share)})]: those whose total CPU is at least busy x the peak's."""
    intervals = []
    for (t0, a), (t1, b) in zip(samples, samples[1:]):
        dt = t1 - t0
        if dt <= 0:
            continue
        use = {}
        for key, (name, cpu) in b.items():
            if key in a:
                use[key] = (name, max(0.0, cpu - a[key][1]) / dt)
        intervals.append((dt, use))
    if not intervals:
        return []
    totals = [sum(u for _, u in use.values()) for _, use in intervals]
    peak = max(totals)
    return [iv for iv, tot in zip(intervals, totals) if peak > 0 and tot >= busy * peak]


def busy_average(samples, busy):
    """Average CPU share over the busy intervals, per process and thread group: returns
    ({(pid, group): (cpu share, threads)}, busy seconds, intervals used)."""
    chosen = busy_intervals(samples, busy)
    secs = sum(dt for dt, _ in chosen)
    acc = {}
    for dt, use in chosen:
        for (pid, tid), (name, share) in use.items():
            k = (pid, group_name(name))
            cur, tids = acc.get(k, (0.0, set()))
            tids.add(tid)
            acc[k] = (cur + share * dt, tids)
    return {k: (v / secs, len(t)) for k, (v, t) in acc.items()}, secs, len(chosen)


def busy_threads(samples, busy):
    """Average CPU share over the busy intervals per thread: {(pid, tid): (name, cpu share)}."""
    chosen = busy_intervals(samples, busy)
    secs = sum(dt for dt, _ in chosen)
    acc = {}
    for dt, use in chosen:
        for key, (name, share) in use.items():
            acc[key] = (name, acc.get(key, (name, 0.0))[1] + share * dt)
    return {k: (n, v / secs) for k, (n, v) in acc.items()} if secs > 0 else {}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--match", required=True, help="text the processes' command lines contain")
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--max-seconds", type=float, default=120)
    ap.add_argument("--busy", type=float, default=0.5)
    ap.add_argument("--wait", type=float, default=30, help="seconds to wait for a matching process")
    a = ap.parse_args()
    own = os.getpid()
    start = time.monotonic()
    while not snapshot(a.match, own):
        if time.monotonic() - start > a.wait:
            print(f"threadprof: no process matching {a.match!r} within {a.wait:g} s")
            return 1
        time.sleep(0.1)
    samples = []
    t_end = time.monotonic() + a.max_seconds
    while time.monotonic() < t_end:
        snap = snapshot(a.match, own)
        if not snap:
            break
        samples.append((time.monotonic(), snap))
        time.sleep(a.interval)
    avg, secs, n = busy_average(samples, a.busy)
    if n == 0:
        print(f"threadprof: the processes ended after {len(samples)} sample(s): nothing to average")
        return 1
    print(f"threadprof: {len(samples)} samples; busy intervals: {n} ({secs:.1f} s, total CPU >= {a.busy:g} x peak)")
    print(f"{'pid':>8}  {'threads':>7}  {'name':<18} {'CPU %':>7}")
    for (pid, name), (share, nt) in sorted(avg.items(), key=lambda kv: (kv[0][0], -kv[1][0])):
        if share >= 0.02:
            print(f"{pid:>8}  {nt:>7}  {name:<18} {share * 100:>7.1f}")
    print("busiest threads (tid, name, CPU %):")
    per_thread = busy_threads(samples, a.busy)
    for (pid, tid), (name, share) in sorted(per_thread.items(), key=lambda kv: -kv[1][1])[:12]:
        if share >= 0.03:
            print(f"{pid:>8}  {tid:>7}  {name:<18} {share * 100:>7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
