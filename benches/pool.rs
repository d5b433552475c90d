//! Communicator churn, pooled against not (NCCL_TCPXSHIM_POOL=1 against 0), side by side in one
//! run: cycles of listen, connect/accept, one checked message, close of all three, as NCCL makes
//! when a communicator between the same ranks is created and destroyed again. Batches alternate
//! between the two stacks so that drift hits both; the figure is the median batch's time per
//! cycle.
//!
//! Over the built-in transport on loopback, and over the v7 fixture with a TCPX-like connect cost
//! (`connect_cost_ms` 100: every inner connect takes 100 ms, as TCPX's several sockets and flow
//! steering do).
//!
//! Run with `cargo bench --bench pool`; `TCPXSHIM_BENCH_QUICK=1` shrinks the counts. Other
//! NCCL_TCPXSHIM_* settings apply.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

/// The phases of a cycle, whose times are added up in `Phases`.
const PHASES: [&str; 4] = ["listen", "connect+accept", "message", "close"];
type Phases = [f64; 4];

fn cycle(net: &StackNet, seed: u64, phases: &mut Phases) {
    let mut mark = Instant::now();
    let mut lap = |i: usize| {
        let now = Instant::now();
        phases[i] += (now - mark).as_secs_f64() * 1e6;
        mark = now;
    };
    let (mut handle, listen) = net.listen(0).unwrap();
    lap(0);
    let (send, (recv, _)) = net.connect_accept(0, &mut handle, listen);
    lap(1);
    let mut o = TransferOpts::new(4096);
    o.seed = seed;
    net.transfer_opts(send, recv, &o);
    lap(2);
    net.close_listen(listen).unwrap();
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
    lap(3);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median microseconds per cycle of each net, over `batches` alternating batches of `per` cycles,
/// and the mean time of each phase over all of them.
fn compare(nets: &[&StackNet; 2], batches: usize, per: usize) -> [(f64, Phases); 2] {
    for n in nets {
        cycle(n, 1, &mut [0.0; 4]); // warm: the first cycle pays for the control service and the links' hub
    }
    let mut t = [vec![], vec![]];
    let mut phases = [[0.0; 4]; 2];
    for b in 0..batches {
        let order = if b % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let start = Instant::now();
            for c in 0..per {
                cycle(nets[i], (b * per + c) as u64, &mut phases[i]);
            }
            t[i].push(start.elapsed().as_secs_f64() * 1e6 / per as f64);
        }
    }
    let n = (batches * per) as f64;
    let [a, b] = t.map(median);
    [(a, phases[0].map(|p| p / n)), (b, phases[1].map(|p| p / n))]
}

/// " listen 20 / 5, connect+accept ..." : each phase's mean microseconds unpooled / pooled.
fn phase_line(off: &Phases, on: &Phases) -> String {
    let parts: Vec<String> = PHASES
        .iter()
        .zip(off.iter().zip(on))
        .map(|(name, (a, b))| format!("{name} {a:.0} / {b:.0}"))
        .collect();
    format!("   mean us per phase, unpooled / pooled: {}", parts.join(", "))
}

fn main() {
    let quick = std::env::var_os("TCPXSHIM_BENCH_QUICK").is_some_and(|v| v != "0");
    let env = Config::from_env().expect("the NCCL_TCPXSHIM_* settings parse");
    let with_pool = |c: &mut Config, on: bool| {
        c.pool.mode = if on {
            tcpxshim::stack::pool::PoolMode::On
        } else {
            tcpxshim::stack::pool::PoolMode::Off
        };
    };
    let builtin = |on: bool| {
        let mut c = Config {
            plugin: Some("builtin".into()),
            ctrl_addr: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ..env.clone()
        };
        c.tcp.ifname = Some("lo".into());
        with_pool(&mut c, on);
        StackNet::build(&c)
    };
    let (off, on) = (builtin(false), builtin(true));
    let (batches, per) = if quick { (3, 50) } else { (7, 200) };
    let [(a, pa), (b, pb)] = compare(&[&off, &on], batches, per);
    println!(
        " builtin: {a:.0} us per cycle unpooled, {b:.0} us pooled: {:.1}x faster (medians of {batches} batches of {per})",
        a / b
    );
    println!("{}", phase_line(&pa, &pb));
    let fixture = |on: bool| {
        shim_with(Fixture::V7, &[("connect_cost_ms", 100)], |c| {
            *c = Config {
                plugin: c.plugin.clone(),
                ctrl_addr: c.ctrl_addr,
                ..env.clone()
            };
            with_pool(c, on);
        })
    };
    let ((off, _c0), (on, _c1)) = (fixture(false), fixture(true));
    let (batches, per) = if quick { (3, 2) } else { (3, 5) };
    let [(a, pa), (b, pb)] = compare(&[&off, &on], batches, per);
    println!(
        " fixture: {a:.0} us per cycle unpooled, {b:.0} us pooled: {:.1}x faster, with every inner connect taking \
         100 ms (medians of {batches} batches of {per})",
        a / b
    );
    println!("{}", phase_line(&pa, &pb));
}
