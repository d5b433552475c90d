//! `tcpxshim`: inspect the transport stack and test connections between two nodes.
//!
//! ```text
//! tcpxshim devices                        # what the stack loaded, one line per device
//! tcpxshim serve [--bind 0.0.0.0:45555]   # node A: wait for a peer, run the test it asks for
//! tcpxshim connect A:45555 [--max-size 64M]  # node B: verify transfers, sweep sizes
//! tcpxshim demo                           # both sides in this process over loopback
//! tcpxshim metrics serve DIR [--listen 0.0.0.0:9464]  # this host's metrics files on /metrics
//! tcpxshim stats DIR [--once]             # this host's ranks and connections, as tables
//! tcpxshim top DIR                        # the same, live
//! tcpxshim drop --pid PID [--every S]     # shut down a process's TCP connections (fault tests)
//! ```

mod bench;
mod drop;
mod metrics;

use bench::{fmt_size, parse_size, Event, Plan, Report, Row, Verified};
use clap::{Args, Parser, Subcommand};
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tcpxshim::config;
use tcpxshim::ffi::{NCCL_PTR_CUDA, NCCL_PTR_DMABUF, NCCL_PTR_HOST};
use tcpxshim::p2p::{self, Endpoint};
use tcpxshim::stack::LoadInfo as StackInfo;
use tcpxshim::transport::{DeviceType, Transport};
use tcpxshim::{Error, Result};

#[derive(Parser, Debug)]
#[command(
    name = "tcpxshim",
    version,
    about = "Inspect the tcpxshim transport stack and test connections between nodes"
)]
struct Cli {
    /// More log output on stderr: -v info, -vv debug, -vvv trace (NCCL_DEBUG=INFO/TRACE also work).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Log level: off, error, warn, info, debug or trace (overrides -v and NCCL_DEBUG).
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<log::LevelFilter>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List the devices of the loaded transport.
    Devices,
    /// Wait for `tcpxshim connect` from another node and run the test it asks for.
    Serve {
        /// Address of the bootstrap socket (port 0: any free port, printed).
        #[arg(long, default_value = "0.0.0.0:45555")]
        bind: SocketAddr,
        /// Transport device to use.
        #[arg(long, default_value_t = 0)]
        dev: i32,
        /// Seconds to wait for the peer to connect.
        #[arg(long, default_value = "300", value_parser = parse_secs, value_name = "SECS")]
        wait: Duration,
        /// Seconds any other step may wait (connection setup, each transfer, each reply).
        #[arg(long, default_value = "30", value_parser = parse_secs, value_name = "SECS")]
        timeout: Duration,
    },
    /// Connect to `tcpxshim serve` at HOST:PORT, verify transfers both ways and sweep message sizes.
    Connect {
        /// The server's bootstrap address, HOST:PORT.
        peer: String,
        /// Transport device to use.
        #[arg(long, default_value_t = 0)]
        dev: i32,
        /// Seconds any step may wait (the server's appearance included).
        #[arg(long, default_value = "30", value_parser = parse_secs, value_name = "SECS")]
        timeout: Duration,
        #[command(flatten)]
        sweep: SweepArgs,
    },
    /// Run serve and connect in this process over 127.0.0.1 (the built-in transport uses `lo`
    /// unless NCCL_TCPXSHIM_TCP_IFNAME or NCCL_SOCKET_IFNAME says otherwise).
    Demo {
        /// Transport device to use on both sides.
        #[arg(long, default_value_t = 0)]
        dev: i32,
        /// Seconds any step may wait.
        #[arg(long, default_value = "30", value_parser = parse_secs, value_name = "SECS")]
        timeout: Duration,
        #[command(flatten)]
        sweep: SweepArgs,
    },
    /// The metrics files in the plugin's metrics directory (one per process).
    Metrics {
        #[command(subcommand)]
        cmd: MetricsCmd,
    },
    /// Tables of a host's ranks and connections from its metrics files: throughput, latency
    /// p50/p99, requests in flight, errors, stalled requests.
    Stats {
        /// The directory the plugin writes its metrics files to.
        dir: PathBuf,
        /// Read the files once: throughput is then bytes over the time since each process
        /// started, latency over all its requests (marked *).
        #[arg(long)]
        once: bool,
        /// Seconds between the two reads that throughput and latency are measured over.
        #[arg(long, default_value = "5", value_parser = parse_secs, value_name = "SECS")]
        interval: Duration,
    },
    /// A live view of a host's ranks and connections from its metrics files (q quits).
    Top {
        /// The directory the plugin writes its metrics files to.
        dir: PathBuf,
        /// Seconds between reads of the files.
        #[arg(long, default_value = "1", value_parser = parse_secs, value_name = "SECS")]
        interval: Duration,
    },
    /// Shut down (both ways) the established TCP connections of another process, as a NIC reset
    /// would, for fault tests. Needs ptrace rights over it (root), Linux 5.6 or later.
    Drop {
        /// The process.
        #[arg(long)]
        pid: u32,
        /// Repeat every SECS seconds (until --count rounds, or the process exits).
        #[arg(long, value_parser = parse_secs, value_name = "SECS")]
        every: Option<Duration>,
        /// Rounds with --every.
        #[arg(long, value_name = "N", requires = "every")]
        count: Option<u64>,
        /// Only connections with one of these local or remote ports.
        #[arg(long, num_args = 1.., value_name = "PORT")]
        filter: Vec<u16>,
    },
}

