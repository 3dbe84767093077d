"""The study sections: downstream classification (TSTR / TRTR, ROC), fidelity and diversity, privacy."""

from __future__ import annotations

import glob
import os
from typing import Any, Optional

import numpy as np

from synthmri_jax.pipeline.report.format import fmt, fmt_ci, fmt_ci_g, fmt_g, fmt_mean_sd, fmt_p, fmt_pct, num
from synthmri_jax.pipeline.report.document import Figures, Image, Section, Table, figure, not_run
from synthmri_jax.pipeline.report.inputs import Inputs


# ---------------------------------------------------------------- classification


def _roc_points(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Binary: ROC of the second class's probability; K > 2: macro-average of one-vs-rest curves."""
  from sklearn.metrics import roc_curve
  probs = np.asarray(probs, np.float64)
  if probs.ndim == 1:
    return roc_curve(y, probs)[:2]
  if probs.shape[1] == 2:
    return roc_curve(y == 1, probs[:, 1])[:2]
  grid = np.linspace(0, 1, 201)
  tprs = []
  for k in range(probs.shape[1]):
    if 0 < (y == k).sum() < len(y):
      fpr, tpr, _ = roc_curve(y == k, probs[:, k])
      tprs.append(np.interp(grid, fpr, tpr))
  return grid, np.mean(tprs, axis=0) if tprs else grid


def _roc_figure(inp: Inputs, figs: Figures, arms: dict[str, Any]) -> Optional[Image]:
  results = inp.run_results()
  if not results:
    return None
  panels = [("TSTR vs TRTR", [a for a in ("TRTR", "TSTR") if a in results]),
            ("augmentation arms", ["TRTR"] * ("TRTR" in results) + sorted(
                a for a in results if a.startswith(("AUG_", "REAL_"))))]
  panels = [(t, names) for t, names in panels if names and (t == "TSTR vs TRTR" or len(names) > 1)]
  fig = figure(5.2 * len(panels), 4.8)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (title, names) in zip(axes, panels):
    for name in names:
      rs = results[name]
      y = np.asarray(rs[0]["test"]["label"])
      probs = np.mean([np.asarray(r["test"]["probs"], np.float64) for r in rs], axis=0)
      fpr, tpr = _roc_points(y, probs)
      e = (arms.get(name) or {}).get("seed_mean_scores") or {}
      label = f"{name} (n seeds {len(rs)}): AUC {fmt_ci(e.get('auc'), e.get('ci_low'), e.get('ci_high'))}" if e \
          else f"{name} (n seeds {len(rs)})"
      ax.plot(fpr, tpr, lw=2 if name in ("TRTR", "TSTR") else 1.4,
              ls="--" if name.startswith("REAL_") else "-", label=label)
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls=":")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 − specificity)",
           ylabel="true positive rate (sensitivity)", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=7)
  path = figs.save(fig, "roc")
  return Image(path, "ROC curves on the real test split, scores averaged over seeds (result.json); legend: AUC of "
                     "the seed-mean scores with its bootstrap interval (evaluation.json)")


def _arm_order(names, ev: dict[str, Any]) -> list[str]:
  """The study's own arm order (protocol.arms: TRTR, TSTR, AUG_f, REAL_f); the JSON's keys are sorted."""
  planned = [a.get("name") for a in (ev.get("protocol") or {}).get("arms", []) if isinstance(a, dict)]
  kind = lambda n: next((i for i, k in enumerate(("TRTR", "TSTR", "AUG_", "REAL_")) if n.startswith(k)), 4)
  return sorted(names, key=lambda n: (planned.index(n) if n in planned else len(planned), kind(n), n))


