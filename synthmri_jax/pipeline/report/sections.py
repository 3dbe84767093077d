"""The report's run sections: the one-screen answers (Useful? Private?), summary, run, data,
tokenizer, LDM and anatomy by label."""

from __future__ import annotations

import os
import time

import pandas as pd

from synthmri_jax.pipeline.report.format import fmt, fmt_ci, fmt_g, fmt_mean_sd, fmt_pct, fmt_seconds, num
from synthmri_jax.pipeline.report.document import NOT_RUN, Figures, Section, Table, not_run
from synthmri_jax.pipeline.report.inputs import Inputs
from synthmri_jax.pipeline.report.scans import answer_grid


# ------------------------------------------------------------------------------ sections


def answers_section(config, inp: Inputs, figs: Figures) -> Section:
  """The two questions a reader opens the report for, answered in one screen, with the scans beside them."""
  sec = Section("Useful? Private?")
  ev = inp.evaluation
  arms = (ev or {}).get("classification", {}).get("arms", {})
  if ev and "TRTR" in arms and "TSTR" in arms:
    trtr, tstr = arms["TRTR"]["seed_mean_scores"], arms["TSTR"]["seed_mean_scores"]
    r = ev.get("classification", {}).get("tstr_trtr_ratio", {})
    n_test = (ev.get("real") or {}).get("n_test")
    useful = (num(tstr.get("ci_low")) or 0) > 0.5
    rows = [["TRTR (trained on real)", fmt_ci(trtr.get("auc"), trtr.get("ci_low"), trtr.get("ci_high"))],
            ["TSTR (trained on synthetic only)", fmt_ci(tstr.get("auc"), tstr.get("ci_low"), tstr.get("ci_high"))],
            ["TSTR / TRTR", fmt(r.get("value"))]]
    if "AUG" in arms or any(k.startswith("AUG") for k in arms):
      k = "AUG" if "AUG" in arms else sorted(k for k in arms if k.startswith("AUG"))[-1]
      a = arms[k]["seed_mean_scores"]
      rows.append([f"{k} (real + synthetic)", fmt_ci(a.get("auc"), a.get("ci_low"), a.get("ci_high"))])
    if "CODEC" in arms:
      c = arms["CODEC"]["seed_mean_scores"]
      rows.append(["CODEC (trained on real train scans encoded → decoded: the TSTR ceiling of this decoder)",
                   fmt_ci(c.get("auc"), c.get("ci_low"), c.get("ci_high"))])
    sec.add(f"**Useful?** {'Yes' if useful else 'Not shown'}: a classifier trained only on the synthetic scans "
            + ("separates the classes on real scans better than chance (TSTR interval above 0.5)." if useful
               else "does not separate the classes on real scans better than chance at 95 % (TSTR interval holds 0.5)."))
    sec.add(Table(["diagnosis AUC on the real test split", "AUC [95 % CI]"], rows,
                  f"Seed-mean scores{f', {n_test} test subjects' if n_test else ''}; intervals: subject bootstrap"))
  else:
    sec.add(f"**Useful?** {NOT_RUN}: the `evaluate` stage has not written TSTR and TRTR.")
  seg = (ev or {}).get("segmentation") or {}
  if "SEG_real" in seg and "SEG_synthetic" in seg:
    sec.add(_segmentation_answer(seg))
  pv = inp.privacy
  if pv:
    mia = pv.get("membership_inference", {})
    la = mia.get("loss_attack") or {}
    ctl = (mia.get("split_bias_control") or {}).get("loss_attack") or {}
    cohort = pv.get("epsilon", {}).get("synthetic_cohort", {})
    rows = [["synthetic scans flagged as copies of training scans",
             f"{pv.get('n_copies')} of {pv.get('synthetic', {}).get('n')} ({fmt_pct(pv.get('copy_fraction'))}); "
             f"false flags expected {fmt_pct(pv.get('expected_false_copy_fraction'))}"],
            ["membership inference on the LDM (loss attack)",
             (f"AUC {fmt(la.get('auc'))} (0.5 = chance" + (f"; {fmt(ctl.get('auc'))} between two non-member splits"
                                                          if ctl else "") + ")")
             if la else f"skipped ({mia.get('skipped', NOT_RUN)})"],
            ["ε of the synthetic cohort", str(cohort.get("statement", "n/a"))]]
    sec.add("**Private?** Copies, membership inference and the privacy budget:")
    sec.add(Table(["check", "result"], rows, "Details: the Privacy section"))
  else:
    sec.add(f"**Private?** {NOT_RUN}: no evaluation/privacy.json.")
  grid = answer_grid(config, inp, figs)
  if grid is not None:
    sec.add(grid)
  return sec


