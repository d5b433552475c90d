//! The recovery engine's cost: the same workloads with NCCL_TCPXSHIM_RECOVERY off and on, side by
//! side in one run, over the built-in transport on loopback and over the generic v7 fixture (a
//! loaded host-type plugin). Repetitions alternate (off on, on off, ...) so that drift hits both.
//!
//! Workloads, one connection on device 0, single thread: an 8-byte round (irecv + isend, test both
//! until done; ns per round), 64 MiB messages (GB/s), and NCCL's pipeline: 64 MiB in chunks of
//! 128 KiB and 512 KiB (NCCL's send/recv and collective step sizes), 8 in flight each on their own
//! slot, a slot's send posted again as soon as it completes (GB/s). That last one is where each
//! large send's wait for its acknowledgement shows.
//!
//! Run with `cargo bench --bench recovery`; `TCPXSHIM_BENCH_QUICK=1` shrinks the counts,
//! `TCPXSHIM_BENCH_INNER=builtin` (or `fixture`) runs one inner only and `TCPXSHIM_BENCH_SMALL=1`
//! the small rounds only (for a profiler). Other NCCL_TCPXSHIM_* settings apply (for example the
//! recovery settings).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

const SMALL: usize = 8;

struct Params {
    reps: usize,
    lat_iters: usize,
    bw_size: usize,
    bw_iters: usize,
}

/// NCCL's steps in flight per connection (NCCL_STEPS).
const SLOTS: usize = 8;
const CHUNKS: [usize; 2] = [128 << 10, 512 << 10];

struct Bench {
    net: StackNet,
    send: Comm,
    recv: Comm,
    bufs: [AlignedBuf; 4],
    mrs: [Mr; 4],
}

fn spin<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    let mut n = 0u32;
    loop {
        if let Some(v) = f() {
            return v;
        }
        n = n.wrapping_add(1);
        if n % 4096 == 0 && start.elapsed() > Duration::from_secs(20) {
            panic!("timed out waiting for {what}");
        }
    }
}

impl Bench {
    fn new(cfg: &Config, p: &Params) -> Bench {
        let net = StackNet::build(cfg);
        let (send, recv) = net.connect_pair(0);
        let mut bufs = [
            AlignedBuf::new(SMALL),
            AlignedBuf::new(SMALL),
            AlignedBuf::new(p.bw_size),
            AlignedBuf::new(p.bw_size),
        ];
        bufs[0].fill_pattern(1);
        bufs[2].fill_pattern(2);
        bufs[3].as_mut_slice().fill(0xee);
        let comms = [send, recv, send, recv];
        let mrs = std::array::from_fn(|i| net.reg_buf(comms[i], &bufs[i], PTR_HOST).unwrap());
        Bench {
            net,
            send,
            recv,
            bufs,
            mrs,
        }
    }

    fn round(&self, s: usize, r: usize, size: i32) -> i32 {
        let net = &self.net;
        let rreq = spin("irecv", || {
            net.irecv(self.recv, self.bufs[r].as_ptr(), size, 0, self.mrs[r])
                .unwrap()
        });
        let sreq = spin("isend", || {
            net.isend(self.send, self.bufs[s].as_ptr(), size, 0, self.mrs[s])
                .unwrap()
        });
        // Test both, as NCCL's proxy does: the receiver's progress carries the acknowledgement
        // a large send waits for.
        let (mut sd, mut rd) = (false, None);
        spin("completions", || {
            if !sd {
                sd = net.test(sreq).unwrap().is_some();
            }
            if rd.is_none() {
                rd = net.test(rreq).unwrap();
            }
            (sd && rd.is_some()).then_some(())
        });
        rd.unwrap_or(0)
    }

    fn latency(&self, p: &Params) -> f64 {
        for _ in 0..p.lat_iters / 10 {
            self.round(0, 1, SMALL as i32);
        }
        let t = Instant::now();
        for _ in 0..p.lat_iters {
            self.round(0, 1, SMALL as i32);
        }
        assert_eq!(self.bufs[1].find_mismatch(1, 0..SMALL), None);
        t.elapsed().as_nanos() as f64 / p.lat_iters as f64
    }

    fn bandwidth(&self, p: &Params) -> f64 {
        self.round(2, 3, p.bw_size as i32);
        assert_eq!(self.bufs[3].find_mismatch(2, 0..p.bw_size), None);
        let t = Instant::now();
        for _ in 0..p.bw_iters {
            assert_eq!(self.round(2, 3, p.bw_size as i32), p.bw_size as i32);
        }
        (p.bw_size * p.bw_iters) as f64 / t.elapsed().as_secs_f64() / 1e9
    }

