//! The CPUs the built-in transport may use, and its I/O plan to match.
//!
//! A rank started by mpirun with its default binding may run on one core (two ranks) or one
//! socket; a container may have a CPU quota. Both are read at start: the affinity mask of the
//! process (`sched_getaffinity`) and the cgroup's quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` /
//! `cpu.cfs_period_us`, along the process's cgroup path up to the root); and whether other ranks
//! of the host run on the same CPUs (the launcher's count of the host's ranks against the online
//! CPUs), which makes the rank's share smaller. Unless `NCCL_TCPXSHIM_TCP_WORKERS` says otherwise,
//! the transport starts one I/O worker per CPU of the share beyond [`NCCL_BUSY_THREADS`], at least
//! one, at most [`MAX_DEFAULT_WORKERS`]: more would only take turns with NCCL's threads (and the
//! other ranks') on the same cores. `NCCL_TCPXSHIM_TCP_CPUS` pins the workers, one CPU each in
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
/// CPUs a rank's own NCCL threads keep busy besides the I/O workers: the proxy thread, which tests
/// every request, and the application's thread waiting on the GPU (nccl-tests and PyTorch spin in
/// `cudaStreamQuery`). The workers get what is left of the rank's CPUs.
pub const NCCL_BUSY_THREADS: usize = 2;
/// Variables naming how many ranks of the job run on this host, in the order they are tried:
/// torchrun's, Open MPI's, MPICH's (Hydra), Slurm's (with `--ntasks-per-node`).
pub const LOCAL_SIZE_VARS: &[&str] = &[
    "LOCAL_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_SIZE",
    "MPI_LOCALNRANKS",
    "SLURM_NTASKS_PER_NODE",
];
/// Highest CPU number a mask here can hold (glibc's CPU_SETSIZE).
pub const MAX_CPU: usize = 1023;

/// Where the number of workers came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkersFrom {
    /// `NCCL_TCPXSHIM_TCP_WORKERS`.
    Setting,
    /// One per CPU of `NCCL_TCPXSHIM_TCP_CPUS` that the process may use.
    PinList,
    /// Planned from the rank's share of the CPUs (see [`CpuPlan::share`]).
    Usable,
}

/// The ranks of the job on this host, as the launcher says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalRanks {
    pub count: usize,
    /// The variable that said so.
    pub var: &'static str,
}

