"""Fidelity metrics for synthetic volumes: Fréchet distance, KID, 3D SSIM / MS-SSIM, PSNR, Dice, diversity.

Pure numpy/scipy on host arrays: the inputs are a few hundred feature vectors or a few
volumes at a time, so nothing here is worth a device round trip. Feature extraction
(which network produces the features FD and KID compare) is the caller's business; name
the result after the extractor (FD_<extractor>), since FD values from different
extractors are not comparable.

SSIM follows Wang et al. (2004): Gaussian window (σ = 1.5, 11 taps), K1 = 0.01,
K2 = 0.03, population (not sample) variances, averaged over the positions where the
window lies entirely inside the volume ("valid"; identical to scikit-image's
gaussian_weights=True result, which crops the same border). MS-SSIM follows Wang et al.
(2003) with its five weights, adapted to small volumes (see `ms_ssim`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.linalg
import scipy.ndimage

# Wang, Simoncelli & Bovik (2003), finest scale first.
MS_SSIM_WEIGHTS: tuple[float, ...] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# ---------------------------------------------------------------------------------------
# Fréchet distance and KID on feature sets.


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean (d,) and covariance (d, d) of an (n, d) feature set, in float64."""
  f = _features(features, "features")
  return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
  """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½): the Fréchet distance of two Gaussians.

  (S1 S2)^½ comes from scipy.linalg.sqrtm as in the reference FID code. Covariances from
  fewer samples than dimensions are singular, and sqrtm of their product can come back
  non-finite or with spurious imaginary parts; then both covariances get eps·I added
  (with a warning) and the real part of the root is used. Rounding can make FD of
  identical inputs a tiny negative number: the result is clipped at 0.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
    raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, "
                     f"sigma2 {s2.shape}")
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  if not _usable_root(covmean):
    warnings.warn(f"frechet_distance: sqrtm of the covariance product is ill-conditioned; "
                  f"adding {eps:g}·I to both covariances", RuntimeWarning, stacklevel=2)
    offset = eps * np.eye(d)
    covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if not np.all(np.isfinite(covmean)):
      raise ValueError("frechet_distance: matrix square root is not finite even with an offset")
  covmean = np.real(covmean)
  diff = mu1 - mu2
  fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
  return max(fd, 0.0)


def frechet_distance(features1: np.ndarray, features2: np.ndarray, eps: float = 1e-6) -> float:
  """Fréchet distance between two (n, d) feature sets (FID when the features are Inception's)."""
  mu1, s1 = feature_statistics(features1)
  mu2, s2 = feature_statistics(features2)
  return frechet_distance_from_statistics(mu1, s1, mu2, s2, eps=eps)


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray,
                              num_subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, coef0: float = 1.0, gamma: float | None = None,
                              seed: int = 0) -> tuple[float, float]:
  """KID (Bińkowski et al. 2018): unbiased MMD² with k(x, y) = (γ x·y + coef0)^degree, γ = 1/d.

  Averaged over `num_subsets` random subsets (without replacement within a subset) of
  `subset_size` from each set; returns (mean, std) over subsets. Unlike FD it is unbiased,
  so it stays meaningful for the small cohorts of medical imaging; subset_size is
  reduced to the smaller set's size when larger (then, with equal set sizes, every subset
  is the whole set and std = 0). The unbiased estimate can be slightly negative.
  """
  f1, f2 = _features(features1, "features1"), _features(features2, "features2")
  if f1.shape[1] != f2.shape[1]:
    raise ValueError(f"feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}")
  if num_subsets < 1 or subset_size < 2:
    raise ValueError(f"need num_subsets >= 1 and subset_size >= 2, got {num_subsets}, {subset_size}")
  m = min(subset_size, f1.shape[0], f2.shape[0])
  gamma = 1.0 / f1.shape[1] if gamma is None else gamma
  rng = np.random.default_rng(seed)

  def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (gamma * (a @ b.T) + coef0) ** degree

  mmds = np.empty(num_subsets)
  for i in range(num_subsets):
    x = f1[rng.choice(f1.shape[0], m, replace=False)]
    y = f2[rng.choice(f2.shape[0], m, replace=False)]
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    mmds[i] = within - 2.0 * kxy.mean()
  return float(mmds.mean()), float(mmds.std())


# ---------------------------------------------------------------------------------------
# Structural similarity.


def ssim(x: np.ndarray, y: np.ndarray, *, data_range: float, win_size: int = 11,
         sigma: float = 1.5, k1: float = SSIM_K1, k2: float = SSIM_K2) -> float:
  """Mean SSIM of two volumes (any number of spatial axes; 3D for MRI) over valid windows."""
  x, y = _pair(x, y)
  _check_window(x.shape, win_size)
  s, _ = _ssim_and_cs(x, y, data_range, _gaussian_window(win_size, sigma), k1, k2)
  return s


