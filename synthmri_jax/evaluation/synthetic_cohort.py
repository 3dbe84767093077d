"""Any synthetic cohort folder -> volumes on the prepared grid, through the real data's own ingest.

Users compare generators, so the study must read a cohort written by any of them, not only
this project's `sample` stage. A synthetic cohort folder is BIDS-like:

    participants.tsv (or .csv)   participant_id, label, age, sex [, seed, session_id, path /
                                 path_<SEQ>, mask_path]
    sub-XXX/anat/sub-XXX_<SEQ>.nii.gz          one per sequence of the prepared cohort
    sub-XXX/anat/sub-XXX_*mask.nii.gz          optional lesion mask (or *_dseg.nii.gz)

Path columns, when present, win over the BIDS names (relative to the table's folder). Every
file goes through cohort.validate (all problems listed at once, each naming its file) and then
through nifti.preprocess with the prepared cohort's grid, spacing, normalisation and channels
(the very function `prepare` runs, via prepare's worker), so a volume written in another
orientation, spacing or dtype lands on the same voxels and intensity scale as the real data,
and a generator gains nothing from writing volumes pre-normalised differently.

A generator that writes its volumes in the prepared space itself (this project's `sample` stage
does) says so in dataset_description.json: `"SynthmriPreparedSpace": <PreparedCohort.space()>`.
Those volumes must lie on the study grid (checked, file by file) and are read as they are, clipped
to the scale's range. Preprocessing them again would normalise them twice: the percentile
normalisation is not idempotent (a prepared scan's foreground p0.5 is ~0.3, not 0): on the
quickstart it moved the synthetic scans' median brain intensity from 0.49 to 0.46 (real scans:
0.54), left them correlated at only 0.95 (median of 64) with what was written, and TSTR rose from
0.568 to 0.657 once they were read as written.

The result is cached in WORKDIR/evaluation/synthetic_cache/<key>/, key = hash of the folder's
content (the table and every file it names, byte for byte) and of the prepared grid: a rerun
on the same folder reads the cache; a regenerated folder gets a new key. Cache files are
written atomically, so an interrupted ingest resumes.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import time
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from synthmri_jax import workdir as workdir_lib
from synthmri_jax.config_blocks import evaluate as config_lib
from synthmri_jax.data import cohort, ingest, nifti
from synthmri_jax.data.cache import PREPARED_SPACE_KEY, PreparedCohort, load_prepared
from synthmri_jax.data.loader import CohortSource
from synthmri_jax.utils import io
from synthmri_jax.utils.errors import UserInputError

TABLE_NAMES = ("participants.tsv", "participants.csv")
MASK_GLOBS = ("*mask.nii.gz", "*mask.nii", "*_dseg.nii.gz", "*_dseg.nii")
DESCRIPTION = "dataset_description.json"
CACHE_VERSION = 2   # 2: volumes declared in the prepared space are read as they are


class SyntheticCohortError(UserInputError, ValueError):
  """A synthetic cohort folder that cannot be evaluated; the message names the folder or file."""


@dataclasses.dataclass(frozen=True)
class SyntheticCohort:
  """A synthetic cohort on the prepared grid (read from its cache)."""

  folder: str                 # the synthetic cohort folder given by the user
  key: str                    # content hash (the cache directory's name)
  prepared: PreparedCohort    # the cache, shaped like a prepared cohort with every row in 'train'
  n_skipped: int              # rows dropped with evaluate.on_bad_file=skip

  @property
  def table(self) -> pd.DataFrame:
    return self.prepared.table

  @property
  def has_masks(self) -> bool:
    return self.prepared.has_masks

  @property
  def labels(self) -> np.ndarray:
    return self.table["label_index"].to_numpy(np.int32)

  def __len__(self) -> int:
    return len(self.table)

  def source(self) -> CohortSource:
    """The grain source (image, label, age, sex [, mask]) of every synthetic scan."""
    return CohortSource(self.prepared, "train")

  def summary(self) -> dict[str, Any]:
    labels = self.prepared.labels
    counts = np.bincount(self.labels, minlength=len(labels))
    return {"dir": self.folder, "content_hash": self.key, "n": len(self),
            "per_class": {lab: int(c) for lab, c in zip(labels, counts)}, "has_masks": self.has_masks,
            "n_skipped_rows": self.n_skipped, "cache": self.prepared.root}


# ------------------------------------------------------------------------------ resolving files

def find_table(folder: str) -> str:
  for name in TABLE_NAMES:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  if not os.path.isdir(folder):
    raise SyntheticCohortError(f"synthetic cohort folder {folder} does not exist (set evaluate.synthetic_dir, "
                               "or run the 'sample' stage to write WORKDIR/synthetic)")
  raise SyntheticCohortError(f"synthetic cohort folder {folder} has no {' or '.join(TABLE_NAMES)} "
                             "(columns participant_id, label, age, sex; one row per synthetic scan)")


def _bids_stem(pid: str, ses: str) -> tuple[str, str]:
  """(folder relative to the cohort root, file-name prefix) of a BIDS subject/session."""
  if ses:
    return os.path.join(pid, ses, "anat"), f"{pid}_{ses}"
  return os.path.join(pid, "anat"), pid


def _bids_image(root: str, pid: str, ses: str, seq: str) -> str:
  folder, prefix = _bids_stem(pid, ses)
  for ext in (".nii.gz", ".nii"):
    path = os.path.join(root, folder, f"{prefix}_{seq}{ext}")
    if os.path.exists(path):
      return path
  return os.path.join(root, folder, f"{prefix}_{seq}.nii.gz")   # validate reports it as not found


def _bids_mask(root: str, pid: str, ses: str, line: int, table: str) -> str:
  folder, prefix = _bids_stem(pid, ses)
  hits = sorted({p for g in MASK_GLOBS for p in glob.glob(os.path.join(root, folder, f"{glob.escape(prefix)}_{g}"))})
  if len(hits) > 1:
    raise SyntheticCohortError(f"{table} line {line} ({pid}): several candidate masks {hits}; "
                               "name the right one in a mask_path column")
  return hits[0] if hits else ""


def resolve_table(table_path: str, sequences: Sequence[str]) -> pd.DataFrame:
  """The raw table with absolute path_<SEQ> and mask_path columns (BIDS names where absent)."""
  try:
    sep = "," if table_path.endswith(".csv") else "\t"
    raw = pd.read_csv(table_path, sep=sep, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig")
  except Exception as e:
    raise SyntheticCohortError(f"{table_path}: unreadable table ({type(e).__name__}: {e})") from None
  raw.columns = [str(c).strip() for c in raw.columns]
  missing = [c for c in cohort.REQUIRED_COLUMNS if c not in raw.columns]
  if missing:
    raise SyntheticCohortError(f"{table_path}: missing required column(s) {', '.join(missing)} "
                               f"(found: {', '.join(raw.columns) or 'none'})")
  root = os.path.dirname(os.path.abspath(table_path))
  absolute = lambda p: os.path.normpath(p if os.path.isabs(p) else os.path.join(root, p)) if p.strip() else ""
  out = raw.drop(columns=[c for c in ("split", "path") if c in raw.columns])
  pids = raw["participant_id"].str.strip()
  sess = raw["session_id"].str.strip() if "session_id" in raw.columns else pd.Series([""] * len(raw))
  for seq in sequences:
    col = f"path_{seq}"
    if col in raw.columns:
      given = raw[col]
    elif len(sequences) == 1 and "path" in raw.columns:
      given = raw["path"]
    else:
      given = pd.Series([""] * len(raw))
    out[col] = [absolute(g) if g.strip() else _bids_image(root, p, s, seq) for g, p, s in zip(given, pids, sess)]
  if "mask_path" in raw.columns:
    out["mask_path"] = [absolute(m) for m in raw["mask_path"]]
  else:
    out["mask_path"] = [_bids_mask(root, p, s, i + 2, table_path) for i, (p, s) in enumerate(zip(pids, sess))]
  return out


# ------------------------------------------------------------------------------ content hash

def content_hash(table_path: str, files: Sequence[str], grid: dict[str, Any], memo: dict[str, Any]) -> str:
  """sha256 of the table, of every named file's bytes (by its path relative to the folder) and of
  the target grid. `memo` caches file digests by (size, mtime) across runs."""
  root = os.path.dirname(os.path.abspath(table_path))
  entries = []
  for path in [table_path] + sorted(set(files)):
    if not os.path.isfile(path):
      entries.append([os.path.relpath(path, root), "missing"])
      continue
    st = os.stat(path)
    stamp = [int(st.st_size), int(st.st_mtime_ns)]
    hit = memo.get(path)
    if hit is None or hit[0] != stamp:
      hit = memo[path] = [stamp, workdir_lib.file_sha256(path)]
    entries.append([os.path.relpath(path, root), hit[1]])
  return workdir_lib.fingerprint({"files": entries, "grid": grid, "version": CACHE_VERSION}, 16)


# ------------------------------------------------------------------------------ the ingest

def declared_space(folder: str, real: PreparedCohort, log: Callable[[str], None] = print) -> bool:
  """Whether the folder's dataset_description.json declares its volumes to be in `real`'s prepared
  space (cache.PREPARED_SPACE_KEY equal to real.space()). A declaration for another grid or scale
  is reported and ignored: those volumes go through the full preprocessing."""
  path = os.path.join(folder, DESCRIPTION)
  if not os.path.isfile(path):
    return False
  try:
    declared = io.read_json(path)
    declared = declared.get(PREPARED_SPACE_KEY) if isinstance(declared, dict) else None
  except ValueError as e:
    raise SyntheticCohortError(f"{path}: unreadable JSON ({e})") from None
  if declared is None:
    return False
  if declared == real.space():
    return True
  log(f"synthetic cohort {folder}: {path} declares another prepared space ({declared}); "
      f"preprocessing its volumes onto this study's ({real.space()})")
  return False


def load_synthetic_cohort(folder: str, real: PreparedCohort, cache_root: str, *, on_bad_file: str = "error",
                          num_workers: int = 1, log: Callable[[str], None] = print) -> SyntheticCohort:
  """Validates, preprocesses (onto `real`'s grid) and caches the synthetic cohort in `folder`."""
  if on_bad_file not in ingest.ON_BAD_FILE:
    raise ValueError(f"evaluate.on_bad_file={on_bad_file!r}; choose from {ingest.ON_BAD_FILE}")
  folder = os.path.abspath(folder)
  table_path = find_table(folder)
  sequences, labels = real.channels, real.labels
  resolved = resolve_table(table_path, sequences)
  files = [p for c in cohort.image_columns(sequences) + ["mask_path"] for p in resolved[c] if p]
  grid = real.space()
  as_is = declared_space(folder, real, log)
  description = os.path.join(folder, DESCRIPTION)
  if os.path.isfile(description):
    files.append(description)
  os.makedirs(cache_root, exist_ok=True)
  memo_path = os.path.join(cache_root, "hash_memo.json")
  memo = io.read_json(memo_path, default={})
  t0 = time.time()
  key = content_hash(table_path, files, dict(grid, read_as_is=as_is), memo)
  io.write_json_atomic(memo_path, memo)
  cache_dir = os.path.join(cache_root, key)
  meta_path = os.path.join(cache_dir, "meta.json")
  meta = io.read_json(meta_path)
  if meta and meta.get("complete"):
    table = pd.read_csv(os.path.join(cache_dir, "cohort.tsv"), sep="\t", keep_default_na=False,
                        dtype={"participant_id": str, "session_id": str, "mask": str})
    log(f"synthetic cohort {folder}: {len(table)} scans from cache {cache_dir}")
    return SyntheticCohort(folder, key, PreparedCohort(cache_dir, table, meta), int(meta.get("n_skipped", 0)))

  # The resolved table (absolute paths, same row order, so line numbers match the user's table).
  os.makedirs(cache_dir, exist_ok=True)
  resolved_path = os.path.join(cache_dir, "resolved_" + os.path.basename(table_path).replace(".csv", ".tsv"))
  with io.atomic_path(resolved_path) as tmp:
    resolved.to_csv(tmp, sep="\t", index=False)
  df = cohort.read_cohort(resolved_path, sequences)
  df.attrs["table"] = table_path
  log(f"synthetic cohort {folder}: validating {len(df)} rows ({len(files)} files)")
  with ingest.WorkerPool(num_workers) as pool:
    good, problems = cohort.validate(df, labels, map_fn=pool.map)
    if problems:
      err = cohort.CohortError(table_path, problems, skippable=False)
      if on_bad_file == "error" or len(good) == 0:
        raise SyntheticCohortError(f"synthetic {err}" + ("\nset evaluate.on_bad_file=skip to drop those rows"
                                                         if len(good) else ""))
      log(f"synthetic cohort: skipping {len({p.line for p in problems})} bad row(s) "
          "(evaluate.on_bad_file=skip):\n" + "\n".join("  " + str(p) for p in problems))
    with_mask = good["mask_path"].str.len() > 0
    if with_mask.any() and not with_mask.all():
      log(f"synthetic cohort: {int(with_mask.sum())} of {len(good)} scans have masks; masks ignored "
          "(the segmentation arm needs a mask for every scan)")
      good["mask_path"] = ""
    tasks, images, masks = _ingest_tasks(good, cache_dir, sequences, grid, as_is)
    if as_is:
      log(f"synthetic cohort: reading {len(tasks)} of {len(good)} scans as they are (declared in the prepared "
          f"space: {tuple(grid['shape'])} at {grid['spacing_mm']:g} mm, {grid['normalization']} scale)")
    else:
      log(f"synthetic cohort: preprocessing {len(tasks)} of {len(good)} scans onto the prepared grid "
          f"{tuple(grid['shape'])} at {grid['spacing_mm']:g} mm")
    pool.map(ingest.process_row, tasks)
  table = pd.DataFrame({
      "participant_id": good["participant_id"], "session_id": good["session_id"], "label": good["label"],
      "label_index": good["label_index"], "age": good["age"], "sex": good["sex"], "split": "train",
      "image": images, "mask": masks})
  with io.atomic_path(os.path.join(cache_dir, "cohort.tsv")) as tmp:
    table.to_csv(tmp, sep="\t", index=False)
  n_skipped = len({p.line for p in problems})
  meta = dict(grid, affine=real.meta["affine"], source=folder, read_as_is=as_is, table=table_path, n=len(table),
              n_skipped=n_skipped, complete=True, seconds=round(time.time() - t0, 2))
  io.write_json_atomic(meta_path, meta)
  table = pd.read_csv(os.path.join(cache_dir, "cohort.tsv"), sep="\t", keep_default_na=False,
                      dtype={"participant_id": str, "session_id": str, "mask": str})
  log(f"synthetic cohort: {len(table)} scans cached in {cache_dir} ({time.time() - t0:.1f} s)")
  return SyntheticCohort(folder, key, PreparedCohort(cache_dir, table, meta), n_skipped)


def _ingest_tasks(good: pd.DataFrame, cache_dir: str, sequences: Sequence[str], grid: dict[str, Any],
                  as_is: bool) -> tuple[list[dict[str, Any]], list[str], list[str]]:
  """(ingest tasks for the scans not cached yet, every row's image and mask cache path)."""
  tasks, images, masks = [], [], []
  for i, r in enumerate(good.to_dict("records")):
    stem = re.sub(r"[^A-Za-z0-9.-]+", "_", "_".join(x for x in (r["participant_id"], r["session_id"]) if x))
    stem = f"{i:06d}_{stem[:80]}"
    image_rel, mask_rel = f"cache/{stem}.image.npy", (f"cache/{stem}.mask.npy" if r["mask_path"] else "")
    images.append(image_rel)
    masks.append(mask_rel)
    if os.path.exists(os.path.join(cache_dir, image_rel)):
      continue   # written atomically after its mask: present means complete
    tasks.append(dict(index=i, paths=[r[c] for c in cohort.image_columns(sequences)], mask_path=r["mask_path"],
                      image_out=os.path.join(cache_dir, image_rel),
                      mask_out=os.path.join(cache_dir, mask_rel) if mask_rel else "",
                      shape=tuple(grid["shape"]), spacing_mm=grid["spacing_mm"],
                      normalization=grid["normalization"], clip_percentiles=tuple(grid["clip_percentiles"]),
                      prepared_space=as_is))
  return tasks, images, masks


def write_cohort_folder(folder: str, images: Sequence[np.ndarray], labels: Sequence[str], affine: np.ndarray, *,
                        ages: Sequence[float] | None = None, sexes: Sequence[str] | None = None,
                        masks: Sequence[np.ndarray] | None = None, sequence: str = "T1w",
                        prefix: str = "sub-synth", space: dict[str, Any] | None = None) -> str:
  """Writes volumes (X, Y, Z) or (X, Y, Z, 1) as a BIDS-like synthetic cohort folder; returns the table path.

  For stand-ins and tests (e.g. a 'synthetic' cohort made of real held-out scans); generators
  write their own folders in the same layout. `space` (a PreparedCohort.space()) declares the
  volumes to be in that prepared space, so the study reads them as they are.
  """
  rows = []
  for i, image in enumerate(images):
    pid = f"{prefix}{i + 1:04d}"
    image = np.asarray(image, np.float32)
    image = image[..., 0] if image.ndim == 4 else image
    nifti.write_nifti(os.path.join(folder, pid, "anat", f"{pid}_{sequence}.nii.gz"), image, affine)
    if masks is not None:
      nifti.write_nifti(os.path.join(folder, pid, "anat", f"{pid}_mask.nii.gz"), np.asarray(masks[i], np.uint8), affine)
    rows.append(dict(participant_id=pid, label=labels[i], age=70.0 if ages is None else float(ages[i]),
                     sex="F" if sexes is None else sexes[i], seed=i))
  if space is not None:
    io.write_json_atomic(os.path.join(folder, DESCRIPTION), {
        "Name": f"{prefix} cohort", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
        PREPARED_SPACE_KEY: space})
  path = os.path.join(folder, "participants.tsv")
  with io.atomic_path(path) as tmp:
    pd.DataFrame(rows).to_csv(tmp, sep="\t", index=False)
  return path


def synthetic_dir(config, workdir: str) -> str:
  ev = config_lib.block(config, "evaluate", config_lib.evaluate_config)
  return os.path.abspath(os.path.expanduser(str(ev.synthetic_dir))) if str(ev.synthetic_dir) else \
      workdir_lib.synthetic_dir(workdir)


def load_synthetic(config, workdir: str) -> SyntheticCohort:
  """The evaluate stage's synthetic cohort, ingested onto the prepared grid (cached in
  WORKDIR/evaluation/synthetic_cache)."""
  ev = config_lib.block(config, "evaluate", config_lib.evaluate_config)
  workdir = os.path.abspath(workdir)
  return load_synthetic_cohort(
      synthetic_dir(config, workdir), load_prepared(workdir), workdir_lib.synthetic_cache_dir(workdir),
      on_bad_file=str(ev.on_bad_file), num_workers=int(ev.num_workers))