def _segmentation_answer(seg: dict) -> Table:
  """Lesion segmentation trained on real vs on synthetic image + mask pairs, on the real test split."""
  rows = []
  for name, what in (("SEG_real", "segmenter trained on real scans + masks"),
                     ("SEG_synthetic", "segmenter trained on synthetic scans + masks only")):
    d = (seg[name].get("per_seed") or [{}])[0]
    dice, det = d.get("dice") or {}, d.get("lesions_detected") or {}
    rows.append([what, fmt_ci(dice.get("mean"), dice.get("ci_low"), dice.get("ci_high")),
                 fmt_ci(det.get("mean"), det.get("ci_low"), det.get("ci_high")) if det.get("mean") is not None else "–"])
  real, syn = (seg[k].get("dice_over_seeds") or {} for k in ("SEG_real", "SEG_synthetic"))
  if real.get("mean") and syn.get("mean") is not None:
    rows.append(["synthetic / real Dice", fmt(syn["mean"] / real["mean"]), ""])
  return Table(["lesion segmentation on the real test split", "Dice [95 % CI]", "lesions detected [95 % CI]"], rows,
               "Seed 0; intervals: subject bootstrap; the Study section has every seed")


def summary_section(inp: Inputs) -> Section:
  sec = Section("Summary")
  items = []
  ev = inp.evaluation
  if ev:
    arms = ev.get("classification", {}).get("arms", {})
    for name in ("TRTR", "TSTR"):
      if name in arms:
        e = arms[name]["seed_mean_scores"]
        items.append(f"**{name} AUC** (seed-mean scores, real test set): "
                     f"{fmt_ci(e.get('auc'), e.get('ci_low'), e.get('ci_high'))}; over seeds "
                     f"{fmt_mean_sd(arms[name].get('auc_over_seeds'))}")
    r = ev.get("classification", {}).get("tstr_trtr_ratio", {})
    if "value" in r:
      items.append(f"**TSTR / TRTR AUC ratio**: {fmt(r['value'])}")
  else:
    items.append(f"**Classification (TSTR / TRTR)**: {NOT_RUN}")
  an = inp.anatomy
  if an and isinstance(an.get("codec"), dict) and "measures" in an["codec"]:
    v = an["codec"]["measures"]["ventricle_ml"]
    items.append(f"**Codec check**: the {an['case']} − {an['control']} ventricle effect kept through the sampler's "
                 f"decoding path: {fmt_ci(v.get('ratio'), v.get('ci_low'), v.get('ci_high'), 2)} of the original "
                 f"({'within' if v.get('preserved') else 'outside'} ±{fmt_pct(an['codec'].get('tolerance'), 0)})")
  if inp.tokenizer:
    items.append(f"**Tokenizer** ({inp.tokenizer.get('variant')}): val PSNR {fmt(inp.tokenizer.get('psnr'), 2, 'dB')}, "
                 f"SSIM {fmt(inp.tokenizer.get('ssim'), 4)}")
  return sec.add(items)


