#!/usr/bin/env bash
# The tcpxshim GPU suite: real NCCL (PyTorch's) through the plugin, several ranks on one GPU.
#
#   bash gpu/run.sh PLUGIN_SO OUTDIR [--quick]
#
# Each rank is its own process on cuda:0 with its own NCCL_HOSTID (so NCCL connects the ranks only
# through the network transport), under CUDA MPS, started here and stopped on exit. Parts:
#   ceiling   raw loopback TCP with plain sockets (rawtcp.py), and `tcpxshim demo` with 4 and 8
#             streams when TCPXSHIM_BIN names the command: what the kernel and the bare transport give
#   coll      correctness of all_reduce, all_gather, reduce_scatter, broadcast, send/recv, 1 element
#             to 256 MiB, 2 and 4 ranks, modes shim and socket (collectives.py), then the NCCL/shim
#             log checks (logcheck.py net)
#   counters  the shim's per-connection byte counters against a ring all-reduce's traffic (counters.py)
#   metrics   the shim's metrics files (NCCL_TCPXSHIM_METRICS_DIR, written every second): each rank's
#             byte deltas over K all-reduces against the ring's traffic, exactly (metrics.py); meanwhile
#             `tcpxshim metrics serve` on them when TCPXSHIM_BIN names the command, its page fetched
#             every 0.5 s, and the files copied every 0.5 s (metricswatch.py); then metrics.md and
#             metrics-throughput.svg (each connection's throughput against time)
#   ddp       the same DDP training over shim and socket: identical losses (ddp.py)
#   sweep     all-reduce and send/recv bandwidth, nccl-tests format, modes socket, socket44, shim
#             (sweep.py); then results.md and busbw.svg
#   faults    (only when PARTS names it) DDP while `tcpxshim drop` shuts the shim's connections down
#             every few seconds, losses against an undisturbed run; a rank killed mid-job (faults.py);
#             FAULT_ENV ("K=V ...") adds settings to these runs
#   churn     (only when PARTS names it) communicator churn: PyTorch new_group, one checked
#             all_reduce, destroy, CHURN_CYCLES (20) times, over socket and the shim with its pool off
#             and on (churn.py): time per cycle and the shim's share of it
#   profile   per-thread CPU use (threadprof.py) during shim all-reduces of 32 to 128 MiB (about 15 s;
#             PROFILE_MODES: the modes profiled, "shim" by default; PROFILE_OPS: all_reduce)
#   nccltests NVIDIA's nccl-tests (pinned: 2.19.6) under mpirun, from NCCL_TESTS_BIN (its built *_perf)
#             or NCCL_TESTS_SRC (a checkout, built into OUTDIR/nccl-tests-build with MPI=1 against the
#             system NCCL): NT_OPS (all_reduce sendrecv all_gather reduce_scatter alltoall broadcast)
#             with byte checks (-c 1), NT_MIN to NT_MAX (8 to 128M, x4), NT_ITERS (20) and NT_WARMUP
#             (5) iterations, over NT_MODES (socket shim), with mpirun's default binding and
#             --bind-to none (NT_BINDS), NT_WORLDS (2 4) ranks; per-thread CPU profiles of the shim's
#             runs (NT_PROFILE=1); with NT_NETNS=1 and IP_BIN (iproute2's `ip`; LD_LIBRARY_PATH for
#             its libraries) also 2 ranks in two network namespaces joined by a veth pair: the raw
#             TCP ceiling across it and NT_NETNS_REPEAT (3) runs of NT_NETNS_OPS
#             (all_reduce,sendrecv); then nccl-tests.md and nccl-tests-w<N>[-netns].svg
#   multi     with GPUS=N (N > 1): one rank per GPU on N GPUs, the shim over N loopback devices
#             (NCCL_TCPXSHIM_TCP_ADDRS=127.0.0.1,...,127.0.0.N, each with its GPU's PCI path, so that
#             NCCL's topology search can give each GPU its own device); collectives over shim and
#             socket, which device each rank's channels used (logcheck.py devices), and the sweep
# Modes (launch.py MODES): shim = the plugin over its built-in transport (defaults: transparent
# recovery on); shim-metrics = the same with its metrics writing a file per rank every second;
# shim-norecovery = the same with recovery off (NCCL_TCPXSHIM_RECOVERY=0); socket = NCCL's own
# Socket transport; socket44 = Socket with 4 threads x 4 sockets.
#
# OUTDIR gets summary.txt, results.md, busbw.svg, sweeps.json, metrics.md, metrics-throughput.svg,
# logs.tar.gz and logs/ (every rank's log, each part's JSON and check output). Exit status 0 when every
# part passed.
#
# Settings (environment): QUICK=1 (as --quick: fewer sizes and iterations), PYTHON (python3),
# WORLDS ("2 4": rank counts of the correctness runs), PARTS ("ceiling coll counters metrics ddp
# sweep profile nccltests multi"), TCPXSHIM_BIN (the tcpxshim command, for the ceiling and metrics parts),
# SWEEP_MODES ("socket socket44 shim"), SUITE_BUDGET_S (470: the seconds of the PyTorch parts; the nccltests part has NT_TIMEOUT_S, 240, per mpirun; a
# run's timeout is cut to what is left, and runs are skipped once less than 45 s is left),
# SHIM_NET_NAME (tcpxshim: the network name NCCL should report for the shim), COLL_SIZES (element
# counts, comma separated), SWEEP_MAX_SIZE and SWEEP_MIN_SIZE (bytes), SWEEP_REPEAT (timed
# iterations x this), COUNTERS_SIZE (bytes, 67108864),
# COUNTERS_ITERS (20; both also for the metrics part), METRICS_MIN_SCRAPES (5: valid pages of
# `tcpxshim metrics serve` wanted), DDP_STEPS (30), SWEEP_OPS (all_reduce,sendrecv), SWEEP_TIMEOUT_S (120),
# PROFILE_MIN_SIZE and PROFILE_MAX_SIZE (bytes, 33554432 and 134217728), PROFILE_REPEAT (40),
# PROFILE_INTERVAL (seconds between samples, 0.5), GPUS (1: every rank on GPU 0 under MPS; N > 1 adds
# the multi part). Tests of the suite itself, without a GPU:
# python3 gpu/tests/test_suite.py
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
quick="${QUICK:-0}"
pos=()
for a in "$@"; do
  case "$a" in
    --quick) quick=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "run.sh: unknown option $a" >&2; usage >&2; exit 2 ;;
    *) pos+=("$a") ;;
  esac
