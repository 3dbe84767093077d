"""The 'prepare' stage: cohort table -> validated, split, preprocessed cache in WORKDIR/data
(the layout in synthmri_jax.data.cache), so later stages never touch NIfTI again.

Idempotent and resumable: every cache file is written atomically, so a file that exists is
complete, and a rerun only does the rows whose files are missing. The data config and the
table it was prepared from are recorded; a rerun with a different one is refused instead of
mixing stale volumes into a new cohort.
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import os
import re
import time
from typing import Any, Sequence

import numpy as np

from synthmri_jax.utils.errors import UserInputError
from synthmri_jax.config_blocks import public
from synthmri_jax.data import cache, cohort, ingest, nifti
from synthmri_jax.utils import durations
from synthmri_jax.utils import io
from synthmri_jax import workdir as workdir_lib

# The config.data fields that decide what `prepare` writes; loader-only fields (batch size,
# augmentation, shuffling, workers) may change freely without invalidating the cache.
PREPARE_FIELDS = ("cohort_tsv", "sequences", "labels", "spacing_mm", "shape", "normalization",
                  "clip_percentiles", "split_seed", "split_fractions", "embedded")
# Bump when preprocessing changes in a way that makes older caches wrong.


class StaleCacheError(UserInputError, RuntimeError):
  """WORKDIR/data was prepared from another data config or cohort table."""


def prepare_config(data_config) -> dict[str, Any]:
  """The prepare-relevant part of config.data as plain JSON-able values."""
  full = json.loads(data_config.to_json(sort_keys=True)) if hasattr(data_config, "to_json") else dict(data_config)
  out = {k: full[k] for k in PREPARE_FIELDS if k in full}
  out["preprocess_version"] = ingest.PREPROCESS_VERSION
  return out


def cohort_key(prep_config: dict[str, Any], table_sha256: str) -> str:
  return workdir_lib.fingerprint({"config": prep_config, "table": table_sha256})


def _check_not_stale(root: str, meta: dict[str, Any] | None, prep: dict[str, Any], table_sha: str | None) -> None:
  """Refuses a WORKDIR/data made from another data config (or, once known, another table)."""
  if not meta:
    return
  old = meta.get("data_config", {})
  changed = [f"{k}: {old.get(k)!r} -> {prep.get(k)!r}"
             for k in sorted(set(old) | set(prep)) if old.get(k) != prep.get(k)]
  if table_sha is not None and meta.get("table_sha256") != table_sha:
    changed.append(f"cohort table {meta.get('cohort_tsv')} content changed")
  if changed:
    raise StaleCacheError(
        f"{root} was prepared with a different data config or cohort table ({'; '.join(changed)}); "
        "its cache would be stale. Use a fresh --workdir, or delete that folder to rebuild it "
        "(models trained on the old cohort are not valid for the new one).")


# ------------------------------------------------------------------------------ cache rows

def _row_stem(row: dict[str, Any], sources: Sequence[str]) -> str:
  """Cache file stem: readable ids plus a hash of the sources and their size/mtime, so two ids
  that sanitise alike never collide and a replaced source file is never served from cache."""
  ident = [row["participant_id"], row["session_id"]]
  for p in sources:
    st = os.stat(p)
    ident += [p, st.st_size, st.st_mtime_ns]
  digest = hashlib.sha1(json.dumps(ident).encode()).hexdigest()[:8]
  name = re.sub(r"[^A-Za-z0-9.-]+", "_", "_".join(x for x in ident[:2] if x)).strip("._") or "scan"
  return f"{name[:80]}_{digest}"


def _npy_ok(path: str, shape: tuple[int, ...], dtype: str) -> bool:
  """A cache file is usable if present with the expected header (read without the data)."""
  if not os.path.isfile(path):
    return False
  try:
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      got_shape, _, got_dtype = read_header(f)
  except (OSError, ValueError):
    return False
  return tuple(got_shape) == tuple(shape) and np.dtype(got_dtype) == np.dtype(dtype)


# ------------------------------------------------------------------------------ the stage

def run(config, workdir: str) -> dict[str, Any]:
  """Builds WORKDIR/data (see synthmri_jax.data.cache) and returns prepared.json's content; with
  config.public enabled, also the public reference cohort's WORKDIR/public/data (config_blocks/public.py)."""
  meta = _prepare(config, workdir)
  if public.enabled(config):
    print(f"prepare: the public reference cohort (simulated, public.seed={public.block(config).seed})", flush=True)
    _prepare(public.data_config(config), workdir_lib.public_dir(workdir))
  return meta