def anatomy_section(inp: Inputs) -> Section:
  """Ventricles and hippocampi by label: real vs synthetic, through the codec, and under the label alone."""
  title = "Anatomy by label"
  an = inp.anatomy
  if not an:
    return not_run(title, "no evaluation/anatomy.json; the `evaluate` stage has not run (evaluate.anatomy.enabled)")
  if an.get("skipped"):
    return not_run(title, an["skipped"])
  sec = Section(title)
  case, control = an["case"], an["control"]
  names = {"ventricle_ml": "lateral-ventricle CSF", "hippocampus_intensity": "hippocampal signal"}
  sec.add(f"Region-of-interest measures the disease changes, from an atlas placed by the brain's moments: "
          f"{names['ventricle_ml']} volume (mL) and {names['hippocampus_intensity']} (grey-matter intensity "
          f"relative to deep white matter). Effects are {case} − {control} differences of group means; "
          f"95 % intervals from a bootstrap over subjects within each label.")
  rows = []
  for m, e in (an.get("by_label") or {}).items():
    for who in ("real", "synthetic"):
      g = e[who]
      rows.append([names.get(m, m), f"{who} ({g['n_case']} {case} / {g['n_control']} {control})",
                   fmt(g.get("mean_control"), 3), fmt(g.get("mean_case"), 3),
                   fmt_ci(g.get("effect"), g.get("ci_low"), g.get("ci_high"), 3, signed=True),
                   fmt(e.get("effect_ratio"), 2) if who == "synthetic" else ""])
  sec.add(Table(["measure", "cohort (subjects)", f"{control} mean", f"{case} mean", f"{case} − {control} [CI]",
                 "synthetic / real effect"], rows,
                f"Real `{an.get('by_label_split')}` split vs the synthetic cohort; units: mL (ventricles), relative "
                "to white matter (hippocampus)"))
  codec = an.get("codec") or {}
  if "measures" in codec:
    rows = []
    for m, r in codec["measures"].items():
      rows.append([names.get(m, m), fmt(r["before"].get("effect"), 3, signed=True),
                   fmt(r["after"].get("effect"), 3, signed=True), fmt_ci(r.get("ratio"), r.get("ci_low"), r.get("ci_high"), 2),
                   "yes" if r.get("preserved") else "no"])
    sec.add(Table(["measure", "effect in real scans", "after encode → decode", "kept [CI]",
                   f"within ±{fmt_pct(codec.get('tolerance'), 0)}"], rows,
                  f"Codec check: {codec.get('n_scans')} real `{'+'.join(codec.get('splits', []))}` scans through the "
                  f"sampler's decoding path ({codec.get('codec')}); round-trip PSNR {fmt(codec.get('psnr_db'), 2, 'dB')}"
                  + (f"; lesion-mask channel Dice {fmt_ci(md.get('mean'), md.get('ci_low'), md.get('ci_high'))}"
                     if (md := codec.get("mask_dice")) else "")
                  + ". What the decoder cannot draw, no generator can produce."))
  else:
    sec.add(f"Codec check: skipped ({codec.get('skipped', NOT_RUN)}).")
  paired = an.get("paired") or {}
  if "measures" in paired:
    rows = []
    for m, r in paired["measures"].items():
      rows.append([names.get(m, m), fmt_ci(r.get("mean_difference"), r.get("ci_low"), r.get("ci_high"), 3, signed=True),
                   fmt(r.get("real_effect"), 3, signed=True), fmt(r.get("ratio_to_real"), 2),
                   {True: "yes", False: "no", None: "n/a"}[r.get("same_direction")]])
    sec.add(Table(["measure", f"paired {case} − {control} [CI]", "real effect", "ratio", "same direction"], rows,
                  f"Conditioning check: {paired.get('n_pairs')} synthetic subjects, each sampled from the same noise "
                  f"and attributes once as {case} and once as {control}; the difference is the label's alone."))
  else:
    sec.add(f"Paired conditioning check: skipped ({paired.get('skipped', NOT_RUN)}).")
  return sec


def run_section(inp: Inputs) -> Section:
  sec = Section("Run")
  if not inp.config and not inp.timings:
    return not_run("Run", "no config.json / timings.json in the workdir")
  cfg = inp.resolved_config()
  items = [f"Workdir: `{inp.workdir}`",
           f"Config hash: `{(inp.config or {}).get('config_hash', 'not recorded')}`"]
  if cfg.get("stages"):
    items.append(f"Stages requested: {cfg['stages']}")
  items.append(f"Report written: {time.strftime('%Y-%m-%d %H:%M:%S %z')}")
  sec.add(items)
  if inp.timings:
    from synthmri_jax.stages import STAGE_ORDER
    order = lambda name: STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER)
    rows = [[name, fmt_seconds(inp.timings[name])] for name in sorted(inp.timings, key=order)]
    total = sum(v for v in (num(x) for x in inp.timings.values()) if v is not None)
    rows.append(["**total**", fmt_seconds(total)])
    sec.add(Table(["stage", "wall time (s, h:mm:ss)"], rows, "Stage wall times (timings.json)"))
  else:
    sec.add("Stage wall times: not recorded (timings.json missing).")
  return sec


