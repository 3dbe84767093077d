"""ROI measurements from an image alone (ventricle CSF volume, hippocampal GM intensity, brain
volume), by placing the template's ROI atlas on the image's own grid: used by the embedded cohort's
calibration, the tests and the evaluation's anatomy-by-label check."""

from __future__ import annotations

import functools

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from synthmri_jax.data.mni_template import CSF_LEVEL, GM_LEVEL, hippocampus_distance, template_1mm


@functools.lru_cache(maxsize=1)
def _roi_atlas() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """1 mm template-space ROI labels (1 ventricle search region, 2 hippocampal GM, 3 deep WM)
  and the template brain's centroid and per-axis sd (mm), the reference for moment alignment."""
  t = template_1mm()
  atlas = np.zeros(t.t1.shape, np.uint8)
  atlas[t.ventricle_distance <= 8.0] = 1
  ijk = np.stack(np.nonzero(t.gm > 0.4))
  dist, _ = hippocampus_distance(t.origin[:, None] + ijk)
  hip = ijk[:, dist < 5.0]
  atlas[tuple(hip)] = 2
  deep_wm = ndi.binary_erosion(t.wm > 0.9, iterations=2) & (atlas == 0)
  atlas[deep_wm] = 3
  mm = t.origin[:, None] + np.stack(np.nonzero(t.brain))
  return atlas, t.origin, mm.mean(1), mm.std(1)


def _foreground(data: np.ndarray) -> np.ndarray:
  positive = data[data > 0]
  if positive.size == 0:
    raise ValueError("measure_rois: the image has no positive voxels")
  fg = data > 0.15 * np.percentile(positive, 99.5)
  labels, n = ndi.label(fg)
  if n > 1:
    fg = labels == np.bincount(labels.ravel())[1:].argmax() + 1
  return ndi.binary_fill_holes(fg)


def roi_masks(data: np.ndarray, affine: np.ndarray) -> dict[str, np.ndarray]:
  """Boolean ROI masks on the image's own grid: `ventricles` (search region: CSF is measured
  inside it), `hippocampus` (GM of both hippocampi) and `white_matter` (deep WM reference).

  The template atlas is placed by matching the brain's centroid and per-axis spread (moments of
  the foreground), so it works for any orientation, head size and crop, including the prepared,
  brain-centred grids and generated samples. Assumes a roughly axis-aligned, skull-stripped brain.
  """
  data = np.asarray(data, dtype=np.float32)
  affine = np.asarray(affine, dtype=np.float64)
  fg = _foreground(data)
  ijk = np.stack(np.nonzero(fg)).astype(np.float64)
  world = affine[:3, :3] @ ijk + affine[:3, 3:4]
  atlas, origin, c_tpl, sd_tpl = _roi_atlas()
  c_img, sd_img = world.mean(1), world.std(1)
  # voxel (i, j, k) -> atlas voxel: one affine map, evaluated by broadcasting the three axes.
  ratio = (sd_tpl / sd_img)[:, None]
  lin = ratio * affine[:3, :3]
  off = c_tpl + ratio[:, 0] * (affine[:3, 3] - c_img) - origin
  index = []
  for c in range(3):
    grid = (off[c] + lin[c, 0] * np.arange(data.shape[0])[:, None, None]
            + lin[c, 1] * np.arange(data.shape[1])[None, :, None]
            + lin[c, 2] * np.arange(data.shape[2])[None, None, :])
    index.append(np.rint(grid).astype(np.int32))
  ok = fg.copy()
  for c in range(3):
    ok &= (index[c] >= 0) & (index[c] < atlas.shape[c])
  labels = np.zeros(data.shape, np.uint8)
  labels[ok] = atlas[index[0][ok], index[1][ok], index[2][ok]]
  return dict(ventricles=labels == 1, hippocampus=labels == 2, white_matter=labels == 3, brain=fg)


def measure_rois(data: np.ndarray, affine: np.ndarray) -> dict[str, float]:
  """ROI measurements used by the tests and the evaluation, from an image alone.

  Works on written files, prepared arrays ([0, 1] or z-scored: the minimum is taken as the
  background level) and generated samples alike. Intensities are divided by the median of deep
  white matter, so gain and contrast drift cancel.
  `ventricle_ml`: CSF volume in the ventricle region, each voxel counted by its CSF fraction
  between the GM and CSF levels (partial volume). `hippocampus_intensity`: mean normalised
  intensity of hippocampal GM (lower = GM loss). `brain_ml`: foreground volume.
  """
  data = np.asarray(data, dtype=np.float32)
  data = data - min(float(data.min()), 0.0)
  rois = roi_masks(data, affine)
  voxel_ml = abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])) / 1000.0
  wm = float(np.median(data[rois["white_matter"]])) if rois["white_matter"].any() else float("nan")
  norm = data / wm
  csf_fraction = np.clip((GM_LEVEL - norm[rois["ventricles"]]) / (GM_LEVEL - CSF_LEVEL), 0.0, 1.0)
  return dict(ventricle_ml=float(csf_fraction.sum() * voxel_ml),
              hippocampus_intensity=float(norm[rois["hippocampus"]].mean()),
              white_matter_level=wm,
              brain_ml=float(rois["brain"].sum() * voxel_ml))


def load_ras(path: str) -> tuple[np.ndarray, np.ndarray]:
  """A written file as a float32 RAS+ array and its affine (for measuring)."""
  img = nib.as_closest_canonical(nib.load(path))
  return np.asarray(img.dataobj, dtype=np.float32), img.affine
