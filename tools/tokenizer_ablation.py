"""Ablation: VQ-VAE vs VQGAN vs dual-codebook tokenizer on one prepared cohort, same step budget.

    python tools/tokenizer_ablation.py --config configs/quickstart.py --workdir runs/quickstart [--steps 360]

WORKDIR must hold a prepared cohort (run the 'prepare' stage first; the quickstart config builds
the embedded MNI152 cohort). Each variant trains with the shared trainer into
WORKDIR/tokenizer_ablation/<variant>/ (resumable) for the same number of train steps and batch
size; the dual model's budget is split over its stages in the config's proportions. Writes
WORKDIR/tokenizer_ablation/ablation.{md,json}: val PSNR, SSIM, boundary-band L1, codebook usage /
perplexity, steps/s and wall time. The dual row uses encoded clinical latents; its predicted /
null clinical rows show what generation (no scan to encode) gets.

Budget caveat: same steps is not same compute -- the dual model runs more layers per step
(stage 1 trains only the clinical path; the joint stage runs everything), and it carries two
latents, so its encoded-clinical row has more bits per volume than the single-codebook
baselines; its predicted / null rows decode from the generative latent alone, like them.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ml_collections import config_flags  # noqa: E402
from absl import flags  # noqa: E402

from synthmri_jax.pipeline import tokenizer as tokenizer_stage  # noqa: E402
from synthmri_jax.config_blocks.tokenizer import tokenizer_config  # noqa: E402
from synthmri_jax.utils import io  # noqa: E402

VARIANTS = ("vqvae", "vqgan", "dual")


def _load_config(path: str):
  flags.FLAGS.unparse_flags()
  name = "ablation_config"
  if name not in flags.FLAGS:
    config_flags.DEFINE_config_file(name, None, "config")
  flags.FLAGS([sys.argv[0], f"--{name}={path}"])
  return flags.FLAGS[name].value


def variant_config(base, variant: str, steps: int):
  """`base` with tokenizer.variant = variant and `steps` train steps in total."""
  c = copy.deepcopy(base)
  if "tokenizer" not in c:
    with c.unlocked():
      c.tokenizer = tokenizer_config("quickstart")
  t = c.tokenizer
  with c.unlocked():
    t.variant = variant
    if variant == "dual":
      names = tokenizer_stage.phase_names(t)
      weights = [int(t.phase_train[s].steps) for s in names]
      total = sum(weights)
      alloc = [max(1, round(steps * w / total)) for w in weights]
      alloc[-1] = max(1, steps - sum(alloc[:-1]))
      for s, n in zip(names, alloc):
        t.phase_train[s].steps = n
    else:
      t.phase_train.main.steps = steps
      if variant == "vqgan":
        t.gan.start_step = min(int(t.gan.start_step), steps // 2)
  return c


def _row(name, m, mode=None) -> dict:
  cb = m["codebooks"]
  src = m["clinical_modes"][mode] if mode else m
  return {
      "model": name, "psnr": src["psnr"], "ssim": src["ssim"],
      "boundary_band_l1": src["boundary_band_l1"],
      "usage_generative": cb.get("generative", {}).get("usage"),
      "perplexity_generative": cb.get("generative", {}).get("perplexity"),
      "usage_clinical": cb.get("clinical", {}).get("usage"),
      "perplexity_clinical": cb.get("clinical", {}).get("perplexity"),
      "steps_per_s": {k: v["steps_per_s"] for k, v in m["phases"].items()},
      "seconds": m.get("seconds"),
  }


def _fmt(v, spec):
  return "–" if v is None else format(v, spec)


def markdown(rows, steps, shape, batch) -> str:
  lines = [f"Tokenizer ablation: {steps} train steps each, batch {batch}, volume {'x'.join(map(str, shape))}, "
           "validation split (PSNR / SSIM on [0, 1] intensities; band L1 = L1 in the boundary band).", "",
           "| model | PSNR (dB) | SSIM | boundary-band L1 | usage gen | perplexity gen | usage clin | "
           "perplexity clin | steps/s | time (s) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    sps = ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in r["steps_per_s"].items()) if r["steps_per_s"] else "–"
    lines.append(f"| {r['model']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['boundary_band_l1']:.4f} | "
                 f"{_fmt(r['usage_generative'], '.3f')} | {_fmt(r['perplexity_generative'], '.1f')} | "
                 f"{_fmt(r['usage_clinical'], '.3f')} | {_fmt(r['perplexity_clinical'], '.1f')} | {sps} | "
                 f"{_fmt(r['seconds'], '.0f')} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default="configs/quickstart.py")
  ap.add_argument("--workdir", required=True, help="workdir with a prepared cohort (WORKDIR/data)")
  ap.add_argument("--steps", type=int, default=0, help="train steps per variant (0: the config's dual total)")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  args = ap.parse_args(argv)
  base = _load_config(args.config)
  if "tokenizer" not in base:
    with base.unlocked():
      base.tokenizer = tokenizer_config("quickstart")
  steps = args.steps or sum(int(base.tokenizer.phase_train[s].steps)
                            for s in tokenizer_stage.phase_names(variant_config(base, "dual", 3).tokenizer))
  out_dir = os.path.join(os.path.abspath(args.workdir), "tokenizer_ablation")
  rows, results = [], {}
  for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
    if variant not in VARIANTS:
      raise SystemExit(f"unknown variant {variant!r}; choose from {VARIANTS}")
    cfg = variant_config(base, variant, steps)
    vdir = os.path.join(out_dir, variant)
    os.makedirs(vdir, exist_ok=True)
    if not os.path.islink(os.path.join(vdir, "data")):
      os.symlink(os.path.join(os.path.abspath(args.workdir), "data"), os.path.join(vdir, "data"))
    t0 = time.time()
    m = tokenizer_stage.run(cfg, vdir)
    m.setdefault("seconds", round(time.time() - t0, 1))
    results[variant] = m
    if variant == "dual":
      rows.append(_row("dual (encoded clinical)", m))
      rows.append(_row("dual (predicted clinical)", m, "predicted"))
      rows.append(_row("dual (null clinical)", m, "null"))
    else:
      rows.append(_row(variant, m))
  shape = next(iter(results.values()))["volume_shape"]
  batch = tokenizer_stage.batch_size(base)
  md = markdown(rows, steps, shape, batch)
  io.write_text_atomic(os.path.join(out_dir, "ablation.md"), md)
  io.write_json_atomic(os.path.join(out_dir, "ablation.json"), {"steps": steps, "rows": rows, "metrics": results})
  print(md)


if __name__ == "__main__":
  main()
