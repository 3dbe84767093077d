"""The `report` stage on a fake workdir: a tiny real prepared cohort, a synthetic folder, and stage
JSON files shaped like the writers' (pipeline.tokenizer, pipeline.ldm, pipeline.sample,
tstr.Study.run / run_classifier, privacy.run_privacy). Checks that numbers come from those files,
the HTML is self-contained, a partial workdir renders with "not run" and no temp file is left."""

import importlib.util
import json
import os

import numpy as np
import pytest

from synthmri_jax import stages
from synthmri_jax.pipeline import report
from synthmri_jax.pipeline.report import document as report_doc
from synthmri_jax.data import loader
from synthmri_jax.pipeline import prepare
from synthmri_jax.data.cache import load_prepared
from synthmri_jax.evaluation.synthetic_cohort import write_cohort_folder
from synthmri_jax.utils import io

HERE = os.path.dirname(os.path.abspath(__file__))


def _test_prepare():
  """tests/test_prepare.py's tiny-cohort helpers (tests/ is not a package)."""
  spec = importlib.util.spec_from_file_location("_report_test_prepare", os.path.join(HERE, "test_prepare.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _seed_summary(values):
  v = np.asarray(values, float)
  return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size),
          "min": float(v.min()), "max": float(v.max()), "values": v.tolist()}


