#!/usr/bin/env python3
"""NVIDIA's nccl-tests under mpirun, through the shim and through NCCL's Socket transport.

    nccltests.py build --src SRC --builddir DIR
        builds every *_perf of an nccl-tests checkout (MPI=1, against the system NCCL; MPI_HOME,
        NCCL_HOME, CUDA_HOME and NVCC_GENCODE from the environment, else this machine's defaults).
        Warns when the checkout is not the pinned version (PINNED).
    nccltests.py run --bindir DIR --mode MODE [--plugin SO] --ranks N --bind default|none
                     --logdir DIR --json OUT [--ops all_reduce,...] [--min 8] [--max 128M] [--factor 4]
                     [--iters 20] [--warmup 5] [--repeat 1] [--netns NS0,NS1] [--ifname IF]
                     [--env K=V ...] [--profile] [--timeout 240]
        one mpirun per operation (and per repeat): N ranks on GPU 0, each its own host (a UTS
        namespace with hostname tcpxshim-host<r>, NCCL_HOSTID), mpirun's default binding or
        --bind-to none, nccl-tests' byte checks on (-c 1). MODE is one of launch.py's MODES.
        --netns puts rank r in network namespace NS<r> (made beforehand: `netns up`); --ifname
        is then the interface NCCL and the shim use. --profile samples every thread's CPU use
        while each operation runs (threadprof.py). Writes OUT (sweeps.json format, with nccl-tests'
        in-place figures as well) and, per operation, the output as nccl-tests printed it.
        Exit status 0 when every run exited 0 with 0 wrong values.
    nccltests.py rank -- PROGRAM ARGS...
        the wrapper mpirun starts for each rank (rank from OMPI_COMM_WORLD_RANK). With --netns,
        run preloads netns_mpi.c (compiled with cc) into every rank: right after MPI_Init, the
        rank moves into its namespace (before, it could not reach mpirun).
    nccltests.py netns up|down --ip IP [--names NS0,NS1] [--addrs A0,A1] [--mtu 1500]
        two network namespaces joined by a veth pair (tsv0 in NS0 with A0, tsv1 in NS1 with A1):
        a two-host path on one machine. IP is the `ip` command (iproute2).
    nccltests.py report IN.json... --md OUT.md [--svg-prefix PREFIX]
        tables (nccl-tests' format, and per operation the shim against Socket at 8 B and 128 MiB
        under each binding) and one plot per rank count and network (PREFIX-w2.svg, ...).

Pure Python (standard library only)."""

import argparse
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import launch  # noqa: E402
import report  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PINNED = "2.19.6"
OPS = ["all_reduce", "sendrecv", "all_gather", "reduce_scatter", "alltoall", "broadcast"]
BINDS = {"default": [], "none": ["--bind-to", "none"]}
BIND_TITLES = {"default": "mpirun's default binding", "none": "--bind-to none"}
DEFAULT_MAKE = {
    "MPI_HOME": "/usr/lib/x86_64-linux-gnu/openmpi",
    "NCCL_HOME": "/usr",
    "CUDA_HOME": "/usr/local/cuda",
    "NVCC_GENCODE": "-gencode=arch=compute_90,code=sm_90",
}
CLONE_NEWUTS = 0x04000000
NETNS_NAMES = "tcpxshim-ns0,tcpxshim-ns1"
NETNS_ADDRS = "10.231.9.1,10.231.9.2"
VETH = "tsv"


# ------------------------------------------------------------------------------------------------
# nccl-tests' output.

def _num(tok):
    try:
        return float(tok)
    except ValueError:
        return None


