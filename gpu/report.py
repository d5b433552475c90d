#!/usr/bin/env python3
"""Turns the sweeps into tables and a plot. Pure Python (standard library only).

    report.py merge --out sweeps.json [--note LABEL=TEXT ...] sweep-a.json sweep-b.json ...
        one file with every sweep, in the order given (missing inputs are skipped, with a note).
    report.py render sweeps.json [--md results.md] [--svg busbw.svg] [--print]
        results.md: per operation, one table with a busbw and a time column per mode, then the
        ratios to NCCL's Socket transport at 8 B (time), 2 MiB, 32 MiB and 128 MiB (busbw);
        busbw.svg: busbw against size (log2 axis), one panel per operation, one line per mode;
        --print: every sweep as nccl-tests prints it."""

import argparse
import html
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import launch  # noqa: E402

COMMON_KEYS = set(launch.COMMON_ENV) | {"NCCL_HOSTID"}

OP_TITLES = {"all_reduce": "all-reduce", "sendrecv": "send/recv"}
BASELINE = "socket"
RATIO_POINTS = [("8 B time", 8, "time_us"), ("2 MiB busbw", 2 * common.MiB, "busbw"),
                ("32 MiB busbw", 32 * common.MiB, "busbw"), ("128 MiB busbw", 128 * common.MiB, "busbw")]
# Colour-blind-safe palette (Okabe-Ito), one per mode in order.
COLORS = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


def merge(paths, notes):
    sweeps, missing = [], []
    for p in paths:
        try:
            with open(p) as f:
                sweeps.append(json.load(f))
        except (OSError, ValueError) as e:
            missing.append(f"{p}: {e}")
    for s in sweeps:
        if s["label"] in notes:
            s["note"] = notes[s["label"]]
    return {"version": 1, "sweeps": sweeps, "missing": missing}


def load(path):
    with open(path) as f:
        return json.load(f)


def ops_of(data):
    ops = []
    for s in data["sweeps"]:
        for op in s["ops"]:
            if op not in ops:
                ops.append(op)
    return ops


def row_at(sweep, op, size):
    for r in sweep["ops"].get(op, []):
        if r["size"] == size:
            return r
    return None


def fmt_bw(x):
    return f"{x:.2f}" if x < 100 else f"{x:.1f}"


def fmt_us(t):
    if t < 1000:
        return f"{t:.1f} us"
    if t < 1e6:
        return f"{t / 1e3:.2f} ms"
    return f"{t / 1e6:.2f} s"


def ratio_table(data, op):
    """Markdown lines: each mode's value at the ratio points, and its ratio to the baseline."""
    sweeps = data["sweeps"]
    base = next((s for s in sweeps if s["label"] == BASELINE), None)
    head = "| " + OP_TITLES.get(op, op) + " | " + " | ".join(p[0] for p in RATIO_POINTS) + " |"
    lines = [head, "|---" * (len(RATIO_POINTS) + 1) + "|"]
    for s in sweeps:
        cells = []
        for _, size, key in RATIO_POINTS:
            r = row_at(s, op, size)
            cells.append("n/a" if r is None else (fmt_us(r[key]) if key == "time_us" else f"{fmt_bw(r[key])} GB/s"))
        lines.append(f"| {s['label']} | " + " | ".join(cells) + " |")
    if base is not None:
        for s in sweeps:
            if s is base:
                continue
            cells = []
            for _, size, key in RATIO_POINTS:
                r, b = row_at(s, op, size), row_at(base, op, size)
                if r is None or b is None or b[key] <= 0:
                    cells.append("n/a")
                else:
                    cells.append(f"{r[key] / b[key]:.2f}x")
            lines.append(f"| {s['label']}/{BASELINE} | " + " | ".join(cells) + " |")
    return lines