def _write_jsons(workdir, prepared):
  test = prepared.split("test")
  y = test["label_index"].to_numpy()
  if len(set(y.tolist())) < 2:   # the tiny cohort's test split may hold one class; ROC needs two
    y = np.arange(len(y)) % 2
  n = len(y)
  rng = np.random.default_rng(0)
  io.write_json_atomic(os.path.join(workdir, "config.json"),
                       {"config": {"stages": "prepare,report", "sample": {"eta": 0.0, "guidance_scale": 1.5}},
                        "config_hash": "abc123def456"})
  io.write_json_atomic(os.path.join(workdir, "timings.json"), {"prepare": 12.34, "tokenizer": 3723.0})
  io.write_json_atomic(os.path.join(workdir, "tokenizer", "tokenizer_metrics.json"), {
      "variant": "dual", "split": "val", "num_volumes": 2, "psnr": 27.4567, "ssim": 0.81234, "l1": 0.0312,
      "boundary_band_l1": 0.0456, "codebooks": {"generative": {"usage": 0.4375, "perplexity": 123.4, "num_codes": 512,
                                                                "codes_used": 224}},
      "phases": {"clinical": {"steps": 100, "lr": 1e-4, "seconds": 10.0, "steps_per_s": 9.87, "trainable_params": 1000}},
      "tokenizer_params": 123456, "volume_shape": [16, 16, 16], "channels": ["T1w"],
      "boundary_band": "image edges", "perceptual": "none", "data_range": 1.0,
      "clinical_modes": {"encoded": {"psnr": 26.111, "ssim": 0.8, "boundary_band_l1": 0.05},
                         "predicted": {"psnr": 25.222, "ssim": 0.7, "boundary_band_l1": 0.06},
                         "null": {"psnr": 20.333, "ssim": 0.6, "boundary_band_l1": 0.07},
                         "prior_top1_accuracy": 0.5},
      "psnr_clinical_head": 22.0, "latents": {"generative": [4, 4, 4, 8]}, "config_hash": "k", "seconds": 55.5})
  io.write_json_atomic(os.path.join(workdir, "ldm", "ldm.json"), {
      "complete": True, "key": "k", "model_key": "m", "codec": "dual tokenizer",
      "ldm": {"diffusion": {"prediction_type": "epsilon"}}, "attributes": [{"name": "age"}], "labels": ["CN", "AD"],
      "latent_shape": [4, 4, 4, 8], "scale_factor": 0.98, "step": 4321, "steps_per_s": 3.217, "final_loss": 0.123,
      "seconds": 99.0, "params": 2000000, "batch_size": 4, "num_train_latents": 6})
  io.write_json_atomic(os.path.join(workdir, "synthetic_state.json"), {
      "key": "s", "complete": True, "num_subjects": 6, "checkpoint_step": 4321, "sampler": "ddim", "steps": 50,
      "generated_this_run": 6, "seconds": 8.0, "sampling_s_per_volume": 0.25, "decoding_s_per_volume": 0.05})
  arms = {}
  for arm, (real_n, syn_n, noise) in {"TRTR": (6, 0, 0.3), "TSTR": (0, 6, 0.6), "AUG_1": (6, 6, 0.4),
                                      "CODEC": (0, 0, 0.4)}.items():
    for k in range(2):
      p1 = np.clip(y + rng.normal(0, noise, n), 0, 1) * 0.9 + 0.05
      probs = np.stack([1 - p1, p1], 1)
      io.write_json_atomic(os.path.join(workdir, "evaluation", "runs", arm, f"seed{k}", "result.json"), {
          "key": "x", "kind": "classifier", "arm": arm, "seed_index": k, "seed": k, "train": {"n_real": real_n,
                                                                                             "n_synthetic": syn_n},
          "steps": 10, "seconds": 1.0, "auc": {"auc": 0.7},
          "test": {"participant_id": test["participant_id"].tolist(), "label": y.tolist(), "probs": probs.tolist()}})
    aucs = {"TRTR": [0.8123, 0.8234], "TSTR": [0.7001, 0.7102], "AUG_1": [0.8301, 0.8402],
            "CODEC": [0.7801, 0.7902]}[arm]
    arms[arm] = {"real_fraction": 1.0, "synthetic": syn_n > 0,
                 "per_seed": [{"seed": k, "n_train_real": real_n, "n_train_synthetic": syn_n, "auc": a,
                               "ci_low": a - 0.1, "ci_high": a + 0.05, **({"n_train_codec": 6} if arm == "CODEC" else {})}
                              for k, a in enumerate(aucs)],
                 "auc_over_seeds": _seed_summary(aucs),
                 "seed_mean_scores": {"auc": aucs[0] + 0.0011, "ci_low": 0.6111, "ci_high": 0.9222, "n_seeds": 2},
                 "n_seeds": 2}
  io.write_json_atomic(os.path.join(workdir, "evaluation", "evaluation.json"), {
      "schema": "synthmri_jax.evaluation/1",
      "real": {"n_train": 6, "n_test": n, "test_per_class": {"CN": 1, "AD": 1}, "labels": ["CN", "AD"]},
      "synthetic": {"n": 6, "per_class": {"CN": 3, "AD": 3}, "dir": "x"},
      "protocol": {"seeds": [0, 1], "steps_per_run": 10, "batch_size": 2,
                   "ci": {"n_boot": 200, "alpha": 0.05, "method": "bca", "kind": "class-stratified bootstrap"}},
      "classification": {
          "arms": arms,
          "comparisons": {"TSTR-TRTR": {"a": "TSTR", "b": "TRTR", "delta_over_seeds": _seed_summary([-0.1122, -0.1132]),
                                        "seed_mean_scores": {"delta": -0.1133, "ci_low": -0.2544, "ci_high": 0.0155,
                                                             "p_value": 0.0789, "auc_a": 0.7012, "auc_b": 0.8134},
                                        "n_seeds": 2}},
          "tstr_trtr_ratio": {"value": 0.8618, "n_seeds": 2,
                              "seed_mean_scores": {"value": 0.862, "ci_low": 0.7, "ci_high": 1.02}},
          "codec_trtr_ratio": {"value": 0.9588, "n_seeds": 2,
                               "seed_mean_scores": {"value": 0.9601, "ci_low": 0.8, "ci_high": 1.1}}},
      "segmentation": {"skipped": "the real cohort has no masks"},
      "fidelity": {"extractors": {"trtr_classifier": "penultimate features"},
                   "FD_trtr_classifier": {"real_test_vs_synthetic": {"value": 12.3456, "ci_low": 10.1, "ci_high": 15.2,
                                                                     "n_a": n, "n_b": 6},
                                          "real_val_vs_real_test (reference: two real samples)": {
                                              "value": 3.21, "ci_low": 2.0, "ci_high": 4.0, "n_a": 2, "n_b": n}},
                   "KID_trtr_classifier": {"real_test_vs_synthetic": {"value": 0.0123, "ci_low": 0.01, "ci_high": 0.02,
                                                                      "n_a": n, "n_b": 6}},
                   "ms_ssim_diversity": {"channels": {"T1w": {"synthetic": {"mean": 0.4567, "ci_low": 0.4, "ci_high": 0.5,
                                                                            "n_pairs": 15, "n_volumes": 6}}}}},
  })
  fig_rel = os.path.join("evaluation", "figures", "privacy_pair_00.png")
  fig = report_doc.figure(2, 2)
  fig.subplots().imshow(np.eye(4))
  with io.atomic_path(os.path.join(workdir, fig_rel), suffix=".png") as tmp:
    fig.savefig(tmp, format="png")
  io.write_json_atomic(os.path.join(workdir, "evaluation", "privacy.json"), {
      "complete": True, "synthetic": {"n": 6},
      "real": {"n_train": 6, "calibration_split": "val", "n_calibration": 2, "holdout_split": "holdout",
               "n_holdout": 2},
      "copy_rule": "either", "quantile": 0.99, "measure_quantiles": {"embedding": 0.995, "voxel": 0.995},
      "tau": {"embedding": 0.9876, "voxel": 0.9123}, "n_copies": 1, "copy_fraction": 1 / 6,
      "expected_false_copy_fraction": 0.01,
      "copies": [{"participant_id": "sub-synth0003", "nearest_train_participant_id": "sub-04", "score": 0.9912,
                  "measure": "embedding", "tau": 0.9876, "flagged_by": ["embedding"]}],
      "n_memorized": 1, "memorized": [{"train_participant_id": "sub-04", "n_copies": 1, "max_score": 0.9912,
                                       "copies": ["sub-synth0003"]}],
      "closest_pairs": [{"participant_id": "sub-synth0003", "train_participant_id": "sub-04", "embedding_score": 0.9912,
                         "voxel_score": 0.5, "is_copy": True, "figure": fig_rel}],
      "dcr": {"embedding": {"closer_to_train_share": 0.5, "n_closer_to_train": 3, "n_synthetic": 6,
                            "expected_share": 0.75, "share_p_value": 0.9, "prob_synthetic_closer": 0.48,
                            "mann_whitney_p": 0.6}},
      "membership_inference": {"n_members": 6, "n_nonmembers": 2, "nonmember_split": "holdout",
                               "loss_attack": {"auc": 0.5234, "auc_ci": [0.3, 0.7], "tpr_at_1pct_fpr": 0.0167,
                                               "tpr_at_1pct_fpr_resolvable": True, "advantage": 0.1},
                               "pia": {"auc": 0.4876, "auc_ci": [0.3, 0.7], "tpr_at_1pct_fpr": None,
                                       "tpr_at_1pct_fpr_resolvable": False, "smallest_resolvable_fpr": 0.5,
                                       "tpr_at_smallest_fpr": 0.3333, "advantage": 0.1},
                               "split_bias_control": {"control_split": "val", "nonmember_split": "holdout",
                                                      "n_control": 4, "n_nonmembers": 2,
                                                      "loss_attack": {"auc": 0.6123, "auc_ci": [0.2, 0.9],
                                                                      "advantage": 0.25},
                                                      "pia": {"auc": 0.4567, "auc_ci": [0.1, 0.8],
                                                              "advantage": 0.2}}},
      "epsilon": {"models": [{"model": "ldm", "saw_private_data": True, "private": True, "epsilon": 7.891,
                              "statement": "DP-SGD: ε = 7.89 (PLD; RDP 8.5), δ = 1e-05"},
                             {"model": "tokenizer", "saw_private_data": True, "private": False, "epsilon": None,
                              "statement": "non-private (ε = ∞)"}],
                  "synthetic_cohort": {"epsilon_generator_upper_bound": None,
                                       "statement": "non-private (ε = ∞): tokenizer trained without DP",
                                       "non_private_releases": ["LDM latent scale factor"]}},
  })

  g = lambda case, control, eff, lo, hi, n=3: {"n_case": n, "n_control": n, "mean_case": case, "mean_control": control,
                                             "effect": eff, "ci_low": lo, "ci_high": hi}
  io.write_json_atomic(os.path.join(workdir, "evaluation", "anatomy.json"), {
      "case": "AD", "control": "CN", "by_label_split": "test", "n_synthetic": 6,
      "by_label": {"ventricle_ml": {"real": g(54.5, 41.3, 13.26, 9.1, 17.4), "synthetic": g(50.1, 43.0, 7.1, 1.2, 12.9),
                                    "effect_ratio": 0.5355},
                   "hippocampus_intensity": {"real": g(0.481, 0.626, -0.145, -0.2, -0.09),
                                             "synthetic": g(0.5, 0.55, -0.05, -0.1, 0.01), "effect_ratio": 0.3448}},
      "codec": {"n_scans": 100, "splits": ["val", "test"], "codec": "vqvae tokenizer", "psnr_db": 23.56, "tolerance": 0.25,
                "measures": {"ventricle_ml": {"before": {"effect": 12.5}, "after": {"effect": 10.93}, "ratio": 0.8737,
                                              "ci_low": 0.7697, "ci_high": 0.9809, "preserved": True},
                             "hippocampus_intensity": {"before": {"effect": -0.13}, "after": {"effect": -0.063},
                                                       "ratio": 0.4831, "ci_low": 0.3157, "ci_high": 0.6144,
                                                       "preserved": False}}},
      "paired": {"n_pairs": 16, "measures": {
          "ventricle_ml": {"mean_difference": 4.321, "ci_low": 2.5, "ci_high": 6.1, "real_effect": 13.26,
                           "ratio_to_real": 0.3259, "same_direction": True},
          "hippocampus_intensity": {"mean_difference": 0.01, "ci_low": -0.01, "ci_high": 0.03, "real_effect": -0.145,
                                    "ratio_to_real": -0.069, "same_direction": False}}},
  })


