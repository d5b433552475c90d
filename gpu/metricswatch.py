#!/usr/bin/env python3
"""The metrics part's watcher, plot and check. Pure Python (standard library only).

    metricswatch.py watch --dir DIR --snapshots SNAPDIR --json watch.json [--url URL] [--interval 0.5]
                          [--stop-file PATH] [--max-seconds 300] [--settle 3]
        every INTERVAL seconds: copies each new version of DIR/*.prom (the shim's metrics files)
        to SNAPDIR/<name>.<mtime_ns>.prom (index in SNAPDIR/index.jsonl), and GETs URL (the page of
        `tcpxshim metrics serve DIR`): whether it parsed, which ranks it carried, each connection's
        tcpxshim_bytes_total. Stops once the stop file exists, after a last copy and a last page
        (scraped again for up to SETTLE seconds until it shows what the files say).
    metricswatch.py render --snapshots SNAPDIR --svg metrics-throughput.svg --md metrics.md
                           [--jobs 'metrics.rank{rank}.json' --world N] [--watch watch.json]
        each connection's throughput (bytes delta / time delta between the writes of its file),
        one panel per direction; metrics.md: per connection its bytes, messages, mean and peak GB/s.
    metricswatch.py check --jobs 'metrics.rank{rank}.json' --world N --watch watch.json --svg SVG
                          [--min-scrapes 5] [--no-serve REASON]
        the ranks' results (deltas exact), the pages (at least MIN valid ones carrying every rank,
        none unparsable, the last one matching the files), the plot. Exit status 0 pass, 1 fail,
        3 passed but without the page checks (--no-serve). Its last line starts with 'summary: '."""

import argparse
import html
import json
import os
import sys
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import prom  # noqa: E402
import report  # noqa: E402

GB = 1e9  # GB/s as report.py and nccl-tests count them
DIRS = ("send", "recv")


def fmt_gbs(x):
    return f"{x:.2f}" if x >= 0.1 or x == 0 else f"{x:.2g}"


def key_text(labels):
    """A connection's labels as one string, for JSON keys: 'comm=3,dir=send,...'."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


# --------------------------------------------------------------------------------------------
# watch
# --------------------------------------------------------------------------------------------


def prom_files(d):
    try:
        names = os.listdir(d)
    except OSError:
        return []
    return sorted(n for n in names if n.endswith(".prom") and not n.startswith("."))


def copy_new(d, snapdir, seen, index, now):
    """Copies every file of d whose version is new since the last call. Returns how many."""
    n = 0
    for name in prom_files(d):
        try:
            with open(os.path.join(d, name), "rb") as f:
                st = os.fstat(f.fileno())
                ident = (st.st_ino, st.st_mtime_ns, st.st_size)
                if seen.get(name) == ident:
                    continue
                data = f.read()
        except OSError:
            continue
        seen[name] = ident
        copy = f"{name[:-5]}.{st.st_mtime_ns}.prom"
        with open(os.path.join(snapdir, copy), "wb") as g:
            g.write(data)
        rec = {"file": name, "copy": copy, "mtime_ns": st.st_mtime_ns, "seen": now}
        index.write(json.dumps(rec) + "\n")
        n += 1
    index.flush()
    return n


def files_now(d):
    """The samples of every file in d now."""
    out = []
    for name in prom_files(d):
        try:
            with open(os.path.join(d, name)) as f:
                out.append(prom.parse(f.read()))
        except (OSError, ValueError):
            continue
    return out


def scrape(url, t0, timeout=2.0):
    """One GET of the page: a record for watch.json, and the samples (None unless parsed)."""
    rec = {"t": round(time.time() - t0, 3)}
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            text = r.read().decode("utf-8", "replace")
            rec["http"] = r.status
    except urllib.error.HTTPError as e:
        rec.update(ok=False, http=e.code, error=f"HTTP {e.code}")
        return rec, None
    except (urllib.error.URLError, OSError) as e:
        rec.update(ok=False, error=f"no answer: {getattr(e, 'reason', e)}", refused=True)
        return rec, None
    try:
        samples = prom.parse(text)
    except ValueError as e:
        rec.update(ok=False, error=f"does not parse: {e}", chars=len(text))
        return rec, None
    rec.update(ok=True, samples=len(samples), ranks=sorted(prom.ranks(samples)),
               bytes={key_text(s.labels): s.value for s in samples if s.name == prom.BYTES})
    return rec, samples


def watch(a):
    os.makedirs(a.snapshots, exist_ok=True)
    t0 = time.time()
    seen, scrapes, copies = {}, [], 0
    end = time.monotonic() + a.max_seconds
    stopped_by = "max-seconds"
    with open(os.path.join(a.snapshots, "index.jsonl"), "a") as index:
        while True:
            last = bool(a.stop_file and os.path.exists(a.stop_file))
            tick = time.monotonic()
            copies += copy_new(a.dir, a.snapshots, seen, index, time.time())
            if a.url:
                rec, page = scrape(a.url, t0)
                scrapes.append(rec)
                if last:
                    # The last page should show what the files say; a server may lag a little.
                    settle = time.monotonic() + a.settle
                    while True:
                        match, why = (False, "no page") if page is None else prom.served_matches(page, files_now(a.dir))
                        rec["final"], rec["matches_files"] = True, match
                        if not match:
                            rec["mismatch"] = why
                        if match or time.monotonic() > settle:
                            break
                        time.sleep(min(a.interval, 0.5))
                        rec, page = scrape(a.url, t0)
                        scrapes.append(rec)
            if last:
                stopped_by = "stop file"
                break
            if time.monotonic() > end:
                break
            time.sleep(max(0.0, a.interval - (time.monotonic() - tick)))
    res = {"url": a.url or None, "interval_s": a.interval, "seconds": round(time.time() - t0, 3), "stopped_by": stopped_by,
           "copies": copies, "files": sorted(seen), "scrapes": scrapes}
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    ok = sum(1 for s in scrapes if s.get("ok"))
    print(f"watch: {len(scrapes)} pages ({ok} parsed), {copies} file versions copied from {len(seen)} files in "
          f"{res['seconds']:.1f} s; stopped by {stopped_by}")
    return 0


# --------------------------------------------------------------------------------------------
# throughput
# --------------------------------------------------------------------------------------------


def load_versions(snapdir):
    """{file name: [(t seconds, samples), ...] in time order}. t is the newest sample timestamp
    of a version when the file has timestamps, else the file's mtime (when the shim wrote it)."""
    out = {}
    try:
        with open(os.path.join(snapdir, "index.jsonl")) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    except OSError:
        return out
    for r in recs:
        try:
            with open(os.path.join(snapdir, r["copy"])) as f:
                samples = prom.parse(f.read())
        except (OSError, ValueError):
            continue
        stamps = [s.timestamp_ms for s in samples if s.timestamp_ms is not None]
        t = max(stamps) / 1e3 if stamps else r["mtime_ns"] / 1e9
        out.setdefault(r["file"], []).append((t, samples))
    for v in out.values():
        v.sort(key=lambda x: x[0])
    return out


