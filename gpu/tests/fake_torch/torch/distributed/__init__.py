"""Fake torch.distributed: the ranks (real processes started by launch.py) exchange every
operation's data through files in $TMPDIR/fakedist-<launcher pid>-<MASTER_PORT>/, and print
NCCL-like log lines (network chosen, channels, the shim's loaded/opened/closed lines with the
bytes this rank sent) in the formats logcheck.py reads.

FAKE_TORCH_FAULT=RANK:WHERE:WHAT injects a fault on one rank: WHERE is init or an operation name
(all_reduce, sendrecv, ...); WHAT is hang, crash, corrupt (one wrong element), warn (a shim WARN
line), bytes (counters 20% high).

With NCCL_TCPXSHIM_METRICS_DIR set (shim modes), a thread writes the shim's metrics file
DIR/<host>-<pid>.prom every NCCL_TCPXSHIM_METRICS_INTERVAL seconds (written aside, then renamed) and
once more at destroy_process_group, in the format of the shim's metrics: exact per-connection
byte and message counts. FAKE_TORCH_FAULT=RANK:metrics:bytes counts one byte too many per send."""

import json
import os
import socket
import threading
import time

import torch

_st = {}


class ReduceOp:
    SUM = "sum"


def isend(*_a, **_k):
    raise NotImplementedError("fake: use batch_isend_irecv")


def irecv(*_a, **_k):
    raise NotImplementedError("fake: use batch_isend_irecv")


class P2POp:
    def __init__(self, op, tensor, peer):
        self.op, self.tensor, self.peer = op, tensor, peer


class _Work:
    def wait(self):
        return True


def _log(level, msg):
    print(f"{socket.gethostname()}:{os.getpid()}:{os.getpid()} [0] NCCL {level} {msg}", flush=True)


def _fault(where):
    spec = os.environ.get("FAKE_TORCH_FAULT", "")
    if not spec:
        return None
    r, w, what = spec.split(":")
    if int(r) == _st["rank"] and w == where:
        if what == "hang":
            _log("INFO", f"fake: rank {_st['rank']} hangs in {where}")
            time.sleep(10**6)
        if what == "crash":
            raise RuntimeError(f"fake: rank {_st['rank']} crashes in {where}")
        return what
    return None


def _human(b):
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    v, u = float(b), 0
    while v >= 1024 and u + 1 < len(units):
        v /= 1024
        u += 1
    return f"{int(b)} B" if u == 0 else f"{v:.2f} {units[u]}"


def init_process_group(backend, rank, world_size, device_id=None, timeout=None):
    assert backend == "nccl"
    port = os.environ["MASTER_PORT"]
    d = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fakedist-{os.getppid()}-{port}")
    os.makedirs(d, exist_ok=True)
    _st.update(rank=rank, world=world_size, dir=d, seq=0, sent=0, recv=0, msgs=0, t0=time.time())
    plugin = os.environ.get("NCCL_NET_PLUGIN", "")
    shim = plugin not in ("", "none")
    _st["shim"] = shim
    name = "tcpxshim" if shim else os.environ.get("NCCL_NET", "Socket")
    _log("INFO", "NCCL version 2.28.9+fake")
    if shim:
        _log("INFO", f"NET/Plugin: Loaded net plugin from {plugin}")
        _log("INFO", "NET/TCPXSHIM loaded builtin TCP transport from (built-in) , 1 device(s), reporting name tcpxshim")
    if _fault("init") == "warn":
        _log("WARN", "NET/TCPXSHIM isend: fake warning to test the log check")
    _log("INFO", f"Using network {name}")
    nxt, prv = (rank + 1) % world_size, (rank - 1) % world_size
    # Like NCCL's topology search with one device per GPU (NCCL_TCPXSHIM_TCP_ADDRS with PCI paths):
    # each rank's channels use the device of its GPU; FAKE_TORCH_NETDEV=zero puts everyone on device 0.
    several = shim and "," in os.environ.get("NCCL_TCPXSHIM_TCP_ADDRS", "")
    dev = int(os.environ.get("TCPXSHIM_SUITE_GPU", "0")) if several else 0
    if os.environ.get("FAKE_TORCH_NETDEV") == "zero":
        dev = 0
    for ch in range(2):
        _log("INFO", f"Channel {ch:02d}/0 : {prv}[0] -> {rank}[0] [receive] via NET/{name}/{dev}")
        _log("INFO", f"Channel {ch:02d}/0 : {rank}[0] -> {nxt}[0] [send] via NET/{name}/{dev}")
        if shim:
            _log("INFO", f"NET/TCPXSHIM opened send comm #{2 * ch + 1} (dev 0, peer 127.0.0.1:{40000 + ch}, 4 streams)")
            _log("INFO", f"NET/TCPXSHIM opened recv comm #{2 * ch + 2} (dev 0, peer 127.0.0.1:{41000 + ch}, 4 streams)")
    _st["conns"] = {(d, ch): [0, 0] for d in ("send", "recv") for ch in range(2)}
    _st["metrics_extra"] = 1 if _fault("metrics") == "bytes" else 0
    if shim and os.environ.get("NCCL_TCPXSHIM_METRICS_DIR"):
        _st["metrics_lock"] = threading.Lock()
        _st["metrics_stop"] = threading.Event()
        _st["metrics_thread"] = threading.Thread(target=_metrics_loop, daemon=True)
        _st["metrics_thread"].start()
    _exchange("init", None)


