"""The attributes of the subjects to generate.

Attributes of the subjects (when the config does not fix them) come from a TABULAR MODEL FIT ON
THE TRAINING SPLIT, `AttributeModel`, and the image is generated conditioned on them; they are not
co-generated with the image by the diffusion model. Why:
- the cohorts this serves have tens to a few thousand subjects; an explicit density -- label
  frequencies, per-label categorical sex, per-label Gaussian KDE (or normal) for age -- matches
  the marginals exactly and with no training, where a diffusion model's handful of scalar outputs
  would be learned last and least reliably by a network sized for the image;
- the user's requests ("50 % AD", "ages 60-90", "half female") become exact operations on that
  density (allocation, truncation, replacement) instead of guidance tricks on a joint sampler;
- the image-attribute relation is not given up: p(attributes) p(image | attributes) is the same
  joint distribution, and the image model receives the attributes through the same
  cross-attention tokens (models/unet.py), so e.g. ventricle size follows the sampled age (tested);
- per-attribute null tokens still let the image model leave any attribute unspecified.
Privacy note: a KDE sample is a training subject's age plus Gaussian noise of the Scott
bandwidth; sample.age_model='gaussian' uses only each label's mean and std. Either is a release of
private data unless config.public fits the model on the public reference cohort (config_blocks/public.py).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np

from synthmri_jax.models import unet as unet_lib
from synthmri_jax.tasks import ldm as ldm_task
from synthmri_jax.utils.errors import UserInputError

SEX_NAMES = ("F", "M")
AGE_MODELS = ("kde", "gaussian")


def parse_fractions(spec: str, names: Sequence[str], what: str) -> np.ndarray | None:
  """'AD:0.5,CN:0.5' -> fractions over `names` (normalised; unnamed entries 0); '' -> None."""
  spec = str(spec or "").strip()
  if not spec:
    return None
  out = np.zeros(len(names), np.float64)
  for item in [s.strip() for s in spec.split(",") if s.strip()]:
    name, _, value = item.partition(":")
    name = name.strip()
    if name not in names:
      raise UserInputError(f"sample.{what}: unknown name {name!r}; known: {', '.join(names)}")
    try:
      out[names.index(name)] = float(value)
    except ValueError:
      raise UserInputError(f"sample.{what}: {item!r} is not NAME:FRACTION") from None
  if np.any(out < 0) or out.sum() <= 0:
    raise UserInputError(f"sample.{what}: fractions must be >= 0 and not all 0, got {spec!r}")
  return out / out.sum()


def allocate(n: int, fractions: np.ndarray) -> np.ndarray:
  """Counts summing to n closest to n * fractions (largest remainder)."""
  raw = n * np.asarray(fractions, np.float64)
  counts = np.floor(raw).astype(int)
  for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
    counts[i] += 1
  return counts


@dataclasses.dataclass
class AttributeModel:
  """p(label) p(attribute | label) for each attribute, fit on the training split (see the module docstring).

  Continuous: per-label Gaussian KDE with Scott's bandwidth ('kde') or a normal ('gaussian');
  categorical: per-label frequencies. A label with no observed value of an attribute uses the
  pooled values; an attribute never observed is left missing (its null token).
  """

  labels: list[str]
  label_probs: np.ndarray
  attributes: tuple[unet_lib.Attribute, ...]
  values: dict[str, list[np.ndarray]]        # continuous: finite values per label
  probs: dict[str, np.ndarray]               # categorical: (num_labels, num_classes); NaN rows = unobserved
  age_model: str = "kde"

  @classmethod
  def fit(cls, labels: Sequence[str], conds: Mapping[str, np.ndarray], attributes: Sequence[unet_lib.Attribute],
          age_model: str = "kde") -> AttributeModel:
    if age_model not in AGE_MODELS:
      raise UserInputError(f"sample.age_model must be one of {AGE_MODELS}, got {age_model!r}")
    y = np.asarray(conds[unet_lib.LABEL])
    k = len(labels)
    label_probs = np.bincount(y, minlength=k).astype(np.float64)
    label_probs /= label_probs.sum()
    values, probs = {}, {}
    for a in attributes:
      v = np.asarray(conds[a.name])
      if a.kind == "continuous":
        pooled = v[np.isfinite(v)].astype(np.float64)
        per = [v[(y == c) & np.isfinite(v)].astype(np.float64) for c in range(k)]
        values[a.name] = [p if p.size else pooled for p in per]
      else:
        table = np.full((k, a.num_classes), np.nan)
        pooled = np.bincount(v[v >= 0], minlength=a.num_classes).astype(np.float64)
        for c in range(k):
          counts = np.bincount(v[(y == c) & (v >= 0)], minlength=a.num_classes).astype(np.float64)
          if counts.sum() == 0:
            counts = pooled
          if counts.sum() > 0:
            table[c] = counts / counts.sum()
        probs[a.name] = table
    return cls(list(labels), label_probs, tuple(attributes), values, probs, age_model)

  def _continuous(self, name: str, label: int, rng: np.random.Generator,
                  value_range: tuple[float, float] | None) -> float:
    v = self.values[name][label]
    lo, hi = value_range if value_range else (-np.inf, np.inf)
    if v.size == 0:
      return float(rng.uniform(lo, hi)) if value_range else float("nan")
    std = float(v.std()) if v.size > 1 else 0.0
    for _ in range(1000):
      if self.age_model == "kde":
        bw = std * v.size ** (-1.0 / 5.0)
        x = float(rng.choice(v) + bw * rng.standard_normal())
      else:
        x = float(v.mean() + std * rng.standard_normal())
      if lo <= x <= hi:
        return x
    # The fitted density has (almost) no mass in the requested range: uniform over it.
    return float(rng.uniform(lo, hi))

  def sample(self, n: int, seed: int, *, label_fractions: np.ndarray | None = None,
             categorical_fractions: Mapping[str, np.ndarray] | None = None,
             ranges: Mapping[str, tuple[float, float]] | None = None) -> dict[str, np.ndarray]:
    """n subjects' label + attributes, and a per-subject noise seed ('seed', uint32)."""
    fractions = self.label_probs if label_fractions is None else np.asarray(label_fractions)
    counts = allocate(n, fractions)
    labels = np.repeat(np.arange(len(self.labels)), counts)
    labels = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1abe1])).permutation(labels)
    out: dict[str, np.ndarray] = {unet_lib.LABEL: labels.astype(np.int32)}
    cont = {a.name: np.full(n, np.nan, np.float32) for a in self.attributes if a.kind == "continuous"}
    cat = {a.name: np.full(n, -1, np.int32) for a in self.attributes if a.kind == "categorical"}
    seeds = np.zeros(n, np.uint32)
    categorical_fractions = dict(categorical_fractions or {})
    ranges = dict(ranges or {})
    for i in range(n):
      ss = np.random.SeedSequence([int(seed), i])
      rng = np.random.default_rng(ss)
      seeds[i] = ss.generate_state(1, np.uint32)[0]
      y = int(labels[i])
      for a in self.attributes:
        if a.kind == "continuous":
          cont[a.name][i] = self._continuous(a.name, y, rng, ranges.get(a.name))
        else:
          p = categorical_fractions.get(a.name, self.probs[a.name][y])
          if np.all(np.isfinite(p)):
            cat[a.name][i] = rng.choice(a.num_classes, p=p)
    out.update(cont)
    out.update(cat)
    out["seed"] = seeds
    return out


