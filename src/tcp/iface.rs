//! Network interface discovery and NCCL_SOCKET_IFNAME-style selection.

use crate::error::{Error, Result};
use std::ffi::CStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One interface as getifaddrs reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfInfo {
    /// Interface name.
    pub name: String,
    /// IFF_UP is set.
    pub up: bool,
    /// First IPv4 address.
    pub v4: Option<Ipv4Addr>,
    /// First IPv6 address that is not link-local.
    pub v6: Option<Ipv6Addr>,
}

impl IfInfo {
    /// The address a device on this interface listens on: IPv4 first.
    pub fn address(&self) -> Option<IpAddr> {
        self.v4.map(IpAddr::V4).or(self.v6.map(IpAddr::V6))
    }
    fn usable(&self) -> bool {
        self.up && self.address().is_some()
    }
}

/// A device of the transport: a usable interface, or one local address of an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Name NCCL sees: the interface, or `interface/address` for a device made from an address.
    pub name: String,
    /// The interface (for its speed and PCI device in sysfs).
    pub ifname: String,
    /// Address listened on.
    pub addr: IpAddr,
    /// PCI path given with the address, reported instead of the interface's.
    pub pci: Option<String>,
}

impl Device {
    /// A device for a whole interface.
    pub fn interface(name: &str, addr: IpAddr) -> Device {
        Device {
            name: name.to_string(),
            ifname: name.to_string(),
            addr,
            pci: None,
        }
    }
}

fn is_link_local_v6(a: &Ipv6Addr) -> bool {
    (a.segments()[0] & 0xffc0) == 0xfe80
}

