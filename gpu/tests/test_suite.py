#!/usr/bin/env python3
"""Tests of the GPU suite that run anywhere (no GPU, no torch): the pure-Python parts directly,
and the rank programs, launch.py and run.sh end to end over gpu/tests/fake_torch (a stand-in for
torch whose ranks exchange data through files) and gpu/tests/fake_bin (stand-ins for
nvidia-cuda-mps-control and nvidia-smi).

    python3 gpu/tests/test_suite.py          # or: python3 -m unittest discover -s gpu/tests -v
"""

import io
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import unittest.mock
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
GPU = os.path.dirname(HERE)
sys.path.insert(0, GPU)

import common  # noqa: E402
import ddp  # noqa: E402
import faults  # noqa: E402
import launch  # noqa: E402
import logcheck  # noqa: E402
import metrics  # noqa: E402
import metricswatch  # noqa: E402
import nccltests  # noqa: E402
import prom  # noqa: E402
import rawtcp  # noqa: E402
import report  # noqa: E402
import threadprof  # noqa: E402

FAKE_TORCH = os.path.join(HERE, "fake_torch")
FAKE_BIN = os.path.join(HERE, "fake_bin")
FAKE_PERF = os.path.join(HERE, "fake_nccl_tests", "fake_perf.py")


def read(path):
    with open(path) as f:
        return f.read()


def fake_nccl_tests(d):
    """A directory of nccl-tests binaries, every one the fake (fake_nccl_tests/fake_perf.py)."""
    os.makedirs(d, exist_ok=True)
    for op in nccltests.OPS:
        os.symlink(FAKE_PERF, os.path.join(d, f"{op}_perf"))
    return d


def fake_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = FAKE_TORCH + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = FAKE_BIN + os.pathsep + env["PATH"]
    for k in list(env):
        if k.startswith(("FAKE_TORCH_", "FAKE_TCPXSHIM_", "TCPXSHIM_", "NCCL_", "QUICK", "PARTS", "WORLDS", "SUITE_")):
            del env[k]
    env.update({k: str(v) for k, v in extra.items()})
    return env


def rank_processes_alive(marker):
    """PIDs of live processes whose command line contains marker."""
    alive = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and "test_suite" not in cmd:
            alive.append(int(pid))
    return alive


# ------------------------------------------------------------------------------------------------
class TempDirCase(unittest.TestCase):
    """A test case with a scratch directory, self.dir, removed after each test."""

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)


