#!/usr/bin/env python3
"""Stand-in for an nccl-tests binary (<op>_perf, by the name it is started as): checks that the
rank looks like its own host (hostname and NCCL_HOSTID tcpxshim-host<r>), then rank 0 prints a
table in nccl-tests 2.19.6's format for -b to -e by -f. FAKE_NT_WRONG=<op> makes that operation
report one wrong value at its largest size."""
import os
import socket
import sys

op = os.path.basename(sys.argv[0])[: -len("_perf")]
rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
world = int(os.environ["OMPI_COMM_WORLD_SIZE"])
host = f"tcpxshim-host{rank}"
if socket.gethostname() != host or os.environ.get("NCCL_HOSTID") != host:
    print(f"fake {op}: rank {rank}: hostname {socket.gethostname()}, NCCL_HOSTID {os.environ.get('NCCL_HOSTID')}")
    sys.exit(3)
if os.environ.get("TCPXSHIM_NETNS"):
    # The real binaries call MPI_Init, which the preloaded library wraps.
    pre = os.environ.get("LD_PRELOAD", "")
    with open(pre, "rb") as f:
        if b"MPI_Init" not in f.read():
            print(f"fake {op}: LD_PRELOAD {pre} has no MPI_Init")
            sys.exit(5)
log = os.environ.get("NCCL_DEBUG_FILE")
if log:
    with open(log, "w") as f:
        f.write(f"fake NCCL log of rank {rank}: NCCL_NET_PLUGIN={os.environ.get('NCCL_NET_PLUGIN')}\n")


def size(t):
    m = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(t[:-1]) * m[t[-1]] if t[-1] in m else int(t)


a = sys.argv[1:]
opt = {a[i]: a[i + 1] for i in range(0, len(a) - 1, 2)}
lo, hi, f = size(opt["-b"]), size(opt["-e"]), int(opt["-f"])
if opt.get("-c") != "1":
    sys.exit(4)
if rank != 0:
    sys.exit(0)
shim = os.environ.get("NCCL_NET_PLUGIN", "none") != "none"
print("# nccl-tests version 2.19.6 nccl-headers=22803 nccl-library=22803")
print(f"# Collective test starting: {op}_perf")
print("#")
print("#       size         count      type   redop    root     time   algbw   busbw  #wrong     time   algbw   busbw  #wrong ")
print("#        (B)    (elements)                               (us)  (GB/s)  (GB/s)             (us)  (GB/s)  (GB/s)         ")
s, wrong_total = lo, 0
while s <= hi:
    t = 20.0 + s / (8e3 if shim else 3e3)
    bw = s / t / 1e3
    wrong = 1 if os.environ.get("FAKE_NT_WRONG") == op and s * f > hi else 0
    wrong_total += wrong
    redop = "sum" if op in ("all_reduce", "reduce_scatter") else "none"
    ip = "N/A" if op in ("sendrecv", "alltoall") else "0"
    print(f"{s:12d}  {max(1, s // 4):12d}  {'float':>8s}  {redop:>6s}  {-1:6d}  {t:7.2f}  {bw:6.2f}  {bw * (world - 1) / world * 2:6.2f}  "
          f"{wrong:6d}  {t:7.2f}  {bw:6.2f}  {bw:6.2f}  {ip:>6s}")
    s *= f
print(f"# Out of bounds values : {wrong_total} {'FAILED' if wrong_total else 'OK'}")
print("# Avg bus bandwidth    : 1.0 ")
print("#")
sys.exit(0)
