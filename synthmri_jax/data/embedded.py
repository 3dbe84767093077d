"""The embedded default cohort: a simulated, labelled T1w (optionally + T2w, FLAIR) cohort built from real anatomy.

Why it exists: the pipeline must run end to end with no private data, and its utility and
privacy numbers only mean something if the label is carried by anatomy that a classifier has to
find, mixed with the nuisance variation real cohorts have. Every subject is the MNI ICBM152 2009
template shipped in nilearn's wheel (T1 plus grey/white-matter maps, 1 mm, skull-stripped) put
through a subject-specific simulation, written as NIfTI files plus a BIDS-like participants.tsv,
and then read back through the *same* ingest path as a user's cohort.

The simulation (template space is MNI mm; `decades = (age - 50) / 10`; `ad` is 1 for AD, 0 for CN):
  geometry    head size by sex (M 1.00, F 0.95) with 3 % individual and 1.2 % per-axis variation,
              rotation (sd 2 deg), translation (sd 3 mm), smooth random displacement (sd 2 mm,
              ~30 mm wavelength).
  ventricles  the lateral ventricles (the CSF-dark components inside the brain near the centre,
              16.7 mL in the template) grow: periventricular tissue within v mm of their surface
              (unevenly, by a smooth random factor 0.3-1.7; the septum is spared) turns to CSF,
              v = (0.25 + AGE_VENTRICLE_MM decades^1.5 + AD_VENTRICLE_MM ad ad_effect) exp(N(0, 0.25^2)).
  grey matter cortical thinning: GM is darkened towards CSF by 0.04 decades + 0.02 ad ad_effect
              + N(0, 0.015^2), modulated by a smooth random field (atrophy is patchy).
  hippocampi  medial-temporal loss around two capsules (MNI (+-27,-10,-19) -> (+-23,-38,0), sigma
              5 mm): a local contraction and a GM darkening, both growing with age and, for AD, by
              AD_HIPPO_SHRINK and AD_HIPPO_LOSS times ad_effect.
  MR physics  contrast gamma, smooth multiplicative bias field (sd 8 %), global gain, Rician
              noise (2-4 % of white matter); background exactly 0, as in skull-stripped cohorts.
  lesions     (cfg.lesions) a tumour-like irregular ellipsoid (equivalent radius 8-20 mm) in the
              cerebrum of a cfg.lesion_fraction share of subjects: dark necrotic core, bright
              enhancing rim, mildly hyperintense oedema halo and a mass effect. The mask (uint8,
              1 = lesion) is the whole tumour (core + rim + oedema, like BraTS "WT"); subjects
              without a lesion get an all-zero mask so every row has a mask_path.
  sequences   (data.sequences, any of T1w, T2w, FLAIR) every sequence of a subject is drawn from the
              same anatomy after every change above (geometry, ventricles, grey-matter loss,
              hippocampi): the T1 intensity of a voxel is a tissue mix, and SEQUENCE_CONTRAST maps it
              piecewise-linearly through the sequence's background / CSF / GM / WM levels (CSF dark in
              T1w, bright in T2w, suppressed in FLAIR; GM brighter than WM in T2w and FLAIR). Lesions
              are then drawn per sequence with its own core / rim / oedema levels (LESION_CONTRAST: the
              oedema bright in T2w and FLAIR). Gamma, bias field, gain and noise level are the
              subject's own in every sequence; each sequence's noise realisation is its own.
  storage     (cfg.vary_storage) ~30 % of files are stored LAS or LPI instead of RAS and ~half
              as int16 with scl_slope instead of float32, to exercise the ingest path.

Determinism: labels come from one seeded permutation (exactly round(n * ad_fraction) AD); every
other draw of subject i comes from SeedSequence(seed, spawn_key=(1, i)), split into streams for
anatomy, lesion and noise, so a subject's draws never depend on the others, on cfg.lesions, on the
spacing, on the other sequences written, or on ad_effect (the same seed with ad_effect=0 gives the
same subjects without the AD change: the tests use that pairing).

Calibration (how well anatomy separates the labels, measured with ROI and voxel proxies; the
measured effect sizes and build times): docs/EMBEDDED_COHORT.md.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from synthmri_jax import workdir as workdir_lib
from synthmri_jax.data.mr_contrast import LESION_CONTRAST, SEQUENCE_CONTRAST, sequence_contrast
from synthmri_jax.data.mni_template import (CSF_LEVEL, FOV_CENTRE_MM, GM_LEVEL, ctrl_shape, field_basis, lesion_sites,
                                            smooth_field, template, trilinear)
from synthmri_jax.utils import io

# Bump when the simulation changes: it is part of the completeness hash, so old builds are redone.
GENERATOR_VERSION = 1
LABELS = ("CN", "AD")

# Effect sizes. AD terms are multiplied by cfg.ad_effect; 1.0 gives the calibration above.
AGE_VENTRICLE_MM = 0.33       # ventricle surface advance (mm) per decade^1.5 past 50
AD_VENTRICLE_MM = 1.3         # extra advance in AD
SD_VENTRICLE = 0.25           # individual variation (log scale)
AGE_CORTEX_LOSS = 0.04        # cortical GM darkening per decade
AD_CORTEX_LOSS = 0.02
AGE_HIPPO_SHRINK, AD_HIPPO_SHRINK, SD_HIPPO_SHRINK = 0.02, 0.30, 0.03   # contraction strength
AGE_HIPPO_LOSS, AD_HIPPO_LOSS, SD_HIPPO_LOSS = 0.03, 0.60, 0.05          # GM darkening

_MARKER = ".embedded_complete.json"      # written last: the build is complete
_MANIFEST = ".embedded_build.json"       # written first: this directory is ours, and for which cfg
_SUBJECT_DIR = re.compile(r"^sub-\d{4,}$")



# ------------------------------------------------------------------------------ config

def _opt(cfg, name: str, default: Any) -> Any:
  try:
    value = cfg[name] if isinstance(cfg, dict) else getattr(cfg, name)
  except (AttributeError, KeyError):
    return default
  return default if value is None else value


@dataclasses.dataclass(frozen=True)
class CohortSpec:
  """config.data.embedded, validated, with defaults for fields older configs lack."""

  num_subjects: int
  spacing_mm: float
  ad_fraction: float
  ad_effect: float
  age_range: tuple[float, float]
  lesions: bool
  lesion_fraction: float
  vary_storage: bool
  seed: int
  sequences: tuple[str, ...] = ("T1w",)

  @classmethod
  def of(cls, cfg, sequences=("T1w",)) -> "CohortSpec":
    """`cfg` is config.data.embedded; `sequences` the sequences to write (config.data.sequences)."""
    lo, hi = (float(a) for a in _opt(cfg, "age_range", (55.0, 90.0)))
    spec = cls(num_subjects=int(_opt(cfg, "num_subjects", 160)),
               spacing_mm=float(_opt(cfg, "spacing_mm", 2.0)),
               ad_fraction=float(_opt(cfg, "ad_fraction", 0.5)),
               ad_effect=float(_opt(cfg, "ad_effect", 1.0)),
               age_range=(lo, hi),
               lesions=bool(_opt(cfg, "lesions", False)),
               lesion_fraction=float(_opt(cfg, "lesion_fraction", 1.0)),
               vary_storage=bool(_opt(cfg, "vary_storage", True)),
               seed=int(_opt(cfg, "seed", 0)),
               sequences=tuple(str(q) for q in sequences))
    problems = []
    unknown = [q for q in spec.sequences if q not in SEQUENCE_CONTRAST]
    if unknown or not spec.sequences or len(set(spec.sequences)) != len(spec.sequences):
      problems.append(f"data.sequences {list(spec.sequences)}: the embedded cohort simulates distinct "
                      f"sequences among {sorted(SEQUENCE_CONTRAST)}")
    if spec.num_subjects < 1:
      problems.append("num_subjects must be >= 1")
    if not 0.5 <= spec.spacing_mm <= 8.0:
      problems.append("spacing_mm must be in [0.5, 8]")
    if not 0.0 <= spec.ad_fraction <= 1.0:
      problems.append("ad_fraction must be in [0, 1]")
    if spec.ad_effect < 0:
      problems.append("ad_effect must be >= 0")
    if not 18.0 <= lo <= hi <= 100.0:
      problems.append("age_range must be (lo, hi) with 18 <= lo <= hi <= 100")
    if not 0.0 <= spec.lesion_fraction <= 1.0:
      problems.append("lesion_fraction must be in [0, 1]")
    if problems:
      raise ValueError("data.embedded: " + "; ".join(problems))
    return spec

  def hash(self) -> str:
    fields = dataclasses.asdict(self)
    if self.sequences == ("T1w",):
      del fields["sequences"]      # the T1w-only cohort keeps the key it had before sequences existed
    return workdir_lib.fingerprint(dict(fields, generator=GENERATOR_VERSION), 16)


# ------------------------------------------------------------------------------ subjects

@dataclasses.dataclass(frozen=True)
class Subject:
  """One simulated subject's draws (everything but the noise realisation)."""

  index: int
  participant_id: str
  label: str
  age: float
  sex: str
  scale: np.ndarray
  rotation: np.ndarray          # radians about x, y, z
  translation: np.ndarray       # mm
  deform_coef: np.ndarray       # (3, *ctrl) mm
  bias_coef: np.ndarray         # (*ctrl)
  cortex_coef: np.ndarray       # (*ctrl): where cortical thinning is stronger
  ventricle_coef: np.ndarray    # (*ctrl): where the ventricles grow more
  ventricle_mm: float           # how far (mm) the ventricle surface advances into tissue
  cortex_loss: float
  hippo_shrink: float
  hippo_loss: float
  gamma: float
  gain: float
  noise: float                  # Rician sigma relative to white matter
  orientation: str
  dtype: str
  lesion: dict | None


