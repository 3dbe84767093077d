"""Run every program of a config at its real shapes on this machine's devices, on random inputs:
N train steps of each model (tokenizer phases, LDM, classifier, segmenter, privacy encoder), the
sampler's denoising loop and the decoder. It proves a real-size config runs, and times it.

    python3 tools/real_size_steps.py --config configs/gpu_2mm.py --steps 1 --per-chip-batch 1   # CPU smoke
    python3 tools/real_size_steps.py --config configs/gpu_2mm.py --steps 50 --only tokenizer,ldm  # on a GPU

The programs are tools/aot_compile.py's (the trainer's own jitted step, the sample stage's
Generator and decoder), so what runs here is what the pipeline runs. Inputs are random arrays of
the loader's shapes and dtypes (images in [0, 1)); the models start from their own initialisation.
Per program it reports the first call (compile + one step), the median of the remaining steps, the
last loss and, on GPU, the allocator's peak (on CPU the process's peak RSS). JSON + Markdown in --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from synthmri_jax.xla_flags import configure_cpu_flags  # noqa: E402

configure_cpu_flags()

import jax  # noqa: E402

from synthmri_jax import sharding as mesh_lib  # noqa: E402
from synthmri_jax.utils import config_files, io  # noqa: E402


def _aot():
  spec = importlib.util.spec_from_file_location("aot_compile", os.path.join(REPO, "tools", "aot_compile.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def _peak_bytes() -> dict:
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return {"peak_device_bytes": int(stats["peak_bytes_in_use"])}
  return {"peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def run(config_path: str, overrides: list[str], steps: int, per_chip_batch: int, only: str) -> dict:
  aot = _aot()
  config = config_files.load(config_path, overrides)
  mesh = mesh_lib.mesh_from_config(config)
  rows = []
  for prog in aot.programs(config, mesh, mesh_lib.mesh_from_config(config, stage="tokenizer")):
    shards = mesh_lib.batch_shards(prog.mesh if prog.mesh is not None else mesh)
    if only and not any(o.strip() and o.strip() in prog.name for o in only.split(",")):
      continue
    batch = per_chip_batch * shards if per_chip_batch > 0 else prog.batch
    t0 = time.time()
    try:
      row = {"program": prog.name, "kind": prog.kind, "global_batch": batch, **prog.execute(batch, steps)}
    except Exception as e:   # report and go on: one program's failure is a finding, not the end
      row = {"program": prog.name, "kind": prog.kind, "global_batch": batch, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    row.update(_peak_bytes(), wall_s=round(time.time() - t0, 1), params=prog.params or None)
    print(json.dumps(row), flush=True)
    rows.append(row)
  return {"config": os.path.relpath(os.path.abspath(config_path), REPO), "overrides": overrides,
          "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "devices": jax.device_count(),
          "mesh": dict(mesh.shape), "host": platform.node(), "cpus": os.cpu_count(), "jax": jax.__version__,
          "steps": steps, "programs": rows}


def markdown(result: dict) -> str:
  lines = [f"### {result['config']} {' '.join(result['overrides'])} on {result['devices']} x {result['device']} "
           f"({result['backend']}), {result['steps']} step(s)", "",
           "| program | global batch | params | first call s (compile + step) | median s / step | loss or volumes/s | peak GiB |",
           "|---|---|---|---|---|---|---|"]
  for r in result["programs"]:
    peak = r.get("peak_device_bytes", r.get("peak_rss_bytes"))
    peak_s = "n/a" if peak is None else f"{peak / 2**30:.2f}" + ("" if "peak_device_bytes" in r else " (RSS)")
    if "error" in r:
      lines.append(f"| {r['program']} | {r['global_batch']} | | failed: {r['error'][:120]} | | | {peak_s} |")
      continue
    what = f"loss {r['loss']:.4g}" if "loss" in r else (f"{r['volumes_per_s']} vol/s" if r.get("volumes_per_s") else
                                                       f"finite {r.get('finite')}")
    params = f"{r['params']:,}" if r.get("params") else ""
    med = "n/a" if r.get("median_s") is None else f"{r['median_s']:.3f}"
    lines.append(f"| {r['program']} | {r['global_batch']} | {params} | {r['first_call_s']:.1f} | {med} | {what} | {peak_s} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--steps", type=int, default=1)
  ap.add_argument("--per-chip-batch", type=int, default=0, help="0: each program's configured global batch")
  ap.add_argument("--only", default="", help="comma-separated substrings of program names")
  ap.add_argument("--out", default="runs/real_size")
  args, overrides = ap.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    ap.error(f"unknown arguments {bad} (config overrides are --config.FIELD=VALUE)")
  result = run(args.config, overrides, args.steps, args.per_chip_batch, args.only)
  os.makedirs(args.out, exist_ok=True)
  stem = f"steps_{os.path.splitext(os.path.basename(args.config))[0]}_{result['backend']}"
  io.write_json_atomic(os.path.join(args.out, stem + ".json"), result)
  io.write_text_atomic(os.path.join(args.out, stem + ".md"), markdown(result))
  print(markdown(result))
  return 0 if all("error" not in r for r in result["programs"]) else 1


if __name__ == "__main__":
  sys.exit(main())
