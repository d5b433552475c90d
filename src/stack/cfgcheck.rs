//! The settings check between peers (`NCCL_TCPXSHIM_CONFIG_CHECK`).
//!
//! Some settings must have the same value on both ends of a connection: the wire protocol of
//! the inner transport depends on them. The listening side offers its values on its control
//! service (GET_SETTINGS, `control::settings`) under the id and secret of the handle it writes
//! (flag [`FLAG_SETTINGS`](super::handle::FLAG_SETTINGS)); the connecting side fetches them on a
//! thread of its own while the inner connect proceeds, and compares them with its own before
//! connect returns the comm (or an error): each difference is named with both values
//! (`NCCL_TCPXSHIM_TCP_STREAMS: here 4, peer 8`) in one WARN line per connection, or, under
//! `enforce`, in the error that fails the connect.
//!
//! What is compared, always: the tcpxshim version and the inner transport's name. Then, by the
//! inner transport:
//!
//! | inner | setting | why it must agree |
//! |---|---|---|
//! | built-in | `NCCL_TCPXSHIM_TCP_STREAMS` | data sockets per connection: the connecting side opens as many as the listener expects (the transport refuses a mismatch itself, after this WARN) |
//! | built-in | `NCCL_TCPXSHIM_TCP_INLINE` | which messages travel on the control socket; both ends derive the path of a message from it (refused by the transport too) |
//! | TCPX | `NCCL_GPUDIRECTTCPX_SOCKET_IFNAME` | TCPX's NICs, one device each: NCCL pairs devices by index |
//! | TCPX | `NCCL_SOCKET_NTHREADS`, `NCCL_NSOCKS_PERTHREAD` | TCPX's data sockets per connection (threads x sockets per thread) |
//! | TCPX | `NCCL_DYNAMIC_CHUNK_SIZE` | the sender's chunk size; the receiver sizes its bounce buffers with its own value |
//! | TCPX | `NCCL_GPUDIRECTTCPX_RECV_SYNC` | whether each request is synchronised over the control socket: a protocol step both ends must take |
//!
//! Not compared: settings that stay local (`NCCL_TCPXSHIM_TCP_MIN_CHUNK`: the message header
//! carries the sender's chunk; worker counts; `NCCL_GPUDIRECTTCPX_UNIX_CLIENT_PREFIX`, the
//! local RxDM socket path; port ranges, bindings, telemetry). The built-in transport's values
//! are compared as it uses them (an unset variable is its default); TCPX's raw, with `(unset)`
//! for a variable that is not set, since only TCPX knows its defaults.
//!
//! A peer's verdict is kept per control service (one per process), so a job's many connections
//! to one peer cost one fetch; a peer whose service cannot be reached is reported once.

use super::handle::{Trailer, FLAG_SETTINGS};
use crate::config::{get, Vars, CONFIG_CHECK, TCP_INLINE, TCP_STREAMS};
use crate::control::settings::{self, Entries};
use crate::error::{Error, Result};
use crate::lock;
use crate::tcp::TcpConfig;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// What NCCL_TCPXSHIM_CONFIG_CHECK asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckMode {
    /// No check: no settings offered, none fetched.
    Off,
    /// Differences are reported in a WARN line; the connect goes on.
    Warn,
    /// Differences fail the connect (ncclInvalidUsage).
    Enforce,
}

impl CheckMode {
    /// Reads NCCL_TCPXSHIM_CONFIG_CHECK from `vars`.
    pub fn from_vars(vars: Vars<'_>) -> Result<CheckMode> {
        match get(vars, CONFIG_CHECK.name).as_deref().unwrap_or(CONFIG_CHECK.default) {
            "off" => Ok(CheckMode::Off),
            "warn" => Ok(CheckMode::Warn),
            "enforce" => Ok(CheckMode::Enforce),
            v => Err(Error::invalid_argument(format!(
                "{}={v:?} is not `off`, `warn` or `enforce`",
                CONFIG_CHECK.name
            ))),
        }
    }
}

/// Name under which the tcpxshim version is compared.
pub const VERSION_KEY: &str = "tcpxshim version";
/// Name under which the inner transport's name is compared.
pub const TRANSPORT_KEY: &str = "inner transport";
/// TCPX's variables that must agree between peers (see the module documentation).
pub const TCPX_CHECKED: &[&str] = &[
    "NCCL_GPUDIRECTTCPX_SOCKET_IFNAME",
    "NCCL_SOCKET_NTHREADS",
    "NCCL_NSOCKS_PERTHREAD",
    "NCCL_DYNAMIC_CHUNK_SIZE",
    "NCCL_GPUDIRECTTCPX_RECV_SYNC",
];
/// How a variable that is not set is shown.
pub const UNSET: &str = "(unset)";
/// The built-in transport's name (`TcpTransport::name`).
const BUILTIN_NAME: &str = "tcpxshim";

