"""Shared by the GPU suite's programs: test data formulas, sizes, byte units, the nccl-tests table
format, and process-group setup. Everything at module level is pure Python (no torch), so the
suite's logic can be imported and tested on a machine without a GPU; torch is imported only inside
the functions that need it."""

import os
import sys

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# ---------------------------------------------------------------------------------------------
# Test data. Every input element is a small integer, so every float32 sum is exact and results
# can be compared bit for bit: rank r holds x[i] = (r + 1) * pattern(i, salt), with
# pattern(i, salt) = ((i + salt) % 7) + 1. The salt changes from one check to the next, so a
# result left over from the previous check (or an untouched buffer) never passes. 7 divides no
# power of two, so data shifted by a chunk (NCCL's chunks are powers of two) never passes either.
# ---------------------------------------------------------------------------------------------

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "sendrecv")


def pattern_value(i, salt):
    return ((i + salt) % 7) + 1


def input_value(rank, i, salt):
    """Element i of rank's input (for reduce_scatter, i runs over the whole world*n input)."""
    return (rank + 1) * pattern_value(i, salt)


def tri(world):
    """1 + 2 + ... + world: the sum over ranks of (rank + 1)."""
    return world * (world + 1) // 2


def ring_next(rank, world):
    return (rank + 1) % world


def ring_prev(rank, world):
    return (rank - 1) % world


def output_len(op, n, world):
    """Elements in one rank's result; n is the per-rank count (all_gather's input, reduce_scatter's
    output, the buffer of the others)."""
    return n * world if op == "all_gather" else n


def expected_value(op, rank, world, n, i, salt, root=0):
    """Element i of rank's result, from the formulas alone (an independent check of the tensors
    of expected values the programs build)."""
    if op == "all_reduce":
        return tri(world) * pattern_value(i, salt)
    if op == "all_gather":
        src, j = divmod(i, n)
        return input_value(src, j, salt)
    if op == "reduce_scatter":
        return tri(world) * pattern_value(rank * n + i, salt)
    if op == "broadcast":
        return input_value(root, i, salt)
    if op == "sendrecv":
        return input_value(ring_prev(rank, world), i, salt)
    raise ValueError(f"unknown op {op}")


