//! The metrics' clock, read twice per request (when it is posted and when it completes).
//!
//! Where the CPU's time-stamp counter runs at a constant rate in every power state (x86-64 with
//! `constant_tsc` and `nonstop_tsc`, as on GCP's A3 machines), it is read directly and scaled to
//! nanoseconds with a rate measured once against CLOCK_MONOTONIC; that costs a fraction of a
//! clock_gettime call. Elsewhere, CLOCK_MONOTONIC itself. Either way the values are nanoseconds on
//! one monotonic time line, so differences (latencies, ages) mean the same.

use std::sync::OnceLock;
use std::time::Duration;

/// How the counter maps to nanoseconds.
#[derive(Clone, Copy, Debug)]
struct Scale {
    tsc0: u64,
    ns0: u64,
    ns_per_tick: f64,
}

static SCALE: OnceLock<Option<Scale>> = OnceLock::new();

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
    Some(Scale {
        tsc0,
        ns0,
        ns_per_tick: (ns1 - ns0) as f64 / ticks as f64,
    })
}

fn scale() -> Option<Scale> {
    *SCALE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if invariant_tsc() {
            return measure(Duration::from_millis(5));
        }
        None
    })
}

/// Measures the counter's rate now (5 ms), so that the first request does not pay for it.
pub fn calibrate() {
    let _ = scale();
}

/// Nanoseconds on the monotonic time line.
#[inline]
pub fn now_ns() -> u64 {
    match scale() {
        #[cfg(target_arch = "x86_64")]
        Some(s) => s.ns0 + (tsc().wrapping_sub(s.tsc0) as f64 * s.ns_per_tick) as u64,
        _ => monotonic_ns(),
    }
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
}