done
if [[ ${#pos[@]} -ne 2 ]]; then usage >&2; exit 2; fi
if [[ ! -f "${pos[0]}" ]]; then echo "run.sh: no plugin library at ${pos[0]}" >&2; exit 2; fi
so="$(realpath "${pos[0]}")"
mkdir -p "${pos[1]}/logs" || exit 2
out="$(realpath "${pos[1]}")"
logs="$out/logs"
rm -f "$logs"/*.log "$logs"/*.json "$logs"/*.pids "$logs"/*.txt "$logs"/*.tmp "$logs"/*.out \
  "$out/summary.txt" "$out/results.md" "$out/busbw.svg" "$out/sweeps.json" "$out/logs.tar.gz" \
  "$out/multi-results.md" "$out/multi-busbw.svg" "$out"/nccl-tests*.svg "$out/nccl-tests.md" "$out/multi-sweeps.json" "$out/metrics.md" "$out/metrics-throughput.svg"

PY="${PYTHON:-python3}"
WORLDS="${WORLDS:-2 4}"
PARTS="${PARTS:-ceiling coll counters metrics ddp sweep profile nccltests multi}"
GPUS="${GPUS:-1}"
SWEEP_MODES="${SWEEP_MODES:-socket socket44 shim}"
budget="${SUITE_BUDGET_S:-470}"
net_name="${SHIM_NET_NAME:-tcpxshim}"
qargs=()
[[ "$quick" == 1 ]] && qargs=(--quick)
t_start=$SECONDS

has_part() { [[ " $PARTS " == *" $1 "* ]]; }

# ------------------------------------------------------------------------------------------------
# Results of the parts: "STATUS|name|detail" (STATUS: PASS FAIL SKIP WARN).
results=()
record() {
  results+=("$1|$2|$3")
  printf '%-7s %s: %s\n' "$1" "$2" "$3"
}

# ------------------------------------------------------------------------------------------------
# MPS, and cleanup on every exit.
export CUDA_MPS_PIPE_DIRECTORY="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/tcpxshim-mps-pipe}"
export CUDA_MPS_LOG_DIRECTORY="${CUDA_MPS_LOG_DIRECTORY:-/tmp/tcpxshim-mps-log}"
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
mps_msg="not started"
mps_ours=0
cur_pid=""
bg_pids=() # background helpers started here (metrics serve, the watcher): stopped on exit

kill_leftovers() {
  local f pid
  for f in "$logs"/*.pids; do
    [[ -f "$f" ]] || continue
    # shellcheck disable=SC2013 # one line of pids, split on purpose
    for pid in $(cat "$f"); do
      if [[ -r "/proc/$pid/cmdline" ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$here/"; then
        echo "run.sh: killing leftover rank process group $pid ($(basename "$f" .pids))"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
      fi
    done
  done
}

# stop_bg PID GRACE_S: waits up to GRACE_S seconds for a process started here to exit by itself, then
# SIGTERM, and SIGKILL 5 s later.
stop_bg() {
  local pid="$1" i
  for ((i = 0; i < $2 * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
}

cleanup() {
  trap - EXIT INT TERM HUP
  if [[ -n "$cur_pid" ]]; then
    kill -TERM "$cur_pid" 2>/dev/null
    wait "$cur_pid" 2>/dev/null
  fi
  local pid
  for pid in "${bg_pids[@]}"; do
    kill -0 "$pid" 2>/dev/null && stop_bg "$pid" 0
  done
  kill_leftovers
  if [[ "$mps_ours" == 1 ]]; then
    echo quit | timeout 30 nvidia-cuda-mps-control >/dev/null 2>&1 || echo "run.sh: stopping MPS failed"
  fi
}
on_signal() {
  echo "run.sh: interrupted by SIG$1; stopping"
  cleanup
  exit 130
}
trap cleanup EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap 'on_signal HUP' HUP

if command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
  if nvidia-cuda-mps-control -d >/dev/null 2>&1; then
    mps_msg="daemon started (pipe $CUDA_MPS_PIPE_DIRECTORY)"
    mps_ours=1
  else
    mps_msg="nvidia-cuda-mps-control -d failed (a daemon already running on $CUDA_MPS_PIPE_DIRECTORY?)"
    [[ "$CUDA_MPS_PIPE_DIRECTORY" == /tmp/tcpxshim-mps-pipe ]] && mps_ours=1
  fi
else
  mps_msg="nvidia-cuda-mps-control not found: ranks time-slice the GPU, latencies are not meaningful"
fi
echo "MPS: $mps_msg"

# ------------------------------------------------------------------------------------------------
# run_ranks LABEL WORLD MODE TIMEOUT_S [--env K=V ...] -- PROGRAM ARGS...
# Runs one run through launch.py (one process per rank, logs in $logs); returns its status, or 3
# when the suite's time budget is spent.
run_ranks() {
  local label="$1" world="$2" mode="$3" t="$4"
  shift 4
  local extra=()
  while [[ $# -gt 0 && "$1" != "--" ]]; do extra+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  local left=$((budget - (SECONDS - t_start)))
  if ((left < 45)); then
    echo "SKIP $label: the suite's time budget (${budget} s) is spent"
    return 3
  fi
  ((t > left - 15)) && t=$((left - 15))
  echo
  echo "=== $label: $world ranks, mode $mode, timeout ${t} s ($(date +%T), suite at $((SECONDS - t_start)) s)"
  timeout -k 10 $((t + 45)) "$PY" "$here/launch.py" --label "$label" --world "$world" --mode "$mode" \
    --plugin "$so" --logdir "$logs" --timeout "$t" "${extra[@]}" -- "$PY" "$@" &
  cur_pid=$!
  wait "$cur_pid"
  local rc=$?
  cur_pid=""
  if [[ $rc == 124 ]]; then
    restart_mps "$label timed out"
  fi
  return "$rc"
}

# restart_mps WHY: ranks killed while their kernels ran can leave MPS refusing new clients
# (cudaErrorDevicesUnavailable): start it afresh (only the daemon this script started).
restart_mps() {
  [[ "$mps_ours" == 1 ]] || return 0
  echo "run.sh: $1; restarting MPS for the runs that follow"
  echo quit | timeout 30 nvidia-cuda-mps-control >/dev/null 2>&1
  sleep 2
  nvidia-cuda-mps-control -d >/dev/null 2>&1 || echo "run.sh: restarting MPS failed"
}

# check NAME ARGS...: runs a checker, its output also to $logs/NAME.txt; returns its status.
check() {
  local name="$1"
  shift
  "$PY" "$@" 2>&1 | tee "$logs/$name.txt"
  return "${PIPESTATUS[0]}"
}

# run_detail LABEL: one line for the summary: why the run failed, else rank 0's last '@@' line.
run_detail() {
  local f="$logs/$1.launch.txt"
  if grep -q '^REASON ' "$f" 2>/dev/null; then
    grep -h '^REASON ' "$f" | head -1 | cut -c8- | cut -c1-300
  else
    grep -h '^@@ ' "$logs/$1.rank0.log" 2>/dev/null | tail -1 | cut -c4- | cut -c1-300
  fi
}

status_word() { if [[ "$1" == 0 ]]; then echo PASS; else echo FAIL; fi; }

# record_check STATUS NAME DETAIL: the summary line of a checker whose exit status means pass (0),
# partly (3) or fail (anything else).
record_check() {
  case $1 in
    0) record PASS "$2" "$3" ;;
    3) record WARN "$2" "$3" ;;
    *) record FAIL "$2" "$3" ;;
  esac
}

# net_check LABEL WORLD MODE: the log checks of a finished run (logcheck.py net); returns their status.
net_check() {
  if [[ $3 == shim* ]]; then
    check "$1.netcheck" "$here/logcheck.py" net --shim --expect "$net_name" --label "$1" --world "$2" --logdir "$logs"
  else
    check "$1.netcheck" "$here/logcheck.py" net --expect Socket --label "$1" --world "$2" --logdir "$logs"
  fi
}

# part_detail LABEL RANKS_STATUS LOGCHECK_STATUS: the summary's line for a run.
part_detail() {
  local d
  d="ranks $(status_word "$2"), log check $(status_word "$3"): $(run_detail "$1")"
  if [[ $3 != 0 ]]; then
    d="$d; log check: $(grep -h 'PROBLEM:' "$logs/$1.netcheck.txt" 2>/dev/null | head -1 | sed 's/^ *PROBLEM: //' | cut -c1-200)"
  fi
  echo "$d"
}

# run_part LABEL WORLD MODE TIMEOUT [launch.py options] -- PROGRAM ARGS...: one run (run_ranks), its
# log checks and its summary line. Returns 0 when both passed, 3 when skipped for lack of time, else
# 1; last_rc is the ranks' own status.
run_part() {
  local label="$1" world="$2" mode="$3"
  run_ranks "$@"
  last_rc=$?
  if [[ $last_rc == 3 ]]; then
    record SKIP "$label" "time budget spent"
    return 3
  fi
  net_check "$label" "$world" "$mode"
  local lrc=$?
  record "$(status_word $((last_rc || lrc)))" "$label" "$(part_detail "$label" "$last_rc" "$lrc")"
  return $((last_rc || lrc))
}

# ------------------------------------------------------------------------------------------------
# Preflight: Python, torch, the GPU.
echo "=== tcpxshim GPU suite: plugin $so, out $out, quick=$quick, budget ${budget} s"
preflight() {
  timeout 120 "$PY" -c '
import torch
v = torch.cuda.nccl.version()
v = ".".join(map(str, v)) if isinstance(v, tuple) else v
ok = torch.cuda.is_available()
name = torch.cuda.get_device_name(0) if ok else "none"
torch.zeros(1, device="cuda:0").add_(1).cpu()
print(f"torch {torch.__version__}, NCCL {v}, CUDA {torch.version.cuda}, GPU: {name}")
' 2>&1
}
preflight_out="$(preflight)"
pf_rc=$?
if [[ $pf_rc -ne 0 && "$mps_ours" == 1 ]]; then
  echo "$preflight_out" | tail -5
  echo "run.sh: CUDA does not work under MPS; stopping MPS and trying without it"
  echo quit | timeout 30 nvidia-cuda-mps-control >/dev/null 2>&1
  mps_ours=0
  unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  mps_msg="MPS FAILED (CUDA did not work under it): running without MPS, latencies are not meaningful"
  preflight_out="$(preflight)"
  pf_rc=$?
fi
echo "$preflight_out" | tail -5
if [[ $pf_rc -ne 0 ]]; then
  echo "FAIL preflight: $PY cannot use torch with CUDA (exit $pf_rc)"
  exit 2
fi
versions_line="$(echo "$preflight_out" | tail -1)"
if [[ "$mps_ours" == 1 ]]; then
  servers="$(echo get_server_list | timeout 10 nvidia-cuda-mps-control 2>/dev/null | tr '\n' ' ')"
  [[ -n "$servers" ]] && mps_msg="$mps_msg; MPS server pid(s): $servers" || mps_msg="$mps_msg; NO MPS server seen after the preflight"
  echo "MPS: $mps_msg"
fi

# ------------------------------------------------------------------------------------------------
# The ceiling: raw loopback TCP with plain sockets, and the shim's transport alone (host memory,
# no NCCL) when TCPXSHIM_BIN names the tcpxshim command.
if has_part ceiling; then
  check ceiling "$here/rawtcp.py" --streams 1,4,8 --seconds 2 --both
  rc=$?
  record "$(status_word "$rc")" "ceiling-rawtcp" "$(grep -E '^ +8 ' "$logs/ceiling.txt" | awk '{print "8 streams: " $2 " GB/s one way, " $3 " GB/s both ways"}')"
  # As two ranks bound to one core each (mpirun's default for 2 ranks) would get it.
  check ceiling-1core "$here/rawtcp.py" --streams 1,4 --seconds 2 --both --cpus 0,1
  rc=$?
  record "$(status_word "$rc")" "ceiling-rawtcp-1core" "$(grep -E '^ +4 ' "$logs/ceiling-1core.txt" | awk '{print "4 streams, one core per end: " $2 " GB/s one way, " $3 " GB/s both ways"}')"
  if [[ -n "${TCPXSHIM_BIN:-}" && -x "${TCPXSHIM_BIN:-}" ]]; then
    for st in 4 8; do
      NCCL_TCPXSHIM_TCP_STREAMS=$st timeout 120 "$TCPXSHIM_BIN" demo --min-size 1M --max-size 256M --bytes 1G 2>"$logs/demo-s$st.err" |
        tee "$logs/demo-s$st.txt"
      rc=${PIPESTATUS[0]}
      record "$(status_word "$rc")" "ceiling-demo-s$st" "tcpxshim demo, $st streams: $(grep -E '^ *256 MiB' "$logs/demo-s$st.txt" | tail -1 | tr -s ' ' | cut -c1-120)"
    done
  fi
fi

# ------------------------------------------------------------------------------------------------
coll_args=("${qargs[@]}")
[[ -n "${COLL_SIZES:-}" ]] && coll_args+=(--sizes "$COLL_SIZES")
sweep_args=("${qargs[@]}")
[[ -n "${SWEEP_MAX_SIZE:-}" ]] && sweep_args+=(--max-size "$SWEEP_MAX_SIZE")
[[ -n "${SWEEP_MIN_SIZE:-}" ]] && sweep_args+=(--min-size "$SWEEP_MIN_SIZE")
[[ -n "${SWEEP_REPEAT:-}" ]] && sweep_args+=(--repeat "$SWEEP_REPEAT")

if has_part coll; then
  for mode in shim socket; do
    for w in $WORLDS; do
      run_part "coll-$mode-w$w" "$w" "$mode" 150 -- "$here/collectives.py" "${coll_args[@]}"
    done
  done
fi

# ------------------------------------------------------------------------------------------------
if has_part counters; then
  label="counters-shim-w2"
  spec="$logs/counters.json"
  run_ranks "$label" 2 shim 120 --env NCCL_PROTO=Simple --env NCCL_ALGO=Ring -- "$here/counters.py" \
    --json "$spec" --size "${COUNTERS_SIZE:-67108864}" --iters "${COUNTERS_ITERS:-20}"
  rc=$?
  if [[ $rc == 3 ]]; then
    record SKIP "$label" "time budget spent"
  else
    net_check "$label" 2 shim
    lrc=$?
    check "$label.counters" "$here/logcheck.py" counters --spec "$spec" --label "$label" --world 2 --logdir "$logs"
    crc=$?
    detail="$(part_detail "$label" "$rc" "$lrc")"
    detail="$detail; counters $(status_word "$crc"): $(grep -h 'send bytes against' "$logs/$label.counters.txt" 2>/dev/null | head -1 | sed 's/^ *//')"
    [[ $crc != 0 ]] && detail="$detail; $(grep -h 'PROBLEM:' "$logs/$label.counters.txt" | head -1 | sed 's/^ *PROBLEM: //' | cut -c1-200)"
    record "$(status_word $((rc || lrc || crc)))" "$label" "$detail"
  fi
fi

# ------------------------------------------------------------------------------------------------
# The metrics: each rank's metrics file against a ring all-reduce's traffic, exactly
# (metrics.py); meanwhile `tcpxshim metrics serve` on the files, its page fetched every 0.5 s, and
# every new version of the files copied aside (metricswatch.py watch); then metrics-throughput.svg and
# metrics.md from the copies, and the checks (metricswatch.py check).
if has_part metrics; then
  label="metrics-shim-w2"
  mdir="$logs/metrics-prom"
  snaps="$logs/metrics-snapshots"
  stop="$logs/metrics-watch.stop"
  rm -rf "$mdir" "$snaps"
  rm -f "$stop" "$logs"/metrics.rank*.json "$logs"/metrics.rank*.prom "$logs/metrics-watch.json"
  mkdir -p "$mdir"
  serve_pid=""
  watch_args=()
  no_serve=""
  if [[ -n "${TCPXSHIM_BIN:-}" && -x "${TCPXSHIM_BIN:-}" ]]; then
    port="$("$PY" -c "import sys; sys.path.insert(0, sys.argv[1]); import launch; print(launch.free_port())" "$here")"
    "$TCPXSHIM_BIN" metrics serve "$mdir" --listen "127.0.0.1:$port" >"$logs/metrics-serve.txt" 2>&1 &
    serve_pid=$!
    bg_pids+=("$serve_pid")
    watch_args=(--url "http://127.0.0.1:$port/metrics")
  else
    no_serve="TCPXSHIM_BIN not set"
  fi
  "$PY" "$here/metricswatch.py" watch --dir "$mdir" --snapshots "$snaps" --json "$logs/metrics-watch.json" \
    --interval 0.5 --stop-file "$stop" --max-seconds 400 "${watch_args[@]}" >"$logs/metrics-watch.txt" 2>&1 &
  watch_pid=$!
  bg_pids+=("$watch_pid")
  run_ranks "$label" 2 shim 120 --env NCCL_PROTO=Simple --env NCCL_ALGO=Ring --env "NCCL_TCPXSHIM_METRICS_DIR=$mdir" \
    --env NCCL_TCPXSHIM_METRICS_INTERVAL=1 -- "$here/metrics.py" --json "$logs/metrics.rank{rank}.json" \
    --size "${COUNTERS_SIZE:-67108864}" --iters "${COUNTERS_ITERS:-20}"
  rc=$?
  touch "$stop"
  stop_bg "$watch_pid" 15
  [[ -n "$serve_pid" ]] && stop_bg "$serve_pid" 0
  rm -f "$stop"
  if [[ $rc == 3 ]]; then
    record SKIP "$label" "time budget spent"
  else
    net_check "$label" 2 shim
    lrc=$?
    "$PY" "$here/metricswatch.py" render --snapshots "$snaps" --svg "$out/metrics-throughput.svg" --md "$out/metrics.md" \
      --jobs "$logs/metrics.rank{rank}.json" --world 2 --watch "$logs/metrics-watch.json" >"$logs/metrics-render.txt" 2>&1
    if [[ -n "$no_serve" ]]; then
      check "$label.metrics" "$here/metricswatch.py" check --jobs "$logs/metrics.rank{rank}.json" --world 2 \
        --svg "$out/metrics-throughput.svg" --no-serve "$no_serve"
    else
      check "$label.metrics" "$here/metricswatch.py" check --jobs "$logs/metrics.rank{rank}.json" --world 2 \
        --svg "$out/metrics-throughput.svg" --watch "$logs/metrics-watch.json" --min-scrapes "${METRICS_MIN_SCRAPES:-5}"
    fi
    mrc=$?
    detail="$(part_detail "$label" "$rc" "$lrc")"
    detail="$detail; metrics $(if [[ $mrc == 1 ]]; then echo FAIL; else echo PASS; fi): $(grep -h '^summary: ' "$logs/$label.metrics.txt" | cut -c10-)"
    [[ $mrc == 1 ]] && detail="$detail; $(grep -h 'PROBLEM:' "$logs/$label.metrics.txt" | head -1 | sed 's/^ *PROBLEM: //' | cut -c1-200)"
    record "$(status_word $((rc || lrc || mrc == 1)))" "$label" "$detail"
    [[ -n "$no_serve" ]] && record SKIP "metrics-serve" "\`tcpxshim metrics serve\` not checked: $no_serve"
  fi
fi

# ------------------------------------------------------------------------------------------------
if has_part ddp; then
  ddp_ok=1
  for mode in shim socket; do
    label="ddp-$mode-w2"
    rm -f "$logs/ddp-$mode.json"
    run_part "$label" 2 "$mode" 120 -- "$here/ddp.py" train --json "$logs/ddp-$mode.json" --steps "${DDP_STEPS:-30}"
    [[ $last_rc == 0 ]] || ddp_ok=0
  done
  if [[ $ddp_ok == 1 ]]; then
    check ddp-compare "$here/ddp.py" compare "$logs/ddp-shim.json" "$logs/ddp-socket.json"
    rc=$?
    record "$(status_word "$rc")" "ddp-compare" "$(sed -n '1p' "$logs/ddp-compare.txt" | sed 's/^ *//')"
  else
    record SKIP "ddp-compare" "a ddp run failed or was skipped"
  fi
fi

# ------------------------------------------------------------------------------------------------
sweep_jsons=()
if has_part sweep; then
  for mode in $SWEEP_MODES; do
    label="sweep-$mode-w2"
    js="$logs/sweep-$mode.json"
    rm -f "$js"
    run_part "$label" 2 "$mode" "${SWEEP_TIMEOUT_S:-120}" -- "$here/sweep.py" --label "$mode" --json "$js" \
      --ops "${SWEEP_OPS:-all_reduce,sendrecv}" "${sweep_args[@]}"
    [[ -f "$js" ]] && sweep_jsons+=("$js")
  done
  "$PY" "$here/report.py" merge --out "$out/sweeps.json" "${sweep_jsons[@]}"
  if [[ ${#sweep_jsons[@]} -gt 0 ]]; then
    "$PY" "$here/report.py" render "$out/sweeps.json" --md "$out/results.md" --svg "$out/busbw.svg" --print \
      >"$logs/sweep-tables.txt" 2>&1
    rrc=$?
    record "$(status_word "$rrc")" "report" "results.md, busbw.svg from ${#sweep_jsons[@]} sweeps"
  else
    record FAIL "report" "no sweep produced results"
  fi
fi

# ------------------------------------------------------------------------------------------------
# Communicator churn (not in the default PARTS): new_group + all_reduce + destroy, CHURN_CYCLES (20)
# times, over CHURN_MODES (socket, the shim with its pool off, on).
if has_part churn; then
  for mode in ${CHURN_MODES:-socket shim-churn-nopool shim-churn}; do
    rm -rf "/tmp/tcpxshim-churn-metrics"
    run_part "churn-$mode-w2" 2 "$mode" "${CHURN_TIMEOUT_S:-180}" -- "$here/churn.py" \
      --cycles "${CHURN_CYCLES:-20}" --json "$logs/churn-$mode.json"
  done
fi

# ------------------------------------------------------------------------------------------------
# Faults (not in the default PARTS): DDP training while `tcpxshim drop` shuts the shim's connections
# down from outside every few seconds, against the same training undisturbed (identical losses
# wanted), and a rank killed mid-job (the survivor must fail within seconds, naming the peer).
if has_part faults; then
  fport=$((51000 + RANDOM % 1000 * 10))
  franges="NCCL_TCPXSHIM_TCP_PORT_RANGE=$fport-$((fport + 127))"
  fsteps="${FAULT_STEPS:-150}"
  fenv=(--env "$franges")
  for kv in ${FAULT_ENV:-}; do fenv+=(--env "$kv"); done
  for run in nofault drop; do
    label="ddp-shim-$run-w2"
    rm -f "$logs/ddp-shim-$run.json" "$logs/$label.drops.txt" "$logs/$label.pids"
    if [[ $run == drop ]]; then
      (
        for _ in $(seq 1 300); do [[ -s "$logs/$label.pids" ]] && break; sleep 0.1; done
        sleep "${FAULT_FIRST_S:-3}"
        for p in $(cat "$logs/$label.pids" 2>/dev/null); do
          "${TCPXSHIM_BIN:-tcpxshim}" drop --pid "$p" --every "${FAULT_EVERY_S:-2}" --count "${FAULT_ROUNDS:-5}" \
            --filter $(seq "$fport" $((fport + 127))) &
        done
        wait
      ) >"$logs/$label.drops.txt" 2>&1 &
      dropper=$!
    fi
    run_part "$label" 2 shim 180 "${fenv[@]}" -- "$here/ddp.py" train --json "$logs/ddp-shim-$run.json" \
      --steps "$fsteps" --step-sleep "${FAULT_STEP_SLEEP:-0.1}"
    [[ $run == drop ]] && wait "$dropper"
    [[ $last_rc == 0 ]] || restart_mps "$label failed"
  done
  if [[ -f "$logs/ddp-shim-nofault.json" && -f "$logs/ddp-shim-drop.json" ]]; then
    check ddp-drop-compare "$here/ddp.py" compare "$logs/ddp-shim-drop.json" "$logs/ddp-shim-nofault.json"
    crc=$?
    check ddp-drop-count "$here/faults.py" check-drops "$logs/ddp-shim-drop-w2.drops.txt"
    drc=$?
    record "$(status_word $((crc || drc)))" "ddp-drop-compare" \
      "$(sed -n '1p' "$logs/ddp-drop-count.txt"); $(sed -n '1p' "$logs/ddp-drop-compare.txt" | sed 's/^ *//')"
  else
    record FAIL "ddp-drop-compare" "a run left no losses: $(head -c 300 "$logs/ddp-shim-drop-w2.drops.txt" 2>/dev/null)"
  fi
  label="killpeer-shim-w2"
  run_ranks "$label" 2 shim 90 --grace 40 --env NCCL_TCPXSHIM_ABORT_ON_ERROR=1 "${fenv[@]}" \
    -- "$here/faults.py" killpeer --after "${FAULT_KILL_AFTER_S:-5}"
  check "$label.check" "$here/faults.py" check-kill "$logs/$label.launch.txt" "$logs/$label.rank0.log" \
    --within "${FAULT_KILL_WITHIN_S:-10}"
  krc=$?
  restart_mps "$label killed a rank"
  record "$(status_word "$krc")" "$label" "$(grep -h '^PASS\|^FAIL' "$logs/$label.check.txt" | head -1)"
fi

# ------------------------------------------------------------------------------------------------
# Where the time goes: per-thread CPU use during a shim all-reduce sweep to 128 MiB.
if has_part profile; then
  for mode in ${PROFILE_MODES:-shim}; do
    label="profile-$mode-w2"
    pout="$logs/profile.txt"
    [[ "$mode" != shim ]] && pout="$logs/profile-$mode.txt"
    "$PY" "$here/threadprof.py" --match "--label $mode-profile" --interval "${PROFILE_INTERVAL:-0.5}" \
      --max-seconds 150 --wait 60 >"$pout" 2>&1 &
    prof_pid=$!
    run_ranks "$label" 2 "$mode" 150 -- "$here/sweep.py" --label "$mode-profile" --json "$logs/profile-$mode.json" \
      --ops "${PROFILE_OPS:-all_reduce}" --min-size "${PROFILE_MIN_SIZE:-33554432}" \
      --max-size "${PROFILE_MAX_SIZE:-134217728}" --repeat "${PROFILE_REPEAT:-40}"
    rc=$?
    wait "$prof_pid"
    prc=$?
    if [[ $rc == 3 ]]; then
      record SKIP "$label" "time budget spent"
    else
      record "$(status_word $((rc || prc)))" "$label" "$(head -1 "$pout")"
    fi
  done
fi

# ------------------------------------------------------------------------------------------------
# nccl-tests under mpirun: every operation of NT_OPS through NT_MODES (socket, shim), with mpirun's
# default binding and --bind-to none (NT_BINDS), NT_WORLDS ranks; byte checks on. nccl-tests comes
# from NCCL_TESTS_BIN (built *_perf) or NCCL_TESTS_SRC (a checkout, built here into logs/).
# With NT_NETNS=1 and IP_BIN (the `ip` command) also 2 ranks in two network namespaces joined by a
# veth pair, NT_NETNS_REPEAT (3) runs of NT_NETNS_OPS, and the raw TCP ceiling across the pair.
nt_built() {
  local d="$1" op
  for op in ${NT_OPS:-all_reduce sendrecv all_gather reduce_scatter alltoall broadcast}; do
    [[ -x "$d/${op}_perf" ]] || return 1
  done
}
# nt_run TAG nccltests.py-run-options...: one nccltests.py run (the shared options added), its output
# in logs/TAG.txt, its JSON kept for the report, its summary line.
nt_run() {
  local tag="$1" nrc
  shift
  echo
  echo "=== $tag ($(date +%T), suite at $((SECONDS - t_start)) s)"
  "$PY" "$here/nccltests.py" run --bindir "$nt_bin" --plugin "$so" --logdir "$logs" --json "$logs/$tag.json" \
    "${nt_args[@]}" --timeout "${NT_TIMEOUT_S:-240}" "$@" 2>&1 | tee "$logs/$tag.txt"
  nrc=${PIPESTATUS[0]}
  [[ -f "$logs/$tag.json" ]] && nt_jsons+=("$logs/$tag.json")
  record "$(status_word "$nrc")" "$tag" "$(grep -c '^PASS' "$logs/$tag.txt") of $(grep -c '^PASS\|^FAIL' "$logs/$tag.txt") runs passed; $(grep -h '^FAIL' "$logs/$tag.txt" | head -1 | cut -c1-160)"
}
if has_part nccltests; then
  nt_bin="${NCCL_TESTS_BIN:-}"
  if [[ -z "$nt_bin" && -n "${NCCL_TESTS_SRC:-}" ]]; then
    nt_bin="$out/nccl-tests-build"
    check nccltests-build "$here/nccltests.py" build --src "$NCCL_TESTS_SRC" --builddir "$nt_bin"
    record "$(status_word $?)" "nccltests-build" "$(tail -1 "$logs/nccltests-build.txt")"
  fi
  if [[ -z "$nt_bin" ]]; then
    record SKIP "nccltests" "set NCCL_TESTS_SRC (an nccl-tests checkout) or NCCL_TESTS_BIN (its built *_perf)"
  elif ! command -v mpirun >/dev/null 2>&1; then
    record SKIP "nccltests" "no mpirun on PATH"
  elif ! nt_built "$nt_bin"; then
    record FAIL "nccltests" "no nccl-tests binaries in $nt_bin"
  else
    nt_ops="$(echo ${NT_OPS:-all_reduce sendrecv all_gather reduce_scatter alltoall broadcast} | tr ' ' ,)"
    nt_args=(--min "${NT_MIN:-8}" --max "${NT_MAX:-128M}" --iters "${NT_ITERS:-20}" --warmup "${NT_WARMUP:-5}")
    [[ "$quick" == 1 ]] && nt_args=(--min 8 --max 1M --iters 3 --warmup 1)
    nt_jsons=()
    for w in ${NT_WORLDS:-2 4}; do
      for bind in ${NT_BINDS:-default none}; do
        for mode in ${NT_MODES:-socket shim}; do
          prof=()
          [[ $mode == shim* && "${NT_PROFILE:-1}" == 1 ]] && prof=(--profile)
          nt_run "nt-$mode-$bind-w$w" --mode "$mode" --ranks "$w" --bind "$bind" --ops "$nt_ops" "${prof[@]}"
        done
      done
    done
    if [[ "${NT_NETNS:-0}" == 1 ]]; then
      if [[ -z "${IP_BIN:-}" ]]; then
        record SKIP "nccltests-netns" "NT_NETNS=1 needs IP_BIN (the ip command of iproute2)"
      elif check nccltests-netns-up "$here/nccltests.py" netns up --ip "$IP_BIN"; then
        check ceiling-netns "$here/rawtcp.py" --streams 1,4,8 --seconds 2 --both --netns tcpxshim-ns0,tcpxshim-ns1 \
          --addrs 10.231.9.1,10.231.9.2
        record "$(status_word $?)" "ceiling-rawtcp-netns" "$(grep -E '^ +8 ' "$logs/ceiling-netns.txt" | awk '{print "8 streams: " $2 " GB/s one way, " $3 " GB/s both ways"}')"
        for mode in ${NT_MODES:-socket shim}; do
          nt_run "nt-$mode-none-w2-netns" --mode "$mode" --ranks 2 --bind none --netns tcpxshim-ns0,tcpxshim-ns1 \
            --ifname tsv --ops "${NT_NETNS_OPS:-all_reduce,sendrecv}" --repeat "${NT_NETNS_REPEAT:-3}"
        done
        "$PY" "$here/nccltests.py" netns down --ip "$IP_BIN" >/dev/null
      else
        record FAIL "nccltests-netns" "$(tail -1 "$logs/nccltests-netns-up.txt")"
      fi
    fi
    if [[ ${#nt_jsons[@]} -gt 0 ]]; then
      "$PY" "$here/nccltests.py" report "${nt_jsons[@]}" --md "$out/nccl-tests.md" --svg-prefix "$out/nccl-tests" \
        >"$logs/nccltests-report.txt" 2>&1
      record "$(status_word $?)" "nccltests-report" "$(tail -1 "$logs/nccltests-report.txt")"
    fi
  fi
fi

# ------------------------------------------------------------------------------------------------
# One rank per GPU, one shim device per GPU.
multi_addrs() {
  local i=0 bus path list=()
  while read -r bus; do
    [[ -z "$bus" ]] && continue
    ((i >= GPUS)) && break
    bus="$(echo "$bus" | tr 'A-F' 'a-f')"
    path="/sys/bus/pci/devices/${bus: -12}"
    if [[ -e "$path" ]]; then list+=("127.0.0.$((i + 1))=$path"); else list+=("127.0.0.$((i + 1))"); fi
    i=$((i + 1))
  done < <(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader 2>/dev/null)
  while ((i < GPUS)); do list+=("127.0.0.$((i + 1))"); i=$((i + 1)); done
  (IFS=,; echo "${list[*]}")
}
if has_part multi && ((GPUS > 1)); then
  export NCCL_TCPXSHIM_TCP_ADDRS="${NCCL_TCPXSHIM_TCP_ADDRS:-$(multi_addrs)}"
  echo "multi: $GPUS GPUs, NCCL_TCPXSHIM_TCP_ADDRS=$NCCL_TCPXSHIM_TCP_ADDRS"
  for mode in shim socket; do
    label="multi-coll-$mode-g$GPUS"
    run_part "$label" "$GPUS" "$mode" 150 --gpus "$GPUS" -- "$here/collectives.py" "${coll_args[@]}"
    [[ $? == 3 ]] && continue
    if [[ $mode == shim ]]; then
      check "$label.devices" "$here/logcheck.py" devices --label "$label" --world "$GPUS" --gpus "$GPUS" --logdir "$logs"
      record_check $? "devices-g$GPUS" "$(tail -1 "$logs/$label.devices.txt")"
    fi
  done
  multi_jsons=()
  for mode in socket shim; do
    label="multi-sweep-$mode-g$GPUS"
    js="$logs/multi-sweep-$mode.json"
    rm -f "$js"
    run_part "$label" "$GPUS" "$mode" "${SWEEP_TIMEOUT_S:-120}" --gpus "$GPUS" -- "$here/sweep.py" --label "$mode" \
      --json "$js" --ops "${SWEEP_OPS:-all_reduce,sendrecv}" "${sweep_args[@]}"
    [[ -f "$js" ]] && multi_jsons+=("$js")
  done
  if [[ ${#multi_jsons[@]} -gt 0 ]]; then
    "$PY" "$here/report.py" merge --out "$out/multi-sweeps.json" "${multi_jsons[@]}" &&
      "$PY" "$here/report.py" render "$out/multi-sweeps.json" --md "$out/multi-results.md" --svg "$out/multi-busbw.svg" \
        --print >"$logs/multi-sweep-tables.txt" 2>&1
    rrc=$?
    record "$(status_word "$rrc")" "multi-report" "multi-results.md, multi-busbw.svg from ${#multi_jsons[@]} sweeps"
  fi
fi

# ------------------------------------------------------------------------------------------------
# Summary.
elapsed=$((SECONDS - t_start))
n_pass=0 n_fail=0 n_skip=0 n_warn=0
for r in "${results[@]}"; do
  case "${r%%|*}" in
    PASS) n_pass=$((n_pass + 1)) ;;
    FAIL) n_fail=$((n_fail + 1)) ;;
    SKIP) n_skip=$((n_skip + 1)) ;;
    WARN) n_warn=$((n_warn + 1)) ;;
  esac
done
if ((n_fail > 0)); then overall=FAIL; elif ((n_skip > 0)); then overall=INCOMPLETE; else overall=PASS; fi

tar -czf "$out/logs.tar.gz" -C "$out" logs 2>/dev/null

{
  echo "tcpxshim GPU suite: $overall ($n_pass passed, $n_fail failed, $n_skip skipped, $n_warn warnings) in ${elapsed} s"
  echo "date: $(date -Is), host: $(hostname), quick: $quick"
  echo "plugin: $so ($(stat -c %s "$so") bytes, sha256 $(sha256sum "$so" | cut -c1-16)...)"
  echo "software: $versions_line"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
  fi
  echo "MPS: $mps_msg"
  echo
  echo "Parts:"
  for r in "${results[@]}"; do
    st="${r%%|*}"
    rest="${r#*|}"
    printf '  %-5s %-22s %s\n' "$st" "${rest%%|*}" "${rest#*|}"
  done
  for f in "$logs"/ceiling.txt "$logs"/ceiling-1core.txt "$logs"/ceiling-netns.txt "$logs"/counters-shim-w2.counters.txt "$logs"/metrics-shim-w2.metrics.txt "$logs"/ddp-compare.txt \
    "$logs"/profile.txt "$logs"/multi-coll-shim-g*.devices.txt; do
    [[ -f "$f" ]] || continue
    echo
    echo "$(basename "$f" .txt):"
    sed 's/^/  /' "$f"
  done
  if [[ -f "$logs/sweep-tables.txt" ]]; then
    echo
    echo "Sweeps (nccl-tests format; all_reduce in place, sendrecv out of place; 2 ranks):"
    echo
    cat "$logs/sweep-tables.txt"
  fi
  if [[ -f "$out/nccl-tests.md" ]]; then
    echo "nccl-tests (from nccl-tests.md):"
    grep -E '^(## |\| )' "$out/nccl-tests.md"
    echo
  fi
  if [[ -f "$out/results.md" ]]; then
    echo "Summary table (from results.md):"
    sed -n '/^## Summary/,/^## all-reduce/p' "$out/results.md" | sed '1d;$d'
  fi
  echo "Files in $out:"
  echo "  summary.txt   this summary"
  [[ -f "$out/results.md" ]] && echo "  results.md    tables per operation, one column per mode, ratios to socket"
  [[ -f "$out/busbw.svg" ]] && echo "  busbw.svg     busbw against size, one line per mode"
  [[ -f "$out/sweeps.json" ]] && echo "  sweeps.json   every sweep's rows"
  [[ -f "$out/nccl-tests.md" ]] && echo "  nccl-tests.md nccl-tests under mpirun: the shim against Socket per binding, every table; nccl-tests-w*.svg: plots"
  [[ -f "$out/metrics.md" ]] && echo "  metrics.md    the metrics part: per rank the byte deltas, per connection bytes, messages, GB/s"
  [[ -f "$out/metrics-throughput.svg" ]] && echo "  metrics-throughput.svg  each connection's throughput against time, from the metrics files"
  echo "  logs.tar.gz   logs/: every rank's log (<run>.rank<r>.log), each check's output, each part's JSON"
} >"$out/summary.txt"

echo
echo "================================================================================================"
cat "$out/summary.txt"
[[ $overall == PASS ]]
