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

fn cycle(net: &StackNet, seed: u64) {
    let (mut handle, listen) = net.listen(0).unwrap();
    let (send, (recv, _)) = net.connect_accept(0, &mut handle, listen);
    net.close_listen(listen).unwrap();
    let mut o = TransferOpts::new(4096);
    o.seed = seed;
    net.transfer_opts(send, recv, &o);
    net.close_send(send).unwrap();
    net.close_recv(recv).unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median microseconds per cycle of each net, over `batches` alternating batches of `per` cycles.
fn compare(nets: &[&StackNet; 2], batches: usize, per: usize) -> [f64; 2] {
    for n in nets {
        cycle(n, 1); // warm: the first cycle pays for the control service and the links' hub
    }
    let mut t = [vec![], vec![]];
    for b in 0..batches {
        let order = if b % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let start = Instant::now();
            for c in 0..per {
                cycle(nets[i], (b * per + c) as u64);
            }
            t[i].push(start.elapsed().as_secs_f64() * 1e6 / per as f64);
        }
    }
    t.map(median)
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
    let [a, b] = compare(&[&off, &on], batches, per);
    println!(
        " builtin: {a:.0} us per cycle unpooled, {b:.0} us pooled: {:.1}x faster (medians of {batches} batches of {per})",
        a / b
    );
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
    let [a, b] = compare(&[&off, &on], batches, per);
    println!(
        " fixture: {a:.0} us per cycle unpooled, {b:.0} us pooled: {:.1}x faster, with every inner connect taking \
         100 ms (medians of {batches} batches of {per})",
        a / b
    );
}