def parse_output(text, op, world, iters):
    """The data lines of one nccl-tests run: rows as in sweeps.json (out-of-place time and
    bandwidths; in-place ones as ip_time_us and ip_busbw; wrong: both placements' #wrong added),
    and the 'Out of bounds values' count it printed (None when it printed none)."""
    rows, oob = [], None
    for line in text.splitlines():
        m = re.match(r"#\s*Out of bounds values\s*:\s*(\d+)", line)
        if m:
            oob = int(m.group(1))
            continue
        if line.lstrip().startswith("#"):
            continue
        t = line.split()
        if len(t) < 13 or not (t[0].isdigit() and t[1].isdigit()):
            continue
        try:
            root = int(t[4])
        except ValueError:
            continue
        oop = [_num(x) for x in t[5:9]]
        ip = [_num(x) for x in t[9:13]]
        if None in oop[:3]:
            continue
        wrong = int(oop[3] or 0) + int(ip[3] or 0)
        rows.append({
            "size": int(t[0]),
            "count": int(t[1]),
            "type": t[2],
            "redop": t[3],
            "root": root,
            "time_us": oop[0],
            "algbw": oop[1],
            "busbw": oop[2],
            "ip_time_us": ip[0],
            "ip_busbw": ip[2],
            "wrong": wrong,
            "iters": iters,
        })
    return rows, oob


def merge_repeats(runs):
    """Rows of repeated runs of one operation, one row per size: the median time (and the
    busbw that goes with it), wrong values added, and every run's figures kept."""
    by_size = {}
    for rows in runs:
        for r in rows:
            by_size.setdefault(r["size"], []).append(r)
    out = []
    for size in sorted(by_size):
        rs = by_size[size]
        times = [r["time_us"] for r in rs]
        med = common.median(times)
        pick = min(rs, key=lambda r: abs(r["time_us"] - med))
        row = dict(pick)
        row["time_us"] = med
        if pick["time_us"] > 0:
            row["busbw"] = pick["busbw"] * pick["time_us"] / med
            row["algbw"] = pick["algbw"] * pick["time_us"] / med
        row["wrong"] = sum(r["wrong"] for r in rs)
        row["runs_time_us"] = times
        row["runs_busbw"] = [r["busbw"] for r in rs]
        out.append(row)
    return out


def spread(row):
    """(max - min) / median of a row's per-run times; 0 for a single run."""
    t = row.get("runs_time_us") or [row["time_us"]]
    med = common.median(t)
    return (max(t) - min(t)) / med if med > 0 else 0.0


# ------------------------------------------------------------------------------------------------
# build

def built_version(src):
    try:
        with open(os.path.join(src, "src", "common.h")) as f:
            m = re.search(r'#define\s+NCCL_TESTS_VERSION\s+"([^"]+)"', f.read())
            return m.group(1) if m else None
    except OSError:
        return None


def cmd_build(a):
    v = built_version(a.src)
    if v is None:
        print(f"nccltests: {a.src} is not an nccl-tests checkout (no src/common.h with NCCL_TESTS_VERSION)")
        return 2
    if v != PINNED:
        print(f"nccltests: WARNING: nccl-tests {v} at {a.src}, the suite is pinned to {PINNED}")
    os.makedirs(a.builddir, exist_ok=True)
    args = [f"{k}={os.environ.get(k, d)}" for k, d in DEFAULT_MAKE.items()]
    cmd = ["make", "-C", os.path.join(a.src, "src"), f"-j{a.jobs}", "MPI=1", f"BUILDDIR={os.path.abspath(a.builddir)}"]
    print("nccltests: " + " ".join(cmd + args), flush=True)
    r = subprocess.run(cmd + args)
    missing = [op for op in OPS if not os.access(os.path.join(a.builddir, f"{op}_perf"), os.X_OK)]
    if r.returncode != 0 or missing:
        print(f"nccltests: build failed (make exit {r.returncode}; missing: {', '.join(missing) or 'none'})")
        return 1
    print(f"nccltests: built nccl-tests {v} in {a.builddir}")
    return 0


# ------------------------------------------------------------------------------------------------
# rank: the per-rank wrapper.

def _libc():
    return ctypes.CDLL(None, use_errno=True)


