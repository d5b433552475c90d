//! The CPUs the built-in transport may use, and its I/O plan to match.
//!
//! A rank started by mpirun with its default binding may run on one core (two ranks) or one
//! socket; a container may have a CPU quota. Both are read at start: the affinity mask of the
//! process (`sched_getaffinity`) and the cgroup's quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` /
//! `cpu.cfs_period_us`, along the process's cgroup path up to the root). Unless
//! `NCCL_TCPXSHIM_TCP_WORKERS` says otherwise, the transport starts one I/O worker per usable CPU,
//! at most [`MAX_DEFAULT_WORKERS`]: where one core is all a rank has, four workers would only take
//! turns with NCCL's threads on it. `NCCL_TCPXSHIM_TCP_CPUS` pins the workers, one CPU each in
//! turn, as TCPX's `NCCL_GPUDIRECTTCPX_TX_BINDINGS` pins its threads.

use crate::error::{Error, Result};
use std::fmt::Write as _;
use std::path::Path;

/// Workers started when nothing sets their number and CPUs are plentiful.
pub const MAX_DEFAULT_WORKERS: usize = 4;
/// Smallest striping chunk unless NCCL_TCPXSHIM_TCP_MIN_CHUNK says otherwise.
pub const DEFAULT_MIN_CHUNK: usize = 64 << 10;
/// ... where the process has less than 2 CPUs: fewer and larger writes (NCCL's 512 KiB steps go on
/// one socket each), since the one core is busy enough with the kernel's copies.
pub const ONE_CPU_MIN_CHUNK: usize = 512 << 10;
/// Microseconds an I/O worker keeps polling after its last traffic before it sleeps, where the
/// process has CPUs to spare for it (see [`CpuPlan::spin_us`]).
pub const DEFAULT_SPIN_US: u64 = 50;
/// Highest CPU number a mask here can hold (glibc's CPU_SETSIZE).
pub const MAX_CPU: usize = 1023;

/// Where the number of workers came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkersFrom {
    /// `NCCL_TCPXSHIM_TCP_WORKERS`.
    Setting,
    /// One per CPU of `NCCL_TCPXSHIM_TCP_CPUS` that the process may use.
    PinList,
    /// One per usable CPU, at most [`MAX_DEFAULT_WORKERS`].
    Usable,
}

/// What the transport found and what it runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuPlan {
    /// CPUs of the affinity mask (empty when it could not be read).
    pub allowed: Vec<usize>,
    /// CPUs the cgroup's quota amounts to (`None`: no quota).
    pub quota: Option<f64>,
    /// I/O worker threads.
    pub workers: usize,
    pub workers_from: WorkersFrom,
    /// The CPU worker i is pinned to is `pins[i % pins.len()]`; empty: not pinned.
    pub pins: Vec<usize>,
    /// CPUs of `NCCL_TCPXSHIM_TCP_CPUS` left out because the process may not run there.
    pub refused: Vec<usize>,
    /// `NCCL_TCPXSHIM_TCP_SPIN`, if set (see [`CpuPlan::spin_us`]).
    pub spin_set: Option<u64>,
}

impl CpuPlan {
    /// CPUs the process can keep busy: the affinity mask's, less where the quota is smaller.
    pub fn usable(&self) -> f64 {
        let n = if self.allowed.is_empty() {
            f64::from(u32::try_from(std::thread::available_parallelism().map_or(1, |n| n.get())).unwrap_or(1))
        } else {
            self.allowed.len() as f64
        };
        self.quota.map_or(n, |q| q.min(n))
    }

