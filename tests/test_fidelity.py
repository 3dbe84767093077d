"""Fidelity metrics against closed forms and slow, explicit reference implementations."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest

from synthmri_jax.evaluation import fidelity as F


def exact_gaussian_fd(mu1, s1, mu2, s2) -> float:
  """Closed form via the symmetric route: Tr((S1 S2)^½) = Σ sqrt(eig(S1^½ S2 S1^½))."""
  w, v = np.linalg.eigh(s1)
  r1 = v @ np.diag(np.sqrt(w)) @ v.T
  tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def random_spd(rng, d: int) -> np.ndarray:
  a = rng.standard_normal((d, d))
  return a @ a.T / d + 0.5 * np.eye(d)


# --- Fréchet distance ------------------------------------------------------------------


def test_fd_of_samples_matches_gaussian_closed_form():
  rng = np.random.default_rng(0)
  d = 4
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  s1, s2 = random_spd(rng, d), random_spd(rng, d)
  x = rng.multivariate_normal(mu1, s1, size=100_000)
  y = rng.multivariate_normal(mu2, s2, size=100_000)
  exact = exact_gaussian_fd(mu1, s1, mu2, s2)
  assert exact > 0.5
  assert F.frechet_distance(x, y) == pytest.approx(exact, rel=0.03)
  # The statistics route with the exact parameters is the closed form itself.
  assert F.frechet_distance_from_statistics(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-9)


def test_fd_identical_sets_is_zero_and_symmetric():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((500, 16))
  y = rng.standard_normal((400, 16)) + 0.3
  assert F.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
  assert F.frechet_distance(x, y) == pytest.approx(F.frechet_distance(y, x), rel=1e-8)


def test_fd_from_statistics_diagonal_closed_form():
  mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
  a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert F.frechet_distance_from_statistics(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(
      expected, abs=1e-12)


def test_fd_singular_covariances_few_samples():
  """Fewer samples than dimensions (small cohorts): finite, non-negative, no exception."""
  rng = np.random.default_rng(2)
  x, y = rng.standard_normal((20, 64)), rng.standard_normal((20, 64)) + 1.0
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the eps·I fallback may warn here; that is its job
    fd, fd_near = F.frechet_distance(x, y), F.frechet_distance(x, x + 1e-3)
  assert math.isfinite(fd) and fd > fd_near >= 0.0


# --- KID -------------------------------------------------------------------------------


def test_kid_equals_explicit_unbiased_mmd():
  rng = np.random.default_rng(3)
  x, y = rng.standard_normal((30, 5)), rng.standard_normal((30, 5)) + 0.2
  k = lambda a, b: (a @ b / 5 + 1.0) ** 3
  m = 30
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
  mean, std = F.kernel_inception_distance(x, y, num_subsets=3, subset_size=100)
  assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
  assert std == pytest.approx(0.0, abs=1e-12)  # every subset is the whole (permuted) set


def test_kid_same_distribution_near_zero_shifted_positive():
  rng = np.random.default_rng(4)
  x, y = rng.standard_normal((600, 8)), rng.standard_normal((600, 8))
  same, same_std = F.kernel_inception_distance(x, y, num_subsets=20, subset_size=200)
  shifted, shifted_std = F.kernel_inception_distance(x, y + 0.5, num_subsets=20, subset_size=200)
  assert abs(same) < 0.01 and same_std > 0
  assert shifted > 0.05 and shifted > 10 * abs(same)


# --- SSIM / MS-SSIM --------------------------------------------------------------------


def slow_ssim_cs(x: np.ndarray, y: np.ndarray, data_range: float, win: int = 11,
                 sigma: float = 1.5) -> tuple[float, float]:
  """Wang et al. SSIM and cs by explicit weighted statistics at every valid window position."""
  r = np.arange(win) - (win - 1) / 2
  g = np.exp(-r ** 2 / (2 * sigma ** 2))
  g /= g.sum()
  w = g
  for _ in range(x.ndim - 1):
    w = np.multiply.outer(w, g)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  ss, css = [], []
  for pos in itertools.product(*[range(s - win + 1) for s in x.shape]):
    sl = tuple(slice(p, p + win) for p in pos)
    a, b = x[sl], y[sl]
    ma, mb = (w * a).sum(), (w * b).sum()
    va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
    cab = (w * (a - ma) * (b - mb)).sum()
    cs = (2 * cab + c2) / (va + vb + c2)
    ss.append((2 * ma * mb + c1) / (ma ** 2 + mb ** 2 + c1) * cs)
    css.append(cs)
  return float(np.mean(ss)), float(np.mean(css))


def slow_pool(a: np.ndarray) -> np.ndarray:
  out = np.zeros([s // 2 for s in a.shape])
  for idx in itertools.product(*[range(s) for s in out.shape]):
    out[idx] = a[tuple(slice(2 * i, 2 * i + 2) for i in idx)].mean()
  return out


def correlated_pair(shape, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  x = rng.random(shape)
  return x, np.clip(x + noise * rng.standard_normal(shape), 0, 1)


def test_ssim_and_ms_ssim_of_volume_with_itself_is_one():
  x, _ = correlated_pair((40, 36, 44), 0.1, 5)
  assert F.ssim(x, x, data_range=1.0) == pytest.approx(1.0, abs=1e-12)
  assert F.ms_ssim(x, x, data_range=1.0) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("shape,win", [((14, 15, 13), 11), ((15, 14, 13), 7), ((20, 17), 11)])
def test_ssim_matches_slow_reference(shape, win):
  x, y = correlated_pair(shape, 0.2, 6)
  s_ref, _ = slow_ssim_cs(x, y, 1.0, win)
  assert F.ssim(x, y, data_range=1.0, win_size=win) == pytest.approx(s_ref, rel=1e-10)
  # Independent random volumes (SSIM near 0, some windows negative) and another data range.
  rng = np.random.default_rng(7)
  a, b = 255 * rng.random(shape), 255 * rng.random(shape)
  s_ref, _ = slow_ssim_cs(a, b, 255.0, win)
  assert F.ssim(a, b, data_range=255.0, win_size=win) == pytest.approx(s_ref, rel=1e-9, abs=1e-12)


def test_ssim_matches_skimage_if_installed():
  metrics = pytest.importorskip("skimage.metrics")
  x, y = correlated_pair((24, 20, 22), 0.2, 8)
  ref = metrics.structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
  assert F.ssim(x, y, data_range=1.0) == pytest.approx(ref, rel=1e-7)


def test_ms_ssim_matches_slow_reference():
  x, y = correlated_pair((24, 26, 28), 0.2, 9)
  win = 7
  assert F.ms_ssim_num_scales(x.shape, win) == 2  # 24 -> 12 -> 6 < 7
  _, cs0 = slow_ssim_cs(x, y, 1.0, win)
  s1, _ = slow_ssim_cs(slow_pool(x), slow_pool(y), 1.0, win)
  w0, w1 = np.array(F.MS_SSIM_WEIGHTS[:2]) / sum(F.MS_SSIM_WEIGHTS[:2])
  expected = cs0 ** w0 * s1 ** w1
  assert F.ms_ssim(x, y, data_range=1.0, win_size=win) == pytest.approx(expected, rel=1e-10)


def test_ms_ssim_scales_and_degenerate_single_scale():
  assert F.ms_ssim_num_scales((64, 64, 64)) == 3
  assert F.ms_ssim_num_scales((64, 64, 32)) == 2
  assert F.ms_ssim_num_scales((176, 176, 176)) == 5
  assert F.ms_ssim_num_scales((400, 400, 400)) == 5
  assert F.ms_ssim_num_scales((10, 64, 64)) == 0
  x, y = correlated_pair((16, 18, 20), 0.2, 10)  # one scale: MS-SSIM is SSIM
  assert F.ms_ssim(x, y, data_range=1.0) == pytest.approx(F.ssim(x, y, data_range=1.0), rel=1e-12)
  with pytest.raises(ValueError, match="smaller than the SSIM window"):
    F.ms_ssim(x[:8], y[:8], data_range=1.0)
  with pytest.raises(ValueError, match="shape mismatch"):
    F.ssim(x, y[:-1], data_range=1.0)


def test_ms_ssim_decreases_with_noise():
  rng = np.random.default_rng(11)
  x = np.clip(scipy_smooth(rng.random((48, 48, 48))), 0, 1)
  scores = [F.ms_ssim(x, np.clip(x + s * rng.standard_normal(x.shape), 0, 1), data_range=1.0)
            for s in (0.01, 0.05, 0.2)]
  assert 1.0 > scores[0] > scores[1] > scores[2]


def scipy_smooth(a: np.ndarray) -> np.ndarray:
  from scipy.ndimage import gaussian_filter
  a = gaussian_filter(a, 2.0)
  return (a - a.min()) / (a.max() - a.min())


def test_ms_ssim_diversity():
  rng = np.random.default_rng(12)
  base = scipy_smooth(rng.random((24, 24, 24)))
  near_copies = [np.clip(base + 0.02 * rng.standard_normal(base.shape), 0, 1) for _ in range(5)]
  diverse = [scipy_smooth(rng.random((24, 24, 24))) for _ in range(5)]
  m_copies, _ = F.ms_ssim_diversity(near_copies, data_range=1.0, n_pairs=6, seed=0)
  m_diverse, s_diverse = F.ms_ssim_diversity(diverse, data_range=1.0, n_pairs=6, seed=0)
  assert m_copies > 0.9 and m_diverse < m_copies and s_diverse > 0
  assert F.ms_ssim_diversity(diverse, data_range=1.0, n_pairs=6, seed=0) == (m_diverse, s_diverse)
  # More pairs than exist: all 10 pairs, the same whatever the seed.
  assert F.ms_ssim_diversity(np.stack(diverse), data_range=1.0, n_pairs=50, seed=1) == pytest.approx(
      F.ms_ssim_diversity(diverse, data_range=1.0, n_pairs=10, seed=2))
  same, same_std = F.ms_ssim_diversity([base] * 3, data_range=1.0)
  assert same == pytest.approx(1.0) and same_std == pytest.approx(0.0, abs=1e-12)


# --- PSNR and Dice ---------------------------------------------------------------------


def test_psnr_closed_form():
  x = np.zeros((8, 8, 8))
  y = x.copy()
  y[:4] = 0.2  # half the voxels off by 0.2: MSE = 0.02
  assert F.psnr(x, y, data_range=1.0) == pytest.approx(10 * math.log10(1 / 0.02), rel=1e-12)
  assert F.psnr(x, y * 255, data_range=255.0) == pytest.approx(10 * math.log10(1 / 0.02), rel=1e-12)
  assert F.psnr(x, x, data_range=1.0) == math.inf


def test_lesion_detection_counts_components():
  target = np.zeros((12, 12, 12), bool)
  target[1:3, 1:3, 1:3] = True          # lesion A
  target[8:11, 8:11, 8:11] = True       # lesion B
  target[5, 5, 5] = True                # lesion C (one voxel)
  pred = np.zeros_like(target)
  pred[2, 2, 2] = True                  # touches A
  pred[3, 3, 3] = True                  # diagonal neighbour of the A hit: same component (26-connected)
  pred[6:8, 0:2, 10:12] = True          # overlaps nothing: one false positive
  assert F.lesion_detection(pred, target) == {"lesions": 3, "detected": 1, "false_positives": 1}
  assert F.lesion_detection(target, target) == {"lesions": 3, "detected": 3, "false_positives": 0}
  assert F.lesion_detection(np.zeros_like(target), target) == {"lesions": 3, "detected": 0, "false_positives": 0}
  assert F.lesion_detection(pred, np.zeros_like(target)) == {"lesions": 0, "detected": 0, "false_positives": 2}


def test_dice_binary_and_multilabel():
  pred = np.zeros((4, 4, 4), bool)
  target = np.zeros((4, 4, 4), bool)
  pred[0, 0, :4] = True        # 4 voxels
  target[0, 0, 1:4] = True     # 3 overlap
  target[1, 0, :3] = True      # 6 voxels in all
  assert F.dice_binary(pred, target) == pytest.approx(2 * 3 / (4 + 6))
  assert F.dice_binary(pred, pred) == 1.0
  assert F.dice_binary(np.zeros(5), np.zeros(5)) == 1.0
  assert math.isnan(F.dice_binary(np.zeros(5), np.zeros(5), empty=math.nan))
  assert F.dice_binary(pred, ~pred) == 0.0

  per_channel = F.dice_binary(np.stack([pred, pred, pred], -1),
                              np.stack([target, pred, np.zeros_like(pred)], -1), channel_axis=-1)
  np.testing.assert_allclose(per_channel, [0.6, 1.0, 0.0])

  p = np.array([[0, 1, 1, 2], [2, 2, 0, 3]])
  t = np.array([[0, 1, 2, 2], [2, 0, 0, 0]])
  # label 1: |P|=2 |T|=1 overlap 1; label 2: |P|=3 |T|=3 overlap 2; label 3: only predicted.
  assert F.dice(p, t) == pytest.approx({1: 2 / 3, 2: 4 / 6, 3: 0.0})
  assert F.dice(p, t, labels=[2, 4]) == pytest.approx({2: 4 / 6, 4: 1.0})