def classification_section(inp: Inputs, figs: Figures) -> Section:
  title = "Downstream classification (TSTR / TRTR)"
  ev = inp.evaluation
  if not ev:
    msg = "no evaluation/evaluation.json; the `evaluate` stage has not run"
    sec = not_run(title, msg)
    tr = ((inp.classify or {}).get("classification") or {}).get("TRTR")
    if tr:
      e = tr.get("seed_mean_scores", {})
      sec.add(f"The `classify` stage has run: TRTR AUC {fmt_ci(e.get('auc'), e.get('ci_low'), e.get('ci_high'))} "
              f"(seed-mean scores), {fmt_mean_sd(tr.get('auc_over_seeds'))} over seeds (classify.json).")
    return sec
  sec = Section(title)
  cls = ev.get("classification", {})
  arms = cls.get("arms", {})
  real, proto = ev.get("real", {}), ev.get("protocol", {})
  syn = ev.get("synthetic", {})
  ci = proto.get("ci", {})
  level = f"{fmt_g(100 * (1 - num(ci.get('alpha'))), 3)} %" if num(ci.get("alpha")) is not None else "95 %"
  n_subj = ci.get("n_subjects")
  of_subjects = f" of {n_subj} subjects" if n_subj is not None and n_subj != real.get("n_test") else ""
  sec.add(f"Every arm is tested on the same real test split ({real.get('n_test')} scans{of_subjects}: "
          + ", ".join(f"{k} {v}" for k, v in (real.get("test_per_class") or {}).items())
          + f"), never seen by a generator or classifier. Synthetic cohort: {syn.get('n')} scans ("
          + ", ".join(f"{k} {v}" for k, v in (syn.get("per_class") or {}).items()) + f"). Each arm: "
          f"{len(proto.get('seeds', []))} seed(s), {proto.get('steps_per_run')} steps, batch {proto.get('batch_size')}; "
          f"intervals: {level} {ci.get('kind', 'bootstrap')} ({ci.get('method', '')}, {ci.get('n_boot')} resamples).")
  img = _roc_figure(inp, figs, arms)
  if img:
    sec.add(img)
  else:
    sec.add("ROC curves: not available (no evaluation/runs/*/seed*/result.json).")
  rows = []
  for name in _arm_order(arms, ev):
    a = arms[name]
    ps = (a.get("per_seed") or [{}])[0]
    e = a.get("seed_mean_scores", {})
    n_syn = f"{ps['n_train_codec']} real, encoded → decoded" if "n_train_codec" in ps else str(ps.get("n_train_synthetic", "n/a"))
    rows.append([name, str(ps.get("n_train_real", "n/a")), n_syn, str(a.get("n_seeds")),
                 fmt_mean_sd(a.get("auc_over_seeds")), fmt_ci(e.get("auc"), e.get("ci_low"), e.get("ci_high"))])
  sec.add(Table(["arm", "train: real scans", "train: synthetic scans", "seeds", "AUC mean ± SD over seeds",
                 f"AUC of seed-mean scores [{level} CI]"], rows, "ROC-AUC per training arm (real test split)"))
  comps = cls.get("comparisons", {})
  if comps:
    rows = []
    for name, c in comps.items():
      e = c.get("seed_mean_scores", {})
      rows.append([f"{c.get('a', name)} − {c.get('b', '')}", fmt_mean_sd(c.get("delta_over_seeds"), signed=True),
                   fmt_ci(e.get("delta"), e.get("ci_low"), e.get("ci_high"), signed=True), fmt_p(e.get("p_value"))])
    sec.add(Table(["comparison", "ΔAUC per seed (mean ± SD)", f"ΔAUC seed-mean scores [{level} CI]", "p (paired)"],
                  rows, "Paired ΔAUC on the same test subjects (negative: the first arm is worse)"))
  r = cls.get("tstr_trtr_ratio", {})
  if "value" in r:
    rows = []
    for arm, what in (("tstr", "TSTR"), ("codec", "CODEC")):
      q = cls.get(f"{arm}_trtr_ratio", {})
      if "value" in q:
        e = q.get("seed_mean_scores", {})
        rows += [[f"{what} / TRTR AUC ratio (means over seeds)", fmt(q["value"])],
                 [f"{what} / TRTR AUC ratio (seed-mean scores)", fmt_ci(e.get("value"), e.get("ci_low"), e.get("ci_high"))]]
    sec.add(Table(["quantity", "this run"], rows,
                  "How much of the real-data AUC a classifier trained on synthetic data alone keeps (1 = all)"
                  + ("; CODEC: trained on the real train scans after encode → decode, the TSTR a perfect LDM "
                     "could reach through this decoder" if "codec_trtr_ratio" in cls else "")))
  elif r.get("skipped"):
    sec.add(f"TSTR / TRTR ratio: skipped ({r['skipped']}).")
  seg = ev.get("segmentation", {})
  if "skipped" in seg:
    sec.add(f"Segmentation (Dice): skipped ({seg['skipped']}).")
  elif seg:
    rows = []
    ci = lambda d: fmt_ci(d.get("mean"), d.get("ci_low"), d.get("ci_high")) if d and d.get("mean") is not None else "–"
    for name in ("SEG_real", "SEG_synthetic"):
      s = seg.get(name)
      if s:
        first = (s.get("per_seed") or [{}])[0]
        rows.append([name, fmt_mean_sd(s.get("dice_over_seeds")), ci(first.get("dice")),
                     ci(first.get("lesions_detected")), ci(first.get("false_positives_per_scan"))])
    dl = seg.get("delta_synthetic_minus_real", {})
    if dl:
      rows.append(["synthetic − real (paired)", fmt_mean_sd(dl.get("over_seeds"), signed=True), "", "", ""])
    real, syn = ((seg.get(k) or {}).get("dice_over_seeds") or {} for k in ("SEG_real", "SEG_synthetic"))
    if real.get("mean") and syn.get("mean") is not None:
      rows.append(["synthetic / real (seed means)", fmt_g(syn["mean"] / real["mean"], 3), "", "", ""])
    sec.add(Table(["segmenter", "Dice mean ± SD over seeds", "Dice seed 0 [CI]", "lesions detected, seed 0 [CI]",
                   "false-positive lesions per scan, seed 0 [CI]"], rows,
                  "Lesion segmentation on the real test split (Dice, 1 = perfect overlap; a lesion is a "
                  "26-connected component of the real mask, detected when the prediction touches it; intervals "
                  "bootstrap subjects)"))
  return sec


