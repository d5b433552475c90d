//! The shim's overhead over the plugin it wraps.
//!
//! Runs the same workload (a) on the generic v7 fixture loaded directly, (b) through the shim
//! wrapping that fixture with the default settings (the recovery engine on): a stack built in this
//! process from a config naming the fixture, driven through the exported `ncclNetPlugin_v7` table
//! as NCCL drives it, and (c, d, e) through three more stacks over private copies of the fixture,
//! driven through the stack's Rust interface, the same but for the metrics and the recovery
//! engine: both off in (c), the metrics on in (d) (NCCL_TCPXSHIM_METRICS_DIR a temporary
//! directory), the recovery engine on in (e). Repetitions alternate (a b c d e, e d c b a, ...) so
//! that drift and noise hit all alike, then one table is printed, and the costs: the metrics' (d
//! against c) and the recovery engine's (e against c).
//!
//! Workloads, one connection on device 0, single thread:
//! - small-message round: irecv + isend of 8 bytes, then test both until done; ns per round;
//! - bandwidth: 64 MiB messages (irecv + isend + test until done), GB/s.
//!
//! Run with `cargo bench --bench overhead` (Cargo.toml: `[[bench]] name = "overhead" harness = false`).
//! `TCPXSHIM_BENCH_QUICK=1` shrinks the iteration counts for a smoke run.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::time::{Duration, Instant};

struct Params {
    reps: usize,
    lat_warmup: usize,
    lat_iters: usize,
    bw_size: usize,
    bw_warmup: usize,
    bw_iters: usize,
}

const SMALL: usize = 8;

/// One connection of one plugin with its buffers registered once.
struct Bench {
    label: &'static str,
    net: Box<dyn Driver>,
    send: Comm,
    recv: Comm,
    small_s: AlignedBuf,
    small_r: AlignedBuf,
    big_s: AlignedBuf,
    big_r: AlignedBuf,
    mrs: [Mr; 4],
}

impl Bench {
    /// A connection of `net`, initialised already.
    fn new(label: &'static str, net: Box<dyn Driver>, p: &Params) -> Result<Bench, String> {
        let ndev = net
            .devices()
            .map_err(|e| format!("{label}: devices failed: {}", result_name(e)))?;
        if ndev < 1 {
            return Err(format!("{label}: no devices"));
        }
        let (send, recv) = net.connect_pair(0);
        let mut small_s = AlignedBuf::new(SMALL);
        small_s.fill_pattern(1);
        let small_r = AlignedBuf::new(SMALL);
        let mut big_s = AlignedBuf::new(p.bw_size);
        big_s.fill_pattern(2);
        let mut big_r = AlignedBuf::new(p.bw_size);
        big_r.as_mut_slice().fill(0xee); // fault the pages in before timing
        let reg = |c: Comm, b: &AlignedBuf| {
            net.reg_buf(c, b, PTR_HOST)
                .map_err(|e| format!("{label}: regMr failed: {}", result_name(e)))
        };
        let mrs = [
            reg(send, &small_s)?,
            reg(recv, &small_r)?,
            reg(send, &big_s)?,
            reg(recv, &big_r)?,
        ];
        Ok(Bench {
            label,
            net,
            send,
            recv,
            small_s,
            small_r,
            big_s,
            big_r,
            mrs,
        })
    }

    /// One message: irecv + isend + test both until done. Returns the received size.
    #[inline(always)]
    fn round(&self, sbuf: &AlignedBuf, rbuf: &AlignedBuf, smr: Mr, rmr: Mr, size: i32) -> i32 {
        let net = &*self.net;
        let rreq = spin(self.label, "irecv", || {
            net.irecv(self.recv, rbuf.as_ptr(), size, 0, rmr).unwrap()
        });
        let sreq = spin(self.label, "isend", || {
            net.isend(self.send, sbuf.as_ptr(), size, 0, smr).unwrap()
        });
        // Test both, as NCCL's proxy does: with the recovery engine a send larger than its copy
        // limit completes on the receiver's acknowledgement, which the receiver's tests make.
        let (mut sent, mut got) = (false, None);
        spin(self.label, "completions", || {
            if !sent {
                sent = net.test(sreq).unwrap().is_some();
            }
            if got.is_none() {
                got = net.test(rreq).unwrap();
            }
            (sent && got.is_some()).then_some(())
        });
        net.irecv_consumed(self.recv, rreq).unwrap();
        got.unwrap_or(0)
    }

