//! The two-node connection test behind `tcpxshim serve` / `connect` / `demo`: byte-verified
//! transfers in both directions, then a size sweep measuring ping-pong latency and pipelined
//! bandwidth. The client decides the plan and sends it to the server over the control connection.

use std::cell::Cell;
use std::time::{Duration, Instant};
use tcpxshim::p2p::{Conn, Endpoint, RegBuf, MAX_INFLIGHT};
use tcpxshim::{Error, Result};

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Message sizes of the sweep, ascending.
    pub sizes: Vec<usize>,
    /// Sizes checked byte by byte before the sweep (the sweep sizes plus odd ones).
    pub verify_sizes: Vec<usize>,
    /// Ping-pong iterations for small sizes (large sizes run fewer, bounded by `bytes`).
    pub iters: usize,
    /// Rough bytes moved per size and measurement; bounds the iterations of large sizes.
    pub bytes: u64,
    /// Messages in flight in the bandwidth test (1 to [`MAX_INFLIGHT`]).
    pub depth: usize,
    /// Messages per size and direction in the verification.
    pub verify_iters: usize,
}

impl Plan {
    /// Sizes `min, 4*min, 16*min, ...` up to `max`, plus `max` itself.
    pub fn new(min: usize, max: usize, iters: usize, bytes: u64, depth: usize, verify_iters: usize) -> Result<Plan> {
        if min == 0 || min > max {
            return Err(Error::invalid_argument(format!(
                "size range {min}..{max} is empty (need 1 <= min-size <= max-size)"
            )));
        }
        if max > i32::MAX as usize {
            return Err(Error::invalid_argument(format!(
                "max size {max} exceeds the v7 message limit of 2^31-1 bytes"
            )));
        }
        if !(1..=MAX_INFLIGHT).contains(&depth) {
            return Err(Error::invalid_argument(format!(
                "depth {depth} is out of range (1 to {MAX_INFLIGHT})"
            )));
        }
        if iters == 0 || verify_iters == 0 {
            return Err(Error::invalid_argument("iterations must be at least 1"));
        }
        let mut sizes = Vec::new();
        let mut s = min;
        while s <= max {
            sizes.push(s);
            s = match s.checked_mul(4) {
                Some(n) => n,
                None => break,
            };
        }
        if sizes.last() != Some(&max) {
            sizes.push(max);
        }
        let mut verify_sizes: Vec<usize> = sizes.clone();
        verify_sizes.extend([0, 1, 7, 4099, 65537, (1 << 20) + 13].iter().filter(|&&v| v <= max));
        verify_sizes.sort_unstable();
        verify_sizes.dedup();
        Ok(Plan {
            sizes,
            verify_sizes,
            iters,
            bytes: bytes.max(1),
            depth,
            verify_iters,
        })
    }

    /// The largest message.
    pub fn max_size(&self) -> usize {
        self.sizes.iter().chain(&self.verify_sizes).copied().max().unwrap_or(0)
    }

    /// Ping-pong iterations at `size`.
    pub fn lat_iters(&self, size: usize) -> usize {
        let by_bytes = (self.bytes / 4 / size.max(1) as u64) as usize;
        self.iters.min(by_bytes.max(2))
    }

    /// Messages in the bandwidth test at `size`.
    pub fn bw_msgs(&self, size: usize) -> usize {
        let by_bytes = (self.bytes / size.max(1) as u64) as usize;
        // Saturating: the plan may come from a peer, with any iteration count.
        by_bytes.clamp(4, self.iters.saturating_mul(10).max(4))
    }