def throughput(versions):
    """Per connection, from each file's consecutive versions: {(file, conn_key): {"labels",
    "points": [(t0, t1, bytes delta, bytes/s)], "bytes", "messages"}}; times relative to the
    earliest version of any file. A connection missing from the previous version counts from 0."""
    starts = [v[0][0] for v in versions.values() if v]
    t_base = min(starts) if starts else 0.0
    conns = {}
    for name, vs in sorted(versions.items()):
        prev = None
        for t, samples in vs:
            cur = {prom.conn_key(s.labels): s for s in samples if s.name == prom.BYTES}
            msgs = prom.by_conn(samples, prom.MESSAGES)
            for k, s in cur.items():
                c = conns.setdefault((name, k), {"labels": s.labels, "points": [], "bytes": 0, "messages": 0})
                c["bytes"], c["messages"] = s.value, msgs.get(k, c["messages"])
                if prev is None or t <= prev[0]:
                    continue
                before = prev[1].get(k)
                d = s.value - (before.value if before is not None else 0)
                c["points"].append((prev[0] - t_base, t - t_base, d, d / (t - prev[0])))
            prev = (t, cur)
    return conns


def conn_stats(c):
    """(mean GB/s over the intervals in which the connection moved bytes, peak GB/s, seconds active)."""
    active = [p for p in c["points"] if p[2] > 0]
    secs = sum(p[1] - p[0] for p in active)
    moved = sum(p[2] for p in active)
    mean = moved / secs / GB if secs > 0 else 0.0
    peak = max((p[3] for p in active), default=0.0) / GB
    return mean, peak, secs


def ordered(conns):
    """Connections in table and legend order: rank, direction, comm."""
    def k(item):
        lab = item[1]["labels"]
        r = lab.get("rank", "")
        cm = lab.get("comm", "")
        d = lab.get("dir", "")
        return (int(r) if r.isdigit() else 1 << 30, r, DIRS.index(d) if d in DIRS else len(DIRS), d,
                int(cm) if cm.isdigit() else 1 << 30, cm, item[0])
    return sorted(conns.items(), key=k)