    /// Nanoseconds per small round, one sample per round.
    fn latency(&self, p: &Params) -> Vec<u64> {
        let [s, r, _, _] = self.mrs;
        for _ in 0..p.lat_warmup {
            self.round(&self.small_s, &self.small_r, s, r, SMALL as i32);
        }
        let mut samples = Vec::with_capacity(p.lat_iters);
        for _ in 0..p.lat_iters {
            let t = Instant::now();
            let got = self.round(&self.small_s, &self.small_r, s, r, SMALL as i32);
            samples.push(t.elapsed().as_nanos() as u64);
            debug_assert_eq!(got, SMALL as i32);
        }
        assert_eq!(
            self.small_r.find_mismatch(1, 0..SMALL),
            None,
            "{}: small message corrupted",
            self.label
        );
        samples
    }

    /// GB/s (1e9 bytes per second) over bw_iters messages of bw_size bytes.
    fn bandwidth(&mut self, p: &Params, check: bool) -> f64 {
        let [_, _, s, r] = self.mrs;
        let size = p.bw_size as i32;
        for _ in 0..p.bw_warmup {
            self.round(&self.big_s, &self.big_r, s, r, size);
        }
        if check {
            assert_eq!(
                self.big_r.find_mismatch(2, 0..p.bw_size),
                None,
                "{}: large message corrupted",
                self.label
            );
        }
        let t = Instant::now();
        for _ in 0..p.bw_iters {
            let got = self.round(&self.big_s, &self.big_r, s, r, size);
            assert_eq!(got, size);
        }
        let secs = t.elapsed().as_secs_f64();
        (p.bw_size * p.bw_iters) as f64 / secs / 1e9
    }

    fn close(self) {
        let [ss, sr, bs, br] = self.mrs;
        for (c, m) in [(self.send, ss), (self.recv, sr), (self.send, bs), (self.recv, br)] {
            self.net.dereg_mr(c, m).unwrap();
        }
        self.net.close_send(self.send).unwrap();
        self.net.close_recv(self.recv).unwrap();
    }
}

/// Calls `f` until it returns Some; panics after 10 s (checked every 4096 calls, to keep timing clean).
#[inline(always)]
fn spin<T>(label: &str, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let mut n = 0u32;
    let mut start: Option<Instant> = None;
    loop {
        if let Some(v) = f() {
            return v;
        }
        n = n.wrapping_add(1);
        if n % 4096 == 0 {
            let s = *start.get_or_insert_with(Instant::now);
            if s.elapsed() > Duration::from_secs(10) {
                panic!("{label}: timed out waiting for {what}");
            }
            std::thread::yield_now();
        }
    }
}

fn mean(v: &[u64]) -> f64 {
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
}

fn percentile(v: &mut [u64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q).round() as usize] as f64
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[derive(Default)]
struct Results {
    lat: Vec<u64>,
    lat_rep_means: Vec<f64>,
    bw: Vec<f64>,
}