#[derive(Subcommand, Debug)]
enum MetricsCmd {
    /// Serve every metrics file of DIR as one Prometheus page, /metrics (one endpoint per host).
    Serve {
        /// The directory the plugin writes its metrics files to.
        dir: PathBuf,
        /// Address to listen on, HOST:PORT (port 0: any free port, printed).
        #[arg(long, default_value = "0.0.0.0:9464", value_name = "ADDR")]
        listen: String,
    },
}

/// The test plan (chosen by the connecting side).
#[derive(Args, Debug)]
struct SweepArgs {
    /// Smallest message of the sweep; sizes grow by powers of 4 [default: 8].
    #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
    min_size: Option<usize>,
    /// Largest message of the sweep and the verification, K/M/G suffixes [default: 64M; demo: 16M].
    #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
    max_size: Option<usize>,
    /// Ping-pong iterations for small messages; large ones run fewer, bounded by --bytes [default: 100].
    #[arg(long, value_name = "N")]
    iters: Option<usize>,
    /// Data moved per size in the bandwidth test, bounding the iterations of large messages
    /// [default: 256M; demo: 64M].
    #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
    bytes: Option<usize>,
    /// Messages in flight in the bandwidth test, 1 to 8 [default: 8].
    #[arg(long, value_name = "N")]
    depth: Option<usize>,
    /// Messages per size and direction in the byte-by-byte verification [default: 2].
    #[arg(long, value_name = "N")]
    verify_iters: Option<usize>,
}

impl SweepArgs {
    /// The plan, with the defaults of a real network (`small`: of the loopback demo).
    fn plan(&self, small: bool) -> Result<Plan> {
        let (max, bytes) = if small {
            (16 << 20, 64 << 20)
        } else {
            (64 << 20, 256 << 20)
        };
        Plan::new(
            self.min_size.unwrap_or(8),
            self.max_size.unwrap_or(max),
            self.iters.unwrap_or(100),
            self.bytes.unwrap_or(bytes) as u64,
            self.depth.unwrap_or(8),
            self.verify_iters.unwrap_or(2),
        )
    }
}

fn parse_size_arg(s: &str) -> std::result::Result<usize, String> {
    parse_size(s)
}

fn parse_secs(s: &str) -> std::result::Result<Duration, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v > 0.0 && v <= 86_400.0) {
        return Err(format!("{s:?}: expected 0 < seconds <= 86400"));
    }
    Ok(Duration::from_secs_f64(v))
}

// ---------------------------------------------------------------------------------------------
// Logging: a small stderr logger for the `log` crate.