@pytest.fixture(scope="module")
def full_workdir(tmp_path_factory):
  tp = _test_prepare()
  root = tmp_path_factory.mktemp("report")
  config = tp.quickstart(os.path.dirname(HERE))
  config.data.cohort_tsv = tp.make_cohort(str(root / "bids"))
  config.data.shape = (16, 16, 16)
  config.data.spacing_mm = 3.0
  config.data.num_workers = 0
  workdir = str(root / "work")
  prepare.run(config, workdir)
  prepared = load_prepared(workdir)
  src = loader.CohortSource(prepared, "train")
  write_cohort_folder(os.path.join(workdir, "synthetic"), [src[i]["image"] * 0.9 for i in range(len(src))],
                      [prepared.labels[int(src[i]["label"])] for i in range(len(src))], prepared.affine)
  _write_jsons(workdir, prepared)
  out = report.run(config, workdir)
  return config, workdir, out


def _read(path):
  with open(path) as f:
    return f.read()


def _temp_files(workdir):
  return [os.path.join(d, f) for d, _, files in os.walk(workdir) for f in files if ".tmp" in f]


def test_registered_as_a_stage():
  assert stages.STAGES["report"] == "synthmri_jax.pipeline.report:run"
  assert stages.parse_stages("report") == ["report"]