def fit_cohort(config, workdir: str, prepared: cache.PreparedCohort | None = None) -> cache.PreparedCohort:
  """The prepared cohort the tokenizer, the latent standardisation and the attribute statistics are fit
  on: the public reference cohort when config.public is enabled, else WORKDIR's (`prepared`, if given)."""
  if public.enabled(config):
    return cache.load_prepared(workdir_lib.public_dir(workdir))
  return prepared if prepared is not None else cache.load_prepared(workdir)


def fit_on(config) -> str:
  """What `fit_cohort` is, as the stages record it for the privacy ledger: 'public' or 'cohort'."""
  return "public" if public.enabled(config) else "cohort"


def _prepare(config, workdir: str) -> dict[str, Any]:
  t_start = time.time()
  d = config.data
  root = workdir_lib.data_dir(workdir)
  on_bad = str(d.on_bad_file)
  if on_bad not in ingest.ON_BAD_FILE:
    raise ValueError(f"data.on_bad_file={on_bad!r}; choose from {ingest.ON_BAD_FILE}")
  if str(d.normalization) not in nifti.NORMALIZATIONS:
    raise ValueError(f"data.normalization={d.normalization!r}; choose from {nifti.NORMALIZATIONS}")
  sequences, labels = cohort.as_list(d.sequences), cohort.as_list(d.labels)
  if not sequences or not labels:
    raise ValueError("data.sequences and data.labels must each name at least one entry")
  if len(set(sequences)) != len(sequences) or "mask" in (s.lower() for s in sequences):
    raise ValueError(f"data.sequences={sequences}: names must be distinct, and 'mask' is the lesion mask's "
                     "(its mask_path column, the tokenizer's mask channel, sub-*_mask.nii.gz): rename that sequence")
  shape = tuple(int(s) for s in d.shape)
  fractions = cohort.split_fractions(d.split_fractions)

  # The config is checked before the embedded cohort is (re)built, the table once it exists.
  prep = prepare_config(d)
  meta_path = os.path.join(root, workdir_lib.PREPARED_META_FILE)
  old_meta = io.read_json(meta_path)
  _check_not_stale(root, old_meta, prep, None)
  workers = int(d.get("num_workers", min(2, os.cpu_count() or 1)))
  with ingest.WorkerPool(workers) as pool:
    table_path = str(d.cohort_tsv)
    if not table_path:
      from synthmri_jax.data.embedded import build_embedded_cohort
      table_path = build_embedded_cohort(d.embedded, os.path.join(workdir, "embedded"), sequences=sequences,
                                         map_fn=pool.progress_map("embedded subjects simulated"))
    table_path = os.path.abspath(table_path)
    df = cohort.read_cohort(table_path, sequences)
    table_sha = workdir_lib.file_sha256(table_path)
    _check_not_stale(root, old_meta, prep, table_sha)
    key = cohort_key(prep, table_sha)

    good, problems = _validated_rows(root, df, table_path, sequences, labels, on_bad, pool)
    good = cohort.assign_splits(good, fractions, int(d.split_seed))

    # ---- plan the cache; record the config before any cache file is written
    cache_dir = os.path.join(root, "cache")
    os.makedirs(cache_dir, exist_ok=True)
    tasks, images, masks = _cache_plan(root, good, d, sequences, shape)
    table = good.assign(image=images, mask=masks)
    cohort_tsv = _table_text(table)
    if not tasks and old_meta and old_meta.get("complete") and _read(os.path.join(root, "cohort.tsv")) == cohort_tsv:
      print(f"prepare: already complete ({len(table)} scans in {root}); nothing to do", flush=True)
      return old_meta
    meta = _meta(d, prep, key, table_path, table_sha, table, problems, sequences, labels, shape)
    io.write_json_atomic(meta_path, dict(meta, complete=False))

    # ---- preprocess what is missing
    n_total, n_cached = len(table), len(table) - len(tasks)
    print(f"prepare: {n_total} scans, {n_cached} already cached, {len(tasks)} to do "
          f"({pool.workers} worker process{'es' if pool.workers > 1 else ''})", flush=True)
    progress = ingest.Progress("scans", n_total, n_cached)
    for _ in pool.run_unordered(ingest.process_row, tasks):
      progress.update()

  # ---- the table, then prepared.json with complete=true last
  io.write_text_atomic(os.path.join(root, "cohort.tsv"), cohort_tsv)
  _remove_orphans(cache_dir, set(images) | set(m for m in masks if m))
  meta.update(complete=True, prepare_seconds=round(time.time() - t_start, 2))
  io.write_json_atomic(meta_path, meta)
  print(f"prepare: complete, {n_total} scans in {root} "
        f"({', '.join(f'{k} {v}' for k, v in meta['splits'].items())}) in {durations.short(time.time() - t_start)}", flush=True)
  return meta


