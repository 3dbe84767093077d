"""Study statistics: AUC equals scikit-learn's, bootstrap intervals cover, paired ΔAUC behaves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import roc_auc_score, roc_curve

from synthmri_jax.evaluation import stats


def binormal(rng: np.random.Generator, n_neg: int, n_pos: int,
             shift: float) -> tuple[np.ndarray, np.ndarray]:
  """Scores N(0, 1) for negatives, N(shift, 1) for positives: true AUC = Φ(shift / √2)."""
  y = np.r_[np.zeros(n_neg, int), np.ones(n_pos, int)]
  return y, rng.normal(size=n_neg + n_pos) + shift * y


def multiclass(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
  y = rng.integers(0, k, n)
  logits = rng.normal(size=(n, k)) + 1.2 * np.eye(k)[y]
  p = np.exp(logits)
  return y, p / p.sum(axis=1, keepdims=True)


def test_auc_equals_sklearn_binary_and_multiclass():
  rng = np.random.default_rng(0)
  y, s = binormal(rng, 70, 30, 1.0)
  s = np.round(s, 1)  # ties
  r = stats.auc_with_ci(y, s, n_boot=200)
  assert r["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-15)
  assert r["ci_low"] < r["auc"] < r["ci_high"]
  assert r["n"] == 100 and r["n_per_class"] == {"0": 70, "1": 30} and r["n_classes"] == 2
  # (n, 2) probabilities with string labels: columns in sorted label order, so column 1
  # is P("CN") and "CN" is the positive class.
  labels = np.where(y == 1, "AD", "CN")
  p_ad = 1.0 / (1.0 + np.exp(-s))
  assert stats.auc(labels, np.c_[p_ad, 1 - p_ad]) == pytest.approx(roc_auc_score(labels == "CN", 1 - p_ad))
  assert stats.auc(labels, np.c_[p_ad, 1 - p_ad]) == pytest.approx(roc_auc_score(y, s))
  ym, pm = multiclass(rng, 120, 3)
  rm = stats.auc_with_ci(ym, pm, n_boot=200)
  assert rm["auc"] == pytest.approx(roc_auc_score(ym, pm, multi_class="ovr", average="macro"), abs=1e-15)
  assert rm["ci_low"] < rm["auc"] < rm["ci_high"] and rm["n_classes"] == 3


def test_bootstrap_statistic_equals_sklearn_on_resamples():
  """The vectorised Mann-Whitney AUC and TPR@FPR inside the bootstrap are sklearn's numbers."""
  rng = np.random.default_rng(1)
  y, s = binormal(rng, 40, 25, 0.8)
  s = np.round(s, 1)
  ym, pm = multiclass(rng, 90, 4)
  for labels, scores in ((y, s), (ym, pm)):
    _, sv, classes = stats._auc_inputs(labels, scores)
    groups = stats._class_groups(labels, classes)
    idx = [rng.integers(0, len(g), (5, len(g))) for g in groups]
    resampled = [g[i] for g, i in zip(groups, idx)]
    got = stats._auc_of_groups(sv, resampled)
    for b in range(5):
      sub = np.concatenate([r[b] for r in resampled])
      if scores.ndim == 1:
        want = roc_auc_score(labels[sub], scores[sub])
      else:
        want = roc_auc_score(labels[sub], scores[sub], multi_class="ovr", average="macro")
      assert got[b] == pytest.approx(want, abs=1e-12)
  neg, pos = s[y == 0], s[y == 1]
  for fpr in (0.0, 0.01, 0.05, 0.1, 0.29, 0.5, 1.0):
    want = stats.tpr_at_fpr(y, s, fpr)
    got = stats._tpr_at_fpr_sorted(pos[None], np.sort(neg)[None], fpr)[0]
    assert got == pytest.approx(want), fpr


def test_auc_ci_covers_truth_at_about_nominal_rate():
  rng = np.random.default_rng(2)
  shift = 1.0
  truth = scipy.stats.norm.cdf(shift / math.sqrt(2.0))
  n_sim, hits = 200, 0
  for i in range(n_sim):
    y, s = binormal(rng, 50, 50, shift)
    r = stats.auc_with_ci(y, s, n_boot=200, seed=i)
    hits += r["ci_low"] <= truth <= r["ci_high"]
  assert 0.9 <= hits / n_sim <= 0.99, hits / n_sim