/// The raw values of the checked variables that are not the shim's own, read with the rest of
/// the [`Config`](crate::config::Config). (The built-in transport's are taken from its
/// [`TcpConfig`] when the stack is built: the values it really uses.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSettings {
    /// TCPX's, raw ([`UNSET`] when not set), in the order of [`TCPX_CHECKED`].
    pub tcpx: Entries,
}

impl PeerSettings {
    /// The checked variables of `vars`.
    pub fn from_vars(vars: Vars<'_>) -> PeerSettings {
        PeerSettings {
            tcpx: TCPX_CHECKED
                .iter()
                .map(|n| (n.to_string(), get(vars, n).unwrap_or_else(|| UNSET.to_string())))
                .collect(),
        }
    }

    /// What a stack over the inner transport `inner` offers and compares: the version, the
    /// transport's name, and the settings of that transport (`tcp`: the built-in one's).
    pub fn offered(&self, inner: &str, tcp: &TcpConfig) -> Entries {
        let mut e = vec![
            (VERSION_KEY.to_string(), env!("CARGO_PKG_VERSION").to_string()),
            (TRANSPORT_KEY.to_string(), inner.to_string()),
        ];
        if inner == BUILTIN_NAME {
            e.push((TCP_STREAMS.name.to_string(), tcp.streams.to_string()));
            e.push((TCP_INLINE.name.to_string(), tcp.inline_max.to_string()));
        } else if super::retry::is_tcpx(inner) {
            e.extend(self.tcpx.iter().cloned());
        }
        e
    }
}

/// Each setting both lists name with different values, as `NAME: here A, peer B`.
pub fn differences(here: &Entries, peer: &Entries) -> Vec<String> {
    here.iter()
        .filter_map(|(name, mine)| {
            let (_, theirs) = peer.iter().find(|(n, _)| n == name)?;
            (theirs != mine).then(|| format!("{name}: here {mine}, peer {theirs}"))
        })
        .collect()
}

/// The outcome of one check with one peer's control service.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verdict {
    Agree,
    Differ(Vec<String>),
    /// The settings could not be fetched: why.
    Unchecked(String),
}

#[derive(Default)]
struct Slot {
    verdict: Mutex<Option<Verdict>>,
    ready: Condvar,
}

/// A check in progress for one connect (one handle buffer).
struct Check {
    conn_id: u32,
    secret: u64,
    addr: SocketAddr,
    slot: Arc<Slot>,
    /// The verdict came from the cache of an earlier connection to this peer.
    cached: bool,
    started: Instant,
    touched: Instant,
}

/// Checks of connections that are not finished after this long are dropped.
const ABANDON_AFTER: Duration = Duration::from_secs(60);
/// At most this many connects are tracked.
const MAX_CHECKS: usize = 4096;

/// Counts of finished checks, for tests and the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Connections whose peer's settings were compared.
    pub compared: u64,
    /// Of those, connections with differences.
    pub differed: u64,
    /// Connections whose peer's settings could not be fetched.
    pub unchecked: u64,
    /// Connections to a peer that offers no settings (an older tcpxshim, or the check off there).
    pub not_offered: u64,
}

/// The connecting side of the check.
pub struct Checker {
    mode: CheckMode,
    here: Entries,
    body: Arc<Vec<u8>>,
    timeout: Duration,
    cache: Arc<Mutex<HashMap<SocketAddr, Verdict>>>,
    checks: Mutex<HashMap<usize, Check>>,
    noted_not_offered: AtomicBool,
    compared: AtomicU64,
    differed: AtomicU64,
    unchecked: AtomicU64,
    not_offered: AtomicU64,
}

impl Checker {
    /// The check `mode` asks for, comparing `settings` as offered over the inner transport `inner`.
    pub fn new(cfg: &crate::config::Config, inner: &str) -> Checker {
        let mode = cfg.config_check;
        let here = cfg.peer_settings.offered(inner, &cfg.tcp);
        Checker {
            mode,
            body: Arc::new(settings::encode_body(&here)),
            here,
            timeout: settings::FETCH_TIMEOUT,
            cache: Arc::default(),
            checks: Mutex::new(HashMap::new()),
            noted_not_offered: AtomicBool::new(false),
            compared: AtomicU64::new(0),
            differed: AtomicU64::new(0),
            unchecked: AtomicU64::new(0),
            not_offered: AtomicU64::new(0),
        }
    }

