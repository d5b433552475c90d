#!/usr/bin/env python3
"""One rank of the metrics run: the shim's metrics files (NCCL_TCPXSHIM_METRICS_DIR, rewritten
every NCCL_TCPXSHIM_METRICS_INTERVAL seconds) against the traffic of K ring all-reduces of S bytes.

After init, W warm-up all-reduces and a barrier, the rank waits until the shim has rewritten its own
file (DIR/<host>-<pid>.prom) and the file's send and receive byte totals stayed the same over two
consecutive writes: snapshot A. Then K timed all-reduces, a synchronize, and the same wait:
snapshot B. The difference B - A of this rank's summed tcpxshim_bytes_total{dir="send"} must be
K x S x 2(n-1)/n exactly, and the same for dir="recv". Run it with NCCL_PROTO=Simple
NCCL_ALGO=Ring: LL and LL128 send flags along with the data.

Each rank writes its result to --json (with {rank} replaced by its rank) and snapshots A and B next
to it (<json>.A.prom, <json>.B.prom), prints both numbers on its '@@' line, and exits 1 when a delta
is not exact or a snapshot could not be taken.

Run by launch.py; options: --iters K --size S --warmup W --json PATH --wait-s SECONDS."""

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import prom  # noqa: E402


def expected_bytes(size, iters, world):
    """Bytes each rank sends (and receives) in iters ring all-reduces of size bytes, as an exact
    integer; ValueError when the ring's share is not a whole number of bytes."""
    num = iters * size * 2 * (world - 1)
    if num % world:
        raise ValueError(f"{iters} x {size} B x 2({world}-1)/{world} is not a whole number of bytes")
    return num // world


def check_delta(a, b, size, iters, world):
    """The result of one rank from its snapshots A and B (lists of prom samples)."""
    want = expected_bytes(size, iters, world)
    ta, tb = prom.rank_bytes(a), prom.rank_bytes(b)
    r = {"expected": want}
    for d in ("send", "recv"):
        delta = tb[d] - ta[d]
        r[d] = {"a": ta[d], "b": tb[d], "delta": delta, "exact": isinstance(delta, int) and delta == want}
    r["ok"] = r["send"]["exact"] and r["recv"]["exact"]
    return r


def own_file(mdir, pid):
    """This process's metrics file: DIR/<host>-<pid>.prom (None while there is none)."""
    found = sorted(p for p in glob.glob(os.path.join(glob.escape(mdir), f"*-{pid}.prom"))
                   if not os.path.basename(p).startswith("."))
    return found[0] if found else None


def read_version(path):
    """(identity, text) of the file now at path, or None: the identity (inode, mtime, size) of the
    very file read changes with every write (each is a new file renamed into place)."""
    try:
        with open(path) as f:
            st = os.fstat(f.fileno())
            return (st.st_ino, st.st_mtime_ns, st.st_size), f.read()
    except OSError:
        return None


def wait_stable(find, after, timeout, poll=0.05, clock=time.monotonic, sleep=time.sleep):
    """Waits for writes of the file find() names made after the version `after` (an identity, or
    None), until two consecutive ones have the same send and receive totals. Returns (identity,
    text, samples, writes seen), or raises TimeoutError saying what was seen."""
    deadline = clock() + timeout
    last, prev_totals, seen = after, None, 0
    while True:
        path = find()
        v = read_version(path) if path else None
        if v is not None and v[0] != last:
            last = v[0]
            seen += 1
            samples = prom.parse(v[1])
            totals = prom.rank_bytes(samples)
            if totals == prev_totals:
                return v[0], v[1], samples, seen
            prev_totals = totals
        if clock() > deadline:
            what = "no metrics file" if path is None else f"{seen} new writes, last totals {prev_totals}"
            raise TimeoutError(f"no two consecutive writes with the same byte totals within {timeout:.0f} s ({what})")
        sleep(poll)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--size", type=int, default=64 * common.MiB, help="bytes per all-reduce (multiple of 4)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", required=True, help="result file; {rank} is replaced by the rank")
    ap.add_argument("--wait-s", type=float, default=None, help="longest wait for a stable file (4 intervals + 10 s)")
    a = ap.parse_args()
    if a.size % 4:
        ap.error("--size must be a multiple of 4")
    mdir = os.environ.get("NCCL_TCPXSHIM_METRICS_DIR", "")
    if not mdir:
        ap.error("NCCL_TCPXSHIM_METRICS_DIR is not set")
    interval = int(os.environ.get("NCCL_TCPXSHIM_METRICS_INTERVAL", "10"))
    wait_s = a.wait_s if a.wait_s is not None else 4 * interval + 10

    torch, dist, rank, world, dev = common.init_dist()
    pid = os.getpid()
    out = a.json.replace("{rank}", str(rank))
    want = expected_bytes(a.size, a.iters, world)
    x = torch.zeros(a.size // 4, dtype=torch.float32, device=dev)  # zeros stay zeros: no overflow
    for _ in range(a.warmup):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()

    def find():
        return own_file(mdir, pid)

    result = {"rank": rank, "world": world, "size": a.size, "iters": a.iters, "warmup": a.warmup, "pid": pid,
              "metrics_dir": mdir, "interval_s": interval, "expected": want, "env": common.relevant_env(),
              "versions": common.versions(torch)}
    error = None
    try:
        before = read_version(find()) if find() else None
        t = time.monotonic()
        ida, text_a, a_samples, seen_a = wait_stable(find, before[0] if before else None, wait_s)
        result["wait_a_s"], result["writes_a"] = time.monotonic() - t, seen_a
        t0 = time.perf_counter()
        for _ in range(a.iters):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        result["seconds"] = dt
        t = time.monotonic()
        _, text_b, b_samples, seen_b = wait_stable(find, ida, wait_s)
        result["wait_b_s"], result["writes_b"] = time.monotonic() - t, seen_b
        result["file"] = os.path.basename(find())
        base = out[:-5] if out.endswith(".json") else out
        for tag, text in (("A", text_a), ("B", text_b)):
            with open(f"{base}.{tag}.prom", "w") as f:
                f.write(text)
        result.update(check_delta(a_samples, b_samples, a.size, a.iters, world))
        result["ranks_labelled"] = sorted(prom.ranks(b_samples))
    except (TimeoutError, ValueError) as e:
        error = str(e)
        result.update(ok=False, error=error)
    dist.destroy_process_group()
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    if error:
        print(f"@@ rank {rank}: METRICS FAILED: {error}", flush=True)
        return 1
    s, r = result["send"], result["recv"]
    word = "exact" if result["ok"] else "MISMATCH"
    print(
        f"@@ rank {rank}: {a.iters} all_reduce of {common.human_bytes(a.size)} in {result['seconds']:.2f} s; metrics "
        f"{word}: send delta {s['delta']} B, recv delta {r['delta']} B, expected {want} B "
        f"({result['writes_a']}+{result['writes_b']} writes waited for)",
        flush=True,
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    common.run_main(main)