def test_degenerate_perfect_separation_gives_finite_interval():
  y = np.r_[np.zeros(20, int), np.ones(20, int)]
  s = y + np.linspace(0.0, 0.5, 40)
  r = stats.auc_with_ci(y, s, n_boot=200)
  assert r["auc"] == 1.0 and r["ci_low"] == 1.0 and r["ci_high"] == 1.0
  assert r["method"].startswith("percentile") and r["se"] == 0.0


def test_input_validation():
  with pytest.raises(ValueError, match="two classes"):
    stats.auc_with_ci(np.zeros(10), np.arange(10.0))
  with pytest.raises(ValueError, match="at least 2 subjects"):
    stats.auc_with_ci(np.r_[np.zeros(9), 1], np.arange(10.0), n_boot=10)
  with pytest.raises(ValueError, match="shape"):
    stats.auc(np.arange(30) % 3, np.ones((30, 2)) / 2)
  with pytest.raises(ValueError, match="labels"):
    stats.auc(np.arange(10) % 2, np.arange(9.0))


def test_paired_delta_identical_scores_is_zero():
  rng = np.random.default_rng(3)
  y, s = binormal(rng, 60, 40, 1.0)
  r = stats.paired_delta_auc(y, s, s.copy(), n_boot=300)
  assert r["delta"] == 0.0 and r["ci_low"] <= 0.0 <= r["ci_high"]
  assert r["p_value"] == 1.0 and r["auc_a"] == r["auc_b"]


def test_paired_delta_detects_a_real_difference():
  rng = np.random.default_rng(4)
  y = np.r_[np.zeros(100, int), np.ones(100, int)]
  latent = rng.normal(size=200) + 1.5 * y
  strong = latent + 0.3 * rng.normal(size=200)
  weak = latent + 2.0 * rng.normal(size=200)
  r = stats.paired_delta_auc(y, weak, strong, n_boot=1000)
  assert r["delta"] == pytest.approx(roc_auc_score(y, weak) - roc_auc_score(y, strong))
  assert r["delta"] < 0 and r["ci_high"] < 0 and r["p_value"] < 0.01
  # Pairing: the paired interval is narrower than the two unpaired ones would suggest.
  a, b = stats.auc_with_ci(y, weak, n_boot=1000), stats.auc_with_ci(y, strong, n_boot=1000)
  assert r["se"] < math.hypot(a["se"], b["se"])


def test_paired_delta_holds_its_level_under_the_null():
  rng = np.random.default_rng(5)
  rejections = 0
  for i in range(60):
    y = np.r_[np.zeros(40, int), np.ones(40, int)]
    latent = rng.normal(size=80) + y
    a, b = latent + rng.normal(size=80), latent + rng.normal(size=80)
    rejections += stats.paired_delta_auc(y, a, b, n_boot=300, seed=i)["p_value"] < 0.05
  assert rejections <= 8  # 5 % of 60 is 3; P(>= 9 | 5 %) < 0.5 %


def test_tpr_at_fpr_hand_made():
  # Negatives 1..10; positives 13, 12, 11, 9.5, 8.5, then five below every negative:
  # FPR 0 keeps 13, 12, 11; FPR 0.1 (threshold 9.5) adds 9.5; FPR 0.2 (8.5) adds 8.5.
  y = np.r_[np.zeros(10, int), np.ones(10, int)]
  s = np.r_[np.arange(1.0, 11.0), [13, 12, 11, 9.5, 8.5], np.full(5, -1.0)]
  assert stats.tpr_at_fpr(y, s, 0.0) == pytest.approx(0.3)
  assert stats.tpr_at_fpr(y, s, 0.05) == pytest.approx(0.3)
  assert stats.tpr_at_fpr(y, s, 0.1) == pytest.approx(0.4)
  assert stats.tpr_at_fpr(y, s, 0.2) == pytest.approx(0.5)
  assert stats.tpr_at_fpr(y, s, 0.3) == pytest.approx(0.5)
  assert stats.tpr_at_fpr(y, s, 1.0) == pytest.approx(1.0)
  r = stats.tpr_at_fpr_with_ci(y, s, 0.1, n_boot=200)
  assert r["tpr"] == pytest.approx(0.4) and r["ci_low"] <= 0.4 <= r["ci_high"]
  assert r["resolvable"] and not stats.tpr_at_fpr_with_ci(y, s, 0.01, n_boot=50)["resolvable"]


def test_roc_curve_points_match_sklearn():
  rng = np.random.default_rng(6)
  y, s = binormal(rng, 30, 30, 1.0)
  c = stats.roc_curve_points(y, s)
  fpr, tpr, thr = roc_curve(y, s)
  np.testing.assert_array_equal(c["fpr"], fpr)
  np.testing.assert_array_equal(c["tpr"], tpr)
  np.testing.assert_array_equal(c["thresholds"], thr)