def build_netns_preload(logdir):
    """Compiles netns_mpi.c (the rank's move into its namespace right after MPI_Init: entering it
    before would cut the rank off from mpirun) into logdir; returns the library's path."""
    so = os.path.join(os.path.abspath(logdir), "netns_mpi.so")
    cc = os.environ.get("CC", "cc")
    r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", so, os.path.join(HERE, "netns_mpi.c")],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"compiling netns_mpi.c with {cc} failed: {r.stderr.strip()}")
    return so


def own_hostname(name):
    libc = _libc()
    if libc.unshare(CLONE_NEWUTS) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"unshare(CLONE_NEWUTS): {os.strerror(e)} (the ranks need their own hostname: run as root)")
    socket.sethostname(name)


def cmd_rank(a):
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMIX_RANK", "0")))
    host = f"tcpxshim-host{rank}"
    own_hostname(host)
    os.environ["NCCL_HOSTID"] = host
    tmpl = os.environ.get("TCPXSHIM_NT_LOG")
    if tmpl:
        os.environ["NCCL_DEBUG_FILE"] = tmpl.replace("{rank}", str(rank))
    cmd = a.program[1:] if a.program and a.program[0] == "--" else a.program
    if not cmd:
        print("nccltests rank: no program given", file=sys.stderr)
        return 2
    os.execvp(cmd[0], cmd)


# ------------------------------------------------------------------------------------------------
# netns

def cmd_netns(a):
    names = a.names.split(",")
    addrs = a.addrs.split(",")
    if len(names) != 2 or len(addrs) != 2:
        print("nccltests netns: --names and --addrs want two values each")
        return 2

    def ip(*args, check=True):
        r = subprocess.run([a.ip, *args], capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"`ip {' '.join(args)}` failed ({r.returncode}): {r.stderr.strip()}")
        return r

    if a.action == "down":
        for n in names:
            ip("netns", "del", n, check=False)
        print(f"nccltests netns: removed {', '.join(names)}")
        return 0
    for n in names:
        ip("netns", "del", n, check=False)
    try:
        for n in names:
            ip("netns", "add", n)
        ip("-n", names[0], "link", "add", f"{VETH}0", "mtu", str(a.mtu), "type", "veth",
           "peer", "name", f"{VETH}1", "mtu", str(a.mtu), "netns", names[1])
        for i, (n, addr) in enumerate(zip(names, addrs)):
            ip("-n", n, "addr", "add", f"{addr}/24", "dev", f"{VETH}{i}")
            ip("-n", n, "link", "set", f"{VETH}{i}", "up")
            ip("-n", n, "link", "set", "lo", "up")
    except RuntimeError as e:
        print(f"nccltests netns: {e}")
        for n in names:
            ip("netns", "del", n, check=False)
        return 1
    print(f"nccltests netns: {names[0]} ({VETH}0 {addrs[0]}) <-> {names[1]} ({VETH}1 {addrs[1]}), MTU {a.mtu}")
    return 0


# ------------------------------------------------------------------------------------------------
# run

def run_env(mode, plugin, world, extra, ifname):
    """The environment every rank of the run gets (the per-rank parts are the wrapper's)."""
    env = launch.rank_env(os.environ, mode, plugin, 0, world, 0, extra)
    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NCCL_HOSTID", "TCPXSHIM_SUITE_GPU"):
        env.pop(k, None)
    if ifname:
        env["NCCL_SOCKET_IFNAME"] = ifname
        if mode.startswith("shim"):
            env["NCCL_TCPXSHIM_TCP_IFNAME"] = ifname
    env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
    env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    return env


def exported(env):
    """The variables mpirun must pass on (-x), beside what it forwards by itself."""
    return sorted(k for k in env if k.startswith(("NCCL_", "CUDA_", "TCPXSHIM_")))


