"""One rank of the GPU smoke test: collectives through NCCL over the network plugin, checked
against values computed independently, then a short all-reduce timing."""
import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> int:
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda:0"))
    expected_sum = world * (world + 1) / 2
    for n in [1, 7, 1000, 1 << 16, (1 << 20) + 3, 16 << 20]:
        x = torch.full((n,), float(rank + 1), device="cuda")
        dist.all_reduce(x)
        torch.cuda.synchronize()
        if not torch.all(x == expected_sum):
            print(f"rank {rank}: all_reduce of {n} floats wrong: {x[:4].tolist()}", flush=True)
            return 1
        g = [torch.empty(n, device="cuda") for _ in range(world)]
        dist.all_gather(g, torch.full((n,), float(rank), device="cuda"))
        if not all(torch.all(t == i) for i, t in enumerate(g)):
            print(f"rank {rank}: all_gather of {n} floats wrong", flush=True)
            return 1
    # Timing: all-reduce busbw at a few sizes (bytes), 2(n-1)/n algbw.
    for nbytes in [8, 1 << 21, 32 << 20, 128 << 20]:
        x = torch.ones(max(nbytes // 4, 2), device="cuda")
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        iters = 20 if nbytes >= (32 << 20) else 100
        t = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / iters
        busbw = nbytes / dt * 2 * (world - 1) / world / 1e9
        if rank == 0:
            print(f"TIMING {os.environ.get('SMOKE_LABEL', '?')} all_reduce {nbytes} B: {dt * 1e6:.1f} us, busbw {busbw:.2f} GB/s", flush=True)
    dist.destroy_process_group()
    print(f"rank {rank}: OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