def _subject_streams(spec: CohortSpec, index: int) -> list[np.random.SeedSequence]:
  """Independent seed streams of subject `index`: anatomy, lesion, noise."""
  return np.random.SeedSequence(spec.seed, spawn_key=(1, index)).spawn(3)


def cohort_labels(spec: CohortSpec) -> list[str]:
  """Exactly round(n * ad_fraction) AD labels, placed by one seeded permutation."""
  n_ad = int(round(spec.num_subjects * spec.ad_fraction))
  rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(0,)))
  order = rng.permutation(spec.num_subjects)
  cn, ad = LABELS
  labels = np.array([cn] * spec.num_subjects, dtype=object)
  labels[order[:n_ad]] = ad
  return list(labels)


def _participant_id(index: int, n: int) -> str:
  return f"sub-{index + 1:0{max(4, len(str(n)))}d}"


def draw_subject(spec: CohortSpec, index: int, label: str) -> Subject:
  """All of subject `index`'s draws; the order of draws never depends on the label or options."""
  anat_ss, lesion_ss, _ = _subject_streams(spec, index)
  r = np.random.default_rng(anat_ss)
  sex = "F" if r.random() < 0.5 else "M"
  age = float(np.round(r.uniform(*spec.age_range), 1))
  scale = (0.95 if sex == "F" else 1.0) * np.exp(r.normal(0, 0.03) + r.normal(0, 0.012, 3))
  rotation = np.deg2rad(r.normal(0, 2.0, 3))
  translation = r.normal(0, 3.0, 3)
  ctrl = ctrl_shape()
  deform_coef = r.normal(0, 2.0, (3,) + ctrl)
  bias_coef = r.normal(0, 1.0, ctrl)
  cortex_coef = r.normal(0, 1.0, ctrl)
  ventricle_coef = r.normal(0, 1.0, ctrl)
  z = r.normal(0, 1.0, 4)
  gamma = float(np.exp(r.normal(0, 0.06)))
  gain = float(np.exp(r.normal(np.log(800.0), 0.3)))
  noise = float(r.uniform(0.02, 0.04))
  orientation = str(r.choice(["RAS", "RAS", "RAS", "RAS", "RAS", "RAS", "RAS", "LAS", "LAS", "LPI"]))
  dtype = "int16" if r.random() < 0.5 else "float32"
  if not spec.vary_storage:
    orientation, dtype = "RAS", "float32"

  ad = spec.ad_effect if label == "AD" else 0.0
  decades = max(age - 50.0, 0.0) / 10.0
  ventricle_mm = (0.25 + AGE_VENTRICLE_MM * decades ** 1.5 + AD_VENTRICLE_MM * ad) * np.exp(SD_VENTRICLE * z[0])
  cortex_loss = max(AGE_CORTEX_LOSS * decades + AD_CORTEX_LOSS * ad + 0.015 * z[1], 0.0)
  hippo_shrink = max(AGE_HIPPO_SHRINK * decades + AD_HIPPO_SHRINK * ad + SD_HIPPO_SHRINK * z[2], 0.0)
  hippo_loss = float(np.clip(AGE_HIPPO_LOSS * decades + AD_HIPPO_LOSS * ad + SD_HIPPO_LOSS * z[3], 0.0, 0.9))

  lesion = None
  rl = np.random.default_rng(lesion_ss)
  has_lesion = rl.random() < spec.lesion_fraction
  if spec.lesions and has_lesion:
    sites = lesion_sites()
    radius = float(rl.uniform(8.0, 20.0))
    axes = np.exp(rl.normal(0, 0.2, 3))
    q, _ = np.linalg.qr(rl.normal(size=(3, 3)))
    lesion = dict(centre=sites[rl.integers(len(sites))] + rl.uniform(-1, 1, 3),
                  radius=radius, axes=axes / np.cbrt(axes.prod()), rotation=q,
                  wobble=rl.normal(0, 1.0, (2, 3, 3)), mass_effect=float(rl.uniform(0.1, 0.35)))
  return Subject(index, _participant_id(index, spec.num_subjects), label, age, sex, scale, rotation,
                 translation, deform_coef, bias_coef, cortex_coef, ventricle_coef, float(ventricle_mm),
                 float(cortex_loss), float(hippo_shrink), hippo_loss, gamma, gain, noise,
                 orientation, dtype, lesion)


