#!/usr/bin/env python3
"""Fault runs of the GPU suite: a rank killed mid-job, and the check of connections dropped from outside.

    faults.py killpeer [--victim 1] [--after 5] [--seconds 60]   one rank (run by launch.py): all-reduces
        of 1 MiB in a loop; the victim rank kills itself (SIGKILL) after --after seconds, so the others
        must fail on their own (with NCCL_TCPXSHIM_ABORT_ON_ERROR=1 the shim ends them with its message).
    faults.py check-kill LAUNCH_TXT RANK0_LOG [--within 10]   (pure Python) the survivor failed within
        --within seconds of the victim's death, and its log names the peer in the shim's message.
    faults.py check-drops DROPS_TXT [--min 1]   (pure Python) `tcpxshim drop` really shut connections down:
        at least --min "dropped" lines."""

import argparse
import os
import re
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def killpeer(a):
    torch, dist, rank, world, dev = common.init_dist()
    x = torch.ones(1 << 18, device=dev)
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < a.seconds:
        dist.all_reduce(x)
        torch.cuda.synchronize()
        n += 1
        if rank == a.victim and time.monotonic() - t0 > a.after:
            print(f"@@ rank {rank}: killing itself after {n} all-reduces", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    print(f"@@ rank {rank}: {n} all-reduces and no error: the peer's death went unnoticed", flush=True)
    return 1


EXIT_RE = re.compile(r"rank (\d+) (exit (-?\d+)|killed by (\w+)) at ([0-9.]+) s")


def check_kill(a):
    try:
        first = open(a.launch).readline()
        log = open(a.rank0_log, errors="replace").read()
    except OSError as e:
        print(f"FAIL kill check: {e}")
        return 1
    ranks = {int(m.group(1)): (m.group(2), float(m.group(5))) for m in EXIT_RE.finditer(first)}
    if 0 not in ranks or 1 not in ranks:
        print(f"FAIL kill check: no exit times in {first.strip()!r}")
        return 1
    (how0, t0), (how1, t1) = ranks[0], ranks[1]
    if "SIGKILL" not in how1:
        print(f"FAIL kill check: the victim was not killed ({how1})")
        return 1
    took = t0 - t1
    msg = [ln for ln in log.splitlines() if "NCCL_TCPXSHIM_ABORT_ON_ERROR" in ln or "NET/TCPXSHIM" in ln and "WARN" in ln]
    named = [ln for ln in msg if re.search(r"peer|127\.0\.0\.1|\d+\.\d+\.\d+\.\d+:\d+", ln)]
    print(f"  victim killed at {t1:.1f} s; survivor {how0} at {t0:.1f} s: {took:.1f} s later")
    for ln in named[:3]:
        print(f"  | {ln[:300]}")
    ok = how0 != "exit 0" and 0 <= took <= a.within and bool(named)
    print(
        f"{'PASS' if ok else 'FAIL'} kill check: the survivor failed {took:.1f} s after its peer died "
        f"(limit {a.within:.0f} s), {'naming the peer' if named else 'WITHOUT a shim message naming the peer'}"
    )
    return 0 if ok else 1


def check_drops(a):
    try:
        lines = open(a.drops).read().splitlines()
    except OSError as e:
        print(f"FAIL drop check: {e}")
        return 1
    dropped = [ln for ln in lines if re.match(r"dropped \S+ -> \S+$", ln)]
    ok = len(dropped) >= a.min
    print(f"{'PASS' if ok else 'FAIL'} drop check: {len(dropped)} connections shut down from outside (at least {a.min} wanted)")
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("killpeer")
    k.add_argument("--victim", type=int, default=1)
    k.add_argument("--after", type=float, default=5)
    k.add_argument("--seconds", type=float, default=60)
    c = sub.add_parser("check-kill")
    c.add_argument("launch")
    c.add_argument("rank0_log")
    c.add_argument("--within", type=float, default=10)
    d = sub.add_parser("check-drops")
    d.add_argument("drops")
    d.add_argument("--min", type=int, default=1)
    a = ap.parse_args()
    return {"killpeer": killpeer, "check-kill": check_kill, "check-drops": check_drops}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