    /// Makes the plan from what was found and the two settings.
    pub fn new(allowed: Vec<usize>, quota: Option<f64>, workers: Option<usize>, cpus: Option<&[usize]>) -> CpuPlan {
        let (pins, refused): (Vec<usize>, Vec<usize>) = match cpus {
            Some(list) => list.iter().partition(|c| allowed.is_empty() || allowed.contains(c)),
            None => (Vec::new(), Vec::new()),
        };
        let mut plan = CpuPlan {
            allowed,
            quota,
            workers: 1,
            workers_from: WorkersFrom::Usable,
            pins,
            refused,
            spin_set: None,
        };
        (plan.workers, plan.workers_from) = match workers {
            Some(n) => (n, WorkersFrom::Setting),
            None if !plan.pins.is_empty() => (plan.pins.len().min(64), WorkersFrom::PinList),
            None => {
                let usable = plan.usable().floor() as usize;
                (usable.clamp(1, MAX_DEFAULT_WORKERS), WorkersFrom::Usable)
            }
        };
        plan
    }

    /// The smallest striping chunk the plan asks for (see [`ONE_CPU_MIN_CHUNK`]).
    pub fn min_chunk(&self) -> usize {
        if self.usable() < 2.0 {
            ONE_CPU_MIN_CHUNK
        } else {
            DEFAULT_MIN_CHUNK
        }
    }

    /// With `NCCL_TCPXSHIM_TCP_SPIN` as set (`None`: unset).
    pub fn with_spin(mut self, spin_us: Option<u64>) -> CpuPlan {
        self.spin_set = spin_us;
        self
    }

    /// Microseconds a worker keeps polling its sockets after traffic before it sleeps: the setting,
    /// else [`DEFAULT_SPIN_US`] where the CPUs leave room for every worker besides NCCL's proxy
    /// and main threads (usable CPUs at least workers + 2), else 0. A worker that polls needs no
    /// wake-up for the next message (an eventfd write by NCCL's proxy thread, an inter-processor
    /// interrupt on a virtual machine) and sees arriving data without the scheduler's delay; where
    /// it would take turns with NCCL's threads on the same cores, it sleeps at once.
    pub fn spin_us(&self) -> u64 {
        match self.spin_set {
            Some(us) => us,
            None if self.workers > 0 && self.usable() >= (self.workers + 2) as f64 => DEFAULT_SPIN_US,
            None => 0,
        }
    }

    /// The CPU worker `i` runs on, if pinned.
    pub fn pin_of(&self, i: usize) -> Option<usize> {
        (!self.pins.is_empty()).then(|| self.pins[i % self.pins.len()])
    }

    /// The INFO line.
    pub fn describe(&self) -> String {
        let mut s = String::from("CPU plan: ");
        let usable = self.usable();
        if usable.fract() == 0.0 {
            let _ = write!(s, "{usable} usable CPU(s)");
        } else {
            let _ = write!(s, "{usable:.2} usable CPU(s)");
        }
        if self.allowed.is_empty() {
            s.push_str(" (affinity mask unreadable");
        } else {
            let _ = write!(s, " (affinity {}", cpu_list(&self.allowed));
        }
        match self.quota {
            Some(q) => {
                let _ = write!(s, ", cgroup quota {q:.2} CPUs)");
            }
            None => s.push_str(", no cgroup quota)"),
        }
        if self.workers == 0 {
            s.push_str(
                ": no I/O worker threads, data sockets driven from the calling thread (NCCL_TCPXSHIM_TCP_WORKERS=0)",
            );
            return s;
        }
        let _ = write!(
            s,
            ": {} I/O worker(s) ({})",
            self.workers,
            match self.workers_from {
                WorkersFrom::Setting => "NCCL_TCPXSHIM_TCP_WORKERS",
                WorkersFrom::PinList => "one per CPU of NCCL_TCPXSHIM_TCP_CPUS",
                WorkersFrom::Usable => "one per usable CPU, at most 4; NCCL_TCPXSHIM_TCP_WORKERS sets it",
            }
        );
        if self.pins.is_empty() {
            s.push_str(", not pinned (NCCL_TCPXSHIM_TCP_CPUS pins them)");
        } else {
            let _ = write!(s, ", pinned to CPUs {} in turn", cpu_list(&self.pins));
        }
        match (self.spin_us(), self.spin_set.is_some()) {
            (0, false) => s.push_str(", sleeping when idle (NCCL_TCPXSHIM_TCP_SPIN sets a polling time)"),
            (0, true) => s.push_str(", sleeping when idle (NCCL_TCPXSHIM_TCP_SPIN=0)"),
            (us, false) => {
                let _ = write!(
                    s,
                    ", polling {us} us after traffic before sleeping (NCCL_TCPXSHIM_TCP_SPIN sets it)"
                );
            }
            (us, true) => {
                let _ = write!(
                    s,
                    ", polling {us} us after traffic before sleeping (NCCL_TCPXSHIM_TCP_SPIN)"
                );
            }
        }
        if self.min_chunk() != DEFAULT_MIN_CHUNK {
            let _ = write!(
                s,
                ", messages striped in pieces of at least {} KiB unless NCCL_TCPXSHIM_TCP_MIN_CHUNK says otherwise",
                self.min_chunk() >> 10
            );
        }
        if !self.refused.is_empty() {
            let _ = write!(
                s,
                "; NCCL_TCPXSHIM_TCP_CPUS names {} outside this process's affinity, left out",
                cpu_list(&self.refused)
            );
        }
        if usable < 2.0 && self.workers > 1 && self.pins.is_empty() {
            s.push_str("; more workers than CPUs take turns with NCCL's threads");
        }
        s
    }
}