def data_section(inp: Inputs) -> Section:
  meta = inp.prepared_meta
  if not meta or not meta.get("complete"):
    return not_run("Data", "no complete prepared cohort (data/prepared.json); the `prepare` stage has not run")
  sec = Section("Data")
  shape = meta.get("shape") or []
  sp = num(meta.get("spacing_mm"))
  fov = " × ".join(fmt(s * sp, 0) for s in shape) + " mm" if sp and shape else "n/a"
  sec.add([f"Cohort table: `{meta.get('cohort_tsv', 'n/a')}`",
           f"Grid: {' × '.join(str(s) for s in shape)} voxels at {fmt(sp, 2, 'mm')} isotropic (field of view {fov}), "
           f"RAS+ orientation",
           f"Channels (sequences): {', '.join(meta.get('channels', []))}",
           f"Labels: {', '.join(meta.get('labels', []))}",
           f"Intensity normalisation: {meta.get('normalization', 'n/a')}",
           f"Participants: {meta.get('n_participants', 'n/a')}; prepared in {fmt_seconds(meta.get('prepare_seconds'))}"])
  table_path = os.path.join(inp.workdir, "data", "cohort.tsv")
  if os.path.isfile(table_path):
    t = pd.read_csv(table_path, sep="\t", keep_default_na=False, dtype={"participant_id": str})
    labels = list(meta.get("labels", [])) or sorted(t["label"].unique())
    splits = [s for s in ("train", "val", "test", "holdout") if (t["split"] == s).any()]
    rows = []
    for s in splits:
      ts = t[t["split"] == s]
      rows.append([s] + [str(int((ts["label"] == lab).sum())) for lab in labels]
                  + [str(len(ts)), str(ts["participant_id"].nunique())])
    rows.append(["**all**"] + [str(int((t["label"] == lab).sum())) for lab in labels]
                + [str(len(t)), str(t["participant_id"].nunique())])
    sec.add(Table(["split"] + [f"{lab} (scans)" for lab in labels] + ["scans", "participants"], rows,
                  "Scans per split and label (data/cohort.tsv)"))
  else:
    counts = meta.get("splits", {})
    sec.add(Table(["split", "scans"], [[k, str(v)] for k, v in counts.items()], "Scans per split (prepared.json)"))
  return sec


def tokenizer_section(inp: Inputs) -> Section:
  m = inp.tokenizer
  if not m:
    return not_run("Tokenizer", "no tokenizer/tokenizer_metrics.json; the `tokenizer` stage has not run")
  sec = Section("Tokenizer")
  sec.add(f"Variant **{m.get('variant')}**, {m.get('tokenizer_params', 'n/a'):,} parameters, evaluated on "
          f"{m.get('num_volumes')} volume(s) of the `{m.get('split')}` split "
          f"(intensities in [0, {fmt_g(m.get('data_range'))}]); trained in {fmt_seconds(m.get('seconds'))}."
          if isinstance(m.get("tokenizer_params"), int) else
          f"Variant **{m.get('variant')}**, evaluated on the `{m.get('split')}` split.")
  rows = [["main reconstruction", fmt(m.get("psnr"), 2), fmt(m.get("ssim"), 4), fmt(m.get("l1"), 4),
           fmt(m.get("boundary_band_l1"), 4)]]
  modes = m.get("clinical_modes") or {}
  for mode in ("encoded", "predicted", "null"):
    if mode in modes:
      d = modes[mode]
      rows.append([f"clinical latent {mode}", fmt(d.get("psnr"), 2), fmt(d.get("ssim"), 4), "",
                   fmt(d.get("boundary_band_l1"), 4)])
  sec.add(Table(["reconstruction", "PSNR (dB)", "SSIM (3D)", "L1", "boundary-band L1"], rows,
                "Validation reconstruction quality (higher PSNR / SSIM, lower L1 = better)"))
  notes = []
  if "prior_top1_accuracy" in modes:
    notes.append(f"Clinical prior top-1 code accuracy: {fmt_pct(modes['prior_top1_accuracy'])}")
  if "psnr_clinical_head" in m:
    notes.append(f"Clinical head alone: PSNR {fmt(m['psnr_clinical_head'], 2, 'dB')}")
  if m.get("boundary_band"):
    notes.append(f"Boundary band: {m['boundary_band']}")
  if m.get("perceptual"):
    notes.append(f"Perceptual loss network: {m['perceptual']}")
  for name, shape in (m.get("latents") or {}).items():
    notes.append(f"{name} latent: {' × '.join(str(s) for s in shape)} (spatial × code dim)")
  if notes:
    sec.add(notes)
  cbs = m.get("codebooks") or {}
  if cbs:
    sec.add(Table(["codebook", "codes used / size", "usage", "perplexity"],
                  [[n, f"{c.get('codes_used')} / {c.get('num_codes')}", fmt_pct(c.get("usage")),
                    fmt(c.get("perplexity"), 1)] for n, c in cbs.items()],
                  "Codebook usage over the validation split (perplexity: effective number of codes)"))
  phases = m.get("phases") or {}
  if phases:
    sec.add(Table(["training phase", "steps", "learning rate", "steps/s", "wall time", "trainable params"],
                  [[n, str(s.get("steps")), fmt_g(s.get("lr"), 3), fmt(s.get("steps_per_s"), 2),
                    fmt_seconds(s.get("seconds")), f"{s['trainable_params']:,}" if isinstance(
                        s.get("trainable_params"), int) else "n/a"] for n, s in phases.items()],
                  "Tokenizer training phases"))
  return sec