def test_numbers_come_from_the_stage_files(full_workdir):
  _, workdir, out = full_workdir
  md = _read(os.path.join(workdir, "report.md"))
  for s in ("abc123def456",              # config hash
            "12.3 s (0:00:12)", "3723.0 s (1:02:03)",   # timings
            "16 × 16 × 16 voxels at 3.00 mm",           # grid
            "27.46", "0.8123", "26.11", "25.22", "20.33", "224 / 512", "43.8 %",   # tokenizer
            "4321", "3.22 steps/s", "DDIM, 50 steps",   # LDM / sampler
            "0.813 [0.611, 0.922]",                     # TRTR seed-mean AUC [CI]
            "0.818 ± 0.008 (n=2)",                      # TRTR mean ± SD over seeds
            "0.701 [0.611, 0.922]",                     # TSTR
            "-0.113 [-0.254, +0.015]", "0.0789",        # ΔAUC
            "0.862",                                    # TSTR / TRTR ratio
            "0.781 [0.611, 0.922]", "6 real, encoded → decoded", "0.959", "0.960 [0.800, 1.100]",   # CODEC arm
            "12.35 [10.1, 15.2]", "3.21", "0.457 [0.400, 0.500]",   # FD, floor, MS-SSIM
            "sub-synth0003", "sub-04", "0.9876",        # copies, τ
            "1 of 6", "0.523 [0.300, 0.700]", "0.017",  # copies, MIA AUC, TPR@1%FPR
            "not resolvable with 2 non-members; at FPR 50.0 %: 0.333",   # unresolvable: no number at 1 %
            "0.612 [0.200, 0.900]", "0.457 [0.100, 0.800]", "4 `val` scans",   # MIA split-bias control
            "p (permutation)",
            "non-private (ε = ∞): tokenizer trained without DP", "7.89",
            "+13.260 [+9.100, +17.400]", "0.54",        # anatomy by label: real effect, synthetic / real
            "0.87 [0.77, 0.98]", "23.56 dB",            # codec check
            "+4.321 [+2.500, +6.100]", "0.33"):         # paired conditioning check
    assert s in md, s
  head = md.split("## Summary")[0]
  assert "Useful?" in head and "Yes" in head and "0.701 [0.611, 0.922]" in head and "1 of 6" in head
  assert "0.612 between two non-member splits" in head
  assert "answer_grid.png" in head                  # the scans beside the answers, before any detail table
  for s in ():
    assert s in md, s
  assert "not run" not in md
  assert all(v == "ok" for v in out["sections"].values()), out["sections"]
  assert "{" not in md.split("## Summary")[1]   # no raw JSON
  names = sorted(os.path.basename(p) for p in out["figures"])
  assert names == ["answer_grid.png", "roc.png", "slices_AD.png", "slices_CN.png"]
  table = md.split("ROC-AUC per training arm")[1]
  assert table.index("| TRTR") < table.index("| TSTR") < table.index("| AUG_1")   # the study's order, not sorted
  assert "](report_figures/roc.png)" in md and "](evaluation/figures/privacy_pair_00.png)" in md