    fn encode(&self) -> String {
        let list = |v: &[usize]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",");
        format!(
            "plan sizes={} verify={} iters={} bytes={} depth={} verify_iters={}",
            list(&self.sizes),
            list(&self.verify_sizes),
            self.iters,
            self.bytes,
            self.depth,
            self.verify_iters
        )
    }

    fn decode(text: &str) -> Result<Plan> {
        let bad = || Error::remote(format!("peer sent a malformed test plan: {text:?}"));
        let rest = text.strip_prefix("plan ").ok_or_else(bad)?;
        let (mut sizes, mut verify, mut iters, mut bytes, mut depth, mut viters) = (None, None, None, None, None, None);
        for kv in rest.split_whitespace() {
            let (k, v) = kv.split_once('=').ok_or_else(bad)?;
            let list = |v: &str| {
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse::<usize>())
                    .collect::<std::result::Result<Vec<_>, _>>()
            };
            match k {
                "sizes" => sizes = Some(list(v).map_err(|_| bad())?),
                "verify" => verify = Some(list(v).map_err(|_| bad())?),
                "iters" => iters = Some(v.parse().map_err(|_| bad())?),
                "bytes" => bytes = Some(v.parse().map_err(|_| bad())?),
                "depth" => depth = Some(v.parse().map_err(|_| bad())?),
                "verify_iters" => viters = Some(v.parse().map_err(|_| bad())?),
                _ => {} // newer keys are ignored
            }
        }
        let plan = Plan {
            sizes: sizes.ok_or_else(bad)?,
            verify_sizes: verify.ok_or_else(bad)?,
            iters: iters.ok_or_else(bad)?,
            bytes: bytes.ok_or_else(bad)?,
            depth: depth.ok_or_else(bad)?,
            verify_iters: viters.ok_or_else(bad)?,
        };
        // What Plan::new guarantees: sizes ascending, each once, at least one; counts at least 1.
        let ascending = |v: &[usize]| v.windows(2).all(|w| w[0] < w[1]);
        if plan.max_size() > i32::MAX as usize
            || !(1..=MAX_INFLIGHT).contains(&plan.depth)
            || plan.iters == 0
            || plan.verify_iters == 0
            || plan.bytes == 0
            || plan.sizes.is_empty()
            || !ascending(&plan.sizes)
            || !ascending(&plan.verify_sizes)
        {
            return Err(bad());
        }
        Ok(plan)
    }
}

/// One line of the sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Message size in bytes.
    pub size: usize,
    /// Ping-pong iterations timed.
    pub lat_iters: usize,
    /// Half round trip, microseconds.
    pub lat_us: f64,
    /// Messages in the bandwidth test.
    pub bw_msgs: usize,
    /// Messages in flight.
    pub depth: usize,
    /// Bandwidth, GB/s (10^9 bytes per second).
    pub gbps: f64,
}

impl Row {
    fn encode(&self) -> String {
        format!(
            "row {} {} {} {} {} {}",
            self.size, self.lat_iters, self.lat_us, self.bw_msgs, self.depth, self.gbps
        )
    }
    fn decode(text: &str) -> Result<Row> {
        let bad = || Error::remote(format!("peer sent a malformed result: {text:?}"));
        let f: Vec<&str> = text.strip_prefix("row ").ok_or_else(bad)?.split_whitespace().collect();
        if f.len() < 6 {
            return Err(bad());
        }
        // A time or a rate is a finite number, not negative ("NaN", "inf" and "-1" parse as f64).
        let measure = |t: &str| {
            t.parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(bad)
        };
        Ok(Row {
            size: f[0].parse().map_err(|_| bad())?,
            lat_iters: f[1].parse().map_err(|_| bad())?,
            lat_us: measure(f[2])?,
            bw_msgs: f[3].parse().map_err(|_| bad())?,
            depth: f[4].parse().map_err(|_| bad())?,
            gbps: measure(f[5])?,
        })
    }
}

/// What the verification covered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verified {
    /// Distinct sizes.
    pub sizes: usize,
    /// Messages checked (both directions).
    pub messages: u64,
    /// Bytes checked (both directions).
    pub bytes: u64,
}

/// The outcome of a test.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// The verification.
    pub verified: Verified,
    /// The sweep.
    pub rows: Vec<Row>,
}