def mpirun_cmd(a, op, env, world):
    cmd = ["mpirun", "--allow-run-as-root", "-np", str(world), *BINDS[a.bind], "--report-bindings",
           "--mca", "btl", "self,vader"]
    for k in exported(env):
        cmd += ["-x", k]
    if "LD_PRELOAD" in env:
        cmd += ["-x", "LD_PRELOAD"]
    cmd += [sys.executable, os.path.abspath(__file__), "rank", "--", os.path.join(os.path.abspath(a.bindir), f"{op}_perf"), "-b", str(a.min), "-e", str(a.max), "-f", str(a.factor),
            "-g", "1", "-c", "1", "-n", str(a.iters), "-w", str(a.warmup)]
    return cmd


def run_one(cmd, env, out_path, timeout):
    """Runs mpirun into out_path; returns (exit status, output text, seconds)."""
    t0 = time.monotonic()
    with open(out_path, "w") as f:
        f.write("# " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            launch.stop_all([p])
            rc = 124
            f.write(f"\n# nccltests: timed out after {timeout} s, killed\n")
    with open(out_path, errors="replace") as f:
        return rc, f.read(), time.monotonic() - t0


def cmd_run(a):
    world = a.ranks
    label = a.label or f"{a.mode} {a.bind}"
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"nt-{a.mode}-{a.bind}-w{world}" + ("-netns" if a.netns else "")
                 + (f"-{a.label}" if a.label else ""))
    os.makedirs(a.logdir, exist_ok=True)
    try:
        env = run_env(a.mode, a.plugin, world, a.env or [], a.ifname)
    except ValueError as e:
        print(f"nccltests run: {e}")
        return 2
    if a.netns:
        try:
            env["LD_PRELOAD"] = build_netns_preload(a.logdir)
        except RuntimeError as e:
            print(f"FAIL {label} w{world}: {e}")
            return 1
        env["TCPXSHIM_NETNS"] = a.netns
    ops = [o for o in a.ops.split(",") if o]
    result = {"label": label, "mode": a.mode, "bind": a.bind, "world": world, "netns": bool(a.netns),
              "tool": f"nccl-tests {PINNED}", "env": common.relevant_env(env), "ops": {}, "runs": {}}
    ok = True
    for op in ops:
        if op not in OPS:
            print(f"nccltests: unknown operation {op} (known: {', '.join(OPS)})")
            return 2
        runs = []
        for rep in range(a.repeat):
            base = os.path.join(a.logdir, f"{tag}.{op}" + (f".r{rep}" if a.repeat > 1 else ""))
            env["TCPXSHIM_NT_LOG"] = base + ".rank{rank}.log"
            prof = None
            if a.profile and rep == 0:
                pf = open(base + ".prof.txt", "w")
                prof = subprocess.Popen([sys.executable, os.path.join(HERE, "threadprof.py"), "--match",
                                         f"{op}_perf -b", "--interval", "0.5", "--max-seconds", str(a.timeout),
                                         "--wait", "60"], stdout=pf, stderr=subprocess.STDOUT)
                pf.close()
            rc, text, secs = run_one(mpirun_cmd(a, op, env, world), env, base + ".out", a.timeout)
            if prof is not None:
                try:
                    prof.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    prof.kill()
                    prof.wait()
            rows, oob = parse_output(text, op, world, a.iters)
            wrong = sum(r["wrong"] for r in rows)
            good = rc == 0 and rows and wrong == 0 and oob == 0
            ok = ok and bool(good)
            result["runs"].setdefault(op, []).append({"rc": rc, "seconds": round(secs, 1), "rows": len(rows),
                                                      "wrong": wrong, "out_of_bounds": oob})
            last = rows[-1] if rows else None
            print(f"{'PASS' if good else 'FAIL'} {label} w{world} {op}" + (f" run {rep + 1}" if a.repeat > 1 else "")
                  + f": exit {rc}, {len(rows)} sizes, {wrong} wrong, out of bounds {oob}, {secs:.0f} s"
                  + (f"; {common.size_label(last['size'])} busbw {last['busbw']:.2f} GB/s" if last else ""),
                  flush=True)
            if rows:
                runs.append(rows)
        if runs:
            result["ops"][op] = merge_repeats(runs)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------