impl LocalRanks {
    /// The first of [`LOCAL_SIZE_VARS`] that holds a number from 1 to 4096.
    pub fn from_vars(vars: crate::config::Vars<'_>) -> Option<LocalRanks> {
        LOCAL_SIZE_VARS.iter().find_map(|&var| {
            let count: usize = vars(var)?.trim().parse().ok()?;
            (1..=4096).contains(&count).then_some(LocalRanks { count, var })
        })
    }
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
    /// The job's ranks on this host, if the launcher says (see [`CpuPlan::sharing`]).
    pub local: Option<LocalRanks>,
    /// CPUs online on this host (`None`: unknown).
    pub online: Option<usize>,
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
            local: None,
            online: None,
        };
        (plan.workers, plan.workers_from) = match workers {
            Some(n) => (n, WorkersFrom::Setting),
            None if !plan.pins.is_empty() => (plan.pins.len().min(64), WorkersFrom::PinList),
            None => (plan.planned_workers(), WorkersFrom::Usable),
        };
        plan
    }

    /// With the host's ranks and online CPUs, which tell whether other ranks share the mask; the
    /// planned number of workers follows (see [`CpuPlan::share`]).
    pub fn with_host(mut self, local: Option<LocalRanks>, online: Option<usize>) -> CpuPlan {
        self.local = local;
        self.online = online;
        if self.workers_from == WorkersFrom::Usable {
            self.workers = self.planned_workers();
        }
        self
    }

    /// Ranks of this host that run on the same CPUs as this one: where the host's ranks' masks
    /// together hold more CPUs than the host has, they overlap (unbound ranks, or ranks bound to
    /// one socket), spread evenly as far as this process can tell. 1 without the launcher's count
    /// or the online CPUs.
    pub fn sharing(&self) -> usize {
        match (&self.local, self.online) {
            (Some(l), Some(online)) if l.count > 1 && online > 0 && !self.allowed.is_empty() => {
                (l.count * self.allowed.len()).div_ceil(online).clamp(1, l.count)
            }
            _ => 1,
        }
    }

    /// This rank's share of the usable CPUs.
    pub fn share(&self) -> f64 {
        self.usable() / self.sharing() as f64
    }

    /// One worker per CPU of the rank's share beyond [`NCCL_BUSY_THREADS`], at least one, at
    /// most [`MAX_DEFAULT_WORKERS`]: a worker more would take turns with NCCL's threads or
    /// another rank's (4 ranks on 16 cores: all-reduce 5.2 to 5.8 GB/s with 2 workers each
    /// against 3.6 to 3.7 with 4, docs/design.md).
    fn planned_workers(&self) -> usize {
        (self.share().floor() as usize)
            .saturating_sub(NCCL_BUSY_THREADS)
            .clamp(1, MAX_DEFAULT_WORKERS)
    }

    /// The smallest striping chunk the plan asks for (see [`ONE_CPU_MIN_CHUNK`]).
    pub fn min_chunk(&self) -> usize {
        if self.share() < 2.0 {
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

    /// Microseconds a worker keeps polling its sockets after traffic before it sleeps
    /// (`NCCL_TCPXSHIM_TCP_SPIN`; 0, sleeping at once, unless set). A polling worker needs no
    /// wake-up for the next message (an eventfd write by NCCL's proxy thread, an inter-processor
    /// interrupt on a virtual machine) and sees arriving data without the scheduler's delay, but
    /// it keeps a CPU busy: measured under nccl-tests it gained within the spread between runs
    /// with CPUs to spare and lost where ranks shared them (docs/design.md).
    pub fn spin_us(&self) -> u64 {
        self.spin_set.unwrap_or(0)
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
        if let (n @ 2.., Some(l)) = (self.sharing(), &self.local) {
            let share = self.share();
            let _ = write!(
                s,
                ", shared by {n} of the host's {} ranks ({}={})",
                l.count, l.var, l.count
            );
            if share.fract() == 0.0 {
                let _ = write!(s, ": {share} each");
            } else {
                let _ = write!(s, ": {share:.2} each");
            }
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
                WorkersFrom::Usable => {
                    "one per CPU left by NCCL's two busy threads, 1 to 4; NCCL_TCPXSHIM_TCP_WORKERS sets it"
                }
            }
        );
        if self.pins.is_empty() {
            s.push_str(", not pinned (NCCL_TCPXSHIM_TCP_CPUS pins them)");
        } else {
            let _ = write!(s, ", pinned to CPUs {} in turn", cpu_list(&self.pins));
        }
        if self.spin_us() > 0 {
            let _ = write!(
                s,
                ", polling {} us after traffic before sleeping (NCCL_TCPXSHIM_TCP_SPIN)",
                self.spin_us()
            );
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
        if self.share() < 2.0 && self.workers > 1 && self.pins.is_empty() {
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

/// CPUs online on this host (`/sys/devices/system/cpu/online`); `None` if unreadable.
pub fn online_cpus() -> Option<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    parse_cpu_list("/sys/devices/system/cpu/online", text.trim())
        .ok()
        .map(|v| v.len())
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
        assert_eq!(quota.workers, 1);
        assert_eq!(CpuPlan::new((0..16).collect(), Some(4.0), None, None).workers, 2);
        assert_eq!(CpuPlan::new((0..16).collect(), Some(5.5), None, None).workers, 3);
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
    fn ranks_sharing_the_cpus_split_them() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let four = LocalRanks::from_vars(&vars(&[("OMPI_COMM_WORLD_LOCAL_SIZE", "4")])).unwrap();
        assert_eq!(
            four,
            LocalRanks {
                count: 4,
                var: "OMPI_COMM_WORLD_LOCAL_SIZE"
            }
        );
        // torchrun's variable first; nonsense is skipped.
        let l = LocalRanks::from_vars(&vars(&[("LOCAL_WORLD_SIZE", "8"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "4")]));
        assert_eq!(l.unwrap().count, 8);
        let l = LocalRanks::from_vars(&vars(&[("LOCAL_WORLD_SIZE", "x"), ("SLURM_NTASKS_PER_NODE", "2")]));
        assert_eq!(
            l.unwrap(),
            LocalRanks {
                count: 2,
                var: "SLURM_NTASKS_PER_NODE"
            }
        );
        assert_eq!(LocalRanks::from_vars(&vars(&[("MPI_LOCALNRANKS", "0")])), None);

        // Four unbound ranks on 16 CPUs: 4 each, 2 of them for workers.
        let unbound = CpuPlan::new((0..16).collect(), None, None, None).with_host(Some(four.clone()), Some(16));
        assert_eq!((unbound.sharing(), unbound.share(), unbound.workers), (4, 4.0, 2));
        let d = unbound.describe();
        assert!(
            d.contains("(affinity 0-15, no cgroup quota), shared by 4 of the host's 4 ranks (OMPI_COMM_WORLD_LOCAL_SIZE=4): 4 each: 2 I/O worker(s)"),
            "{d}"
        );
        // Two unbound ranks: 8 each, as many workers as one process alone gets.
        let two = LocalRanks {
            count: 2,
            var: "LOCAL_WORLD_SIZE",
        };
        let p = CpuPlan::new((0..16).collect(), None, None, None).with_host(Some(two), Some(16));
        assert_eq!((p.sharing(), p.workers), (2, 4));
        // Bound to one core each (mpirun's default for two ranks): nothing shared.
        let bound = CpuPlan::new(vec![1], None, None, None).with_host(Some(four.clone()), Some(16));
        assert_eq!((bound.sharing(), bound.workers), (1, 1));
        assert!(!bound.describe().contains("shared by"), "{}", bound.describe());
        // Four ranks, two sockets of 8, two ranks per socket mask.
        let socket = CpuPlan::new((8..16).collect(), None, None, None).with_host(Some(four.clone()), Some(16));
        assert_eq!((socket.sharing(), socket.workers), (2, 2));
        // Sixteen ranks on 16 CPUs: one each, one worker, large pieces.
        let sixteen = LocalRanks {
            count: 16,
            var: "LOCAL_WORLD_SIZE",
        };
        let p = CpuPlan::new((0..16).collect(), None, None, None).with_host(Some(sixteen), Some(16));
        assert_eq!((p.share(), p.workers, p.min_chunk()), (1.0, 1, ONE_CPU_MIN_CHUNK));
        // The setting wins; without the online count nothing is divided.
        let set = CpuPlan::new((0..16).collect(), None, Some(4), None).with_host(Some(four.clone()), Some(16));
        assert_eq!(set.workers, 4);
        let unknown = CpuPlan::new((0..16).collect(), None, None, None).with_host(Some(four), None);
        assert_eq!((unknown.sharing(), unknown.workers), (1, 4));
        assert!(online_cpus().is_some_and(|n| n >= 1));
    }

    #[test]
    fn workers_poll_only_when_the_setting_says_so() {
        let many = CpuPlan::new((0..16).collect(), None, None, None);
        assert_eq!(many.spin_us(), 0);
        assert!(!many.describe().contains("polling"), "{}", many.describe());
        let set = CpuPlan::new(vec![3], None, None, None).with_spin(Some(200));
        assert_eq!(set.spin_us(), 200);
        assert!(set
            .describe()
            .contains("polling 200 us after traffic before sleeping (NCCL_TCPXSHIM_TCP_SPIN)"));
    }

    #[test]
    fn this_process_has_an_affinity_mask() {
        let (allowed, _) = discover();
        assert!(!allowed.is_empty());
        let me = super::super::sys::affinity().unwrap();
        assert_eq!(allowed, me);
    }
}