struct StderrLogger {
    start: Instant,
}

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let t = self.start.elapsed().as_secs_f64();
            let _ = writeln!(
                std::io::stderr().lock(),
                "[{t:8.3}s {:5} {}] {}",
                r.level(),
                r.target(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

fn init_logging(verbose: u8, level: Option<log::LevelFilter>) {
    let from_env = match std::env::var("NCCL_DEBUG").map(|v| v.to_ascii_uppercase()).as_deref() {
        Ok("TRACE") => log::LevelFilter::Trace,
        Ok("INFO") => log::LevelFilter::Info,
        _ => log::LevelFilter::Warn,
    };
    let from_flags = match verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let level = level.unwrap_or(from_env.max(from_flags));
    if log::set_boxed_logger(Box::new(StderrLogger { start: Instant::now() })).is_ok() {
        log::set_max_level(level);
    }
}

// ---------------------------------------------------------------------------------------------
// The transport stack.

/// The stack this command drives: the same one NCCL drives, built from the NCCL_TCPXSHIM_*
/// environment once.
fn load_stack() -> Result<(&'static dyn Transport, StackInfo)> {
    let shim = tcpxshim::stack::global()?;
    Ok((shim, shim.info().clone()))
}

/// The settings that choose devices, as currently set, for error messages.
fn setting_hint() -> String {
    let mut set: Vec<String> = [config::PLUGIN.name, config::TCP_IFNAME.name, "NCCL_SOCKET_IFNAME"]
        .iter()
        .filter_map(|n| config::var(n).map(|v| format!("{n}={v}")))
        .collect();
    if set.is_empty() {
        set.push("none of NCCL_TCPXSHIM_PLUGIN, NCCL_TCPXSHIM_TCP_IFNAME, NCCL_SOCKET_IFNAME is set".into());
    }
    set.join(", ")
}

fn stack() -> Result<(&'static dyn Transport, StackInfo)> {
    let (net, info) = load_stack().map_err(|e| e.context(format!("cannot load the transport ({})", setting_hint())))?;
    if info.devices <= 0 {
        return Err(Error::invalid_argument(format!(
            "transport {} ({}) has no devices ({})",
            info.name,
            info.source,
            setting_hint()
        )));
    }
    Ok((net, info))
}

fn stack_line(info: &StackInfo) -> String {
    let from = match info.abi_version {
        0 => format!("({})", info.source),
        v => format!("from {} (ncclNet v{v})", info.source),
    };
    format!("transport {} {from}: {} device(s)", info.name, info.devices)
}

// ---------------------------------------------------------------------------------------------
// devices

fn ptr_support(p: i32) -> String {
    let mut parts = Vec::new();
    for (bit, name) in [
        (NCCL_PTR_HOST, "HOST"),
        (NCCL_PTR_CUDA, "CUDA"),
        (NCCL_PTR_DMABUF, "DMABUF"),
    ] {
        if p & bit as i32 != 0 {
            parts.push(name.to_string());
        }
    }
    let rest = p & !((NCCL_PTR_HOST | NCCL_PTR_CUDA | NCCL_PTR_DMABUF) as i32);
    if rest != 0 {
        parts.push(format!("{rest:#x}"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join("|")
    }
}

fn device_type(t: DeviceType) -> String {
    match t {
        DeviceType::Host => "HOST".into(),
        DeviceType::Unpack => "UNPACK".into(),
        DeviceType::Other(v) => format!("type {v}"),
    }
}

/// Prints rows as columns, the first row as header.
fn print_table(out: &mut dyn Write, rows: &[Vec<String>], right: &[bool]) -> std::io::Result<()> {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..n)
        .map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.len())).max().unwrap_or(0))
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            if right.get(c).copied().unwrap_or(false) {
                line.push_str(&format!("{cell:>w$}", w = width[c]));
            } else {
                line.push_str(&format!("{cell:<w$}", w = width[c]));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

fn devices_table(out: &mut dyn Write, net: &dyn Transport, info: &StackInfo) -> Result<()> {
    let io = |e| Error::io("write to stdout", e);
    writeln!(out, "{}", stack_line(info)).map_err(io)?;
    let mut rows = vec![[
        "dev",
        "name",
        "pciPath",
        "guid",
        "ptrSupport",
        "speed",
        "port",
        "latency",
        "maxComms",
        "maxRecvs",
        "type",
        "version",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for dev in 0..info.devices {
        let p = net
            .properties(dev)
            .map_err(|e| e.context(format!("properties of device {dev}")))?;
        rows.push(vec![
            dev.to_string(),
            p.name,
            p.pci_path.unwrap_or_else(|| "-".into()),
            format!("{:#x}", p.guid),
            ptr_support(p.ptr_support),
            format!("{} Gbps", p.speed_mbps as f64 / 1000.0),
            p.port.to_string(),
            format!("{} us", p.latency_us),
            p.max_comms.to_string(),
            p.max_recvs.to_string(),
            device_type(p.device_type),
            format!("{:#x}", p.device_version),
        ]);
    }
    let right = [
        true, false, false, true, false, true, true, true, true, true, false, true,
    ];
    print_table(out, &rows, &right).map_err(io)
}

fn cmd_devices() -> Result<()> {
    let (net, info) = stack()?;
    devices_table(&mut std::io::stdout().lock(), net, &info)
}

// ---------------------------------------------------------------------------------------------
// serve / connect / demo

/// Prints the test's progress: a progress line per size on stderr, results on stdout.
struct Printer {
    quiet: bool,
    tty: bool,
    side: &'static str,
}

impl Printer {
    fn new(side: &'static str, quiet: bool) -> Printer {
        Printer {
            quiet,
            tty: std::io::stderr().is_terminal(),
            side,
        }
    }

    fn event(&mut self, e: Event<'_>) {
        if self.quiet {
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = match e {
            Event::Plan(p) => print_plan(&mut out, p),
            Event::Verified(v) => print_verified(&mut out, v),
            Event::SizeStart { index, total, size } => {
                self.progress(index, total, size);
                Ok(())
            }
            Event::Row(r) => {
                if self.tty {
                    let _ = write!(std::io::stderr().lock(), "\r\x1b[K");
                }
                print_row(&mut out, r)
            }
        };
        let _ = out.flush();
    }

    /// The progress line on stderr: rewritten in place on a terminal, one line per size otherwise.
    fn progress(&self, index: usize, total: usize, size: usize) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r[{}] {index}/{total}: {} ...\x1b[K", self.side, fmt_size(size));
        } else {
            let _ = writeln!(err, "[{}] sweep {index}/{total}: {}", self.side, fmt_size(size));
        }
        let _ = err.flush();
    }
}

fn print_plan(out: &mut dyn Write, p: &Plan) -> std::io::Result<()> {
    writeln!(
        out,
        "test plan: verify {} sizes ({}..{}) x {} messages each way, then sweep {} sizes {}..{}: {} \
         ping-pong iterations (fewer for large sizes), bandwidth with {} in flight",
        p.verify_sizes.len(),
        fmt_size(*p.verify_sizes.first().unwrap_or(&0)),
        fmt_size(p.max_size()),
        p.verify_iters,
        p.sizes.len(),
        fmt_size(*p.sizes.first().unwrap_or(&0)),
        fmt_size(*p.sizes.last().unwrap_or(&0)),
        p.iters,
        p.depth
    )
}

/// The verification's result and the sweep table's header.
fn print_verified(out: &mut dyn Write, v: &Verified) -> std::io::Result<()> {
    writeln!(
        out,
        "verified: {} messages of {} sizes, {} checked byte by byte, both directions: OK",
        v.messages,
        v.sizes,
        fmt_size(v.bytes as usize)
    )?;
    writeln!(
        out,
        "sweep: latency is half a ping-pong round trip; bandwidth is one way, pipelined, timed to the \
         receiver's acknowledgement"
    )?;
    writeln!(
        out,
        "{:>10}  {:>10}  {:>6}  {:>9}  {:>6}  {:>6}",
        "size", "lat(us)", "iters", "GB/s", "msgs", "depth"
    )
}

fn print_row(out: &mut dyn Write, r: &Row) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>10}  {:>10.2}  {:>6}  {:>9}  {:>6}  {:>6}",
        fmt_size(r.size),
        r.lat_us,
        r.lat_iters,
        fmt_gbps(r.gbps),
        r.bw_msgs,
        r.depth
    )
}

/// GB/s with precision for small values too.
fn fmt_gbps(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.2}")
    } else if v >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.5}")
    }
}

