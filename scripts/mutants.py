#!/usr/bin/env python3
"""Hand-made mutants of the shim's TCPX-facing code (see docs/fidelity.md).

Each mutant breaks one fact of docs (tcpx-plugin-facts: the quirks and the interface) on purpose by an
exact text substitution in one or more source files, runs the test files that should catch it, and
records "killed" (a test failed) or "survived". Every file is restored afterwards, whatever happens.
A pattern that is no longer in the source is an error: the list has to follow the code.

Usage: scripts/mutants.sh [--list] [--timeout S] [ID ...]
Exit status: 0 if every must-kill mutant was killed, 1 if one survived, 2 on a stale pattern or a
baseline that fails.
"""

import argparse
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHIM = "src/stack/shim.rs"
HANDLE = "src/stack/handle.rs"
OBJECTS = "src/stack/objects.rs"
PLUGIN = "src/plugin/mod.rs"
EXPORT = "src/export/mod.rs"
BUILD = "build.rs"

# Test sets (cargo test arguments).
INNER = ["--test", "shim_inner"]
TABLE = ["--test", "object_table"]
SELECT = ["--test", "selection"]
ABI = ["--test", "abi"]
ALL = INNER + TABLE + SELECT + ["--test", "fixture_direct", "--lib"]


def m(mid, quirk, what, subs, tests, must_kill=True):
    return {"id": mid, "quirk": quirk, "what": what, "subs": subs, "tests": tests, "must_kill": must_kill}


