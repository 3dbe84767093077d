"""Clinically readable fidelity: label effects with subject-level intervals, the paired codec
check, and the ROI measures on simulated brains whose anatomy is known."""

import numpy as np
import pytest

from synthmri_jax.data import embedded
from synthmri_jax.evaluation import anatomy, codec_check


def _groups(rng, n, mean_case, mean_control, sd):
  values = np.concatenate([rng.normal(mean_case, sd, n), rng.normal(mean_control, sd, n)])
  labels = np.array(["AD"] * n + ["CN"] * n)
  return values, labels


def test_group_effect_recovers_a_planted_difference_with_honest_coverage():
  rng = np.random.default_rng(0)
  covered, trials = 0, 60
  for t in range(trials):
    v, y = _groups(rng, 30, 52.0, 42.0, 6.0)
    r = anatomy.group_effect(v, y, "AD", "CN", n_boot=400, seed=t)
    assert r["effect"] == pytest.approx(v[:30].mean() - v[30:].mean())
    assert r["relative"] == pytest.approx(r["effect"] / v[30:].mean())
    assert r["ci_low"] < r["effect"] < r["ci_high"]
    covered += r["ci_low"] <= 10.0 <= r["ci_high"]
  # 95 % nominal; a percentile bootstrap with 30 per group is a little narrow, never this bad:
  assert covered / trials >= 0.85
  # With no difference planted, the interval holds 0 about as often.
  null = [anatomy.group_effect(*_groups(rng, 30, 42.0, 42.0, 6.0), "AD", "CN", n_boot=400, seed=t)
          for t in range(60)]
  assert np.mean([r["ci_low"] <= 0 <= r["ci_high"] for r in null]) >= 0.85


def test_group_effect_bootstraps_subjects_not_scans():
  rng = np.random.default_rng(1)
  v, y = _groups(rng, 12, 1.0, 0.0, 1.0)
  once = anatomy.group_effect(v, y, "AD", "CN", n_boot=1000, seed=0)
  # Three identical sessions per subject: the same subjects, so the same effect and interval.
  subjects = np.repeat(np.arange(len(v)).astype(str), 3)
  thrice = anatomy.group_effect(np.repeat(v, 3), np.repeat(y, 3), "AD", "CN", subjects=subjects, n_boot=1000, seed=0)
  assert thrice["n_case"] == 12 and thrice["effect"] == pytest.approx(once["effect"])
  assert (thrice["ci_low"], thrice["ci_high"]) == pytest.approx((once["ci_low"], once["ci_high"]))
  naive = anatomy.group_effect(np.repeat(v, 3), np.repeat(y, 3), "AD", "CN", n_boot=1000, seed=0)
  assert naive["ci_high"] - naive["ci_low"] < 0.7 * (once["ci_high"] - once["ci_low"])
  with pytest.raises(ValueError, match="different labels"):
    anatomy.group_effect(v[:2], np.array(["AD", "CN"]), "AD", "CN", subjects=["s", "s"])


def test_paired_effect_ratio_is_exact_for_a_scaled_effect():
  rng = np.random.default_rng(2)
  before, y = _groups(rng, 25, 10.0, 0.0, 2.0)
  # The round trip keeps half of every subject's deviation from the control mean plus a constant.
  after = 0.5 * (before - before[y == "CN"].mean()) + 3.0
  r = anatomy.paired_effect(before, after, y, "AD", "CN", n_boot=500)
  assert r["ratio"] == pytest.approx(0.5)
  # Every resample halves the effect: the paired interval collapses onto 0.5.
  assert r["ci_low"] == pytest.approx(0.5) and r["ci_high"] == pytest.approx(0.5)
  assert r["preserved"] is False
  same = anatomy.paired_effect(before, before + rng.normal(0, 0.1, before.shape), y, "AD", "CN", n_boot=500)
  assert same["preserved"] is True and same["ci_low"] < 1.0 < same["ci_high"]


@pytest.fixture(scope="module")
def simulated():
  """Ten subjects at 4.5 mm on the quickstart grid, with their labels."""
  cfg = dict(num_subjects=10, spacing_mm=4.5, ad_fraction=0.5, ad_effect=1.0, age_range=(55.0, 90.0),
             lesions=False, lesion_fraction=1.0, vary_storage=False, seed=0)
  spec = embedded.CohortSpec.of(cfg)
  labels = embedded.cohort_labels(spec)
  vols, affine = [], None
  for i, lab in enumerate(labels):
    images, _, affine = embedded.simulate_subject(spec, embedded.draw_subject(spec, i, lab))
    img = images["T1w"]
    vols.append(img / np.percentile(img[img > 0], 99.5))
  return np.stack(vols)[..., None].astype(np.float32), np.asarray(labels), affine