/// Lists the interfaces of this host in getifaddrs order.
pub fn list_interfaces() -> Result<Vec<IfInfo>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into the pointer we pass; we free it below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(Error::io(
            "getifaddrs (listing network interfaces)",
            std::io::Error::last_os_error(),
        ));
    }
    let mut out: Vec<IfInfo> = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        let idx = match out.iter().position(|i| i.name == name) {
            Some(i) => i,
            None => {
                out.push(IfInfo {
                    name,
                    up: false,
                    v4: None,
                    v6: None,
                });
                out.len() - 1
            }
        };
        let info = &mut out[idx];
        info.up |= ifa.ifa_flags & libc::IFF_UP as u32 != 0;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr is non-NULL and points at a sockaddr of the family it declares.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        if family == libc::AF_INET && info.v4.is_none() {
            // SAFETY: AF_INET addresses are sockaddr_in; read_unaligned avoids assuming alignment.
            let sin = unsafe { std::ptr::read_unaligned(ifa.ifa_addr as *const libc::sockaddr_in) };
            info.v4 = Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
        } else if family == libc::AF_INET6 && info.v6.is_none() {
            // SAFETY: AF_INET6 addresses are sockaddr_in6; read_unaligned avoids assuming alignment.
            let sin6 = unsafe { std::ptr::read_unaligned(ifa.ifa_addr as *const libc::sockaddr_in6) };
            let a = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            if !is_link_local_v6(&a) {
                info.v6 = Some(a);
            }
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// An interface selection in NCCL_SOCKET_IFNAME syntax.
struct Spec {
    exclude: bool,
    exact: bool,
    names: Vec<String>,
}

impl Spec {
    fn parse(s: &str) -> Spec {
        let s = s.trim();
        let (exclude, s) = s.strip_prefix('^').map_or((false, s), |r| (true, r));
        let (exact, s) = s.strip_prefix('=').map_or((false, s), |r| (true, r));
        // NCCL allows "name:port" entries; the port means nothing for interface matching.
        let names = s
            .split(',')
            .map(|p| p.trim().split(':').next().unwrap_or("").to_string())
            .filter(|p| !p.is_empty())
            .collect();
        Spec { exclude, exact, names }
    }

    fn selects(&self, name: &str) -> bool {
        let hit = self.names.iter().any(|p| {
            if self.exact {
                name == p
            } else {
                name.starts_with(p.as_str())
            }
        });
        hit != self.exclude
    }
}

/// Picks the devices for `spec` (None: everything but `lo` and `docker*`, else `lo`).
pub fn select(spec: Option<&str>, seen: &[IfInfo]) -> Result<Vec<Device>> {
    let usable = seen.iter().filter(|i| i.usable());
    let to_dev = |i: &IfInfo| Device::interface(&i.name, i.address().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
    let devs: Vec<Device> = match spec {
        Some(s) => {
            let spec = Spec::parse(s);
            usable.filter(|i| spec.selects(&i.name)).map(to_dev).collect()
        }
        None => {
            let picked: Vec<Device> = usable
                .clone()
                .filter(|i| i.name != "lo" && !i.name.starts_with("docker"))
                .map(to_dev)
                .collect();
            if picked.is_empty() {
                usable.filter(|i| i.name == "lo").map(to_dev).collect()
            } else {
                picked
            }
        }
    };
    if devs.is_empty() {
        let list: Vec<String> = seen
            .iter()
            .map(|i| {
                let state = if i.up { "up" } else { "down" };
                match i.address() {
                    Some(a) => format!("{} ({state}, {a})", i.name),
                    None => format!("{} ({state}, no usable address)", i.name),
                }
            })
            .collect();
        let asked = spec.map_or("unset (default: all but lo and docker*, else lo)".to_string(), |s| {
            format!("{s:?}")
        });
        return Err(Error::invalid_argument(format!(
            "built-in TCP transport: no usable network interface (up, with an IPv4 or non-link-local IPv6 address) \
             matches NCCL_TCPXSHIM_TCP_IFNAME / NCCL_SOCKET_IFNAME = {asked}; interfaces seen: {}",
            if list.is_empty() {
                "none".to_string()
            } else {
                list.join(", ")
            }
        )));
    }
    Ok(devs)
}

/// Devices from NCCL_TCPXSHIM_TCP_ADDRS: `ADDR[=PCI_PATH],...`, one device per local address, in
/// order. Any 127.0.0.0/8 address (and ::1) is the loopback interface's, so one host can present
/// several devices the way an A3 machine shows eth1 to eth4; a PCI path (a sysfs device directory)
/// tells NCCL's topology search where the device sits, for example next to one GPU.
pub fn from_addrs(spec: &str, seen: &[IfInfo]) -> Result<Vec<Device>> {
    let bad = |entry: &str, why: String| {
        Error::invalid_argument(format!(
            "NCCL_TCPXSHIM_TCP_ADDRS: entry {entry:?} {why} (expected ADDR[=PCI_PATH],..., e.g. \
             127.0.0.1,127.0.0.2=/sys/bus/pci/devices/0000:00:04.0)"
        ))
    };
    let mut out: Vec<Device> = Vec::new();
    for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (a, pci) = match entry.split_once('=') {
            Some((a, p)) => (a.trim(), Some(p.trim())),
            None => (entry, None),
        };
        let addr: IpAddr = a
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| bad(entry, "is not an IP address".into()))?;
        let ifname = if addr.is_loopback() {
            seen.iter()
                .find(|i| i.v4.is_some_and(|v| v.is_loopback()) || i.v6.is_some_and(|v| v.is_loopback()))
                .map_or("lo".to_string(), |i| i.name.clone())
        } else {
            seen.iter()
                .find(|i| {
                    i.address() == Some(addr)
                        || i.v4.map(IpAddr::V4) == Some(addr)
                        || i.v6.map(IpAddr::V6) == Some(addr)
                })
                .map(|i| i.name.clone())
                .ok_or_else(|| bad(entry, "is not the (first) address of any interface of this host".into()))?
        };
        let pci = match pci {
            Some(p) => Some(
                std::fs::canonicalize(p)
                    .map_err(|e| bad(entry, format!("names a PCI path that cannot be read: {e}")))?
                    .to_string_lossy()
                    .into_owned(),
            ),
            None => None,
        };
        if out.iter().any(|d| d.addr == addr) {
            return Err(bad(entry, "repeats an address".into()));
        }
        out.push(Device {
            name: format!("{ifname}/{addr}"),
            ifname,
            addr,
            pci,
        });
    }
    if out.is_empty() {
        return Err(bad(spec, "lists no address".into()));
    }
    Ok(out)
}

/// Speed in Mbps from sysfs; 10000 when unknown (NCCL's own default).
pub fn speed_mbps(name: &str) -> i32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/speed"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(10_000)
}