    /// `total` bytes in `chunk`-sized sends over the 64 MiB buffers' first SLOTS chunks, SLOTS
    /// in flight each way; GB/s.
    fn pipeline(&self, chunk: usize, total: usize) -> f64 {
        let net = &self.net;
        let n = total / chunk;
        let (sbuf, rbuf) = (self.bufs[2].as_ptr().cast::<u8>(), self.bufs[3].as_ptr().cast::<u8>());
        let at = |b: *mut u8, slot: usize| b.wrapping_add(slot * chunk).cast::<std::ffi::c_void>();
        let mut sends: [Option<Req>; SLOTS] = [None; SLOTS];
        let mut recvs: [Option<Req>; SLOTS] = [None; SLOTS];
        let (mut posted_s, mut posted_r, mut done_s, mut done_r) = (0, 0, 0, 0);
        let t = Instant::now();
        spin("the pipeline", || {
            // Post in step order, slot = step % SLOTS, as NCCL's proxy does.
            while posted_r < n && recvs[posted_r % SLOTS].is_none() {
                match net
                    .irecv(self.recv, at(rbuf, posted_r % SLOTS), chunk as i32, 0, self.mrs[3])
                    .unwrap()
                {
                    Some(r) => recvs[posted_r % SLOTS] = Some(r),
                    None => break,
                }
                posted_r += 1;
            }
            while posted_s < n && sends[posted_s % SLOTS].is_none() {
                match net
                    .isend(self.send, at(sbuf, posted_s % SLOTS), chunk as i32, 0, self.mrs[2])
                    .unwrap()
                {
                    Some(r) => sends[posted_s % SLOTS] = Some(r),
                    None => break,
                }
                posted_s += 1;
            }
            // Completions in order, each slot's oldest request.
            while done_s < posted_s {
                let slot = &mut sends[done_s % SLOTS];
                if net.test(slot.unwrap()).unwrap().is_none() {
                    break;
                }
                *slot = None;
                done_s += 1;
            }
            while done_r < posted_r {
                let slot = &mut recvs[done_r % SLOTS];
                match net.test(slot.unwrap()).unwrap() {
                    None => break,
                    Some(got) => assert_eq!(got, chunk as i32),
                }
                *slot = None;
                done_r += 1;
            }
            (done_s == n && done_r == n).then_some(())
        });
        let gbps = (n * chunk) as f64 / t.elapsed().as_secs_f64() / 1e9;
        let span = SLOTS * chunk;
        assert_eq!(self.bufs[3].find_mismatch(2, 0..span), None, "the pipeline's data");
        gbps
    }

    fn close(self) {
        let comms = [self.send, self.recv, self.send, self.recv];
        for (c, m) in comms.iter().zip(self.mrs) {
            self.net.dereg_mr(*c, m).unwrap();
        }
        self.net.close_send(self.send).unwrap();
        self.net.close_recv(self.recv).unwrap();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::var_os("TCPXSHIM_BENCH_QUICK").is_some_and(|v| v != "0");
    let p = if quick {
        Params {
            reps: 3,
            lat_iters: 2_000,
            bw_size: 64 << 20,
            bw_iters: 3,
        }
    } else {
        Params {
            reps: 5,
            lat_iters: 20_000,
            bw_size: 64 << 20,
            bw_iters: 20,
        }
    };
    let only = std::env::var("TCPXSHIM_BENCH_INNER").ok();
    let small_only = std::env::var_os("TCPXSHIM_BENCH_SMALL").is_some_and(|v| v != "0");
    let p = if small_only { Params { bw_size: SMALL, ..p } } else { p };
    let fixture = fixture_lib(Fixture::V7);
    for inner in ["builtin", "fixture"] {
        if only.as_deref().is_some_and(|o| o != inner) {
            continue;
        }
        let cfg = |on: bool| {
            let mut c = Config {
                plugin: Some(match inner {
                    "builtin" => "builtin".into(),
                    _ => private_copy(&fixture).to_string_lossy().into_owned(),
                }),
                ctrl_addr: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                recovery_engine: on,
                ..Config::from_env().expect("the NCCL_TCPXSHIM_* settings parse")
            };
            c.tcp.ifname = Some("lo".into());
            c
        };
        let benches = [Bench::new(&cfg(false), &p), Bench::new(&cfg(true), &p)];
        let (mut lat, mut bw) = ([vec![], vec![]], [vec![], vec![]]);
        let mut pipe: [[Vec<f64>; 2]; CHUNKS.len()] = Default::default();
        for rep in 0..p.reps {
            let order = if rep % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                lat[i].push(benches[i].latency(&p));
            }
            for i in order {
                bw[i].push(if small_only { f64::NAN } else { benches[i].bandwidth(&p) });
            }
            for (c, chunk) in CHUNKS.into_iter().enumerate() {
                for i in order {
                    pipe[c][i].push(if small_only {
                        f64::NAN
                    } else {
                        benches[i].pipeline(chunk, p.bw_size * p.bw_iters.min(4))
                    });
                }
            }
        }
        let [l0, l1] = lat.map(median);
        let [b0, b1] = bw.map(median);
        println!(
            "{inner:>8}: {SMALL} B round {l0:.0} ns off, {l1:.0} ns on (on/off {:.3}); {} MiB {b0:.2} GB/s off, {b1:.2} GB/s \
             on (on/off {:.3}); medians of {}",
            l1 / l0,
            p.bw_size >> 20,
            b1 / b0,
            p.reps
        );
        for (c, chunk) in CHUNKS.into_iter().enumerate() {
            let [p0, p1] = pipe[c].clone().map(median);
            println!(
                "{inner:>8}: pipeline of {} KiB sends, {SLOTS} in flight: {p0:.2} GB/s off, {p1:.2} GB/s on (on/off {:.3})",
                chunk >> 10,
                p1 / p0
            );
        }
        for b in benches {
            b.close();
        }
    }
}