def test_measures_see_the_simulated_disease_and_the_codec_check_sees_blur(simulated):
  vols, labels, affine = simulated
  m = anatomy.measure_volumes(vols, affine)
  assert np.all(np.isfinite(m["ventricle_ml"])) and np.all(m["ventricle_ml"] > 0)
  assert m["ventricle_ml"][labels == "AD"].mean() > m["ventricle_ml"][labels == "CN"].mean()
  assert m["hippocampus_intensity"][labels == "AD"].mean() < m["hippocampus_intensity"][labels == "CN"].mean()
  idx = np.array([["CN", "AD"].index(l) for l in labels])
  ident = codec_check.check(vols, vols.copy(), idx, affine, ["CN", "AD"], "AD", "CN", n_boot=200)
  assert ident["psnr_db"] > 100
  for r in ident["measures"].values():
    assert r["ratio"] == pytest.approx(1.0) and r["preserved"]
  # A codec that blurs (a 3-voxel box filter) fills the ventricles: the check must say so.
  from scipy import ndimage
  blurred = ndimage.uniform_filter(vols, size=(1, 3, 3, 3, 1))
  b = codec_check.check(vols, blurred, idx, affine, ["CN", "AD"], "AD", "CN", n_boot=200)
  assert b["psnr_db"] < 40
  assert b["measures"]["ventricle_ml"]["ratio"] < 0.75 and not b["measures"]["ventricle_ml"]["preserved"]


def test_measures_read_the_t1w_channel_wherever_it_is():
  """A T2w-first cohort is measured on its T1w channel: the same numbers as the T1w scans alone. Read
  off the T2w channel (bright CSF) the ventricle measure would be far off; without T1w, none applies."""
  cfg = dict(num_subjects=6, spacing_mm=4.5, ad_fraction=0.5, ad_effect=1.0, age_range=(55.0, 90.0),
             lesions=False, lesion_fraction=1.0, vary_storage=False, seed=0)
  spec = embedded.CohortSpec.of(cfg, ["T2w", "T1w"])
  vols, affine = [], None
  for i, lab in enumerate(embedded.cohort_labels(spec)):
    images, _, affine = embedded.simulate_subject(spec, embedded.draw_subject(spec, i, lab))
    vols.append(np.stack([images[s] / np.percentile(images[s][images[s] > 0], 99.5) for s in ("T2w", "T1w")], -1))
  vols = np.stack(vols).astype(np.float32)
  channel = anatomy.measured_channel(["T2w", "T1w"])
  assert channel == 1
  assert anatomy.measured_channel(["T2w", "FLAIR"]) is None
  on_t1w = anatomy.measure_volumes(vols, affine, channel)
  alone = anatomy.measure_volumes(vols[..., 1:], affine)
  for m in anatomy.MEASURES:
    np.testing.assert_array_equal(on_t1w[m], alone[m])
  on_t2w = anatomy.measure_volumes(vols, affine, 0)
  assert np.all(np.abs(on_t2w["ventricle_ml"] - alone["ventricle_ml"]) > 0.5 * alone["ventricle_ml"]), (on_t2w, alone)


def test_a_cohort_without_t1w_gets_no_anatomy_numbers_and_the_report_says_why(tmp_path):
  import json
  import os

  import ml_collections
  import pandas as pd

  from synthmri_jax.evaluation import clinical
  from synthmri_jax.pipeline.report import sections
  from synthmri_jax.pipeline.report.inputs import Inputs
  from synthmri_jax.pipeline.report.document import NOT_RUN
  from synthmri_jax.utils import io

  root = tmp_path / "data"
  root.mkdir()
  pd.DataFrame([dict(participant_id="01", session_id="", label="CN", label_index=0, age=70.0, sex="F", split="test",
                     image="cache/sub-01.npy", mask="")]).to_csv(root / "cohort.tsv", sep="\t", index=False)
  io.write_json_atomic(str(root / "prepared.json"), dict(shape=[8, 8, 8], channels=["T2w", "FLAIR"], labels=["CN", "AD"],
                                                         complete=True, config_hash="test", spacing_mm=4.5,
                                                         affine=np.eye(4).tolist()))
  out = clinical.run(ml_collections.ConfigDict(), str(tmp_path), synthetic=None, log=lambda m: None)
  assert "T1w" in out["skipped"] and "'T2w', 'FLAIR'" in out["skipped"] and "by_label" not in out
  assert json.load(open(os.path.join(tmp_path, "evaluation", clinical.FILE))) == out
  sec = sections.anatomy_section(Inputs(str(tmp_path)))
  assert sec.status == NOT_RUN and "T1w contrast" in " ".join(map(str, sec.blocks))
