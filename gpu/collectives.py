#!/usr/bin/env python3
"""One rank of the correctness run: all_reduce (sum), all_gather, reduce_scatter, broadcast from
each root, and ring send/recv (rank r sends to r+1, receives from r-1), float32, sizes from 1
element to 64 Mi elements (256 MiB), each result compared element by element with values
computed on the host from the known inputs (see common.py: small integers, exact sums), and a
few elements also against the pure-Python formulas. One CHECK line per check; exit 1 on any
mismatch, naming collective, size, rank and first bad index.

Run by launch.py (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); options: --quick, --sizes N,N,..."""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def plan(world):
    """The checks for one size, in order: (op, root)."""
    return (
        [("all_reduce", 0), ("all_gather", 0), ("reduce_scatter", 0)]
        + [("broadcast", root) for root in range(world)]
        + [("sendrecv", 0)]
    )


def run_op(torch, dist, op, n, salt, root, rank, world, dev):
    """Runs one collective on fresh inputs; returns this rank's result tensor (on the GPU)."""
    mine = rank + 1
    sentinel = -1.0  # no correct result element is negative
    if op == "all_reduce":
        x = common.pattern(torch, n, salt, dev).mul_(mine)
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x
    if op == "all_gather":
        x = common.pattern(torch, n, salt, dev).mul_(mine)
        out = torch.full((world * n,), sentinel, dtype=torch.float32, device=dev)
        dist.all_gather_into_tensor(out, x)
        return out
    if op == "reduce_scatter":
        x = common.pattern(torch, world * n, salt, dev).mul_(mine)
        out = torch.full((n,), sentinel, dtype=torch.float32, device=dev)
        dist.reduce_scatter_tensor(out, x, op=dist.ReduceOp.SUM)
        return out
    if op == "broadcast":
        if rank == root:
            x = common.pattern(torch, n, salt, dev).mul_(mine)
        else:
            x = torch.full((n,), sentinel, dtype=torch.float32, device=dev)
        dist.broadcast(x, src=root)
        return x
    if op == "sendrecv":
        send = common.pattern(torch, n, salt, dev).mul_(mine)
        recv = torch.full((n,), sentinel, dtype=torch.float32, device=dev)
        ops = [
            dist.P2POp(dist.isend, send, common.ring_next(rank, world)),
            dist.P2POp(dist.irecv, recv, common.ring_prev(rank, world)),
        ]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        return recv
    raise ValueError(op)


def expected_chunks(torch, op, n, salt, root, rank, world):
    """The expected result, computed on the host, as (offset, tensor) pieces."""
    if op == "all_reduce":
        return [(0, common.pattern(torch, n, salt, "cpu").mul_(common.tri(world)))]
    if op == "all_gather":
        p = common.pattern(torch, n, salt, "cpu")
        return [(src * n, p * (src + 1)) for src in range(world)]
    if op == "reduce_scatter":
        return [(0, common.pattern(torch, n, salt, "cpu", start=rank * n).mul_(common.tri(world)))]
    if op == "broadcast":
        return [(0, common.pattern(torch, n, salt, "cpu").mul_(root + 1))]
    if op == "sendrecv":
        return [(0, common.pattern(torch, n, salt, "cpu").mul_(common.ring_prev(rank, world) + 1))]
    raise ValueError(op)


def compare(torch, got_cpu, op, n, salt, root, rank, world):
    """None if right, else a description of the first bad element."""
    length = common.output_len(op, n, world)
    if got_cpu.numel() != length:
        return f"result has {got_cpu.numel()} elements, expected {length}"
    nbad, first = 0, None
    for off, exp in expected_chunks(torch, op, n, salt, root, rank, world):
        got = got_cpu[off : off + exp.numel()]
        if torch.equal(got, exp):
            continue
        bad = (got != exp).nonzero()
        nbad += bad.shape[0]
        if first is None:
            j = int(bad[0, 0].item())
            first = (off + j, got[j].item(), exp[j].item())
    # Independent spot check of the expectation itself (pure-Python formulas).
    for i in common.spot_indices(length):
        want = common.expected_value(op, rank, world, n, i, salt, root)
        v = got_cpu[i].item()
        if v != want and (first is None or i < first[0]):
            nbad = max(nbad, 1)
            first = (i, v, float(want))
    if first is None:
        return None
    i, g, e = first
    return f"first bad index {i}: got {g}, expected {e} ({nbad} of {length} elements wrong)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", help="comma-separated element counts (default: the suite's list)")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else common.collective_sizes(a.quick)

    torch, dist, rank, world, dev = common.init_dist()
    v = common.versions(torch)
    print(f"@@ rank {rank}/{world}: torch {v['torch']}, NCCL {v['nccl']}, sizes {sizes}", flush=True)
    mode = os.environ.get("TCPXSHIM_SUITE_MODE", "?")
    failures, checks, k = [], 0, 0
    t_all = time.perf_counter()
    for n in sizes:
        for op, root in plan(world):
            salt = k % 7
            k += 1
            name = f"broadcast(root {root})" if op == "broadcast" else op
            t0 = time.perf_counter()
            got = run_op(torch, dist, op, n, salt, root, rank, world, dev)
            torch.cuda.synchronize()
            t_op = time.perf_counter() - t0
            got_cpu = got.cpu()
            del got
            err = compare(torch, got_cpu, op, n, salt, root, rank, world)
            del got_cpu
            checks += 1
            what = f"{name} of {n} floats ({common.human_bytes(4 * n)}) on rank {rank} of {world}"
            if err:
                failures.append(f"{what}: {err}")
                print(f"CHECK MISMATCH {what}: {err}", flush=True)
            else:
                print(f"CHECK OK {what} ({t_op * 1e3:.1f} ms)", flush=True)
    torch.cuda.synchronize()
    dist.destroy_process_group()
    dt = time.perf_counter() - t_all
    if failures:
        print(f"@@ rank {rank}: {len(failures)} of {checks} checks FAILED (mode {mode}, {dt:.1f} s); first: {failures[0]}", flush=True)
        return 1
    print(f"@@ rank {rank}: all {checks} checks passed (mode {mode}, {dt:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    common.run_main(main)
