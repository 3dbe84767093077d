"""The anatomy the embedded cohort is simulated from: nilearn's MNI ICBM152 2009 template (T1,
grey / white-matter maps, 1 mm), its lateral ventricles and hippocampal axes, the template on an
output grid, and the smooth random fields the per-subject deformations are drawn from."""

from __future__ import annotations

import dataclasses
import functools
import os

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

# Output field of view (MNI mm): the template brain's bounding box (x -72..72, y -107..73,
# z -72..82) grown so that large heads, rotations and deformations stay inside.
FOV_CENTRE_MM = (0.0, -17.0, 5.0)
FOV_SIZE_MM = (176.0, 216.0, 188.0)

LATERAL_VENTRICLE_SEEDS_MM = ((-14.0, -15.0, 15.0), (14.0, -15.0, 15.0))
HIPPOCAMPUS_AXES_MM = (((-27.0, -10.0, -19.0), (-23.0, -38.0, 0.0)),
                       ((27.0, -10.0, -19.0), (23.0, -38.0, 0.0)))
HIPPOCAMPUS_SIGMA_MM = 5.0

# Tissue levels of the normalised template T1 (deep white matter = 1).
CSF_LEVEL, GM_LEVEL = 0.30, 0.76

# Tissue levels of the normalised template T1 (deep white matter = 1).
CSF_LEVEL, GM_LEVEL = 0.30, 0.76

TEMPLATE_FILE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
CTRL_MM = 30.0                           # control-point spacing of smooth random fields


def _template_dir() -> str:
  import nilearn
  return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data")


@dataclasses.dataclass(frozen=True)
class Template1mm:
  origin: np.ndarray       # world mm of voxel (0, 0, 0); axes are RAS, 1 mm
  t1: np.ndarray           # float32, deep white matter = 1, background 0
  gm: np.ndarray
  wm: np.ndarray
  brain: np.ndarray        # bool
  ventricles: np.ndarray   # bool, lateral ventricles
  ventricle_distance: np.ndarray  # float32 mm, signed distance to their surface (< 0 inside)


@functools.lru_cache(maxsize=1)
def template_1mm() -> Template1mm:
  arrays, affine = {}, None
  for name in ("t1", "gm", "wm"):
    img = nib.as_closest_canonical(nib.load(os.path.join(_template_dir(), TEMPLATE_FILE.format(name))))
    if affine is not None and not np.allclose(img.affine, affine):
      raise RuntimeError("nilearn's MNI152 T1/GM/WM maps are not on one grid")
    affine = img.affine
    arrays[name] = np.asarray(img.dataobj, dtype=np.float32)
  if not np.allclose(affine[:3, :3], np.eye(3)):
    raise RuntimeError(f"expected a 1 mm RAS MNI152 template, got affine {affine.tolist()}")
  gm, wm = arrays["gm"] / 255.0, arrays["wm"] / 255.0
  t1 = arrays["t1"] / np.median(arrays["t1"][wm > 0.95])
  brain = ndi.binary_fill_holes(t1 > 0.05)
  origin = affine[:3, 3].astype(np.float64)
  # Lateral ventricles: CSF-dark voxels well inside the brain in a central box (outside it the
  # ventricles connect to cisterns and sulci), the components at the seeds.
  mm = [origin[a] + np.arange(n) for a, n in enumerate(t1.shape)]
  box = ((np.abs(mm[0]) < 35)[:, None, None] & ((mm[1] > -60) & (mm[1] < 40))[None, :, None]
         & ((mm[2] > -30) & (mm[2] < 45))[None, None, :])
  # A strict threshold keeps them apart from the third ventricle; one constrained dilation then
  # takes back their partial-volume rim.
  csf = (t1 < 0.45) & ndi.binary_erosion(brain, iterations=6) & box
  labels, _ = ndi.label(csf)
  ventricles = np.zeros_like(csf)
  for seed in LATERAL_VENTRICLE_SEEDS_MM:
    c = np.round(np.asarray(seed) - origin).astype(int)
    window = labels[c[0] - 12:c[0] + 13, c[1] - 12:c[1] + 13, c[2] - 12:c[2] + 13]
    ids = np.bincount(window.ravel())
    ids[0] = 0
    if ids.max() == 0:
      raise RuntimeError(f"no ventricle found near MNI {seed}")
    ventricles |= labels == ids.argmax()
  ventricles |= ndi.binary_dilation(ventricles) & (t1 < 0.5 * (CSF_LEVEL + GM_LEVEL))
  distance = (ndi.distance_transform_edt(~ventricles) - ndi.distance_transform_edt(ventricles)).astype(np.float32)
  return Template1mm(origin, t1, gm.astype(np.float32), wm.astype(np.float32), brain, ventricles,
                      np.clip(distance, -12.0, 24.0))


