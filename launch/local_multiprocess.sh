#!/usr/bin/env bash
# N local processes on CPU, each with D fake devices, joined through jax.distributed on localhost:
# the multi-host code path (per-process grain shards, cross-process collectives, orbax saves
# from every process) on one machine, e.g. before renting a pod.
#
#   launch/local_multiprocess.sh [-n N] [-d D] [--port P] [--logs DIR] [--dry-run] -- \
#       --config configs/quickstart.py --workdir runs/mp
#
# Process i gets SYNTHMRI_COORDINATOR=localhost:PORT, SYNTHMRI_NUM_PROCESSES=N,
# SYNTHMRI_PROCESS_ID=i (read by synthmri_jax.training.distributed.initialize) and
# XLA_FLAGS=--xla_force_host_platform_device_count=D. Process 0 prints to the terminal; every
# process also logs to DIR/process_<i>.log (default: <workdir>/logs). If one process fails, the
# others are stopped. DRY_RUN=1 or --dry-run prints the commands instead of running them.
set -euo pipefail

NPROC=2
DEVICES=2
PORT=""
LOGS=""
DRY_RUN="${DRY_RUN:-0}"
PYTHON="${PYTHON:-python}"

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) NPROC="$2"; shift 2 ;;
    -d|--devices-per-process) DEVICES="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --logs) LOGS="$2"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
ARGS=("$@")
if [[ ${#ARGS[@]} -eq 0 ]]; then
  echo "error: no arguments for python -m synthmri_jax.main (e.g. -- --config configs/quickstart.py --workdir runs/mp)" >&2
  exit 2
fi
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ && "$DEVICES" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: -n and -d must be positive integers (got $NPROC, $DEVICES)" >&2
  exit 2
fi

WORKDIR=""
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[$i]}" in
    --workdir=*) WORKDIR="${ARGS[$i]#--workdir=}" ;;
    --workdir) WORKDIR="${ARGS[$((i + 1))]:-}" ;;
  esac
done
LOGS="${LOGS:-${WORKDIR:-.}/logs}"

if [[ -z "$PORT" ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    PORT=12355
  else
    PORT="$("$PYTHON" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
  fi
fi

cmd_for() {
  printf 'SYNTHMRI_COORDINATOR=localhost:%s SYNTHMRI_NUM_PROCESSES=%s SYNTHMRI_PROCESS_ID=%s ' "$PORT" "$NPROC" "$1"
  printf 'JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=%s ' "$DEVICES"
  printf '%q -m synthmri_jax.main' "$PYTHON"
  printf ' %q' "${ARGS[@]}"
  printf ' > %q 2>&1\n' "$LOGS/process_$1.log"
}

if [[ "$DRY_RUN" == 1 ]]; then
  printf "mkdir -p %q\n" "$LOGS"
  for ((i = 0; i < NPROC; i++)); do cmd_for "$i"; done
  exit 0
fi

mkdir -p "$LOGS"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup INT TERM

for ((i = 0; i < NPROC; i++)); do
  SYNTHMRI_COORDINATOR="localhost:$PORT" SYNTHMRI_NUM_PROCESSES="$NPROC" SYNTHMRI_PROCESS_ID="$i" \
    JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES ${XLA_FLAGS:-}" \
    "$PYTHON" -m synthmri_jax.main "${ARGS[@]}" > "$LOGS/process_$i.log" 2>&1 &
  PIDS+=("$!")
done
echo "started $NPROC processes (pids ${PIDS[*]}), coordinator localhost:$PORT, logs in $LOGS"
tail -n +1 -f "$LOGS/process_0.log" &
TAIL=$!

status=0
remaining=$NPROC
while [[ $remaining -gt 0 ]]; do
  if wait -n "${PIDS[@]}"; then
    remaining=$((remaining - 1))
  else
    status=$?
    echo "a process exited with status $status; stopping the others (see $LOGS/process_*.log)" >&2
    cleanup
    wait "${PIDS[@]}" 2>/dev/null || true
    break
  fi
done
kill "$TAIL" 2>/dev/null || true
exit "$status"
