"""The prepared cohort in WORKDIR/data: what `prepare` writes and every later stage reads.

Layout (the contract between the data layer and everything after it):

  WORKDIR/data/cohort.tsv     one row per scan: participant_id, session_id, label, label_index,
                              age, sex, split, image, mask  (image/mask: paths relative to
                              WORKDIR/data; mask empty when the cohort has none)
  WORKDIR/data/cache/*.npy    image: float32 (X, Y, Z, C), RAS+ voxel order, channels last;
                              mask:  uint8 (X, Y, Z)
  WORKDIR/data/prepared.json  geometry and provenance: shape, spacing_mm, affine (4x4),
                              channels, labels, normalization, splits (counts), config_hash,
                              complete=true once every row is cached
  WORKDIR/data/bad_files.tsv  rows skipped with data.on_bad_file=skip, with the problem
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import pandas as pd

from synthmri_jax.data import ingest
from synthmri_jax.utils import io
from synthmri_jax.utils.errors import UserInputError
from synthmri_jax.workdir import PREPARED_META_FILE, data_dir

# dataset_description.json field by which a cohort folder says its volumes are already in a
# prepared cohort's space (PreparedCohort.space()): the study grid, RAS+, and its intensity scale.
PREPARED_SPACE_KEY = "SynthmriPreparedSpace"
SPLITS = ("train", "val", "test", "holdout")
TABLE_COLUMNS = ("participant_id", "session_id", "label", "label_index", "age", "sex", "split", "image", "mask")


class NotPreparedError(UserInputError, FileNotFoundError):
  """The workdir has no complete prepared cohort (the `prepare` stage has not finished there)."""


@dataclasses.dataclass(frozen=True)
class PreparedCohort:
  """Read-only view of a prepared cohort."""

  root: str                 # WORKDIR/data
  table: pd.DataFrame
  meta: dict[str, Any]

  @property
  def labels(self) -> list[str]:
    return list(self.meta["labels"])

  @property
  def shape(self) -> tuple[int, int, int]:
    return tuple(self.meta["shape"])

  @property
  def channels(self) -> list[str]:
    return list(self.meta["channels"])

  @property
  def affine(self) -> np.ndarray:
    return np.asarray(self.meta["affine"], dtype=np.float64)

  def space(self) -> dict[str, Any]:
    """The voxel grid and intensity scale every prepared scan is in. A generator that writes its
    volumes in this space declares it (dataset_description.json `PREPARED_SPACE_KEY`), and the
    study then reads them as they are (see evaluation.synthetic_cohort)."""
    m = self.meta
    return {"shape": [int(s) for s in m["shape"]], "spacing_mm": float(m["spacing_mm"]),
            "channels": list(m["channels"]), "labels": list(m["labels"]), "normalization": m["normalization"],
            "clip_percentiles": [float(p) for p in m["clip_percentiles"]],
            "preprocess_version": int(m.get("preprocess_version", ingest.PREPROCESS_VERSION))}

  @property
  def has_masks(self) -> bool:
    return bool(self.table["mask"].fillna("").astype(str).str.len().gt(0).any())

  def split(self, name: str) -> pd.DataFrame:
    if name not in SPLITS:
      raise ValueError(f"unknown split {name!r}; known: {SPLITS}")
    return self.table[self.table["split"] == name].reset_index(drop=True)

  def load_image(self, row, mmap: bool = False) -> np.ndarray:
    return io.load_npy(os.path.join(self.root, row["image"]), mmap)

  def load_mask(self, row) -> np.ndarray | None:
    rel = row.get("mask", "")
    if not isinstance(rel, str) or not rel:
      return None
    return io.load_npy(os.path.join(self.root, rel))


def load_prepared(workdir: str) -> PreparedCohort:
  """Opens WORKDIR/data; a clear error when `prepare` has not completed there."""
  root = data_dir(workdir)
  meta = io.read_json(os.path.join(root, PREPARED_META_FILE))
  if not meta or not meta.get("complete"):
    raise NotPreparedError(f"{root}: no complete prepared cohort; run the 'prepare' stage first")
  table = pd.read_csv(os.path.join(root, "cohort.tsv"), sep="\t", dtype={"participant_id": str, "session_id": str},
                      keep_default_na=False)
  return PreparedCohort(root=root, table=table, meta=meta)
