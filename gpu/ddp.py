#!/usr/bin/env python3
"""DistributedDataParallel training through NCCL, for comparing networks.

    ddp.py train --json PATH [--steps 30] [--step-sleep S]   one rank (run by launch.py): a 3-layer MLP on synthetic
        data, fixed seeds, every rank its own batches, DDP with 1 MiB buckets (several all-reduces
        a step); rank 0 writes its per-step losses and per-parameter sums to PATH. --step-sleep makes
        the run last (for connections dropped while it trains) without changing a number.
    ddp.py compare A.json B.json [--rtol 1e-6]   (pure Python) the two runs' losses step by step.

With 2 ranks each gradient element is the sum of two values, which is the same whatever order or
algorithm NCCL uses, so the same program over two networks should give identical losses."""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def train(a):
    # Deterministic cuBLAS; must be set before CUDA is initialised.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch, dist, rank, world, dev = common.init_dist()
    import torch.nn as nn
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)

    d_in, d_hidden, d_out, batch = 256, 1024, 10, 128
    torch.manual_seed(1234)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = nn.Sequential(
        nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out)
    ).to(dev)
    ddp = DDP(model, device_ids=[0], bucket_cap_mb=1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
    teacher = torch.randn(d_in, d_out, generator=torch.Generator().manual_seed(7))
    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches

    losses = []
    t0 = time.perf_counter()
    for step in range(a.steps):
        x = torch.randn(batch, d_in, generator=data)
        y = (x @ teacher).argmax(dim=1)
        x, y = x.to(dev), y.to(dev)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if a.step_sleep > 0:
            time.sleep(a.step_sleep)
        if rank == 0:
            print(f"STEP {step} loss {losses[-1]:.9f}", flush=True)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0

    # DDP keeps the replicas identical: check it bit for bit against rank 0's.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    differs = torch.tensor([0 if torch.equal(ref, flat) else 1], dtype=torch.int32, device=dev)
    dist.all_reduce(differs)
    n_differ = int(differs.item())
    param_sums = [p.detach().double().sum().item() for p in model.parameters()]
    torch.cuda.synchronize()
    dist.destroy_process_group()
    if rank == 0:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "mode": os.environ.get("TCPXSHIM_SUITE_MODE", "?"),
                    "world": world,
                    "steps": a.steps,
                    "losses": losses,
                    "param_sums": param_sums,
                    "replicas_differing": n_differ,
                    "seconds": dt,
                    "env": common.relevant_env(),
                    "versions": common.versions(torch),
                },
                f,
                indent=1,
            )
    print(
        f"@@ rank {rank}: {a.steps} steps in {dt:.2f} s, loss {losses[0]:.6f} -> {losses[-1]:.6f}; "
        f"replicas identical: {'yes' if n_differ == 0 else f'NO ({n_differ} differ from rank 0)'}",
        flush=True,
    )
    return 0 if n_differ == 0 else 1


def compare_runs(a, b, rtol):
    """(ok, lines) comparing two ddp.py JSON results."""
    lines, ok = [], True
    la, lb = a["losses"], b["losses"]
    if len(la) != len(lb) or not la:
        return False, [f"different or no steps: {len(la)} vs {len(lb)}"]
    max_abs, max_rel, first_bad, exact = 0.0, 0.0, None, 0
    for i, (x, y) in enumerate(zip(la, lb)):
        d = abs(x - y)
        rel = d / max(abs(x), abs(y), 1e-30)
        exact += x == y
        max_abs, max_rel = max(max_abs, d), max(max_rel, rel)
        if rel > rtol and first_bad is None:
            first_bad = (i, x, y)
    lines.append(
        f"losses, {len(la)} steps ({a.get('mode', '?')} vs {b.get('mode', '?')}): {exact} identical, "
        f"max abs diff {max_abs:.3e}, max rel diff {max_rel:.3e} (tolerance {rtol:g})"
    )
    lines.append(f"first/last loss: {la[0]:.6f}/{la[-1]:.6f} vs {lb[0]:.6f}/{lb[-1]:.6f}")
    if first_bad:
        ok = False
        i, x, y = first_bad
        lines.append(f"step {i}: loss {x!r} vs {y!r}")
    pa, pb = a.get("param_sums", []), b.get("param_sums", [])
    if len(pa) == len(pb) and pa:
        pd = max(abs(x - y) / max(abs(x), abs(y), 1e-30) for x, y in zip(pa, pb))
        same = sum(x == y for x, y in zip(pa, pb))
        lines.append(f"final parameter sums: {same}/{len(pa)} identical, max rel diff {pd:.3e}")
        if pd > rtol:
            ok = False
    else:
        ok = False
        lines.append("parameter sums missing or of different lengths")
    for r in (a, b):
        if r.get("replicas_differing", 0):
            ok = False
            lines.append(f"{r.get('mode', '?')}: {r['replicas_differing']} ranks' parameters differ from rank 0's")
    return ok, lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--json", required=True)
    t.add_argument("--steps", type=int, default=30)
    t.add_argument("--step-sleep", type=float, default=0.0)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--rtol", type=float, default=1e-6)
    a = ap.parse_args()
    if a.cmd == "train":
        return train(a)
    try:
        with open(a.a) as f:
            ra = json.load(f)
        with open(a.b) as f:
            rb = json.load(f)
    except (OSError, ValueError) as e:
        print(f"FAIL ddp comparison: cannot read results: {e}", flush=True)
        return 1
    ok, lines = compare_runs(ra, rb, a.rtol)
    for line in lines:
        print(f"  {line}")
    print(f"{'PASS' if ok else 'FAIL'} ddp comparison {ra.get('mode', '?')} vs {rb.get('mode', '?')}: {lines[0]}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        common.run_main(main)
    else:
        sys.exit(main())
