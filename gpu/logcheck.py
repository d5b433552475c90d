#!/usr/bin/env python3
"""Checks the rank logs of one run (NCCL's INFO lines and the shim's own) after it ended.

    logcheck.py net --label L --world N --logdir D --expect tcpxshim --shim
        every rank: "Using network <expect>", every "via NET/..." channel line names NET/<expect>;
        with --shim also: a "NET/TCPXSHIM loaded ..." line, no WARN line from NET/TCPXSHIM, and
        0 errors in every "closed ... comm" line.
    logcheck.py devices --label L --world N --logdir D --gpus G
        which network device each rank's channels used ("via NET/<name>/<dev>"); rank r runs on GPU
        r % G, and with one device per GPU each should use its own: exit 0 when every rank used only
        device r % G, 3 when some used others, 1 when a rank has no channel line.
    logcheck.py counters --label L --world N --logdir D --spec counters.json [--tolerance 0.03]
        the bytes the shim counted on each rank's send comms against what K ring all-reduces
        of S bytes had to send.

Pure Python (standard library only)."""

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

RE_USING = re.compile(r"NCCL INFO Using network (\S+)")
RE_VIA = re.compile(r"Channel \d+(?:/\d+)? : .*\[(send|receive)\] via NET/([^/\s]+)/(\S*)")
RE_VIA_OTHER = re.compile(r"Channel \d+(?:/\d+)? : .* via (?!NET/)(\S+)")
RE_WARN = re.compile(r"NCCL WARN (.*)")
RE_OPENED = re.compile(r"NET/TCPXSHIM opened (send|recv) comm")
RE_CLOSED = re.compile(
    r"NET/TCPXSHIM closed (send|recv) comm #(\d+) \((.*)\): (\d+) messages, "
    r"([0-9.]+ (?:B|KiB|MiB|GiB|TiB)), (\d+) errors, open ([0-9.]+) s"
)


def scan(text):
    """What one rank's log says."""
    r = {
        "using": [],
        "loaded": [],
        "via": [],  # (direction, net name, rest such as "0/GDRDMA")
        "via_other": [],  # channels through another transport (P2P, SHM, ...)
        "warn": [],
        "shim_warn": [],
        "opened": 0,
        "closed": [],
        "traceback": False,
    }
    for line in text.splitlines():
        m = RE_USING.search(line)
        if m:
            r["using"].append(m.group(1))
        if "NET/TCPXSHIM loaded" in line:
            r["loaded"].append(line[line.index("NET/TCPXSHIM loaded"):])
        m = RE_VIA.search(line)
        if m:
            r["via"].append((m.group(1), m.group(2), m.group(3)))
        m = RE_VIA_OTHER.search(line)
        if m:
            r["via_other"].append(m.group(1))
        m = RE_WARN.search(line)
        if m:
            (r["shim_warn"] if "NET/TCPXSHIM" in m.group(1) else r["warn"]).append(m.group(1).strip())
        if RE_OPENED.search(line):
            r["opened"] += 1
        m = RE_CLOSED.search(line)
        if m:
            r["closed"].append(
                {
                    "kind": m.group(1),
                    "id": int(m.group(2)),
                    "what": m.group(3),
                    "messages": int(m.group(4)),
                    "bytes_text": m.group(5),
                    "bytes": common.parse_human_bytes(m.group(5)),
                    "errors": int(m.group(6)),
                    "open_s": float(m.group(7)),
                }
            )
        if line.startswith("Traceback (most recent call last)"):
            r["traceback"] = True
    return r


def log_paths(logdir, label, world):
    return [os.path.join(logdir, f"{label}.rank{r}.log") for r in range(world)]


def read_logs(logdir, label, world):
    """[(rank, path, scan or None)]"""
    out = []
    for r, p in enumerate(log_paths(logdir, label, world)):
        try:
            with open(p, errors="replace") as f:
                out.append((r, p, scan(f.read())))
        except OSError:
            out.append((r, p, None))
    return out


