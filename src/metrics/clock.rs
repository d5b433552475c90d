//! The metrics' clock, read twice per request (when it is posted and when it completes).
//!
//! Where the CPU's time-stamp counter runs at a constant rate in every power state (x86-64 with
//! `constant_tsc` and `nonstop_tsc`, as on GCP's A3 machines), the data path reads it directly
//! ([`ticks`]) and keeps raw counts; they are scaled to nanoseconds, with a rate measured once
//! against CLOCK_MONOTONIC, only where a duration or a time is reported ([`ticks_to_ns`],
//! [`ticks_to_time`]), off the data path or once per completion with an integer multiply. That
//! costs a fraction of a clock_gettime call. Elsewhere ticks are CLOCK_MONOTONIC nanoseconds
//! themselves. Either way [`now_ns`] and [`ticks_to_time`] give nanoseconds on one monotonic
//! time line, so differences (latencies, ages) mean the same.

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::Duration;

/// How the counter maps to nanoseconds.
#[derive(Clone, Copy, Debug)]
struct Scale {
    tsc0: u64,
    ns0: u64,
    /// Nanoseconds per tick, times 2^32.
    mult: u64,
}

static SCALE: OnceLock<Option<Scale>> = OnceLock::new();

/// What [`ticks`] reads: 0 not decided yet, [`TSC`] the time-stamp counter, [`MONO`]
/// CLOCK_MONOTONIC.
static MODE: AtomicU8 = AtomicU8::new(0);
const TSC: u8 = 1;
const MONO: u8 = 2;

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(target_arch = "x86_64")]
fn tsc() -> u64 {
    // SAFETY: RDTSC only reads the time-stamp counter; it touches no memory and has no
    // precondition on x86-64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(target_arch = "x86_64")]
fn invariant_tsc() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines().find(|l| l.starts_with("flags")).is_some_and(|l| {
            l.split_whitespace().any(|f| f == "constant_tsc") && l.split_whitespace().any(|f| f == "nonstop_tsc")
        })
    })
}

/// Measures the counter's rate over `span` of CLOCK_MONOTONIC.
#[cfg(target_arch = "x86_64")]
fn measure(span: Duration) -> Option<Scale> {
    let (ns0, tsc0) = (monotonic_ns(), tsc());
    let until = ns0 + span.as_nanos() as u64;
    let mut ns1 = ns0;
    while ns1 < until {
        std::hint::spin_loop();
        ns1 = monotonic_ns();
    }
    let tsc1 = tsc();
    let ticks = tsc1.checked_sub(tsc0).filter(|&t| t > 0)?;
    let mult = ((ns1 - ns0) as f64 / ticks as f64 * (1u64 << 32) as f64) as u64;
    (mult > 0).then_some(Scale { tsc0, ns0, mult })
}

fn scale() -> Option<Scale> {
    *SCALE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if invariant_tsc() {
            let s = measure(Duration::from_millis(5));
            MODE.store(if s.is_some() { TSC } else { MONO }, Relaxed);
            return s;
        }
        MODE.store(MONO, Relaxed);
        None
    })
}

/// Measures the counter's rate now (5 ms), so that the first request does not pay for it.
pub fn calibrate() {
    let _ = scale();
}

/// The clock's raw reading: time-stamp counter ticks, or CLOCK_MONOTONIC nanoseconds where the
/// counter is not used. Only differences and [`ticks_to_time`] mean anything.
#[inline]
pub fn ticks() -> u64 {
    match MODE.load(Relaxed) {
        #[cfg(target_arch = "x86_64")]
        TSC => tsc(),
        MONO => monotonic_ns(),
        _ => {
            calibrate();
            ticks()
        }
    }
}

/// The duration of `d` ticks, in nanoseconds.
#[inline]
pub fn ticks_to_ns(d: u64) -> u64 {
    match scale() {
        Some(s) => ((d as u128 * s.mult as u128) >> 32) as u64,
        None => d,
    }
}

/// The reading `t` of [`ticks`] as nanoseconds on the monotonic time line (0 stays 0).
#[inline]
pub fn ticks_to_time(t: u64) -> u64 {
    match scale() {
        Some(_) if t == 0 => 0,
        Some(s) if t >= s.tsc0 => s.ns0 + ticks_to_ns(t - s.tsc0),
        Some(s) => s.ns0.saturating_sub(ticks_to_ns(s.tsc0 - t)),
        None => t,
    }
}

/// Nanoseconds on the monotonic time line.
#[inline]
pub fn now_ns() -> u64 {
    ticks_to_time(ticks())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_keeps_pace_with_clock_monotonic() {
        calibrate();
        let (a, m0) = (now_ns(), monotonic_ns());
        std::thread::sleep(Duration::from_millis(50));
        let (b, m1) = (now_ns(), monotonic_ns());
        let ours = b - a;
        let theirs = m1 - m0;
        assert!(b > a, "monotonic");
        // Within 2% and 1 ms over 50 ms: the rate is right, whichever clock is in use.
        let diff = ours.abs_diff(theirs);
        assert!(
            diff < theirs / 50 + 1_000_000,
            "ours {ours} ns against CLOCK_MONOTONIC's {theirs} ns"
        );
        // And it is on CLOCK_MONOTONIC's time line.
        assert!(now_ns().abs_diff(monotonic_ns()) < 5_000_000);
    }

    #[test]
    fn ticks_measure_durations_and_times_like_nanoseconds() {
        calibrate();
        let (t0, m0) = (ticks(), monotonic_ns());
        std::thread::sleep(Duration::from_millis(50));
        let (t1, m1) = (ticks(), monotonic_ns());
        let ours = ticks_to_ns(t1 - t0);
        let theirs = m1 - m0;
        assert!(
            ours.abs_diff(theirs) < theirs / 50 + 1_000_000,
            "ticks give {ours} ns against CLOCK_MONOTONIC's {theirs} ns"
        );
        assert!(ticks_to_time(t1).abs_diff(m1) < 5_000_000);
        assert_eq!(ticks_to_time(0), 0);
    }
}
