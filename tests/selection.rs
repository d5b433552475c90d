//! Which inner transport NCCL_TCPXSHIM_PLUGIN selects, and the errors for a wrong one.
//! Each case loads a private copy of the shim (its own globals) under its own environment.

mod common;

use common::*;
use tcpxshim::ffi::ncclResult_t::*;

/// Initialises a fresh shim instance with NCCL_TCPXSHIM_PLUGIN set to `plugin` (or unset).
fn init_with_plugin(plugin: Option<&str>) -> (Net, Result<(), u32>, Vec<String>) {
    let _g = serial();
    init_with_plugin_locked(plugin)
}

/// [`init_with_plugin`] for a caller that already holds [`serial`].
fn init_with_plugin_locked(plugin: Option<&str>) -> (Net, Result<(), u32>, Vec<String>) {
    match plugin {
        Some(p) => std::env::set_var("NCCL_TCPXSHIM_PLUGIN", p),
        None => std::env::remove_var("NCCL_TCPXSHIM_PLUGIN"),
    }
    std::env::set_var("NCCL_TCPXSHIM_TCP_IFNAME", "lo");
    std::env::set_var("NCCL_DEBUG", "INFO");
    let net = Net::open_private(shim_lib());
    let res = net.init();
    let log = net.captured_log();
    (net, res, log)
}

fn warned(log: &[String], words: &[&str]) -> bool {
    log.iter()
        .any(|l| l.starts_with("WARN") && words.iter().all(|w| l.contains(w)))
}

#[test]
fn unset_falls_back_to_the_builtin_transport_when_tcpx_is_absent() {
    for path in tcpxshim::plugin::KNOWN_TCPX_PATHS {
        assert!(
            !std::path::Path::new(path).exists(),
            "this test expects a machine without TCPX ({path})"
        );
    }
    let (net, res, log) = init_with_plugin(None);
    assert_eq!(res, Ok(()));
    assert_eq!(net.name(), "tcpxshim");
    assert!(
        log.iter().any(|l| l.contains("loaded tcpxshim from built-in")),
        "{log:?}"
    );
}

#[test]
fn builtin_selects_the_builtin_transport() {
    let (net, res, _) = init_with_plugin(Some("builtin"));
    assert_eq!(res, Ok(()));
    assert_eq!(net.devices(), Ok(1));
}

#[test]
fn a_missing_plugin_is_an_error_naming_the_setting() {
    let (_, res, log) = init_with_plugin(Some("/nonexistent/libnccl-net-nothing.so"));
    assert_eq!(res, Err(ncclSystemError));
    assert!(
        warned(
            &log,
            &[
                "init",
                "NCCL_TCPXSHIM_PLUGIN=/nonexistent/libnccl-net-nothing.so",
                "cannot load"
            ]
        ),
        "{log:?}"
    );
    let (_, res, log) = init_with_plugin(Some("nothing"));
    assert_eq!(res, Err(ncclSystemError));
    assert!(
        warned(&log, &["libnccl-net-nothing.so"]),
        "a short name is tried as libnccl-net-<name>.so: {log:?}"
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
        let (_, res, log) = init_with_plugin(Some(&p));
        assert_eq!(res, Err(ncclInvalidArgument), "{p}");
        assert!(warned(&log, &["is tcpxshim itself"]), "{p}: {log:?}");
    }
}

#[test]
fn a_library_without_a_plugin_table_is_refused() {
    let (_, res, log) = init_with_plugin(Some(&logcapture_lib().to_string_lossy()));
    assert_eq!(res, Err(ncclInvalidArgument));
    assert!(warned(&log, &["exports none of ncclNetPlugin_v7, _v6, _v5"]), "{log:?}");
}

#[test]
fn a_failing_inner_init_is_reported_and_a_later_init_can_succeed() {
    let fixture = private_copy(&fixture_lib(Fixture::V7));
    let ctl = FixtureCtl::open(&fixture);
    ctl.set("init_result", 2);
    // Held throughout: the second init reads the environment again.
    let _g = serial();
    let (net, res, log) = init_with_plugin_locked(Some(&fixture.to_string_lossy()));
    assert_eq!(res, Err(ncclSystemError), "the inner plugin's error code is passed on");
    assert!(warned(&log, &["inner plugin Fixture_v7", "init returned 2"]), "{log:?}");
    ctl.set("init_result", 0);
    assert_eq!(net.init(), Ok(()), "init is retried once the inner plugin can start");
    assert_eq!(net.name(), "Fixture_v7");
}
