#!/usr/bin/env python3
"""Launches the ranks of one run on this machine: WORLD processes of a program, all on cuda:0,
each looking like its own host to NCCL (a distinct NCCL_HOSTID), so NCCL connects them only
through the network transport that the mode selects.

    launch.py --label coll-shim-w2 --world 2 --mode shim --plugin /abs/lib.so --logdir OUT/logs \
              --timeout 240 [--env K=V ...] -- python3 gpu/collectives.py [args]

Each rank's output (its own and NCCL's log) goes to LOGDIR/<label>.rank<r>.log. The run passes
when every rank exits 0. When a rank fails, the others get GRACE seconds to finish, then they are
killed; at the timeout all are killed. Every rank runs in its own process group, which is what is
killed (SIGTERM, then SIGKILL), and dies with the launcher (PR_SET_PDEATHSIG). Prints one
PASS/FAIL line, the lines of each rank's log that start with '@@ ', and on failure the end of the
logs. Exit status: 0 pass, 1 a rank failed, 124 timeout, 2 bad usage.

Pure Python (standard library only)."""

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

# The settings every rank of every run gets.
COMMON_ENV = {
    "MASTER_ADDR": "127.0.0.1",
    "NCCL_P2P_DISABLE": "1",
    "NCCL_SHM_DISABLE": "1",
    "NCCL_SOCKET_IFNAME": "lo",
    "NCCL_DEBUG": "INFO",
    "NCCL_DEBUG_SUBSYS": "INIT,NET",
    "PYTHONUNBUFFERED": "1",
}

# The configurations compared. "{plugin}" is replaced by the plugin's absolute path.
MODES = {
    "shim": {
        "NCCL_NET_PLUGIN": "{plugin}",
        "NCCL_TCPXSHIM_TCP_IFNAME": "lo",
    },
    # The shim with its metrics on, writing a file per rank every second: against "shim", what the
    # metrics cost under NCCL.
    "shim-metrics": {
        "NCCL_NET_PLUGIN": "{plugin}",
        "NCCL_TCPXSHIM_TCP_IFNAME": "lo",
        "NCCL_TCPXSHIM_METRICS_DIR": "/tmp/tcpxshim-sweep-metrics",
        "NCCL_TCPXSHIM_METRICS_INTERVAL": "1",
    },
    # The shim with transparent recovery off ("shim" has it on, the default): against "shim",
    # what recovery costs under NCCL.
    "shim-norecovery": {
        "NCCL_NET_PLUGIN": "{plugin}",
        "NCCL_TCPXSHIM_TCP_IFNAME": "lo",
        "NCCL_TCPXSHIM_RECOVERY": "0",
    },
    # The shim with the control links' thread sleeping right after each message
    # (NCCL_TCPXSHIM_LINK_SPIN=0): against "shim", what its polling buys recovery's acknowledgements.
    "shim-nospin": {
        "NCCL_NET_PLUGIN": "{plugin}",
        "NCCL_TCPXSHIM_TCP_IFNAME": "lo",
        "NCCL_TCPXSHIM_LINK_SPIN": "0",
    },
    # The shim with recovery copying sends up to 4 MiB (NCCL's steps included) instead of
    # waiting for the receiver's acknowledgement of each: against "shim", copy against wait.
    "shim-copy": {
        "NCCL_NET_PLUGIN": "{plugin}",
        "NCCL_TCPXSHIM_TCP_IFNAME": "lo",
        "NCCL_TCPXSHIM_RECOVERY_COPY_MAX": "4194304",
        "NCCL_TCPXSHIM_RECOVERY_COPY_RING": "67108864",
    },
    # Communicator churn (churn.py) with the pool on (the default) and off, metrics written every
    # second so that the run can read the shim's connect and accept times and pool counts.
    "shim-churn": {
        "NCCL_NET_PLUGIN": "{plugin}",
        "NCCL_TCPXSHIM_TCP_IFNAME": "lo",
        "NCCL_TCPXSHIM_METRICS_DIR": "/tmp/tcpxshim-churn-metrics/pool",
        "NCCL_TCPXSHIM_METRICS_INTERVAL": "1",
    },
    "shim-churn-nopool": {
        "NCCL_NET_PLUGIN": "{plugin}",
        "NCCL_TCPXSHIM_TCP_IFNAME": "lo",
        "NCCL_TCPXSHIM_POOL": "0",
        "NCCL_TCPXSHIM_METRICS_DIR": "/tmp/tcpxshim-churn-metrics/nopool",
        "NCCL_TCPXSHIM_METRICS_INTERVAL": "1",
    },
    # The shim with four I/O workers whatever the CPUs (before the CPU plan, the default): against
    # "shim" under mpirun's binding of one core per rank, what planning by the CPUs buys.
    "shim-workers4": {
        "NCCL_NET_PLUGIN": "{plugin}",
        "NCCL_TCPXSHIM_TCP_IFNAME": "lo",
        "NCCL_TCPXSHIM_TCP_WORKERS": "4",
    },
    # The shim with no I/O worker threads (NCCL_TCPXSHIM_TCP_WORKERS=0): NCCL's proxy thread moves
    # the bytes itself when it tests requests.
    "shim-driven": {
        "NCCL_NET_PLUGIN": "{plugin}",
        "NCCL_TCPXSHIM_TCP_IFNAME": "lo",
        "NCCL_TCPXSHIM_TCP_WORKERS": "0",
    },
    "socket": {
        "NCCL_NET_PLUGIN": "none",
        "NCCL_NET": "Socket",
    },
    "socket44": {
        "NCCL_NET_PLUGIN": "none",
        "NCCL_NET": "Socket",
        "NCCL_SOCKET_NTHREADS": "4",
        "NCCL_NSOCKS_PERTHREAD": "4",
    },
}

