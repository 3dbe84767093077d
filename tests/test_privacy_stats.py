"""Empirical privacy statistics: similarity definitions, planted copies, DCR, membership inference.

The cohort is smooth random 'brains': a shared template plus subject-specific
Gaussian-filtered noise inside an ellipsoid head mask, zero outside. Embeddings are a fixed
random projection of 2×-pooled volumes, standing in for the project's encoder.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats

from synthmri_jax.evaluation import membership_stats as ms
from synthmri_jax.evaluation import privacy_stats as ps

S = 24
N_TRAIN = N_VAL = 300
N_HOLDOUT = 400
N_EACH_COPY = 20


def _null_ok(k: int, n: int, cal: dict) -> bool:
  """k flagged genuine scans lie in the central 99.8 % of the calibrated null law."""
  null = ps.null_copy_count(n, cal["n_calibration"], cal["quantile"])
  return null.cdf(k) > 0.001 and null.sf(k - 1) > 0.001


@pytest.fixture(scope="module")
def cohort() -> dict:
  rng = np.random.default_rng(0)
  g = np.indices((S, S, S)).astype(float) - (S - 1) / 2
  mask = (g[0] / 10) ** 2 + (g[1] / 9) ** 2 + (g[2] / 8) ** 2 <= 1
  template = scipy.ndimage.gaussian_filter(rng.normal(size=(S, S, S)), 4)
  template /= template.std()

  def scans(n: int) -> np.ndarray:
    v = scipy.ndimage.gaussian_filter(rng.normal(size=(n, S, S, S)), sigma=(0, 2, 2, 2))
    return ((0.7 * template + v / v.std()) * mask).astype(np.float32)

  train, val, holdout, fresh = scans(N_TRAIN), scans(N_VAL), scans(N_HOLDOUT), scans(200)
  src = rng.choice(N_TRAIN, 3 * N_EACH_COPY, replace=False)
  exact = train[src[:N_EACH_COPY]]
  noise_sd = 0.05 * train[:, mask].std()
  noisy = train[src[N_EACH_COPY:2 * N_EACH_COPY]] + noise_sd * rng.normal(size=(N_EACH_COPY, S, S, S))
  rolled = np.stack([np.roll(train[j], rng.choice([-1, 1]), axis=rng.integers(3))
                     for j in src[2 * N_EACH_COPY:]])
  copies = np.concatenate([exact, noisy, rolled]).astype(np.float32)
  proj = rng.normal(size=((S // 2) ** 3, 64))

  def embed(v: np.ndarray) -> np.ndarray:
    pooled = v.reshape(len(v), S // 2, 2, S // 2, 2, S // 2, 2).mean(axis=(2, 4, 6))
    return pooled.reshape(len(v), -1) @ proj

  return {"train": train, "val": val, "holdout": holdout, "fresh": fresh, "copies": copies,
          "src": src, "embed": embed}


# ---------------------------------------------------------------------------------------
# Definitions.


def test_pearson_similarity_equals_corrcoef():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(7, 16)), rng.normal(size=(5, 16)) * 3 + 2
  np.testing.assert_allclose(ps.pearson_similarity(a, b), np.corrcoef(a, b)[:7, 7:], atol=1e-12)
  np.testing.assert_allclose(ps.similarity_matrix(a, b, chunk_size=3), np.corrcoef(a, b)[:7, 7:],
                             atol=1e-12)
  b[0] = 4.0  # constant row: correlated with nothing
  assert np.all(ps.pearson_similarity(a, b)[:, 0] == 0.0)


def test_tiled_l2_definition():
  rng = np.random.default_rng(2)
  a = scipy.ndimage.gaussian_filter(rng.normal(size=(3, 8, 6, 5)), (0, 1, 1, 1))
  b = scipy.ndimage.gaussian_filter(rng.normal(size=(2, 8, 6, 5)), (0, 1, 1, 1))
  # One tile: the Euclidean distance of the standardised volumes, sqrt(2 - 2 r).
  r = np.corrcoef(a.reshape(3, -1), b.reshape(2, -1))[:3, 3:]
  np.testing.assert_allclose(ps.tiled_l2_distance(a, b, tiles=(1, 1, 1)), np.sqrt(2 - 2 * r), atol=1e-5)

  # Two tiles along x: per-tile RMS difference of z-normalised tiles, then max / mean.
  def z(t: np.ndarray) -> np.ndarray:
    return (t - t.mean()) / t.std()

  def rms(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((z(x) - z(y)) ** 2)))

  want = np.array([[[rms(x[:4], y[:4]), rms(x[4:], y[4:])] for y in b] for x in a])
  for agg, reduce in (("max", np.max), ("mean", np.mean)):
    np.testing.assert_allclose(ps.tiled_l2_distance(a, b, tiles=(2, 1, 1), aggregate=agg),
                               reduce(want, axis=-1), atol=1e-5)
  # Intensity offset and scale do not count; uneven tiles are allowed.
  assert ps.tiled_l2_distance(a[:1], 3 * a[:1] + 7, tiles=(3, 4, 2))[0, 0] < 1e-3
  # Channels last: every channel is its own tile.
  ac, bc = np.stack([a, 2 * a[::-1]], -1), np.stack([b, b[::-1]], -1)
  np.testing.assert_allclose(ps.tiled_l2_distance(ac, bc, tiles=(1, 1, 1)),
                             (ps.tiled_l2_distance(a, b, tiles=(1, 1, 1))
                              + ps.tiled_l2_distance(a[::-1], b[::-1], tiles=(1, 1, 1))) / 2, atol=1e-5)
  with pytest.raises(ValueError, match="tiles"):
    ps.tiled_l2_distance(a, b, tiles=(2, 2, 2, 2))


def test_nearest_neighbors_chunked_equals_full_matrix():
  rng = np.random.default_rng(3)
  q, ref = rng.normal(size=(11, 12)), rng.normal(size=(9, 12))
  full = np.corrcoef(q, ref)[:11, 11:]
  nn = ps.nearest_neighbors(q, ref, k=3, chunk_size=4)
  np.testing.assert_array_equal(nn.index, np.argsort(-full, axis=1)[:, :3])
  np.testing.assert_allclose(nn.similarity, -np.sort(-full, axis=1)[:, :3], atol=1e-12)
  np.testing.assert_allclose(nn.distance, np.sqrt(2 - 2 * nn.similarity))
  vq, vr = rng.normal(size=(5, 6, 6, 6)), rng.normal(size=(7, 6, 6, 6))
  nv = ps.nearest_neighbors(vq, vr, "tiled_l2", k=7, tiles=(2, 2, 2), chunk_size=2)
  np.testing.assert_allclose(nv.distance, np.sort(ps.tiled_l2_distance(vq, vr, tiles=(2, 2, 2)), axis=1),
                             atol=1e-5)


def test_nndr():
  nn = ps.Neighbors(index=np.array([[0, 1], [2, 0], [1, 2]]),
                    similarity=np.array([[1.0, 0.5], [0.5, 0.5], [1.0, 1.0]]))
  np.testing.assert_allclose(ps.nndr(nn), [0.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------
# Planted copies.


def test_planted_copies_flagged_in_embedding_space(cohort):
  e = cohort["embed"]
  n_hold, n_copies = N_HOLDOUT, len(cohort["copies"])
  synthetic = np.concatenate([e(cohort["holdout"]), e(cohort["copies"])])
  syn_ids = [f"syn-{i:03d}" for i in range(len(synthetic))]
  train_ids = [f"sub-{i:03d}" for i in range(N_TRAIN)]
  r = ps.detect_copies(synthetic, e(cohort["train"]), e(cohort["val"]), synthetic_ids=syn_ids,
                       train_ids=train_ids, top_k=5)
  flagged = {c["synthetic_index"]: c for c in r["copies"]}
  planted = [i for i in flagged if i >= n_hold]
  assert len(planted) >= 0.95 * n_copies
  for i in planted:  # each flagged copy points at its source, by index and by id
    assert flagged[i]["train_index"] == cohort["src"][i - n_hold]
    assert flagged[i]["train_id"] == train_ids[cohort["src"][i - n_hold]]
    assert flagged[i]["synthetic_id"] == syn_ids[i] and flagged[i]["score"] > r["tau"]
  genuine = len(flagged) - len(planted)
  assert _null_ok(genuine, n_hold, r["calibration"]), genuine
  assert r["n_copies"] == len(flagged) and r["copy_fraction"] == len(flagged) / len(synthetic)
  assert r["excess_copies_p_value"] < 1e-3
  assert {m["train_index"] for m in r["memorized"]} == {c["train_index"] for c in r["copies"]}
  assert sum(m["n_copies"] for m in r["memorized"]) == r["n_copies"]
  scores = [p["score"] for p in r["closest_pairs"]]
  assert len(scores) == 5 and scores == sorted(scores, reverse=True)
  assert r["closest_pairs"][0]["synthetic_index"] >= n_hold  # the exact copies come first
  # The per-subject check of the sampler agrees with the report.
  f = ps.flag_copies(synthetic, e(cohort["train"]), r["tau"])
  assert set(np.flatnonzero(f["is_copy"])) == set(flagged)


def test_planted_copies_flagged_in_voxel_space(cohort):
  n_hold = 150
  synthetic = np.concatenate([cohort["holdout"][:n_hold], cohort["copies"]])
  r = ps.detect_copies(synthetic, cohort["train"], cohort["val"], metric="tiled_l2", tiles=(2, 2, 2))
  planted = [c for c in r["copies"] if c["synthetic_index"] >= n_hold]
  assert len(planted) >= 0.95 * len(cohort["copies"])
  assert all(c["train_index"] == cohort["src"][c["synthetic_index"] - n_hold] for c in planted)
  assert _null_ok(r["n_copies"] - len(planted), n_hold, r["calibration"])


def test_genuine_scans_flagged_at_the_calibrated_rate():
  """Averaged over replicates the false-copy rate matches the calibrated null, for both
  directions at equal sizes and for validation_to_train at unequal sizes."""
  rng = np.random.default_rng(4)
  for n_train, n_val, direction in ((100, 100, "train_to_validation"), (100, 100, "validation_to_train"),
                                    (200, 60, "validation_to_train")):
    rates = []
    for _ in range(40):
      base = rng.normal(size=16)
      train, val, new = (base + rng.normal(size=(n, 16)) for n in (n_train, n_val, 100))
      cal = ps.calibrate_threshold(train, val, direction=direction)
      rates.append(np.mean(ps.flag_copies(new, train, cal["tau"])["is_copy"]))
    expected = ps.null_copy_count(100, cal["n_calibration"], 0.95).mean() / 100
    assert abs(np.mean(rates) - expected) < 0.015, (n_train, n_val, direction, np.mean(rates))
  with pytest.warns(RuntimeWarning, match="validation_to_train"):
    ps.calibrate_threshold(rng.normal(size=(200, 16)), rng.normal(size=(25, 16)))


def test_tau_is_the_conformal_quantile_of_best_matches():
  rng = np.random.default_rng(5)
  train, val = rng.normal(size=(200, 16)), rng.normal(size=(200, 16))
  best = np.sort(ps.nearest_neighbors(train, val).similarity[:, 0])
  cal = ps.calibrate_threshold(train, val, quantile=0.95)
  assert cal["tau"] == best[190] and cal["n_calibration"] == 200  # the ⌈201 · 0.95⌉ = 191st
  cal_v = ps.calibrate_threshold(train, val, quantile=0.9, direction="validation_to_train")
  assert cal_v["tau"] == np.sort(ps.nearest_neighbors(val, train).similarity[:, 0])[180]
  assert ps._calibration_rank(10, 0.95) == 10  # too few scans for a 5 % guarantee: the largest
  null = ps.null_copy_count(1, 200, 0.95)
  assert null.mean() == pytest.approx(10 / 201) and null.mean() <= 0.05


# ---------------------------------------------------------------------------------------
# Distance to closest record.


def test_dcr_share_half_for_new_scans_and_one_for_copies(cohort):
  e = cohort["embed"]
  train, holdout = e(cohort["train"]), e(cohort["holdout"][:N_TRAIN])
  healthy = ps.dcr_report(e(cohort["fresh"]), train, holdout)
  assert healthy["expected_share"] == 0.5
  assert 0.4 <= healthy["closer_to_train_share"] <= 0.6 and healthy["share_p_value"] > 0.01
  assert healthy["mann_whitney_p"] > 0.01 and abs(healthy["prob_synthetic_closer"] - 0.5) < 0.1
  assert abs(healthy["nndr_synthetic"]["median"] - healthy["nndr_holdout"]["median"]) < 0.05
  leaky = ps.dcr_report(e(cohort["copies"]), train, holdout)
  assert leaky["closer_to_train_share"] >= 0.95 and leaky["share_p_value"] == pytest.approx(1 / 2001)  # the floor
  assert leaky["mann_whitney_p"] < 1e-9 and leaky["prob_synthetic_closer"] > 0.9
  assert leaky["dcr_synthetic"]["median"] < leaky["dcr_holdout"]["p05"]
  assert leaky["nndr_synthetic"]["median"] < 0.5 < leaky["nndr_holdout"]["median"]
  # Unequal sizes: the healthy share is n_train / (n_train + n_holdout), not one half.
  uneven = ps.dcr_report(e(cohort["fresh"]), train, e(cohort["holdout"][:100]))
  assert uneven["expected_share"] == pytest.approx(0.75) and uneven["share_p_value"] > 0.01


def test_closer_to_train_permutation_test_holds_its_level_where_the_binomial_does_not():
  """Under a true null (train, holdout and synthetic scans all i.i.d.) the permutation test rejects
  at its 5 % level (± 2 %); the binomial test over synthetic scans, which treats scans that share
  nearest neighbours (hubs, in 64 dimensions) as independent, rejects far more often."""
  rng = np.random.default_rng(0)
  for n_t, n_h, n_s in ((96, 24, 100), (96, 24, 400)):
    perm, binom = [], []
    for r in range(800):
      x = rng.normal(size=(n_t + n_h + n_s, 64))
      real, syn = x[:n_t + n_h], x[n_t + n_h:]
      nearest = ((syn[:, None] - real[None]) ** 2).sum(-1).argmin(1)
      perm.append(ps.closer_to_train_p_value(nearest, n_t, n_h, n_perm=500, seed=r) < 0.05)
      closer = int((nearest < n_t).sum())
      binom.append(scipy.stats.binomtest(closer, n_s, n_t / (n_t + n_h), alternative="greater").pvalue < 0.05)
    assert 0.03 <= np.mean(perm) <= 0.07, (n_t, n_h, n_s, np.mean(perm))
    assert np.mean(binom) > 0.12, (n_t, n_h, n_s, np.mean(binom))


# ---------------------------------------------------------------------------------------
# Membership inference.


def test_mia_report_blind_and_separated():
  rng = np.random.default_rng(6)
  blind = ms.membership_inference_report(rng.normal(size=300), rng.normal(size=300), n_boot=300)
  assert blind["auc"]["ci_low"] < 0.5 < blind["auc"]["ci_high"]
  assert blind["tpr_at_fpr"]["0.01"]["tpr"] < 0.08 and blind["advantage"] < 0.15
  assert blind["tpr_at_fpr"]["0.01"]["resolvable"] and not blind["tpr_at_fpr"]["0.001"]["resolvable"]
  leaky = ms.membership_inference_report(rng.normal(size=300) + 4.0, rng.normal(size=300), n_boot=300)
  assert leaky["auc"]["auc"] > 0.99 and leaky["auc"]["ci_low"] > 0.98
  t = leaky["tpr_at_fpr"]["0.01"]
  assert t["tpr"] > 0.8 and t["ci_low"] <= t["tpr"] <= t["ci_high"]
  assert leaky["n_members"] == leaky["n_nonmembers"] == 300


def test_loss_and_pia_scores():
  losses = np.array([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
  np.testing.assert_allclose(ms.loss_attack_score(losses), [-2.0, -0.5])
  np.testing.assert_allclose(ms.loss_attack_score(losses, [0, 2]), [-2.0, -0.5])
  np.testing.assert_allclose(ms.loss_attack_score(losses, 1), [-2.0, -0.5])
  np.testing.assert_allclose(ms.loss_attack_score(losses[:, 0]), [-1.0, -0.5])
  rng = np.random.default_rng(7)
  e0 = rng.normal(size=(4, 2, 3, 3, 3))
  et = e0 + rng.normal(size=e0.shape)
  d = (et - e0).reshape(4, -1)
  np.testing.assert_allclose(ms.pia_attack_score(e0, et), -np.linalg.norm(d, axis=1))
  np.testing.assert_allclose(ms.pia_attack_score(e0, et, p=4), -np.sum(d ** 4, axis=1) ** 0.25)
  # Members' two predictions agree more closely: the score separates them.
  n = 200
  e0 = rng.normal(size=(2 * n, 4, 4, 4))
  et = e0 + np.r_[np.full(n, 0.5), np.full(n, 1.0)][:, None, None, None] * rng.normal(size=e0.shape)
  s = ms.pia_attack_score(e0, et)
  assert ms.membership_inference_report(s[:n], s[n:], n_boot=100)["auc"]["auc"] > 0.99


def test_mia_by_timestep():
  rng = np.random.default_rng(8)
  members, nonmembers = rng.gamma(2.0, size=(150, 3)), rng.gamma(2.0, size=(150, 3))
  members[:, 1] *= 0.4  # memorised at the middle timestep only
  rows = ms.mia_by_timestep(members, nonmembers, [10, 100, 500], n_boot=100)
  assert [r["timestep"] for r in rows] == [10, 100, 500]
  assert rows[1]["auc"] > 0.75 and rows[1]["ci_low"] > 0.6
  for r in (rows[0], rows[2]):  # AUC's SE is about 0.033 here
    assert abs(r["auc"] - 0.5) < 0.1 and r["ci_low"] < r["auc"] < r["ci_high"]
