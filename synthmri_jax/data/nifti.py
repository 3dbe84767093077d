"""NIfTI in and out: any orientation, dtype, endianness and scaling in; RAS+, isotropic,
brain-centred, normalised arrays out; clean NIfTI files written atomically.

Everything geometric goes through world (mm) coordinates, so an image and its mask, or the
sequences of one subject, land on the same voxels whatever grid each was stored on.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from synthmri_jax.utils.errors import UserInputError
from synthmri_jax.utils import io

NORMALIZATIONS = ("percentile", "zscore")


class VolumeError(UserInputError, ValueError):
  """A file that cannot serve as a 3D volume; the message names the file and the problem."""

  def __init__(self, path: str, problem: str):
    super().__init__(path, problem)   # both in args, so the error survives pickling from a worker

  @property
  def path(self) -> str:
    return self.args[0]

  @property
  def problem(self) -> str:
    return self.args[1]

  def __str__(self) -> str:
    return f"{self.path}: {self.problem}"


@dataclasses.dataclass(frozen=True)
class Grid:
  """A target voxel grid: shape and voxel -> world (RAS+ mm) affine."""

  shape: tuple[int, int, int]
  affine: np.ndarray

  @property
  def spacing(self) -> np.ndarray:
    return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))


@dataclasses.dataclass(frozen=True)
class Preprocessed:
  image: np.ndarray          # float32 (X, Y, Z, C)
  mask: np.ndarray | None    # uint8 (X, Y, Z)
  affine: np.ndarray         # the subject's target grid (brain-centred, RAS+)


# ------------------------------------------------------------------------------ loading

def load_header(path: str) -> tuple[tuple[int, ...], np.ndarray]:
  """Shape (trailing singleton dims past the 3rd dropped) and raw voxel->world affine,
  without reading voxels: what grid comparisons between an image and its mask need."""
  img = _open(path)
  return _squeezed_shape(img.shape, path), np.asarray(img.affine, dtype=np.float64)


def load_volume(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a 3D volume as float32 in its stored voxel order (scl_slope/inter applied, any
  dtype or endianness). Returns (data, voxel->world affine)."""
  img = _open(path)
  shape = _squeezed_shape(img.shape, path)
  try:
    data = img.get_fdata(dtype=np.float32).reshape(shape)
  except Exception as e:  # truncated gzip, short file, bad dtype: nibabel raises many kinds
    raise VolumeError(path, f"unreadable or corrupt voxel data ({type(e).__name__}: {e})") from None
  return data, np.asarray(img.affine, dtype=np.float64)


def load_canonical(path: str) -> tuple[np.ndarray, np.ndarray]:
  """load_volume, reoriented to the closest RAS+ voxel order (nibabel's as_closest_canonical),
  so that LAS, LPI, ... files of one volume give the same array."""
  data, affine = load_volume(path)
  canon = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
  return np.asarray(canon.dataobj, dtype=np.float32), np.asarray(canon.affine, dtype=np.float64)


def _open(path: str):
  if not os.path.isfile(path):
    raise VolumeError(path, "file not found")
  try:
    return nib.load(path)
  except Exception as e:
    raise VolumeError(path, f"unreadable or corrupt image file ({type(e).__name__}: {e})") from None


def _squeezed_shape(shape: Sequence[int], path: str) -> tuple[int, int, int]:
  shape = tuple(int(s) for s in shape)
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) > 3:
    raise VolumeError(path, f"{len(shape)}D image of shape {shape}; a single 3D volume is needed")
  if len(shape) < 3 or min(shape) < 2:
    raise VolumeError(path, f"2D image of shape {shape}; a 3D volume is needed")
  return shape


# ------------------------------------------------------------------------------ foreground

def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
  """Otsu's threshold (maximal between-class variance) of a 1D sample."""
  hist, edges = np.histogram(values, bins=bins)
  centres = (edges[:-1] + edges[1:]) / 2
  hist = hist.astype(np.float64)
  w0 = np.cumsum(hist)
  w1 = w0[-1] - w0
  s0 = np.cumsum(hist * centres)
  with np.errstate(divide="ignore", invalid="ignore"):
    m0 = s0 / w0
    m1 = (s0[-1] - s0) / w1
    between = w0 * w1 * (m0 - m1) ** 2
  between[~np.isfinite(between)] = -1
  return float(edges[int(np.argmax(between)) + 1])


