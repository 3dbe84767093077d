"""The study's arms: what each classifier is trained on, and the training sets built for them.

  TRTR       the real train split
  TSTR       the synthetic cohort only
  CODEC      the real train split encoded -> decoded by the sampler's codec: the TSTR a perfect LDM
             could reach through this decoder (evaluate.arms "CODEC")
  AUG_<f>    a stratified, subject-level subsample of a fraction f of the real train split plus the
             whole synthetic cohort
  REAL_<f>   the same real subsample alone, the baseline an AUG_<f> arm must beat
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import pandas as pd

from synthmri_jax.data import cohort, loader

ARM_KINDS = ("TRTR", "TSTR", "AUG", "CODEC")


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  real_fraction: float     # share of the real train split's subjects (0: none)
  synthetic: bool          # whether the synthetic cohort is in the training set
  codec: bool = False      # trained on the real train split's codec round trips (the TSTR ceiling)


def fraction_name(f: float) -> str:
  return f"{f:g}"


def plan_arms(ev) -> list[Arm]:
  """The arms of evaluate.arms, TRTR always first (it is every comparison's reference)."""
  kinds = cohort.as_list(ev.arms)
  unknown = [k for k in kinds if k not in ARM_KINDS]
  if unknown:
    raise ValueError(f"evaluate.arms: unknown arm(s) {unknown}; known: {', '.join(ARM_KINDS)}")
  fractions = sorted({float(f) for f in ev.real_fractions})
  if any(not 0.0 < f <= 1.0 for f in fractions):
    raise ValueError(f"evaluate.real_fractions must be in (0, 1], got {list(ev.real_fractions)}")
  arms = [Arm("TRTR", 1.0, False)]
  if "TSTR" in kinds:
    arms.append(Arm("TSTR", 0.0, True))
  if "CODEC" in kinds:
    arms.append(Arm("CODEC", 0.0, False, codec=True))
  if "AUG" in kinds:
    arms += [Arm(f"AUG_{fraction_name(f)}", f, True) for f in fractions]
    if ev.real_only_baselines:
      arms += [Arm(f"REAL_{fraction_name(f)}", f, False) for f in fractions if f < 1.0]
  return arms


def subsample_real(table: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
  """Row indices of a subject-level, label-stratified subsample: round(fraction * n_k) subjects of
  each class k (at least one), drawn with a generator seeded by (seed, fraction)."""
  if fraction >= 1.0:
    return np.arange(len(table))
  label_of = table.groupby("participant_id")["label_index"].agg(lambda s: int(s.value_counts().sort_index().idxmax()))
  rng = np.random.default_rng([int(seed), int(round(fraction * 1e6))])
  chosen: list[str] = []
  for k in sorted(set(label_of.tolist())):
    members = sorted(label_of.index[label_of == k].tolist())
    n = max(1, int(round(fraction * len(members))))
    chosen += [members[i] for i in rng.choice(len(members), size=n, replace=False)]
  return np.flatnonzero(table["participant_id"].isin(chosen).to_numpy())


class Subset:
  """Rows `indices` of a source, keeping only `keys`."""

  def __init__(self, source: loader.Source, indices: Sequence[int], keys: Sequence[str]):
    self.source, self.indices, self.keys = source, np.asarray(indices, int), tuple(keys)
    if len(self.indices) == 0:
      raise ValueError(f"empty subset of {source!r}")

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    element = self.source[int(self.indices[i])]
    return {k: element[k] for k in self.keys}


class Concat:
  """Sources one after the other (real subsample, then synthetic)."""

  def __init__(self, sources: Sequence[loader.Source]):
    self.sources = [s for s in sources if s is not None and len(s)]
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    j = int(np.searchsorted(self.offsets, i, side="right") - 1)
    return self.sources[j][int(i - self.offsets[j])]