def ms_ssim_num_scales(shape: Sequence[int], win_size: int = 11,
                       max_scales: int = len(MS_SSIM_WEIGHTS)) -> int:
  """Scales usable on `shape`: each halving (floor) must still be at least one window wide."""
  sizes = np.asarray(shape, int)
  n = 0
  while n < max_scales and sizes.min() >= win_size:
    n += 1
    sizes = sizes // 2
  return n


def ms_ssim(x: np.ndarray, y: np.ndarray, *, data_range: float, win_size: int = 11,
            sigma: float = 1.5, weights: Sequence[float] = MS_SSIM_WEIGHTS,
            k1: float = SSIM_K1, k2: float = SSIM_K2) -> float:
  """Multi-scale SSIM, with the number of scales adapted to small volumes.

  Standard MS-SSIM needs 5 scales, i.e. a side of at least 11·2⁴ = 176 voxels; brain
  volumes at generative resolution (64³, 96³) have 3. So the window stays the same and
  the scales stop where the coarsest (2× average-pooled, odd remainders cropped) volume
  is still one window wide; the first (finest) weights are kept and renormalised to sum
  to 1. As in Wang et al.: contrast-structure at every scale but the coarsest, full SSIM
  at the coarsest, combined as Π cs_j^w_j · ssim_M^w_M. Negative terms are clipped to 0
  (as pytorch_msssim does) so the fractional powers stay real. With one usable scale
  this is plain SSIM.
  """
  x, y = _pair(x, y)
  n_scales = ms_ssim_num_scales(x.shape, win_size, len(weights))
  if n_scales == 0:
    raise ValueError(f"volume {x.shape} is smaller than the SSIM window ({win_size})")
  w = np.asarray(weights[:n_scales], np.float64)
  w = w / w.sum()
  window = _gaussian_window(win_size, sigma)
  terms = []
  for j in range(n_scales):
    s, cs = _ssim_and_cs(x, y, data_range, window, k1, k2)
    if j < n_scales - 1:
      terms.append(cs)
      x, y = _avg_pool2(x), _avg_pool2(y)
    else:
      terms.append(s)
  return float(np.prod(np.maximum(np.asarray(terms), 0.0) ** w))


def ms_ssim_diversity(volumes: Sequence[np.ndarray] | np.ndarray, *, data_range: float,
                      n_pairs: int = 100, seed: int = 0, **ms_ssim_kwargs) -> tuple[float, float]:
  """Mean and std of MS-SSIM over random distinct pairs within a set; lower = more diverse.

  Pairs are unordered and drawn without replacement (all pairs if n_pairs exceeds their
  number), seeded, so the same call on the real and on the synthetic cohort gives
  comparable numbers; use the same data_range for both.
  """
  n = len(volumes)
  if n < 2:
    raise ValueError(f"need at least 2 volumes, got {n}")
  if n_pairs < 1:
    raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
  ii, jj = np.triu_indices(n, k=1)
  rng = np.random.default_rng(seed)
  pick = rng.choice(len(ii), size=min(n_pairs, len(ii)), replace=False)
  scores = np.array([ms_ssim(volumes[ii[k]], volumes[jj[k]], data_range=data_range,
                             **ms_ssim_kwargs) for k in pick])
  return float(scores.mean()), float(scores.std())


# ---------------------------------------------------------------------------------------
# PSNR and Dice.


def psnr(x: np.ndarray, y: np.ndarray, *, data_range: float) -> float:
  """10 log10(data_range² / MSE) in dB; inf for identical inputs."""
  x, y = _pair(x, y)
  if not data_range > 0:
    raise ValueError(f"data_range must be > 0, got {data_range!r}")
  mse = float(np.mean((x - y) ** 2))
  return math.inf if mse == 0.0 else 10.0 * math.log10(data_range ** 2 / mse)


def dice_binary(pred: np.ndarray, target: np.ndarray, *, channel_axis: int | None = None,
                empty: float = 1.0) -> float | np.ndarray:
  """Dice 2|P∩T| / (|P| + |T|) of boolean masks (nonzero = foreground).

  With channel_axis, one score per channel: for overlapping multi-label masks such as
  BraTS's whole tumour / tumour core / enhancing tumour. Both masks empty scores `empty`
  (1.0: correctly predicting absence, the BraTS convention; pass nan to skip such cases).
  """
  p, t = np.asarray(pred) != 0, np.asarray(target) != 0
  if p.shape != t.shape:
    raise ValueError(f"shape mismatch: {p.shape} vs {t.shape}")
  if channel_axis is not None:
    p, t = np.moveaxis(p, channel_axis, 0), np.moveaxis(t, channel_axis, 0)
    return np.array([dice_binary(pc, tc, empty=empty) for pc, tc in zip(p, t)])
  denom = int(p.sum()) + int(t.sum())
  return float(empty) if denom == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denom