/// `0-3,8` for [0, 1, 2, 3, 8].
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut v = cpus.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut out = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if j == i {
            v[i].to_string()
        } else {
            format!("{}-{}", v[i], v[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// Parses a CPU list (`0-3,8,10-11`) as NCCL_TCPXSHIM_TCP_CPUS gives it, in the order given.
pub fn parse_cpu_list(setting: &str, text: &str) -> Result<Vec<usize>> {
    let bad = |why: &str| {
        Error::invalid_argument(format!(
            "{setting}={text:?}: {why} (expected CPU numbers and ranges from 0 to {MAX_CPU}, e.g. 0-3,8)"
        ))
    };
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: usize = a
            .parse()
            .map_err(|_| bad(&format!("{part:?} is not a CPU number or range")))?;
        let b: usize = b
            .parse()
            .map_err(|_| bad(&format!("{part:?} is not a CPU number or range")))?;
        if a > b || b > MAX_CPU {
            return Err(bad(&format!("{part:?} is out of range")));
        }
        for c in a..=b {
            if !out.contains(&c) {
                out.push(c);
            }
        }
    }
    if out.is_empty() {
        return Err(bad("no CPU given"));
    }
    Ok(out)
}

/// The CPUs a v2 `cpu.max` (`QUOTA PERIOD`, or `max PERIOD`) allows; `None` without a limit.
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut it = text.split_whitespace();
    let quota = it.next()?;
    let period: f64 = it.next().map_or(Some(100_000.0), |p| p.parse().ok())?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    let q: f64 = quota.parse().ok()?;
    (q > 0.0).then_some(q / period)
}

/// The CPUs a v1 quota (`cpu.cfs_quota_us`, -1 without limit) and period allow.
pub fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let q: i64 = quota.trim().parse().ok()?;
    let p: i64 = period.trim().parse().ok()?;
    (q > 0 && p > 0).then(|| q as f64 / p as f64)
}