def _metrics_text():
    rank, host = _st["rank"], socket.gethostname()
    lines = []
    for name, kind, col in (("tcpxshim_bytes_total", "counter", 0), ("tcpxshim_messages_total", "counter", 1),
                            ("tcpxshim_requests_in_flight", "gauge", None), ("tcpxshim_errors_total", "counter", None)):
        lines.append(f"# HELP {name} fake torch's stand-in for the shim's {name}")
        lines.append(f"# TYPE {name} {kind}")
        for (d, ch), v in sorted(_st["conns"].items()):
            comm = 2 * ch + (1 if d == "send" else 2)
            peer = f"127.0.0.1:{(40000 if d == 'send' else 41000) + ch}"
            labels = (f'rank="{rank}",local_rank="{rank}",host="{host}",comm="{comm}",dir="{d}",peer="{peer}",'
                      f'dev="0",transport="tcp"')
            lines.append(f"{name}{{{labels}}} {v[col] if col is not None else 0}")
    lines.append("# TYPE tcpxshim_connections gauge")
    lines.append(f'tcpxshim_connections{{rank="{rank}",local_rank="{rank}",host="{host}"}} {len(_st["conns"])}')
    return "\n".join(lines) + "\n"


def _metrics_write():
    d = os.environ["NCCL_TCPXSHIM_METRICS_DIR"]
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"{socket.gethostname()}-{os.getpid()}.prom")
    with _st["metrics_lock"]:
        tmp = os.path.join(d, f".{os.path.basename(path)}.tmp")
        with open(tmp, "w") as f:
            f.write(_metrics_text())
        os.rename(tmp, path)


def _metrics_loop():
    interval = int(os.environ.get("NCCL_TCPXSHIM_METRICS_INTERVAL", "10"))
    while not _st["metrics_stop"].wait(interval):
        _metrics_write()


def destroy_process_group():
    if _st.get("metrics_thread"):
        _st["metrics_stop"].set()
        _st["metrics_thread"].join()
        _metrics_write()  # like the shim's last write, when its last comm closes
    if _st.get("shim"):
        sent, recv = _st["sent"], _st["recv"]
        if _fault("destroy") == "bytes":
            sent *= 1.2
        open_s = time.time() - _st["t0"]
        for ch in range(2):
            m = _st["msgs"] // 2
            _log(
                "INFO",
                f"NET/TCPXSHIM closed send comm #{2 * ch + 1} (dev 0, peer 127.0.0.1:{40000 + ch}, 4 streams): "
                f"{m} messages, {_human(int(sent / 2))}, 0 errors, open {open_s:.1f} s",
            )
            _log(
                "INFO",
                f"NET/TCPXSHIM closed recv comm #{2 * ch + 2} (dev 0, peer 127.0.0.1:{41000 + ch}, 4 streams): "
                f"{m} messages, {_human(int(recv / 2))}, 0 errors, open {open_s:.1f} s",
            )
    _log("INFO", "comm destroyed")