/// Progress of a test, for printing.
pub enum Event<'r> {
    /// The plan (the server learns it from the client).
    Plan(&'r Plan),
    /// The verification passed.
    Verified(&'r Verified),
    /// A sweep size starts.
    SizeStart {
        /// 1-based position.
        index: usize,
        /// Number of sizes.
        total: usize,
        /// Message size.
        size: usize,
    },
    /// A sweep size finished.
    Row(&'r Row),
}

/// Human-readable byte counts: 8 B, 4 KiB, 1.5 MiB.
pub fn fmt_size(n: usize) -> String {
    const UNITS: [(usize, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (u, name) in UNITS {
        if n >= u {
            return if n % u == 0 {
                format!("{} {name}", n / u)
            } else {
                format!("{:.1} {name}", n as f64 / u as f64)
            };
        }
    }
    format!("{n} B")
}

/// Parses "4096", "64K", "64KiB", "1M", "2G" (binary multiples).
pub fn parse_size(text: &str) -> std::result::Result<usize, String> {
    let t = text.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size (examples: 4096, 64K, 1M, 2G)"))?;
    let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use K, M or G)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{text:?} is too large"))
}

/// The seed of message `iter` of `size` bytes in direction `dir` (0: client to server).
pub fn pattern_seed(size: usize, iter: usize, dir: u8) -> u64 {
    let mut x = (size as u64) ^ ((iter as u64) << 36) ^ ((dir as u64) << 62) ^ 0x5EED_7C95_0000_0000;
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[inline]
fn word(seed: u64, w: usize) -> u64 {
    seed ^ (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Fills `buf` with the pattern of `seed`: every 8-byte word differs with its position.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    for (w, chunk) in buf.chunks_mut(8).enumerate() {
        let v = word(seed, w).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Where received data differs from the pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// First differing byte.
    pub offset: usize,
    /// The byte expected there.
    pub expected: u8,
    /// The byte received.
    pub got: u8,
    /// How many bytes differ in all.
    pub bad_bytes: usize,
}

/// Compares `buf` with the pattern of `seed`.
pub fn check_pattern(buf: &[u8], seed: u64) -> Option<Mismatch> {
    let mut first: Option<Mismatch> = None;
    let mut bad = 0usize;
    for (w, chunk) in buf.chunks(8).enumerate() {
        let v = word(seed, w).to_le_bytes();
        if chunk != &v[..chunk.len()] {
            for (k, (&got, &expected)) in chunk.iter().zip(&v).enumerate() {
                if got != expected {
                    bad += 1;
                    first.get_or_insert(Mismatch {
                        offset: w * 8 + k,
                        expected,
                        got,
                        bad_bytes: 0,
                    });
                }
            }
        }
    }
    first.map(|m| Mismatch { bad_bytes: bad, ..m })
}

/// The registered buffers of one side. Transfers take a buffer and hand it back, so the
/// functions below take `Buffers` by value and return it.
struct Buffers<'c> {
    send: RegBuf<'c>,
    recv: RegBuf<'c>,
}

impl<'c> Buffers<'c> {
    fn for_plan(ep: &'c Endpoint<'_>, plan: &Plan) -> Result<Buffers<'c>> {
        let max = plan.max_size().max(64);
        // Receives need one slot per message in flight; cap the memory for big messages at 2 slots.
        let recv_len = (2 * max).max((MAX_INFLIGHT * max).min(32 << 20));
        Ok(Buffers {
            send: ep.send_conn().alloc(max)?,
            recv: ep.recv_conn().alloc(recv_len)?,
        })
    }
}

const DIR_C2S: u8 = 0;
const DIR_S2C: u8 = 1;
const OK: &[u8] = b"verified";

/// Tracks whether a failure came from the peer (then it is not reported back to it).
struct Side<'e, 'a> {
    ep: &'e Endpoint<'a>,
    timeout: Duration,
    peer_failed: Cell<bool>,
}

impl<'e> Side<'e, '_> {
    fn recv_ctrl(&self, what: &str) -> Result<Vec<u8>> {
        self.ep
            .recv_ctrl(self.timeout, what)
            .inspect_err(|_| self.peer_failed.set(true))
    }
    fn expect(&self, want: &[u8], what: &str) -> Result<()> {
        let got = self.recv_ctrl(what)?;
        if got != want {
            return Err(Error::remote(format!(
                "peer at {}: expected {what}, got {:?}",
                self.ep.peer().addr,
                String::from_utf8_lossy(&got)
            )));
        }
        Ok(())
    }

    /// Turns a local failure into the peer's error when the peer failed first.
    fn finish<T>(&self, res: Result<T>) -> Result<T> {
        let e = match res {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if self.peer_failed.get() {
            return Err(e);
        }
        // A transfer error is often the consequence of the peer's failure: prefer its report.
        std::thread::sleep(Duration::from_millis(50));
        if let Some(pe) = self.ep.peer_error() {
            if pe.to_string().contains("failed:") {
                return Err(Error::remote(format!("{pe} (here: {e})")));
            }
        }
        self.ep.report_error(&e.to_string());
        Err(e)
    }

    fn send_verified<'b>(&self, buf: RegBuf<'b>, plan: &Plan, size: usize, dir: u8) -> Result<RegBuf<'b>> {
        let mut fill = |i: usize, slot: &mut [u8]| fill_pattern(slot, pattern_seed(size, i, dir));
        let send = self.ep.send_conn();
        Ok(send.send_stream(buf, size, plan.verify_iters, plan.depth, self.timeout, Some(&mut fill))?)
    }

    fn recv_verified<'b>(&self, buf: RegBuf<'b>, plan: &Plan, size: usize, dir: u8) -> Result<RegBuf<'b>> {
        let peer = self.ep.peer().addr;
        let mut check = |i: usize, data: &[u8]| match check_pattern(data, pattern_seed(size, i, dir)) {
            None => Ok(()),
            Some(m) => Err(Error::remote(format!(
                "data mismatch in message {i} of {} B from {peer}: first bad byte at offset {} (expected {:#04x}, got \
                 {:#04x}), {} bad byte(s) in all",
                size, m.offset, m.expected, m.got, m.bad_bytes
            ))),
        };
        let recv = self.ep.recv_conn();
        Ok(recv.recv_stream(buf, size, plan.verify_iters, plan.depth, self.timeout, &mut check)?)
    }

    /// The byte-by-byte check of one size, both ways: client to server, then back.
    fn verify<'b>(&self, bufs: Buffers<'b>, plan: &Plan, size: usize, client: bool) -> Result<Buffers<'b>> {
        let Buffers { mut send, mut recv } = bufs;
        let peer_ok = format!("the peer's verification of {} messages", fmt_size(size));
        if client {
            send = self.send_verified(send, plan, size, DIR_C2S)?;
            self.expect(OK, &peer_ok)?;
            recv = self.recv_verified(recv, plan, size, DIR_S2C)?;
            self.ep.send_ctrl(OK)?;
        } else {
            recv = self.recv_verified(recv, plan, size, DIR_C2S)?;
            self.ep.send_ctrl(OK)?;
            send = self.send_verified(send, plan, size, DIR_S2C)?;
            self.expect(OK, &peer_ok)?;
        }
        Ok(Buffers { send, recv })
    }

    /// Verifies every size of the plan.
    fn verify_all<'b>(&self, mut bufs: Buffers<'b>, plan: &Plan, client: bool) -> Result<(Verified, Buffers<'b>)> {
        let mut v = Verified::default();
        for &size in &plan.verify_sizes {
            bufs = self.verify(bufs, plan, size, client)?;
            v.sizes += 1;
            v.messages += 2 * plan.verify_iters as u64;
            v.bytes += 2 * (plan.verify_iters * size) as u64;
        }
        Ok((v, bufs))
    }

    /// The client's ping-pong at `size`: one untimed round trip, then `lat_iters` timed ones.
    /// Returns half the mean round trip in microseconds.
    fn ping_pong<'b>(&self, mut bufs: Buffers<'b>, size: usize, lat_iters: usize) -> Result<(f64, Buffers<'b>)> {
        let (send, recv, t) = (self.ep.send_conn(), self.ep.recv_conn(), self.timeout);
        let mut start = Instant::now();
        for it in 0..=lat_iters {
            if it == 1 {
                start = Instant::now();
            }
            let pending = recv.irecv(bufs.recv, size, t)?;
            bufs.send = send.send(bufs.send, size, t)?;
            let (n, r) = pending.wait(t)?;
            bufs.recv = r;
            if n != size {
                return Err(Error::remote(format!(
                    "ping-pong at {}: the echo had {n} B",
                    fmt_size(size)
                )));
            }
        }
        let lat_us = start.elapsed().as_secs_f64() * 1e6 / lat_iters as f64 / 2.0;
        Ok((lat_us, bufs))
    }

    /// The client's bandwidth test at `size`: `bw_msgs` messages with `depth` in flight, timed
    /// until the receiver's acknowledgement. Returns GB/s.
    fn bandwidth<'b>(
        &self,
        mut bufs: Buffers<'b>,
        plan: &Plan,
        size: usize,
        bw_msgs: usize,
    ) -> Result<(f64, Buffers<'b>)> {
        let (send, recv, t) = (self.ep.send_conn(), self.ep.recv_conn(), self.timeout);
        let ack = recv.irecv(bufs.recv, 8, t)?;
        let start = Instant::now();
        bufs.send = send.send_stream(bufs.send, size, bw_msgs, plan.depth, t, None)?;
        bufs.recv = ack.wait(t)?.1;
        let secs = start.elapsed().as_secs_f64();
        Ok(((size * bw_msgs) as f64 / secs / 1e9, bufs))
    }

    /// The client's measurements at one size.
    fn measure<'b>(&self, bufs: Buffers<'b>, plan: &Plan, size: usize) -> Result<(Row, Buffers<'b>)> {
        let lat_iters = plan.lat_iters(size);
        let (lat_us, bufs) = self.ping_pong(bufs, size, lat_iters)?;
        let bw_msgs = plan.bw_msgs(size);
        let (gbps, bufs) = self.bandwidth(bufs, plan, size, bw_msgs)?;
        let row = Row {
            size,
            lat_iters,
            lat_us,
            bw_msgs,
            depth: plan.depth,
            gbps,
        };
        Ok((row, bufs))
    }

    /// The server's side of one size: echoes the ping-pong, receives the bandwidth test and
    /// acknowledges it.
    fn serve_size<'b>(&self, mut bufs: Buffers<'b>, plan: &Plan, size: usize) -> Result<Buffers<'b>> {
        let (send, recv, t) = (self.ep.send_conn(), self.ep.recv_conn(), self.timeout);
        for _ in 0..=plan.lat_iters(size) {
            let (n, r) = recv.recv(bufs.recv, size, t)?;
            bufs.recv = r;
            if n != size {
                return Err(Error::remote(format!(
                    "ping-pong at {}: received {n} B",
                    fmt_size(size)
                )));
            }
            bufs.send = send.send(bufs.send, size, t)?;
        }
        let bw_msgs = plan.bw_msgs(size);
        bufs.recv = recv.recv_stream(bufs.recv, size, bw_msgs, plan.depth, t, &mut |_, _| Ok(()))?;
        bufs.send = send.send(bufs.send, 8, t)?;
        Ok(bufs)
    }
}

