"""Clinically readable fidelity: the anatomy a disease changes, measured per scan and compared by label.

FD / KID say how far apart two feature clouds are. A radiologist or reviewer first asks something
simpler: does the synthetic AD group have enlarged ventricles and darker hippocampi, as the real
one does, and by about as much? This module answers that with numbers and intervals:

  measure_volumes    per-scan ROI measures (data.rois.measure_rois): lateral-ventricle CSF
                     volume (mL) and hippocampal grey-matter intensity (relative to deep white matter)
  group_effect       the difference of group means (e.g. AD - CN) with a bootstrap interval that
                     resamples subjects within each label
  paired_effect      the same scans measured twice (e.g. real scans and their tokenizer round trip):
                     both effects and their ratio on the same resampled subjects
  by_label           real vs synthetic, per measure: each group's mean and the label effect in each

The ROI atlas is placed by moments of the brain foreground (see measure_rois), so the measures apply
to prepared arrays, decoded latents and generated samples alike. They are exact for the embedded
cohort (its ventricles and hippocampi are where the atlas says) and approximate for a user's
skull-stripped, roughly MNI-oriented cohort. Units: millilitres; intensity relative to deep white
matter (unitless). The bootstrap unit is the subject: a subject's scans are averaged first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from synthmri_jax.data.rois import measure_rois

MEASURES = ("ventricle_ml", "hippocampus_intensity")
UNITS = {"ventricle_ml": "mL", "hippocampus_intensity": "relative to white matter"}
SEQUENCE = "T1w"   # the measures read T1 contrast: dark CSF, grey matter darker than white


def measured_channel(channels: Sequence[str]) -> int | None:
  """Index of the T1w channel among a cohort's sequences (None: the ROI measures do not apply).

  In T2w CSF is bright, so the ventricle measure would count the wrong voxels; a cohort listed
  FLAIR-first must still be measured on its T1w.
  """
  channels = list(channels)
  return channels.index(SEQUENCE) if SEQUENCE in channels else None


def measure_volumes(volumes: Iterable[np.ndarray], affine: np.ndarray, channel: int = 0) -> dict[str, np.ndarray]:
  """ROI measures of each volume ((X, Y, Z) or (X, Y, Z, C): channel `channel` is measured).

  Returns {measure: (n,) float64}. A volume whose foreground is empty gets NaN.
  """
  out: dict[str, list[float]] = {m: [] for m in MEASURES}
  for v in volumes:
    v = np.asarray(v, np.float32)
    if v.ndim == 4:
      v = v[..., channel]
    try:
      r = measure_rois(v, affine)
    except ValueError:
      r = {m: float("nan") for m in MEASURES}
    for m in MEASURES:
      out[m].append(float(r[m]))
  return {m: np.asarray(v, np.float64) for m, v in out.items()}


def _per_subject(values: np.ndarray, labels: np.ndarray, subjects: Sequence[str] | None):
  """(values, labels) with one row per subject (its scans averaged, subjects in order of first
  appearance); NaN rows dropped."""
  values = np.asarray(values, np.float64)
  labels = np.asarray(labels)
  if values.shape != labels.shape:
    raise ValueError(f"{values.shape[0]} values but {labels.shape[0]} labels")
  if subjects is not None:
    frame = pd.DataFrame({"s": np.asarray(subjects), "v": values, "y": labels})
    groups = frame.groupby("s", sort=False)
    if (groups["y"].nunique() > 1).any():
      raise ValueError("a subject has scans with different labels")
    values, labels = groups["v"].mean().to_numpy(), groups["y"].first().to_numpy()
  keep = np.isfinite(values)
  return values[keep], labels[keep]


def _resampled_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
  idx = rng.integers(0, len(values), size=(n_boot, len(values)))
  return values[idx].mean(axis=1)


def _interval(samples: np.ndarray, alpha: float) -> tuple[float, float]:
  lo, hi = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
  return float(lo), float(hi)


def group_effect(values: np.ndarray, labels: np.ndarray, case, control, *, subjects: Sequence[str] | None = None,
                 n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
  """mean(case) - mean(control) with a percentile bootstrap interval (subjects resampled within each label).

  Returns {"case", "control", "mean_case", "mean_control", "n_case", "n_control", "effect",
  "ci_low", "ci_high", "relative" (effect / mean_control), "relative_ci_low", "relative_ci_high"};
  the interval entries are None when a group has fewer than 2 subjects.
  """
  v, y = _per_subject(values, labels, subjects)
  a, b = v[y == case], v[y == control]
  out: dict[str, Any] = {"case": str(case), "control": str(control), "n_case": int(len(a)), "n_control": int(len(b)),
                         "mean_case": float(a.mean()) if len(a) else None,
                         "mean_control": float(b.mean()) if len(b) else None,
                         "effect": None, "ci_low": None, "ci_high": None, "relative": None,
                         "relative_ci_low": None, "relative_ci_high": None, "alpha": float(alpha), "n_boot": int(n_boot)}
  if not len(a) or not len(b):
    return out
  out["effect"] = float(a.mean() - b.mean())
  if b.mean() != 0:
    out["relative"] = out["effect"] / abs(float(b.mean()))
  if len(a) < 2 or len(b) < 2:
    return out
  rng = np.random.default_rng(seed)
  ma, mb = _resampled_means(a, n_boot, rng), _resampled_means(b, n_boot, rng)
  out["ci_low"], out["ci_high"] = _interval(ma - mb, alpha)
  if np.all(mb != 0):
    out["relative_ci_low"], out["relative_ci_high"] = _interval((ma - mb) / np.abs(mb), alpha)
  return out


def paired_effect(before: np.ndarray, after: np.ndarray, labels: np.ndarray, case, control, *,
                  tolerance: float = 0.25, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
  """The label effect in the same scans measured twice, and how much of it survives: after / before.

  Each bootstrap resample draws subjects (within each label) once and recomputes both effects on
  them, so the ratio's interval reflects the pairing. `preserved` is |ratio - 1| <= tolerance for
  the point estimate. Returns {"before": group_effect, "after": group_effect, "ratio", "ci_low",
  "ci_high", "tolerance", "preserved"}.
  """
  before, after, labels = np.asarray(before, np.float64), np.asarray(after, np.float64), np.asarray(labels)
  if not before.shape == after.shape == labels.shape:
    raise ValueError(f"before {before.shape}, after {after.shape} and labels {labels.shape} must match")
  ok = np.isfinite(before) & np.isfinite(after)
  before, after, labels = before[ok], after[ok], labels[ok]
  out: dict[str, Any] = {"before": group_effect(before, labels, case, control, n_boot=n_boot, alpha=alpha, seed=seed),
                         "after": group_effect(after, labels, case, control, n_boot=n_boot, alpha=alpha, seed=seed),
                         "ratio": None, "ci_low": None, "ci_high": None, "tolerance": float(tolerance),
                         "preserved": None, "n": int(len(labels))}
  eb, ea = out["before"]["effect"], out["after"]["effect"]
  if eb is None or ea is None or eb == 0:
    return out
  out["ratio"] = ea / eb
  out["preserved"] = bool(abs(out["ratio"] - 1.0) <= tolerance)
  ia, ib = np.flatnonzero(labels == case), np.flatnonzero(labels == control)
  if len(ia) < 2 or len(ib) < 2:
    return out
  rng = np.random.default_rng(seed)
  ra = ia[rng.integers(0, len(ia), size=(n_boot, len(ia)))]
  rb = ib[rng.integers(0, len(ib), size=(n_boot, len(ib)))]
  eff_before = before[ra].mean(1) - before[rb].mean(1)
  eff_after = after[ra].mean(1) - after[rb].mean(1)
  with np.errstate(divide="ignore", invalid="ignore"):
    ratios = eff_after / eff_before
  ratios = ratios[np.isfinite(ratios)]
  if len(ratios):
    out["ci_low"], out["ci_high"] = _interval(ratios, alpha)
  return out


def by_label(real: dict[str, np.ndarray], real_labels: np.ndarray, synthetic: dict[str, np.ndarray],
             synthetic_labels: np.ndarray, case, control, *, real_subjects: Sequence[str] | None = None,
             n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
  """Per measure: the label effect in the real and in the synthetic scans, and synthetic / real.

  Returns {measure: {"unit", "real": group_effect, "synthetic": group_effect, "effect_ratio"}}.
  """
  out = {}
  for m in MEASURES:
    r = group_effect(real[m], real_labels, case, control, subjects=real_subjects, n_boot=n_boot, alpha=alpha,
                     seed=seed)
    s = group_effect(synthetic[m], synthetic_labels, case, control, n_boot=n_boot, alpha=alpha, seed=seed + 1)
    ratio = s["effect"] / r["effect"] if r["effect"] not in (None, 0.0) and s["effect"] is not None else None
    out[m] = {"unit": UNITS[m], "real": r, "synthetic": s, "effect_ratio": ratio}
  return out