def _rotation_matrix(angles: np.ndarray) -> np.ndarray:
  cx, cy, cz = np.cos(angles)
  sx, sy, sz = np.sin(angles)
  rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
  ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
  rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
  return rz @ ry @ rx


def _lesion_profile(sub: Subject, q: np.ndarray) -> np.ndarray:
  """Normalised radius rho of template-space points q (3, N): < 1 tumour, 1..1.5 oedema."""
  les = sub.lesion
  local = les["rotation"].T @ (q - les["centre"][:, None])
  rho = np.sqrt(((local / (les["axes"][:, None] * les["radius"])) ** 2).sum(0))
  # Irregular outline: the radius wobbles with a smooth function of direction.
  direction = local / np.maximum(np.sqrt((local ** 2).sum(0)), 1e-6)
  wobble = np.zeros(q.shape[1])
  for i in range(3):
    for j in range(3):
      wobble += les["wobble"][0, i, j] * direction[i] * direction[j]
      wobble += les["wobble"][1, i, j] * direction[i] * direction[j] * direction[(i + j) % 3]
  return rho / (1.0 + 0.08 * wobble)


def simulate_subject(spec: CohortSpec, sub: Subject) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]:
  """({sequence: image float32} for spec.sequences, lesion mask uint8 or None, RAS affine) of one
  subject on the output grid."""
  tpl = template(spec.spacing_mm)
  shape, s = tpl.shape, np.float32(tpl.spacing)
  axes = [ax.astype(np.float32) for ax in tpl.axes_mm()]
  bases = field_basis(axes)
  centre = np.asarray(FOV_CENTRE_MM, np.float32)
  origin = tpl.affine[:3, 3].astype(np.float32)

  # Subject space -> template space: inverse similarity about the brain centre, plus a smooth
  # warp; built from the separable grid axes by broadcasting (no coordinate array per voxel).
  inv = (np.diag(1.0 / sub.scale) @ _rotation_matrix(sub.rotation).T).astype(np.float32)
  rel = [ax - c - t for ax, c, t in zip(axes, centre, sub.translation.astype(np.float32))]
  q0 = []
  for a in range(3):
    comp = smooth_field(sub.deform_coef[a], bases)
    comp += (inv[a, 0] * rel[0])[:, None, None]
    comp += (inv[a, 1] * rel[1])[None, :, None]
    comp += (inv[a, 2] * rel[2] + centre[a])[None, None, :]
    q0.append(comp.ravel())
  q0 = np.stack(q0)
  near = np.rint((q0 - origin[:, None]) / s).astype(np.int32)
  inside = np.all((near >= 0) & (near < np.asarray(shape, np.int32)[:, None]), axis=0)
  sel = np.flatnonzero(inside)
  sel = sel[tpl.support[tuple(near[:, sel])]]
  q0, near = q0[:, sel], near[:, sel]

  # Hippocampal contraction, in template space (local: only voxels in its zone are sampled).
  q = q0
  zone = np.flatnonzero(tpl.atrophy_zone[tuple(near)])
  if zone.size:
    q = q0.copy()
    q[:, zone] += sub.hippo_shrink * trilinear(tpl.atrophy, (q0[:, zone] - origin[:, None]) / s)
  q_anat = q
  if sub.lesion is not None:
    c = sub.lesion["centre"].astype(np.float32)[:, None]
    width = 1.5 * sub.lesion["radius"]
    near_lesion = np.flatnonzero(((q - c) ** 2).sum(0) < (4.0 * width) ** 2)
    ql = q[:, near_lesion]
    q_anat = q.copy()
    q_anat[:, near_lesion] = ql - sub.lesion["mass_effect"] * (ql - c) * np.exp(
        -0.5 * ((ql - c) ** 2).sum(0) / width ** 2)
  idx = (q_anat - origin[:, None]) / s

  t1, gm, hippo_gm, brain, vent_dist = trilinear(tpl.tissue, idx)
  # Grey-matter loss: GM darkens towards CSF (patchy in the cortex, focal in the hippocampi).
  patchy = np.clip(1.0 + 0.5 * smooth_field(sub.cortex_coef, bases).ravel()[sel], 0.0, 2.0)
  loss = sub.cortex_loss * patchy * gm + sub.hippo_loss * hippo_gm
  intensity = np.maximum(t1 - np.minimum(loss, 1.0) * (GM_LEVEL - CSF_LEVEL), 0.0)
  # Ventricle growth: periventricular tissue within `ventricle_mm` (unevenly) of the ventricle
  # surface turns to CSF; the edge is as soft as the grid's own partial volume.
  reach = sub.ventricle_mm * np.clip(1.0 + 0.35 * smooth_field(sub.ventricle_coef, bases).ravel()[sel], 0.3, 1.7)
  reach *= np.clip((np.abs(q_anat[0]) - 1.0) / 3.0, 0.0, 1.0)   # the septum (MNI x = 0) survives
  csf = 1.0 / (1.0 + np.exp((vent_dist - reach) / (0.4 * max(float(s), 1.0))))
  intensity -= csf * np.maximum(intensity - CSF_LEVEL, 0.0)

  mask, lesion = None, None
  if sub.lesion is not None:
    rho = _lesion_profile(sub, q[:, near_lesion])
    step = lambda x, w=0.08: 1.0 / (1.0 + np.exp(-x / w))
    core, tumour, whole = step(0.6 - rho), step(1.0 - rho), step(1.5 - rho)
    lesion = (near_lesion, whole, whole - tumour, tumour - core, core)   # where, whole, oedema, rim, core
    full = np.zeros(int(np.prod(shape)), np.uint8)
    full[sel[near_lesion]] = (rho < 1.5) & (brain[near_lesion] > 0.5)   # never outside the brain
    mask = full.reshape(shape)

  bias = np.exp(0.08 * smooth_field(sub.bias_coef, bases).ravel()[sel])
  sigma = sub.noise * sub.gain
  images = {}
  for seq in spec.sequences:
    level = sequence_contrast(intensity, seq)
    if lesion is not None:
      where, whole, oedema, rim, core = lesion
      weight, oedema_level, rim_level, core_level = LESION_CONTRAST[seq]
      base = level[where]
      level[where] = (base * (1.0 - whole) + oedema * (weight * base + oedema_level)
                      + rim * rim_level + core * core_level)
    signal = sub.gain * level ** sub.gamma * bias
    noise_rng = np.random.default_rng(_noise_stream(spec, sub.index, seq))
    n1 = noise_rng.standard_normal(signal.shape, dtype=np.float32)
    n2 = noise_rng.standard_normal(signal.shape, dtype=np.float32)
    magnitude = np.sqrt((signal + sigma * n1) ** 2 + (sigma * n2) ** 2) * (brain > 0.5)
    image = np.zeros(int(np.prod(shape)), np.float32)
    image[sel] = magnitude
    images[seq] = image.reshape(shape)
  return images, mask, tpl.affine.copy()


