#!/usr/bin/env python3
"""One rank of the communicator churn run: after the world group, --cycles times a new NCCL
group of all ranks (PyTorch new_group), one all_reduce of 1 Mi floats on it (checked: the sum of
every rank's value), and its destruction, as jobs do with pipeline, expert-parallel and re-created
groups. Rank 0 prints one CHURN line per cycle and a summary line with the median cycle time.

Under the shim with its metrics on (modes shim-churn and shim-churn-nopool), the summary also
gives the plugin's share: the time NCCL spent in the shim's connect and accept calls (first call
to the one returning the comm, from the metrics' histograms) per cycle, and the pool's hits; the
rest of a cycle is NCCL's own set-up (bootstrap, topology, proxy threads) and PyTorch's.

Run by launch.py; options: --cycles N (20), --json PATH (rank 0 writes its figures there)."""

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import prom  # noqa: E402


def shim_figures():
    """This process's shim metrics file: connect and accept seconds and counts, pool counts."""
    d = os.environ.get("NCCL_TCPXSHIM_METRICS_DIR")
    if not d:
        return None
    files = glob.glob(os.path.join(d, f"*-{os.getpid()}.prom"))
    if not files:
        return None
    s = prom.parse(open(files[0]).read())
    out = {}
    for op in ("connect", "accept"):
        out[f"{op}_s"] = float(prom.total(s, "tcpxshim_connect_duration_seconds_sum", op=op))
        out[f"{op}s"] = int(prom.total(s, "tcpxshim_connect_duration_seconds_count", op=op))
    for k in ("hits", "misses", "evictions"):
        out[f"pool_{k}"] = int(prom.total(s, f"tcpxshim_pool_{k}_total"))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch, dist, rank, world, dev = common.init_dist()
    n = 1 << 20
    want = float(world * (world + 1) // 2)
    before = shim_figures() if rank == 0 else None
    times = []
    for c in range(a.cycles):
        t0 = time.perf_counter()
        g = dist.new_group(ranks=list(range(world)), backend="nccl")
        x = torch.full((n,), float(rank + 1), dtype=torch.float32, device=dev)
        dist.all_reduce(x, group=g)
        torch.cuda.synchronize()
        bad = int((x != want).sum().item())
        dist.destroy_process_group(g)
        dt = time.perf_counter() - t0
        times.append(dt)
        if bad:
            print(f"CHURN MISMATCH cycle {c} rank {rank}: {bad} of {n} elements wrong (want {want})", flush=True)
            return 1
        if rank == 0:
            print(f"CHURN cycle {c}: {dt * 1e3:.1f} ms", flush=True)
    mode = os.environ.get("TCPXSHIM_SUITE_MODE", "?")
    if rank == 0:
        # The metrics file is written every second: wait for one written after the last cycle.
        time.sleep(2.5)
        after = shim_figures()
        med = common.median(times[1:]) if len(times) > 1 else times[0]
        line = f"CHURN summary {mode}: {a.cycles} cycles, median {med * 1e3:.1f} ms per cycle (first {times[0] * 1e3:.1f} ms)"
        fig = {"mode": mode, "cycles": a.cycles, "median_ms": med * 1e3, "times_ms": [t * 1e3 for t in times]}
        if before and after:
            d = {k: after[k] - before.get(k, 0) for k in after}
            per = (d["connect_s"] + d["accept_s"]) / a.cycles
            line += (
                f"; in the shim's connect and accept {per * 1e3:.2f} ms per cycle ({d['connects']} connects, "
                f"{d['accepts']} accepts; pool: {d['pool_hits']} reused, {d['pool_misses']} misses)"
            )
            fig.update(shim=d, shim_ms_per_cycle=per * 1e3)
        print(f"@@ {line}", flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(fig, f, indent=1)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    common.run_main(main)