/// Runs the test as the client: sends `plan`, verifies, sweeps. The server runs [`run_server`].
pub fn run_client(ep: &Endpoint<'_>, plan: &Plan, timeout: Duration, on: &mut dyn FnMut(Event<'_>)) -> Result<Report> {
    let side = Side {
        ep,
        timeout,
        peer_failed: Cell::new(false),
    };
    let res = client_inner(&side, plan, on);
    side.finish(res)
}

fn client_inner(side: &Side<'_, '_>, plan: &Plan, on: &mut dyn FnMut(Event<'_>)) -> Result<Report> {
    let ep = side.ep;
    on(Event::Plan(plan));
    let bufs = Buffers::for_plan(ep, plan)?;
    ep.send_ctrl(plan.encode().as_bytes())?;
    side.expect(b"plan-ok", "the peer's acceptance of the test plan")?;

    let (verified, mut bufs) = side.verify_all(bufs, plan, true)?;
    let mut report = Report {
        verified,
        rows: Vec::new(),
    };
    on(Event::Verified(&report.verified));

    for (k, &size) in plan.sizes.iter().enumerate() {
        on(Event::SizeStart {
            index: k + 1,
            total: plan.sizes.len(),
            size,
        });
        let (row, b) = side.measure(bufs, plan, size)?;
        bufs = b;
        ep.send_ctrl(row.encode().as_bytes())?;
        on(Event::Row(&row));
        report.rows.push(row);
    }
    ep.send_ctrl(b"done")?;
    side.expect(b"done", "the peer's goodbye")?;
    Ok(report)
}

/// Runs the test as the server: receives the plan from the client and follows it.
pub fn run_server(ep: &Endpoint<'_>, timeout: Duration, on: &mut dyn FnMut(Event<'_>)) -> Result<Report> {
    let side = Side {
        ep,
        timeout,
        peer_failed: Cell::new(false),
    };
    let res = server_inner(&side, on);
    side.finish(res)
}

