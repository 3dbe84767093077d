#!/usr/bin/env bash
# Run synthmri_jax on every host of a Cloud TPU pod slice (v4-32, v5p-64, ...): one process per
# host; jax.distributed finds its peers from the TPU metadata (synthmri_jax.training.distributed),
# each host reads its own grain shard and every host writes its part of each orbax checkpoint.
#
#   TPU_NAME=my-pod ZONE=us-central2-b [PROJECT=my-proj] launch/tpu_pod.sh [--setup] [--dry-run] -- \
#       --config configs/quickstart.py --workdir /mnt/shared/runs/pod1
#
#   --setup    first copy this checkout to every worker (REMOTE_DIR, default ~/synthmri_jax) and
#              pip install it with jax[tpu]; later runs only need it after code changes.
#   --dry-run  (or DRY_RUN=1) print the gcloud commands instead of running them.
#
# The workdir (and the prepared cohort the config points to) must be the same path on every host:
# a Filestore/NFS mount or a gcsfuse-mounted bucket. Run the `prepare` stage once before the
# training stages; it is not meant to run on every host at once.
# Extra environment for the remote processes: REMOTE_ENV="XLA_FLAGS=... TF_CPP_MIN_LOG_LEVEL=1".
set -euo pipefail

TPU_NAME="${TPU_NAME:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
REMOTE_DIR="${REMOTE_DIR:-~/synthmri_jax}"
REMOTE_ENV="${REMOTE_ENV:-}"
REMOTE_PYTHON="${REMOTE_PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
SETUP=0

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --setup) SETUP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
ARGS=("$@")
if [[ -z "$TPU_NAME" || -z "$ZONE" ]]; then
  echo "error: set TPU_NAME and ZONE (and PROJECT unless gcloud has a default project)" >&2
  exit 2
fi
if [[ ${#ARGS[@]} -eq 0 ]]; then
  echo "error: no arguments for python -m synthmri_jax.main (e.g. -- --config configs/x.py --workdir /mnt/shared/run)" >&2
  exit 2
fi

GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"; printf '\n'
  else
    "$@"
  fi
}

# The command line every host runs; arguments quoted once for the remote shell.
MAIN_ARGS="$(printf ' %q' "${ARGS[@]}")"
REMOTE_CMD="cd $REMOTE_DIR && ${REMOTE_ENV:+$REMOTE_ENV }$REMOTE_PYTHON -m synthmri_jax.main$MAIN_ARGS"

if [[ "$SETUP" == 1 ]]; then
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command="mkdir -p $REMOTE_DIR"
  run "${GCLOUD[@]}" scp --recurse "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/README.md" "$REPO_ROOT/synthmri_jax" \
    "$REPO_ROOT/configs" "$REPO_ROOT/launch" "$TPU_NAME:$REMOTE_DIR/" "${COMMON[@]}" --worker=all
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all \
    --command="cd $REMOTE_DIR && $REMOTE_PYTHON -m pip install -q -e . 'jax[tpu]'"
fi
run "${GCLOUD[@]}" ssh "$TPU_NAME" "${COMMON[@]}" --worker=all --command="$REMOTE_CMD"