def _exchange(what, payload):
    """Every rank's payload for this operation, by rank."""
    k = _st["seq"]
    _st["seq"] += 1
    d, r, w = _st["dir"], _st["rank"], _st["world"]
    tmp = f"{d}/{k}.{r}.tmp"
    with open(tmp, "w") as f:
        json.dump({"what": what, "p": payload}, f)
    os.rename(tmp, f"{d}/{k}.{r}.json")
    out = [None] * w
    deadline = time.time() + 60
    pause = 0.0002
    for q in range(w):
        path = f"{d}/{k}.{q}.json"
        while not os.path.exists(path):
            if time.time() > deadline:
                raise RuntimeError(f"fake dist: rank {q} never joined operation {k} ({what})")
            time.sleep(pause)
            pause = min(pause * 2, 0.01)
        with open(path) as f:
            got = json.load(f)
        if got["what"] != what:
            raise RuntimeError(f"fake dist: operation {k}: rank {r} does {what}, rank {q} does {got['what']}")
        out[q] = got["p"]
    return out


def _nbytes(t):
    return t.numel() * (8 if t.dtype in (torch.float64, torch.int64) else 4)


def _count(sent, recv):
    _st["sent"] += sent
    _st["recv"] += recv
    _st["msgs"] += 1
    # Per connection, exactly, split over the two channels as NCCL splits a ring's traffic.
    lock = _st.get("metrics_lock") or threading.Lock()
    with lock:
        for d, b in (("send", int(sent) + _st["metrics_extra"]), ("recv", int(recv))):
            for ch, part in enumerate((b // 2, b - b // 2)):
                c = _st["conns"][(d, ch)]
                c[0] += part
                c[1] += 1 if part else 0


def _maybe_corrupt(where, t):
    if _fault(where) == "corrupt" and t.numel() > 5:
        t._s[t._off + 5] += 1


def all_reduce(t, op=ReduceOp.SUM):
    assert op == ReduceOp.SUM
    vals = _exchange("all_reduce", t._vals())
    t._set([sum(col) for col in zip(*vals)])
    w = _st["world"]
    b = _nbytes(t) * 2 * (w - 1) / w
    _count(b, b)
    _maybe_corrupt("all_reduce", t)


def all_gather_into_tensor(out, inp):
    vals = _exchange("all_gather", inp._vals())
    out._set([v for part in vals for v in part])
    b = _nbytes(inp) * (_st["world"] - 1)
    _count(b, b)
    _maybe_corrupt("all_gather", out)


def reduce_scatter_tensor(out, inp, op=ReduceOp.SUM):
    assert op == ReduceOp.SUM
    vals = _exchange("reduce_scatter", inp._vals())
    n, r = out.numel(), _st["rank"]
    total = [sum(col) for col in zip(*vals)]
    out._set(total[r * n : (r + 1) * n])
    b = _nbytes(out) * (_st["world"] - 1)
    _count(b, b)
    _maybe_corrupt("reduce_scatter", out)


def broadcast(t, src):
    r = _st["rank"]
    vals = _exchange("broadcast", t._vals() if r == src else None)
    t._set(vals[src])
    _count(_nbytes(t), _nbytes(t))
    _maybe_corrupt("broadcast", t)


def batch_isend_irecv(ops):
    r = _st["rank"]
    payload = {str(o.peer): o.tensor._vals() for o in ops if o.op is isend}
    vals = _exchange("sendrecv", payload)
    sent = recv = 0
    for o in ops:
        if o.op is irecv:
            o.tensor._set(vals[o.peer][str(r)])
            recv += _nbytes(o.tensor)
            _maybe_corrupt("sendrecv", o.tensor)
        else:
            sent += _nbytes(o.tensor)
    _count(sent, recv)
    return [_Work() for _ in ops]


def barrier():
    _exchange("barrier", None)