def plan_subjects(config, prepared, attributes, labels: Sequence[str]) -> dict[str, np.ndarray]:
  """Labels, attributes and seeds of the sample.num_subjects subjects to generate."""
  s = config.sample
  n = int(s.num_subjects)
  if n < 1:
    raise UserInputError(f"sample.num_subjects must be >= 1, got {n}")
  train = ldm_task.split_attributes(prepared, "train", attributes)
  model = AttributeModel.fit(labels, train, attributes, str(s.age_model))
  cat_fracs, ranges = {}, {}
  names = {a.name: a for a in attributes}
  sex = parse_fractions(str(s.sex_fractions), list(SEX_NAMES), "sex_fractions")
  if sex is not None:
    if "sex" not in names:
      raise UserInputError("sample.sex_fractions is set but the LDM does not condition on 'sex'")
    cat_fracs["sex"] = sex
  age_range = tuple(float(a) for a in (s.age_range or ()))
  if age_range:
    if len(age_range) != 2 or not age_range[0] <= age_range[1]:
      raise UserInputError(f"sample.age_range must be (low, high), got {tuple(s.age_range)}")
    if "age" not in names:
      raise UserInputError("sample.age_range is set but the LDM does not condition on 'age'")
    ranges["age"] = age_range
  fractions = parse_fractions(str(s.label_fractions), list(labels), "label_fractions")
  return model.sample(n, int(s.seed), label_fractions=fractions, categorical_fractions=cat_fracs, ranges=ranges)