def lesion_detection(pred: np.ndarray, target: np.ndarray) -> dict[str, int]:
  """Lesion-wise detection of one volume: lesions are the 26-connected components of `target`; one
  is detected when any predicted voxel overlaps it, and a predicted component that overlaps no
  lesion is a false positive. Returns {"lesions", "detected", "false_positives"} (counts)."""
  p, t = np.asarray(pred) != 0, np.asarray(target) != 0
  if p.shape != t.shape:
    raise ValueError(f"shape mismatch: {p.shape} vs {t.shape}")
  full = np.ones((3,) * p.ndim, bool)
  t_lab, n_t = scipy.ndimage.label(t, structure=full)
  p_lab, n_p = scipy.ndimage.label(p, structure=full)
  detected = len(set(np.unique(t_lab[p & t]).tolist()) - {0})
  hit_pred = set(np.unique(p_lab[p & t]).tolist()) - {0}
  return {"lesions": int(n_t), "detected": int(detected), "false_positives": int(n_p - len(hit_pred))}


def dice(pred: np.ndarray, target: np.ndarray, labels: Sequence[int] | None = None,
         *, empty: float = 1.0) -> dict[int, float]:
  """Per-label Dice of two integer label maps (label 0 = background unless listed).

  `labels` defaults to every nonzero label present in either map, so a label the
  prediction invents or misses counts (as 0).
  """
  p, t = np.asarray(pred), np.asarray(target)
  if p.shape != t.shape:
    raise ValueError(f"shape mismatch: {p.shape} vs {t.shape}")
  if labels is None:
    labels = [int(v) for v in np.union1d(np.unique(p), np.unique(t)) if v != 0]
  return {int(k): dice_binary(p == k, t == k, empty=empty) for k in labels}


# ---------------------------------------------------------------------------------------
# Helpers.


def _features(features: np.ndarray, name: str) -> np.ndarray:
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"{name} must be (n >= 2, d), got shape {f.shape}")
  if not np.all(np.isfinite(f)):
    raise ValueError(f"{name} contains non-finite values")
  return f


def _usable_root(root: np.ndarray) -> bool:
  """Finite, and imaginary parts (from round-off on a singular product) are negligible."""
  if not np.all(np.isfinite(root)):
    return False
  if np.iscomplexobj(root):
    return bool(np.allclose(np.diagonal(root).imag, 0.0, atol=1e-3))
  return True


def _pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape:
    raise ValueError(f"shape mismatch: {x.shape} vs {y.shape}")
  return x, y


def _check_window(shape: tuple[int, ...], win_size: int) -> None:
  if win_size < 1 or win_size % 2 == 0:
    raise ValueError(f"win_size must be odd and positive, got {win_size}")
  if min(shape) < win_size:
    raise ValueError(f"volume {shape} is smaller than the SSIM window ({win_size})")


def _gaussian_window(win_size: int, sigma: float) -> np.ndarray:
  """Normalised 1D Gaussian taps; the N-D window is their outer product (separable)."""
  if win_size < 1 or win_size % 2 == 0:
    raise ValueError(f"win_size must be odd and positive, got {win_size}")
  r = np.arange(win_size, dtype=np.float64) - (win_size - 1) / 2
  g = np.exp(-0.5 * (r / sigma) ** 2)
  return g / g.sum()


def _filter_valid(a: np.ndarray, window: np.ndarray) -> np.ndarray:
  """Separable weighted mean over each window lying fully inside `a` ('valid' positions)."""
  half = (len(window) - 1) // 2
  for axis in range(a.ndim):
    a = scipy.ndimage.correlate1d(a, window, axis=axis, mode="constant")
    a = np.take(a, np.arange(half, a.shape[axis] - half), axis=axis)
  return a


def _ssim_and_cs(x: np.ndarray, y: np.ndarray, data_range: float, window: np.ndarray,
                 k1: float, k2: float) -> tuple[float, float]:
  """Mean SSIM and mean contrast-structure term over valid windows."""
  if not data_range > 0:
    raise ValueError(f"data_range must be > 0, got {data_range!r}")
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  mx, my = _filter_valid(x, window), _filter_valid(y, window)
  vx = _filter_valid(x * x, window) - mx * mx
  vy = _filter_valid(y * y, window) - my * my
  cxy = _filter_valid(x * y, window) - mx * my
  cs_map = (2.0 * cxy + c2) / (vx + vy + c2)
  ssim_map = (2.0 * mx * my + c1) / (mx * mx + my * my + c1) * cs_map
  return float(ssim_map.mean()), float(cs_map.mean())


def _avg_pool2(a: np.ndarray) -> np.ndarray:
  """2× average pooling along every axis; an odd last row/column/slice is dropped."""
  a = a[tuple(slice(0, (s // 2) * 2) for s in a.shape)]
  shape = []
  for s in a.shape:
    shape += [s // 2, 2]
  return a.reshape(shape).mean(axis=tuple(range(1, 2 * a.ndim, 2)))
