//! Counters the shim keeps per connection and per process, and its metrics
//! (`NCCL_TCPXSHIM_METRICS_DIR`): per-connection counters and latency histograms the shim updates on
//! the data path ([`conn`]), written as a Prometheus text file ([`prom`]) and summed up in the log
//! when the last connection closes ([`summary`]).

pub mod clock;
pub mod conn;
pub mod hist;
pub mod prom;
pub mod summary;

pub use conn::{Metrics, Setup};

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Counters of one connection, updated on the data path with relaxed atomics.
#[derive(Debug, Default)]
pub struct CommCounters {
    /// Completed messages.
    pub messages: AtomicU64,
    /// Completed payload bytes.
    pub bytes: AtomicU64,
    /// Failed calls and requests.
    pub errors: AtomicU64,
}

/// A point-in-time copy of [`CommCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// Completed messages.
    pub messages: u64,
    /// Completed payload bytes.
    pub bytes: u64,
    /// Failed calls and requests.
    pub errors: u64,
}

impl CommCounters {
    /// Records one completed message of `bytes` bytes.
    ///
    /// A load and a store, not a read-modify-write: the requests of one comm complete on the
    /// thread that drives it (NCCL drives each comm from one thread at a time), so the counts are
    /// exact, and readers on other threads see whole values. Were two threads to complete requests
    /// of one comm at once, a count could be lost, nothing worse.
    #[inline]
    pub fn complete(&self, bytes: u64) {
        self.messages
            .store(self.messages.load(Relaxed).wrapping_add(1), Relaxed);
        self.bytes.store(self.bytes.load(Relaxed).wrapping_add(bytes), Relaxed);
    }
    /// Records one error.
    pub fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }
    /// Adds a closing connection's counts to the process totals (kept off the data path).
    pub fn retire(&self) {
        let s = self.snapshot();
        TOTALS.messages.fetch_add(s.messages, Relaxed);
        TOTALS.bytes.fetch_add(s.bytes, Relaxed);
        TOTALS.errors.fetch_add(s.errors, Relaxed);
    }
    /// Starts over from zero (a record reused for a new connection).
    pub fn reset(&self) {
        self.messages.store(0, Relaxed);
        self.bytes.store(0, Relaxed);
        self.errors.store(0, Relaxed);
    }
    /// Reads the counters.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            messages: self.messages.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }
}

/// Totals over every closed connection of the process.
pub static TOTALS: CommCounters = CommCounters {
    messages: AtomicU64::new(0),
    bytes: AtomicU64::new(0),
    errors: AtomicU64::new(0),
};

/// Bytes in human units ("1.50 GiB").
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_accumulate_and_feed_totals() {
        let before = TOTALS.snapshot();
        let c = CommCounters::default();
        c.complete(10);
        c.complete(5);
        c.error();
        assert_eq!(
            c.snapshot(),
            CounterSnapshot {
                messages: 2,
                bytes: 15,
                errors: 1
            }
        );
        c.retire();
        let after = TOTALS.snapshot();
        assert!(after.messages >= before.messages + 2 && after.bytes >= before.bytes + 15);
    }

    #[test]
    fn human_bytes_picks_units() {
        assert_eq!(human_bytes(17), "17 B");
        assert_eq!(human_bytes(1536), "1.50 KiB");
        assert_eq!(human_bytes(3 << 30), "3.00 GiB");
    }
}