def spot_indices(length):
    """A few indices to check against expected_value: both ends, the middle, and odd places."""
    if length <= 0:
        return []
    cand = [0, 1, 2, 6, 7, length // 3, length // 2, length - 2, length - 1, (length * 7) // 11]
    return sorted({i for i in cand if 0 <= i < length})


# ---------------------------------------------------------------------------------------------
# Sizes and iteration counts.
# ---------------------------------------------------------------------------------------------

COLLECTIVE_SIZES = [1, 3, 1000, 65537, MiB + 3, 16 * MiB, 64 * MiB]  # float32 elements
COLLECTIVE_SIZES_QUICK = [1, 3, 1000, 65537, MiB + 3, 4 * MiB]


def collective_sizes(quick):
    return list(COLLECTIVE_SIZES_QUICK if quick else COLLECTIVE_SIZES)


def sweep_sizes(quick, min_size=8, max_size=None):
    """Message sizes in bytes: 8 B to 256 MiB doubling (quick: x4 up to 128 MiB)."""
    step, top = (4, 128 * MiB) if quick else (2, 256 * MiB)
    if max_size is not None:
        top = max_size
    out, s = [], min_size
    while s <= top:
        out.append(s)
        s *= step
    return out


def sweep_iters(size, quick):
    """(warm-up, timed) iterations for one size of the sweep: enough iterations to move about
    1 GiB per size (256 MiB when quick), at least 5 (2) and at most 200 (20)."""
    target, lo, hi = (256 * MiB, 2, 20) if quick else (GiB, 5, 200)
    iters = max(lo, min(hi, target // max(size, 1)))
    warm = max(1, min(10 if quick else 20, iters // 4))
    return warm, iters


def sweep_batches(iters):
    """Timed batches of one size: 5 when there are at least 25 iterations (5 each), else 1."""
    return 5 if iters >= 25 else 1


def median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def busbw_factor(op, world):
    """nccl-tests' bus bandwidth factors."""
    if op == "all_reduce":
        return 2.0 * (world - 1) / world
    if op in ("all_gather", "reduce_scatter"):
        return (world - 1) / world
    return 1.0  # broadcast, sendrecv


def allreduce_ring_bytes_per_rank(size, world):
    """Bytes each rank sends for one ring all-reduce of `size` bytes (Simple protocol)."""
    return size * 2 * (world - 1) / world


# ---------------------------------------------------------------------------------------------
# Byte units: the shim prints byte counts like Rust's tcpxshim::metrics::human_bytes
# ("17 B", "1.50 KiB", "1.96 GiB").
# ---------------------------------------------------------------------------------------------

UNITS = ["B", "KiB", "MiB", "GiB", "TiB"]


def human_bytes(b):
    v, u = float(b), 0
    while v >= 1024.0 and u + 1 < len(UNITS):
        v /= 1024.0
        u += 1
    return f"{int(b)} B" if u == 0 else f"{v:.2f} {UNITS[u]}"


def parse_human_bytes(text):
    """'1.96 GiB' -> bytes (a float: the printed value is rounded to 2 decimals)."""
    parts = text.strip().split()
    if len(parts) != 2 or parts[1] not in UNITS:
        raise ValueError(f"not a byte count: {text!r}")
    return float(parts[0]) * (1024 ** UNITS.index(parts[1]))


def human_bytes_rel_error(text):
    """Largest relative error of a value printed by human_bytes (half a unit in the last place)."""
    parts = text.strip().split()
    if parts[1] == "B":
        return 0.0
    v = float(parts[0])
    return 0.005 / v if v > 0 else 1.0


def size_label(b):
    """Compact size for tables and plots: 8B, 4K, 2M, 1G."""
    for unit, scale in (("G", GiB), ("M", MiB), ("K", KiB)):
        if b >= scale and b % scale == 0:
            return f"{b // scale}{unit}"
    return f"{b}B"


# ---------------------------------------------------------------------------------------------
# The nccl-tests table format (out-of-place columns only).
# ---------------------------------------------------------------------------------------------

TABLE_HEADER = (
    "#       size         count      type   redop    root     time   algbw   busbw #wrong\n"
    "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)       "
)


def fmt_time_us(t):
    if t < 1e4:
        return f"{t:7.2f}"
    if t < 1e6:
        return f"{t:7.1f}"
    return f"{t:7.0f}"


def table_row(row):
    """One line as nccl-tests prints it; row has size, count, type, redop, root, time_us, algbw,
    busbw, wrong."""
    return (
        f"{row['size']:12d}  {row['count']:12d}  {row['type']:>8s}  {row['redop']:>6s}  {row['root']:6d}  "
        f"{fmt_time_us(row['time_us'])}  {row['algbw']:6.2f}  {row['busbw']:6.2f}  {row['wrong']:5d}"
    )


def make_row(op, size, count, time_us, world, wrong, iters):
    algbw = size / time_us / 1e3 if time_us > 0 else 0.0  # bytes/us/1e3 = GB/s
    return {
        "size": int(size),
        "count": int(count),
        "type": "float",
        "redop": "sum" if op == "all_reduce" else "none",
        "root": -1,
        "time_us": float(time_us),
        "algbw": algbw,
        "busbw": algbw * busbw_factor(op, world),
        "wrong": int(wrong),
        "iters": int(iters),
    }


def format_table(op, rows, title=None, where=None):
    where = where or ("in place" if op == "all_reduce" else "out of place")
    lines = [f"# {title + ': ' if title else ''}{op} ({where}; time averaged over ranks)"]
    lines.append(TABLE_HEADER)
    for r in rows:
        lines.append(table_row(r))
    if rows:
        avg = sum(r["busbw"] for r in rows) / len(rows)
        wrong = sum(r["wrong"] for r in rows)
        lines.append(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
        lines.append(f"# Avg bus bandwidth    : {avg:.4f}")
    return "\n".join(lines)


# Environment variables worth recording with a result.
def relevant_env(env=None):
    env = os.environ if env is None else env
    keys = [k for k in env if k.startswith(("NCCL_", "TORCH_NCCL_", "CUDA_MPS_"))]
    return {k: env[k] for k in sorted(keys)}


# ---------------------------------------------------------------------------------------------
# torch helpers (import torch lazily).
# ---------------------------------------------------------------------------------------------


def init_dist(timeout_s=180):
    """Joins the process group of this run (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the
    launcher), on the GPU TCPXSHIM_SUITE_GPU names (0 unless the launcher runs one rank per GPU),
    NCCL communicator created eagerly. Returns (torch, dist, rank, world, device)."""
    import datetime

    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    # Host-side checks run in every rank at once: share the cores instead of oversubscribing them.
    torch.set_num_threads(max(2, (os.cpu_count() or 8) // max(world, 1)))
    gpu = int(os.environ.get("TCPXSHIM_SUITE_GPU", "0"))
    torch.cuda.set_device(gpu)
    device = torch.device(f"cuda:{gpu}")
    dist.init_process_group(
        "nccl",
        rank=rank,
        world_size=world,
        device_id=device,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return torch, dist, rank, world, device


def versions(torch):
    nccl = torch.cuda.nccl.version()
    if isinstance(nccl, tuple):
        nccl = ".".join(str(x) for x in nccl)
    return {"torch": torch.__version__, "nccl": str(nccl), "cuda": str(torch.version.cuda)}


def pattern(torch, n, salt, device, start=0):
    """float32 tensor of pattern_value(i, salt) for i in [start, start + n)."""
    idx_type = torch.int32 if start + n + 8 < 2**31 else torch.int64
    i = torch.arange(start, start + n, dtype=idx_type, device=device)
    i.add_(salt).remainder_(7).add_(1)  # in place: a 64 Mi-element pattern needs no temporaries
    return i.to(torch.float32)


def flush_c_stdio():
    """Flushes C stdio buffers (NCCL's log) before a hard exit."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except Exception:
        pass


def run_main(main):
    """Runs main() -> exit code. An exception prints its traceback and leaves at once with
    os._exit, so that a rank whose peers are gone cannot hang in interpreter shutdown."""
    try:
        rc = main()
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        import traceback

        traceback.print_exc()
        print(f"@@ rank {os.environ.get('RANK', '?')}: FAILED with an exception (see above)", flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        flush_c_stdio()
        os._exit(1)
    sys.stdout.flush()
    sys.exit(rc)