def op_table(data, op):
    sweeps = [s for s in data["sweeps"] if op in s["ops"]]
    sizes = sorted({r["size"] for s in sweeps for r in s["ops"][op]})
    head = (
        "| size | "
        + " | ".join(f"{s['label']} busbw (GB/s)" for s in sweeps)
        + " | "
        + " | ".join(f"{s['label']} time (us)" for s in sweeps)
        + " |"
    )
    lines = [head, "|---:" * (1 + 2 * len(sweeps)) + "|"]
    for size in sizes:
        bw, tm = [], []
        for s in sweeps:
            r = row_at(s, op, size)
            if r is None:
                bw.append("")
                tm.append("")
                continue
            wrong = f" ({r['wrong']} wrong!)" if r["wrong"] else ""
            bw.append(fmt_bw(r["busbw"]) + wrong)
            tm.append(f"{r['time_us']:.1f}")
        lines.append(f"| {common.size_label(size)} | " + " | ".join(bw + tm) + " |")
    return lines


def markdown(data, svg_name="busbw.svg"):
    sweeps = data["sweeps"]
    out = ["# tcpxshim GPU suite: bandwidth sweeps", ""]
    if sweeps:
        s0 = sweeps[0]
        v = s0.get("versions", {})
        out.append(
            f"{s0.get('world', '?')} ranks on one GPU (MPS), each its own NCCL host (NCCL_HOSTID), loopback; "
            f"PyTorch {v.get('torch', '?')}, NCCL {v.get('nccl', '?')}, host {s0.get('host', '?')}, {s0.get('started', '')}"
            + ("; QUICK run (fewer sizes and iterations)" if s0.get("quick") else "")
            + "."
        )
        out.append("")
        common_set = " ".join(f"{k}={v}" for k, v in launch.COMMON_ENV.items() if k.startswith("NCCL_"))
        out.append(f"Modes (every rank also has {common_set} and its own NCCL_HOSTID):")
        out.append("")
        for s in sweeps:
            env = s.get("env", {})
            keys = [k for k in env if k.startswith("NCCL_") and k not in COMMON_KEYS]
            desc = " ".join(f"{k}={os.path.basename(env[k]) if k == 'NCCL_NET_PLUGIN' else env[k]}" for k in keys)
            note = f" **{s['note']}**" if s.get("note") else ""
            out.append(f"- `{s['label']}`: {desc}{note}")
        out.append("")
        out.append(
            "busbw as nccl-tests computes it: all-reduce algbw x 2(n-1)/n, send/recv algbw (each rank sends to the "
            "next and receives from the previous at once). Times are per operation, averaged over ranks. Absolute "
            "figures on loopback are noisy: compare modes side by side within one run."
        )
        out.append("")
    for m in data.get("missing", []):
        out.append(f"- missing sweep: {m}")
    if data.get("missing"):
        out.append("")
    if any(s["label"] == BASELINE for s in sweeps):
        out.append(f"## Summary (ratios to `{BASELINE}`; for time lower is better, for busbw higher is better)")
        out.append("")
        for op in ops_of(data):
            out += ratio_table(data, op)
            out.append("")
    for op in ops_of(data):
        out.append(f"## {OP_TITLES.get(op, op)}")
        out.append("")
        out += op_table(data, op)
        out.append("")
    if svg_name:
        out.append(f"![busbw against message size]({svg_name})")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The plot.
# --------------------------------------------------------------------------------------------


def nice_ceiling(x):
    """A round number >= x for the top of the y axis, and a tick step."""
    if x <= 0:
        return 1.0, 0.2
    exp = math.floor(math.log10(x))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        top = m * 10**exp
        if top >= x * 1.02:
            break
    for step_m in (0.1, 0.2, 0.25, 0.5, 1, 2, 2.5, 5):
        step = step_m * 10**exp
        if top / step <= 8:
            return top, step
    return top, top / 5


def fmt_tick(v):
    return f"{v:g}"


