#!/usr/bin/env python3
"""Raw loopback TCP throughput: the ceiling the shim's built-in transport is compared with.

    python3 gpu/rawtcp.py [--streams 1,2,4,8] [--seconds 2] [--write 4M] [--both] [--netns A,B --addrs IP_A,IP_B]

Each stream is one TCP connection over 127.0.0.1 with a thread writing WRITE-byte buffers and a
thread reading them, for SECONDS; the figure is the bytes received over the elapsed time, summed
over the streams. --both also runs every stream count with traffic in both directions at once (two
connections per stream, one each way), which is what a 2-rank all-reduce or send/recv puts on
loopback. Plain sockets, no NCCL, no plugin: what the kernel gives. With --netns, each connection's
listening end is made in network namespace A on IP_A and its connecting end in B (sockets keep the
namespace they were made in, so one process can hold both): the path between two namespaces.
"""

import argparse
import os
import socket
import threading
import time



def parse_bytes(text):
    """'4M' -> 4194304 (suffixes K, M, G: powers of 1024)."""
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    return int(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else int(t)


# (namespace of the listening end, its address, namespace of the connecting end); None: loopback.
PATH = None


def _setns(name):
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            e = ctypes.get_errno()
            raise OSError(e, f"setns into {name}: {os.strerror(e)}")
    finally:
        os.close(fd)


def _pair():
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if PATH is None:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
        c = socket.create_connection(lst.getsockname(), timeout=10)
    else:
        ns_a, addr_a, ns_b = PATH
        lst.close()
        _setns(ns_a)
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.bind((addr_a, 0))
        lst.listen(1)
        _setns(ns_b)
        c = socket.create_connection(lst.getsockname(), timeout=10)
    s, _ = lst.accept()
    lst.close()
    for so in (c, s):
        so.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        so.settimeout(10)
    return c, s


def run(streams, seconds, write, both, cpus=None):
    """Returns the received GB/s of `streams` connections (twice that many with `both`). cpus:
    (CPU of the listening ends' threads, CPU of the connecting ends'), as two ranks bound to one
    core each would run; None: not pinned."""
    pairs = [_pair() for _ in range(streams * (2 if both else 1))]
    got = [0] * len(pairs)
    stop = threading.Event()

    def pin(cpu):
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # this thread only

    def sender(sock, cpu=None):
        pin(cpu)
        buf = bytearray(write)
        try:
            while not stop.is_set():
                sock.sendall(buf)
        except OSError:
            pass
        finally:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def receiver(i, sock, cpu=None):
        pin(cpu)
        buf = bytearray(write)
        view = memoryview(buf)
        try:
            while True:
                n = sock.recv_into(view)
                if n == 0:
                    return
                got[i] += n
        except OSError:
            pass

    threads = []
    for i, (c, s) in enumerate(pairs):
        cpu_c, cpu_s = (cpus[1], cpus[0]) if cpus else (None, None)
        if both and i % 2:
            c, s = s, c  # every other connection the other way
            cpu_c, cpu_s = cpu_s, cpu_c
        threads.append(threading.Thread(target=sender, args=(c, cpu_c), daemon=True))
        threads.append(threading.Thread(target=receiver, args=(i, s, cpu_s), daemon=True))
    for t in threads:
        t.start()
    time.sleep(0.3)  # let the windows open
    base = sum(got)
    t0 = time.perf_counter()
    time.sleep(seconds)
    moved = sum(got) - base
    dt = time.perf_counter() - t0
    stop.set()
    for t in threads:
        t.join(timeout=15)
    for c, s in pairs:
        c.close()
        s.close()
    return moved / dt / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", default="1,2,4,8", help="stream counts, comma separated")
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds per measurement")
    ap.add_argument("--write", default="4M", help="bytes per write (K/M suffixes)")
    ap.add_argument("--both", action="store_true", help="also measure both directions at once")
    ap.add_argument("--cpus", help="A,B: the listening ends' threads on CPU A, the connecting ends' on CPU B "
                    "(two ranks bound to one core each)")
    ap.add_argument("--netns", help="A,B: listening ends in namespace A, connecting ends in B")
    ap.add_argument("--addrs", help="IP_A,IP_B: the addresses in A and B (with --netns)")
    a = ap.parse_args()
    write = parse_bytes(a.write)
    global PATH
    where = "loopback"
    if a.netns:
        ns, addrs = a.netns.split(","), (a.addrs or "").split(",")
        if len(ns) != 2 or len(addrs) != 2:
            ap.error("--netns and --addrs want two values each")
        PATH = (ns[0], addrs[0], ns[1])
        where = f"{ns[0]} ({addrs[0]}) <- {ns[1]} ({addrs[1]})"
    cpus = tuple(int(x) for x in a.cpus.split(",")) if a.cpus else None
    if cpus and len(cpus) != 2:
        ap.error("--cpus wants two CPU numbers")
    print(f"raw {where} TCP, {a.write} writes, {a.seconds:g} s per figure"
          + (f", each end's threads on one CPU ({cpus[0]} and {cpus[1]})" if cpus else ""))
    print(f"{'streams':>8} {'one way GB/s':>13}" + (f" {'both ways GB/s (sum)':>21}" if a.both else ""))
    for n in [int(x) for x in a.streams.split(",") if x]:
        one = run(n, a.seconds, write, False, cpus)
        line = f"{n:>8} {one:>13.2f}"
        if a.both:
            line += f" {run(n, a.seconds, write, True, cpus):>21.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