/// The smallest quota along the cgroup path of this process, read under `root` (normally
/// `/sys/fs/cgroup`) from `/proc/self/cgroup`'s text: v2's `cpu.max` in every directory from the
/// process's own up to the root, or v1's `cpu` controller files. `None`: no quota anywhere.
pub fn cgroup_quota(root: &Path, proc_cgroup: &str) -> Option<f64> {
    let mut best: Option<f64> = None;
    let mut take = |q: Option<f64>| {
        if let Some(q) = q {
            best = Some(best.map_or(q, |b: f64| b.min(q)));
        }
    };
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(_), Some(ctrl), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        if ctrl.is_empty() {
            // v2: every level's cpu.max limits the ones below it.
            let mut dir = root.join(rel);
            loop {
                take(
                    std::fs::read_to_string(dir.join("cpu.max"))
                        .ok()
                        .and_then(|t| parse_cpu_max(&t)),
                );
                if dir == root || !dir.pop() || !dir.starts_with(root) {
                    break;
                }
            }
        } else if ctrl.split(',').any(|c| c == "cpu") {
            for mount in [ctrl, "cpu,cpuacct", "cpu"] {
                let base = root.join(mount);
                for dir in [base.join(rel), base.clone()] {
                    let q = std::fs::read_to_string(dir.join("cpu.cfs_quota_us"));
                    let p = std::fs::read_to_string(dir.join("cpu.cfs_period_us"));
                    if let (Ok(q), Ok(p)) = (q, p) {
                        take(parse_cfs(&q, &p));
                    }
                }
            }
        }
    }
    best
}