def fidelity_section(inp: Inputs) -> Section:
  title = "Fidelity and diversity"
  ev = inp.evaluation
  if not ev or not ev.get("fidelity"):
    return not_run(title, "no fidelity block in evaluation/evaluation.json; the `evaluate` stage has not run")
  sec = Section(title)
  fid = ev["fidelity"]
  for name, desc in (fid.get("extractors") or {}).items():
    sec.add(f"Features `{name}`: {desc}.")
  rows = []
  for key, entry in fid.items():
    if key.startswith(("FD_", "KID_")) and isinstance(entry, dict):
      for label, v in entry.items():
        ref = "reference" in label
        rows.append([key.split("_", 1)[0], key.split("_", 1)[1],
                     "real val vs real test (floor)" if ref else label.replace("_", " "),
                     fmt_ci_g(v.get("value"), v.get("ci_low"), v.get("ci_high")), f"{v.get('n_a')} vs {v.get('n_b')}"])
  if rows:
    sec.add(Table(["metric", "features", "comparison", "value [CI]", "n"], rows,
                  "Fréchet distance (FD) and kernel distance (KID), lower = closer to real; compare against the "
                  "real-vs-real floor (unitless, only comparable within one feature extractor)"))
  div = fid.get("ms_ssim_diversity") or {}
  rows = []
  for channel, d in (div.get("channels") or {}).items():
    for who, v in d.items():
      rows.append([channel, who.replace("_", " "),
                   fmt_ci(v.get("mean"), v.get("ci_low"), v.get("ci_high")) if "mean" in v else f"skipped ({v.get('skipped')})",
                   str(v.get("n_pairs", "")), str(v.get("n_volumes", ""))])
  if rows:
    sec.add(Table(["channel", "cohort", "MS-SSIM [CI]", "pairs", "volumes"], rows,
                  "MS-SSIM between random pairs of one cohort: lower = more diverse; synthetic should not be far "
                  "above real"))
  return sec