# Shim-only settings that must not leak from the caller's environment into the other modes.
SHIM_ONLY_PREFIX = "NCCL_TCPXSHIM_"


def mode_env(mode, plugin):
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")
    env = {}
    for k, v in MODES[mode].items():
        if "{plugin}" in v:
            if not plugin:
                raise ValueError(f"mode {mode} needs --plugin")
            v = v.replace("{plugin}", plugin)
        env[k] = v
    return env


def rank_env(base, mode, plugin, rank, world, port, extra=(), gpus=1):
    """The complete environment of one rank (on GPU rank % gpus)."""
    env = dict(base)
    if not mode.startswith("shim"):
        for k in [k for k in env if k.startswith(SHIM_ONLY_PREFIX)]:
            del env[k]
    env.update(COMMON_ENV)
    env.update(mode_env(mode, plugin))
    for kv in extra:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            raise ValueError(f"--env wants K=V, got {kv!r}")
        env[k] = v
    env.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            # As torchrun sets them: every rank runs on this host (the shim's CPU plan reads
            # LOCAL_WORLD_SIZE to split the CPUs between ranks that share them).
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_PORT": str(port),
            "NCCL_HOSTID": f"tcpxshim-host{rank}",
            "TCPXSHIM_SUITE_MODE": mode,
            "TCPXSHIM_SUITE_GPU": str(rank % max(1, gpus)),
        }
    )
    return env


def free_port():
    """A TCP port nobody listens on now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """Runs in the child before exec: its own session, and SIGKILL when the launcher dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Interrupted(Exception):
    pass