class CommonTests(unittest.TestCase):
    def simulate(self, op, world, n, salt, root):
        """Every rank's result of op, from the collective's definition."""
        inputs = {r: [common.input_value(r, i, salt) for i in range(n)] for r in range(world)}
        if op == "all_reduce":
            s = [sum(inputs[r][i] for r in range(world)) for i in range(n)]
            return {r: s for r in range(world)}
        if op == "all_gather":
            g = [v for r in range(world) for v in inputs[r]]
            return {r: g for r in range(world)}
        if op == "reduce_scatter":
            big = {r: [common.input_value(r, i, salt) for i in range(world * n)] for r in range(world)}
            s = [sum(big[r][i] for r in range(world)) for i in range(world * n)]
            return {r: s[r * n : (r + 1) * n] for r in range(world)}
        if op == "broadcast":
            return {r: inputs[root] for r in range(world)}
        if op == "sendrecv":
            return {common.ring_next(r, world): inputs[r] for r in range(world)}
        raise ValueError(op)

    def test_expected_values_follow_the_collectives_definitions(self):
        for world in (1, 2, 3, 4):
            for n in (1, 2, 5, 9):
                for salt in range(7):
                    for op in common.OPS:
                        for root in range(world) if op == "broadcast" else [0]:
                            res = self.simulate(op, world, n, salt, root)
                            for r in range(world):
                                self.assertEqual(len(res[r]), common.output_len(op, n, world))
                                got = [common.expected_value(op, r, world, n, i, salt, root) for i in range(len(res[r]))]
                                self.assertEqual(got, res[r], (op, world, n, salt, root, r))

    def test_values_are_exact_in_float32(self):
        # The largest value: 1+..+world times 7 must stay far below 2**24.
        self.assertLess(common.tri(64) * 7, 2**24)

    def test_salts_make_consecutive_checks_differ(self):
        for salt in range(7):
            a = [common.pattern_value(i, salt) for i in range(14)]
            b = [common.pattern_value(i, (salt + 1) % 7) for i in range(14)]
            self.assertTrue(all(x != y for x, y in zip(a, b)))
        # a shift by a power of two never maps the pattern onto itself
        for k in range(1, 28):
            self.assertNotEqual(common.pattern_value(2**k, 0), common.pattern_value(0, 0))

    def test_spot_indices(self):
        self.assertEqual(common.spot_indices(1), [0])
        self.assertEqual(common.spot_indices(0), [])
        idx = common.spot_indices(1000)
        self.assertIn(0, idx)
        self.assertIn(999, idx)
        self.assertTrue(all(0 <= i < 1000 for i in idx))

    def test_human_bytes_like_the_shim(self):
        # The examples of src/metrics/mod.rs's test.
        self.assertEqual(common.human_bytes(17), "17 B")
        self.assertEqual(common.human_bytes(1536), "1.50 KiB")
        self.assertEqual(common.human_bytes(3 << 30), "3.00 GiB")
        for b in (0, 1, 1023, 1024, 999999, 64 << 20, 21 * (64 << 20), 5 << 40):
            t = common.human_bytes(b)
            self.assertLessEqual(abs(common.parse_human_bytes(t) - b), b * common.human_bytes_rel_error(t) + 1e-9, t)
        self.assertEqual(common.parse_human_bytes("1.96 GiB"), 1.96 * 2**30)
        with self.assertRaises(ValueError):
            common.parse_human_bytes("12 parsecs")

    def test_batches_and_median(self):
        self.assertEqual(common.sweep_batches(200), 5)
        self.assertEqual(common.sweep_batches(24), 1)
        for size in common.sweep_sizes(False):
            _, iters = common.sweep_iters(size, False)
            self.assertGreaterEqual(iters // common.sweep_batches(iters), 1)
        self.assertEqual(common.median([3.0, 1.0, 100.0]), 3.0)
        self.assertEqual(common.median([4.0, 1.0, 2.0, 100.0]), 3.0)

    def test_sizes_and_iterations(self):
        full = common.sweep_sizes(False)
        self.assertEqual(full[0], 8)
        self.assertEqual(full[-1], 256 * common.MiB)
        self.assertEqual(len(full), 26)
        self.assertTrue(all(b == 2 * a for a, b in zip(full, full[1:])))
        quick = common.sweep_sizes(True)
        for s in (8, 2 * common.MiB, 32 * common.MiB, 128 * common.MiB):
            self.assertIn(s, full)
            self.assertIn(s, quick)
        self.assertEqual(common.sweep_sizes(False, max_size=64), [8, 16, 32, 64])
        for s in full:
            w, it = common.sweep_iters(s, False)
            self.assertTrue(5 <= it <= 200 and 1 <= w <= 20, (s, w, it))
        self.assertEqual(common.collective_sizes(False)[-1] * 4, 256 * common.MiB)
        self.assertIn(1, common.collective_sizes(True))

    def test_table_format_like_nccl_tests(self):
        row = common.make_row("all_reduce", 8 << 20, 2 << 20, 1000.0, 2, 0, 20)
        self.assertAlmostEqual(row["algbw"], 8.388608)
        self.assertAlmostEqual(row["busbw"], 8.388608)
        row4 = common.make_row("all_reduce", 8 << 20, 2 << 20, 1000.0, 4, 0, 20)
        self.assertAlmostEqual(row4["busbw"], 8.388608 * 1.5)
        sr = common.make_row("sendrecv", 8 << 20, 2 << 20, 1000.0, 4, 0, 20)
        self.assertAlmostEqual(sr["busbw"], sr["algbw"])
        line = common.table_row(row)
        self.assertEqual(line.split(), ["8388608", "2097152", "float", "sum", "-1", "1000.00", "8.39", "8.39", "0"])
        # columns line up with the header's
        header = common.TABLE_HEADER.splitlines()[0]
        self.assertEqual(len(line), len(header))
        text = common.format_table("sendrecv", [sr], title="sweep x")
        self.assertIn("# Avg bus bandwidth", text)
        self.assertIn("out of place", text)


# ------------------------------------------------------------------------------------------------
def nccl_log(net="tcpxshim", shim=True, world=2, rank=0, extra=(), closed=None):
    """A rank's log in the formats of NCCL 2.28 and the shim."""
    h = f"gpu1:{1000 + rank}:{1000 + rank} [0] NCCL"
    lines = [f"{h} INFO NCCL version 2.28.9+cuda13.0"]
    if shim:
        lines.append(f"{h} INFO NET/TCPXSHIM loaded builtin from (built-in), 1 device(s), reporting name tcpxshim")
    lines.append(f"{h} INFO Using network {net}")
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    for ch in range(2):
        lines.append(f"{h} INFO Channel {ch:02d}/0 : {prv}[0] -> {rank}[0] [receive] via NET/{net}/0")
        lines.append(f"{h} INFO Channel {ch:02d}/0 : {rank}[0] -> {nxt}[0] [send] via NET/{net}/0")
    lines += [x.format(h=h) for x in extra]
    for kind, cid, text, errs in closed or []:
        lines.append(
            f"{h} INFO NET/TCPXSHIM closed {kind} comm #{cid} (dev 0, peer 127.0.0.1:3277{cid}, 4 streams): "
            f"2545 messages, {text}, {errs} errors, open 0.7 s"
        )
    return "\n".join(lines) + "\n"


class LogcheckTests(TempDirCase):
    def write(self, label, texts):
        for r, t in enumerate(texts):
            with open(os.path.join(self.dir, f"{label}.rank{r}.log"), "w") as f:
                f.write(t)

    def net(self, texts, expect="tcpxshim", shim=True):
        self.write("x", texts)
        return logcheck.check_net(logcheck.read_logs(self.dir, "x", len(texts)), expect, shim)

    def test_the_readme_closed_line(self):
        s = logcheck.scan(
            "h:1:1 [0] NCCL INFO NET/TCPXSHIM closed send comm #5 (dev 0, peer 127.0.0.1:32771, 4 streams): "
            "2545 messages, 1.96 GiB, 0 errors, open 0.7 s\n"
        )
        c = s["closed"][0]
        self.assertEqual((c["kind"], c["id"], c["messages"], c["errors"]), ("send", 5, 2545, 0))
        self.assertEqual(c["bytes"], 1.96 * 2**30)
        self.assertEqual(c["what"], "dev 0, peer 127.0.0.1:32771, 4 streams")
        s = logcheck.scan("x NET/TCPXSHIM closed recv comm #6 (dev 0, peer a:1): 0 messages, 0 B, 0 errors, open 12.0 s")
        self.assertEqual(s["closed"][0]["bytes"], 0)

    def test_good_shim_logs_pass(self):
        problems, info = self.net([nccl_log(rank=r) for r in range(2)])
        self.assertEqual(problems, [])
        self.assertTrue(any("4 channel lines via NET/tcpxshim, 0 via another" in i for i in info), info)

    def test_good_socket_logs_pass(self):
        problems, _ = self.net([nccl_log("Socket", shim=False, rank=r) for r in range(4)], "Socket", False)
        self.assertEqual(problems, [])

    def test_each_problem_is_found(self):
        good = nccl_log(rank=0)
        cases = {
            "Using network tcpxshim": nccl_log(net="Socket", rank=1),
            "no 'NET/TCPXSHIM loaded' line": nccl_log(shim=False, rank=1),
            "shim WARN": nccl_log(rank=1, extra=["{h} WARN NET/TCPXSHIM isend: connection to 127.0.0.1:5 closed"]),
            "closed with 3 errors": nccl_log(rank=1, closed=[("send", 1, "1.00 MiB", 3)]),
            "no 'via NET/...' channel line": "h:1:1 [0] NCCL INFO Using network tcpxshim\nNET/TCPXSHIM loaded x\n",
            "another transport": nccl_log(rank=1, extra=["{h} INFO Channel 02/0 : 0[0] -> 1[0] via P2P/IPC"]),
        }
        for want, bad in cases.items():
            problems, _ = self.net([good, bad])
            self.assertTrue(any(want in p and p.startswith("rank 1") for p in problems), (want, problems))
        problems, _ = self.net([good, nccl_log(rank=1).replace("via NET/tcpxshim/0", "via NET/Socket/0", 1)])
        self.assertTrue(any("1 channel lines via another network (NET/Socket)" in p for p in problems), problems)
        # a missing log
        self.write("y", [good])
        problems, _ = logcheck.check_net(logcheck.read_logs(self.dir, "y", 2), "tcpxshim", True)
        self.assertTrue(any("rank 1: no log" in p for p in problems), problems)
        # a WARN from NCCL itself is shown, not failed
        problems, info = self.net([good, nccl_log(rank=1, extra=["{h} WARN Call to connect returned Connection refused"])])
        self.assertEqual(problems, [])
        self.assertTrue(any("not from the shim" in i for i in info))

    def counters(self, texts, size=64 << 20, iters=20, warmup=1, tol=0.03):
        self.write("c", texts)
        spec = {"world": len(texts), "size": size, "iters": iters, "warmup": warmup}
        return logcheck.check_counters(logcheck.read_logs(self.dir, "c", len(texts)), spec, tol)

    def test_counters(self):
        # 21 x 64 MiB = 1.3125 GiB per rank, over two send comms (channels)
        ok = [("send", 1, "672.00 MiB", 0), ("send", 3, "672.00 MiB", 0), ("recv", 2, "1.31 GiB", 0), ("send", 9, "0 B", 0)]
        problems, info = self.counters([nccl_log(rank=r, closed=ok) for r in range(2)])
        self.assertEqual(problems, [], info)
        self.assertTrue(any("rank 0 +0.00%" in i for i in info), info)
        # printed as one rounded value: 1.31 GiB is -0.19%
        problems, _ = self.counters([nccl_log(rank=r, closed=[("send", 1, "1.31 GiB", 0)]) for r in range(2)])
        self.assertEqual(problems, [])
        # 10% too much on rank 1
        bad = [("send", 1, "1.44 GiB", 0)]
        problems, _ = self.counters([nccl_log(rank=0, closed=ok), nccl_log(rank=1, closed=bad)])
        self.assertEqual(len(problems), 1)
        self.assertIn("rank 1", problems[0])
        # 4 ranks: 2(n-1)/n = 1.5
        four = [("send", 1, "1.97 GiB", 0)]
        problems, _ = self.counters([nccl_log(rank=r, world=4, closed=four) for r in range(4)])
        self.assertEqual(problems, [])
        # nothing closed
        problems, _ = self.counters([nccl_log(rank=r) for r in range(2)])
        self.assertTrue(all("no 'NET/TCPXSHIM closed send comm' line" in p for p in problems) and len(problems) == 2)


# ------------------------------------------------------------------------------------------------
def synth_sweep(label, lat_us, bw, world=2, quick=False, wrong_at=None, env=None):
    ops = {}
    for op in ("all_reduce", "sendrecv"):
        rows = []
        for size in common.sweep_sizes(quick):
            t = lat_us + size * common.busbw_factor(op, world) / (bw * 1e3)
            rows.append(common.make_row(op, size, size // 4, t, world, 3 if size == wrong_at else 0, 10))
        ops[op] = rows
    return {
        "label": label,
        "mode": label,
        "world": world,
        "quick": quick,
        "host": "gpu1",
        "started": "2026-01-01T00:00:00",
        "versions": {"torch": "2.11.0", "nccl": "2.28.9", "cuda": "13.0"},
        "env": env or {},
        "ops": ops,
    }


class ReportTests(TempDirCase):
    def setUp(self):
        super().setUp()
        self.paths = []
        for label, lat, bw in (("socket", 25, 2.8), ("socket44", 27, 2.6), ("shim", 36, 9.4), ("shim-driven", 30, 11)):
            env = launch.rank_env({}, label, "/opt/x/libnccl-net-tcpxshim.so", 0, 2, 1234)
            s = synth_sweep(label, lat, bw, wrong_at=1 << 20 if label == "shim" else None, env=common.relevant_env(env))
            p = os.path.join(self.dir, f"sweep-{label}.json")
            with open(p, "w") as f:
                json.dump(s, f)
            self.paths.append(p)

    def render(self, paths, notes=None):
        out = os.path.join(self.dir, "sweeps.json")
        args = ["merge", "--out", out] + [f"--note={k}={v}" for k, v in (notes or {}).items()] + paths
        with open(os.devnull, "w") as devnull:
            old, sys.stdout = sys.stdout, devnull
            try:
                self.assertEqual(report.main(args), 0)
                md, svg = os.path.join(self.dir, "results.md"), os.path.join(self.dir, "busbw.svg")
                self.assertEqual(report.main(["render", out, "--md", md, "--svg", svg, "--print"]), 0)
            finally:
                sys.stdout = old
        with open(md) as f, open(svg) as g:
            return f.read(), g.read()

    def test_markdown(self):
        md, _ = self.render(self.paths + [os.path.join(self.dir, "nope.json")], {"shim-driven": "no I/O workers"})
        self.assertIn("| shim/socket | 1.44x | 2.99x | 3.33x | 3.35x |", md)
        self.assertIn("| socket | 25.0 us | 2.71 GB/s | 2.79 GB/s | 2.80 GB/s |", md)
        self.assertIn("## all-reduce", md)
        self.assertIn("## send/recv", md)
        self.assertIn("| size | socket busbw (GB/s) | socket44 busbw (GB/s) | shim busbw (GB/s) | shim-driven busbw (GB/s) |", md)
        self.assertIn("(3 wrong!)", md)
        self.assertIn("missing sweep", md)
        self.assertIn("**no I/O workers**", md)
        self.assertIn("NCCL_TCPXSHIM_TCP_WORKERS=0", md)
        self.assertIn("NCCL_NET_PLUGIN=libnccl-net-tcpxshim.so", md)
        self.assertIn("![busbw against message size](busbw.svg)", md)
        # one row per size in each operation's table
        self.assertEqual(md.count("\n| 256M |"), 2)

    def test_svg(self):
        _, svg = self.render(self.paths, {"shim-driven": "no I/O workers"})
        root = ET.fromstring(svg)
        ns = "{http://www.w3.org/2000/svg}"
        self.assertEqual(len(root.findall(f"{ns}polyline")), 8)  # 4 modes x 2 operations
        texts = [t.text for t in root.iter(f"{ns}text")]
        for want in ("all-reduce", "send/recv", "8B", "2M", "128M", "busbw (GB/s)", "shim-driven (no I/O workers)"):
            self.assertIn(want, texts)
        self.assertTrue(any("wrong elements" in (t or "") for t in texts))
        if shutil.which("rsvg-convert"):
            png = os.path.join(self.dir, "busbw.png")
            svgp = os.path.join(self.dir, "busbw.svg")
            subprocess.run(["rsvg-convert", "-o", png, svgp], check=True)
            self.assertGreater(os.path.getsize(png), 10000)

    def test_without_baseline_and_single_op(self):
        s = synth_sweep("shim", 36, 9.4, quick=True)
        del s["ops"]["sendrecv"]
        p = os.path.join(self.dir, "one.json")
        with open(p, "w") as f:
            json.dump(s, f)
        md, svg = self.render([p])
        self.assertNotIn("Summary", md)
        ET.fromstring(svg)

    def test_nice_axis(self):
        for x in (0.004, 0.3, 2.8, 9.4, 11, 47, 123):
            top, step = report.nice_ceiling(x)
            self.assertGreaterEqual(top, x)
            self.assertLess(top, x * 2.6)
            self.assertLessEqual(top / step, 8.0001)


# ------------------------------------------------------------------------------------------------
def prom_file(rank, send, recv, msgs=(3, 3), ts=None, comms=((1, 2),), extra_lines=()):
    """A metrics file as the shim writes it: per comm pair, a send and a recv connection; send and
    recv are lists of byte counts, one per pair."""
    stamp = f" {ts}" if ts is not None else ""
    out = ["# HELP tcpxshim_bytes_total Payload bytes completed.", "# TYPE tcpxshim_bytes_total counter"]
    rows = []
    for i, (sc, rc) in enumerate(comms):
        for d, comm, b in (("send", sc, send[i]), ("recv", rc, recv[i])):
            lab = (f'rank="{rank}",local_rank="{rank}",host="gpu1",comm="{comm}",dir="{d}",peer="10.0.0.{2 - rank}:{4000 + i}",'
                   f'dev="0",transport="tcp"')
            rows.append((lab, b))
    out += [f"tcpxshim_bytes_total{{{lab}}} {b}{stamp}" for lab, b in rows]
    out += ["# TYPE tcpxshim_messages_total counter"]
    out += [f"tcpxshim_messages_total{{{lab}}} {msgs[0]}{stamp}" for lab, _ in rows]
    out += [f'tcpxshim_connections{{rank="{rank}",local_rank="{rank}",host="gpu1"}} {2 * len(comms)}']
    out += list(extra_lines)
    return "\n".join(out) + "\n"


class PromTests(unittest.TestCase):
    def test_parse(self):
        text = (
            "# HELP x A help line with {braces} and \"quotes\".\n# TYPE x counter\n\n"
            'tcpxshim_bytes_total{rank="0",dir="send",peer="a\\"b\\\\c\\nd"} 18446744073709551615\n'
            "tcpxshim_requests_in_flight 0\n"
            'tcpxshim_request_duration_seconds_bucket{size="64K",le="+Inf"} 12 1700000000123\n'
            'tcpxshim_last_progress_age_seconds{ rank = "1" , } 0.25\n'
            "tcpxshim_x{} 1.5e9\n"
            "tcpxshim_nan NaN\n"
        )
        s = prom.parse(text)
        self.assertEqual([x.name for x in s], ["tcpxshim_bytes_total", "tcpxshim_requests_in_flight",
                                               "tcpxshim_request_duration_seconds_bucket",
                                               "tcpxshim_last_progress_age_seconds", "tcpxshim_x", "tcpxshim_nan"])
        self.assertEqual(s[0].labels, {"rank": "0", "dir": "send", "peer": 'a"b\\c\nd'})
        self.assertEqual(s[0].value, 2**64 - 1)  # exact: an int, not a float
        self.assertIsInstance(s[0].value, int)
        self.assertEqual((s[1].labels, s[1].value), ({}, 0))
        self.assertEqual((s[2].labels["le"], s[2].value, s[2].timestamp_ms), ("+Inf", 12, 1700000000123))
        self.assertEqual((s[3].labels, s[3].value), ({"rank": "1"}, 0.25))
        self.assertEqual(s[4].value, 1500000000)
        self.assertIsInstance(s[4].value, int)
        self.assertNotEqual(s[5].value, s[5].value)
        for bad in ("tcpxshim_bytes_total{rank=0} 1", 'x{a="1"}', 'x{a="1"} one', "9x 1", 'x{a="1} 2'):
            with self.assertRaises(ValueError, msg=bad) as cm:
                prom.parse("# ok\n" + bad + "\n")
            self.assertIn("line 2", str(cm.exception))

    def test_sums(self):
        s = prom.parse(prom_file(1, [100, 7], [50, 3], comms=((1, 2), (3, 4))))
        self.assertEqual(prom.rank_bytes(s), {"send": 107, "recv": 53})
        self.assertEqual(prom.total(s, prom.BYTES, dir="send", comm=3), 7)
        self.assertEqual(prom.ranks(s), {"1"})
        self.assertEqual(len(prom.by_conn(s)), 4)
        self.assertEqual(prom.conn_name(s[0].labels), "r1 send #1 peer 10.0.0.1:4000 dev 0 tcp")

    def test_served_matches(self):
        f0, f1 = prom.parse(prom_file(0, [10], [20])), prom.parse(prom_file(1, [30], [40]))
        page = prom.parse(prom_file(0, [10], [20]) + prom_file(1, [30], [40]).replace('host="gpu1"', 'host="gpu1",file="b"'))
        self.assertEqual(prom.served_matches(page, [f0, f1]), (True, ""))  # a label added by the server is fine
        ok, why = prom.served_matches(prom.parse(prom_file(0, [10], [20]) + prom_file(1, [31], [40])), [f0, f1])
        self.assertFalse(ok)
        self.assertIn("r1 send #1 peer 10.0.0.1:4000 dev 0 tcp: 30 in the file, 31 on the page", why)
        ok, why = prom.served_matches(prom.parse(prom_file(0, [10], [20])), [f0, f1])
        self.assertFalse(ok)
        self.assertIn("not on the page", why)


class MetricsJobTests(TempDirCase):
    def test_expected_bytes(self):
        self.assertEqual(metrics.expected_bytes(64 * common.MiB, 20, 2), 20 * 64 * common.MiB)
        self.assertEqual(metrics.expected_bytes(64 * common.MiB, 20, 4), 30 * 64 * common.MiB)
        self.assertEqual(metrics.expected_bytes(64 * common.MiB, 20, 4), common.allreduce_ring_bytes_per_rank(64 * common.MiB, 4) * 20)
        with self.assertRaises(ValueError):
            metrics.expected_bytes(40000, 1, 3)

    def test_the_delta_must_be_exact(self):
        S, K = 64 * common.MiB, 20
        a = prom.parse(prom_file(0, [3 << 30, 5], [3 << 30, 5], comms=((1, 2), (3, 4))))
        half = K * S // 2
        b = prom.parse(prom_file(0, [(3 << 30) + half, 5 + half], [(3 << 30) + half, 5 + half], comms=((1, 2), (3, 4))))
        r = metrics.check_delta(a, b, S, K, 2)
        self.assertTrue(r["ok"], r)
        self.assertEqual((r["send"]["delta"], r["recv"]["delta"], r["expected"]), (K * S, K * S, K * S))
        # one byte too many on one connection
        b1 = prom.parse(prom_file(0, [(3 << 30) + half, 6 + half], [(3 << 30) + half, 5 + half], comms=((1, 2), (3, 4))))
        r = metrics.check_delta(a, b1, S, K, 2)
        self.assertFalse(r["ok"])
        self.assertEqual((r["send"]["exact"], r["recv"]["exact"], r["send"]["delta"] - r["expected"]), (False, True, 1))
        # a counter written as a fraction is not exact, whatever its value
        bf = prom.parse(prom_file(0, [(3 << 30) + K * S], [(3 << 30) + K * S]).replace(f" {(3 << 30) + K * S}\n", f" {(3 << 30) + K * S}.5\n"))
        self.assertFalse(metrics.check_delta(prom.parse(prom_file(0, [3 << 30], [3 << 30])), bf, S, K, 2)["send"]["exact"])

    def write(self, name, text, mtime_ns=None):
        path = os.path.join(self.dir, name)
        tmp = os.path.join(self.dir, "." + name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.rename(tmp, path)
        if mtime_ns is not None:
            os.utime(path, ns=(mtime_ns, mtime_ns))
        return path

    def test_own_file_and_wait_stable(self):
        self.assertIsNone(metrics.own_file(self.dir, 4242))
        self.write("gpu1-4243.prom", prom_file(1, [1], [1]))
        self.write(".gpu1-4242.prom.tmp", "x")
        self.assertIsNone(metrics.own_file(self.dir, 4242))
        path = self.write("gpu1-4242.prom", prom_file(0, [1], [1]))
        self.assertEqual(metrics.own_file(self.dir, 4242), path)
        before = metrics.read_version(path)[0]
        # every sleep of the waiter, the shim writes the next version: 10, 20 (bytes still moving), 20
        versions = [prom_file(0, [10], [10]), prom_file(0, [20], [15]), prom_file(0, [20], [20]), prom_file(0, [20], [20])]
        slept = []

        def sleep(_s):
            if versions:
                self.write("gpu1-4242.prom", versions.pop(0))
            slept.append(1)

        ident, text, samples, seen = metrics.wait_stable(lambda: metrics.own_file(self.dir, 4242), before, 30, sleep=sleep)
        self.assertEqual(prom.rank_bytes(samples), {"send": 20, "recv": 20})
        self.assertEqual(seen, 4)
        self.assertEqual(len(slept), 4)
        # no new write: bounded
        now = [0.0]

        def clock():
            now[0] += 1
            return now[0]

        with self.assertRaises(TimeoutError) as cm:
            metrics.wait_stable(lambda: metrics.own_file(self.dir, 4242), ident, 5, clock=clock, sleep=lambda _s: None)
        self.assertIn("0 new writes", str(cm.exception))
        with self.assertRaises(TimeoutError) as cm:
            metrics.wait_stable(lambda: None, None, 5, clock=clock, sleep=lambda _s: None)
        self.assertIn("no metrics file", str(cm.exception))


class MetricsWatchTests(TempDirCase):
    def setUp(self):
        super().setUp()
        self.mdir = os.path.join(self.dir, "prom")
        self.snaps = os.path.join(self.dir, "snaps")
        os.makedirs(self.mdir)
        os.makedirs(self.snaps)

    def write(self, name, text, t):
        path = os.path.join(self.mdir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.rename(path + ".tmp", path)
        os.utime(path, ns=(int(t * 1e9), int(t * 1e9)))

    def synthetic_run(self):
        """Two ranks' files, written at t = 100, 101, 102, 103 s (rank 1 half a second later); the
        second comm pair of rank 0 opens between the first and second write."""
        GiB = common.GiB
        seen, n = {}, 0
        with open(os.path.join(self.snaps, "index.jsonl"), "a") as index:
            for i, (b0, b1) in enumerate(((0, 0), (GiB, GiB // 2), (3 * GiB, GiB), (3 * GiB, GiB))):
                self.write("gpu1-10.prom", prom_file(0, [b0, b1], [b0, b1], comms=((1, 2), (3, 4)))
                           if i else prom_file(0, [b0], [b0]), 100 + i)
                self.write("gpu1-11.prom", prom_file(1, [2 * b0], [2 * b0]), 100.5 + i)
                n += metricswatch.copy_new(self.mdir, self.snaps, seen, index, 0)
                n += metricswatch.copy_new(self.mdir, self.snaps, seen, index, 0)  # nothing new: no copy
        self.assertEqual(n, 8)
        return metricswatch.load_versions(self.snaps)

    def test_throughput(self):
        versions = self.synthetic_run()
        self.assertEqual(sorted(versions), ["gpu1-10.prom", "gpu1-11.prom"])
        self.assertEqual([t for t, _ in versions["gpu1-10.prom"]], [100.0, 101.0, 102.0, 103.0])
        conns = metricswatch.throughput(versions)
        self.assertEqual(len(conns), 6)
        GiB = common.GiB
        by = {prom.conn_name(c["labels"]): c for c in conns.values()}
        c = by["r0 send #1 peer 10.0.0.2:4000 dev 0 tcp"]
        self.assertEqual(c["points"], [(0.0, 1.0, GiB, GiB), (1.0, 2.0, 2 * GiB, 2 * GiB), (2.0, 3.0, 0, 0)])
        self.assertEqual((c["bytes"], c["messages"]), (3 * GiB, 3))
        # opened after the first write: counted from 0
        c = by["r0 recv #4 peer 10.0.0.2:4001 dev 0 tcp"]
        self.assertEqual(c["points"][0], (0.0, 1.0, GiB // 2, GiB // 2))
        c = by["r1 send #1 peer 10.0.0.1:4000 dev 0 tcp"]
        self.assertEqual(c["points"][0][:2], (0.5, 1.5))
        mean, peak, secs = metricswatch.conn_stats(by["r0 send #1 peer 10.0.0.2:4000 dev 0 tcp"])
        self.assertAlmostEqual(mean, 1.5 * GiB / 1e9)
        self.assertAlmostEqual(peak, 2 * GiB / 1e9)
        self.assertEqual(secs, 2.0)
        # file timestamps, when there are, win over the file's mtime
        with open(os.path.join(self.snaps, "index.jsonl"), "a") as index:
            self.write("gpu1-12.prom", prom_file(2, [0], [0], ts=5000), 1)
            metricswatch.copy_new(self.mdir, self.snaps, {}, index, 0)
        self.assertEqual(metricswatch.load_versions(self.snaps)["gpu1-12.prom"][0][0], 5.0)

    def test_svg_and_markdown(self):
        conns = metricswatch.throughput(self.synthetic_run())
        svg = metricswatch.svg_throughput(conns, "title")
        root = ET.fromstring(svg)
        ns = "{http://www.w3.org/2000/svg}"
        lines = root.findall(f"{ns}polyline")
        self.assertEqual(len(lines), 6)
        texts = [t.text for t in root.iter(f"{ns}text")]
        for want in ("send", "recv", "throughput (GB/s)", "r0 recv #4 peer 10.0.0.2:4001 dev 0 tcp", "title"):
            self.assertIn(want, texts)
        # every point within its panel
        panels = [(float(r.get("x")), float(r.get("y")), float(r.get("width")), float(r.get("height")))
                  for r in root.findall(f"{ns}rect") if r.get("fill") == "none"]
        self.assertEqual(len(panels), 2)
        for pl in lines:
            pts = [tuple(map(float, p.split(","))) for p in pl.get("points").split()]
            self.assertTrue(any(all(x - 0.1 <= px <= x + w + 0.1 and y - 0.1 <= py <= y + h + 0.1 for px, py in pts)
                                for x, y, w, h in panels), pts)
        # 2 GiB in one second is the top of the plot: 2.15 GB/s, an axis up to 2.5
        self.assertIn("2.5", texts)
        jobs = [{"rank": 0, "world": 2, "iters": 20, "size": 64 << 20, "warmup": 1, "interval_s": 1, "expected": 20 << 26,
                 "ok": True, "seconds": 0.14, "send": {"delta": 20 << 26}, "recv": {"delta": 20 << 26}},
                {"rank": 1, "missing": "x.json: no such file"}]
        md = metricswatch.markdown(conns, jobs, "metrics-throughput.svg")
        self.assertIn("| 0 | 1342177280 | 1342177280 | 1342177280 | yes | 0.140 s |", md)
        self.assertIn("| 1 | | | | x.json: no such file | |", md)
        self.assertIn("| r0 send #1 peer 10.0.0.2:4000 dev 0 tcp | 3221225472 (3.00 GiB) | 3 | 1.61 | 2.15 | 2.0 |", md)
        rows = [x for x in md.splitlines() if x.startswith(("| r0 ", "| r1 "))]
        self.assertEqual([r.split()[1:3] for r in rows],
                         [["r0", "send"], ["r0", "send"], ["r0", "recv"], ["r0", "recv"], ["r1", "send"], ["r1", "recv"]])
        self.assertIn("![throughput of each connection against time](metrics-throughput.svg)", md)

    def pages(self, *kinds):
        out = []
        for i, k in enumerate(kinds):
            rec = {"t": i * 0.5}
            if k == "refused":
                rec.update(ok=False, refused=True, error="no answer: refused")
            elif k == "garbage":
                rec.update(ok=False, error="does not parse: line 3")
            else:
                rec.update(ok=True, ranks={"one": ["0"], "both": ["0", "1"], "none": []}[k], bytes={"a=1": i})
            out.append(rec)
        out[-1].update(final=True, matches_files=True)
        return {"url": "http://x/metrics", "interval_s": 0.5, "scrapes": out}

    def test_check_pages(self):
        p, info, valid = metricswatch.check_pages(self.pages("refused", "none", "one", "both", "both", "both"), 2, 3)
        self.assertEqual((p, valid), ([], 3))
        self.assertIn("pages: 6 fetched, 3 valid with all 2 ranks, 3 before the first valid one, 0 bad", info[0])
        p, _, _ = metricswatch.check_pages(self.pages("both", "both", "both"), 2, 4)
        self.assertEqual(p, ["only 3 valid pages, want at least 4"])
        p, _, _ = metricswatch.check_pages(self.pages("both", "one", "refused", "both"), 2, 1)
        self.assertEqual(p, ["2 bad pages (first: page at 0.5 s: ranks 0 of 2)"])
        p, _, _ = metricswatch.check_pages(self.pages("garbage", "both"), 2, 1)
        self.assertEqual(p, ["1 bad pages (first: page at 0.0 s: does not parse: line 3)"])
        w = self.pages("both", "both")
        w["scrapes"][-1].update(matches_files=False, mismatch="r0 send #1: 1 in the file, 0 on the page")
        p, _, _ = metricswatch.check_pages(w, 2, 1)
        self.assertEqual(p, ["the last page does not match the files: r0 send #1: 1 in the file, 0 on the page"])
        w["scrapes"][-1].pop("final")
        p, _, _ = metricswatch.check_pages(w, 2, 1)
        self.assertEqual(p, ["no last page after the run"])

    def test_check(self):
        S, K = 40000, 5
        for r in range(2):
            a = prom.parse(prom_file(r, [40000], [40000]))
            b = prom.parse(prom_file(r, [240000], [240000]))
            j = {"rank": r, "world": 2, "size": S, "iters": K, "warmup": 1}
            j.update(metrics.check_delta(a, b, S, K, 2))
            with open(os.path.join(self.dir, f"m.rank{r}.json"), "w") as f:
                json.dump(j, f)
        watch = os.path.join(self.dir, "w.json")
        with open(watch, "w") as f:
            json.dump(self.pages("refused", "both", "both"), f)
        svg = os.path.join(self.dir, "t.svg")
        with open(svg, "w") as f:
            f.write(metricswatch.svg_throughput(metricswatch.throughput(self.synthetic_run()), "t"))
        args = ["check", "--jobs", os.path.join(self.dir, "m.rank{rank}.json"), "--world", "2", "--svg", svg]

        def run(*more):
            buf = io.StringIO()
            rc = metricswatch.main(args + list(more), out=buf)
            return rc, buf.getvalue()

        rc, text = run("--watch", watch, "--min-scrapes", "2")
        self.assertEqual(rc, 0, text)
        self.assertIn("rank 1: send bytes 40000 -> 240000: delta 200000 B, expected 200000 B (5 x 40000 B x 2(n-1)/n): exact", text)
        self.assertTrue(text.rstrip().splitlines()[-1].startswith("summary: deltas exact on 2/2 ranks; serve: 2 valid pages of 3; plot 6 lines"), text)
        rc, text = run("--watch", watch, "--min-scrapes", "3")
        self.assertEqual(rc, 1, text)
        self.assertIn("PROBLEM: only 2 valid pages, want at least 3", text)
        rc, text = run("--no-serve", "TCPXSHIM_BIN not set")
        self.assertEqual(rc, 3, text)
        self.assertIn("serve SKIPPED (TCPXSHIM_BIN not set)", text)
        # a rank one byte off, a missing rank, no plot
        with open(os.path.join(self.dir, "m.rank1.json")) as f:
            j = json.load(f)
        j["send"].update(delta=200001, exact=False)
        j["ok"] = False
        with open(os.path.join(self.dir, "m.rank1.json"), "w") as f:
            json.dump(j, f)
        rc, text = run("--no-serve", "x")
        self.assertEqual(rc, 1, text)
        self.assertIn("PROBLEM: rank 1: send delta 200001 B, expected 200000 B exactly (+1 B)", text)
        os.unlink(os.path.join(self.dir, "m.rank0.json"))
        os.unlink(svg)
        rc, text = run("--no-serve", "x")
        self.assertIn("PROBLEM: rank 0: no result", text)
        self.assertIn("PROBLEM: no plot", text)


# ------------------------------------------------------------------------------------------------
class FaultChecksTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="tcpxshim-faults-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def kill(self, first_line, log, within=10):
        a = type("A", (), {})()
        a.launch = self.write("k.launch.txt", first_line + "\n")
        a.rank0_log = self.write("k.rank0.log", log)
        a.within = within
        with unittest.mock.patch("sys.stdout", new=io.StringIO()) as out:
            rc = faults.check_kill(a)
        return rc, out.getvalue()

    def test_a_survivor_that_fails_soon_naming_the_peer_passes(self):
        msg = "host:1:2 [0] NCCL WARN NET/TCPXSHIM test on recv comm #3 (peer 127.0.0.1:40001): connection lost"
        rc, out = self.kill("FAIL killpeer-shim-w2 (2 ranks, mode shim, 9.0 s): a rank failed; "
                            "rank 0 exit 1 at 8.9 s, rank 1 killed by SIGKILL at 6.1 s", msg)
        self.assertEqual(rc, 0, out)
        self.assertIn("2.8 s later", out)

    def test_a_late_silent_or_unharmed_survivor_fails(self):
        msg = "NCCL WARN NET/TCPXSHIM test on recv comm #3 (peer 127.0.0.1:40001): connection lost"
        late = "rank 0 exit 1 at 30.0 s, rank 1 killed by SIGKILL at 6.0 s"
        self.assertEqual(self.kill("x; " + late, msg)[0], 1)
        soon = "rank 0 exit 1 at 7.0 s, rank 1 killed by SIGKILL at 6.0 s"
        self.assertEqual(self.kill("x; " + soon, "no shim line here")[0], 1)
        unharmed = "rank 0 exit 0 at 60.0 s, rank 1 exit 0 at 60.0 s"
        self.assertEqual(self.kill("x; " + unharmed, msg)[0], 1)

    def test_drops_are_counted_from_the_drop_command_lines(self):
        a = type("A", (), {})()
        a.drops = self.write("d.txt", "dropped 127.0.0.1:51000 -> 127.0.0.1:40000\n"
                             "round 1: dropped 1 connection(s) of process 9 at 3.0 s\n"
                             "dropped 1 connection(s) in all\n")
        a.min = 1
        with unittest.mock.patch("sys.stdout", new=io.StringIO()):
            self.assertEqual(faults.check_drops(a), 0)
            a.min = 2
            self.assertEqual(faults.check_drops(a), 1)


class DdpCompareTests(unittest.TestCase):
    base = {"mode": "shim", "losses": [2.3, 2.1, 1.9], "param_sums": [1.5, -0.25], "replicas_differing": 0}

    def other(self, **kw):
        d = dict(self.base, mode="socket")
        d.update(kw)
        return d

    def test_identical(self):
        ok, lines = ddp.compare_runs(self.base, self.other(), 1e-6)
        self.assertTrue(ok, lines)
        self.assertIn("3 identical", lines[0])

    def test_within_and_beyond_tolerance(self):
        ok, _ = ddp.compare_runs(self.base, self.other(losses=[2.3, 2.1 * (1 + 1e-7), 1.9]), 1e-6)
        self.assertTrue(ok)
        ok, lines = ddp.compare_runs(self.base, self.other(losses=[2.3, 2.1, 1.95]), 1e-6)
        self.assertFalse(ok)
        self.assertTrue(any(x.startswith("step 2:") for x in lines), lines)
        ok, _ = ddp.compare_runs(self.base, self.other(param_sums=[1.5, -0.26]), 1e-6)
        self.assertFalse(ok)
        ok, _ = ddp.compare_runs(self.base, self.other(replicas_differing=1), 1e-6)
        self.assertFalse(ok)
        ok, _ = ddp.compare_runs(self.base, self.other(losses=[2.3]), 1e-6)
        self.assertFalse(ok)


# ------------------------------------------------------------------------------------------------
class LaunchTests(TempDirCase):
    def test_rank_env(self):
        base = {"PATH": "/bin", "NCCL_TCPXSHIM_TCP_STREAMS": "8", "NCCL_ALGO": "Ring"}
        envs = [launch.rank_env(base, "shim", "/p/lib.so", r, 4, 5555) for r in range(4)]
        self.assertEqual(len({e["NCCL_HOSTID"] for e in envs}), 4)
        for r, e in enumerate(envs):
            self.assertEqual((e["RANK"], e["WORLD_SIZE"], e["MASTER_PORT"]), (str(r), "4", "5555"))
            for k, v in launch.COMMON_ENV.items():
                self.assertEqual(e[k], v)
            self.assertEqual(e["NCCL_NET_PLUGIN"], "/p/lib.so")
            self.assertEqual(e["NCCL_TCPXSHIM_TCP_IFNAME"], "lo")
            self.assertEqual(e["NCCL_TCPXSHIM_TCP_STREAMS"], "8")
            self.assertEqual(e["NCCL_ALGO"], "Ring")
        sock = launch.rank_env(base, "socket", "", 0, 2, 1, ["NCCL_PROTO=Simple"])
        self.assertEqual((sock["NCCL_NET_PLUGIN"], sock["NCCL_NET"], sock["NCCL_PROTO"]), ("none", "Socket", "Simple"))
        self.assertNotIn("NCCL_TCPXSHIM_TCP_STREAMS", sock)
        s44 = launch.rank_env(base, "socket44", "", 0, 2, 1)
        self.assertEqual((s44["NCCL_SOCKET_NTHREADS"], s44["NCCL_NSOCKS_PERTHREAD"]), ("4", "4"))
        with self.assertRaises(ValueError):
            launch.rank_env(base, "shim", "", 0, 2, 1)
        with self.assertRaises(ValueError):
            launch.rank_env(base, "nope", "", 0, 2, 1)
        with self.assertRaises(ValueError):
            launch.rank_env(base, "socket", "", 0, 2, 1, ["NOEQUALS"])

    def run_launch(self, label, world, mode, prog, timeout=60, grace=15, **env):
        cmd = [sys.executable, os.path.join(GPU, "launch.py"), "--label", label, "--world", str(world),
               "--mode", mode, "--plugin", "/opt/fake/libnccl-net-tcpxshim.so", "--logdir", self.dir,
               "--timeout", str(timeout), "--grace", str(grace), "--"] + [sys.executable] + prog
        t0 = time.monotonic()
        p = subprocess.run(cmd, env=fake_env(TMPDIR=self.dir, **env), capture_output=True, text=True, timeout=timeout + 60)
        return p.returncode, p.stdout + p.stderr, time.monotonic() - t0

    def test_collectives_pass_2_and_4_ranks(self):
        for world, mode in ((2, "shim"), (4, "socket"), (3, "shim")):
            rc, out, _ = self.run_launch(f"c{world}", world, mode, [os.path.join(GPU, "collectives.py"), "--sizes", "1,3,1000,4099"])
            self.assertEqual(rc, 0, out)
            checks = 4 * (4 + world)
            self.assertEqual(out.count(f"all {checks} checks passed"), world, out)
            with open(os.path.join(self.dir, f"c{world}.rank{world - 1}.log")) as f:
                log = f.read()
            self.assertIn(f"NCCL_HOSTID=tcpxshim-host{world - 1}", log)
            self.assertIn("CHECK OK reduce_scatter of 4099 floats", log)
            self.assertFalse(os.path.exists(os.path.join(self.dir, f"c{world}.pids")))

    def test_a_wrong_result_fails_the_run_and_names_it(self):
        rc, out, _ = self.run_launch(
            "bad", 2, "shim", [os.path.join(GPU, "collectives.py"), "--sizes", "3,1000"], FAKE_TORCH_FAULT="1:all_gather:corrupt"
        )
        self.assertEqual(rc, 1, out)
        self.assertIn("all_gather of 1000 floats (3.91 KiB) on rank 1 of 2: first bad index 5: got", out)
        with open(os.path.join(self.dir, "bad.launch.txt")) as f:
            self.assertIn("REASON a rank failed; first problem: rank 1: CHECK MISMATCH all_gather", f.read())
        self.assertIn("all 12 checks passed", out)  # rank 0 was fine

    def test_a_crashed_rank_gets_the_others_killed_after_the_grace_time(self):
        rc, out, dt = self.run_launch(
            "crash", 3, "socket", [os.path.join(GPU, "collectives.py"), "--sizes", "3"], grace=2, FAKE_TORCH_FAULT="1:init:crash"
        )
        self.assertEqual(rc, 1, out)
        self.assertLess(dt, 15, out)
        self.assertIn("rank 1 exit 1", out)
        self.assertIn("rank 0 killed", out)
        self.assertIn("RuntimeError: fake: rank 1 crashes in init", out)
        self.assertEqual(rank_processes_alive(self.dir), [])

    def test_a_hang_times_out(self):
        rc, out, dt = self.run_launch(
            "hang", 2, "socket", [os.path.join(GPU, "collectives.py"), "--sizes", "3"], timeout=3, FAKE_TORCH_FAULT="0:init:hang",
            TCPXSHIM_SUITE_GDB=0,
        )
        self.assertEqual(rc, 124, out)
        self.assertIn("timed out after 3 s (thread stacks of the stuck ranks: hang.hang.txt)", out)
        self.assertLess(dt, 15)
        with open(os.path.join(self.dir, "hang.hang.txt")) as f:
            dump = f.read()
        self.assertIn("## rank 0\n== pid ", dump)
        self.assertRegex(dump, r"-- thread \d+ '[^']+' state [A-Z] wchan ")
        self.assertIn("kernel stacks only", dump)
        self.assertEqual(rank_processes_alive(self.dir), [])

    def test_counters_program_and_check(self):
        spec = os.path.join(self.dir, "c.json")
        rc, out, _ = self.run_launch(
            "cnt", 2, "shim", [os.path.join(GPU, "counters.py"), "--json", spec, "--size", "40000", "--iters", "5"]
        )
        self.assertEqual(rc, 0, out)
        with open(spec) as f:
            s = json.load(f)
        self.assertEqual((s["world"], s["size"], s["iters"], s["warmup"]), (2, 40000, 5, 1))
        with open(os.devnull, "w") as devnull:
            rc = logcheck.main(["counters", "--spec", spec, "--label", "cnt", "--world", "2", "--logdir", self.dir], out=devnull)
        self.assertEqual(rc, 0)
        # and a miscount is caught
        rc, out, _ = self.run_launch(
            "cnt2", 2, "shim", [os.path.join(GPU, "counters.py"), "--json", spec, "--size", "40000", "--iters", "5"],
            FAKE_TORCH_FAULT="1:destroy:bytes",
        )
        self.assertEqual(rc, 0, out)
        with open(os.devnull, "w") as devnull:
            rc = logcheck.main(["counters", "--spec", spec, "--label", "cnt2", "--world", "2", "--logdir", self.dir], out=devnull)
        self.assertEqual(rc, 1)

    def test_metrics_program(self):
        mdir = os.path.join(self.dir, "prom")
        js = os.path.join(self.dir, "m.rank{rank}.json")
        prog = [os.path.join(GPU, "metrics.py"), "--json", js, "--size", "40000", "--iters", "5"]
        rc, out, _ = self.run_launch("met", 2, "shim", prog, NCCL_TCPXSHIM_METRICS_DIR=mdir, NCCL_TCPXSHIM_METRICS_INTERVAL=1)
        self.assertEqual(rc, 0, out)
        self.assertIn("[r1] rank 1: 5 all_reduce of 39.06 KiB in", out)
        self.assertIn("metrics exact: send delta 200000 B, recv delta 200000 B, expected 200000 B", out)
        for r in range(2):
            with open(js.replace("{rank}", str(r))) as f:
                j = json.load(f)
            self.assertTrue(j["ok"], j)
            self.assertEqual((j["send"]["delta"], j["recv"]["delta"], j["ranks_labelled"]), (200000, 200000, [str(r)]))
            self.assertGreaterEqual(j["writes_b"], 2)
            self.assertTrue(os.path.exists(os.path.join(self.dir, f"m.rank{r}.B.prom")))
        self.assertEqual(len(metricswatch.prom_files(mdir)), 2)
        # one byte too many per send on rank 1: the rank says so and fails
        rc, out, _ = self.run_launch("met2", 2, "shim", prog, NCCL_TCPXSHIM_METRICS_DIR=mdir, NCCL_TCPXSHIM_METRICS_INTERVAL=1,
                                     FAKE_TORCH_FAULT="1:metrics:bytes")
        self.assertEqual(rc, 1, out)
        self.assertIn("rank 1: 5 all_reduce of 39.06 KiB", out)
        self.assertIn("metrics MISMATCH: send delta 200005 B, recv delta 200000 B, expected 200000 B", out)
        # no metrics file yet (the first write due in 100 s): a bounded wait, then a clear failure
        rc, out, _ = self.run_launch("met3", 2, "shim", prog + ["--wait-s", "1"], NCCL_TCPXSHIM_METRICS_DIR=mdir + "-late",
                                     NCCL_TCPXSHIM_METRICS_INTERVAL=100)
        self.assertEqual(rc, 1, out)
        self.assertIn("METRICS FAILED: no two consecutive writes with the same byte totals within 1 s (no metrics file)", out)

    def test_sweep_program(self):
        js = os.path.join(self.dir, "s.json")
        rc, out, _ = self.run_launch(
            "sw", 2, "socket44", [os.path.join(GPU, "sweep.py"), "--label", "socket44", "--json", js, "--quick", "--max-size", "2048"]
        )
        self.assertEqual(rc, 0, out)
        with open(js) as f:
            s = json.load(f)
        self.assertEqual(s["label"], "socket44")
        self.assertEqual([r["size"] for r in s["ops"]["all_reduce"]], [8, 32, 128, 512, 2048])
        self.assertTrue(all(r["wrong"] == 0 and r["time_us"] > 0 for op in s["ops"].values() for r in op))
        self.assertEqual(s["env"]["NCCL_SOCKET_NTHREADS"], "4")
        with open(os.path.join(self.dir, "sw.rank0.log")) as f:
            log = f.read()
        self.assertIn(common.TABLE_HEADER, log)
        # wrong results are counted
        rc, out, _ = self.run_launch(
            "sw2", 2, "socket", [os.path.join(GPU, "sweep.py"), "--label", "socket", "--json", js, "--quick", "--max-size", "128",
                                 "--ops", "sendrecv"], FAKE_TORCH_FAULT="0:sendrecv:corrupt"
        )
        self.assertEqual(rc, 1, out)
        with open(js) as f:
            s = json.load(f)
        self.assertEqual([r["wrong"] for r in s["ops"]["sendrecv"]], [0, 1, 1])


# ------------------------------------------------------------------------------------------------
class ToolTests(unittest.TestCase):
    def test_rawtcp_moves_bytes(self):
        self.assertGreater(rawtcp.run(1, 0.2, 1 << 16, False), 0)
        self.assertGreater(rawtcp.run(2, 0.2, 1 << 16, True), 0)
        self.assertGreater(rawtcp.run(2, 0.2, 1 << 16, True, (0, 0)), 0)
        self.assertEqual(rawtcp.parse_bytes("4M"), 4 << 20)
        self.assertEqual(rawtcp.parse_bytes("100"), 100)

    def test_threadprof_groups_and_picks_busy_intervals(self):
        self.assertEqual(threadprof.group_name("txs0-io3"), "txs0-io*")
        self.assertEqual(threadprof.group_name("python3"), "python*")
        # pid 1: two I/O workers busy 50% each during seconds 1-3; idle at start-up (second 0-1)
        samples = [(0.0, {(1, 10): ("io0", 0.0), (1, 11): ("io1", 0.0)}),
                   (1.0, {(1, 10): ("io0", 0.01), (1, 11): ("io1", 0.0)}),
                   (2.0, {(1, 10): ("io0", 0.51), (1, 11): ("io1", 0.5)}),
                   (3.0, {(1, 10): ("io0", 1.01), (1, 11): ("io1", 1.0)})]
        avg, secs, n = threadprof.busy_average(samples, 0.5)
        self.assertEqual(n, 2)
        self.assertAlmostEqual(secs, 2.0)
        share, threads = avg[(1, "io*")]
        self.assertAlmostEqual(share, 1.0)
        self.assertEqual(threads, 2)
        per = threadprof.busy_threads(samples, 0.5)
        self.assertEqual(per[(1, 10)][0], "io0")
        self.assertAlmostEqual(per[(1, 10)][1], 0.5)
        self.assertAlmostEqual(per[(1, 11)][1], 0.5)

    def test_threadprof_sees_a_busy_process(self):
        # A spinning and a sleeping process carry the same marker; the sampler must tell them apart
        # (the spinning one's share depends on how loaded the machine is, so no fixed threshold).
        code = "import sys, time\nt = time.time()\nwhile time.time() - t < 2:\n    {}"
        busy = subprocess.Popen([sys.executable, "-c", code.format("pass"), "tcpxshim-threadprof-test"])
        idle = subprocess.Popen([sys.executable, "-c", code.format("time.sleep(0.05)"), "tcpxshim-threadprof-test"])
        try:
            p = subprocess.run([sys.executable, os.path.join(GPU, "threadprof.py"), "--match", "tcpxshim-threadprof-test",
                                "--interval", "0.2", "--busy", "0"], capture_output=True, text=True, timeout=60)
        finally:
            busy.wait(timeout=30)
            idle.wait(timeout=30)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        groups, threads = p.stdout.split("busiest threads")

        def share(part, pid):
            rows = [ln.split() for ln in part.splitlines() if ln.strip().startswith(str(pid) + " ")]
            return float(rows[0][-1]) if rows else 0.0

        for part in (groups, threads):
            self.assertGreater(share(part, busy.pid), 5.0, p.stdout)
            self.assertGreater(share(part, busy.pid), 5 * share(part, idle.pid), p.stdout)


NT_OUTPUT = """# nccl-tests version 2.19.6 nccl-headers=22803 nccl-library=22803
# Collective test starting: all_reduce_perf
#
#       size         count      type   redop    root     time   algbw   busbw  #wrong     time   algbw   busbw  #wrong
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)             (us)  (GB/s)  (GB/s)
           8             2     float     sum      -1    28.70    0.00    0.00       0    28.10    0.00    0.00       0
   134217728      33554432     float     sum      -1  28460.1    4.72    4.72       0  28000.0    4.79    4.79       2
rank=1 #wrong=2
# Out of bounds values : 2 FAILED
# Avg bus bandwidth    : 2.36
"""


class NcclTestsTests(TempDirCase):
    def test_output_is_parsed_with_both_placements_and_the_check(self):
        rows, oob = nccltests.parse_output(NT_OUTPUT, "all_reduce", 2, 20)
        self.assertEqual(oob, 2)
        self.assertEqual([r["size"] for r in rows], [8, 134217728])
        self.assertEqual(rows[0]["time_us"], 28.7)
        self.assertEqual(rows[0]["ip_time_us"], 28.1)
        self.assertEqual(rows[1]["busbw"], 4.72)
        self.assertEqual(rows[1]["ip_busbw"], 4.79)
        self.assertEqual([r["wrong"] for r in rows], [0, 2])
        self.assertEqual(nccltests.parse_output("# nothing\nrank=0 #wrong=3\n", "x", 2, 1), ([], None))

    def test_repeats_merge_to_the_median_and_keep_every_run(self):
        runs = [[{"size": 8, "time_us": t, "busbw": 1.0 / t, "algbw": 1.0 / t, "wrong": w}]
                for t, w in ((30.0, 0), (10.0, 1), (20.0, 0))]
        (row,) = nccltests.merge_repeats(runs)
        self.assertEqual(row["time_us"], 20.0)
        self.assertAlmostEqual(row["busbw"], 1.0 / 20)
        self.assertEqual(row["wrong"], 1)
        self.assertEqual(row["runs_time_us"], [30.0, 10.0, 20.0])
        self.assertAlmostEqual(nccltests.spread(row), 1.0)

    def run_nt(self, mode, bind, world, log, **env):
        bindir = os.path.join(self.dir, "bin")
        if not os.path.isdir(bindir):
            fake_nccl_tests(bindir)
        js = os.path.join(self.dir, f"{mode}-{bind}-w{world}.json")
        e = fake_env(FAKE_MPIRUN_LOG=log, **env)
        p = subprocess.run([sys.executable, os.path.join(GPU, "nccltests.py"), "run", "--bindir", bindir, "--mode", mode,
                            "--plugin", "/x/lib.so", "--ranks", str(world), "--bind", bind, "--logdir",
                            os.path.join(self.dir, "logs"), "--json", js, "--ops", "all_reduce,alltoall", "--max", "1M",
                            "--repeat", "2"], env=e, capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout + p.stderr, js

    def test_runs_under_mpirun_with_each_binding_and_report(self):
        log = os.path.join(self.dir, "mpirun.log")
        jsons = []
        for mode, bind, world in (("socket", "default", 2), ("shim", "default", 2), ("socket", "none", 2),
                                  ("shim", "none", 2), ("shim", "none", 4)):
            rc, out, js = self.run_nt(mode, bind, world, log)
            self.assertEqual(rc, 0, out)
            self.assertIn(f"PASS {mode} {bind} w{world} alltoall run 2", out)
            jsons.append(js)
        calls = read(log).splitlines()
        self.assertEqual(len(calls), 5 * 2 * 2)
        self.assertFalse([c for c in calls[:8] if "--bind-to" in c], calls[:8])
        self.assertTrue(all("--bind-to none" in c for c in calls[8:]), calls[8:])
        self.assertTrue(all(" -c 1 " in c and "-x NCCL_NET_PLUGIN" in c for c in calls), calls)
        with open(jsons[1]) as f:
            res = json.load(f)
        self.assertEqual(res["mode"], "shim")
        self.assertEqual([r["size"] for r in res["ops"]["all_reduce"]], [8, 32, 128, 512, 2048, 8192, 32768,
                                                                         131072, 524288])
        self.assertEqual(len(res["ops"]["all_reduce"][0]["runs_time_us"]), 2)
        logs = os.listdir(os.path.join(self.dir, "logs"))
        self.assertIn("nt-shim-default-w2.all_reduce.r0.rank1.log", logs)
        with open(os.path.join(self.dir, "logs", "nt-shim-default-w2.all_reduce.r0.rank1.log")) as f:
            self.assertIn("NCCL_NET_PLUGIN=/x/lib.so", f.read())
        md = os.path.join(self.dir, "nt.md")
        p = subprocess.run([sys.executable, os.path.join(GPU, "nccltests.py"), "report", *jsons, "--md", md,
                            "--svg-prefix", os.path.join(self.dir, "nt")], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        text = read(md)
        self.assertIn("## 2 ranks, loopback", text)
        self.assertIn("## 4 ranks, loopback", text)
        self.assertRegex(text, r"\| mpirun's default binding \| 20\.0 us \| 20\.0 us \| 1\.00x \| n/a")
        self.assertIn("| --bind-to none |", text)
        self.assertIn("# shim none, 2 ranks: alltoall", text)
        for name in ("nt-w2.svg", "nt-w4.svg"):
            ET.parse(os.path.join(self.dir, name))

    def test_wrong_values_fail_the_run(self):
        rc, out, js = self.run_nt("shim", "none", 2, os.path.join(self.dir, "m.log"), FAKE_NT_WRONG="alltoall")
        self.assertEqual(rc, 1, out)
        self.assertIn("FAIL shim none w2 alltoall run 1: exit 0, 9 sizes, 1 wrong, out of bounds 1", out)
        self.assertIn("PASS shim none w2 all_reduce run 1", out)
        md = os.path.join(self.dir, "nt.md")
        p = subprocess.run([sys.executable, os.path.join(GPU, "nccltests.py"), "report", js, "--md", md],
                           capture_output=True, text=True)
        self.assertEqual(p.returncode, 1)
        self.assertIn("FAILED: shim none w2 alltoall 524288", read(md))

    def test_namespaced_runs_preload_the_move_after_mpi_init(self):
        log = os.path.join(self.dir, "m.log")
        rc, out, js = self.run_nt("shim", "none", 2, log)
        self.assertEqual(rc, 0, out)
        bindir = os.path.join(self.dir, "bin")
        p = subprocess.run([sys.executable, os.path.join(GPU, "nccltests.py"), "run", "--bindir", bindir, "--mode",
                            "socket", "--ranks", "2", "--bind", "none", "--logdir", os.path.join(self.dir, "nslogs"),
                            "--json", js, "--ops", "sendrecv", "--max", "64", "--netns", "nsa,nsb", "--ifname", "tsv"],
                           env=fake_env(FAKE_MPIRUN_LOG=log), capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        last = read(log).splitlines()[-1]
        self.assertIn("-x LD_PRELOAD", last)
        self.assertIn("-x TCPXSHIM_NETNS", last)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "nslogs", "netns_mpi.so")))
        with open(js) as f:
            res = json.load(f)
        self.assertTrue(res["netns"])
        self.assertEqual(res["env"].get("NCCL_SOCKET_IFNAME"), "tsv")

    def test_build_refuses_what_is_not_nccl_tests(self):
        p = subprocess.run([sys.executable, os.path.join(GPU, "nccltests.py"), "build", "--src", self.dir,
                            "--builddir", os.path.join(self.dir, "b")], capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        self.assertIn("not an nccl-tests checkout", p.stdout)

    def test_two_namespaces_carry_raw_tcp_both_ways(self):
        names, addrs = "tsxt-a,tsxt-b", "10.231.9.1,10.231.9.2"
        nt = [sys.executable, os.path.join(GPU, "nccltests.py"), "netns"]
        p = subprocess.run(nt + ["up", "--names", names, "--addrs", addrs], capture_output=True, text=True)
        try:
            self.assertEqual(p.returncode, 0, p.stdout + p.stderr + " (needs root and iproute2)")
            self.assertIn("MTU 1500", p.stdout)
            r = subprocess.run([sys.executable, os.path.join(GPU, "rawtcp.py"), "--streams", "1", "--seconds", "0.3",
                                "--write", "64K", "--both", "--netns", names, "--addrs", addrs],
                               capture_output=True, text=True, timeout=60)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn("raw tsxt-a (10.231.9.1) <- tsxt-b (10.231.9.2) TCP", r.stdout)
            one, both = (float(x) for x in r.stdout.splitlines()[-1].split()[1:3])
            self.assertGreater(one, 0)
            self.assertGreater(both, 0)
        finally:
            subprocess.run(nt + ["down", "--names", names], capture_output=True)
        self.assertFalse(os.path.exists("/run/netns/tsxt-a"))


class RunShTests(TempDirCase):
    def setUp(self):
        super().setUp()
        self.out = os.path.join(self.dir, "out")
        self.mps = os.path.join(self.dir, "mps.log")
        self.plugin = os.path.join(self.dir, "libnccl-net-tcpxshim.so")
        with open(self.plugin, "wb") as f:
            f.write(b"\x7fELF fake")

    def run_suite(self, timeout=300, args=(), **env):
        base = dict(QUICK=1, COLL_SIZES="1,3,1000", SWEEP_MAX_SIZE=2048, COUNTERS_SIZE=40000, COUNTERS_ITERS=5,
                    FAKE_MPS_LOG=self.mps, TMPDIR=self.dir, CUDA_MPS_PIPE_DIRECTORY=os.path.join(self.dir, "mps-pipe"),
                    CUDA_MPS_LOG_DIRECTORY=os.path.join(self.dir, "mps-log"))
        base.update(env)
        p = subprocess.run(["bash", os.path.join(GPU, "run.sh"), self.plugin, self.out, *args], env=fake_env(**base),
                           capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr

    def summary(self):
        with open(os.path.join(self.out, "summary.txt")) as f:
            return f.read()

    def mps_calls(self):
        with open(self.mps) as f:
            return f.read()

    def test_nccltests_part(self):
        bindir = fake_nccl_tests(os.path.join(self.dir, "nt-bin"))
        rc, out = self.run_suite(PARTS="nccltests", NCCL_TESTS_BIN=bindir, NT_WORLDS="2 4",
                                 FAKE_MPIRUN_LOG=os.path.join(self.dir, "mpirun.log"))
        self.assertEqual(rc, 0, out)
        s = self.summary()
        for w in (2, 4):
            for bind in ("default", "none"):
                for mode in ("socket", "shim"):
                    self.assertRegex(s, rf"\n  PASS +nt-{mode}-{bind}-w{w} +6 of 6 runs passed", s)
        self.assertRegex(s, r"\n  PASS +nccltests-report ")
        self.assertIn("## 4 ranks, loopback", s)
        self.assertIn("| broadcast | 8B time: Socket |", s)
        top = sorted(os.listdir(self.out))
        self.assertIn("nccl-tests.md", top)
        self.assertIn("nccl-tests-w2.svg", top)
        self.assertEqual(len(read(os.path.join(self.dir, "mpirun.log")).splitlines()), 2 * 2 * 2 * 6)
        # Two namespaces (real ones: root and iproute2, as tests/netns.rs needs): the ceiling across
        # them and the namespaced runs, whose ranks get the MPI_Init wrapper preloaded.
        rc, out = self.run_suite(PARTS="nccltests", NCCL_TESTS_BIN=bindir, NT_WORLDS="2", NT_BINDS="none",
                                 NT_MODES="shim", NT_NETNS=1, IP_BIN="ip", NT_NETNS_REPEAT=2)
        self.assertEqual(rc, 0, out)
        s = self.summary()
        self.assertRegex(s, r"\n  PASS +ceiling-rawtcp-netns +8 streams: ")
        self.assertRegex(s, r"\n  PASS +nt-shim-none-w2-netns +4 of 4 runs passed")
        self.assertIn("## 2 ranks, two network namespaces joined by a veth pair (MTU 1500)", s)
        self.assertFalse(os.path.exists("/run/netns/tcpxshim-ns0"), "the namespaces are removed")
        rc, out = self.run_suite(PARTS="nccltests")
        self.assertNotEqual(rc, 0)
        self.assertRegex(self.summary(), r"SKIP +nccltests +set NCCL_TESTS_SRC")

    def test_usage(self):
        p = subprocess.run(["bash", os.path.join(GPU, "run.sh")], capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        self.assertIn("bash gpu/run.sh PLUGIN_SO OUTDIR", p.stderr)
        p = subprocess.run(["bash", os.path.join(GPU, "run.sh"), "/nonexistent.so", self.out], capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        self.assertIn("no plugin library", p.stderr)

    def test_everything_passes(self):
        rc, out = self.run_suite(PARTS="coll counters sweep", SWEEP_MODES="socket socket44 shim")
        self.assertEqual(rc, 0, out)
        s = self.summary()
        self.assertTrue(s.startswith("tcpxshim GPU suite: PASS"), s)
        for part in ("coll-shim-w2", "coll-shim-w4", "coll-socket-w2", "coll-socket-w4", "counters-shim-w2",
                     "sweep-socket-w2", "sweep-socket44-w2", "sweep-shim-w2", "report"):
            self.assertRegex(s, rf"\n  PASS +{part} ", part)
        self.assertIn("# sweep shim, 2 ranks: sendrecv", s)
        self.assertIn("| shim/socket |", s)
        top = sorted(os.listdir(self.out))
        self.assertEqual(top, ["busbw.svg", "logs", "logs.tar.gz", "results.md", "summary.txt", "sweeps.json"])
        with open(os.path.join(self.out, "sweeps.json")) as f:
            self.assertEqual([x["label"] for x in json.load(f)["sweeps"]], ["socket", "socket44", "shim"])
        self.assertFalse([f for f in os.listdir(os.path.join(self.out, "logs")) if f.endswith(".pids")])
        calls = self.mps_calls()
        self.assertIn("args: -d", calls)
        self.assertTrue(calls.rstrip().endswith("stdin: quit"), calls)

    def test_ceiling_and_profile(self):
        rc, out = self.run_suite(PARTS="ceiling profile", PROFILE_MIN_SIZE=1024, PROFILE_MAX_SIZE=2048,
                                 PROFILE_REPEAT=1, PROFILE_INTERVAL=0.05)
        self.assertEqual(rc, 0, out)
        s = self.summary()
        self.assertRegex(s, r"PASS +ceiling-rawtcp +8 streams: [0-9.]+ GB/s one way, [0-9.]+ GB/s both ways")
        self.assertRegex(s, r"PASS +profile-shim-w2 +threadprof: \d+ samples; busy intervals: [1-9]")
        self.assertIn("raw loopback TCP", s)
        # the sampler saw both ranks (fake torch's ranks are python processes)
        prof = s[s.index("\nprofile:"):]
        self.assertGreaterEqual(len(re.findall(r"\n +\d+ +\d+ +python\S* +[0-9.]+", prof)), 2, prof)
        self.assertIn("busiest threads", prof)

    def test_one_rank_per_gpu(self):
        rc, out = self.run_suite(PARTS="multi", GPUS=4, FAKE_GPUS=4)
        self.assertEqual(rc, 0, out)
        s = self.summary()
        for part in ("multi-coll-shim-g4", "multi-coll-socket-g4", "devices-g4", "multi-sweep-socket-g4",
                     "multi-sweep-shim-g4", "multi-report"):
            self.assertRegex(s, rf"\n  PASS +{part} ", part)
        self.assertIn("rank 3 (GPU 3): device 3: 2 send + 2 receive", s)
        with open(os.path.join(self.out, "logs", "multi-coll-shim-g4.rank2.log")) as f:
            log = f.read()
        self.assertIn("TCPXSHIM_SUITE_GPU=2", log)
        # the devices: one loopback address per GPU (the fake GPUs' PCI paths do not exist here)
        self.assertIn("NCCL_TCPXSHIM_TCP_ADDRS=127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4", log)
        self.assertTrue(os.path.exists(os.path.join(self.out, "multi-results.md")))
        # everyone on device 0: the check says so, as a warning
        rc, out = self.run_suite(PARTS="multi", GPUS=2, FAKE_GPUS=2, FAKE_TORCH_NETDEV="zero", SWEEP_OPS="all_reduce")
        self.assertRegex(self.summary(), r"WARN +devices-g2 +PARTIAL device check")
        self.assertIn("rank 1 (GPU 1): device 0: 2 send + 2 receive  <- not (only) its own device 1", self.summary())

    def test_metrics_part(self):
        rc, out = self.run_suite(PARTS="metrics", TCPXSHIM_BIN=os.path.join(FAKE_BIN, "tcpxshim"))
        self.assertEqual(rc, 0, out)
        s = self.summary()
        self.assertRegex(s, r"\n  PASS +metrics-shim-w2 +ranks PASS, log check PASS: rank 0: 5 all_reduce of 39.06 KiB in [0-9.]+ s; "
                            r"metrics exact: send delta 200000 B, recv delta 200000 B, expected 200000 B .*; metrics PASS: "
                            r"deltas exact on 2/2 ranks; serve: ([5-9]|\d\d+) valid pages of \d+; plot 8 lines")
        self.assertIn("the last page carries every connection's bytes as the files have them", s)
        self.assertEqual(sorted(os.listdir(self.out)), ["logs", "logs.tar.gz", "metrics-throughput.svg", "metrics.md", "summary.txt"])
        with open(os.path.join(self.out, "metrics.md")) as f:
            md = f.read()
        self.assertIn("| 1 | 200000 | 200000 | 200000 | yes |", md)
        self.assertEqual(len(re.findall(r"\n\| r[01] (send|recv) #\d", md)), 8)
        ET.parse(os.path.join(self.out, "metrics-throughput.svg"))
        logs = os.path.join(self.out, "logs")
        with open(os.path.join(logs, "metrics-watch.json")) as f:
            w = json.load(f)
        self.assertEqual(w["stopped_by"], "stop file")
        self.assertTrue(any(len(x.get("bytes", {})) == 8 for x in w["scrapes"]))
        self.assertFalse(os.path.exists(os.path.join(logs, "metrics-watch.stop")))
        self.assertEqual(rank_processes_alive(self.out), [])  # serve and the watcher are gone
        # without the command: the page checks are skipped, visibly
        rc, out = self.run_suite(PARTS="metrics")
        self.assertEqual(rc, 1, out)
        s = self.summary()
        self.assertTrue(s.startswith("tcpxshim GPU suite: INCOMPLETE"), s)
        self.assertRegex(s, r"\n  PASS +metrics-shim-w2 .*serve SKIPPED \(TCPXSHIM_BIN not set\)")
        self.assertRegex(s, r"\n  SKIP +metrics-serve +`tcpxshim metrics serve` not checked: TCPXSHIM_BIN not set")

    def test_metrics_part_failures(self):
        rc, out = self.run_suite(PARTS="metrics", TCPXSHIM_BIN=os.path.join(FAKE_BIN, "tcpxshim"), FAKE_TCPXSHIM_SERVE="first",
                                 FAKE_TORCH_FAULT="1:metrics:bytes")
        self.assertEqual(rc, 1, out)
        s = self.summary()
        self.assertRegex(s, r"\n  FAIL +metrics-shim-w2 +ranks FAIL, .*metrics FAIL: deltas exact on 1/2 ranks; .*; "
                            r"rank 1: send delta 200005 B, expected 200000 B exactly \(\+5 B\)")
        self.assertIn("PROBLEM: the last page does not match the files", s)
        self.assertIn("PROBLEM: only 0 valid pages, want at least 5", s)
        self.assertEqual(rank_processes_alive(self.out), [])

    def test_failures_are_reported(self):
        rc, out = self.run_suite(PARTS="coll ddp sweep", WORLDS="2", SWEEP_MODES="socket",
                                 FAKE_TORCH_FAULT="1:sendrecv:corrupt")
        self.assertEqual(rc, 1, out)
        s = self.summary()
        self.assertTrue(s.startswith("tcpxshim GPU suite: FAIL"), s)
        self.assertRegex(s, r"FAIL +coll-shim-w2 +ranks FAIL, log check PASS: a rank failed; first problem: rank 1: "
                            r"CHECK MISMATCH sendrecv of 1000 floats \(3.91 KiB\) on rank 1 of 2: first bad index 5: got 3.0, expected 2.0")
        self.assertRegex(s, r"FAIL +ddp-shim-w2 .*No module named 'torch.nn'")  # the fake has no nn
        self.assertRegex(s, r"SKIP +ddp-compare")
        self.assertRegex(s, r"FAIL +sweep-socket-w2 .*first problem: rank 0: sweep socket: .* 4 wrong elements")
        with open(os.path.join(self.out, "results.md")) as f:
            self.assertIn("wrong!", f.read())

    def test_log_check_failure(self):
        rc, out = self.run_suite(PARTS="coll", WORLDS="2", FAKE_TORCH_FAULT="1:init:warn")
        self.assertEqual(rc, 1, out)
        self.assertRegex(self.summary(), r"FAIL +coll-shim-w2 +ranks PASS, log check FAIL: .*; log check: rank 1: shim WARN: "
                                         r"NET/TCPXSHIM isend: fake warning")
        self.assertRegex(self.summary(), r"PASS +coll-socket-w2")

    def test_time_budget(self):
        rc, out = self.run_suite(PARTS="coll", WORLDS="2", SUITE_BUDGET_S=44)
        s = self.summary()
        self.assertEqual(rc, 1, out)
        self.assertTrue(s.startswith("tcpxshim GPU suite: INCOMPLETE"), s)
        self.assertRegex(s, r"SKIP +coll-shim-w2 +time budget spent")
        self.assertRegex(s, r"SKIP +coll-socket-w2 +time budget spent")

    def test_interrupted_suite_cleans_up(self):
        env = dict(QUICK=1, PARTS="coll", WORLDS="2", FAKE_TORCH_FAULT="0:init:hang", FAKE_MPS_LOG=self.mps, TMPDIR=self.dir,
                   CUDA_MPS_PIPE_DIRECTORY=os.path.join(self.dir, "mps-pipe"), CUDA_MPS_LOG_DIRECTORY=os.path.join(self.dir, "mps-log"))
        p = subprocess.Popen(["bash", os.path.join(GPU, "run.sh"), self.plugin, self.out], env=fake_env(**env),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        logs = os.path.join(self.out, "logs")
        deadline = time.time() + 30
        while time.time() < deadline and not rank_processes_alive("collectives.py"):
            time.sleep(0.2)
        self.assertTrue(rank_processes_alive("collectives.py"), "the ranks never started")
        time.sleep(1)
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=60)
        self.assertEqual(p.returncode, 130, out)
        self.assertIn("interrupted by SIGTERM", out)
        time.sleep(0.5)
        self.assertEqual(rank_processes_alive(logs), [])
        self.assertEqual(rank_processes_alive("collectives.py"), [])
        self.assertTrue(self.mps_calls().rstrip().endswith("stdin: quit"))


if __name__ == "__main__":
    unittest.main(verbosity=2)