def privacy_section(inp: Inputs) -> Section:
  title = "Privacy"
  pv = inp.privacy
  if not pv:
    return not_run(title, "no evaluation/privacy.json; the privacy report has not run (privacy.enabled in the "
                           "`evaluate` stage)")
  sec = Section(title)
  real = pv.get("real", {})
  n = pv.get("synthetic", {}).get("n")
  sec.add(f"Copy detection compares each of the {n} synthetic scans with the {real.get('n_train')} training scans. "
          f"The threshold τ of each measure is calibrated on real data only ({real.get('n_calibration')} "
          f"`{real.get('calibration_split')}` scans vs train, quantile {fmt_g(pv.get('quantile'))}); rule "
          f"`{pv.get('copy_rule')}`.")
  sec.add(Table(["measure", "τ (similarity above = copy)", "quantile used"],
                [[m, fmt(t, 4), fmt_g((pv.get("measure_quantiles") or {}).get(m))] for m, t in (pv.get("tau") or {}).items()],
                "Copy thresholds"))
  sec.add([f"**Copies**: {pv.get('n_copies')} of {n} ({fmt_pct(pv.get('copy_fraction'))}); expected from the "
           f"calibration alone (false flags): {fmt_pct(pv.get('expected_false_copy_fraction'))}",
           f"**Memorised training scans** (nearest neighbour of at least one copy): {pv.get('n_memorized')}"])
  copies = pv.get("copies") or []
  if copies:
    sec.add(Table(["synthetic scan", "nearest training scan", "measure", "score", "τ", "flagged by"],
                  [[c.get("participant_id"), c.get("nearest_train_participant_id"), c.get("measure"),
                    fmt(c.get("score"), 4), fmt(c.get("tau"), 4), ", ".join(c.get("flagged_by", []))] for c in copies],
                  "Flagged copies (remove these before sharing the cohort)"))
  mem = pv.get("memorized") or []
  if mem:
    sec.add(Table(["training scan", "copies", "highest score", "synthetic scans"],
                  [[e.get("train_participant_id"), str(e.get("n_copies")), fmt(e.get("max_score"), 4),
                    ", ".join(e.get("copies", []))] for e in mem], "Memorised training scans"))
  dcr = pv.get("dcr") or {}
  if "skipped" in dcr:
    sec.add(f"Distance to closest record: skipped ({dcr['skipped']}).")
  elif dcr:
    rows = [[m, f"{fmt_pct(d.get('closer_to_train_share'))} ({d.get('n_closer_to_train')}/{d.get('n_synthetic')})",
             fmt_pct(d.get("expected_share")), fmt_p(d.get("share_p_value")), fmt(d.get("prob_synthetic_closer"), 3),
             fmt_p(d.get("mann_whitney_p"))] for m, d in dcr.items() if isinstance(d, dict)]
    sec.add(Table(["measure", "synthetic closer to train than holdout", "expected", "p (permutation)",
                   "P(DCR syn < DCR holdout)", "p (Mann-Whitney)"], rows,
                  f"Distance to closest record vs the {real.get('n_holdout')} `{real.get('holdout_split')}` scans "
                  "(a share near the expected value and P near 0.5 are healthy)"))
  mia = pv.get("membership_inference") or {}
  if "skipped" in mia:
    sec.add(f"Membership inference: skipped ({mia['skipped']}).")
  elif mia:
    rows = []
    for name, key in (("loss attack (mean over timesteps)", "loss_attack"), ("PIA", "pia")):
      a = mia.get(key)
      if a:
        ci = a.get("auc_ci") or [None, None]
        if a.get("tpr_at_1pct_fpr_resolvable") is False:   # fewer than 100 non-members: say so, no number
          tpr = (f"not resolvable with {mia.get('n_nonmembers')} non-members; at FPR "
                 f"{fmt_pct(a.get('smallest_resolvable_fpr'))}: {fmt(a.get('tpr_at_smallest_fpr'), 3)}")
        else:
          tpr = fmt(a.get("tpr_at_1pct_fpr"), 3)
        rows.append([name, fmt_ci(a.get("auc"), ci[0], ci[1]), tpr, fmt(a.get("advantage"), 3)])
    ctrl = mia.get("split_bias_control") or {}
    for name, key in (("loss attack", "loss_attack"), ("PIA", "pia")):
      a = ctrl.get(key)
      if a:
        ci = a.get("auc_ci") or [None, None]
        rows.append([f"{name}, split-bias control (`{ctrl.get('control_split')}` vs `{ctrl.get('nonmember_split')}`, "
                     "both non-members)", fmt_ci(a.get("auc"), ci[0], ci[1]), "—", fmt(a.get("advantage"), 3)])
    note = (f"; control: {ctrl.get('n_control')} `{ctrl.get('control_split')}` scans in the members' place, so its "
            "AUC is what the attack finds without membership, and the real attack shows memorisation only where it "
            "clears it" if ctrl.get("loss_attack") else
            f"; split-bias control skipped ({ctrl['skipped']})" if ctrl.get("skipped") else "")
    sec.add(Table(["attack", "AUC [CI]", "TPR at 1 % FPR", "advantage (max TPR − FPR)"], rows,
                  f"Membership inference on the LDM: {mia.get('n_members')} members (training latents) vs "
                  f"{mia.get('n_nonmembers')} non-members (`{mia.get('nonmember_split')}`); AUC 0.5 = no leakage"
                  + note))
  _ledger(sec, pv.get("epsilon") or {})
  pairs = pv.get("closest_pairs") or []
  shown = set()
  for p in pairs:
    path = os.path.join(inp.workdir, p.get("figure", ""))
    if p.get("figure") and os.path.isfile(path):
      shown.add(os.path.abspath(path))
      sec.add(Image(path, f"{p.get('participant_id')} vs nearest training scan {p.get('train_participant_id')}: "
                          f"embedding r = {fmt(p.get('embedding_score'), 3)}, voxel s = {fmt(p.get('voxel_score'), 3)}"
                          + (" (COPY)" if p.get("is_copy") else "")))
  for path in sorted(glob.glob(os.path.join(inp.workdir, "evaluation", "figures", "privacy_pair_*.png"))):
    if os.path.abspath(path) not in shown and not pairs:
      sec.add(Image(path, f"closest pair {os.path.basename(path)}"))
  return sec