fn server_inner(side: &Side<'_, '_>, on: &mut dyn FnMut(Event<'_>)) -> Result<Report> {
    let ep = side.ep;
    let text = side.recv_ctrl("the test plan")?;
    let plan = Plan::decode(&String::from_utf8_lossy(&text))?;
    on(Event::Plan(&plan));
    let bufs = Buffers::for_plan(ep, &plan)?;
    ep.send_ctrl(b"plan-ok")?;

    let (verified, mut bufs) = side.verify_all(bufs, &plan, false)?;
    let mut report = Report {
        verified,
        rows: Vec::new(),
    };
    on(Event::Verified(&report.verified));

    for (k, &size) in plan.sizes.iter().enumerate() {
        on(Event::SizeStart {
            index: k + 1,
            total: plan.sizes.len(),
            size,
        });
        bufs = side.serve_size(bufs, &plan, size)?;
        let text = side.recv_ctrl(&format!("the result for {}", fmt_size(size)))?;
        let row = Row::decode(&String::from_utf8_lossy(&text))?;
        on(Event::Row(&row));
        report.rows.push(row);
    }
    side.expect(b"done", "the end of the test")?;
    ep.send_ctrl(b"done")?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tcpxshim::p2p;
    use tcpxshim::tcp::TcpConfig;
    use tcpxshim::tcp::TcpTransport;

    /// Both sides of the test in one process, over the built-in transport on loopback.
    #[test]
    fn client_and_server_run_the_same_plan() {
        const T: Duration = Duration::from_secs(20);
        let cfg = TcpConfig {
            ifname: Some("lo".into()),
            ..Default::default()
        };
        let net = TcpTransport::new(&cfg).expect("built-in TCP transport on lo");
        let server = p2p::Server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().to_string();
        let plan = Plan::new(8, 256 << 10, 5, 1 << 20, 4, 2).unwrap();
        std::thread::scope(|s| {
            let srv = s.spawn(|| {
                let ep = server.accept(&net, 0, T).unwrap();
                let mut rows = 0;
                let report = run_server(&ep, T, &mut |e| {
                    if let Event::Row(_) = e {
                        rows += 1
                    }
                })
                .unwrap();
                assert_eq!(rows, report.rows.len());
                report
            });
            let ep = p2p::connect_to(&net, 0, &addr, T).unwrap();
            let report = run_client(&ep, &plan, T, &mut |_| {}).unwrap();
            let server_report = srv.join().unwrap();
            assert_eq!(report, server_report, "the server prints the client's results");
            assert_eq!(report.rows.len(), plan.sizes.len());
            assert_eq!(report.verified.sizes, plan.verify_sizes.len());
            for r in &report.rows {
                assert!(r.lat_us > 0.0 && r.gbps > 0.0, "{r:?}");
            }
        });
    }

    #[test]
    fn sizes_are_powers_of_four_plus_the_max() {
        let p = Plan::new(8, 64 << 20, 10, 1 << 20, 4, 2).unwrap();
        assert_eq!(p.sizes.first(), Some(&8));
        assert_eq!(p.sizes[1], 32);
        assert_eq!(p.sizes.last(), Some(&(64 << 20)));
        assert_eq!(p.sizes[p.sizes.len() - 2], 32 << 20);
        assert!(p.verify_sizes.contains(&0) && p.verify_sizes.contains(&4099));
        assert_eq!(Plan::decode(&p.encode()).unwrap(), p);
        assert!(Plan::new(0, 8, 1, 1, 1, 1).is_err());
        assert!(Plan::new(16, 8, 1, 1, 1, 1).is_err());
        assert!(Plan::new(8, 8, 1, 1, 9, 1).is_err());
    }

    #[test]
    fn iterations_shrink_with_size() {
        let p = Plan::new(8, 64 << 20, 100, 256 << 20, 8, 2).unwrap();
        assert_eq!(p.lat_iters(8), 100);
        assert_eq!(p.lat_iters(64 << 20), 2);
        assert_eq!(p.bw_msgs(8), 1000);
        assert_eq!(p.bw_msgs(64 << 20), 4);
        assert_eq!(p.bw_msgs(1 << 20), 256);
    }

    #[test]
    fn pattern_detects_changes_and_names_the_offset() {
        let mut b = vec![0u8; 1003];
        let seed = pattern_seed(1003, 1, 0);
        fill_pattern(&mut b, seed);
        assert_eq!(check_pattern(&b, seed), None);
        assert!(
            check_pattern(&b, pattern_seed(1003, 2, 0)).is_some(),
            "iteration changes the pattern"
        );
        assert!(
            check_pattern(&b, pattern_seed(1004, 1, 0)).is_some(),
            "size changes the pattern"
        );
        let expected = b[517];
        b[517] ^= 0x40;
        b[1002] ^= 1;
        let m = check_pattern(&b, seed).unwrap();
        assert_eq!(
            (m.offset, m.expected, m.got, m.bad_bytes),
            (517, expected, expected ^ 0x40, 2)
        );
        // A block moved by 64 KiB is caught: every word depends on its position.
        let mut big = vec![0u8; 3 << 16];
        let s = pattern_seed(big.len(), 0, 1);
        fill_pattern(&mut big, s);
        big.copy_within(0..1 << 16, 1 << 16);
        let off = check_pattern(&big, s).unwrap().offset;
        assert!((1 << 16..(1 << 16) + 8).contains(&off), "{off}");
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("12Q").is_err() && parse_size("x").is_err());
        assert_eq!(fmt_size(8), "8 B");
        assert_eq!(fmt_size(64 << 20), "64 MiB");
        assert_eq!(fmt_size(1536), "1.5 KiB");
    }
}