fn summary(report: &Report) -> String {
    let best_bw = report.rows.iter().max_by(|a, b| a.gbps.total_cmp(&b.gbps));
    let best_lat = report.rows.iter().min_by(|a, b| a.lat_us.total_cmp(&b.lat_us));
    let mut s = format!(
        "PASS: {} messages ({}) verified byte by byte in both directions",
        report.verified.messages,
        fmt_size(report.verified.bytes as usize)
    );
    if let (Some(bw), Some(lat)) = (best_bw, best_lat) {
        s.push_str(&format!(
            "; {} sizes swept; peak {} GB/s at {}; lowest latency {:.2} us at {}",
            report.rows.len(),
            fmt_gbps(bw.gbps),
            fmt_size(bw.size),
            lat.lat_us,
            fmt_size(lat.size)
        ));
    }
    s
}

fn connected_line(ep: &Endpoint<'_>, took: Duration) -> String {
    format!(
        "connected to {} in {:.0} ms (local device {}, peer has {} device(s))",
        ep.peer(),
        took.as_secs_f64() * 1e3,
        ep.send_conn().dev(),
        ep.peer().ndev
    )
}

fn server_side(
    net: &dyn Transport,
    server: &p2p::Server,
    dev: i32,
    wait: Duration,
    timeout: Duration,
    quiet: bool,
) -> Result<Report> {
    let start = Instant::now();
    let ep = server.accept_within(net, dev, wait, timeout)?;
    if !quiet {
        println!("{}", connected_line(&ep, start.elapsed()));
    }
    let mut printer = Printer::new("serve", quiet);
    bench::run_server(&ep, timeout, &mut |e| printer.event(e))
}