fn main() {
    let quick = std::env::var_os("TCPXSHIM_BENCH_QUICK").is_some_and(|v| v != "0");
    let p = if quick {
        Params {
            reps: 2,
            lat_warmup: 200,
            lat_iters: 2_000,
            bw_size: 8 << 20,
            bw_warmup: 1,
            bw_iters: 5,
        }
    } else {
        Params {
            reps: 3,
            lat_warmup: 2_000,
            lat_iters: 20_000,
            bw_size: 64 << 20,
            bw_warmup: 3,
            bw_iters: 50,
        }
    };

    let fixture = fixture_lib(Fixture::V7);
    // The direct side uses a private copy, so the fixture instance at `fixture` belongs to the shim alone.
    let direct_net = Net::open_private(&fixture);
    direct_net
        .init()
        .unwrap_or_else(|e| panic!("direct: init failed: {}", result_name(e)));
    let direct = Bench::new("direct", Box::new(direct_net), &p).unwrap_or_else(|e| panic!("{e}"));
    let lo = Some(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let cfg = Config {
        plugin: Some(fixture.to_string_lossy().into_owned()),
        ctrl_addr: lo,
        ..Config::default()
    };
    assert!(cfg.recovery_engine, "the recovery engine is on by default");
    let shim = Bench::new("shim", Box::new(Net::in_process(&cfg)), &p).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "shim: the in-process stack (name {:?}) wrapping {}",
        shim.net.name(),
        fixture.display()
    );
    // Two more stacks, each over a private copy of the fixture (one stack per fixture instance).
    let stack_cfg = || Config {
        plugin: Some(private_copy(&fixture).to_string_lossy().into_owned()),
        recovery_engine: false,
        ..Config::default()
    };
    let stack = Bench::new("stack", Box::new(StackNet::build(&stack_cfg())), &p).unwrap_or_else(|e| panic!("{e}"));
    let metrics_dir = std::env::temp_dir().join(format!("tcpxshim-bench-metrics-{}", std::process::id()));
    let mcfg = Config {
        metrics_dir: Some(metrics_dir.clone()),
        ..stack_cfg()
    };
    let metrics = Bench::new("metrics", Box::new(StackNet::build(&mcfg)), &p).unwrap_or_else(|e| panic!("{e}"));
    let rcfg = Config {
        recovery_engine: true,
        ctrl_addr: lo,
        ..stack_cfg()
    };
    let recovery = Bench::new("recov", Box::new(StackNet::build(&rcfg)), &p).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "stack, metrics, recov: stacks driven through their Rust interface: metrics and recovery off, metrics on \
         (files in {}), recovery on",
        metrics_dir.display()
    );

    let mut benches: Vec<Bench> = vec![direct, shim, stack, metrics, recovery];
    let mut results: Vec<Results> = benches.iter().map(|_| Results::default()).collect();
    for rep in 0..p.reps {
        // a b, then b a, ...
        let mut order: Vec<usize> = (0..benches.len()).collect();
        if rep % 2 == 1 {
            order.reverse();
        }
        for &i in &order {
            let s = benches[i].latency(&p);
            let m = mean(&s);
            results[i].lat_rep_means.push(m);
            results[i].lat.extend(s);
            println!("rep {rep} {:>6}: {SMALL} B round mean {m:.0} ns", benches[i].label);
        }
        for &i in &order {
            let gbs = benches[i].bandwidth(&p, rep == 0);
            results[i].bw.push(gbs);
            println!(
                "rep {rep} {:>6}: {} MiB messages {gbs:.2} GB/s",
                benches[i].label,
                p.bw_size >> 20
            );
        }
    }

    let rows: Vec<(String, Vec<f64>)> = vec![
        (
            format!("{SMALL} B round, mean ns"),
            results.iter().map(|r| mean(&r.lat)).collect(),
        ),
        (
            format!("{SMALL} B round, p50 ns"),
            results.iter_mut().map(|r| percentile(&mut r.lat, 0.5)).collect(),
        ),
        (
            format!("{SMALL} B round, p99 ns"),
            results.iter_mut().map(|r| percentile(&mut r.lat, 0.99)).collect(),
        ),
        (
            format!("{} MiB, GB/s (median of {})", p.bw_size >> 20, p.reps),
            results.iter_mut().map(|r| median(&mut r.bw)).collect(),
        ),
    ];
    println!();
    println!(
        "{:<32} {:>12} {:>14} {:>12} {:>12} {:>14} {:>12} {:>15} {:>12}",
        "workload",
        "direct",
        "through shim",
        "shim/direct",
        "stack",
        "stack+metrics",
        "metrics/stack",
        "stack+recovery",
        "recov/stack"
    );
    for (name, v) in &rows {
        let (direct, shim, stack, metrics, recov) = (v[0], v[1], v[2], v[3], v[4]);
        println!(
            "{name:<32} {direct:>12.1} {shim:>14.1} {:>12.3} {stack:>12.1} {metrics:>14.1} {:>12.3} {recov:>15.1} {:>12.3}",
            shim / direct,
            metrics / stack,
            recov / stack
        );
    }
    println!(
        "(a round is irecv + isend + test until both complete, one message; through shim: the default settings, \
         recovery on; for GB/s a ratio below 1 is the cost)"
    );
    // A round is two messages (a send and a receive request), each timed and counted.
    let d_mean = rows[0].1[3] - rows[0].1[2];
    let d_p50 = rows[1].1[3] - rows[1].1[2];
    println!(
        "metrics: {:+.1} ns per message (mean), {:+.1} ns per message (p50); bandwidth ratio on/off {:.3}",
        d_mean / 2.0,
        d_p50 / 2.0,
        rows[3].1[3] / rows[3].1[2]
    );
    println!(
        "recovery: {:+.1} ns per 8-byte message (mean), {:+.1} ns (p50); bandwidth ratio on/off {:.3}",
        rows[0].1[4] - rows[0].1[2],
        rows[1].1[4] - rows[1].1[2],
        rows[3].1[4] / rows[3].1[2]
    );

    for b in benches.drain(..) {
        b.close();
    }
    let _ = std::fs::remove_dir_all(&metrics_dir);
    let ctl = FixtureCtl::open(&fixture);
    println!(
        "inner fixture after closing: {} violation(s), {} live object(s)",
        ctl.violations(),
        ctl.live_objects()
    );
    if ctl.violations() != 0 {
        println!("last violation: {}", ctl.last_violation());
    }
}