def svg_throughput(conns, title, width=1100, height=480):
    """Throughput against time, one panel per direction (send, recv), one stepped line per
    connection; report.py's look."""
    esc = html.escape
    items = ordered(conns)
    dirs = [d for d in DIRS if any(c["labels"].get("dir") == d for _, c in items)]
    dirs += sorted({c["labels"].get("dir", "?") for _, c in items} - set(dirs))
    dirs = dirs or ["send"]
    color = {k: report.COLORS[i % len(report.COLORS)] for i, (k, _) in enumerate(items)}
    tmax = max([p[1] for _, c in items for p in c["points"]] + [1e-9])
    xtop, xstep = report.nice_ceiling(tmax)
    ymax = max([p[3] / GB for _, c in items for p in c["points"]] + [0.0])
    ytop, ystep = report.nice_ceiling(ymax)
    nty, ntx = int(round(ytop / ystep)), int(round(xtop / xstep))
    label_w = 7 * max(len(report.fmt_tick(round(i * ystep, 6))) for i in range(nty + 1))
    npan = len(dirs)
    left, right, top, bottom = max(56, label_w + 40), 18, 78 + 18 * ((len(items) - 1) // 4), 62
    gap = left + 6
    pw = (width - left - right - gap * (npan - 1)) / npan
    ph = height - top - bottom
    o = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.1f}" y="22" text-anchor="middle" font-size="16" font-weight="bold">{esc(title)}</text>',
    ]
    # Legend: four connections a row, under the title.
    col_w = (width - 40) / 4
    for i, (k, c) in enumerate(items):
        x, y = 20 + (i % 4) * col_w, 44 + 18 * (i // 4)
        o.append(f'<line x1="{x:.1f}" y1="{y}" x2="{x + 26:.1f}" y2="{y}" stroke="{color[k]}" stroke-width="2.5"/>')
        o.append(f'<text x="{x + 32:.1f}" y="{y + 4}" font-size="12">{esc(prom.conn_name(c["labels"]))}</text>')
    for pi, d in enumerate(dirs):
        x0, y0 = left + pi * (pw + gap), top

        def X(t, x0=x0):
            return x0 + t / xtop * pw

        def Y(v, y0=y0):
            return y0 + ph - v / ytop * ph

        o.append(f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{pw:.1f}" height="{ph:.1f}" fill="none" stroke="#444"/>')
        o.append(f'<text x="{x0 + pw / 2:.1f}" y="{y0 - 10:.1f}" text-anchor="middle" font-size="14" '
                 f'font-weight="bold">{esc(d)}</text>')
        for i in range(nty + 1):
            val = i * ystep
            y = Y(val)
            if 0 < i < nty:
                o.append(f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x0 + pw:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
            o.append(f'<line x1="{x0 - 5:.1f}" y1="{y:.1f}" x2="{x0:.1f}" y2="{y:.1f}" stroke="#444"/>')
            o.append(f'<text x="{x0 - 8:.1f}" y="{y + 4:.1f}" text-anchor="end">{report.fmt_tick(round(val, 6))}</text>')
        ytitle_x = x0 - 8 - label_w - 10
        o.append(f'<text x="{ytitle_x:.1f}" y="{y0 + ph / 2:.1f}" text-anchor="middle" '
                 f'transform="rotate(-90 {ytitle_x:.1f} {y0 + ph / 2:.1f})">throughput (GB/s)</text>')
        for i in range(ntx + 1):
            xx = X(i * xstep)
            if 0 < i < ntx:
                o.append(f'<line x1="{xx:.1f}" y1="{y0:.1f}" x2="{xx:.1f}" y2="{y0 + ph:.1f}" stroke="#eee"/>')
            o.append(f'<line x1="{xx:.1f}" y1="{y0 + ph:.1f}" x2="{xx:.1f}" y2="{y0 + ph + 6:.1f}" stroke="#444"/>')
            o.append(f'<text x="{xx:.1f}" y="{y0 + ph + 20:.1f}" text-anchor="middle">'
                     f'{report.fmt_tick(round(i * xstep, 6))}</text>')
        o.append(f'<text x="{x0 + pw / 2:.1f}" y="{y0 + ph + 42:.1f}" text-anchor="middle">'
                 f'time (s, between the writes of each file)</text>')
        for k, c in items:
            if c["labels"].get("dir", "?") != d or not c["points"]:
                continue
            pts = []
            for t0, t1, _, rate in c["points"]:
                pts += [(X(t0), Y(rate / GB)), (X(t1), Y(rate / GB))]
            o.append('<polyline points="' + " ".join(f"{px:.1f},{py:.1f}" for px, py in pts) + f'" fill="none" '
                     f'stroke="{color[k]}" stroke-width="2" stroke-linejoin="round">'
                     f'<title>{esc(prom.conn_name(c["labels"]))}: {common.human_bytes(c["bytes"])}</title></polyline>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def load_jobs(template, world):
    jobs = []
    for r in range(world):
        p = template.replace("{rank}", str(r))
        try:
            with open(p) as f:
                jobs.append(json.load(f))
        except (OSError, ValueError) as e:
            jobs.append({"rank": r, "missing": f"{p}: {e}"})
    return jobs


def markdown(conns, jobs, svg_name, watched=None):
    out = ["# tcpxshim GPU suite: the metrics files", ""]
    j0 = next((j for j in jobs if "missing" not in j), None)
    if j0:
        v = j0.get("versions", {})
        out.append(
            f"{j0['world']} ranks, {j0['iters']} timed all-reduces of {common.human_bytes(j0['size'])} "
            f"(+{j0['warmup']} warm-up), the shim writing its metrics files every {j0['interval_s']} s; "
            f"PyTorch {v.get('torch', '?')}, NCCL {v.get('nccl', '?')}."
        )
        out.append("")
        out.append("| rank | send delta (B) | recv delta (B) | expected (B) | exact | timed all-reduces |")
        out.append("|---:|---:|---:|---:|---|---:|")
        for j in jobs:
            if "missing" in j or "send" not in j:
                out.append(f"| {j['rank']} | | | | {j.get('missing') or j.get('error', 'no result')} | |")
                continue
            out.append(f"| {j['rank']} | {j['send']['delta']} | {j['recv']['delta']} | {j['expected']} | "
                       f"{'yes' if j['ok'] else '**NO**'} | {j['seconds']:.3f} s |")
        out.append("")
    if watched and watched.get("url"):
        sc = watched["scrapes"]
        out.append(f"`tcpxshim metrics serve`: {len(sc)} pages fetched every {watched['interval_s']} s, "
                   f"{sum(1 for s in sc if s.get('ok'))} parsed.")
        out.append("")
    out.append("Per connection (the last version of each file): mean GB/s over the intervals between two writes in "
               "which the connection moved bytes, peak GB/s the busiest such interval.")
    out.append("")
    out.append("| connection | bytes | messages | mean GB/s | peak GB/s | seconds active |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for _, c in ordered(conns):
        mean, peak, secs = conn_stats(c)
        out.append(f"| {prom.conn_name(c['labels'])} | {c['bytes']} ({common.human_bytes(c['bytes'])}) | "
                   f"{c['messages']} | {fmt_gbs(mean)} | {fmt_gbs(peak)} | {secs:.1f} |")
    out.append("")
    if svg_name:
        out.append(f"![throughput of each connection against time]({svg_name})")
        out.append("")
    return "\n".join(out)


def render(a):
    conns = throughput(load_versions(a.snapshots))
    jobs = load_jobs(a.jobs, a.world) if a.jobs else []
    watched = None
    if a.watch:
        try:
            with open(a.watch) as f:
                watched = json.load(f)
        except (OSError, ValueError):
            watched = None
    if not conns:
        print(f"render: no tcpxshim_bytes_total series in the snapshots of {a.snapshots}")
        return 1
    if a.svg:
        j0 = next((j for j in jobs if "missing" not in j), {})
        title = "Throughput of each connection from the shim's metrics files"
        if j0:
            title += f": {j0['iters']} all-reduces of {common.human_bytes(j0['size'])}, {j0['world']} ranks"
        with open(a.svg, "w") as f:
            f.write(svg_throughput(conns, title))
    if a.md:
        with open(a.md, "w") as f:
            f.write(markdown(conns, jobs, os.path.basename(a.svg) if a.svg else None, watched))
    print(f"render: {len(conns)} connections, {sum(len(c['points']) for c in conns.values())} intervals")
    return 0


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------


def check_pages(watched, world, min_valid):
    """(problems, info, valid pages). A valid page parsed and carried every rank's bytes_total.
    Before the first valid page, refused connections (the server starting) and pages lacking a
    rank (its file not written yet) are not held against it; after it, they are."""
    problems, info = [], []
    want = {str(r) for r in range(world)}
    sc = watched.get("scrapes", [])
    valid = bad = early = 0
    first_bad = None
    started = False
    for s in sc:
        full = s.get("ok") and want <= set(s.get("ranks", []))
        if full:
            valid += 1
            started = True
            continue
        if not started and (s.get("refused") or s.get("ok")):
            early += 1
            continue
        bad += 1
        why = s.get("error") or f"ranks {','.join(s.get('ranks', [])) or 'none'} of {world}"
        first_bad = first_bad or f"page at {s['t']:.1f} s: {why}"
    info.append(f"pages: {len(sc)} fetched, {valid} valid with all {world} ranks, {early} before the first valid "
                f"one, {bad} bad")
    if bad:
        problems.append(f"{bad} bad pages (first: {first_bad})")
    if valid < min_valid:
        problems.append(f"only {valid} valid pages, want at least {min_valid}")
    final = [s for s in sc if s.get("final")]
    if not final:
        problems.append("no last page after the run")
    elif not final[-1].get("matches_files"):
        problems.append(f"the last page does not match the files: {final[-1].get('mismatch', '?')}")
    else:
        info.append("the last page carries every connection's bytes as the files have them")
    conns = {k for s in sc for k in s.get("bytes", {})}
    info.append(f"time series of {len(conns)} connections' bytes from the pages")
    return problems, info, valid


def check(a, out=None):
    out = out or sys.stdout
    problems, info = [], []
    jobs = load_jobs(a.jobs, a.world)
    exact = 0
    for j in jobs:
        r = j["rank"]
        if "missing" in j:
            problems.append(f"rank {r}: no result ({j['missing']})")
        elif j.get("error"):
            problems.append(f"rank {r}: {j['error']}")
        else:
            for d in ("send", "recv"):
                x = j[d]
                word = "exact" if x["exact"] else "MISMATCH"
                info.append(f"rank {r}: {d} bytes {x['a']} -> {x['b']}: delta {x['delta']} B, expected {j['expected']} B "
                            f"({j['iters']} x {j['size']} B x 2(n-1)/n): {word}")
                if not x["exact"]:
                    problems.append(f"rank {r}: {d} delta {x['delta']} B, expected {j['expected']} B exactly "
                                    f"({x['delta'] - j['expected']:+} B)")
            exact += j["ok"]
    parts = [f"deltas exact on {exact}/{a.world} ranks"]
    if a.no_serve:
        info.append(f"serve: not checked ({a.no_serve})")
        parts.append(f"serve SKIPPED ({a.no_serve})")
    else:
        try:
            with open(a.watch) as f:
                watched = json.load(f)
        except (OSError, ValueError) as e:
            watched = None
            problems.append(f"no watcher result: {e}")
        if watched is not None:
            p, i, valid = check_pages(watched, a.world, a.min_scrapes)
            problems += p
            info += i
            parts.append(f"serve: {valid} valid pages of {len(watched.get('scrapes', []))}")
    try:
        root = ET.parse(a.svg).getroot()
        lines = len(root.findall("{http://www.w3.org/2000/svg}polyline"))
        info.append(f"plot: {os.path.basename(a.svg)} with {lines} connection lines")
        parts.append(f"plot {lines} lines")
        if lines == 0:
            problems.append("the plot has no lines")
    except (OSError, ET.ParseError) as e:
        problems.append(f"no plot: {e}")
        parts.append("no plot")
    for line in info:
        print(f"  {line}", file=out)
    for p in problems:
        print(f"  PROBLEM: {p}", file=out)
    print("summary: " + "; ".join(parts), file=out)
    if problems:
        return 1
    return 3 if a.no_serve else 0


def main(argv=None, out=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("watch")
    w.add_argument("--dir", required=True)
    w.add_argument("--snapshots", required=True)
    w.add_argument("--json", required=True)
    w.add_argument("--url")
    w.add_argument("--interval", type=float, default=0.5)
    w.add_argument("--stop-file")
    w.add_argument("--max-seconds", type=float, default=300)
    w.add_argument("--settle", type=float, default=3)
    r = sub.add_parser("render")
    r.add_argument("--snapshots", required=True)
    r.add_argument("--svg")
    r.add_argument("--md")
    r.add_argument("--jobs")
    r.add_argument("--world", type=int, default=2)
    r.add_argument("--watch")
    c = sub.add_parser("check")
    c.add_argument("--jobs", required=True)
    c.add_argument("--world", type=int, required=True)
    c.add_argument("--watch")
    c.add_argument("--svg", required=True)
    c.add_argument("--min-scrapes", type=int, default=5)
    c.add_argument("--no-serve", metavar="REASON")
    a = ap.parse_args(argv)
    if a.cmd == "check" and not a.no_serve and not a.watch:
        ap.error("check needs --watch or --no-serve")
    if a.cmd == "check":
        return check(a, out)
    return {"watch": watch, "render": render}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
