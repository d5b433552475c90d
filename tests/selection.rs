//! Which inner transport the plugin setting selects, and the errors for a wrong one: the value as
//! NCCL_TCPXSHIM_PLUGIN gives it (Config::from_vars over a map), and the stack built from the
//! config (stack::load_inner, stack::build), each case with a config of its own.

mod common;

use common::*;
use std::collections::HashMap;
use tcpxshim::ffi::ncclResult_t::*;
use tcpxshim::stack;
use tcpxshim::transport::Transport;

/// The config the variables in `pairs` give (every other setting at its default).
fn config_of(pairs: &[(&str, &str)]) -> Config {
    let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Config::from_vars(&|k| m.get(k).cloned()).unwrap_or_else(|e| panic!("{pairs:?}: {e}"))
}

/// A config selecting `plugin` (or nothing), the built-in transport on lo if it comes to that.
fn selecting(plugin: Option<&str>) -> Config {
    let mut c = Config {
        plugin: plugin.map(str::to_string),
        ..Config::default()
    };
    c.tcp.ifname = Some("lo".into());
    c
}

/// The error building a stack from `cfg` gives: its result code and message.
fn build_error(cfg: &Config) -> (u32, String) {
    match stack::build(cfg) {
        Ok(s) => panic!("{cfg:?} built a stack: {}", s.summary()),
        Err(e) => (e.code(), e.to_string()),
    }
}

#[test]
fn the_setting_is_read_trimmed_and_empty_means_unset() {
    assert_eq!(config_of(&[]).plugin, None);
    assert_eq!(config_of(&[("NCCL_TCPXSHIM_PLUGIN", "")]).plugin, None);
    assert_eq!(config_of(&[("NCCL_TCPXSHIM_PLUGIN", "  \t")]).plugin, None);
    assert_eq!(
        config_of(&[("NCCL_TCPXSHIM_PLUGIN", " builtin ")]).plugin.as_deref(),
        Some("builtin")
    );
    assert_eq!(
        config_of(&[("NCCL_TCPXSHIM_PLUGIN", "/usr/local/tcpx/lib64/libnccl-net.so")])
            .plugin
            .as_deref(),
        Some("/usr/local/tcpx/lib64/libnccl-net.so")
    );
    assert_eq!(
        config_of(&[("NCCL_TCPXSHIM_PLUGIN", "tcpx")]).plugin.as_deref(),
        Some("tcpx")
    );
    // What each kind of value is handed to dlopen as.
    assert_eq!(
        tcpxshim::plugin::candidates("tcpx"),
        vec!["libnccl-net-tcpx.so".to_string(), "tcpx".to_string()]
    );
    assert_eq!(tcpxshim::plugin::candidates("libfoo.so"), vec!["libfoo.so".to_string()]);
    assert_eq!(tcpxshim::plugin::candidates("./x/y"), vec!["./x/y".to_string()]);
}

#[test]
fn a_value_read_from_the_variables_builds_the_stack_it_names() {
    let fixture = private_copy(&fixture_lib(Fixture::V6));
    let cfg = config_of(&[("NCCL_TCPXSHIM_PLUGIN", &format!(" {} ", fixture.display()))]);
    let s = stack::build(&cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.name(), "Fixture_v6");
    assert_eq!((s.info().abi_version, s.info().devices), (6, 2));
    assert_eq!(s.info().source, fixture.display().to_string());
    let s = stack::build(&config_of(&[
        ("NCCL_TCPXSHIM_PLUGIN", "builtin"),
        ("NCCL_SOCKET_IFNAME", "lo"),
    ]))
    .unwrap();
    assert_eq!(s.info().source, "built-in");
}

#[test]
fn unset_falls_back_to_the_builtin_transport_when_tcpx_is_absent() {
    for path in tcpxshim::plugin::KNOWN_TCPX_PATHS {
        assert!(
            !std::path::Path::new(path).exists(),
            "this test expects a machine without TCPX ({path})"
        );
    }
    let (inner, info) = stack::load_inner(&selecting(None)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (inner.name(), info.source.as_str(), info.abi_version),
        ("tcpxshim", "built-in", 0)
    );
    let s = stack::build(&selecting(None)).unwrap();
    assert_eq!(s.name(), "tcpxshim");
    assert!(
        s.summary().starts_with("loaded tcpxshim from built-in"),
        "{}",
        s.summary()
    );
}