def hippocampus_distance(points_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Distance (mm) to the nearer hippocampal axis and the vector from it, for (3, N) points."""
  best_d, best_v = None, None
  for a, b in HIPPOCAMPUS_AXES_MM:
    a, b = np.asarray(a)[:, None], np.asarray(b)[:, None]
    ab = b - a
    tau = np.clip(((points_mm - a) * ab).sum(0) / (ab * ab).sum(), 0.0, 1.0)
    v = points_mm - (a + tau * ab)
    d = np.sqrt((v * v).sum(0))
    if best_d is None:
      best_d, best_v = d, v
    else:
      closer = d < best_d
      best_d = np.where(closer, d, best_d)
      best_v = np.where(closer, v, best_v)
  return best_d, best_v


def output_grid(spacing_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
  """Shape and RAS affine of the files written at `spacing_mm` (one fixed MNI field of view)."""
  s = float(spacing_mm)
  shape = tuple(int(np.ceil(size / s)) for size in FOV_SIZE_MM)
  # Whole-mm origin: at 1 mm the grid then coincides with the template's voxels (no blur).
  origin = np.floor(np.asarray(FOV_CENTRE_MM) - (np.asarray(shape) - 1) / 2.0 * s)
  affine = np.diag([s, s, s, 1.0])
  affine[:3, 3] = origin
  return shape, affine


@dataclasses.dataclass(frozen=True)
class Template:
  """The template on the output grid: every per-subject sampling reads these arrays."""

  spacing: float
  shape: tuple[int, int, int]
  affine: np.ndarray
  tissue: np.ndarray        # (5, *shape): T1, GM, hippocampal weight x GM, soft brain mask,
                            # signed distance (mm) to the lateral ventricles
  support: np.ndarray       # bool: the brain dilated 6 mm; voxels mapping elsewhere stay 0
  atrophy_zone: np.ndarray  # bool: where the contraction field is not negligible
  atrophy: np.ndarray       # (3, *shape) mm: hippocampal contraction field (samples are pulled
                            # away from the hippocampal axes, so the structure shrinks)

  def axes_mm(self) -> list[np.ndarray]:
    return [self.affine[a, 3] + self.spacing * np.arange(n) for a, n in enumerate(self.shape)]


def _resample_1mm(volume: np.ndarray, idx: np.ndarray, spacing: float) -> np.ndarray:
  """Samples a 1 mm template array at template voxel coordinates `idx` (3, *shape),
  anti-aliased for coarser spacings."""
  if spacing > 1.0:
    volume = ndi.gaussian_filter(volume, np.sqrt(spacing ** 2 - 1.0) / 2.355, mode="constant")
  return ndi.map_coordinates(volume, idx, order=1, mode="constant", cval=0.0).astype(np.float32)


@functools.lru_cache(maxsize=2)
def template(spacing_mm: float) -> Template:
  t = template_1mm()
  shape, affine = output_grid(spacing_mm)
  s = float(spacing_mm)
  axes = [affine[a, 3] + s * np.arange(n) for a, n in enumerate(shape)]
  idx = np.stack(np.meshgrid(*[(ax - o).astype(np.float32) for ax, o in zip(axes, t.origin)], indexing="ij"))
  t1 = _resample_1mm(t.t1, idx, s)
  gm = _resample_1mm(t.gm, idx, s)
  brain = _resample_1mm(ndi.binary_dilation(t.brain).astype(np.float32), idx, s)
  vent_dist = _resample_1mm(t.ventricle_distance, idx, s)
  del idx
  # Hippocampal contraction: samples are pulled away from the axes (the structure shrinks).
  hippo_field = np.zeros((3,) + shape, np.float32)
  weight = np.zeros(shape, np.float32)
  for i, x in enumerate(axes[0]):   # slab by slab: bounded memory at 1 mm
    yz = np.stack(np.meshgrid([x], axes[1], axes[2], indexing="ij")).reshape(3, -1)
    dist, vec = hippocampus_distance(yz)
    w = np.exp(-0.5 * (dist / HIPPOCAMPUS_SIGMA_MM) ** 2)
    weight[i] = w.reshape(shape[1:])
    hippo_field[:, i] = (vec * w).reshape((3,) + shape[1:])
  support = ndi.binary_dilation(brain > 0.05, iterations=max(1, int(np.ceil(6.0 / s))))
  atrophy_zone = ndi.binary_dilation(np.abs(hippo_field).sum(0) > 0.15, iterations=1)
  tissue = np.stack([t1, gm, weight * gm, brain, vent_dist])
  return Template(s, shape, affine, tissue, support, atrophy_zone, hippo_field)


@functools.lru_cache(maxsize=1)
def lesion_sites() -> np.ndarray:
  """(N, 3) MNI mm candidate lesion centres: cerebral tissue >= 22 mm inside the brain, 2 mm
  apart, fixed whatever the output spacing (so a subject's lesion does not move with it)."""
  t = template_1mm()
  sub = (slice(None, None, 2),) * 3
  brain = t.brain[sub]
  depth = ndi.distance_transform_edt(brain) * 2.0
  tissue = (t.gm[sub] + t.wm[sub] > 0.8) & ~t.ventricles[sub]
  ijk = np.argwhere((depth >= 22.0) & tissue)
  mm = t.origin + 2.0 * ijk
  return mm[mm[:, 2] > -20.0]


# Smooth random fields.

def field_basis(axes_mm: list[np.ndarray]) -> list[np.ndarray]:
  """Per-axis Gaussian bases on control points every CTRL_MM across the fixed field of view,
  row-normalised so a field with N(0, 1) coefficients has unit variance everywhere."""
  bases = []
  for a, ax in enumerate(axes_mm):
    half = FOV_SIZE_MM[a] / 2.0 + CTRL_MM
    ctrl = FOV_CENTRE_MM[a] + np.arange(-half, half + 1e-6, CTRL_MM)
    b = np.exp(-0.5 * ((ax[:, None] - ctrl[None, :]) / (0.6 * CTRL_MM)) ** 2)
    bases.append((b / np.sqrt((b * b).sum(1, keepdims=True))).astype(np.float32))
  return bases


def ctrl_shape() -> tuple[int, int, int]:
  return tuple(len(np.arange(-(f / 2.0 + CTRL_MM), f / 2.0 + CTRL_MM + 1e-6, CTRL_MM)) for f in FOV_SIZE_MM)


def smooth_field(coef: np.ndarray, bases: list[np.ndarray]) -> np.ndarray:
  """Smooth field on the grid from control coefficients: a separable tensor product, contracted
  smallest-first. Plain einsum, not BLAS: multithreaded BLAS on a busy machine is 10x slower."""
  bx, by, bz = bases
  small = np.einsum("ijk,zk->ijz", coef.astype(np.float32), bz)
  small = np.einsum("ijz,yj->iyz", small, by)
  return np.einsum("xi,iyz->xyz", bx, small)


def trilinear(volumes: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """Linear interpolation of all channels of `volumes` (C, X, Y, Z) at voxel coordinates
  `idx` (3, K) -> (C, K). One set of corner indices and weights serves every channel, and 1-D
  gathers per channel are several times faster than map_coordinates. Points must lie inside
  the grid (callers sample the brain's support, far from the edges); they are clamped otherwise."""
  shape = np.asarray(volumes.shape[1:])
  flat = volumes.reshape(volumes.shape[0], -1)
  base = np.clip(np.floor(idx), 0, (shape - 2)[:, None]).astype(np.int64)
  frac = np.clip(idx - base, 0.0, 1.0).astype(np.float32)
  stride = np.array([shape[1] * shape[2], shape[2], 1])
  start = (base * stride[:, None]).sum(0)
  corners = []
  for dx in (0, 1):
    wx = frac[0] if dx else 1.0 - frac[0]
    for dy in (0, 1):
      wxy = wx * (frac[1] if dy else 1.0 - frac[1])
      for dz in (0, 1):
        corners.append((dx * stride[0] + dy * stride[1] + dz, wxy * (frac[2] if dz else 1.0 - frac[2])))
  out = np.zeros((flat.shape[0], idx.shape[1]), np.float32)
  for offset, weight in corners:
    where = start + offset
    for c in range(flat.shape[0]):
      value = np.take(flat[c], where)
      value *= weight
      out[c] += value
  return out
