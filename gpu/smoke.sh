#!/usr/bin/env bash
# GPU smoke test: real NCCL (through PyTorch) loads the plugin, 2 ranks on one GPU forced onto
# the network plugin (distinct NCCL_HOSTID per rank, MPS on), checks results and NCCL's log.
# Usage: gpu/smoke.sh PLUGIN_SO [OUTDIR]
set -uo pipefail
so="$(realpath "$1")"
out="${2:-/tmp/tcpxshim-smoke}"
mkdir -p "$out"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d || true
trap 'echo quit | nvidia-cuda-mps-control' EXIT

run() { # label world extra-env...
  local label=$1 world=$2; shift 2
  local pids=() rc=0 port=$((29500 + RANDOM % 1000))
  for ((r = 0; r < world; r++)); do
    env "$@" SMOKE_LABEL="$label" RANK=$r WORLD_SIZE=$world MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      NCCL_HOSTID="smokehost$r" NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_SOCKET_IFNAME=lo \
      NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,NET PYTHONUNBUFFERED=1 \
      python3 "$(dirname "$0")/smoke.py" >"$out/$label.rank$r.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  echo "== $label: exit $rc"
  grep -h "TIMING" "$out/$label.rank0.log"
  return $rc
}

fail=0
for world in 2; do
  run "shim-w$world" $world NCCL_NET_PLUGIN="$so" NCCL_TCPXSHIM_TCP_IFNAME=lo || fail=1
  grep -h "NET/TCPXSHIM loaded" "$out/shim-w$world.rank0.log" | head -2
  grep -h "Using network" "$out/shim-w$world.rank0.log" | head -2
  grep -hc "via NET/tcpxshim" "$out/shim-w$world.rank0.log" | sed 's/^/channels via NET\/tcpxshim: /'
  grep -h "via NET/" "$out/shim-w$world.rank0.log" | grep -vc "NET/tcpxshim" | sed 's/^/channels via another NET: /'
  grep -h "NET/TCPXSHIM closed" "$out/shim-w$world.rank0.log" | head -3
  run "socket-w$world" $world NCCL_NET_PLUGIN=none NCCL_NET=Socket || fail=1
done
exit $fail
