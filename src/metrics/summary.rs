//! The end-of-run summary, logged at INFO when the last connection closes: one line per peer and
//! a total line.

use super::conn::{now_ns, Dir, Shared};
use super::hist::{quantile_text, HistSnap};
use super::human_bytes;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

/// A peer label without its port numbers ("10.0.0.2:41234" gives "10.0.0.2"), so that a peer's
/// send and receive connections are summed together.
pub fn peer_key(peer: &str) -> String {
    let mut out = String::with_capacity(peer.len());
    let b = peer.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b':' && i > 0 && (b[i - 1].is_ascii_digit() || b[i - 1] == b']') {
            let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
            let next = b.get(i + 1 + digits);
            if digits > 0 && !next.is_some_and(|&c| c.is_ascii_alphanumeric() || c == b':' || c == b'.') {
                i += 1 + digits;
                continue;
            }
        }
        let ch = peer[i..].chars().next().unwrap_or(' ');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

#[derive(Default)]
struct Sum {
    conns: u64,
    sent: u64,
    received: u64,
    messages: u64,
    errors: u64,
    first_ns: u64,
    last_ns: u64,
    lat: HistSnap,
}

impl Sum {
    fn line(&self, what: &str) -> String {
        let secs = self.last_ns.saturating_sub(self.first_ns) as f64 / 1e9;
        let gbs = |b: u64| if secs > 0.0 { b as f64 / secs / 1e9 } else { 0.0 };
        format!(
            "metrics summary: {what}: sent {} ({:.2} GB/s), received {} ({:.2} GB/s) over {secs:.1} s, {} messages \
             on {} connection(s), latency p50 {} p99 {}, {} errors",
            human_bytes(self.sent),
            gbs(self.sent),
            human_bytes(self.received),
            gbs(self.received),
            self.messages,
            self.conns,
            quantile_text(self.lat.quantile(0.5)),
            quantile_text(self.lat.quantile(0.99)),
            self.errors
        )
    }
}

/// The summary lines: one per peer (by [`peer_key`]), then the total.
pub fn lines(shared: &Shared) -> Vec<String> {
    let now = now_ns();
    let mut peers: BTreeMap<String, Sum> = BTreeMap::new();
    let mut total = Sum::default();
    for c in shared.conns() {
        let bytes = c.bytes.load(Relaxed);
        let end = match c.closed_ns.load(Relaxed) {
            0 => now,
            t => t,
        };
        let mut lat = HistSnap::default();
        for h in &c.lat {
            lat.add(&h.snapshot());
        }
        for s in [peers.entry(peer_key(&c.peer)).or_default(), &mut total] {
            s.first_ns = if s.conns == 0 {
                c.opened_ns
            } else {
                s.first_ns.min(c.opened_ns)
            };
            s.last_ns = s.last_ns.max(end);
            s.conns += 1;
            match c.dir {
                Dir::Send => s.sent += bytes,
                Dir::Recv => s.received += bytes,
            }
            s.messages += c.messages.load(Relaxed);
            s.errors += c.errors.load(Relaxed);
            s.lat.add(&lat);
        }
    }
    let mut out: Vec<String> = peers.iter().map(|(p, s)| s.line(&format!("peer {p}"))).collect();
    out.push(total.line(&format!("total ({})", shared.file().display())));
    out
}

/// Logs the summary at INFO.
pub fn log(shared: &Shared) {
    for l in lines(shared) {
        log::info!("{l}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_keys_leave_out_ports() {
        assert_eq!(peer_key("10.0.0.2:41234"), "10.0.0.2");
        assert_eq!(peer_key("peer 10.0.0.2:41234; 4 streams"), "peer 10.0.0.2; 4 streams");
        assert_eq!(peer_key("peer [::1]:80"), "peer [::1]");
        assert_eq!(peer_key("dev 0"), "dev 0");
        assert_eq!(peer_key("peer 10.0.0.2:7; x"), "peer 10.0.0.2; x");
    }
}