def _noise_stream(spec: CohortSpec, index: int, sequence: str) -> np.random.SeedSequence:
  """T1w: the subject's noise stream; any other sequence a stream of its own, fixed by its name
  (not by which other sequences are written)."""
  if sequence == "T1w":
    return _subject_streams(spec, index)[2]
  return np.random.SeedSequence(spec.seed, spawn_key=(1, index, 3 + list(SEQUENCE_CONTRAST).index(sequence)))


# ------------------------------------------------------------------------------ writing

def _clean_image(data: np.ndarray, affine: np.ndarray, dtype) -> nib.Nifti1Image:
  """A NIfTI image with a fresh header: only geometry, dtype and units, nothing descriptive."""
  header = nib.Nifti1Header()
  header.set_data_dtype(dtype)
  header.set_xyzt_units("mm", "sec")
  img = nib.Nifti1Image(data, affine, header)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  return img


def _write(data: np.ndarray, affine: np.ndarray, path: str, orientation: str, dtype) -> None:
  img = _clean_image(data, affine, dtype)
  if orientation != "RAS":
    ornt = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"),
                                           nib.orientations.axcodes2ornt(tuple(orientation)))
    img = img.as_reoriented(ornt)
    img = _clean_image(np.asanyarray(img.dataobj), img.affine, dtype)
  with io.atomic_path(path, suffix=".nii.gz") as tmp:
    nib.save(img, tmp)