MUTANTS = [
    # ---- Quirk 1: the same handle buffer, unchanged, on every repeated connect; state at offset 80.
    m("inline-copy-back", "1", "inline connect hands the inner plugin a fresh copy of NCCL's handle each call, copied back after",
      [(HANDLE, "            return inner(handle);\n",
        "            let mut copy = *handle;\n            let r = inner(&mut copy);\n            *handle = copy;\n            return r;\n")],
      INNER + TABLE),
    m("inline-copy-no-back", "1", "inline connect hands the inner plugin a copy and drops what it wrote",
      [(HANDLE, "            return inner(handle);\n",
        "            let mut copy = *handle;\n            return inner(&mut copy);\n")],
      INNER + TABLE),
    m("served-fresh-scratch", "1", "served connect gives the inner plugin a fresh copy of the fetched handle on each call",
      [(HANDLE, "            true => inner(&mut p.scratch),",
        "            true => {\n                let mut fresh = p.scratch.clone();\n                inner(&mut fresh)\n            }")],
      INNER),
    m(
        "served-refetch-scratch", "1",
        "served connect copies the fetched handle into the buffer again before each call (state at 80 lost)",
        [(HANDLE, "            Ok(Ok(h)) => {\n                *p.scratch = h;\n                p.fetch = None;\n                Ok(true)\n            }",
          "            Ok(Ok(h)) => {\n                *p.scratch = h;\n                p.fetch = None;\n                p.fetched_copy = Some(h);\n                Ok(true)\n            }"),
         (HANDLE, "        let Some(rx) = p.fetch.as_ref() else {\n            return Ok(true);\n        };",
          "        let Some(rx) = p.fetch.as_ref() else {\n            if let Some(h) = p.fetched_copy {\n                *p.scratch = h;\n            }\n            return Ok(true);\n        };"),
         (HANDLE, "    fetch: Option<std::sync::mpsc::Receiver", "    fetched_copy: Option<[u8; HANDLE_SIZE]>,\n    fetch: Option<std::sync::mpsc::Receiver"),
         (HANDLE, "                fetch: Some(self.start_fetch(t)?),\n", "                fetch: Some(self.start_fetch(t)?),\n                fetched_copy: None,\n")],
        INNER),
    m("inline-short-copy", "1", "listen copies only 80 of the inner plugin's 88 bytes into NCCL's handle (80..88 left as NCCL had them)",
      [(HANDLE, "handle[..INNER_HANDLE_SIZE].copy_from_slice(&scratch[..INNER_HANDLE_SIZE]);",
        "handle[..80].copy_from_slice(&scratch[..80]);")],
      INNER + TABLE),
    m("inner-share-80", "1", "the inner share shrinks to 80 bytes (trailer from byte 80): TCPX no longer fits inline",
      [(HANDLE, "pub const INNER_HANDLE_SIZE: usize = 88;", "pub const INNER_HANDLE_SIZE: usize = 80;")],
      INNER + TABLE),
    m("overflow-unchecked", "1", "listen does not check the canary: a longer inner handle is truncated to 88 bytes",
      [(HANDLE, "let fits = scratch[INNER_HANDLE_SIZE..].iter().all(|&b| b == CANARY);", "let fits = true;")],
      INNER),
    m("trailer-over-80", "1", "the trailer is written from byte 80, over TCPX's state slot",
      [(HANDLE, "        let t = &mut handle[INNER_HANDLE_SIZE..];\n        t[0..4].copy_from_slice(&MAGIC.to_le_bytes());",
        "        handle[INNER_HANDLE_SIZE - 8..INNER_HANDLE_SIZE].fill(0xEE);\n        let t = &mut handle[INNER_HANDLE_SIZE..];\n        t[0..4].copy_from_slice(&MAGIC.to_le_bytes());")],
      INNER + TABLE),
    # ---- Quirk 2: one accept per listen comm.
    m("accept-again", "2", "accept calls the inner accept once more after it returned a comm",
      [(SHIM, "            Some(c) => self.wrap(Kind::Recv, c, l.dev(), None).map(Some),",
        "            Some(c) => {\n                // SAFETY: mutant.\n                let _ = unsafe { self.inner.accept(l.inner(), dev_handle) };\n"
        "                self.wrap(Kind::Recv, c, l.dev(), None).map(Some)\n            }")],
      INNER + TABLE),
    # ---- Quirk 3: accept gets a valid pointer to NCCL's device-handle pointer.
    m("accept-null-devcomm", "3", "the shim passes NULL instead of NCCL's recvDevComm",
      [(SHIM, "let inner = unsafe { self.inner.accept(l.inner(), dev_handle) }",
        "let inner = unsafe { self.inner.accept(l.inner(), std::ptr::null_mut()) }")],
      INNER + TABLE),
    m("accept-local-devcomm", "3,8", "the shim passes a pointer to a device handle of its own, not NCCL's",
      [(SHIM, "let inner = unsafe { self.inner.accept(l.inner(), dev_handle) }",
        "let _ = dev_handle;\n        let mut own = Box::<DevHandle>::default();\n        let mut own_ptr: *mut DevHandle = &mut *own;\n"
        "        std::mem::forget(own);\n        let inner = unsafe { self.inner.accept(l.inner(), &mut own_ptr) }")],
      INNER + TABLE),
    m("plugin-accept-null-devcomm", "3", "the v7 adapter passes NULL as recvDevComm",
      [(PLUGIN, 'Table::V7(t) => call!(t, accept, "accept", l, &mut comm, dev_handle)?,',
        'Table::V7(t) => call!(t, accept, "accept", l, &mut comm, null_mut())?,')],
      INNER + TABLE),
    # ---- Quirk 4: NULL request from isend/irecv means "try again"; a failed background connect is an error.
    m("try-again-is-error", "4", "a NULL request from the inner isend/irecv becomes an error",
      [(OBJECTS, "                    Ok(_) => Ok(None),",
        '                    Ok(_) => Err(crate::error::Error::internal("the inner plugin returned no request")),')],
      INNER + TABLE),
    m("try-again-retried", "4", "the v7 adapter retries isend in a loop until it gets a request",
      [(PLUGIN, '        each!(self.table, t => call!(t, isend, "isend", comm.as_ptr(), data, size, tag, m, &mut req))?;',
        '        loop {\n            each!(self.table, t => call!(t, isend, "isend", comm.as_ptr(), data, size, tag, m, &mut req))?;\n'
        '            if !req.is_null() {\n                break;\n            }\n        }')],
      INNER + TABLE),
    m("bg-error-is-try-again", "4", "an error from the inner isend/irecv (failed background connect) becomes \"try again\"",
      [(OBJECTS, "                    Err(e) => {\n                        self.counters.error();\n                        let bytes: i64 = args.sizes.iter().map(|&s| s.max(0) as i64).sum();\n                        Err(e.context(format!(\"{call} of {bytes} bytes on {}\", self.label())))\n                    }",
        "                    Err(_) => Ok(None),")],
      INNER + TABLE),
    # ---- Quirk 6: FIFO test order per comm; n == 1.
    m("eager-test", "6", "irecv tests each new inner request at once (out of FIFO order when others are outstanding)",
      [(SHIM, "            self.inner.irecv(c.inner(), data, &sizes[..n], &tags[..n], &imrs[..n])\n        })?;",
        "            let r = self.inner.irecv(c.inner(), data, &sizes[..n], &tags[..n], &imrs[..n])?;\n"
        "            if let Some(q) = r {\n                let _ = self.inner.test(q, None);\n            }\n            Ok(r)\n        })?;")],
      INNER + TABLE),
    m(
        "test-twice", "6", "test() calls the inner test twice for each NCCL test (a completion seen by the first call is lost)",
        [(SHIM, "        let done = match unsafe { self.inner.test(ireq, Some(&mut local[..n])) } {",
          "        // SAFETY: mutant.\n        let _ = unsafe { self.inner.test(ireq, None) };\n"
          "        let done = match unsafe { self.inner.test(ireq, Some(&mut local[..n])) } {")],
        INNER + TABLE),
    # ---- Quirk 7: irecvConsumed for every UNPACK receive, in order, with the inner request.
    m("consumed-none", "7", "irecvConsumed passes no request to the inner plugin",
      [(SHIM, "self.inner.irecv_consumed(c.inner(), n, inner_req.map(|(_, r)| r))",
        "self.inner.irecv_consumed(c.inner(), n, inner_req.map(|_| None).unwrap_or(None))")],
      INNER + TABLE),
    m("consumed-outer-request", "7", "irecvConsumed passes NCCL's (the shim's) request instead of the inner one",
      [(SHIM, "                Some((key, c.consumed_inner(key)?))",
        "                c.consumed_inner(key)?;\n                Some((key, r))")],
      INNER + TABLE),
    m("consumed-oldest", "7", "irecvConsumed releases the oldest completed receive, whichever NCCL named",
      [(OBJECTS, "let pos = q.iter().position(|(k, _)| *k == key).ok_or_else(|| {",
        "let pos = q.iter().position(|(k, _)| *k == key).map(|_| 0).ok_or_else(|| {")],
      INNER + TABLE),
    m("consumed-dropped", "7", "irecvConsumed is not forwarded (treated as a HOST-type comm)",
      [(SHIM, "        if !c.unpack() {\n            // Host-type",
        "        if true {\n            // Host-type")],
      INNER + TABLE),
    m("consumed-at-test", "7", "the shim releases a receive itself when test() completes it (before NCCL's unpack) and swallows NCCL's irecvConsumed",
      [(SHIM, "            c.completed_unpack(key, ireq);",
        "            // SAFETY: mutant.\n            let _ = unsafe { self.inner.irecv_consumed(c.inner(), 1, Some(ireq)) };"),
       (SHIM, "        if !c.unpack() {\n            // Host-type", "        if true {\n            // Host-type")],
      INNER + TABLE),
    m("unpack-undetected", "7", "the shim does not recognise UNPACK devices",
      [(SHIM, "unpack.push(inner.properties(d)?.device_type == DeviceType::Unpack);",
        "unpack.push(inner.properties(d)?.device_type == DeviceType::Host);")],
      INNER + TABLE),
    # ---- Interface: name, properties, regMrDmaBuf, getDeviceMr, v7 table.
    m("name-own", "name", "the shim reports its own name instead of GPUDirectTCPX_v7",
      [(SHIM, 'let name = cfg.name.clone().unwrap_or_else(|| inner.name().to_string());',
        'let name = cfg.name.clone().unwrap_or_else(|| { let _ = inner.name(); "tcpxshim".to_string() });')],
      INNER + TABLE),
    m("export-name-unset", "name", "init does not set the exported table's name",
      [(EXPORT, "            (*t).name = name;\n", "            let _ = name;\n")],
      TABLE),
    m("devtype-host", "props", "the v7 adapter reports netDeviceType HOST",
      [(PLUGIN, "(v6, DeviceType::from_raw(p.netDeviceType), p.netDeviceVersion)",
        "(v6, { let _ = p.netDeviceType; DeviceType::Host }, p.netDeviceVersion)")],
      INNER + TABLE),
    m("devversion-zero", "props", "the v7 adapter reports netDeviceVersion 0",
      [(PLUGIN, "(v6, DeviceType::from_raw(p.netDeviceType), p.netDeviceVersion)",
        "(v6, DeviceType::from_raw(p.netDeviceType), 0)")],
      INNER + TABLE),
    m("export-devtype-zero", "props", "the exported getProperties reports netDeviceType 0",
      [(EXPORT, "        netDeviceType: p.device_type.raw(),", "        netDeviceType: 0,")],
      TABLE),
    m("export-devversion-zero", "props", "the exported getProperties reports netDeviceVersion 0",
      [(EXPORT, "        netDeviceVersion: p.device_version,", "        netDeviceVersion: 0,")],
      TABLE),
    m("speed-changed", "props", "the v7 adapter reports a speed of its own",
      [(PLUGIN, "                    speed: p.speed,\n", "                    speed: 100_000,\n")],
      INNER + TABLE),
    m("latency-changed", "props", "the v7 adapter reports a latency of its own",
      [(PLUGIN, "                    latency: p.latency,\n", "                    latency: 1.0,\n")],
      INNER + TABLE),
    m("maxcomms-changed", "props", "the exported getProperties caps maxComms",
      [(EXPORT, "        maxComms: p.max_comms,", "        maxComms: p.max_comms.min(1024),")],
      TABLE),
    m("maxrecvs-changed", "props", "the exported getProperties reports maxRecvs 8",
      [(EXPORT, "        maxRecvs: p.max_recvs,", "        maxRecvs: 8,")],
      TABLE),
    m("ptrsupport-host", "props", "the v7 adapter reports HOST-only pointer support",
      [(PLUGIN, "                    ptrSupport: p.ptrSupport,\n", "                    ptrSupport: 1,\n")],
      INNER + TABLE),
    m("dmabuf-kept", "regMrDmaBuf", "init leaves regMrDmaBuf set when the inner plugin has none",
      [(EXPORT, "            if !dmabuf {\n", "            if !dmabuf && false {\n")],
      TABLE),
    m("dmabuf-claimed", "regMrDmaBuf", "the v7 adapter says the plugin has regMrDmaBuf",
      [(PLUGIN, "            Table::V7(t) => t.regMrDmaBuf.is_some(),", "            Table::V7(_) => true,")],
      INNER + TABLE),
    m("devmr-not-forwarded", "getDeviceMr", "the shim answers getDeviceMr with NULL itself",
      [(SHIM, "        unsafe { self.inner.get_device_mr(c.inner(), rec.inner) }\n",
        "        let _ = rec;\n        Ok(None)\n")],
      INNER + TABLE),
    m("plugin-devmr-dropped", "getDeviceMr", "the v7 adapter never calls the plugin's getDeviceMr",
      [(PLUGIN, "            Table::V7(t) if t.getDeviceMr.is_some() => {", "            Table::V7(t) if t.getDeviceMr.is_some() && false => {")],
      INNER + TABLE),
    m("v7-not-preferred", "v7", "the loader looks for a v8 table first and so misses TCPX's v7 one",
      [(PLUGIN, 'lib.get::<*const ncclNet_v7_t>(b"ncclNetPlugin_v7\\0")', 'lib.get::<*const ncclNet_v7_t>(b"ncclNetPlugin_v8\\0")')],
      INNER + TABLE),
    m("v6-connect-devhandle", "v7", "the v7 adapter passes NULL as sendDevComm (TCPX ignores it)",
      [(PLUGIN, 'Table::V7(t) => call!(t, connect, "connect", dev, h, &mut comm, dev_handle)?,',
        'Table::V7(t) => call!(t, connect, "connect", dev, h, &mut comm, { let _ = dev_handle; null_mut() })?,')],
      INNER + TABLE, must_kill=False),
    # ---- Quirk 12: installation paths.
    m("paths-swapped", "12", "KNOWN_TCPX_PATHS tried in the other order",
      [(PLUGIN, '    "/usr/local/tcpx/lib64/libnccl-net.so",\n    "/usr/local/nvidia/lib64/libnccl-net.so",\n',
        '    "/usr/local/nvidia/lib64/libnccl-net.so",\n    "/usr/local/tcpx/lib64/libnccl-net.so",\n')],
      SELECT + ["--lib"]),
    m("paths-internal", "12", "KNOWN_TCPX_PATHS names TCPXO's libnccl-net_internal.so",
      [(PLUGIN, '    "/usr/local/nvidia/lib64/libnccl-net.so",\n];',
        '    "/usr/local/nvidia/lib64/libnccl-net.so",\n    "/usr/local/nvidia/lib64/libnccl-net_internal.so",\n];')],
      SELECT + ["--lib"]),
    m("paths-dropped", "12", "KNOWN_TCPX_PATHS loses GKE's path",
      [(PLUGIN, '    "/usr/local/nvidia/lib64/libnccl-net.so",\n];', '];')],
      SELECT + ["--lib"]),
    m("soname-libnccl-net", "12", "the shim's SONAME is libnccl-net.so, the name TCPX is installed under",
      [(BUILD, "-Wl,-soname,libnccl-net-tcpxshim.so", "-Wl,-soname,libnccl-net.so")],
      ABI),
]

