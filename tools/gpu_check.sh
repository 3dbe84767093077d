#!/usr/bin/env bash
# One-shot GPU check: everything this project wants measured on one H100 / H200, in one script that
# fits in about 8 minutes, writing one JSON and one Markdown file.
#
#   bash tools/gpu_check.sh OUT_DIR             # on the GPU machine
#   bash tools/gpu_check.sh OUT_DIR --dry-run   # here, on CPU: tiny shapes, one step each (CI runs it)
#
# It runs:
#   1. the MONAI side-by-side (tools/benchmark_throughput.py): fp32 and bf16 / AMP, batch 2 and 8,
#      and batch 2 with MONAI's flash attention; MFU against the chip's bf16 peak, peak memory;
#   2. 50 real-size steps of the gpu_2mm tokenizer phases and LDM (tools/real_size_steps.py);
#   3. sampler (DDIM) and decoder throughput in volumes/s at 2 mm and 1 mm.
# Then OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md collect every part's numbers.
#
# It installs nothing from the network. The GPU image has jax (CUDA), flax, optax, orbax, torch,
# scipy, scikit-learn, pandas, matplotlib and tensorboard; it lacks grain, nibabel, ml-collections,
# array-record, portpicker, nilearn and monai. Download those here as Python 3.12 manylinux wheels
# (pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64
# -d .whl grain nibabel ml-collections array-record portpicker nilearn monai), carry .whl/, and set
# WHEELS=.whl: they are installed with --no-index into a private target directory.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR [--dry-run]}
DRY=${2:-}
mkdir -p "$OUT"
if [[ -n "${WHEELS:-}" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }
status=0
part() {   # part NAME TIMEOUT_S COMMAND...: a part that fails or times out is recorded, the others still run
  local name=$1 limit=$2; shift 2
  log "$name: $*"
  if ! timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then
    log "$name FAILED (see $OUT/$name.log)"; status=1; echo "$name" >> "$OUT/failed_parts.txt"
  fi
  tail -n 3 "$OUT/$name.log" || true
}

if [[ "$DRY" == "--dry-run" ]]; then
  FW=jax; python3 -c "import torch, monai" 2>/dev/null && FW=monai,jax
  part bench 300 python3 tools/benchmark_throughput.py --models vqvae --dtypes fp32 --frameworks "$FW" --batch 2 \
    --warmup 0 --steps 1 --rounds 1 --ddim-steps 1 --out "$OUT/bench_b2" --tag b2
  part steps_2mm 600 python3 tools/real_size_steps.py --config configs/quickstart.py --steps 2 --per-chip-batch 1 \
    --only "tokenizer,ldm" --out "$OUT/steps"
  part sample_2mm 300 python3 tools/real_size_steps.py --config configs/quickstart.py --steps 2 --per-chip-batch 1 \
    --only "sampler,decoder" --config.sample.steps=2 --out "$OUT/sample_2mm"
else
  part bench_b2 120 python3 tools/benchmark_throughput.py --batch 2 --out "$OUT/bench_b2" --tag b2
  part bench_b8 90 python3 tools/benchmark_throughput.py --batch 8 --ddim-steps 0 --out "$OUT/bench_b8" --tag b8
  part bench_flash 45 python3 tools/benchmark_throughput.py --batch 2 --dtypes bf16 --monai-flash-attention \
    --ddim-steps 0 --out "$OUT/bench_flash" --tag flash
  part steps_2mm 120 python3 tools/real_size_steps.py --config configs/gpu_2mm.py --steps 50 \
    --only "tokenizer,ldm" --out "$OUT/steps"
  part sample_2mm 40 python3 tools/real_size_steps.py --config configs/gpu_2mm.py --steps 3 \
    --only "sampler,decoder" --out "$OUT/sample_2mm"
  part sample_1mm 55 python3 tools/real_size_steps.py --config configs/gpu_1mm.py --steps 3 \
    --only "sampler,decoder" --out "$OUT/sample_1mm"
fi

python3 - "$OUT" <<'EOF'
import glob, json, os, platform, sys
out = sys.argv[1]
parts = {}
for path in sorted(glob.glob(os.path.join(out, "*", "*.json"))):
  parts[os.path.relpath(path, out)] = json.load(open(path))
failed = open(os.path.join(out, "failed_parts.txt")).read().split() if os.path.exists(os.path.join(out, "failed_parts.txt")) else []
json.dump({"host": platform.node(), "parts": parts, "failed_parts": failed}, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
md = ["# GPU check", "", f"host {platform.node()}; failed parts: {', '.join(failed) or 'none'}", ""]
for path in sorted(glob.glob(os.path.join(out, "*", "*.md"))):
  md += [f"## {os.path.relpath(path, out)}", "", open(path).read(), ""]
open(os.path.join(out, "gpu_check.md"), "w").write("\n".join(md))
print(f"wrote {out}/gpu_check.json and gpu_check.md ({len(parts)} parts, failed: {failed or 'none'})")
EOF
exit $status
