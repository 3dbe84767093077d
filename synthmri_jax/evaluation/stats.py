"""Statistics of the TSTR / TRTR study: ROC-AUC with confidence intervals, paired ΔAUC, seeds.

Pure numpy/scipy/scikit-learn on host arrays of labels and scores; which classifier made
the scores is the caller's business.

Point estimates come from scikit-learn (`roc_auc_score`, `roc_curve`). Intervals come from
a class-stratified bootstrap run by `scipy.stats.bootstrap`: every class is resampled with
replacement on its own, so each resample keeps the test set's class counts. That choice
(over DeLong) serves three needs at once: it covers multi-class macro AUC and TPR at a
fixed FPR as well as binary AUC, it pairs naturally for ΔAUC (both arms are scored on the
same resampled subjects), and no resample can lose a class, so no resample is degenerate.
The interval is BCa by default (better than percentile when AUC is near 1, where its
sampling distribution is skewed); when BCa is undefined — e.g. perfect separation, where
every resample has AUC 1 and the jackknife has no spread — the percentile interval of the
same resamples is reported and `method` says so.

Inside the bootstrap, AUC is computed from the Mann-Whitney U statistic
(`scipy.stats.mannwhitneyu`, vectorised over thousands of resamples at once):
AUC = U / (n_pos · n_neg), ties counting one half, which is exactly `roc_auc_score`
(tests check it on resamples). Looping `roc_auc_score` over 2,000 resamples costs seconds
per arm; this costs milliseconds. Multi-class AUC is one-vs-rest macro, as scikit-learn's
`multi_class="ovr", average="macro"`: the unweighted mean over classes of the binary AUC
of column k for class k against the rest. For TPR at a fixed FPR the resamples use the
closed form of scikit-learn's ROC operating point (see `_tpr_at_fpr_sorted`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.stats
from sklearn.metrics import roc_auc_score, roc_curve

# Bound the (resamples × subjects) working arrays of one bootstrap batch (elements).
_BATCH_ELEMENTS = 4_000_000


# ---------------------------------------------------------------------------------------
# Point estimates (scikit-learn).


def auc(y_true: np.ndarray, scores: np.ndarray) -> float:
  """ROC-AUC by scikit-learn: binary (scores (n,), or (n, 2) probabilities → column 1) or
  one-vs-rest macro for K > 2 classes (scores (n, K) probabilities, columns in the order
  of the sorted labels)."""
  y, s, classes = _auc_inputs(y_true, scores)
  return _sklearn_auc(y, s, classes)


def roc_curve_points(y_true: np.ndarray, scores: np.ndarray,
                     drop_intermediate: bool = True) -> dict[str, np.ndarray]:
  """Binary ROC curve from scikit-learn: {"fpr", "tpr", "thresholds"} (thresholds[0] is inf).

  For one class of a multi-class problem pass (y == k, scores[:, k]).
  """
  y, s, classes = _auc_inputs(y_true, scores)
  if len(classes) != 2:
    raise ValueError(f"roc_curve_points is binary; got {len(classes)} classes "
                     f"(pass (y == k, scores[:, k]) for one class)")
  fpr, tpr, thresholds = roc_curve(y, s, pos_label=classes[1], drop_intermediate=drop_intermediate)
  return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds}


def tpr_at_fpr(y_true: np.ndarray, scores: np.ndarray, fpr: float = 0.01) -> float:
  """Highest TPR among the ROC operating points whose FPR is at most `fpr` (binary).

  The membership-inference convention (Carlini et al. 2022). With n negatives the FPR
  moves in steps of 1/n: below that the answer is the TPR at FPR = 0, a lower bound.
  """
  if not 0.0 <= fpr <= 1.0:
    raise ValueError(f"fpr must be in [0, 1], got {fpr!r}")
  curve = roc_curve_points(y_true, scores, drop_intermediate=False)
  return float(curve["tpr"][curve["fpr"] <= fpr].max())


# ---------------------------------------------------------------------------------------
# Bootstrap intervals.


def auc_with_ci(y_true: np.ndarray, scores: np.ndarray, n_boot: int = 2000, seed: int = 0,
                alpha: float = 0.05, method: str = "bca", subjects: Sequence[Any] | None = None) -> dict[str, Any]:
  """ROC-AUC with a (1 − alpha) class-stratified bootstrap interval.

  `subjects` (one id per scan) makes the subject the bootstrap's unit: a resample draws subjects
  and takes all their scans (see _subject_units). Without it, or when every subject has one scan,
  scans are resampled (the same interval, bit for bit; `unit` still says subjects).

  Returns {"auc", "ci_low", "ci_high", "se" (bootstrap SD), "alpha", "n_boot", "method"
  (the interval actually used), "n", "n_per_class" {label: count}, "n_classes", "unit"
  ("scans" | "subjects"), "n_units"}: plain Python numbers, ready for JSON. Needs at least 2
  subjects of every class.
  """
  y, s, classes = _auc_inputs(y_true, scores)
  groups, statistic, unit = _auc_resampling(y, classes, subjects, [s])
  point = _sklearn_auc(y, s, classes)
  boot = _bootstrap(groups, lambda *idx: statistic(*idx)[0], n_boot, seed, alpha, method)
  return {"auc": point, "ci_low": boot["ci_low"], "ci_high": boot["ci_high"], "se": boot["se"],
          "alpha": float(alpha), "n_boot": int(n_boot), "method": boot["method"], "n": int(len(y)),
          "n_per_class": {str(c): int((y == c).sum()) for c in classes},
          "n_classes": int(len(classes)), "unit": unit, "n_units": int(sum(len(g) for g in groups))}


def paired_delta_auc(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray,
                     n_boot: int = 2000, seed: int = 0, alpha: float = 0.05,
                     method: str = "bca", subjects: Sequence[Any] | None = None) -> dict[str, Any]:
  """AUC_a − AUC_b of two models scored on the same test subjects, with a paired interval.

  Both AUCs are recomputed on each class-stratified resample of subjects, so the interval
  reflects the correlation between the arms (they share the test set), which unpaired
  intervals ignore. The two-sided p-value is pROC's bootstrap test (Robin et al. 2011):
  z = Δ / SD(Δ*), p = 2 Φ(−|z|); when every resample gives the same Δ (identical scores)
  p is 1 for Δ = 0 and 0 otherwise. For TSTR − TRTR pass scores_a = TSTR, scores_b = TRTR.

  `subjects`: as in auc_with_ci (resample subjects, not scans).

  Returns {"delta", "auc_a", "auc_b", "ci_low", "ci_high", "se", "p_value", "alpha",
  "n_boot", "method", "n", "unit"}.
  """
  y, sa, classes = _auc_inputs(y_true, scores_a)
  _, sb, _ = _auc_inputs(y_true, scores_b)
  if sa.shape != sb.shape:
    raise ValueError(f"scores_a {sa.shape} and scores_b {sb.shape} differ in shape")
  groups, statistic, unit = _auc_resampling(y, classes, subjects, [sa, sb])
  auc_a, auc_b = _sklearn_auc(y, sa, classes), _sklearn_auc(y, sb, classes)
  delta = auc_a - auc_b

  def diff(*idx):
    a, b = statistic(*idx)
    return a - b

  boot = _bootstrap(groups, diff, n_boot, seed, alpha, method)
  se = boot["se"]
  if se > 0:
    p = float(2.0 * scipy.stats.norm.sf(abs(delta) / se))
  else:
    p = 1.0 if abs(delta) < 1e-12 else 0.0
  return {"delta": delta, "auc_a": auc_a, "auc_b": auc_b, "ci_low": boot["ci_low"],
          "ci_high": boot["ci_high"], "se": se, "p_value": p, "alpha": float(alpha),
          "n_boot": int(n_boot), "method": boot["method"], "n": int(len(y)), "unit": unit}


def tpr_at_fpr_with_ci(y_true: np.ndarray, scores: np.ndarray, fpr: float = 0.01,
                       n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
  """TPR at FPR ≤ `fpr` with a class-stratified percentile bootstrap interval (binary).

  Percentile, not BCa: at 1 % or 0.1 % FPR the statistic is a step function of one or two
  extreme negatives, for which BCa's jackknife acceleration is meaningless. `resolvable` is
  False when 1/n_negatives > fpr (the value is then the TPR at FPR = 0).

  Returns {"tpr", "fpr", "ci_low", "ci_high", "se", "alpha", "n_boot", "method",
  "n_pos", "n_neg", "resolvable"}.
  """
  y, s, classes = _auc_inputs(y_true, scores)
  if len(classes) != 2:
    raise ValueError(f"tpr_at_fpr_with_ci is binary; got {len(classes)} classes")
  groups = _class_groups(y, classes)
  point = tpr_at_fpr(y, s, fpr)

  def statistic(neg_idx: np.ndarray, pos_idx: np.ndarray) -> np.ndarray:
    return _tpr_at_fpr_sorted(s[pos_idx], np.sort(s[neg_idx], axis=-1), fpr)

  boot = _bootstrap(groups, statistic, n_boot, seed, alpha, "percentile")
  n_neg = len(groups[0])
  return {"tpr": point, "fpr": float(fpr), "ci_low": boot["ci_low"], "ci_high": boot["ci_high"],
          "se": boot["se"], "alpha": float(alpha), "n_boot": int(n_boot), "method": boot["method"],
          "n_pos": int(len(groups[1])), "n_neg": int(n_neg), "resolvable": bool(fpr * n_neg >= 1.0)}


# ---------------------------------------------------------------------------------------
# Across seeds.


def summarize_seeds(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
  """Mean ± SD over training seeds: {"mean", "sd" (ddof = 1; nan for one seed), "n", "min",
  "max", "values"}.

  Seed-to-seed SD is the spread of the training procedure, not of the test set; report it
  beside (not instead of) the bootstrap interval of each arm.
  """
  v = np.asarray(values, np.float64).ravel()
  if v.size == 0:
    raise ValueError("summarize_seeds needs at least one value")
  if not np.all(np.isfinite(v)):
    raise ValueError(f"non-finite value among {v.tolist()}")
  sd = float(np.std(v, ddof=1)) if v.size > 1 else math.nan
  return {"mean": float(v.mean()), "sd": sd, "n": int(v.size), "min": float(v.min()),
          "max": float(v.max()), "values": v.tolist()}


def format_mean_sd(summary: dict[str, Any], digits: int = 3) -> str:
  """'0.812 ± 0.021 (n=3)' from `summarize_seeds`; the SD is omitted for one seed."""
  mean = f"{summary['mean']:.{digits}f}"
  if summary["n"] < 2:
    return f"{mean} (n=1)"
  return f"{mean} ± {summary['sd']:.{digits}f} (n={summary['n']})"


# ---------------------------------------------------------------------------------------
# Helpers.


def bootstrap_mean(values: np.ndarray, n_boot: int, alpha: float, method: str, seed: int = 0,
                   subjects: Sequence[Any] | None = None) -> dict[str, Any]:
  """Mean of per-subject values with a scipy bootstrap interval (percentile where BCa is undefined).

  `subjects` (one id per value, e.g. per scan): each subject's values are averaged first, so a
  subject with several sessions is one draw; with one value per subject the numbers are unchanged.
  """
  v = np.asarray(values, np.float64)
  if subjects is not None:
    codes, n = _first_appearance_codes(subjects)
    if len(codes) != len(v):
      raise ValueError(f"{len(v)} values but {len(codes)} subject ids")
    v = np.bincount(codes, weights=v, minlength=n) / np.bincount(codes, minlength=n) if len(v) else v
  if v.size == 0:
    return {"mean": None, "ci_low": None, "ci_high": None, "n": 0, "alpha": float(alpha), "method": "no subjects"}
  out = {"mean": float(v.mean()), "n": int(v.size), "alpha": float(alpha),
         "unit": "subjects" if subjects is not None else "values"}
  if v.size < 2 or np.all(v == v[0]):
    return dict(out, ci_low=out["mean"], ci_high=out["mean"], se=0.0, method="degenerate (constant or n < 2)")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    res = scipy.stats.bootstrap((v,), np.mean, n_resamples=n_boot, confidence_level=1 - alpha, method=method,
                                rng=np.random.default_rng(seed))
    used = method
    if not np.all(np.isfinite([res.confidence_interval.low, res.confidence_interval.high])):
      res = scipy.stats.bootstrap((v,), np.mean, n_resamples=n_boot, confidence_level=1 - alpha,
                                  method="percentile", rng=np.random.default_rng(seed))
      used = "percentile"
  return dict(out, ci_low=float(res.confidence_interval.low), ci_high=float(res.confidence_interval.high),
              se=float(res.standard_error), method=used)


def two_sample_bootstrap(a: np.ndarray, b: np.ndarray, fn: Callable[[np.ndarray, np.ndarray], float],
                          n_boot: int, alpha: float, seed: int = 0, floor: float | None = None) -> dict[str, Any]:
  """Bias-shifted percentile interval of fn(a, b), resampling the rows of each set independently
  (scipy.stats.bootstrap's distribution). A resample repeats subjects, which inflates distances
  such as FD: on 16 vs 24 real scans the plain percentile interval lay entirely above the
  estimate (and the basic interval entirely below it). Shifting the bootstrap distribution by
  its bias (mean - estimate) keeps its spread and centres it on the estimate. `floor`: the
  statistic's lower bound (0 for FD), applied to the interval."""
  ia, ib = np.arange(len(a)), np.arange(len(b))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    res = scipy.stats.bootstrap((ia, ib), lambda i, j: fn(a[i], b[j]), n_resamples=n_boot, vectorized=False,
                                paired=False, confidence_level=1 - alpha, method="percentile",
                                rng=np.random.default_rng(seed))
  dist = np.asarray(res.bootstrap_distribution, np.float64)
  dist = dist[np.isfinite(dist)]
  bias = float(dist.mean() - fn(a, b))
  lo, hi = (float(q) - bias for q in np.quantile(dist, [alpha / 2, 1 - alpha / 2]))
  if floor is not None:
    lo, hi = max(lo, floor), max(hi, floor)
  return {"ci_low": lo, "ci_high": hi, "se": float(dist.std(ddof=1)), "bootstrap_bias": bias, "n_boot": int(n_boot),
          "alpha": float(alpha), "method": "bias-shifted percentile bootstrap (subjects of each set resampled)"
                                           + ("" if floor is None else f", floored at {floor:g}")}


def _auc_inputs(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Validated (labels (n,), scores (n,) for binary or (n, K), sorted classes)."""
  y = np.asarray(y_true).ravel()
  s = np.asarray(scores, np.float64)
  classes = np.unique(y)
  k = len(classes)
  if k < 2:
    raise ValueError(f"AUC needs at least two classes in y_true, got {classes.tolist()}")
  if s.shape[0] != len(y):
    raise ValueError(f"{len(y)} labels but scores have shape {s.shape}")
  if k == 2:
    if s.ndim == 2 and s.shape[1] in (1, 2):
      s = s[:, -1]
    if s.ndim != 1:
      raise ValueError(f"binary scores must be (n,) or (n, 2), got {s.shape}")
  elif s.ndim != 2 or s.shape[1] != k:
    raise ValueError(f"{k} classes need scores of shape (n, {k}) (columns in sorted label "
                     f"order {classes.tolist()}), got {s.shape}")
  if not np.all(np.isfinite(s)):
    raise ValueError("scores contain non-finite values")
  return y, s, classes


def _sklearn_auc(y: np.ndarray, s: np.ndarray, classes: np.ndarray) -> float:
  if len(classes) == 2:
    return float(roc_auc_score(y == classes[1], s))
  return float(roc_auc_score(y, s, multi_class="ovr", average="macro", labels=classes))


def _class_groups(y: np.ndarray, classes: np.ndarray) -> list[np.ndarray]:
  """Subject indices of each class: the independent samples of the stratified bootstrap."""
  groups = [np.flatnonzero(y == c) for c in classes]
  small = {str(c): len(g) for c, g in zip(classes, groups) if len(g) < 2}
  if small:
    raise ValueError(f"a bootstrap interval needs at least 2 subjects per class, got {small}")
  return groups


def _broadcast(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Broadcast leading (resample) axes, keeping each array's own last axis."""
  lead = np.broadcast_shapes(*(a.shape[:-1] for a in arrays))
  return [np.broadcast_to(a, lead + a.shape[-1:]) for a in arrays]


def _mw_auc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
  """AUC along the last axis as U / (n_pos · n_neg) (ties count one half)."""
  pos, neg = _broadcast([pos, neg])
  u = scipy.stats.mannwhitneyu(pos, neg, axis=-1, method="asymptotic", use_continuity=False).statistic
  return u / (pos.shape[-1] * neg.shape[-1])


def _auc_of_groups(s: np.ndarray, idx: Sequence[np.ndarray]) -> np.ndarray:
  """Binary or one-vs-rest macro AUC of resampled class groups idx[k] (..., n_k)."""
  idx = _broadcast([np.asarray(i) for i in idx])
  if s.ndim == 1:
    return _mw_auc(s[idx[1]], s[idx[0]])
  per_class = []
  for k in range(len(idx)):
    rest = np.concatenate([idx[j] for j in range(len(idx)) if j != k], axis=-1)
    per_class.append(_mw_auc(s[idx[k], k], s[rest, k]))
  return np.mean(per_class, axis=0)


def _first_appearance_codes(subjects: Sequence[Any]) -> tuple[np.ndarray, int]:
  """(a code per entry, number of distinct ids), codes numbered in order of first appearance, so that
  one entry per subject keeps the entries' order (and a bootstrap's draws) unchanged."""
  ids = np.asarray([str(v) for v in np.asarray(subjects, dtype=object).ravel()])
  names, first, inv = np.unique(ids, return_index=True, return_inverse=True)
  rank = np.empty(len(names), np.int64)
  rank[np.argsort(first)] = np.arange(len(names))
  return rank[inv], len(names)


def _subject_units(y: np.ndarray, classes: np.ndarray, subjects: Sequence[Any]) -> tuple[np.ndarray, list[int]]:
  """(each scan's subject index within its class (n,), subjects per class) for a subject bootstrap.

  Sessions of one subject are not independent: resampling scans treats a subject with four
  sessions as four draws, so the interval is too narrow. Resampling subjects (all their scans at
  once, stratified by class) is the cluster bootstrap. A subject's scans must share a label.
  """
  ids = np.asarray([str(v) for v in np.asarray(subjects, dtype=object).ravel()])
  if len(ids) != len(y):
    raise ValueError(f"{len(y)} labels but {len(ids)} subject ids")
  unit, sizes, owner = np.empty(len(y), np.int64), [], {}
  for c in classes:
    m = y == c
    unit[m], n_k = _first_appearance_codes(ids[m])
    sizes.append(n_k)
    for n in np.unique(ids[m]):
      if n in owner:
        raise ValueError(f"subject {n!r} has scans labelled {owner[n]!r} and {c!r}: a subject bootstrap "
                         "needs one label per subject")
      owner[n] = c
  return unit, sizes


def _auc_resampling(y: np.ndarray, classes: np.ndarray, subjects: Sequence[Any] | None,
                    scores: Sequence[np.ndarray]) -> tuple[list[np.ndarray], Callable[..., list[np.ndarray]], str]:
  """(per-class units for _bootstrap, statistic(*idx) -> [AUC of each scores array], unit name).

  With several scans per subject the units are subjects, and a resample's AUC is the weighted
  Mann-Whitney AUC: each scan weighs as often as its subject was drawn, so every (positive,
  negative) scan pair counts w_i w_j times. With one scan per subject this is the plain AUC of
  the resampled scans, so that case keeps the scan path (identical numbers).
  """
  if subjects is not None:
    unit, sizes = _subject_units(y, classes, subjects)
    if sum(sizes) < len(y):
      small = {str(c): n for c, n in zip(classes, sizes) if n < 2}
      if small:
        raise ValueError(f"a bootstrap interval needs at least 2 subjects per class, got {small}")
      pairs = []   # per score array, per class k: (pos mask, H_k: pos x neg comparisons)
      for sc in scores:
        per = []
        for k, c in enumerate(classes if sc.ndim == 2 else classes[1:]):
          col = sc[:, k] if sc.ndim == 2 else sc
          pos = y == c
          d = col[pos][:, None] - col[~pos][None, :]
          per.append((pos, (d > 0) + 0.5 * (d == 0)))
        pairs.append(per)

      def statistic(*idx: np.ndarray) -> list[np.ndarray]:
        idx = _broadcast([np.asarray(i) for i in idx])
        lead = idx[0].shape[:-1]
        flat = [i.reshape(-1, i.shape[-1]) for i in idx]
        b = flat[0].shape[0]
        w = np.empty((b, len(y)))
        for k, (c, n) in enumerate(zip(classes, sizes)):
          counts = np.zeros((b, n))
          np.add.at(counts, (np.arange(b)[:, None], flat[k]), 1.0)
          w[:, y == c] = counts[:, unit[y == c]]
        out = []
        for per in pairs:
          aucs = [np.einsum("bi,ij,bj->b", w[:, pos], h, w[:, ~pos]) / (w[:, pos].sum(1) * w[:, ~pos].sum(1))
                  for pos, h in per]
          out.append(np.mean(aucs, axis=0).reshape(lead))
        return out

      return [np.arange(n) for n in sizes], statistic, "subjects"
  return (_class_groups(y, classes), lambda *idx: [_auc_of_groups(sc, idx) for sc in scores],
          "scans" if subjects is None else "subjects")


def _tpr_at_fpr_sorted(pos: np.ndarray, neg_sorted: np.ndarray, fpr: float) -> np.ndarray:
  """`tpr_at_fpr` along the last axis, negatives sorted ascending.

  A threshold keeps FPR ≤ fpr iff at most m = ⌊fpr · n_neg⌋ negatives reach it, i.e. iff it
  exceeds v, the (m+1)-th largest negative; the best such threshold keeps every positive
  above v. So TPR = mean(pos > v), and 1 when m = n_neg.
  """
  pos, neg_sorted = _broadcast([pos, neg_sorted])
  n_neg = neg_sorted.shape[-1]
  m = int(math.floor(fpr * n_neg + 1e-9))
  if m >= n_neg:
    return np.ones(pos.shape[:-1])
  v = neg_sorted[..., n_neg - 1 - m]
  return np.mean(pos > v[..., None], axis=-1)


def _bootstrap(groups: Sequence[np.ndarray], statistic: Callable[..., np.ndarray], n_boot: int,
               seed: int, alpha: float, method: str) -> dict[str, Any]:
  """scipy.stats.bootstrap over per-class index arrays (independent samples = stratified)."""
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
  if n_boot < 1:
    raise ValueError(f"n_boot must be >= 1, got {n_boot}")
  method = method.lower()
  n = sum(len(g) for g in groups)
  batch = max(1, _BATCH_ELEMENTS // n)

  def stat(*idx: np.ndarray, axis: int = -1) -> np.ndarray:
    return statistic(*idx)

  kwargs = dict(confidence_level=1.0 - alpha, vectorized=True, paired=False, batch=batch)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.stats.DegenerateDataWarning)
    warnings.simplefilter("ignore", RuntimeWarning)
    res = scipy.stats.bootstrap(tuple(groups), stat, n_resamples=n_boot, method=method,
                                rng=np.random.default_rng(seed), **kwargs)
    used = method
    ci = res.confidence_interval
    if not (np.isfinite(ci.low) and np.isfinite(ci.high)) and method != "percentile":
      res = scipy.stats.bootstrap(tuple(groups), stat, n_resamples=0, method="percentile",
                                  bootstrap_result=res, rng=np.random.default_rng(seed), **kwargs)
      ci, used = res.confidence_interval, f"percentile ({method} undefined)"
  return {"ci_low": float(ci.low), "ci_high": float(ci.high),
          "se": float(res.standard_error), "method": used}