/// The canonical sysfs path of the interface's PCI device, when it has one.
pub fn pci_path(name: &str) -> Option<String> {
    std::fs::canonicalize(format!("/sys/class/net/{name}/device"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen() -> Vec<IfInfo> {
        let i = |name: &str, up: bool, v4: Option<&str>, v6: Option<&str>| IfInfo {
            name: name.into(),
            up,
            v4: v4.map(|a| a.parse().unwrap()),
            v6: v6.map(|a| a.parse().unwrap()),
        };
        vec![
            i("lo", true, Some("127.0.0.1"), Some("::1")),
            i("eth0", true, Some("10.0.0.2"), Some("fd00::2")),
            i("eth1", true, None, Some("fd00::3")),
            i("eth10", false, Some("10.0.1.2"), None),
            i("docker0", true, Some("172.17.0.1"), None),
            i("ib0", true, None, None),
        ]
    }

    fn names(spec: Option<&str>) -> Vec<String> {
        select(spec, &seen()).unwrap().into_iter().map(|d| d.name).collect()
    }

    #[test]
    fn default_skips_lo_docker_down_and_addressless() {
        assert_eq!(names(None), ["eth0", "eth1"]);
        let lo_and_docker = [seen()[0].clone(), seen()[4].clone()];
        let d = select(None, &lo_and_docker).unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].name, "lo", "lo is the fallback when nothing else is usable");
        assert_eq!(d[0].addr, "127.0.0.1".parse::<IpAddr>().unwrap(), "IPv4 preferred");
    }

    #[test]
    fn prefix_exact_and_exclude_forms() {
        assert_eq!(names(Some("eth")), ["eth0", "eth1"]);
        assert_eq!(names(Some("=eth1")), ["eth1"]);
        assert!(select(Some("=eth"), &seen()).is_err(), "exact never matches a prefix");
        assert_eq!(names(Some("^eth,docker")), ["lo"]);
        assert_eq!(names(Some("^=lo")), ["eth0", "eth1", "docker0"]);
        assert_eq!(names(Some("lo:1234, docker")), ["lo", "docker0"]);
    }

    #[test]
    fn address_lists_make_one_device_each() {
        let d = from_addrs("127.0.0.1, 127.0.0.2,10.0.0.2,[::1]", &seen()).unwrap();
        let got: Vec<(String, String)> = d.iter().map(|d| (d.name.clone(), d.ifname.clone())).collect();
        assert_eq!(
            got,
            [
                ("lo/127.0.0.1".to_string(), "lo".to_string()),
                ("lo/127.0.0.2".into(), "lo".into()),
                ("eth0/10.0.0.2".into(), "eth0".into()),
                ("lo/::1".into(), "lo".into())
            ]
        );
        assert_eq!(d[1].addr, "127.0.0.2".parse::<IpAddr>().unwrap());
        assert!(d.iter().all(|d| d.pci.is_none()));
        let with_pci = from_addrs("127.0.0.3=/sys", &seen()).unwrap();
        assert_eq!(with_pci[0].pci.as_deref(), Some("/sys"));
        for (spec, why) in [
            ("127.0.0.1,nonsense", "is not an IP address"),
            ("192.0.2.7", "is not the (first) address of any interface"),
            ("127.0.0.2,127.0.0.2", "repeats an address"),
            ("127.0.0.2=/no/such/path", "cannot be read"),
            (" , ", "lists no address"),
        ] {
            let e = from_addrs(spec, &seen()).unwrap_err().to_string();
            assert!(e.contains("NCCL_TCPXSHIM_TCP_ADDRS") && e.contains(why), "{spec}: {e}");
        }
    }

    #[test]
    fn ipv6_only_interface_uses_its_global_address() {
        let d = select(Some("=eth1"), &seen()).unwrap();
        assert_eq!(d[0].addr, "fd00::3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn empty_selection_names_the_settings_and_lists_interfaces() {
        let err = select(Some("=nope"), &seen()).unwrap_err().to_string();
        for want in [
            "NCCL_TCPXSHIM_TCP_IFNAME",
            "NCCL_SOCKET_IFNAME",
            "eth10 (down",
            "ib0 (up, no usable",
            "\"=nope\"",
        ] {
            assert!(err.contains(want), "{want:?} missing from: {err}");
        }
    }

    #[test]
    fn real_interfaces_include_loopback() {
        let seen = list_interfaces().unwrap();
        let lo = seen.iter().find(|i| i.name == "lo").expect("lo listed");
        assert!(lo.up && lo.address().is_some(), "{lo:?}");
        assert_eq!(speed_mbps("lo"), 10_000);
        assert_eq!(pci_path("lo"), None);
    }
}