def _table(spec: CohortSpec) -> pd.DataFrame:
  rows = []
  for i, label in enumerate(cohort_labels(spec)):
    sub = draw_subject(spec, i, label)
    pid = sub.participant_id
    files = {_path_column(spec, seq): f"{pid}/anat/{pid}_{seq}.nii.gz" for seq in spec.sequences}
    row = dict(participant_id=pid, **files, label=label, age=sub.age, sex=sub.sex)
    if spec.lesions:
      row["mask_path"] = f"{pid}/anat/{pid}_lesion_mask.nii.gz"
    rows.append(row)
  return pd.DataFrame(rows)


def _path_column(spec: CohortSpec, sequence: str) -> str:
  """`path` for a T1w-only cohort (the simplest table a user writes), else path_<sequence>."""
  return "path" if spec.sequences == ("T1w",) else f"path_{sequence}"


def _remove_stale(out_dir: str) -> None:
  for name in os.listdir(out_dir):
    full = os.path.join(out_dir, name)
    if _SUBJECT_DIR.match(name) and os.path.isdir(full):
      shutil.rmtree(full)
  for name in ("participants.tsv", _MARKER):
    if os.path.exists(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))


def _write_subject(job: tuple) -> str:
  """Simulates and writes one subject (a module-level function, so a process pool can run it):
  every subject's draws derive from (seed, index) only, so the order of the jobs does not matter."""
  spec, out_dir, participant_id, label, paths, mask_path = job
  sub = draw_subject(spec, int(participant_id[4:]) - 1, label)
  images, mask, affine = simulate_subject(spec, sub)
  if spec.lesions:
    if mask is None:
      mask = np.zeros(images[spec.sequences[0]].shape, np.uint8)
    _write(mask, affine, os.path.join(out_dir, mask_path), sub.orientation, np.uint8)
  # The first sequence last: its file is what marks the subject as written.
  for seq, path in reversed(list(zip(spec.sequences, paths))):
    _write(images[seq], affine, os.path.join(out_dir, path), sub.orientation, np.dtype(sub.dtype))
  return participant_id


