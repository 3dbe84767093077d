"""Copy detection: each synthetic scan's similarity to its nearest training scan under two
measures ('embedding': the contrastive privacy encoder; 'voxel': tiled normalised L2 on pooled
volumes), each thresholded at a τ calibrated on real data only, and the pair figures of the
closest matches."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import numpy as np

from synthmri_jax.config_blocks.privacy import block as privacy_block
from synthmri_jax.data import loader
from synthmri_jax.data.cache import SPLITS, PreparedCohort, load_prepared
from synthmri_jax.evaluation import embedding as embedding_lib
from synthmri_jax.evaluation import privacy_stats
from synthmri_jax.utils import io

MEASURES = ("embedding", "voxel")
COPY_RULES = ("embedding", "voxel", "either")


def pool_volumes(volumes: np.ndarray, factor: int) -> np.ndarray:
  """(n, X, Y, Z[, C]) -> block means over factor^3 voxels (edges zero-padded), float32."""
  v = np.asarray(volumes, np.float32)
  if v.ndim == 4:
    v = v[..., None]
  f = int(factor)
  if f <= 1:
    return v
  pad = [(0, 0)] + [(0, -s % f) for s in v.shape[1:4]] + [(0, 0)]
  v = np.pad(v, pad)
  n, x, y, z, c = v.shape
  return v.reshape(n, x // f, f, y // f, f, z // f, f, c).mean(axis=(2, 4, 6))


def load_split(prepared: PreparedCohort, split: str, pool: int) -> np.ndarray:
  src = loader.CohortSource(prepared, split, mmap=True)
  return np.concatenate([pool_volumes(src[i]["image"][None], pool) for i in range(len(src))], axis=0)


def _measure_quantiles(pc) -> dict[str, float]:
  rule = str(pc.copy_rule)
  if rule not in COPY_RULES:
    raise ValueError(f"privacy.copy_rule must be one of {COPY_RULES}, got {rule!r}")
  q = float(pc.quantile)
  if rule == "either":
    return {m: 1.0 - (1.0 - q) / 2.0 for m in MEASURES}
  return {rule: q}


class CopyChecker:
  """Synthetic (or freshly generated) volumes -> copy flags against the training split.

  Built once per process and workdir by copy_checker(): the privacy encoder, the training
  scans' embeddings and pooled volumes, and τ per measure calibrated on
  `privacy.calibration_split` vs train.
  """

  def __init__(self, config, workdir: str, *, log: Callable[[str], None] = print,
               encoder: Optional[embedding_lib.Encoder] = None):
    pc = privacy_block(config)
    self.pc, self.workdir = pc, os.path.abspath(workdir)
    self.prepared = prepared = load_prepared(self.workdir)
    self.quantiles = _measure_quantiles(pc)
    self.rule = str(pc.copy_rule)
    self.voxel_kw = dict(tiles=tuple(int(t) for t in pc.voxel_tiles), aggregate=str(pc.voxel_aggregate))
    self.train_ids = prepared.split("train")["participant_id"].astype(str).tolist()
    cal_splits = [x.strip() for x in str(pc.calibration_split).split(",") if x.strip()]
    if not cal_splits or "train" in cal_splits or any(x not in SPLITS for x in cal_splits) \
        or sum(len(prepared.split(x)) for x in cal_splits) < 1:
      raise ValueError(f"privacy.calibration_split {pc.calibration_split!r} must name non-empty splits other than "
                       "train (comma-separated)")
    self.calibration_split = ",".join(cal_splits)
    cal_splits = [x for x in cal_splits if len(prepared.split(x))]
    self.n_calibration = sum(len(prepared.split(x)) for x in cal_splits)
    self.encoder = encoder if encoder is not None else embedding_lib.train_encoder(config, self.workdir, log=log)
    self.train = {"embedding": self.encoder.embed_source(loader.CohortSource(prepared, "train")),
                  "voxel": load_split(prepared, "train", int(pc.voxel_pool))}
    cal = {"embedding": np.concatenate([self.encoder.embed_source(loader.CohortSource(prepared, x))
                                        for x in cal_splits]),
           "voxel": np.concatenate([load_split(prepared, x, int(pc.voxel_pool)) for x in cal_splits])}
    self.calibration = {}
    for m, q in self.quantiles.items():
      self.calibration[m] = privacy_stats.calibrate_threshold(self.train[m], cal[m], self.metric(m), quantile=q,
                                                              direction=str(pc.direction), **self.distance_kwargs(m))

  def metric(self, measure: str) -> str:
    return "pearson" if measure == "embedding" else "tiled_l2"

  def distance_kwargs(self, measure: str) -> dict[str, Any]:
    return {} if measure == "embedding" else dict(self.voxel_kw)

  @property
  def taus(self) -> dict[str, float]:
    return {m: float(c["tau"]) for m, c in self.calibration.items()}

  def features(self, volumes: np.ndarray) -> dict[str, np.ndarray]:
    v = np.asarray(volumes, np.float32)
    v = v[..., None] if v.ndim == 4 else v
    return {"embedding": self.encoder.embed(v), "voxel": pool_volumes(v, int(self.pc.voxel_pool))}

  def neighbors(self, feats: dict[str, np.ndarray], k: int = 1) -> dict[str, privacy_stats.Neighbors]:
    return {m: privacy_stats.nearest_neighbors(feats[m], self.train[m], self.metric(m), k=k, **self.distance_kwargs(m))
            for m in MEASURES}

  def flags(self, nn: dict[str, privacy_stats.Neighbors]) -> dict[str, Any]:
    """Per volume: is_copy (the rule), flagged_by, and per measure score / train index."""
    n = len(nn["embedding"].index)
    by = {m: nn[m].similarity[:, 0] > self.calibration[m]["tau"] for m in self.quantiles}
    is_copy = np.zeros(n, bool)
    for f in by.values():
      is_copy |= f
    default = "embedding" if "embedding" in self.quantiles else "voxel"

    def primary_of(i: int) -> str:
      hit = [m for m in MEASURES if m in by and by[m][i]]   # the embedding first
      return hit[0] if hit else default

    primary = [primary_of(i) for i in range(n)]
    return {"is_copy": is_copy, "flagged_by": [[m for m in by if by[m][i]] for i in range(n)],
            "measure": primary,
            "score": np.array([nn[primary[i]].similarity[i, 0] for i in range(n)]),
            "train_index": np.array([nn[primary[i]].index[i, 0] for i in range(n)], np.int64),
            **{f"{m}_score": nn[m].similarity[:, 0] for m in MEASURES},
            **{f"{m}_train_index": nn[m].index[:, 0] for m in MEASURES}}

  def __call__(self, volumes: np.ndarray) -> dict[str, Any]:
    """Flags of new volumes (n, X, Y, Z[, C]) on the prepared grid and intensity scale: is_copy (n,),
    train_participant_id, score and measure (the flagging measure, embedding first), flagged_by."""
    f = self.flags(self.neighbors(self.features(volumes)))
    f["train_participant_id"] = [self.train_ids[int(j)] for j in f["train_index"]]
    return f


_CHECKERS: dict[tuple[str, str], CopyChecker] = {}


def copy_checker(config, workdir: str, *, log: Callable[[str], None] = print) -> CopyChecker:
  """The CopyChecker of this workdir and privacy config, built once per process."""
  pc = privacy_block(config)
  key = (os.path.abspath(workdir), pc.to_json(sort_keys=True))
  if key not in _CHECKERS:
    _CHECKERS[key] = CopyChecker(config, workdir, log=log)
  return _CHECKERS[key]


def flag_generated(config, workdir: str, volumes: np.ndarray, *, log: Callable[[str], None] = print) -> dict[str, Any]:
  """For sample.reject_copies: checks generated volumes (n, X, Y, Z[, C]) -- or one (X, Y, Z[, C])
  with a leading axis added by the caller -- against the training split with the same encoder,
  measures, rule and τ as run_privacy. Returns {"is_copy": bool (n,), "train_participant_id":
  [n], "score": (n,), "measure": [n], "flagged_by": [n lists], "tau": {measure: τ}}. The first
  call trains (or loads) the privacy encoder and calibrates; later calls only embed and compare.
  """
  checker = copy_checker(config, workdir, log=log)
  out = checker(volumes)
  out["tau"] = checker.taus
  return out


def mid_slices(v: np.ndarray) -> list[np.ndarray]:
  """Axial, coronal, sagittal mid slices of channel 0 of an RAS+ volume, oriented for imshow."""
  v = np.asarray(v, np.float32)
  v = v[..., 0] if v.ndim == 4 else v
  x, y, z = (s // 2 for s in v.shape)
  return [v[:, :, z].T, v[:, y, :].T, v[x, :, :].T]


def save_pair_figure(path: str, synthetic: np.ndarray, train: np.ndarray, title: str) -> str:
  """Mid slices of a synthetic scan (top) and its nearest training scan (bottom), one PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [mid_slices(synthetic), mid_slices(train)]
  lo = min(float(np.min(r)) for row in rows for r in row)
  hi = max(float(np.max(r)) for row in rows for r in row)
  fig, axes = plt.subplots(2, 3, figsize=(7.5, 5.4))
  for i, (row, name) in enumerate(zip(rows, ("synthetic", "nearest train"))):
    for j, (img, view) in enumerate(zip(row, ("axial", "coronal", "sagittal"))):
      ax = axes[i, j]
      ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(view, fontsize=9)
      if j == 0:
        ax.set_ylabel(name, fontsize=9)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  with io.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=90, format="png")
  plt.close(fig)
  return path