/// Reads the affinity mask and the cgroup quota of this process.
pub fn discover() -> (Vec<usize>, Option<f64>) {
    let allowed = super::sys::affinity().unwrap_or_else(|e| {
        log::debug!("built-in TCP transport: reading the CPU affinity mask: {e}");
        Vec::new()
    });
    let quota = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| cgroup_quota(Path::new("/sys/fs/cgroup"), &t));
    (allowed, quota)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_and_print() {
        assert_eq!(parse_cpu_list("X", "0-3,8").unwrap(), vec![0, 1, 2, 3, 8]);
        assert_eq!(parse_cpu_list("X", " 9, 2 ,2-3").unwrap(), vec![9, 2, 3]);
        for bad in ["", "a", "3-1", "0-1024", "1,-2", ","] {
            let e = parse_cpu_list("NCCL_TCPXSHIM_TCP_CPUS", bad).unwrap_err().to_string();
            assert!(e.contains("NCCL_TCPXSHIM_TCP_CPUS"), "{bad}: {e}");
        }
        assert_eq!(cpu_list(&[8, 0, 1, 2, 3, 5, 6]), "0-3,5-6,8");
        assert_eq!(cpu_list(&[4]), "4");
    }

    #[test]
    fn quotas_parse() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_cpu_max("50000"), Some(0.5));
        assert_eq!(parse_cpu_max("junk"), None);
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("200000\n", "100000\n"), Some(2.0));
    }

    #[test]
    fn the_smallest_quota_on_the_cgroup_path_counts() {
        let root = std::env::temp_dir().join(format!("tcpxshim-cg-{}", std::process::id()));
        let leaf = root.join("job/rank0");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(root.join("cpu.max"), "max 100000\n").unwrap();
        std::fs::write(root.join("job/cpu.max"), "300000 100000\n").unwrap();
        std::fs::write(leaf.join("cpu.max"), "max 100000\n").unwrap();
        assert_eq!(cgroup_quota(&root, "0::/job/rank0\n"), Some(3.0));
        std::fs::write(leaf.join("cpu.max"), "100000 100000\n").unwrap();
        assert_eq!(cgroup_quota(&root, "0::/job/rank0\n"), Some(1.0));
        assert_eq!(cgroup_quota(&root, "0::/elsewhere\n"), None);
        // v1: the cpu controller's files.
        let v1 = root.join("cpu,cpuacct/job");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("cpu.cfs_quota_us"), "50000\n").unwrap();
        std::fs::write(v1.join("cpu.cfs_period_us"), "100000\n").unwrap();
        assert_eq!(cgroup_quota(&root, "4:cpu,cpuacct:/job\n1:memory:/job\n"), Some(0.5));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_plan_follows_the_cpus_unless_a_setting_says_otherwise() {
        let one = CpuPlan::new(vec![3], None, None, None);
        assert_eq!((one.workers, one.workers_from), (1, WorkersFrom::Usable));
        assert!(one
            .describe()
            .contains("1 usable CPU(s) (affinity 3, no cgroup quota): 1 I/O worker(s)"));
        let many = CpuPlan::new((0..16).collect(), None, None, None);
        assert_eq!(many.workers, MAX_DEFAULT_WORKERS);
        let quota = CpuPlan::new((0..16).collect(), Some(2.5), None, None);
        assert_eq!(quota.workers, 2);
        assert!(quota
            .describe()
            .contains("2.50 usable CPU(s) (affinity 0-15, cgroup quota 2.50 CPUs)"));
        let set = CpuPlan::new(vec![0], None, Some(4), None);
        assert_eq!((set.workers, set.workers_from), (4, WorkersFrom::Setting));
        assert!(set.describe().contains("take turns"), "{}", set.describe());
        let pinned = CpuPlan::new((0..8).collect(), None, None, Some(&[6, 7, 9]));
        assert_eq!((pinned.workers, pinned.workers_from), (2, WorkersFrom::PinList));
        assert_eq!(
            (pinned.pin_of(0), pinned.pin_of(1), pinned.pin_of(2)),
            (Some(6), Some(7), Some(6))
        );
        let d = pinned.describe();
        assert!(
            d.contains("pinned to CPUs 6-7 in turn") && d.contains("names 9 outside"),
            "{d}"
        );
        assert_eq!(one.min_chunk(), ONE_CPU_MIN_CHUNK);
        assert!(one.describe().contains("at least 512 KiB"), "{}", one.describe());
        assert_eq!(many.min_chunk(), DEFAULT_MIN_CHUNK);
        assert_eq!(
            CpuPlan::new((0..16).collect(), Some(1.5), None, None).min_chunk(),
            ONE_CPU_MIN_CHUNK
        );
        let none_left = CpuPlan::new(vec![0], None, None, Some(&[5]));
        assert_eq!((none_left.workers, none_left.pin_of(0)), (1, None));
    }

    #[test]
    fn workers_poll_only_where_cpus_are_left_for_them() {
        // Unbound on 16 CPUs: 4 workers and NCCL's two threads fit.
        let many = CpuPlan::new((0..16).collect(), None, None, None);
        assert_eq!(many.spin_us(), DEFAULT_SPIN_US);
        assert!(
            many.describe().contains("polling 50 us after traffic"),
            "{}",
            many.describe()
        );
        // One core (mpirun's binding of two ranks), two cores, a quota of 5: the workers would
        // take turns with NCCL's threads.
        for plan in [
            CpuPlan::new(vec![3], None, None, None),
            CpuPlan::new(vec![0, 1], None, None, None),
            CpuPlan::new((0..16).collect(), Some(5.0), None, None),
        ] {
            assert_eq!(plan.spin_us(), 0, "{}", plan.describe());
            assert!(plan.describe().contains("sleeping when idle"), "{}", plan.describe());
        }
        assert_eq!(
            CpuPlan::new((0..16).collect(), Some(6.0), None, None).spin_us(),
            DEFAULT_SPIN_US
        );
        // Driven from the caller: nothing polls.
        assert_eq!(CpuPlan::new((0..16).collect(), None, Some(0), None).spin_us(), 0);
        // The setting wins either way.
        let set = CpuPlan::new(vec![3], None, None, None).with_spin(Some(200));
        assert_eq!(set.spin_us(), 200);
        assert!(set
            .describe()
            .contains("polling 200 us after traffic before sleeping (NCCL_TCPXSHIM_TCP_SPIN)"));
        let off = CpuPlan::new((0..16).collect(), None, None, None).with_spin(Some(0));
        assert_eq!(off.spin_us(), 0);
        assert!(
            off.describe().contains("NCCL_TCPXSHIM_TCP_SPIN=0"),
            "{}",
            off.describe()
        );
    }

    #[test]
    fn this_process_has_an_affinity_mask() {
        let (allowed, _) = discover();
        assert!(!allowed.is_empty());
        let me = super::super::sys::affinity().unwrap();
        assert_eq!(allowed, me);
    }
}