def test_summarize_seeds():
  v = [0.81, 0.79, 0.84]
  r = stats.summarize_seeds(v)
  assert r["mean"] == pytest.approx(np.mean(v)) and r["sd"] == pytest.approx(np.std(v, ddof=1))
  assert r["n"] == 3 and r["values"] == v and r["min"] == 0.79 and r["max"] == 0.84
  assert stats.format_mean_sd(r) == f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f} (n=3)"
  one = stats.summarize_seeds([0.7])
  assert one["n"] == 1 and math.isnan(one["sd"]) and stats.format_mean_sd(one) == "0.700 (n=1)"
  with pytest.raises(ValueError):
    stats.summarize_seeds([0.7, float("nan")])


def test_subject_bootstrap_counts_a_subject_once_however_many_sessions():
  """Each subject scanned 4 times, the sessions identical: resampling subjects gives exactly the
  interval of one scan per subject (binary and multi-class, and paired ΔAUC), resampling scans a
  narrower one (it takes 4 identical sessions for 4 independent draws)."""
  rng = np.random.default_rng(3)
  for y, s in (binormal(rng, 20, 16, 1.0), multiclass(rng, 45, 3)):
    subj = np.arange(len(y))
    rep = lambda a: np.repeat(a, 4, axis=0)
    one = stats.auc_with_ci(y, s, n_boot=400, seed=1)
    by_subject = stats.auc_with_ci(rep(y), rep(s), n_boot=400, seed=1, subjects=rep(subj))
    by_scan = stats.auc_with_ci(rep(y), rep(s), n_boot=400, seed=1)
    assert by_subject["unit"] == "subjects" and by_subject["n_units"] == len(y) and one["unit"] == "scans"
    for k in ("auc", "ci_low", "ci_high", "se"):
      assert by_subject[k] == pytest.approx(one[k], abs=1e-9), k
    assert by_scan["ci_high"] - by_scan["ci_low"] < 0.7 * (one["ci_high"] - one["ci_low"])
    s2 = s + rng.normal(0, 0.5, size=s.shape)
    if s.ndim == 2:                      # multi-class scores must stay probabilities
      s2 = np.exp(s2) / np.exp(s2).sum(axis=1, keepdims=True)
    d_one = stats.paired_delta_auc(y, s, s2, n_boot=400, seed=1)
    d_sub = stats.paired_delta_auc(rep(y), rep(s), rep(s2), n_boot=400, seed=1, subjects=rep(subj))
    for k in ("delta", "ci_low", "ci_high", "se"):
      assert d_sub[k] == pytest.approx(d_one[k], abs=1e-9), k


def test_subject_bootstrap_with_one_scan_each_is_the_scan_bootstrap_and_checks_labels():
  y, s = binormal(np.random.default_rng(4), 15, 15, 0.8)
  a = stats.auc_with_ci(y, s, n_boot=300, seed=2)
  b = stats.auc_with_ci(y, s, n_boot=300, seed=2, subjects=[f"sub-{i}" for i in range(len(y))])
  assert (a["ci_low"], a["ci_high"]) == (b["ci_low"], b["ci_high"]) and (a["unit"], b["unit"]) == ("scans", "subjects")
  ids = np.arange(len(y)) // 2          # pairs straddle the classes at index 14 / 15
  with pytest.raises(ValueError, match="one label per subject"):
    stats.auc_with_ci(y, s, subjects=ids)


def test_bootstrap_mean_by_subject_averages_sessions_first():
  v = np.random.default_rng(5).normal(0.8, 0.1, size=30)
  one = stats.bootstrap_mean(v, 400, 0.05, "bca", seed=1)
  subj = np.repeat(np.arange(30), 3)
  by_subject = stats.bootstrap_mean(np.repeat(v, 3), 400, 0.05, "bca", seed=1, subjects=subj)
  for k in ("mean", "ci_low", "ci_high", "se"):
    assert by_subject[k] == pytest.approx(one[k], abs=1e-12), k
  assert by_subject["n"] == 30 and by_subject["unit"] == "subjects"
  by_scan = stats.bootstrap_mean(np.repeat(v, 3), 400, 0.05, "bca", seed=1)
  assert by_scan["ci_high"] - by_scan["ci_low"] < 0.7 * (one["ci_high"] - one["ci_low"])