    /// Whether the check is on (the listening side then offers its settings).
    pub fn on(&self) -> bool {
        self.mode != CheckMode::Off
    }

    /// The encoded settings this side offers.
    pub fn body(&self) -> Arc<Vec<u8>> {
        self.body.clone()
    }

    /// Counts of finished checks.
    pub fn stats(&self) -> CheckStats {
        CheckStats {
            compared: self.compared.load(Ordering::Relaxed),
            differed: self.differed.load(Ordering::Relaxed),
            unchecked: self.unchecked.load(Ordering::Relaxed),
            not_offered: self.not_offered.load(Ordering::Relaxed),
        }
    }

    /// A connect() call for the handle at address `key` with trailer `t` begins: starts the
    /// check on its first call (in the background), finds it on later ones.
    pub fn begin(&self, key: usize, t: &Trailer) {
        if !self.on() {
            return;
        }
        let Some(addr) = t.ctrl_socket().filter(|_| t.flags & FLAG_SETTINGS != 0) else {
            return;
        };
        let mut checks = lock(&self.checks);
        if let Some(c) = checks.get_mut(&key) {
            if (c.conn_id, c.secret) == (t.conn_id, t.secret) {
                c.touched = Instant::now();
                return;
            }
        }
        checks.retain(|_, c| c.touched.elapsed() < ABANDON_AFTER);
        if checks.len() >= MAX_CHECKS {
            return; // unchecked rather than unbounded; finish() treats it as not offered
        }
        let slot = Arc::new(Slot::default());
        let cached = lock(&self.cache).get(&addr).cloned();
        let from_cache = cached.is_some();
        match cached {
            Some(v) => *lock(&slot.verdict) = Some(v),
            None => self.spawn_fetch(addr, t, slot.clone()),
        }
        let now = Instant::now();
        checks.insert(
            key,
            Check {
                conn_id: t.conn_id,
                secret: t.secret,
                addr,
                slot,
                cached: from_cache,
                started: now,
                touched: now,
            },
        );
    }

    fn spawn_fetch(&self, addr: SocketAddr, t: &Trailer, slot: Arc<Slot>) {
        let req = settings::Request {
            id: t.conn_id,
            secret: t.secret,
        };
        let here = self.here.clone();
        let cache = self.cache.clone();
        let timeout = self.timeout;
        let failed = slot.clone();
        let work = move || {
            let v = match settings::fetch(addr, req, timeout) {
                Ok(peer) => match differences(&here, &peer) {
                    d if d.is_empty() => Verdict::Agree,
                    d => Verdict::Differ(d),
                },
                Err(e) => Verdict::Unchecked(e.to_string()),
            };
            lock(&cache).insert(addr, v.clone());
            *lock(&slot.verdict) = Some(v);
            slot.ready.notify_all();
        };
        if let Err(e) = std::thread::Builder::new().name("tcpxshim-cfgck".into()).spawn(work) {
            *lock(&failed.verdict) = Some(Verdict::Unchecked(format!("no thread to fetch them: {e}")));
        }
    }

