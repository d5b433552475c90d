#!/usr/bin/env python3
"""Tests of the GPU suite that run anywhere (no GPU, no torch): the pure-Python parts directly,
and the rank programs, launch.py and run.sh end to end over gpu/tests/fake_torch (a stand-in for
torch whose ranks exchange data through files) and gpu/tests/fake_bin (stand-ins for
nvidia-cuda-mps-control and nvidia-smi).

    python3 gpu/tests/test_suite.py          # or: python3 -m unittest discover -s gpu/tests -v
"""

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
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
GPU = os.path.dirname(HERE)
sys.path.insert(0, GPU)

import common  # noqa: E402
import ddp  # noqa: E402
import launch  # noqa: E402
import logcheck  # noqa: E402
import rawtcp  # noqa: E402
import report  # noqa: E402
import threadprof  # noqa: E402

FAKE_TORCH = os.path.join(HERE, "fake_torch")
FAKE_BIN = os.path.join(HERE, "fake_bin")


def fake_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = FAKE_TORCH + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = FAKE_BIN + os.pathsep + env["PATH"]
    for k in list(env):
        if k.startswith(("FAKE_TORCH_", "NCCL_", "QUICK", "PARTS", "WORLDS", "SUITE_")):
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
def nccl_log(net="tcpxshim", shim=True, world=2, rank=0, gdr_send=False, gdr_recv=False, extra=(), closed=None):
    """A rank's log in the formats of NCCL 2.28 and the shim."""
    h = f"gpu1:{1000 + rank}:{1000 + rank} [0] NCCL"
    lines = [f"{h} INFO NCCL version 2.28.9+cuda13.0"]
    if shim:
        lines.append(f"{h} INFO NET/TCPXSHIM loaded builtin from (built-in), 1 device(s), reporting name tcpxshim")
    lines.append(f"{h} INFO Using network {net}")
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    for ch in range(2):
        lines.append(f"{h} INFO Channel {ch:02d}/0 : {prv}[0] -> {rank}[0] [receive] via NET/{net}/0{'/GDRDMA' if gdr_recv else ''}")
        lines.append(f"{h} INFO Channel {ch:02d}/0 : {rank}[0] -> {nxt}[0] [send] via NET/{net}/0{'/GDRDMA' if gdr_send else ''}")
    lines.append(f"{h} INFO Connected all rings, use ring PXN 0 GDR {1 if gdr_send or gdr_recv else 0}")
    lines += [x.format(h=h) for x in extra]
    for kind, cid, text, errs in closed or []:
        lines.append(
            f"{h} INFO NET/TCPXSHIM closed {kind} comm #{cid} (dev 0, peer 127.0.0.1:3277{cid}, 4 streams): "
            f"2545 messages, {text}, {errs} errors, open 0.7 s"
        )
    return "\n".join(lines) + "\n"


class LogcheckTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()

    def tearDown(self):
        shutil.rmtree(self.dir)

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

    def test_gdr(self):
        for send, recv, want in ((True, True, "all"), (False, True, "some"), (False, False, "none")):
            self.write("g", [nccl_log(rank=r, gdr_send=send, gdr_recv=recv) for r in range(2)])
            status, lines = logcheck.check_gdr(logcheck.read_logs(self.dir, "g", 2))
            self.assertEqual(status, want, lines)
        self.assertIn("0/4 send and 0/4 receive", lines[0])
        self.assertTrue(any(x.startswith("shim: no line about GPU memory") for x in lines), lines)
        gpu_line = "{h} INFO NET/TCPXSHIM built-in TCP transport: GPU memory on (NCCL_TCPXSHIM_TCP_CUDA=1, 1 GPU(s))"
        self.write("g2", [nccl_log(rank=r, gdr_recv=True, extra=[gpu_line]) for r in range(2)])
        status, lines2 = logcheck.check_gdr(logcheck.read_logs(self.dir, "g2", 2))
        self.assertEqual(status, "some")
        self.assertTrue(any(x.startswith("shim: NET/TCPXSHIM built-in TCP transport: GPU memory on") for x in lines2), lines2)
        self.assertIn("NOT USED", lines[0])
        self.assertTrue(any("GDR 0 0" in x for x in lines))
        with open(os.devnull, "w") as devnull:
            rc = logcheck.main(["gdr", "--label", "g", "--world", "2", "--logdir", self.dir], out=devnull)
        self.assertEqual(rc, 1)

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


class ReportTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.paths = []
        for label, lat, bw in (("socket", 25, 2.8), ("socket44", 27, 2.6), ("shim", 36, 9.4), ("shim-cuda", 30, 11)):
            env = launch.rank_env({}, label, "/opt/x/libnccl-net-tcpxshim.so", 0, 2, 1234)
            s = synth_sweep(label, lat, bw, wrong_at=1 << 20 if label == "shim" else None, env=common.relevant_env(env))
            p = os.path.join(self.dir, f"sweep-{label}.json")
            with open(p, "w") as f:
                json.dump(s, f)
            self.paths.append(p)

    def tearDown(self):
        shutil.rmtree(self.dir)

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
        md, _ = self.render(self.paths + [os.path.join(self.dir, "nope.json")], {"shim-cuda": "GPU-direct NOT used"})
        self.assertIn("| shim/socket | 1.44x | 2.99x | 3.33x | 3.35x |", md)
        self.assertIn("| socket | 25.0 us | 2.71 GB/s | 2.79 GB/s | 2.80 GB/s |", md)
        self.assertIn("## all-reduce", md)
        self.assertIn("## send/recv", md)
        self.assertIn("| size | socket busbw (GB/s) | socket44 busbw (GB/s) | shim busbw (GB/s) | shim-cuda busbw (GB/s) |", md)
        self.assertIn("(3 wrong!)", md)
        self.assertIn("missing sweep", md)
        self.assertIn("**GPU-direct NOT used**", md)
        self.assertIn("NCCL_TCPXSHIM_TCP_CUDA=1", md)
        self.assertIn("NCCL_NET_PLUGIN=libnccl-net-tcpxshim.so", md)
        self.assertIn("![busbw against message size](busbw.svg)", md)
        # one row per size in each operation's table
        self.assertEqual(md.count("\n| 256M |"), 2)

    def test_svg(self):
        _, svg = self.render(self.paths, {"shim-cuda": "GPU-direct NOT used"})
        root = ET.fromstring(svg)
        ns = "{http://www.w3.org/2000/svg}"
        self.assertEqual(len(root.findall(f"{ns}polyline")), 8)  # 4 modes x 2 operations
        texts = [t.text for t in root.iter(f"{ns}text")]
        for want in ("all-reduce", "send/recv", "8B", "2M", "128M", "busbw (GB/s)", "shim-cuda (GPU-direct NOT used)"):
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
class LaunchTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()

    def tearDown(self):
        shutil.rmtree(self.dir)

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
        cuda = launch.rank_env(base, "shim-cuda", "/p/lib.so", 0, 2, 1)
        self.assertEqual(
            {k: cuda[k] for k in ("NCCL_TCPXSHIM_TCP_CUDA", "NCCL_NET_GDR_LEVEL", "NCCL_NET_FORCE_FLUSH")},
            {"NCCL_TCPXSHIM_TCP_CUDA": "1", "NCCL_NET_GDR_LEVEL": "SYS", "NCCL_NET_FORCE_FLUSH": "1"},
        )
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
        for world, mode in ((2, "shim"), (4, "socket"), (3, "shim-cuda")):
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


class RunShTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.out = os.path.join(self.dir, "out")
        self.mps = os.path.join(self.dir, "mps.log")
        self.plugin = os.path.join(self.dir, "libnccl-net-tcpxshim.so")
        with open(self.plugin, "wb") as f:
            f.write(b"\x7fELF fake")

    def tearDown(self):
        shutil.rmtree(self.dir)

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

    def test_usage(self):
        p = subprocess.run(["bash", os.path.join(GPU, "run.sh")], capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        self.assertIn("bash gpu/run.sh PLUGIN_SO OUTDIR", p.stderr)
        p = subprocess.run(["bash", os.path.join(GPU, "run.sh"), "/nonexistent.so", self.out], capture_output=True, text=True)
        self.assertEqual(p.returncode, 2)
        self.assertIn("no plugin library", p.stderr)

    def test_everything_passes(self):
        rc, out = self.run_suite(PARTS="coll counters sweep", SWEEP_MODES="socket socket44 shim shim-cuda")
        self.assertEqual(rc, 0, out)
        s = self.summary()
        self.assertTrue(s.startswith("tcpxshim GPU suite: PASS"), s)
        for part in ("coll-shim-w2", "coll-shim-w4", "coll-socket-w2", "coll-socket-w4", "coll-shim-cuda-w2",
                     "coll-shim-cuda-w4", "gdr-coll-shim-cuda-w2", "counters-shim-w2", "sweep-socket-w2",
                     "sweep-socket44-w2", "sweep-shim-w2", "sweep-shim-cuda-w2", "report"):
            self.assertRegex(s, rf"\n  PASS +{part} ", part)
        self.assertIn("# sweep shim-cuda, 2 ranks: sendrecv", s)
        self.assertIn("| shim/socket |", s)
        top = sorted(os.listdir(self.out))
        self.assertEqual(top, ["busbw.svg", "logs", "logs.tar.gz", "results.md", "summary.txt", "sweeps.json"])
        with open(os.path.join(self.out, "sweeps.json")) as f:
            self.assertEqual([x["label"] for x in json.load(f)["sweeps"]], ["socket", "socket44", "shim", "shim-cuda"])
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

    def test_failures_are_reported(self):
        rc, out = self.run_suite(PARTS="coll ddp sweep", WORLDS="2", SWEEP_MODES="socket shim-cuda",
                                 FAKE_TORCH_FAULT="1:sendrecv:corrupt", FAKE_TORCH_GDR="none")
        self.assertEqual(rc, 1, out)
        s = self.summary()
        self.assertTrue(s.startswith("tcpxshim GPU suite: FAIL"), s)
        self.assertRegex(s, r"FAIL +coll-shim-w2 +ranks FAIL, log check PASS: a rank failed; first problem: rank 1: "
                            r"CHECK MISMATCH sendrecv of 1000 floats \(3.91 KiB\) on rank 1 of 2: first bad index 5: got 3.0, expected 2.0")
        self.assertRegex(s, r"FAIL +gdr-coll-shim-cuda-w2 +GPU-direct NOT USED")
        self.assertRegex(s, r"FAIL +ddp-shim-w2 .*No module named 'torch.nn'")  # the fake has no nn
        self.assertRegex(s, r"SKIP +ddp-compare")
        self.assertRegex(s, r"SKIP +sweep-shim-cuda-w2 +the shim-cuda correctness run did not pass")
        self.assertRegex(s, r"FAIL +sweep-socket-w2 .*first problem: rank 0: sweep socket: .* 4 wrong elements")
        with open(os.path.join(self.out, "results.md")) as f:
            self.assertIn("wrong!", f.read())

    def test_gdr_not_used_is_noted_in_the_results(self):
        rc, out = self.run_suite(PARTS="coll sweep", WORLDS="2", SWEEP_MODES="shim-cuda", FAKE_TORCH_GDR="none")
        self.assertEqual(rc, 1, out)
        with open(os.path.join(self.out, "results.md")) as f:
            self.assertIn("**GPU-direct NOT used**", f.read())
        self.assertRegex(self.summary(), r"PASS +sweep-shim-cuda-w2")

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
