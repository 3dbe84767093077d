"""Empirical privacy of a synthetic cohort: copy detection and distance to closest record
(membership-inference scoring: evaluation/membership_stats.py).

Pure numpy/scipy over arrays the caller supplies: embeddings (n, d) from the project's
encoder, or volumes (n, X, Y, Z[, C]) for the voxel-space measure. Which encoder or model made them is the caller's business.

Similarity and distance. Both measures are correlations of standardised vectors, so one
relation converts them everywhere: distance = sqrt(2 − 2 · similarity), which is the
Euclidean distance between the standardised vectors (a metric, in [0, 2]).
- "pearson": Pearson correlation of embedding rows (each row centred and scaled to unit
  norm, then a matrix product).
- "tiled_l2": the volume is cut into a grid of tiles (`tiles` per spatial axis, uneven
  remainders allowed; each channel of channels-last input is its own tile); every tile is
  z-normalised, so intensity offset and scale do not count; the per-tile distance is the
  RMS difference of the z-normalised tiles, i.e. sqrt(2 − 2 r_tile). `aggregate="mean"`
  (default) averages the tile distances; "max" takes the worst tile, as Carlini et al.
  (2023) did for memorised 2D images (a near-copy must match everywhere). On 3D head
  volumes "max" is fragile: tiles at the edge of the head hold few foreground voxels,
  their z-normalised content is mostly noise, and in tests a copy with 5 % noise or a
  1-voxel shift could fail on such a tile alone. Use "max" with large tiles only. The
  similarity is 1 − d²/2 (with one tile: Pearson r of the whole volumes). A constant tile
  (zero background) normalises to zeros: two constant tiles are at distance 0, a constant
  and a textured one at 1. Raw scans with a noisy background should be skull-stripped and
  zeroed first. Passing 2×-average-pooled volumes makes the measure faster and more
  tolerant of 1-voxel shifts.
Higher similarity always means more alike; all thresholds (τ) are on similarity.

Copies (Dar et al. 2024): τ is calibrated on real data only, as the `quantile` (0.95) of
each training scan's best similarity among validation scans (direction=
"train_to_validation", Dar's definition and the default); a synthetic scan whose best
similarity to the training set exceeds τ is a copy of its nearest training scan. The
percentile is the finite-sample (split-conformal) one, the ⌈(m + 1) q⌉-th smallest of the
m best-match scores. A genuine new scan is then flagged with probability about 1 − quantile
when the validation set is as large as the training set, and not otherwise (the best of
more candidates is higher: 26 % flagged in a simulation with 200 training and 25
validation scans; `calibrate_threshold` warns). With direction="validation_to_train" —
each validation scan's best match among the training scans — the calibration scores are in
exactly the synthetic scans' situation (same reference set): given the training set, they
and the best-match scores of genuinely new synthetic scans are i.i.d., so the number of
genuine scans flagged follows a beta-binomial law at any set sizes (`null_copy_count`);
prefer it when the two sets differ much in size. Either way that count varies more than a
binomial one, because τ is itself an estimate from a finite calibration set.

Distance to closest record (DCR): synthetic → train beside holdout → train. If the
generator produces new subjects, a synthetic scan's nearest real scan in train ∪ holdout is
in train with probability n_train / (n_train + n_holdout) (½ for equal sizes); memorisation
pushes that share up. The share is tested one-sided by permuting which real scans are "train"
(`closer_to_train_p_value`): the synthetic scans share their reference sets, so their nearest
neighbours are not independent draws and a binomial test over synthetic scans rejects a true
null far more than its level (11 % at 5 % with 96 train / 24 holdout / 100 synthetic). The two DCR
distributions are compared with a one-sided Mann-Whitney test. NNDR is nearest /
second-nearest distance to the training set: near 0, a scan sits on one training subject.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.stats


METRICS = ("pearson", "tiled_l2")
DEFAULT_TILES = (4, 4, 4)


# ---------------------------------------------------------------------------------------
# Similarity.


def standardize_rows(x: np.ndarray) -> np.ndarray:
  """Rows centred and scaled to unit L2 norm (float64), so u_i · u_j is Pearson's r.

  A constant row has no correlation with anything; it becomes zeros.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[1] < 2:
    raise ValueError(f"expected (n, d >= 2) rows, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("input contains non-finite values")
  c = x - x.mean(axis=1, keepdims=True)
  norm = np.linalg.norm(c, axis=1, keepdims=True)
  return np.divide(c, norm, out=np.zeros_like(c), where=norm > 0)


def pearson_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(n_a, n_b) Pearson correlations between the rows of a and of b."""
  return standardize_rows(a) @ standardize_rows(b).T


def tiled_l2_distance(a: np.ndarray, b: np.ndarray, tiles: Sequence[int] = DEFAULT_TILES,
                      aggregate: str = "mean") -> np.ndarray:
  """(n_a, n_b) tiled normalised L2 distances between two sets of volumes (module doc)."""
  return distance_from_similarity(similarity_matrix(a, b, "tiled_l2", tiles=tiles, aggregate=aggregate))


def distance_from_similarity(similarity: np.ndarray) -> np.ndarray:
  """sqrt(2 − 2 s): Euclidean distance of the standardised vectors (both metrics)."""
  return np.sqrt(np.maximum(2.0 - 2.0 * np.asarray(similarity, np.float64), 0.0))


def similarity_matrix(a: np.ndarray, b: np.ndarray, metric: str = "pearson", *,
                      tiles: Sequence[int] = DEFAULT_TILES, aggregate: str = "mean",
                      chunk_size: int = 256) -> np.ndarray:
  """Full (n_a, n_b) similarity; for large sets prefer `nearest_neighbors`, which keeps top-k."""
  ra, rb = _prepare(a, metric, tiles), _prepare(b, metric, tiles)
  _check_compatible(ra, rb, metric)
  n_a = _n(ra, metric)
  return np.concatenate([_similarity_block(_rows(ra, metric, i, min(i + chunk_size, n_a)), rb, metric,
                                           aggregate) for i in range(0, n_a, chunk_size)], axis=0)


@dataclasses.dataclass(frozen=True)
class Neighbors:
  """The k most similar reference items of each query item, most similar first."""

  index: np.ndarray       # (n_query, k) int indices into the reference set
  similarity: np.ndarray  # (n_query, k)

  @property
  def distance(self) -> np.ndarray:
    return distance_from_similarity(self.similarity)


def nearest_neighbors(query: np.ndarray, reference: np.ndarray, metric: str = "pearson", k: int = 1,
                      *, tiles: Sequence[int] = DEFAULT_TILES, aggregate: str = "mean",
                      chunk_size: int = 256) -> Neighbors:
  """Top-k most similar reference items per query item, computed `chunk_size` queries at a
  time so the full (n_query, n_reference) matrix never exists."""
  rq, rr = _prepare(query, metric, tiles), _prepare(reference, metric, tiles)
  _check_compatible(rq, rr, metric)
  n_q, n_r = _n(rq, metric), _n(rr, metric)
  if not 1 <= k <= n_r:
    raise ValueError(f"k must be in [1, {n_r}] (reference size), got {k}")
  index = np.empty((n_q, k), np.int64)
  sim = np.empty((n_q, k), np.float64)
  for i in range(0, n_q, chunk_size):
    j = min(i + chunk_size, n_q)
    block = _similarity_block(_rows(rq, metric, i, j), rr, metric, aggregate)
    top = np.argpartition(-block, k - 1, axis=1)[:, :k] if k < n_r else np.tile(np.arange(n_r), (j - i, 1))
    top_sim = np.take_along_axis(block, top, axis=1)
    order = np.lexsort((top, -top_sim), axis=1)  # most similar first, ties by lower index
    index[i:j] = np.take_along_axis(top, order, axis=1)
    sim[i:j] = np.take_along_axis(top_sim, order, axis=1)
  return Neighbors(index=index, similarity=sim)


# ---------------------------------------------------------------------------------------
# Copies.


def calibrate_threshold(train: np.ndarray, validation: np.ndarray, metric: str = "pearson",
                        quantile: float = 0.95, direction: str = "train_to_validation",
                        **metric_kwargs: Any) -> dict[str, Any]:
  """τ from real data only: the `quantile` of best-match similarities between train and
  validation (module doc for the two directions).

  Returns {"tau", "quantile", "direction", "metric", "n_train", "n_validation",
  "n_calibration" (scores the quantile was taken over), "best_match_median"}.
  """
  if not 0.0 < quantile < 1.0:
    raise ValueError(f"quantile must be in (0, 1), got {quantile!r}")
  if direction == "train_to_validation":
    nn = nearest_neighbors(train, validation, metric, 1, **metric_kwargs)
  elif direction == "validation_to_train":
    nn = nearest_neighbors(validation, train, metric, 1, **metric_kwargs)
  else:
    raise ValueError(f"direction must be 'train_to_validation' or 'validation_to_train', got {direction!r}")
  n_t, n_v = len(train), len(validation)
  if direction == "train_to_validation" and max(n_t, n_v) > 1.25 * min(n_t, n_v):
    warnings.warn(f"calibrate_threshold: train_to_validation with n_train={n_t} and "
                  f"n_validation={n_v}: genuine scans will not be flagged at 1 - quantile; "
                  f"direction='validation_to_train' is calibrated at any sizes",
                  RuntimeWarning, stacklevel=2)
  best = np.sort(nn.similarity[:, 0])
  r = _calibration_rank(len(best), quantile)
  return {"tau": float(best[r - 1]), "quantile": float(quantile), "direction": direction,
          "metric": metric, "n_train": int(len(train)), "n_validation": int(len(validation)),
          "n_calibration": int(len(best)), "best_match_median": float(np.median(best))}


def null_copy_count(n_synthetic: int, n_calibration: int, quantile: float) -> Any:
  """Law of the number of genuinely new scans (out of n_synthetic) above τ, a frozen
  scipy.stats.betabinom.

  τ is the r-th smallest of m calibration scores (`_calibration_rank`); a new score
  exchangeable with them exceeds it with probability ~ Beta(m + 1 − r, r), independently
  for each new scan given that probability. Exact for direction="validation_to_train",
  approximate for Dar's direction with equal set sizes.
  """
  if n_calibration < 1 or not 0.0 < quantile < 1.0:
    raise ValueError(f"need n_calibration >= 1 and quantile in (0, 1), got {n_calibration}, {quantile}")
  r = _calibration_rank(n_calibration, quantile)
  return scipy.stats.betabinom(int(n_synthetic), n_calibration + 1 - r, r)


def _calibration_rank(m: int, quantile: float) -> int:
  """Rank r = ⌈(m + 1) q⌉ (at most m) of τ among m sorted calibration scores.

  The split-conformal quantile: a new exchangeable score exceeds the r-th smallest with
  probability (m + 1 − r) / (m + 1) ≤ 1 − q, so the calibrated rate is a finite-sample
  bound rather than an asymptotic one (np.quantile's interpolated 95th percentile flags
  up to 11 % with 25 calibration scans). Below m = q / (1 − q) (19 for q = 0.95) even the
  largest score cannot guarantee it; τ is then the largest.
  """
  return int(min(max(math.ceil((m + 1) * quantile - 1e-9), 1), m))


def flag_copies(candidates: np.ndarray, train: np.ndarray, tau: float, metric: str = "pearson",
                **metric_kwargs: Any) -> dict[str, np.ndarray]:
  """Per candidate: {"is_copy" (best similarity > τ), "train_index", "score"}.

  For checking generated subjects as they are made (sample.reject_copies).
  """
  nn = nearest_neighbors(candidates, train, metric, 1, **metric_kwargs)
  score = nn.similarity[:, 0]
  return {"is_copy": score > tau, "train_index": nn.index[:, 0], "score": score}


def copy_report(neighbors: Neighbors, calibration: dict[str, Any] | float,
                synthetic_ids: Sequence[Any] | None = None, train_ids: Sequence[Any] | None = None,
                top_k: int = 10) -> dict[str, Any]:
  """Copies, memorised training scans and the closest pairs, from synthetic → train neighbours.

  `calibration` is `calibrate_threshold`'s dict (or a bare τ). A copy is a synthetic scan
  whose best similarity exceeds τ; a memorised training scan is the nearest match of at
  least one copy. Genuine new scans are flagged at about 1 − q too, so
  `excess_copies_p_value` (one-sided, P(count ≥ n_copies) under `null_copy_count`, or a
  binomial test at 1 − q when the calibration size is unknown) says whether there are
  more copies than calibration alone explains; `expected_false_copy_fraction` is that
  null's mean rate. IDs default to indices.

  Returns {"tau", "quantile", "n_synthetic", "n_copies", "copy_fraction",
  "expected_false_copy_fraction", "excess_copies_p_value", "copies", "n_memorized",
  "memorized", "closest_pairs"}; a copy / pair is {"synthetic_index", "synthetic_id",
  "train_index", "train_id", "score"}, most similar first; a memorised scan is
  {"train_index", "train_id", "n_copies", "max_score"}.
  """
  cal = calibration if isinstance(calibration, dict) else {"tau": float(calibration)}
  tau, q = float(cal["tau"]), cal.get("quantile")
  best, idx = neighbors.similarity[:, 0], neighbors.index[:, 0]
  n = len(best)
  syn_id = _ids(synthetic_ids, n, "synthetic_ids")
  train_id = _ids(train_ids, None, "train_ids")

  def pair(i: int) -> dict[str, Any]:
    j = int(idx[i])
    return {"synthetic_index": int(i), "synthetic_id": syn_id[i], "train_index": j,
            "train_id": j if train_id is None else train_id[j], "score": float(best[i])}

  by_score = np.argsort(-best, kind="stable")
  flagged = [int(i) for i in by_score if best[i] > tau]
  memorized: dict[int, dict[str, Any]] = {}
  for i in flagged:
    j = int(idx[i])
    entry = memorized.setdefault(j, {"train_index": j, "train_id": j if train_id is None else train_id[j],
                                     "n_copies": 0, "max_score": float(best[i])})
    entry["n_copies"] += 1
  expected, p_excess = None, None
  if q is not None and n > 0:
    m = cal.get("n_calibration")
    if m:
      null = null_copy_count(n, int(m), float(q))
      expected = float(null.mean()) / n
      p_excess = float(null.sf(len(flagged) - 1))
    else:
      expected = 1.0 - float(q)
      p_excess = float(scipy.stats.binomtest(len(flagged), n, expected, alternative="greater").pvalue)
  return {"tau": tau, "quantile": None if q is None else float(q), "n_synthetic": int(n),
          "n_copies": len(flagged), "copy_fraction": len(flagged) / n if n else math.nan,
          "expected_false_copy_fraction": expected, "excess_copies_p_value": p_excess,
          "copies": [pair(i) for i in flagged], "n_memorized": len(memorized),
          "memorized": sorted(memorized.values(), key=lambda e: -e["max_score"]),
          "closest_pairs": [pair(int(i)) for i in by_score[:top_k]]}


def detect_copies(synthetic: np.ndarray, train: np.ndarray, validation: np.ndarray,
                  metric: str = "pearson", quantile: float = 0.95,
                  direction: str = "train_to_validation", synthetic_ids: Sequence[Any] | None = None,
                  train_ids: Sequence[Any] | None = None, top_k: int = 10,
                  **metric_kwargs: Any) -> dict[str, Any]:
  """`calibrate_threshold` + synthetic → train neighbours + `copy_report`, with the
  calibration under "calibration" and the metric under "metric"."""
  cal = calibrate_threshold(train, validation, metric, quantile, direction, **metric_kwargs)
  nn = nearest_neighbors(synthetic, train, metric, 1, **metric_kwargs)
  report = copy_report(nn, cal, synthetic_ids, train_ids, top_k)
  return {"metric": metric, **report, "calibration": cal}


# ---------------------------------------------------------------------------------------
# Distance to closest record.


def nndr(neighbors: Neighbors) -> np.ndarray:
  """Nearest / second-nearest distance ratio per query (needs k ≥ 2); 1 where both are 0."""
  if neighbors.index.shape[1] < 2:
    raise ValueError("NNDR needs neighbours computed with k >= 2")
  d = neighbors.distance
  return np.divide(d[:, 0], d[:, 1], out=np.ones(len(d)), where=d[:, 1] > 0)


def closer_to_train_p_value(nearest_real: np.ndarray, n_train: int, n_holdout: int, n_perm: int = 2000,
                            seed: int = 0) -> float:
  """One-sided permutation p-value of the closer-to-train count.

  nearest_real: each synthetic scan's nearest scan in train ∪ holdout, as an index into that
  pooled set (train first). Under the null (the generator's output does not depend on which real
  scans it trained on) the train / holdout labels are exchangeable over the pooled set while the
  nearest neighbours stay fixed, so relabelling n_train of the pooled scans as train at random
  gives the count's null law, including the dependence of synthetic scans that share a neighbour.
  """
  n = int(n_train) + int(n_holdout)
  counts = np.bincount(np.asarray(nearest_real, np.int64), minlength=n).astype(np.int64)
  observed = counts[:n_train].sum()
  rng = np.random.default_rng(seed)
  perms = rng.permuted(np.tile(np.arange(n), (int(n_perm), 1)), axis=1)[:, :n_train]
  null = counts[perms].sum(axis=1)
  return float((1 + np.sum(null >= observed)) / (1 + int(n_perm)))


def dcr_report(synthetic: np.ndarray, train: np.ndarray, holdout: np.ndarray,
               metric: str = "pearson", n_perm: int = 2000, seed: int = 0, **metric_kwargs: Any) -> dict[str, Any]:
  """DCR and NNDR of synthetic → train beside holdout → train, and the closer-to-train share.

  Ties (a synthetic scan exactly as far from both sets) count as closer to train, the
  cautious side. Returns {"metric", "n_synthetic", "n_train", "n_holdout",
  "dcr_synthetic", "dcr_holdout", "nndr_synthetic", "nndr_holdout" (each {"mean",
  "median", "p05"}), "closer_to_train_share", "n_closer_to_train", "n_ties",
  "expected_share", "share_p_value" (permutation of the train / holdout labels, one-sided greater:
  closer_to_train_p_value),
  "mann_whitney_u", "mann_whitney_p" (one-sided: synthetic DCR smaller),
  "prob_synthetic_closer" (U / (n_s · n_h): P(DCR_syn < DCR_holdout), ½ is healthy)}.
  """
  syn_train = nearest_neighbors(synthetic, train, metric, 2, **metric_kwargs)
  syn_hold = nearest_neighbors(synthetic, holdout, metric, 1, **metric_kwargs)
  hold_train = nearest_neighbors(holdout, train, metric, 2, **metric_kwargs)
  d_syn, d_hold = syn_train.distance[:, 0], hold_train.distance[:, 0]
  d_syn_to_hold = syn_hold.distance[:, 0]
  n_s, n_t, n_h = len(d_syn), len(train), len(holdout)
  ties = int(np.sum(d_syn == d_syn_to_hold))
  is_train = d_syn <= d_syn_to_hold
  closer = int(np.sum(is_train))
  nearest_real = np.where(is_train, syn_train.index[:, 0], n_t + syn_hold.index[:, 0])
  expected = n_t / (n_t + n_h)
  mw = scipy.stats.mannwhitneyu(d_syn, d_hold, alternative="less", method="asymptotic")
  return {"metric": metric, "n_synthetic": n_s, "n_train": int(n_t), "n_holdout": int(n_h),
          "dcr_synthetic": _describe(d_syn), "dcr_holdout": _describe(d_hold),
          "nndr_synthetic": _describe(nndr(syn_train)), "nndr_holdout": _describe(nndr(hold_train)),
          "closer_to_train_share": closer / n_s, "n_closer_to_train": closer, "n_ties": ties,
          "expected_share": expected,
          "share_p_value": closer_to_train_p_value(nearest_real, n_t, n_h, n_perm, seed),
          "share_test": f"permutation of the train / holdout labels ({n_perm} draws)",
          "mann_whitney_u": float(mw.statistic), "mann_whitney_p": float(mw.pvalue),
          "prob_synthetic_closer": 1.0 - float(mw.statistic) / (n_s * len(d_hold))}


# ---------------------------------------------------------------------------------------
# Helpers.


def _prepare(x: np.ndarray, metric: str, tiles: Sequence[int]) -> np.ndarray | list[np.ndarray]:
  """Standardised rows (pearson) or a list of standardised (n, voxels) tiles (tiled_l2)."""
  if metric == "pearson":
    return standardize_rows(x)
  if metric != "tiled_l2":
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
  v = np.asarray(x)
  tiles = tuple(int(t) for t in tiles)
  if v.ndim == len(tiles) + 2:  # channels last: each channel is its own tile
    tiles = tiles + (v.shape[-1],)
  if v.ndim != len(tiles) + 1:
    raise ValueError(f"volumes {v.shape} do not match tiles {tiles}: expected (n, *spatial[, C])")
  if any(t < 1 or t > s for t, s in zip(tiles, v.shape[1:])):
    raise ValueError(f"tiles {tiles} must be in [1, size] per axis of {v.shape[1:]}")
  splits = [np.array_split(np.arange(s), t) for s, t in zip(v.shape[1:], tiles)]
  out = []
  for parts in itertools.product(*splits):
    block = v[(slice(None),) + tuple(slice(p[0], p[-1] + 1) for p in parts)]
    out.append(standardize_rows(block.reshape(len(v), -1)).astype(np.float32))
  return out


def _n(r: np.ndarray | list[np.ndarray], metric: str) -> int:
  return len(r) if metric == "pearson" else len(r[0])


def _rows(r: np.ndarray | list[np.ndarray], metric: str, i: int, j: int) -> np.ndarray | list[np.ndarray]:
  return r[i:j] if metric == "pearson" else [t[i:j] for t in r]


def _check_compatible(ra: np.ndarray | list[np.ndarray], rb: np.ndarray | list[np.ndarray],
                      metric: str) -> None:
  da = ra.shape[1] if metric == "pearson" else [t.shape[1] for t in ra]
  db = rb.shape[1] if metric == "pearson" else [t.shape[1] for t in rb]
  if da != db:
    raise ValueError(f"the two sets have different shapes (metric {metric})")


def _similarity_block(q: np.ndarray | list[np.ndarray], r: np.ndarray | list[np.ndarray], metric: str,
                      aggregate: str) -> np.ndarray:
  """Similarities (n_q, n_r) of a query chunk against the whole reference set."""
  if metric == "pearson":
    return q @ r.T
  if aggregate not in ("max", "mean"):
    raise ValueError(f"aggregate must be 'max' or 'mean', got {aggregate!r}")
  acc = None
  for tq, tr in zip(q, r):
    nq = np.sum(tq * tq, axis=1, dtype=np.float64)  # 1, or 0 for a constant tile
    nr = np.sum(tr * tr, axis=1, dtype=np.float64)
    d = np.sqrt(np.maximum(nq[:, None] + nr[None, :] - 2.0 * (tq @ tr.T).astype(np.float64), 0.0))
    if acc is None:
      acc = d
    elif aggregate == "max":
      np.maximum(acc, d, out=acc)
    else:
      acc += d
  if aggregate == "mean":
    acc /= len(q)
  return 1.0 - 0.5 * acc ** 2


def _ids(ids: Sequence[Any] | None, n: int | None, name: str) -> list[Any] | None:
  if ids is None:
    return list(range(n)) if n is not None else None
  ids = [i.item() if isinstance(i, np.generic) else i for i in ids]
  if n is not None and len(ids) != n:
    raise ValueError(f"{name} has {len(ids)} entries for {n} items")
  return ids


def _describe(x: np.ndarray) -> dict[str, float]:
  return {"mean": float(np.mean(x)), "median": float(np.median(x)), "p05": float(np.quantile(x, 0.05))}