def foreground_mask(data: np.ndarray, clean: bool = True) -> np.ndarray:
  """Head/brain voxels: Otsu above background. `clean` keeps the largest connected component
  and fills its holes, so noise specks do not move the bounding box and dark ventricles
  still count for the intensity statistics. Empty for a volume without contrast."""
  finite = np.isfinite(data)
  values = data[finite]
  if values.size == 0 or values.max() <= values.min():
    return np.zeros(data.shape, dtype=bool)
  # Bright outliers (vessels, fat, artefacts) would otherwise pull the threshold up.
  lo, hi = np.percentile(values, (0.0, 99.9))
  if hi <= lo:
    hi = values.max()
  t = otsu_threshold(np.clip(values, lo, hi))
  fg = finite & (data > t)
  if not clean or not fg.any():
    return fg
  labels, n = ndimage.label(fg)
  if n > 1:
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    fg = labels == int(np.argmax(sizes))
  return ndimage.binary_fill_holes(fg)


def min_foreground_voxels(shape: Sequence[int]) -> int:
  """Below this many voxels a foreground is 'empty' (a speck, not an anatomy)."""
  return max(8, int(1e-4 * int(np.prod(shape))))


# ------------------------------------------------------------------------------ geometry

def centred_affine(shape: Sequence[int], spacing_mm: float, centre_mm: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
  """RAS+ affine of an isotropic grid whose centre voxel sits at `centre_mm`."""
  a = np.diag([float(spacing_mm)] * 3 + [1.0])
  a[:3, 3] = np.asarray(centre_mm, dtype=np.float64) - float(spacing_mm) * (np.asarray(shape, dtype=np.float64) - 1) / 2
  return a


def brain_grid(data: np.ndarray, affine: np.ndarray, shape: Sequence[int], spacing_mm: float,
               path: str = "<array>") -> Grid:
  """Target grid of `shape` voxels at `spacing_mm`, centred on the foreground bounding box.

  The origin is snapped onto the source voxel lattice, so that resampling at the source's own
  spacing copies voxels instead of interpolating between them.
  """
  fg = foreground_mask(data)
  if fg.sum() < min_foreground_voxels(data.shape):
    raise VolumeError(path, "empty foreground (no brain/head found to centre the grid on)")
  box = ndimage.find_objects(fg.astype(np.int8))[0]
  centre_vox = np.array([(s.start + s.stop - 1) / 2 for s in box] + [1.0])
  centre_mm = (affine @ centre_vox)[:3]
  target = centred_affine(shape, spacing_mm, centre_mm)
  origin_vox = np.linalg.solve(affine, np.append(target[:3, 3], 1.0))
  target[:3, 3] = (affine @ np.append(np.round(origin_vox[:3]), 1.0))[:3]
  return Grid(tuple(int(s) for s in shape), target)


def resample(data: np.ndarray, affine: np.ndarray, grid: Grid, order: int = 1, antialias: bool = True) -> np.ndarray:
  """Resamples `data` (voxel->world `affine`) onto `grid`; zero outside the source's field of
  view, which is what crops and pads. order=1 (linear) for images, 0 (nearest) for label maps.

  When downsampling an image, a Gaussian pre-filter (sigma = (factor - 1) / 2 source voxels, the
  scikit-image convention) keeps the result from aliasing; label maps are never smoothed.
  """
  to_source = np.linalg.solve(affine, grid.affine)   # target voxel -> source voxel
  if order > 0 and antialias:
    src_spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    sigma = np.maximum(0.0, (grid.spacing.max() / src_spacing - 1) / 2)
    if np.any(sigma > 0):
      data = ndimage.gaussian_filter(data.astype(np.float32, copy=False), sigma, mode="nearest")
  return ndimage.affine_transform(data, to_source[:3, :3], offset=to_source[:3, 3], output_shape=grid.shape,
                                  order=order, mode="constant", cval=0, prefilter=False)


# ------------------------------------------------------------------------------ intensities

def normalize(data: np.ndarray, foreground: np.ndarray, method: str = "percentile",
              clip_percentiles: Sequence[float] = (0.5, 99.5), path: str = "<array>") -> np.ndarray:
  """Robust intensity normalisation from foreground statistics only (the background's share
  of the volume varies with head size and field of view, so it must not set the scale).

  percentile: clip to the foreground's [p_low, p_high] and map that range to [0, 1];
  zscore: clip the same way, then subtract the foreground mean and divide by its std.
  """
  if method not in NORMALIZATIONS:
    raise ValueError(f"unknown normalization {method!r}; choose from {NORMALIZATIONS}")
  values = data[foreground]
  if values.size < 2:
    raise VolumeError(path, "empty foreground after resampling; nothing to normalise")
  lo, hi = np.percentile(values, tuple(clip_percentiles))
  if not hi > lo:
    raise VolumeError(path, f"no intensity contrast inside the foreground (p{clip_percentiles[0]} = "
                      f"p{clip_percentiles[1]} = {lo:g})")
  clipped = np.clip(data, lo, hi)
  if method == "percentile":
    return ((clipped - lo) / (hi - lo)).astype(np.float32)
  fg = clipped[foreground]
  return ((clipped - fg.mean()) / max(float(fg.std()), 1e-8)).astype(np.float32)


# ------------------------------------------------------------------------------ one subject

def preprocess(paths: Sequence[str], mask_path: str | None, *, shape: Sequence[int], spacing_mm: float,
               normalization: str = "percentile", clip_percentiles: Sequence[float] = (0.5, 99.5)) -> Preprocessed:
  """Sequences of one scan -> channels on one brain-centred grid, plus its mask.

  The grid is centred on the FIRST sequence's brain, and every channel and the mask are
  resampled onto that same grid through world coordinates, so they stay voxel-aligned.
  """
  if not paths:
    raise ValueError("preprocess needs at least one image path")
  first, first_affine = load_canonical(paths[0])
  grid = brain_grid(first, first_affine, shape, spacing_mm, path=paths[0])
  channels = []
  for i, path in enumerate(paths):
    data, affine = (first, first_affine) if i == 0 else load_canonical(path)
    on_grid = resample(data, affine, grid, order=1)
    fg = foreground_mask(on_grid)
    channels.append(normalize(on_grid, fg, normalization, clip_percentiles, path=path))
  mask = None
  if mask_path:
    labels, mask_affine = load_canonical(mask_path)
    mask = resample(np.rint(labels).astype(np.uint8), mask_affine, grid, order=0)
  return Preprocessed(image=np.stack(channels, axis=-1), mask=mask, affine=grid.affine)


def on_scale(data: np.ndarray, normalization: str) -> np.ndarray:
  """Values clipped to the range `normalize` produces (percentile: [0, 1]; zscore: unbounded), for
  volumes made in the prepared space by other means (a decoder, a generator)."""
  return np.clip(data, 0.0, 1.0) if normalization == "percentile" else data


def read_prepared_space(paths: Sequence[str], mask_path: str | None, *, shape: Sequence[int], spacing_mm: float,
                        normalization: str = "percentile") -> Preprocessed:
  """Volumes already in a prepared cohort's space -> the same arrays `preprocess` would have cached.

  For a generator's output, which is written on the study grid and intensity scale: running
  `preprocess` again would re-centre it and normalise it a second time, and percentile
  normalisation is not idempotent (a prepared scan's foreground p0.5 is ~0.3, not 0), so the scans
  would reach the classifier with a contrast no real scan has. Only the range is enforced
  (percentile: [0, 1], as `normalize` clips); a file off the grid is an error naming it.
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"unknown normalization {normalization!r}; choose from {NORMALIZATIONS}")
  shape = tuple(int(s) for s in shape)
  channels, affine = [], None
  for path in paths:
    data, affine = load_canonical(path)
    spacing = Grid(data.shape, affine).spacing
    if data.shape != shape or not np.allclose(spacing, spacing_mm, atol=1e-3):
      raise VolumeError(path, f"declared in the prepared space, but its grid is {data.shape} at "
                        f"{np.round(spacing, 3).tolist()} mm, not {shape} at {spacing_mm:g} mm")
    if not np.isfinite(data).all():
      raise VolumeError(path, "non-finite voxel values")
    channels.append(on_scale(data, normalization))
  mask = None
  if mask_path:
    labels, _ = load_canonical(mask_path)
    if labels.shape != shape:
      raise VolumeError(mask_path, f"mask grid {labels.shape} differs from its image's {shape}")
    mask = np.rint(labels).astype(np.uint8)
  return Preprocessed(image=np.stack(channels, axis=-1).astype(np.float32), mask=mask, affine=affine)


# ------------------------------------------------------------------------------ writing

def clean_image(data: np.ndarray, affine: np.ndarray, xform_code: str = "scanner") -> nib.Nifti1Image:
  """A Nifti1Image built on a fresh header: nothing from any source header (descrip,
  aux_file, db_name, intent_name, file names, ids) can ride along."""
  data = np.asarray(data)
  if data.dtype == bool:
    data = data.astype(np.uint8)
  header = nib.Nifti1Header()
  header.set_data_dtype(data.dtype)
  img = nib.Nifti1Image(data, affine, header=header)
  img.set_qform(affine, code=xform_code)
  img.set_sform(affine, code=xform_code)
  img.header.set_xyzt_units(xyz="mm", t="sec")
  return img


def write_nifti(path: str, data: np.ndarray, affine: np.ndarray, xform_code: str = "scanner") -> None:
  """Writes `data` (3D, or 4D with channels last) with `affine` and a clean header, atomically:
  a temporary name in the same folder, renamed onto `path` only once fully written.
  nibabel's gzip writer stores neither a file name nor a time stamp in the .gz header."""
  if path.endswith(".nii.gz"):
    suffix = ".nii.gz"
  elif path.endswith(".nii"):
    suffix = ".nii"
  else:
    raise ValueError(f"{path}: write_nifti writes .nii or .nii.gz files")
  img = clean_image(data, affine, xform_code)
  with io.atomic_path(path, suffix=suffix) as tmp:
    nib.save(img, tmp)
