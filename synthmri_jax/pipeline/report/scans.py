"""Real and synthetic mid-slices: the answer grid beside the two answers, and the per-class slice grids."""

from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np

from synthmri_jax import workdir as W
from synthmri_jax.pipeline.report.format import fmt_g
from synthmri_jax.pipeline.report.document import SUBJECTS_PER_CLASS, Figures, Image, Section, figure, not_run
from synthmri_jax.pipeline.report.inputs import Inputs


def answer_grid(config, inp: Inputs, figs: Figures) -> Optional[Image]:
  """One compact figure: per class, a real and a synthetic subject's axial and coronal mid slices."""
  prepared = inp.prepared()
  if prepared is None or inp.synthetic_table() is None:
    return None
  train = prepared.split("train")
  cols = []
  for label in prepared.labels:
    real = [np.asarray(prepared.load_image(r, mmap=True)[..., 0], np.float32)
            for _, r in train[train["label"] == label].head(2).iterrows()]
    syn, _ = _synthetic_volumes(config, inp, prepared, label, 2)
    cols += [(f"real {label}", v) for v in real] + [(f"synthetic {label}", v[..., 0]) for v in syn]
  if not cols:
    return None
  allv = np.concatenate([np.concatenate([s.ravel() for s in _mid_slices(v)[:2]]) for _, v in cols])
  lo, hi = np.percentile(allv, [1, 99])
  hi = hi if hi > lo else lo + 1.0
  fig = figure(1.25 * len(cols) + 0.3, 3.0)
  axes = fig.subplots(2, len(cols), squeeze=False)
  for j, (name, v) in enumerate(cols):
    for i, img in enumerate(_mid_slices(v)[:2]):
      ax = axes[i, j]
      ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(name, fontsize=7, color="#1f4e9a" if name.startswith("real") else "#a33c00")
  path = figs.save(fig, "answer_grid")
  seq = f", {prepared.channels[0]}" if len(prepared.channels) > 1 else ""   # the first sequence of several
  return Image(path, "Axial (top) and coronal (bottom) mid slices: real training scans and synthetic scans per "
                     f"class{seq}, one grey scale")



# ---------------------------------------------------------------- slice grids


def _mid_slices(v: np.ndarray) -> list[np.ndarray]:
  """Axial, coronal, sagittal mid slices (origin='lower'), as in the privacy figures."""
  from synthmri_jax.evaluation.privacy import mid_slices
  return mid_slices(v)


def _synthetic_volumes(config, inp: Inputs, prepared, label: str, n: int) -> tuple[list[np.ndarray], str]:
  """Up to n synthetic volumes (X, Y, Z, channels) of one label, and where they came from.

  The evaluate stage's ingested cache (on the prepared grid and intensity scale) when it exists;
  otherwise the sample stage's NIfTI files, which it writes on the prepared grid already."""
  cache = W.synthetic_cache_dir(inp.workdir)
  if config is not None and os.path.isdir(cache):
    try:
      from synthmri_jax.pipeline.evaluate import load_synthetic
      syn = load_synthetic(config, inp.workdir)
      rows = syn.table[syn.table["label"] == label].head(n)
      return ([np.asarray(syn.prepared.load_image(r, mmap=True), np.float32) for _, r in rows.iterrows()],
              "evaluate stage's ingested synthetic cache")
    except Exception as e:  # noqa: BLE001  (fall back to the raw files)
      print(f"report: synthetic cache unreadable ({type(e).__name__}: {e}); reading the NIfTI files", flush=True)
  t = inp.synthetic_table()
  if t is None:
    return [], ""
  from synthmri_jax.data import nifti
  out = []
  for pid in t[t["label"] == label]["participant_id"].head(n):
    paths = [os.path.join(W.synthetic_dir(inp.workdir), pid, "anat", f"{pid}_{seq}.nii.gz") for seq in prepared.channels]
    if all(os.path.isfile(p) for p in paths):
      out.append(np.stack([np.asarray(nifti.load_canonical(p)[0], np.float32) for p in paths], axis=-1))
  return out, "synthetic/ NIfTI files"


def slices_section(config, inp: Inputs, figs: Figures) -> Section:
  """Per class and per sequence (channel), real training scans above synthetic ones."""
  title = "Real vs synthetic scans"
  prepared = inp.prepared()
  if prepared is None:
    return not_run(title, "slice grids not available: no prepared cohort cache (data/)")
  if inp.synthetic_table() is None:
    return not_run(title, "slice grids not available: no synthetic cohort (synthetic/participants.tsv); "
                           "the `sample` stage has not run")
  sec = Section(title)
  train = prepared.split("train")
  source = ""
  for label in prepared.labels:
    # every channel of a volume read once (the synthetic cohort is ingested once per label)
    real = [np.asarray(prepared.load_image(r, mmap=True), np.float32)
            for _, r in train[train["label"] == label].head(SUBJECTS_PER_CLASS).iterrows()]
    syn, source = _synthetic_volumes(config, inp, prepared, label, SUBJECTS_PER_CLASS)
    if not real and not syn:
      continue
    for c, channel in enumerate(prepared.channels):
      safe = re.sub(r"[^A-Za-z0-9_-]+", "_", str(label) if len(prepared.channels) == 1 else f"{label}_{channel}")
      sec.add(_slice_grid(figs, f"slices_{safe}", label, channel, [v[..., c] for v in real], [v[..., c] for v in syn]))
  if source:
    sec.add(f"Synthetic volumes read from the {source}. Real scans: first {SUBJECTS_PER_CLASS} of each class in the "
            "training split.")
  return sec


def _slice_grid(figs: Figures, name: str, label: str, channel: str, real: list, syn: list) -> Image:
  rows = [("real", v) for v in real] + [("synthetic", v) for v in syn]
  # One grey scale for both cohorts (1st-99th percentile of everything shown), so brightness
  # and contrast differences are the generator's, not the display's.
  allv = np.concatenate([np.concatenate([s.ravel() for s in _mid_slices(v)]) for _, v in rows])
  lo, hi = np.percentile(allv, [1, 99])
  hi = hi if hi > lo else lo + 1.0
  fig = figure(6.6, 2.1 * len(rows) + 0.4)
  axes = fig.subplots(len(rows), 3, squeeze=False)
  for i, (kind, v) in enumerate(rows):
    for j, (img, view) in enumerate(zip(_mid_slices(v), ("axial", "coronal", "sagittal"))):
      ax = axes[i, j]
      ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(view, fontsize=9)
      if j == 0:
        ax.set_ylabel(kind, fontsize=9, color="#1f4e9a" if kind == "real" else "#a33c00")
  fig.suptitle(f"{label}: {len(real)} real (train split) vs {len(syn)} synthetic, {channel}, same grey scale",
               fontsize=9)
  path = figs.save(fig, name)
  return Image(path, f"{label}: mid slices, real (top rows) vs synthetic (bottom rows), {channel}, "
                     f"grey scale {fmt_g(lo, 3)} to {fmt_g(hi, 3)}")