def build_embedded_cohort(cfg, out_dir: str, log=None, map_fn=None, sequences=("T1w",)) -> str:
  """Writes the simulated cohort (NIfTI + participants.tsv) into out_dir; returns the table's path.

  `cfg` is config.data.embedded, `sequences` config.data.sequences (each a column path_<seq>; a
  T1w-only cohort has one `path` column). Idempotent: a complete build for the same cfg returns at once;
  an interrupted one resumes, keeping the subjects already written (each file is written
  atomically, the first sequence's image last). A build for a different cfg in the same directory is
  replaced. `log(msg)` (optional) receives progress lines; `map_fn(fn, items)` (optional, e.g. a
  process pool's map) runs the per-subject simulations, in any order.
  """
  spec = CohortSpec.of(cfg, sequences)
  out_dir = os.path.abspath(out_dir)
  tsv = os.path.join(out_dir, "participants.tsv")
  digest = spec.hash()
  done = io.read_json(os.path.join(out_dir, _MARKER))
  if done and done.get("hash") == digest and os.path.exists(tsv):
    return tsv
  os.makedirs(out_dir, exist_ok=True)
  manifest = io.read_json(os.path.join(out_dir, _MANIFEST))
  ours = manifest is not None or done is not None
  if not ours and (os.path.exists(tsv) or any(_SUBJECT_DIR.match(n) for n in os.listdir(out_dir))):
    raise FileExistsError(f"{out_dir} holds a cohort that build_embedded_cohort did not write; "
                          "choose another directory")
  if ours and (manifest or {}).get("hash") != digest:
    _remove_stale(out_dir)          # a build for another cfg: start over
  elif done is not None:
    os.remove(os.path.join(out_dir, _MARKER))   # same cfg, table lost: resume
  io.write_json_atomic(os.path.join(out_dir, _MANIFEST), dict(hash=digest, spec=dataclasses.asdict(spec)))

  table = _table(spec)
  first = _path_column(spec, spec.sequences[0])
  todo = [(spec, out_dir, row["participant_id"], row["label"], [row[_path_column(spec, q)] for q in spec.sequences],
           row.get("mask_path", "")) for row in table.to_dict("records")
          if not os.path.exists(os.path.join(out_dir, row[first]))]
  for written, _ in enumerate((map_fn or map)(_write_subject, todo), 1):
    if log is not None and (written % 20 == 0):
      log(f"embedded cohort: {written} subjects written")
  with io.atomic_path(tsv) as tmp:
    table.to_csv(tmp, sep="\t", index=False, float_format="%.1f")
  io.write_json_atomic(os.path.join(out_dir, _MARKER),
                       dict(hash=digest, num_subjects=spec.num_subjects, generator=GENERATOR_VERSION))
  return tsv