def check_net(logs, expect, shim):
    """(problems, info lines) for the network checks."""
    problems, info = [], []
    for r, path, s in logs:
        if s is None:
            problems.append(f"rank {r}: no log at {path}")
            continue
        using = sorted(set(s["using"]))
        if expect not in using:
            problems.append(f"rank {r}: no 'Using network {expect}' line (found: {', '.join(using) or 'none'})")
        elif len(using) > 1:
            problems.append(f"rank {r}: communicators used different networks: {', '.join(using)}")
        n_ok = sum(1 for _, name, _ in s["via"] if name == expect)
        others = sorted({name for _, name, _ in s["via"] if name != expect})
        n_other = len(s["via"]) - n_ok
        if not s["via"]:
            problems.append(f"rank {r}: no 'via NET/...' channel line (NCCL_DEBUG_SUBSYS must include INIT,NET)")
        if n_other:
            problems.append(f"rank {r}: {n_other} channel lines via another network ({', '.join('NET/' + o for o in others)})")
        if s["via_other"]:
            kinds = sorted({v.split("/")[0] for v in s["via_other"]})
            problems.append(
                f"rank {r}: {len(s['via_other'])} channel lines via another transport ({', '.join(kinds)}): "
                "the ranks did not look like separate hosts"
            )
        desc = f"rank {r}: Using network {'/'.join(using) or '?'} ({len(s['using'])} comm(s)); {n_ok} channel lines via NET/{expect}, {n_other} via another"
        if shim:
            if not s["loaded"]:
                problems.append(f"rank {r}: no 'NET/TCPXSHIM loaded' line: NCCL did not load the plugin, or NCCL_DEBUG is not INFO")
            for w in s["shim_warn"][:5]:
                problems.append(f"rank {r}: shim WARN: {w[:300]}")
            if len(s["shim_warn"]) > 5:
                problems.append(f"rank {r}: ... {len(s['shim_warn']) - 5} more shim WARN lines")
            errs = [c for c in s["closed"] if c["errors"]]
            for c in errs[:5]:
                problems.append(f"rank {r}: {c['kind']} comm #{c['id']} ({c['what']}) closed with {c['errors']} errors")
            sent = sum(c["bytes"] for c in s["closed"] if c["kind"] == "send")
            desc += (
                f"; {len(s['shim_warn'])} shim WARN; comms opened {s['opened']}, closed {len(s['closed'])}"
                f" ({common.human_bytes(int(sent))} sent)"
            )
            if s["loaded"]:
                info.append(f"rank {r}: {s['loaded'][0][:300]}")
        info.append(desc)
        for w in s["warn"][:3]:
            info.append(f"rank {r}: NCCL WARN (not from the shim): {w[:300]}")
    return problems, info


def check_counters(logs, spec, tolerance):
    """Compares each rank's send bytes with the ring all-reduce's traffic. (problems, info)."""
    problems, info, summary = [], [], []
    world = spec["world"]
    per_op = common.allreduce_ring_bytes_per_rank(spec["size"], world)
    n_ops = spec["iters"] + spec.get("warmup", 0)
    expected = per_op * n_ops
    info.append(
        f"expected per rank: {n_ops} all_reduce ({spec['iters']} timed + {spec.get('warmup', 0)} warm-up) x "
        f"{common.human_bytes(spec['size'])} x 2(n-1)/n (n={world}) = {common.human_bytes(int(expected))} "
        f"({int(expected)} B), plus setup traffic; tolerance {tolerance * 100:.1f}%"
    )
    for r, path, s in logs:
        if s is None:
            problems.append(f"rank {r}: no log at {path}")
            continue
        sends = [c for c in s["closed"] if c["kind"] == "send"]
        recvs = [c for c in s["closed"] if c["kind"] == "recv"]
        if not sends:
            problems.append(
                f"rank {r}: no 'NET/TCPXSHIM closed send comm' line (comms not closed: was the process group destroyed?)"
            )
            continue
        counted = sum(c["bytes"] for c in sends)
        received = sum(c["bytes"] for c in recvs)
        # Each printed count is rounded to 2 decimals in its unit.
        rounding = sum(c["bytes"] * common.human_bytes_rel_error(c["bytes_text"]) for c in sends)
        rel = counted / expected - 1 if expected else float("inf")
        busy = [c for c in sends if c["bytes"] > 0]
        info.append(
            f"rank {r}: counted {common.human_bytes(int(counted))} sent over {len(sends)} send comms "
            f"({len(busy)} carried data: {', '.join(c['bytes_text'] for c in busy[:8])}), "
            f"expected {common.human_bytes(int(expected))}: {rel * 100:+.2f}% "
            f"(print rounding up to {rounding / expected * 100:.2f}%); received {common.human_bytes(int(received))} "
            f"over {len(recvs)} recv comms; {sum(c['messages'] for c in sends)} messages sent"
        )
        summary.append(f"rank {r} {rel * 100:+.2f}%")
        if abs(rel) > tolerance:
            problems.append(
                f"rank {r}: send comms counted {common.human_bytes(int(counted))}, expected "
                f"{common.human_bytes(int(expected))} ({rel * 100:+.2f}%, tolerance {tolerance * 100:.1f}%)"
            )
    info.append(
        f"send bytes against the expected {common.human_bytes(int(expected))} per rank: {', '.join(summary) or 'none counted'}"
    )
    return problems, info