class Stale(Exception):
    pass


def apply(subs):
    """Applies the substitutions; returns {path: original text}. Raises Stale if a pattern is missing."""
    originals = {}
    texts = {}
    for path, old, new in subs:
        full = os.path.join(ROOT, path)
        if path not in texts:
            with open(full, encoding="utf-8") as f:
                texts[path] = f.read()
            originals[path] = texts[path]
        count = texts[path].count(old)
        if count != 1:
            raise Stale(f"{path}: pattern found {count} times (expected once):\n{old}")
        texts[path] = texts[path].replace(old, new)
    for path, text in texts.items():
        with open(os.path.join(ROOT, path), "w", encoding="utf-8") as f:
            f.write(text)
    return originals


def restore(originals):
    for path, text in originals.items():
        with open(os.path.join(ROOT, path), "w", encoding="utf-8") as f:
            f.write(text)


def cargo_test(tests, timeout, log):
    cmd = ["cargo", "test", "-q", "--no-fail-fast"] + tests
    start = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
                           start_new_session=True)
        out, rc = p.stdout.decode(errors="replace"), p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode(errors="replace") + "\n(timed out)", -1
    log.write(f"$ {' '.join(cmd)}\n{out}\n")
    log.flush()
    return rc, out, time.monotonic() - start


