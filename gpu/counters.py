#!/usr/bin/env python3
"""One rank of the counters run: after init and WARMUP all-reduces, K all-reduces of S bytes,
then the process group is destroyed so that NCCL closes its net comms and the shim logs each
one's counters ("NET/TCPXSHIM closed send comm #5 (...): 2545 messages, 1.96 GiB, 0 errors,
open 0.7 s"). Rank 0 writes what was done to --json; logcheck.py counters then compares the
bytes on each rank's send comms with what the ring all-reduce had to send (2(n-1)/n x S each).
Run it with NCCL_PROTO=Simple NCCL_ALGO=Ring: LL and LL128 send flags along with the data.

Run by launch.py; options: --iters K --size S --warmup W --json PATH."""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--size", type=int, default=64 * common.MiB, help="bytes per all-reduce (multiple of 4)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    if a.size % 4:
        ap.error("--size must be a multiple of 4")

    torch, dist, rank, world, dev = common.init_dist()
    x = torch.zeros(a.size // 4, dtype=torch.float32, device=dev)  # zeros stay zeros: no overflow
    for _ in range(a.warmup):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.iters):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    dist.destroy_process_group()
    per_rank = common.allreduce_ring_bytes_per_rank(a.size, world) * (a.iters + a.warmup)
    spec = {
        "world": world,
        "size": a.size,
        "iters": a.iters,
        "warmup": a.warmup,
        "expected_send_bytes_per_rank": per_rank,
        "seconds": dt,
        "env": common.relevant_env(),
        "versions": common.versions(torch),
    }
    if rank == 0:
        with open(a.json, "w") as f:
            json.dump(spec, f, indent=1)
    print(
        f"@@ rank {rank}: {a.iters} all_reduce of {common.human_bytes(a.size)} (+{a.warmup} warm-up) in {dt:.2f} s; "
        f"this rank should have sent {common.human_bytes(int(per_rank))}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    common.run_main(main)
