#!/usr/bin/env python3
"""One rank of a bandwidth sweep, printed by rank 0 in nccl-tests' format:

    size count type redop root time(us) algbw(GB/s) busbw(GB/s) #wrong

for all_reduce (sum, in place: busbw = algbw x 2(n-1)/n) and sendrecv (each rank sends to r+1
and receives from r-1 at once, out of place: busbw = algbw), float32, 8 B to 256 MiB doubling
(--quick: x4 to 128 MiB). Per size: warm-up iterations, then timed iterations between two CUDA
events (about 1 GiB moved per size, 5 to 200 iterations; see common.sweep_iters), in up to 5
batches whose median is taken (a hiccup of the shared machine moves one batch, not the figure;
common.sweep_batches), then averaged over ranks; #wrong counts the wrong elements of one extra, checked iteration (summed
over ranks). Rank 0 writes the results to --json.

Run by launch.py; options: --label NAME --json PATH [--quick] [--ops all_reduce,sendrecv]
[--max-size BYTES] [--min-size BYTES] [--repeat N]."""

import argparse
import datetime
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True, help="the mode's name in tables and plots")
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ops", default="all_reduce,sendrecv")
    ap.add_argument("--max-size", type=int, default=None)
    ap.add_argument("--min-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1, help="timed iterations x this (a longer run to profile)")
    a = ap.parse_args()
    ops = a.ops.split(",")
    for op in ops:
        if op not in ("all_reduce", "sendrecv"):
            ap.error(f"unknown op {op}")
    sizes = common.sweep_sizes(a.quick, min_size=a.min_size, max_size=a.max_size)

    torch, dist, rank, world, dev = common.init_dist()
    nxt, prv = common.ring_next(rank, world), common.ring_prev(rank, world)
    max_count = max(sizes) // 4
    sbuf = torch.zeros(max_count, dtype=torch.float32, device=dev)
    rbuf = torch.zeros(max_count, dtype=torch.float32, device=dev)
    tiny = torch.zeros(1, dtype=torch.float32, device=dev)

    def step(op, s, r):
        if op == "all_reduce":
            dist.all_reduce(s)
        else:
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, s, nxt), dist.P2POp(dist.irecv, r, prv)])
            for q in reqs:
                q.wait()

    def line_up():
        """All ranks start the timed loop together."""
        dist.all_reduce(tiny)
        torch.cuda.synchronize()

    def wrong_elements(op, s, r, count, salt):
        """One checked iteration; wrong elements on this rank."""
        s.copy_(common.pattern(torch, count, salt, dev).mul_(rank + 1))
        r.fill_(-1.0)
        step(op, s, r)
        torch.cuda.synchronize()
        if op == "all_reduce":
            got, exp = s.cpu(), common.pattern(torch, count, salt, "cpu").mul_(common.tri(world))
        else:
            got, exp = r.cpu(), common.pattern(torch, count, salt, "cpu").mul_(prv + 1)
        return int((got != exp).sum().item())

    v = common.versions(torch)
    result = {
        "label": a.label,
        "mode": os.environ.get("TCPXSHIM_SUITE_MODE", a.label),
        "world": world,
        "quick": a.quick,
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": v,
        "env": common.relevant_env(),
        "ops": {},
    }
    if rank == 0:
        print(f"# {a.label}: {world} ranks, torch {v['torch']}, NCCL {v['nccl']}", flush=True)
    t_all = time.perf_counter()
    total_wrong = 0
    for op in ops:
        rows = []
        if rank == 0:
            print(f"# {op}\n{common.TABLE_HEADER}", flush=True)
        for k, size in enumerate(sizes):
            count = size // 4
            s, r = sbuf[:count], rbuf[:count]
            warm, iters = common.sweep_iters(size, a.quick)
            iters *= max(1, a.repeat)
            s.zero_()  # repeated in-place sums of zeros stay zeros
            for _ in range(warm):
                step(op, s, r)
            line_up()
            nb = common.sweep_batches(iters)
            per = iters // nb
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(nb + 1)]
            marks[0].record()
            for b in range(nb):
                for _ in range(per):
                    step(op, s, r)
                marks[b + 1].record()
            marks[-1].synchronize()
            t_us = common.median([marks[b].elapsed_time(marks[b + 1]) * 1e3 / per for b in range(nb)])
            wrong = wrong_elements(op, s, r, count, k % 7)
            agg = torch.tensor([t_us, float(wrong)], dtype=torch.float64, device=dev)
            dist.all_reduce(agg)
            t_mean, wrong_all = agg[0].item() / world, int(agg[1].item())
            row = common.make_row(op, size, count, t_mean, world, wrong_all, iters)
            rows.append(row)
            total_wrong += wrong_all
            if rank == 0:
                print(common.table_row(row), flush=True)
        result["ops"][op] = rows
        if rank == 0:
            avg = sum(x["busbw"] for x in rows) / len(rows)
            print(f"# Avg bus bandwidth    : {avg:.4f}", flush=True)
    torch.cuda.synchronize()
    dist.destroy_process_group()
    dt = time.perf_counter() - t_all
    result["seconds"] = dt
    if rank == 0:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
        peak = {op: max(x["busbw"] for x in rows) for op, rows in result["ops"].items()}
        print(
            f"@@ sweep {a.label}: {len(sizes)} sizes x {len(ops)} ops in {dt:.1f} s; peak busbw "
            + ", ".join(f"{op} {bw:.2f} GB/s" for op, bw in peak.items())
            + f"; {total_wrong} wrong elements",
            flush=True,
        )
    return 0 if total_wrong == 0 else 1


if __name__ == "__main__":
    common.run_main(main)