def verdict(rc, out):
    if rc == 0:
        return "survived"
    if rc == -1:
        return "killed (timeout)"
    if "error[E" in out or "error: could not compile" in out:
        return "build-error"
    failed = []
    for line in out.splitlines():
        # "---- name stdout ----" heads each failing test's output.
        if line.startswith("---- ") and line.endswith(" stdout ----"):
            failed.append(line[5:-12])
    if not failed:
        return "killed"
    more = f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""
    return "killed by " + ", ".join(sorted(set(failed))[:3]) + more


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ids", nargs="*", help="mutant ids to run (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per mutant's cargo test")
    ap.add_argument("--log", default=os.path.join(ROOT, "target", "mutants.log"))
    a = ap.parse_args()
    chosen = [mu for mu in MUTANTS if not a.ids or mu["id"] in a.ids]
    unknown = set(a.ids) - {mu["id"] for mu in MUTANTS}
    if unknown:
        sys.exit(f"unknown mutant id(s): {', '.join(sorted(unknown))}")
    if a.list:
        for mu in chosen:
            print(f"{mu['id']:26} quirk {mu['quirk']:12} {mu['what']}")
        return 0

    current = {}

    def on_signal(signum, _frame):
        restore(current)
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    os.makedirs(os.path.dirname(a.log), exist_ok=True)
    results = []
    with open(a.log, "w", encoding="utf-8") as log:
        # Every pattern must be present before anything is built.
        for mu in chosen:
            try:
                restore(apply(mu["subs"]))
            except Stale as e:
                print(f"mutant {mu['id']}: stale pattern: {e}", file=sys.stderr)
                return 2
        rc, out, _ = cargo_test(ALL + ABI, a.timeout, log)
        if rc != 0:
            print("baseline: the tests fail without any mutant; see " + a.log, file=sys.stderr)
            return 2
        for mu in chosen:
            try:
                current.update(apply(mu["subs"]))
                rc, out, secs = cargo_test(mu["tests"], a.timeout, log)
            finally:
                restore(current)
                current.clear()
            v = verdict(rc, out)
            results.append((mu, v, secs))
            print(f"{mu['id']:26} {v}  ({secs:.0f} s)", flush=True)
    print()
    print(f"| mutant | quirk | must kill | result |")
    print(f"|---|---|---|---|")
    bad = []
    for mu, v, _ in results:
        print(f"| {mu['id']} | {mu['quirk']} | {'yes' if mu['must_kill'] else 'no'} | {v} |")
        if mu["must_kill"] and not v.startswith("killed"):
            bad.append(mu["id"])
    killed = sum(1 for _, v, _ in results if v.startswith("killed"))
    print(f"\n{killed} of {len(results)} killed; must-kill survivors: {', '.join(bad) or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