def _validated_rows(root: str, df, table_path: str, sequences, labels, on_bad: str, pool):
  """(the good rows, the problems): every file checked before any work; with on_bad_file=skip the
  bad rows are listed in WORKDIR/data/bad_files.tsv, with error they stop the stage."""
  memo_path = os.path.join(root, "inspected.json")
  memo = io.read_json(memo_path, default={})
  n_files = sum(1 for c in cohort.image_columns(sequences) + ["mask_path"] for p in df[c] if p)
  print(f"prepare: validating {len(df)} rows ({n_files} files) of {table_path}", flush=True)
  good, problems = cohort.validate(df, labels, map_fn=pool.progress_map("files validated"), memo=memo)
  io.write_json_atomic(memo_path, memo)
  bad_path = os.path.join(root, "bad_files.tsv")
  if problems and on_bad == "error":
    raise cohort.CohortError(table_path, problems)
  if problems:
    cohort.write_bad_files(bad_path, problems)
    n_bad = len({p.line for p in problems})
    print(f"prepare: skipping {n_bad} bad row(s) (data.on_bad_file=skip); listed in {bad_path}", flush=True)
  elif os.path.exists(bad_path):
    os.remove(bad_path)
  if good.empty:
    raise cohort.CohortError(table_path, problems or [cohort.Problem(0, "", "", table_path, "no rows")],
                             skippable=False)
  return good, problems


def _cache_plan(root: str, good, d, sequences, shape):
  """(ingest tasks for the scans not cached yet, every row's image and mask cache path)."""
  img_cols = cohort.image_columns(sequences)
  image_shape = shape + (len(sequences),)
  tasks, images, masks = [], [], []
  for i, r in enumerate(good.to_dict("records")):
    sources = [r[c] for c in img_cols] + ([r["mask_path"]] if r["mask_path"] else [])
    stem = _row_stem(r, sources)
    image_rel = f"cache/{stem}.image.npy"
    mask_rel = f"cache/{stem}.mask.npy" if r["mask_path"] else ""
    images.append(image_rel)
    masks.append(mask_rel)
    done = _npy_ok(os.path.join(root, image_rel), image_shape, "float32") and (
        not mask_rel or _npy_ok(os.path.join(root, mask_rel), shape, "uint8"))
    if not done:
      tasks.append(dict(index=i, paths=[r[c] for c in img_cols], mask_path=r["mask_path"],
                        image_out=os.path.join(root, image_rel),
                        mask_out=os.path.join(root, mask_rel) if mask_rel else "",
                        shape=shape, spacing_mm=float(d.spacing_mm), normalization=str(d.normalization),
                        clip_percentiles=tuple(float(p) for p in d.clip_percentiles)))
  return tasks, images, masks


def _table_text(table) -> str:
  buf = _io.StringIO()
  table[list(cache.TABLE_COLUMNS)].to_csv(buf, sep="\t", index=False)
  return buf.getvalue()


def _read(path: str) -> str | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return f.read()


def _meta(d, prep, key, table_path, table_sha, table, problems, sequences, labels, shape) -> dict[str, Any]:
  spacing = float(d.spacing_mm)
  per_split = {s: table[table["split"] == s] for s in cache.SPLITS}
  return {
      "shape": list(shape),
      "spacing_mm": spacing,
      # Each scan's grid is centred on its own brain; this is that common brain-centred frame
      # (grid centre at world 0,0,0), the affine to write synthetic volumes with.
      "affine": nifti.centred_affine(shape, spacing).tolist(),
      "channels": list(sequences),
      "labels": list(labels),
      "normalization": str(d.normalization),
      "clip_percentiles": [float(p) for p in d.clip_percentiles],
      "splits": {s: int(len(t)) for s, t in per_split.items()},
      "split_participants": {s: int(t["participant_id"].nunique()) for s, t in per_split.items()},
      "split_labels": {s: {lab: int((t["label"] == lab).sum()) for lab in labels} for s, t in per_split.items()},
      "n_scans": int(len(table)),
      "n_participants": int(table["participant_id"].nunique()),
      "n_bad_rows": len({p.line for p in problems}),
      "has_masks": bool((table["mask"] != "").any()),
      "cohort_tsv": table_path,
      "table_sha256": table_sha,
      "data_config": prep,
      "config_hash": key,
      "preprocess_version": ingest.PREPROCESS_VERSION,
  }


def _remove_orphans(cache_dir: str, keep: set[str]) -> None:
  """Drops cache files no row refers to: temp files left by a killed run, and volumes of
  source files that were since replaced."""
  for name in os.listdir(cache_dir):
    if f"cache/{name}" not in keep and name.endswith(".npy"):
      os.remove(os.path.join(cache_dir, name))