def ldm_section(inp: Inputs) -> Section:
  m = inp.ldm
  if not m or not m.get("complete"):
    return not_run("Latent diffusion model", "no complete ldm/ldm.json; the `ldm` stage has not run")
  sec = Section("Latent diffusion model")
  diff = (m.get("ldm") or {}).get("diffusion") or {}
  rows = [["training steps", str(m.get("step"))],
          ["throughput", fmt(m.get("steps_per_s"), 2, "steps/s")],
          ["wall time", fmt_seconds(m.get("seconds"))],
          ["final training loss", fmt_g(m.get("final_loss"))],
          ["parameters", f"{m['params']:,}" if isinstance(m.get("params"), int) else "n/a"],
          ["batch size", str(m.get("batch_size"))],
          ["training latents", str(m.get("num_train_latents"))],
          ["latent shape", " × ".join(str(s) for s in m.get("latent_shape", []))],
          ["latent scale factor", fmt_g(m.get("scale_factor"))]]
  if diff:
    rows.append(["prediction type", str(diff.get("prediction_type", "n/a"))])
  attrs = [a.get("name") for a in m.get("attributes", []) if isinstance(a, dict)]
  rows.append(["conditioning", ", ".join(["label"] + [a for a in attrs if a and a != "label"])])
  if m.get("codec"):
    rows.append(["decoder (tokenizer)", str(m["codec"])])
  sec.add(Table(["quantity", "value"], rows, "LDM training (ldm/ldm.json)"))
  st = inp.sample_state
  if st and st.get("complete"):
    scfg = inp.resolved_config().get("sample") or {}
    srows = [["subjects generated", str(st.get("num_subjects"))],
             ["sampler", f"{str(st.get('sampler', 'n/a')).upper()}, {st.get('steps')} steps"
              + (f", eta {fmt_g(scfg['eta'])}" if st.get("sampler") == "ddim" and "eta" in scfg else "")],
             ["LDM checkpoint step", str(st.get("checkpoint_step"))],
             ["sampling time", fmt(st.get("sampling_s_per_volume"), 3, "s/volume")],
             ["decoding time", fmt(st.get("decoding_s_per_volume"), 3, "s/volume")],
             ["sample stage wall time", fmt_seconds(st.get("seconds"))]]
    if "guidance_scale" in scfg:
      srows.insert(2, ["classifier-free guidance scale", fmt_g(scfg["guidance_scale"])])
    sec.add(Table(["quantity", "value"], srows, "Sampling (synthetic_state.json)"))
    t = inp.synthetic_table()
    if t is not None and "label" in t:
      counts = t["label"].value_counts()
      sec.add(Table(["label", "synthetic subjects"], [[str(k), str(int(v))] for k, v in counts.sort_index().items()],
                    "Synthetic cohort (synthetic/participants.tsv)"))
  else:
    sec.add(f"Sampling: **{NOT_RUN}** (no complete synthetic_state.json).")
  return sec
