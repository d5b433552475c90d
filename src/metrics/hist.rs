//! Fixed-bucket latency histograms of atomics, and the message-size classes they are kept by.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds of the buckets, in seconds (a last bucket above them counts the rest).
pub const BOUNDS: [f64; 13] = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0];

/// [`BOUNDS`] in nanoseconds.
const BOUNDS_NS: [u64; 13] = [
    10_000,
    30_000,
    100_000,
    300_000,
    1_000_000,
    3_000_000,
    10_000_000,
    30_000_000,
    100_000_000,
    300_000_000,
    1_000_000_000,
    3_000_000_000,
    10_000_000_000,
];

/// Buckets, the one above the last bound included.
pub const BUCKETS: usize = BOUNDS.len() + 1;

/// Message-size classes: the `size` label values.
pub const SIZE_CLASSES: [&str; 5] = ["le4KiB", "le64KiB", "le1MiB", "le16MiB", "gt16MiB"];

/// The size class of a message of `bytes` bytes (an index into [`SIZE_CLASSES`]).
#[inline]
pub fn size_class(bytes: u64) -> usize {
    match bytes {
        0..=4096 => 0,
        4097..=65536 => 1,
        65537..=1048576 => 2,
        1048577..=16777216 => 3,
        _ => 4,
    }
}

/// The bucket of a duration of `ns` nanoseconds.
#[inline]
fn bucket(ns: u64) -> usize {
    BOUNDS_NS.iter().position(|&b| ns <= b).unwrap_or(BOUNDS.len())
}

/// A histogram of durations: a count per bucket and the sum, in relaxed atomics.
#[derive(Debug, Default)]
pub struct Hist {
    counts: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Hist {
    /// Records one duration, for a histogram only one thread at a time writes (a load and a
    /// store, not a read-modify-write; readers see whole values).
    #[inline]
    pub fn observe_single(&self, ns: u64) {
        let c = &self.counts[bucket(ns)];
        c.store(c.load(Relaxed).wrapping_add(1), Relaxed);
        self.sum_ns.store(self.sum_ns.load(Relaxed).wrapping_add(ns), Relaxed);
    }

    /// Records one duration, from any thread.
    pub fn observe(&self, ns: u64) {
        self.counts[bucket(ns)].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Reads the histogram.
    pub fn snapshot(&self) -> HistSnap {
        HistSnap {
            counts: std::array::from_fn(|i| self.counts[i].load(Relaxed)),
            sum_ns: self.sum_ns.load(Relaxed),
        }
    }
}

/// A point-in-time copy of a [`Hist`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistSnap {
    /// Count per bucket (not cumulative).
    pub counts: [u64; BUCKETS],
    /// Sum of the durations, in nanoseconds.
    pub sum_ns: u64,
}

impl HistSnap {
    /// Number of durations recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Sum in seconds.
    pub fn sum_secs(&self) -> f64 {
        self.sum_ns as f64 / 1e9
    }

    /// Adds `other` into this one.
    pub fn add(&mut self, other: &HistSnap) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.sum_ns += other.sum_ns;
    }

    /// `(upper bound, count)` per bucket, not cumulative, the last bound +Inf.
    pub fn buckets(&self) -> [(f64, u64); BUCKETS] {
        std::array::from_fn(|i| (BOUNDS.get(i).copied().unwrap_or(f64::INFINITY), self.counts[i]))
    }

    /// The upper bound of the bucket that holds quantile `q` (0 to 1), in seconds; +Inf when it
    /// is in the last bucket, `None` when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (bound, c) in self.buckets() {
            seen += c;
            if seen >= rank {
                return Some(bound);
            }
        }
        Some(f64::INFINITY)
    }
}

/// A quantile bound for a log line: "<= 30 us", "> 10 s", "-" when there is none.
pub fn quantile_text(q: Option<f64>) -> String {
    match q {
        None => "-".into(),
        Some(b) if b.is_infinite() => format!("> {} s", BOUNDS[BOUNDS.len() - 1]),
        Some(b) if b < 1e-3 => format!("<= {:.0} us", b * 1e6),
        Some(b) if b < 1.0 => format!("<= {:.0} ms", b * 1e3),
        Some(b) => format!("<= {b:.0} s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations_land_in_their_classes_and_buckets() {
        assert_eq!(size_class(0), 0);
        assert_eq!(size_class(4096), 0);
        assert_eq!(size_class(4097), 1);
        assert_eq!(size_class(1 << 20), 2);
        assert_eq!(size_class(16 << 20), 3);
        assert_eq!(size_class((16 << 20) + 1), 4);
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(10_000), 0);
        assert_eq!(bucket(10_001), 1);
        assert_eq!(bucket(10_000_000_001), BOUNDS.len());
    }

    #[test]
    fn quantiles_are_bucket_bounds() {
        let h = Hist::default();
        for _ in 0..98 {
            h.observe_single(5_000); // <= 10 us
        }
        h.observe(2_000_000); // <= 3 ms
        h.observe(20_000_000_000); // > 10 s
        let s = h.snapshot();
        assert_eq!(s.count(), 100);
        assert_eq!(s.quantile(0.5), Some(1e-5));
        assert_eq!(s.quantile(0.99), Some(3e-3));
        assert_eq!(s.quantile(1.0), Some(f64::INFINITY));
        assert_eq!(quantile_text(s.quantile(0.5)), "<= 10 us");
        assert_eq!(quantile_text(s.quantile(0.99)), "<= 3 ms");
        assert_eq!(quantile_text(s.quantile(1.0)), "> 10 s");
        assert_eq!(HistSnap::default().quantile(0.5), None);
        assert_eq!(s.sum_ns, 98 * 5_000 + 2_000_000 + 20_000_000_000);
    }
}