def _on_signal(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def kill_group(p, sig):
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(procs, term_wait=5.0):
    """SIGTERM to every live rank's process group, then SIGKILL after term_wait seconds."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        kill_group(p, signal.SIGTERM)
    deadline = time.monotonic() + term_wait
    while time.monotonic() < deadline and any(p.poll() is None for p in live):
        time.sleep(0.1)
    for p in procs:
        # The group too: a rank's children (if any) outlive it otherwise.
        kill_group(p, signal.SIGKILL)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def tail(path, n):
    try:
        with open(path, errors="replace") as f:
            return f.readlines()[-n:]
    except OSError as e:
        return [f"(cannot read {path}: {e})\n"]


NOTABLE = ("MISMATCH", "Traceback", "Error", "error:", "NCCL WARN", "Killed", "Segmentation")


def notable_lines(path, limit=12):
    """The first lines that say what went wrong."""
    found = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if any(k in line for k in NOTABLE):
                    found.append(line.rstrip("\n"))
                    if len(found) >= limit:
                        break
    except OSError:
        pass
    return found


def last_error(notable):
    """The most telling of the notable lines: an exception or a mismatch rather than 'Traceback'."""
    for t in notable:
        if "MISMATCH" in t:
            return t
    for t in reversed(notable):
        if "Error" in t or "error:" in t:
            return t.strip()
    return notable[0].strip()


def marked_lines(path, prefix="@@ "):
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in f if line.startswith(prefix)]
    except OSError:
        return []


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def thread_dump(pid, gdb_timeout=30):
    """What every thread of a stuck process is doing: name, state, kernel wait channel and kernel
    stack (from /proc), then user-space stacks from gdb where gdb is installed."""
    lines = [f"== pid {pid}: {_read(f'/proc/{pid}/cmdline').replace(chr(0), ' ').strip()}"]
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return lines + ["   (gone)"]
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        st = _read(f"{base}/stat")
        state = st[st.rfind(")") + 2 :].split(" ", 1)[0] if ")" in st else "?"
        lines.append(f"-- thread {tid} '{_read(f'{base}/comm').strip()}' state {state} "
                     f"wchan {_read(f'{base}/wchan').strip() or '-'}")
        for k in _read(f"{base}/stack").splitlines()[:12]:
            lines.append(f"     {k}")
    gdb = shutil.which("gdb") if os.environ.get("TCPXSHIM_SUITE_GDB", "1") != "0" else None
    if gdb:
        try:
            r = subprocess.run([gdb, "-p", str(pid), "-batch", "-nx", "-ex", "thread apply all bt 30"],
                               capture_output=True, text=True, timeout=gdb_timeout)
            lines.append(f"-- gdb backtraces (exit {r.returncode}):")
            lines.extend(r.stdout.splitlines())
        except (OSError, subprocess.TimeoutExpired) as e:
            lines.append(f"-- gdb failed: {e}")
    else:
        lines.append("-- no gdb (or TCPXSHIM_SUITE_GDB=0): kernel stacks only")
    return lines


def launch(label, world, mode, plugin, logdir, timeout, cmd, extra=(), grace=15.0, out=sys.stdout, poll=0.1, gpus=1):
    """Runs one run; returns (exit status, text describing what happened per rank)."""
    os.makedirs(logdir, exist_ok=True)
    port = free_port()
    logs = [os.path.join(logdir, f"{label}.rank{r}.log") for r in range(world)]
    procs, files = [], []
    t0 = time.monotonic()
    status = {}
    timed_out = False
    interrupted = None
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        for r in range(world):
            env = rank_env(os.environ, mode, plugin, r, world, port, extra, gpus)
            f = open(logs[r], "w")
            files.append(f)
            f.write(f"# launch.py: run {label}, mode {mode}, rank {r} of {world}, MASTER_PORT {port}\n")
            f.write(f"# command: {' '.join(cmd)}\n")
            shown = {k: v for k, v in env.items() if k.startswith(("NCCL_", "MASTER_", "CUDA_MPS_"))}
            shown.update({k: env[k] for k in ("RANK", "WORLD_SIZE", "TCPXSHIM_SUITE_GPU")})
            f.write("# env: " + " ".join(f"{k}={shown[k]}" for k in sorted(shown)) + "\n")
            f.flush()
            p = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            procs.append(p)
        with open(os.path.join(logdir, f"{label}.pids"), "w") as pf:
            pf.write(" ".join(str(p.pid) for p in procs) + "\n")

        first_fail = None
        while True:
            now = time.monotonic()
            for r, p in enumerate(procs):
                if r not in status and p.poll() is not None:
                    status[r] = ("exit", p.returncode, now - t0)
                    if p.returncode != 0 and first_fail is None:
                        first_fail = now
            if len(status) == world:
                break
            if now - t0 > timeout:
                timed_out = True
                # Before killing: where is each stuck rank waiting?
                dump = []
                for r, p in enumerate(procs):
                    if p.poll() is None:
                        dump.append(f"## rank {r}")
                        dump.extend(thread_dump(p.pid))
                with open(os.path.join(logdir, f"{label}.hang.txt"), "w") as hf:
                    hf.write("\n".join(dump) + "\n")
                break
            if first_fail is not None and now - first_fail > grace:
                break
            time.sleep(poll)
    except Interrupted as e:
        interrupted = str(e)
    finally:
        # Cleanup is bounded (about 10 s); a second signal must not cut it short.
        for s_ in old:
            signal.signal(s_, signal.SIG_IGN)
        now = time.monotonic()
        for r, p in enumerate(procs):
            if r not in status and p.poll() is None:
                status[r] = ("killed", None, now - t0)
            elif r not in status:
                status[r] = ("exit", p.returncode, now - t0)
        stop_all(procs)
        for f in files:
            f.close()
        if procs and all(p.poll() is not None for p in procs):
            try:
                os.unlink(os.path.join(logdir, f"{label}.pids"))
            except OSError:
                pass
        for s, h in old.items():
            signal.signal(s, h)

    elapsed = time.monotonic() - t0
    parts = []
    for r in range(world):
        kind, rc, t = status.get(r, ("not started", None, 0.0))
        if kind == "exit":
            how = "exit 0" if rc == 0 else (f"exit {rc}" if rc > 0 else f"killed by {signal.Signals(-rc).name}")
        else:
            how = kind
        parts.append(f"rank {r} {how} at {t:.1f} s")
    ok = world > 0 and len(procs) == world and all(status[r][0] == "exit" and status[r][1] == 0 for r in range(world))
    if interrupted:
        why, rc = f"interrupted by {interrupted}", 130
    elif timed_out:
        why, rc = f"timed out after {timeout:.0f} s (thread stacks of the stuck ranks: {label}.hang.txt)", 124
    elif ok:
        why, rc = "", 0
    else:
        why, rc = "a rank failed", 1
    report = []
    line = f"{'PASS' if rc == 0 else 'FAIL'} {label} ({world} ranks, mode {mode}, {elapsed:.1f} s)"
    if why:
        line += f": {why}"
    report.append(line + "; " + ", ".join(parts))
    for r in range(world):
        for m in marked_lines(logs[r]):
            report.append(f"  [r{r}] {m[3:]}")
    if rc != 0:
        # The ranks that failed by themselves first (earliest first), then the ones killed.
        exited = sorted((status[r][2], r) for r in range(world) if status.get(r, ("",))[0] == "exit" and status[r][1] != 0)
        bad = [r for _, r in exited] + [r for r in range(world) if status.get(r, ("",))[0] != "exit"]
        first = None
        for r in bad[:2]:
            notable = notable_lines(logs[r])
            if notable:
                report.append(f"  --- notable lines of {logs[r]} ---")
                report += ["  | " + t[:400] for t in notable]
                first = first or f"rank {r}: {last_error(notable)[:200]}"
            if first is None and marked_lines(logs[r]):
                first = f"rank {r}: {marked_lines(logs[r])[-1][3:][:200]}"
            report.append(f"  --- last lines of {logs[r]} ---")
            report += ["  | " + t.rstrip("\n")[:400] for t in tail(logs[r], 10)]
        report.append(f"REASON {why}" + (f"; first problem: {first}" if first else ""))
    text = "\n".join(report) + "\n"
    out.write(text)
    out.flush()
    try:
        with open(os.path.join(logdir, f"{label}.launch.txt"), "w") as f:
            f.write(text)
    except OSError:
        pass
    return rc, parts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--label", required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--mode", required=True, choices=sorted(MODES))
    ap.add_argument("--plugin", default="")
    ap.add_argument("--logdir", required=True)
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--grace", type=float, default=15)
    ap.add_argument("--env", action="append", default=[], help="K=V for every rank (repeatable)")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs to spread the ranks over: rank r on GPU r %% GPUS")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd or a.world < 1:
        ap.error("need a world size >= 1 and a command after --")
    try:
        rc, _ = launch(a.label, a.world, a.mode, a.plugin, a.logdir, a.timeout, cmd, a.env, a.grace, gpus=a.gpus)
    except ValueError as e:
        print(f"FAIL {a.label}: {e}", flush=True)
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