def test_html_is_self_contained(full_workdir):
  _, workdir, _ = full_workdir
  h = _read(os.path.join(workdir, "report.html"))
  assert h.count('src="data:image/png;base64,') == 5   # answer grid, two slice grids, ROC, one privacy pair
  assert "http" not in h.lower() and "<link" not in h and "<script" not in h
  assert "<table>" in h and "0.862" in h and "0.754" not in h     # no external reference typed in


def test_atomic_and_rerun_replaces_stale_figures(full_workdir):
  config, workdir, _ = full_workdir
  stale = os.path.join(workdir, report_doc.FIGURES_DIR, "old.png")
  with open(stale, "wb") as f:
    f.write(b"x")
  report.run(config, workdir)
  assert not os.path.exists(stale)
  assert _temp_files(workdir) == []


def test_partial_workdir_renders_not_run(tmp_path, full_workdir):
  config, full, _ = full_workdir
  workdir = str(tmp_path / "partial")
  for rel in ("config.json", os.path.join("tokenizer", "tokenizer_metrics.json")):
    os.makedirs(os.path.dirname(os.path.join(workdir, rel)), exist_ok=True)
    with open(os.path.join(workdir, rel), "w") as f:
      f.write(_read(os.path.join(full, rel)))
  out = report.run(config, workdir)
  md = _read(out["markdown"])
  assert "27.46" in md and "abc123def456" in md
  for title in ("Data", "Latent diffusion model", "Real vs synthetic scans", "Downstream classification (TSTR / TRTR)",
                "Fidelity and diversity", "Privacy"):
    assert out["sections"][title] == "not run", title
  assert md.count("**not run**") >= 6
  assert "slice grids not available" in md
  h = _read(out["html"])
  assert "data:image" not in h and "http" not in h.lower()
  assert out["figures"] == [] and _temp_files(workdir) == []


def test_unreadable_json_does_not_crash(tmp_path):
  workdir = str(tmp_path / "broken")
  os.makedirs(os.path.join(workdir, "evaluation"))
  with open(os.path.join(workdir, "evaluation", "evaluation.json"), "w") as f:
    f.write("{not json")
  with open(os.path.join(workdir, "evaluation", "privacy.json"), "w") as f:
    json.dump({"n_copies": "weird"}, f)   # wrong shape: the section degrades, the report renders
  out = report.run(None, workdir)
  assert os.path.exists(out["markdown"]) and os.path.exists(out["html"])
  assert out["sections"]["Downstream classification (TSTR / TRTR)"] == "not run"


def test_segmentation_arms_reach_the_answers(tmp_path, full_workdir):
  """With SEG_real and SEG_synthetic in evaluation.json, the answers carry both Dice scores, the
  lesions detected and their ratio, and the Study table the false positives: read, not recomputed."""
  import shutil
  config, full, _ = full_workdir
  workdir = str(tmp_path / "seg")
  shutil.copytree(full, workdir)
  path = os.path.join(workdir, "evaluation", "evaluation.json")
  ev = json.load(open(path))

  def arm(dice, det, fp, over):
    ci = lambda m, lo, hi: {"mean": m, "ci_low": lo, "ci_high": hi, "n": 6, "unit": "subjects"}
    return {"per_seed": [{"seed": 0, "dice": ci(*dice), "lesions_detected": ci(*det),
                          "false_positives_per_scan": ci(*fp)}], "dice_over_seeds": _seed_summary(over), "n_seeds": 1}

  ev["segmentation"] = {"SEG_real": arm((0.8123, 0.7001, 0.8802), (0.9444, 0.8333, 1.0), (0.5, 0.1667, 0.8333), [0.8]),
                        "SEG_synthetic": arm((0.6432, 0.5101, 0.7333), (0.7778, 0.5, 0.9444), (1.25, 0.5, 2.0), [0.7]),
                        "delta_synthetic_minus_real": {"over_seeds": _seed_summary([-0.1691]), "n_seeds": 1}}
  io.write_json_atomic(path, ev)
  md = _read(report.run(config, workdir)["markdown"])
  head = md.split("## Summary")[0]
  for s in ("0.812 [0.700, 0.880]", "0.643 [0.510, 0.733]", "0.944 [0.833, 1.000]", "0.778 [0.500, 0.944]",
            "synthetic / real Dice | 0.875"):
    assert s in head, s
  study = md.split("## Summary")[1]
  assert "1.250 [0.500, 2.000]" in study and "synthetic / real (seed means) | 0.875" in study