def svg_plot(data, width=1100, height=480, title=None):
    ops = ops_of(data)
    sweeps = data["sweeps"]
    esc = html.escape
    npan = max(1, len(ops))
    axes = {}
    for op in ops:
        ymax = max([r["busbw"] for s in sweeps for r in s["ops"].get(op, [])] + [0.0])
        ytop, ystep = nice_ceiling(ymax)
        nt = int(round(ytop / ystep))
        axes[op] = (ytop, ystep, nt, 7 * max(len(fmt_tick(round(i * ystep, 6))) for i in range(nt + 1)))
    label_w = max([a[3] for a in axes.values()] + [14])
    left, right, top, bottom = max(56, label_w + 40), 18, 78, 62
    gap = left + 6
    pw = (width - left - right - gap * (npan - 1)) / npan
    ph = height - top - bottom
    sizes = sorted({r["size"] for s in sweeps for op in ops for r in s["ops"].get(op, [])}) or [8, 256 * common.MiB]
    lx0, lx1 = math.log2(sizes[0]), math.log2(sizes[-1])
    if lx1 <= lx0:
        lx1 = lx0 + 1
    o = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
    ]
    world = sweeps[0].get("world", "?") if sweeps else "?"
    v = sweeps[0].get("versions", {}) if sweeps else {}
    o.append(
        f'<text x="{width / 2:.1f}" y="22" text-anchor="middle" font-size="16" font-weight="bold">'
        + esc(title or f"Bus bandwidth against message size: {world} ranks on one GPU over loopback, NCCL {v.get('nccl', '?')}")
        + "</text>"
    )
    # Legend, centred under the title.
    items = [
        (s["label"] + (f" ({s['note']})" if s.get("note") else ""), COLORS[i % len(COLORS)]) for i, s in enumerate(sweeps)
    ]
    item_w = [34 + 7.2 * len(lbl) + 18 for lbl, _ in items]
    x = (width - sum(item_w)) / 2
    for (lbl, col), w in zip(items, item_w):
        o.append(f'<line x1="{x:.1f}" y1="44" x2="{x + 26:.1f}" y2="44" stroke="{col}" stroke-width="2.5"/>')
        o.append(f'<circle cx="{x + 13:.1f}" cy="44" r="3.2" fill="{col}"/>')
        o.append(f'<text x="{x + 32:.1f}" y="48" font-size="13">{esc(lbl)}</text>')
        x += w
    for pi, op in enumerate(ops):
        x0 = left + pi * (pw + gap)
        y0 = top
        ytop, ystep, nt, _ = axes[op]

        def X(size, x0=x0):
            return x0 + (math.log2(size) - lx0) / (lx1 - lx0) * pw

        def Y(bw, y0=y0, ytop=ytop):
            return y0 + ph - bw / ytop * ph

        o.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{pw:.1f}" height="{ph:.1f}" fill="none" stroke="#444"/>')
        o.append(
            f'<text x="{x0 + pw / 2:.1f}" y="{y0 - 10:.1f}" text-anchor="middle" font-size="14" font-weight="bold">'
            f"{esc(OP_TITLES.get(op, op))}</text>"
        )
        # y grid and ticks
        ytitle_x = x0 - 8 - label_w - 10
        for i in range(nt + 1):
            val = i * ystep
            y = Y(val)
            if 0 < i < nt:
                o.append(f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x0 + pw:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
            o.append(f'<line x1="{x0 - 5:.1f}" y1="{y:.1f}" x2="{x0:.1f}" y2="{y:.1f}" stroke="#444"/>')
            o.append(f'<text x="{x0 - 8:.1f}" y="{y + 4:.1f}" text-anchor="end">{fmt_tick(round(val, 6))}</text>')
        o.append(
            f'<text x="{ytitle_x:.1f}" y="{y0 + ph / 2:.1f}" text-anchor="middle" '
            f'transform="rotate(-90 {ytitle_x:.1f} {y0 + ph / 2:.1f})">busbw (GB/s)</text>'
        )
        # x ticks: a labelled tick every x8 (8 B, 64 B, ... 128M), a small one at every power of 2
        e = math.ceil(lx0)
        while e <= lx1 + 1e-9:
            size = 2**e
            xx = X(size)
            major = (e - 3) % 3 == 0
            if major:
                o.append(f'<line x1="{xx:.1f}" y1="{y0:.1f}" x2="{xx:.1f}" y2="{y0 + ph:.1f}" stroke="#eee"/>')
            o.append(
                f'<line x1="{xx:.1f}" y1="{y0 + ph:.1f}" x2="{xx:.1f}" y2="{y0 + ph + (6 if major else 3):.1f}" stroke="#444"/>'
            )
            if major:
                o.append(f'<text x="{xx:.1f}" y="{y0 + ph + 20:.1f}" text-anchor="middle">{common.size_label(size)}</text>')
            e += 1
        o.append(
            f'<text x="{x0 + pw / 2:.1f}" y="{y0 + ph + 42:.1f}" text-anchor="middle">message size (bytes, log2 scale)</text>'
        )
        # the lines
        for i, s in enumerate(sweeps):
            rows = sorted(s["ops"].get(op, []), key=lambda r: r["size"])
            if not rows:
                continue
            col = COLORS[i % len(COLORS)]
            pts = " ".join(f"{X(r['size']):.1f},{Y(r['busbw']):.1f}" for r in rows)
            o.append(f'<polyline points="{pts}" fill="none" stroke="{col}" stroke-width="2" stroke-linejoin="round"/>')
            for r in rows:
                o.append(f'<circle cx="{X(r["size"]):.1f}" cy="{Y(r["busbw"]):.1f}" r="2.6" fill="{col}">'
                         f'<title>{esc(s["label"])} {common.size_label(r["size"])}: {r["busbw"]:.2f} GB/s, '
                         f'{r["time_us"]:.1f} us</title></circle>')
            # wrong results are marked with a red cross
            for r in rows:
                if r.get("wrong"):
                    cx, cy = X(r["size"]), Y(r["busbw"])
                    o.append(
                        f'<path d="M{cx - 5:.1f},{cy - 5:.1f} L{cx + 5:.1f},{cy + 5:.1f} M{cx - 5:.1f},{cy + 5:.1f} '
                        f'L{cx + 5:.1f},{cy - 5:.1f}" stroke="red" stroke-width="2"/>'
                    )
    if any(r.get("wrong") for s in sweeps for rows in s["ops"].values() for r in rows):
        o.append(
            f'<text x="{left:.1f}" y="{height - 8:.1f}" fill="red">x: sizes whose checked iteration had wrong elements</text>'
        )
    o.append("</svg>")
    return "\n".join(o) + "\n"


def print_tables(data, out=None):
    out = out or sys.stdout
    for s in data["sweeps"]:
        for op, rows in s["ops"].items():
            note = f" [{s['note']}]" if s.get("note") else ""
            print(common.format_table(op, rows, title=f"sweep {s['label']}{note}, {s.get('world', '?')} ranks"), file=out)
            print(file=out)
    for m in data.get("missing", []):
        print(f"# missing sweep: {m}", file=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge")
    m.add_argument("--out", required=True)
    m.add_argument("--note", action="append", default=[], help="LABEL=TEXT shown with that sweep")
    m.add_argument("inputs", nargs="*")
    r = sub.add_parser("render")
    r.add_argument("sweeps")
    r.add_argument("--md")
    r.add_argument("--svg")
    r.add_argument("--print", action="store_true")
    a = ap.parse_args(argv)
    if a.cmd == "merge":
        notes = {}
        for n in a.note:
            k, _, v = n.partition("=")
            notes[k] = v
        data = merge(a.inputs, notes)
        with open(a.out, "w") as f:
            json.dump(data, f, indent=1)
        print(f"wrote {a.out}: {len(data['sweeps'])} sweeps" + (f", {len(data['missing'])} missing" if data["missing"] else ""))
        return 0
    data = load(a.sweeps)
    if a.print:
        print_tables(data)
    if not data["sweeps"]:
        print("no sweeps to render")
        return 1
    if a.md:
        with open(a.md, "w") as f:
            f.write(markdown(data, os.path.basename(a.svg) if a.svg else None))
    if a.svg:
        with open(a.svg, "w") as f:
            f.write(svg_plot(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