fn client_side(net: &dyn Transport, peer: &str, dev: i32, timeout: Duration, plan: &Plan) -> Result<Report> {
    let start = Instant::now();
    let ep = p2p::connect_to(net, dev, peer, timeout)?;
    println!("{}", connected_line(&ep, start.elapsed()));
    let mut printer = Printer::new("connect", false);
    bench::run_client(&ep, plan, timeout, &mut |e| printer.event(e))
}

fn cmd_serve(bind: SocketAddr, dev: i32, wait: Duration, timeout: Duration) -> Result<()> {
    let (net, info) = stack()?;
    println!("{}", stack_line(&info));
    let server = p2p::Server::bind(bind)?;
    println!(
        "listening on {} (device {dev}); run `tcpxshim connect HOST:{}` on the other node",
        server.local_addr(),
        server.local_addr().port()
    );
    let report = server_side(net, &server, dev, wait, timeout, false)?;
    println!("{}", summary(&report));
    Ok(())
}

fn cmd_connect(peer: &str, dev: i32, timeout: Duration, sweep: &SweepArgs) -> Result<()> {
    let plan = sweep.plan(false)?;
    let (net, info) = stack()?;
    println!("{}", stack_line(&info));
    let report = client_side(net, peer, dev, timeout, &plan)?;
    println!("{}", summary(&report));
    Ok(())
}

fn cmd_demo(dev: i32, timeout: Duration, sweep: &SweepArgs) -> Result<()> {
    let plan = sweep.plan(true)?;
    let start = Instant::now();
    let (net, info) = stack()?;
    devices_table(&mut std::io::stdout().lock(), net, &info)?;
    let server = p2p::Server::bind("127.0.0.1:0".parse().expect("valid address"))?;
    let addr = server.local_addr().to_string();
    println!("demo: serve on {addr} and connect to it, device {dev}, both in this process");
    let (client, srv) = std::thread::scope(|s| {
        let srv = s.spawn(|| server_side(net, &server, dev, timeout, timeout, true));
        let client = client_side(net, &addr, dev, timeout, &plan);
        let srv = srv
            .join()
            .unwrap_or_else(|_| Err(Error::internal("the serve thread panicked")));
        (client, srv)
    });
    // The client's error names the cause; the server's adds only where the client succeeded.
    let report = client?;
    srv.map_err(|e| e.context("serve side"))?;
    println!(
        "{} (demo took {:.1} s)",
        summary(&report),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread exists: the demo runs over loopback, so unless told otherwise it uses the
    // built-in transport (TCPX cannot run over loopback) on `lo`.
    if matches!(cli.cmd, Cmd::Demo { .. }) {
        if config::var(config::PLUGIN.name).is_none() {
            std::env::set_var(config::PLUGIN.name, "builtin");
        }
        if config::var(config::TCP_IFNAME.name).is_none() && config::var("NCCL_SOCKET_IFNAME").is_none() {
            std::env::set_var(config::TCP_IFNAME.name, "lo");
        }
    }
    init_logging(cli.verbose, cli.log_level);
    let res = match &cli.cmd {
        Cmd::Devices => cmd_devices(),
        Cmd::Serve {
            bind,
            dev,
            wait,
            timeout,
        } => cmd_serve(*bind, *dev, *wait, *timeout),
        Cmd::Connect {
            peer,
            dev,
            timeout,
            sweep,
        } => cmd_connect(peer, *dev, *timeout, sweep),
        Cmd::Demo { dev, timeout, sweep } => cmd_demo(*dev, *timeout, sweep),
        Cmd::Metrics {
            cmd: MetricsCmd::Serve { dir, listen },
        } => metrics::serve::run(dir, listen),
        Cmd::Stats { dir, once, interval } => metrics::stats::run(dir, *once, *interval),
        Cmd::Top { dir, interval } => metrics::top::run(dir, *interval),
        Cmd::Drop {
            pid,
            every,
            count,
            filter,
        } => drop::run(*pid, *every, *count, filter),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("tcpxshim: error: {e}");
            ExitCode::FAILURE
        }
    }
}