def _ledger(sec, eps: dict) -> None:
  """ε per trained model, then the released cohort's ε, privacy unit and releases (privacy/epsilon.py)."""
  models = eps.get("models") or []
  if models:
    sec.add(Table(["model", "saw private data", "ε", "statement"],
                  [[m.get("model"), "yes" if m.get("saw_private_data") else "no",
                    fmt_g(m.get("epsilon"), 3) if m.get("private") else "∞", m.get("statement", "")] for m in models],
                  "Differential privacy per trained model"))
  cohort = eps.get("synthetic_cohort") or {}
  if cohort:
    sec.add(f"**Synthetic cohort**: {cohort.get('statement', 'n/a')}")
    unit = cohort.get("privacy_unit") or {}
    if unit.get("statement"):
      sec.add(f"Privacy unit: the {unit.get('record', 'scan')} (DP-SGD's record); {unit['statement']}.")
    if cohort.get("releases"):
      sec.add(Table(["release", "fit on", "ε"],
                    [[r.get("release"), r.get("source"), fmt_g(r.get("epsilon"), 3) if r.get("private") else "∞"]
                     for r in cohort["releases"]],
                    "Everything the released cohort (WORKDIR/synthetic) is made from, and what it costs in ε"))
    elif cohort.get("non_private_releases"):
      sec.add(["Non-private releases: " + r for r in cohort["non_private_releases"]])
    if cohort.get("not_released"):
      sec.add(["Not released (computed from private data without DP; keep in WORKDIR): " + r
               for r in cohort["not_released"]])

