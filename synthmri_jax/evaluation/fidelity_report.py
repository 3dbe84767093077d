"""The study's fidelity section: FD / KID on a classifier's features and MS-SSIM diversity, each with
an interval and its unit (subjects, pairs)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import scipy.stats

from synthmri_jax.data import loader
from synthmri_jax.evaluation import fidelity, stats


class ChannelVolumes:
  """Lazy (X, Y, Z) volumes of one channel of a source, for the pairwise MS-SSIM."""

  def __init__(self, source: loader.Source, channel: int):
    self.source, self.channel = source, channel

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> np.ndarray:
    return np.asarray(self.source[int(i)]["image"][..., self.channel], np.float64)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return fidelity.frechet_distance(a, b)


def fd_kid(name: str, feats: dict[str, np.ndarray], n_seeds: int, ev) -> dict[str, Any]:
  """FD and KID of extractor `name`'s features, real test vs synthetic and (the reference) real val
  vs real test, with two-sample bootstrap intervals over subjects; `ev`: the evaluate block."""
  nb, alpha = int(ev.fidelity_boot), float(ev.alpha)
  kid_kw = dict(num_subsets=int(ev.kid_subsets), subset_size=int(ev.kid_subset_size))
  kid_fn = lambda a, b: fidelity.kernel_inception_distance(a, b, **kid_kw)[0]
  out = {}
  pairs = [("real_test_vs_synthetic", feats["test"], feats["synthetic"])]
  if "val" in feats and len(feats["val"]) >= 2:
    pairs.append(("real_val_vs_real_test (reference: two real samples)", feats["val"], feats["test"]))
  for label, a, b in pairs:
    kid_mean, kid_sd = fidelity.kernel_inception_distance(a, b, **kid_kw)
    fd_entry = dict(value=frechet(a, b), **stats.two_sample_bootstrap(a, b, frechet, nb, alpha, floor=0.0), n_a=len(a), n_b=len(b),
                    dim=int(a.shape[1]), n_seeds=n_seeds)
    kid_entry = dict(value=kid_mean, sd_over_subsets=kid_sd, **stats.two_sample_bootstrap(a, b, kid_fn, nb, alpha),
                     n_a=len(a), n_b=len(b), n_seeds=n_seeds, **kid_kw)
    out.setdefault(f"FD_{name}", {})[label] = fd_entry
    out.setdefault(f"KID_{name}", {})[label] = kid_entry
  return out


def diversity(syn: loader.Source, train: loader.Source, channels, normalization: str, ev) -> dict[str, Any]:
  """Mean pairwise MS-SSIM (lower = more diverse) per channel, synthetic beside real train."""
  n_pairs = int(ev.diversity_pairs)
  if normalization == "percentile":
    data_range = 1.0
  else:
    vals = [train[i]["image"] for i in range(min(len(train), 16))]
    data_range = float(np.max([v.max() for v in vals]) - np.min([v.min() for v in vals]))
  out = {"data_range": data_range, "n_pairs": n_pairs, "note": "lower = more diverse; mean over random pairs",
         "channels": {}}
  for c, channel in enumerate(channels):
    entry = {}
    for label, src in (("synthetic", syn), ("real_train", train)):
      if len(src) < 2:
        continue
      try:
        mean, sd = fidelity.ms_ssim_diversity(ChannelVolumes(src, c), data_range=data_range, n_pairs=n_pairs, seed=0)
      except ValueError as e:   # e.g. a grid smaller than the SSIM window
        entry[label] = {"skipped": str(e)}
        continue
      n = min(n_pairs, len(src) * (len(src) - 1) // 2)
      z = scipy.stats.norm.ppf(1 - float(ev.alpha) / 2)
      half = z * sd / math.sqrt(max(n, 1))
      entry[label] = {"mean": mean, "sd": sd, "n_pairs": n, "n_volumes": len(src), "ci_low": mean - half,
                      "ci_high": mean + half, "n_seeds": 1,
                      "ci_method": "normal approximation over pairs (pairs share volumes: optimistic)"}
    out["channels"][channel] = entry
  return out