/// Property tests of the messages a peer sends (the test plan and the result rows): the
/// decoders of the library are covered in its own `fuzz` modules; these are the command's.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// As the library's: 4096 cases, or PROPTEST_CASES when set (scripts/fuzz.sh).
    fn config() -> ProptestConfig {
        let mut c = ProptestConfig::default();
        if std::env::var_os("PROPTEST_CASES").is_none() {
            c.cases = 4096;
        }
        c
    }

    fn any_plan() -> impl Strategy<Value = Plan> {
        (
            1usize..=1 << 20,
            0u32..12,
            1usize..10_000,
            any::<u64>(),
            1..=MAX_INFLIGHT,
            1usize..100,
        )
            .prop_map(|(min, shift, iters, bytes, depth, viters)| {
                let max = (min << shift).min(i32::MAX as usize);
                Plan::new(min, max, iters, bytes, depth, viters).unwrap()
            })
    }

    fn any_row() -> impl Strategy<Value = Row> {
        (
            any::<usize>(),
            any::<usize>(),
            0.0..1e12f64,
            any::<usize>(),
            any::<usize>(),
            0.0..1e6f64,
        )
            .prop_map(|(size, lat_iters, lat_us, bw_msgs, depth, gbps)| Row {
                size,
                lat_iters,
                lat_us,
                bw_msgs,
                depth,
                gbps,
            })
    }

    /// A plan the server accepted: what Plan::new would make, and what the server computes from
    /// it neither panics nor overflows.
    fn check_plan(p: &Plan) -> std::result::Result<(), TestCaseError> {
        prop_assert!(!p.sizes.is_empty() && p.sizes.windows(2).all(|w| w[0] < w[1]));
        prop_assert!(p.verify_sizes.windows(2).all(|w| w[0] < w[1]));
        prop_assert!(p.max_size() <= i32::MAX as usize && (1..=MAX_INFLIGHT).contains(&p.depth));
        prop_assert!(p.iters >= 1 && p.verify_iters >= 1 && p.bytes >= 1);
        for &s in p.sizes.iter().chain(&p.verify_sizes) {
            prop_assert!(p.lat_iters(s) >= 1);
            prop_assert!(p.bw_msgs(s) >= 4);
        }
        prop_assert_eq!(Plan::decode(&p.encode()).unwrap(), p.clone());
        Ok(())
    }

    /// Text that looks like a plan: the keys, numbers (some huge, some lists) and junk.
    fn plan_like() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("sizes"),
            Just("verify"),
            Just("iters"),
            Just("bytes"),
            Just("depth"),
            Just("verify_iters"),
            Just("other")
        ];
        let num = prop_oneof![
            (0u64..20).prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            Just("18446744073709551616".to_string()),
            Just("-1".to_string()),
            Just(String::new())
        ];
        let value = proptest::collection::vec(num, 1..4).prop_map(|v| v.join(","));
        proptest::collection::vec((key, value), 0..8).prop_map(|kvs| {
            let body: Vec<String> = kvs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("plan {}", body.join(" "))
        })
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn plan_arbitrary_text(t in prop_oneof![".{0,200}", plan_like()]) {
            if let Ok(p) = Plan::decode(&t) {
                check_plan(&p)?;
            }
        }

        #[test]
        fn plan_round_trips(p in any_plan()) {
            check_plan(&p)?;
            prop_assert_eq!(Plan::decode(&p.encode()).unwrap().encode(), p.encode());
        }

        /// Any one byte of a plan changed, or the plan cut short: rejected, or a plan that meets
        /// every check (the server then runs exactly the plan the text says).
        #[test]
        fn plan_mutations(p in any_plan(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let text = p.encode().into_bytes();
            let mut m = text.clone();
            let i = at.index(m.len());
            m[i] = byte;
            let cut = &text[..cut.index(text.len())];
            for b in [&m[..], cut] {
                if let Ok(q) = Plan::decode(&String::from_utf8_lossy(b)) {
                    check_plan(&q)?;
                }
            }
        }

        #[test]
        fn row_arbitrary_text(t in prop_oneof![".{0,120}", "row( [-+0-9.eEinfNa]{0,12}){0,7}"]) {
            if let Ok(r) = Row::decode(&t) {
                prop_assert!(r.lat_us.is_finite() && r.lat_us >= 0.0 && r.gbps.is_finite() && r.gbps >= 0.0);
                prop_assert_eq!(Row::decode(&r.encode()).unwrap(), r);
            }
        }

        #[test]
        fn row_round_trips_and_mutations(r in any_row(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let text = r.encode();
            prop_assert_eq!(Row::decode(&text).unwrap(), r.clone());
            let mut m = text.into_bytes();
            let i = at.index(m.len());
            m[i] = byte;
            if let Ok(q) = Row::decode(&String::from_utf8_lossy(&m)) {
                prop_assert!(q.lat_us.is_finite() && q.lat_us >= 0.0 && q.gbps.is_finite() && q.gbps >= 0.0);
                prop_assert_eq!(Row::decode(&q.encode()).unwrap(), q);
            }
        }
    }

    /// Found by the fuzz module: a plan with a huge iteration count overflowed (debug builds
    /// panicked; release builds wrapped and then panicked in clamp), ending the server.
    #[test]
    fn regression_a_huge_iteration_count_does_not_overflow() {
        let p = Plan::decode(&format!(
            "plan sizes=8 verify=8 iters={} bytes=1 depth=1 verify_iters=1",
            usize::MAX
        ))
        .unwrap();
        assert_eq!(p.bw_msgs(8), 4);
        assert!(Plan::decode("plan sizes=8 verify=8 iters=1 bytes=1 depth=1 verify_iters=0").is_err());
        assert!(Plan::decode("plan sizes=64,8 verify=8 iters=1 bytes=1 depth=1 verify_iters=1").is_err());
        assert!(Row::decode("row 8 1 NaN 4 1 1").is_err() && Row::decode("row 8 1 1 4 1 -2").is_err());
    }
}
