"""The study's log table: evaluation.json as the lines `evaluate` prints (AUC per arm and seed
with intervals, the comparisons and ratios, Dice, fidelity)."""

from __future__ import annotations

from typing import Any

from synthmri_jax.evaluation import stats


def format_table(result: dict[str, Any]) -> str:
  """The log table of evaluation.json: per arm AUC per seed with CI, mean ± SD, comparisons, Dice, fidelity."""
  cls = result["classification"]
  lines = ["", "TSTR / TRTR study on the real test split "
           f"(n = {result['real']['n_test']}: {result['real']['test_per_class']}); "
           f"synthetic: {result['synthetic']['n']} scans from {result['synthetic']['dir']}",
           f"{'arm':<11} {'train real/syn':>14}  {'AUC per seed [95% CI]':<44} {'mean ± SD (n)':<22} "
           f"{'seed-mean scores [CI]':<22}"]
  for name, arm in cls["arms"].items():
    ps = arm["per_seed"]
    per = "; ".join(f"{p['auc']:.3f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}]" for p in ps[:2])
    if len(ps) > 2:
      per += f"; +{len(ps) - 2}"
    comp = f"{ps[0]['n_train_real']}/{ps[0]['n_train_synthetic']}"
    e = arm["seed_mean_scores"]
    lines.append(f"{name:<11} {comp:>14}  {per:<44} {stats.format_mean_sd(arm['auc_over_seeds']):<22} "
                 f"{e['auc']:.3f} [{e['ci_low']:.2f}, {e['ci_high']:.2f}]")
  for name, c in cls["comparisons"].items():
    e = c["seed_mean_scores"]
    lines.append(f"Δ {name:<20} per seed {stats.format_mean_sd(c['delta_over_seeds'])}; seed-mean scores "
                 f"{e['delta']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}] p={e['p_value']:.3g}")
  r = cls.get("tstr_trtr_ratio", {})
  if "value" in r:
    lines.append(f"TSTR / TRTR AUC ratio {r['value']:.3f}")
  r = cls.get("codec_trtr_ratio", {})
  if "value" in r:
    lines.append(f"CODEC / TRTR AUC ratio {r['value']:.3f} (the TSTR ceiling of this decoder)")
  seg = result.get("segmentation", {})
  if "skipped" in seg:
    lines.append(f"segmentation: skipped ({seg['skipped']})")
  else:
    for name in ("SEG_real", "SEG_synthetic"):
      s = seg[name]
      lines.append(f"{name:<14} Dice on real test {stats.format_mean_sd(s['dice_over_seeds'])}; seed 0: "
                   f"{s['per_seed'][0]['dice']['mean']:.3f} [{s['per_seed'][0]['dice']['ci_low']:.3f}, "
                   f"{s['per_seed'][0]['dice']['ci_high']:.3f}]")
  fid = result["fidelity"]
  for key, entry in fid.items():
    if key.startswith(("FD_", "KID_")):
      for label, v in entry.items():
        lines.append(f"{key:<22} {label:<54} {v['value']:.4g} [{v['ci_low']:.4g}, {v['ci_high']:.4g}] "
                     f"(n {v['n_a']} vs {v['n_b']})")
  for channel, d in fid["ms_ssim_diversity"]["channels"].items():
    lines.append("MS-SSIM diversity " + channel + ": " + ", ".join(
        f"{k} {v['mean']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}] ({v['n_pairs']} pairs)" if "mean" in v
        else f"{k} skipped ({v['skipped']})" for k, v in d.items()))
  return "\n".join(lines)