#[test]
fn builtin_selects_the_builtin_transport() {
    let (_, info) = stack::load_inner(&selecting(Some("builtin"))).unwrap();
    assert_eq!(info.source, "built-in");
    let net = StackNet::build(&selecting(Some("builtin")));
    assert_eq!(net.devices(), Ok(1), "lo is one device");
}

#[test]
fn a_missing_plugin_is_an_error_naming_the_setting() {
    let (code, msg) = build_error(&selecting(Some("/nonexistent/libnccl-net-nothing.so")));
    assert_eq!(code, ncclSystemError);
    assert!(
        msg.contains("NCCL_TCPXSHIM_PLUGIN=/nonexistent/libnccl-net-nothing.so") && msg.contains("cannot load"),
        "{msg}"
    );
    let (code, msg) = build_error(&selecting(Some("nothing")));
    assert_eq!(code, ncclSystemError);
    assert!(
        msg.contains("libnccl-net-nothing.so"),
        "a short name is tried as libnccl-net-<name>.so: {msg}"
    );
}

#[test]
fn the_shim_refuses_to_load_itself_whatever_the_file_is_called() {
    // The very library, and a copy under the name TCPX is installed as.
    let copy = private_copy(&shim_lib());
    let disguised = copy.with_file_name("libnccl-net.so");
    std::fs::rename(&copy, &disguised).unwrap();
    for path in [shim_lib(), disguised] {
        let p = path.to_string_lossy().to_string();
        let (code, msg) = build_error(&selecting(Some(&p)));
        assert_eq!(code, ncclInvalidArgument, "{p}");
        assert!(msg.contains("is tcpxshim itself"), "{p}: {msg}");
    }
}

#[test]
fn a_library_without_a_plugin_table_is_refused() {
    let (code, msg) = build_error(&selecting(Some(&logcapture_lib().to_string_lossy())));
    assert_eq!(code, ncclInvalidArgument);
    assert!(msg.contains("exports none of ncclNetPlugin_v7, _v6, _v5"), "{msg}");
}

#[test]
fn a_failing_inner_init_is_reported_and_a_later_build_can_succeed() {
    let fixture = private_copy(&fixture_lib(Fixture::V7));
    let ctl = FixtureCtl::open(&fixture);
    ctl.set("init_result", 2);
    let cfg = selecting(Some(&fixture.to_string_lossy()));
    let (code, msg) = build_error(&cfg);
    assert_eq!(code, ncclSystemError, "the inner plugin's error code is passed on");
    assert!(
        msg.contains("inner plugin Fixture_v7") && msg.contains("init returned 2"),
        "{msg}"
    );
    ctl.set("init_result", 0);
    let net = StackNet::build(&cfg);
    assert_eq!(
        net.name(),
        "Fixture_v7",
        "the same config builds once the inner plugin can start"
    );
    assert_eq!(ctl.init_count(), 2);
}

#[test]
fn the_known_tcpx_paths_are_tried_in_the_documented_order_and_never_tcpxos_names() {
    // tcpx-plugin-facts.md quirk 12: TCPX's own install path first, then GKE's; on A3 Mega
    // libnccl-net.so under /usr/local/nvidia/lib64 may be Google's TCPXO shim, but its inner
    // libnccl-net_internal.so is never a default, and neither is a bare libnccl-net.so.
    assert_eq!(
        tcpxshim::plugin::KNOWN_TCPX_PATHS,
        &[
            "/usr/local/tcpx/lib64/libnccl-net.so",
            "/usr/local/nvidia/lib64/libnccl-net.so"
        ]
    );
    for path in tcpxshim::plugin::KNOWN_TCPX_PATHS {
        assert!(
            path.starts_with('/'),
            "{path}: absolute, not searched on the loader path"
        );
        assert!(!path.contains("internal"), "{path}");
    }
}