    /// connect() is about to return (a comm or an error) for the handle at `key`: waits for the
    /// verdict (at most the control service's time limit since the check began), reports it, and
    /// under `enforce` returns the error that must fail the connect.
    pub fn finish(&self, key: usize, t: &Trailer) -> Result<()> {
        if !self.on() {
            return Ok(());
        }
        let Some(c) = lock(&self.checks).remove(&key) else {
            self.note_not_offered(t);
            return Ok(());
        };
        let peer = format!("peer {} (its control service {})", c.addr.ip(), c.addr);
        let deadline = c.started + self.timeout;
        let mut v = lock(&c.slot.verdict);
        while v.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            v = c.slot.ready.wait_timeout(v, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        let verdict = v.clone();
        drop(v);
        match verdict {
            Some(Verdict::Agree) => {
                self.compared.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Some(Verdict::Differ(d)) => {
                self.compared.fetch_add(1, Ordering::Relaxed);
                self.differed.fetch_add(1, Ordering::Relaxed);
                let what = format!(
                    "connect to {peer}: settings that must agree between ranks differ: {}",
                    d.join("; ")
                );
                if self.mode == CheckMode::Enforce {
                    return Err(Error::invalid_usage(format!(
                        "{what}; {}=enforce refuses the connection (set them alike on every rank, or {}=warn)",
                        CONFIG_CHECK.name, CONFIG_CHECK.name
                    )));
                }
                log::warn!(
                    "{what} (set them alike on every rank; {}=enforce makes this an error, =off skips the check)",
                    CONFIG_CHECK.name
                );
                Ok(())
            }
            Some(Verdict::Unchecked(why)) => {
                self.unchecked.fetch_add(1, Ordering::Relaxed);
                if !c.cached {
                    log::warn!(
                        "connect to {peer}: settings not compared with the peer's ({why}); going on (reported once per \
                         peer; {}=off skips the check)",
                        CONFIG_CHECK.name
                    );
                }
                Ok(())
            }
            None => {
                self.unchecked.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "connect to {peer}: settings not compared with the peer's (no answer within {} s); going on \
                     ({}=off skips the check)",
                    self.timeout.as_secs(),
                    CONFIG_CHECK.name
                );
                Ok(())
            }
        }
    }

    fn note_not_offered(&self, t: &Trailer) {
        if t.flags & FLAG_SETTINGS != 0 {
            return; // offered, but over the tracking cap
        }
        self.not_offered.fetch_add(1, Ordering::Relaxed);
        if !self.noted_not_offered.swap(true, Ordering::Relaxed) {
            log::info!(
                "connect: the peer offers no settings to compare (an older tcpxshim, or {}=off there); not checked \
                 (said once)",
                CONFIG_CHECK.name
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cfg(pairs: &[(&str, &str)]) -> Config {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_vars(&|k| m.get(k).cloned()).unwrap()
    }

    fn offered(c: &Config, inner: &str) -> Entries {
        c.peer_settings.offered(inner, &c.tcp)
    }

    #[test]
    fn the_mode_defaults_to_warn_and_rejects_other_words() {
        assert_eq!(Config::default().config_check, CheckMode::Warn);
        assert_eq!(cfg(&[(CONFIG_CHECK.name, "enforce")]).config_check, CheckMode::Enforce);
        assert_eq!(cfg(&[(CONFIG_CHECK.name, " off ")]).config_check, CheckMode::Off);
        let m: HashMap<&str, &str> = [(CONFIG_CHECK.name, "strict")].into();
        let e = Config::from_vars(&|k| m.get(k).map(|v| v.to_string()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("NCCL_TCPXSHIM_CONFIG_CHECK=\"strict\""), "{e}");
    }

    #[test]
    fn each_transport_offers_its_own_settings() {
        let c = cfg(&[
            ("NCCL_TCPXSHIM_TCP_STREAMS", "8"),
            ("NCCL_DYNAMIC_CHUNK_SIZE", "524288"),
        ]);
        let names = |e: &Entries| e.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let b = offered(&c, "tcpxshim");
        assert_eq!(
            names(&b),
            [
                VERSION_KEY,
                TRANSPORT_KEY,
                "NCCL_TCPXSHIM_TCP_STREAMS",
                "NCCL_TCPXSHIM_TCP_INLINE"
            ]
        );
        assert_eq!(b[2].1, "8");
        assert_eq!(b[3].1, "16384", "an unset built-in setting is its default");
        let t = offered(&c, "GPUDirectTCPX_v7");
        assert_eq!(t.len(), 2 + TCPX_CHECKED.len());
        assert!(t.contains(&("NCCL_DYNAMIC_CHUNK_SIZE".to_string(), "524288".to_string())));
        assert!(t.contains(&("NCCL_SOCKET_NTHREADS".to_string(), UNSET.to_string())));
        assert_eq!(offered(&c, "Other_v7").len(), 2, "version and name only");
    }

    #[test]
    fn differences_name_both_values_of_what_both_sides_list() {
        let here = offered(&cfg(&[("NCCL_TCPXSHIM_TCP_STREAMS", "4")]), "tcpxshim");
        let mut peer = offered(&cfg(&[("NCCL_TCPXSHIM_TCP_STREAMS", "8")]), "tcpxshim");
        assert_eq!(differences(&here, &here), Vec::<String>::new());
        assert_eq!(differences(&here, &peer), ["NCCL_TCPXSHIM_TCP_STREAMS: here 4, peer 8"]);
        peer.push(("A_SETTING_OF_A_LATER_VERSION".into(), "1".into()));
        peer.retain(|(n, _)| n != "NCCL_TCPXSHIM_TCP_INLINE");
        assert_eq!(
            differences(&here, &peer).len(),
            1,
            "a name only one side lists is not compared"
        );
        let other = offered(&Config::default(), "GPUDirectTCPX_v7");
        assert_eq!(
            differences(&here, &other),
            ["inner transport: here tcpxshim, peer GPUDirectTCPX_v7"]
        );
    }
}