def check_devices(logs, gpus):
    """(status, lines): status "own" (every rank only on device rank % gpus), "other", or "missing"."""
    lines, status = [], "own"
    for r, path, s in logs:
        gpu = r % max(1, gpus)
        if s is None or not s["via"]:
            lines.append(f"rank {r} (GPU {gpu}): no 'via NET/' channel line in {os.path.basename(path)}")
            status = "missing"
            continue
        used = {}
        for direction, _net, rest in s["via"]:
            dev = rest.split("/")[0]
            used.setdefault(dev, [0, 0])[0 if direction == "send" else 1] += 1
        desc = ", ".join(f"device {d}: {n[0]} send + {n[1]} receive" for d, n in sorted(used.items()))
        own = set(used) == {str(gpu)}
        lines.append(f"rank {r} (GPU {gpu}): {desc}{'' if own else '  <- not (only) its own device ' + str(gpu)}")
        if not own and status == "own":
            status = "other"
    return status, lines


def _report(title, problems, info, out):
    for line in info:
        print(f"  {line}", file=out)
    for p in problems:
        print(f"  PROBLEM: {p}", file=out)
    print(f"{'PASS' if not problems else 'FAIL'} {title}", file=out, flush=True)
    return 0 if not problems else 1


def main(argv=None, out=sys.stdout):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["net", "counters", "devices"])
    ap.add_argument("--label", required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--logdir", required=True)
    ap.add_argument("--expect", default="tcpxshim", help="network name NCCL should report")
    ap.add_argument("--shim", action="store_true", help="also check the shim's own lines")
    ap.add_argument("--spec", help="counters: JSON written by counters.py")
    ap.add_argument("--tolerance", type=float, default=0.03)
    ap.add_argument("--gpus", type=int, default=1, help="devices: GPUs the ranks ran on (rank r on r %% GPUS)")
    a = ap.parse_args(argv)
    logs = read_logs(a.logdir, a.label, a.world)
    if a.what == "net":
        problems, info = check_net(logs, a.expect, a.shim)
        return _report(f"log check {a.label} (network {a.expect}{', shim lines' if a.shim else ''})", problems, info, out)
    if a.what == "devices":
        status, lines = check_devices(logs, a.gpus)
        for line in lines:
            print(f"  {line}", file=out)
        word = {"own": "PASS", "other": "PARTIAL", "missing": "FAIL"}[status]
        print(f"{word} device check {a.label}: every rank on its own GPU's device: {status == 'own'}", file=out, flush=True)
        return {"own": 0, "other": 3, "missing": 1}[status]
    if not a.spec:
        ap.error("counters needs --spec")
    try:
        with open(a.spec) as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        print(f"  PROBLEM: cannot read {a.spec}: {e}", file=out)
        print(f"FAIL counters check {a.label}", file=out, flush=True)
        return 1
    problems, info = check_counters(logs, spec, a.tolerance)
    return _report(f"counters check {a.label}", problems, info, out)


if __name__ == "__main__":
    sys.exit(main())