# report

def group_key(s):
    return (s.get("world", 2), bool(s.get("netns")))


def group_title(key):
    world, netns = key
    where = "two network namespaces joined by a veth pair (MTU 1500)" if netns else "loopback"
    return f"{world} ranks, {where}"


def smallest_size(sweeps, op):
    """The smallest size of op that moves data (nccl-tests prints 0-element rows where the size
    divided among the ranks leaves nothing), at least 8 B."""
    sizes = [r["size"] for s in sweeps for r in s["ops"].get(op, []) if r["count"] > 0 and r["size"] >= 8]
    return min(sizes) if sizes else 8


def summary_table(sweeps, op, small=None, large=128 * common.MiB):
    """Markdown lines: per binding, Socket and the shim at the smallest size (time) and 128 MiB
    (busbw), and the shim's ratio (time: Socket/shim, so above 1 is better for both columns)."""
    small = small or smallest_size(sweeps, op)
    sl = common.size_label(small)
    lines = [f"| {op} | {sl} time: Socket | shim | Socket/shim | 128 MiB busbw: Socket | shim | shim/Socket |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for bind in BINDS:
        sock = next((s for s in sweeps if s.get("bind") == bind and s.get("mode") == "socket"), None)
        shims = [s for s in sweeps if s.get("bind") == bind and s.get("mode", "").startswith("shim")]
        for sh in shims:
            cells = []
            a8, b8 = (report.row_at(sock, op, small) if sock else None), report.row_at(sh, op, small)
            cells += [report.fmt_us(a8["time_us"]) if a8 else "n/a", report.fmt_us(b8["time_us"]) if b8 else "n/a",
                      f"{a8['time_us'] / b8['time_us']:.2f}x" if a8 and b8 and b8["time_us"] > 0 else "n/a"]
            al, bl = (report.row_at(sock, op, large) if sock else None), report.row_at(sh, op, large)
            cells += [f"{al['busbw']:.2f} GB/s" if al else "n/a", f"{bl['busbw']:.2f} GB/s" if bl else "n/a",
                      f"{bl['busbw'] / al['busbw']:.2f}x" if al and bl and al["busbw"] > 0 else "n/a"]
            name = BIND_TITLES[bind] + ("" if sh["mode"] == "shim" else f" ({sh['label']})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def steadiness_lines(sweeps, sizes=(8, 8192, 1 << 20, 8 << 20)):
    lines = []
    for s in sweeps:
        for op, rows in s["ops"].items():
            if not rows or len(rows[0].get("runs_time_us", [])) < 2:
                continue
            cells = []
            for size in sizes:
                r = report.row_at(s, op, size)
                if r:
                    t = ", ".join(f"{x:.1f}" for x in r["runs_time_us"])
                    cells.append(f"{common.size_label(size)}: {t} us (spread {spread(r) * 100:.0f}%)")
            lines.append(f"- {s['label']} {op}: " + "; ".join(cells))
    return lines


def cmd_report(a):
    sweeps = []
    for p in a.inputs:
        try:
            with open(p) as f:
                sweeps.append(json.load(f))
        except (OSError, ValueError) as e:
            print(f"nccltests report: skipping {p}: {e}")
    if not sweeps:
        print("nccltests report: no results")
        return 1
    groups = {}
    for s in sweeps:
        groups.setdefault(group_key(s), []).append(s)
    md = [f"# nccl-tests {PINNED} through tcpxshim and NCCL Socket", "",
          "Each rank its own host (UTS namespace, NCCL_HOSTID) on one GPU under MPS, "
          "byte checks on (`-c 1`); times are nccl-tests' out-of-place averages"
          + (" (the median of the repeated runs)" if any(len(r) > 1 for s in sweeps for r in s["runs"].values())
             else "") + ".", ""]
    bad = []
    for key in sorted(groups):
        ss = groups[key]
        md += [f"## {group_title(key)}", ""]
        ops = [op for op in OPS if any(op in s["ops"] for s in ss)]
        for op in ops:
            md += summary_table(ss, op) + [""]
        if a.svg_prefix:
            world, netns = key
            name = f"{a.svg_prefix}-w{world}{'-netns' if netns else ''}.svg"
            data = {"sweeps": [dict(s, ops={op: [r for r in rows if r["size"] > 0] for op, rows in s["ops"].items()})
                               for s in ss]}
            with open(name, "w") as f:
                f.write(report.svg_plot(data, width=max(1100, 330 * len(ops)), height=480,
                                        title=f"Bus bandwidth against message size (nccl-tests {PINNED}): "
                                              f"{group_title(key)}"))
            md += [f"![busbw, {group_title(key)}]({os.path.basename(name)})", ""]
        st = steadiness_lines(ss)
        if st:
            md += ["Run to run (every run's time at small and mid sizes):", ""] + st + [""]
        md += ["<details><summary>every table, as nccl-tests prints it</summary>", "", "```"]
        for s in ss:
            for op in ops:
                rows = s["ops"].get(op)
                if rows:
                    md += [common.format_table(op, rows, title=f"{s['label']}, {s['world']} ranks",
                                               where="out of place"), ""]
                    bad += [f"{s['label']} w{s['world']} {op} {r['size']}" for r in rows if r["wrong"]]
        md += ["```", "", "</details>", ""]
        for s in ss:
            for op, runs in s["runs"].items():
                bad += [f"{s['label']} w{s['world']} {op}: exit {r['rc']}" for r in runs if r["rc"] != 0]
    if bad:
        md += ["FAILED: " + "; ".join(bad), ""]
    with open(a.md, "w") as f:
        f.write("\n".join(md))
    print(f"nccltests report: {a.md} from {len(sweeps)} runs" + (f"; FAILED: {len(bad)}" if bad else ""))
    return 1 if bad else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--src", required=True)
    b.add_argument("--builddir", required=True)
    b.add_argument("--jobs", type=int, default=16)
    r = sub.add_parser("run")
    r.add_argument("--bindir", required=True)
    r.add_argument("--mode", required=True, choices=sorted(launch.MODES))
    r.add_argument("--plugin")
    r.add_argument("--ranks", type=int, default=2)
    r.add_argument("--bind", choices=list(BINDS), default="default")
    r.add_argument("--logdir", required=True)
    r.add_argument("--json", required=True)
    r.add_argument("--label")
    r.add_argument("--ops", default=",".join(OPS))
    r.add_argument("--min", default="8")
    r.add_argument("--max", default="128M")
    r.add_argument("--factor", type=int, default=4)
    r.add_argument("--iters", type=int, default=20)
    r.add_argument("--warmup", type=int, default=5)
    r.add_argument("--repeat", type=int, default=1)
    r.add_argument("--netns")
    r.add_argument("--ifname")
    r.add_argument("--env", action="append")
    r.add_argument("--profile", action="store_true")
    r.add_argument("--timeout", type=int, default=240)
    k = sub.add_parser("rank")
    k.add_argument("program", nargs=argparse.REMAINDER)
    n = sub.add_parser("netns")
    n.add_argument("action", choices=["up", "down"])
    n.add_argument("--ip", default="ip")
    n.add_argument("--names", default=NETNS_NAMES)
    n.add_argument("--addrs", default=NETNS_ADDRS)
    n.add_argument("--mtu", type=int, default=1500)
    p = sub.add_parser("report")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--md", required=True)
    p.add_argument("--svg-prefix")
    a = ap.parse_args(argv)
    return {"build": cmd_build, "run": cmd_run, "rank": cmd_rank, "netns": cmd_netns, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    raise SystemExit(main())
