"""The LDM's view of a tokenizer: `LatentCodec` (volume <-> latent), the latent cache of the
training splits, and `LatentNorm` (latent <-> the unit-scale space the diffusion works in).

The LDM stage, the sampler, the privacy attacks and the codec check all go through these, so they
see exactly what the LDM was trained on.

Layout:
  W/ldm/latents/index.json         cache key, latent shape, scale factor, per split: rows and shards
  W/ldm/latents/<split>.npy        float32 (N, x, y, z, D) unscaled latents in the split table's row
                                   order; written from per-batch shards (<split>_<k>.npy) once all exist

The training split (and val, for the eval loss) is encoded ONCE, batch-sharded over the mesh; each
batch is saved atomically, so an interrupted encoding resumes at the first missing batch.
Standardisation makes the diffusion see unit-variance data, so the schedule's signal-to-noise
ratios mean what they say: 'global' is Rombach et al.'s single scale factor, 1 / std of every
training-latent element (MONAI's tutorial); 'per_channel' subtracts each channel's mean and divides
by its std, for codecs whose channels differ in spread (a 0.12 channel under a global 1 / 0.5 scale
is drowned by the noise at half the schedule); the per-element modes are in `LatentNorm`.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthmri_jax import sharding as mesh_lib
from synthmri_jax import workdir as workdir_lib
from synthmri_jax.data import loader
from synthmri_jax.data.cache import PreparedCohort
from synthmri_jax.utils import config_files, io

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LatentCodec:
  """Volume <-> generative latent: the only place the LDM and the sampler touch the tokenizer.

  encode(variables, x) -> z: (B, X, Y, Z, C) -> (B, x, y, z, D); decode(variables, z) -> x.
  With mask_channel, x's last channel is the lesion mask (loader.CohortSource(..., mask_channel=True)
  builds that input) and decode returns it too: C = sequences + 1.
  Both are pure and jittable; `variables` travels as an argument (not a baked-in constant).
  `key` identifies the model and its weights (part of the latent cache key).
  """

  encode: Callable[[Any, jax.Array], jax.Array]
  decode: Callable[[Any, jax.Array], jax.Array]
  variables: Any
  key: str
  description: str = ""
  mask_channel: bool = False

  def source(self, prepared, split: str, **kw):
    """A split of `prepared` as this codec reads it (with the mask channel when it has one)."""
    return loader.CohortSource(prepared, split, mask_channel=self.mask_channel, **kw)

  def images(self, x):
    """The image channels of a decoded volume (B, X, Y, Z, C): all but the mask channel."""
    return x[..., :-1] if self.mask_channel else x

  def masks(self, x):
    """The decoded lesion mask (B, X, Y, Z) uint8 (decoded channel > 0.5); None without a mask channel."""
    return (np.asarray(x[..., -1]) > 0.5).astype(np.uint8) if self.mask_channel else None


def latent_fields(config) -> dict[str, Any]:
  """The latents-block fields that change the latents (not which splits are encoded, nor the batching)."""
  return {k: v for k, v in config_files.plain(config.ldm.latents).items() if k not in ("splits", "encode_batch_size")}


def _encode_splits(config, prepared: PreparedCohort) -> list[str]:
  names = [s.strip() for s in str(config.ldm.latents.splits).split(",") if s.strip()]
  if "train" not in names:
    names = ["train"] + names
  return [s for s in names if len(prepared.split(s))]


def encode_latents(config, workdir: str, prepared: PreparedCohort, codec: LatentCodec,
                   mesh: jax.sharding.Mesh, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Encodes the configured splits once (resumable) and returns the completed index.json.

  A cache made with another tokenizer / cohort / latents config is deleted (it is derived data).
  """
  out_dir = workdir_lib.latents_dir(workdir)
  os.makedirs(out_dir, exist_ok=True)
  index_path = os.path.join(out_dir, "index.json")
  splits = _encode_splits(config, prepared)
  key = workdir_lib.fingerprint({"codec": codec.key, "cohort": prepared.meta.get("config_hash"),
               "latents": latent_fields(config), "version": CACHE_VERSION})
  index = io.read_json(index_path) or {}
  is_main = jax.process_index() == 0
  if index.get("key") != key:
    if index and is_main:
      log(f"ldm: latent cache {out_dir} was made for another tokenizer or cohort; re-encoding")
      for f in glob.glob(os.path.join(out_dir, "*.npy")):
        os.remove(f)
    index = {"key": key, "codec": codec.description, "splits": {}}
  if all(index["splits"].get(s, {}).get("complete") for s in splits) and "scale_factor" in index:
    return index

  global_batch = loader.round_up(int(config.ldm.latents.encode_batch_size or 0) or int(config.data.batch_size), mesh)
  rep = mesh_lib.replicated(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
    encode = jax.jit(lambda v, x, i: (codec.encode(v, x), i), out_shardings=rep)
    for split in splits:
      entry = index["splits"].get(split, {})
      if entry.get("complete"):
        continue
      source = codec.source(prepared, split)
      n = len(source)
      num_batches = loader.eval_num_batches(source, global_batch)
      shard = lambda k: os.path.join(out_dir, f"{split}_{k:05d}.npy")
      todo = [k for k in range(num_batches) if not os.path.exists(shard(k))]
      t0 = time.time()
      if todo:
        log(f"ldm: encoding {split} split: {n} volumes in {num_batches} batches of {global_batch} "
            f"({num_batches - len(todo)} already cached)")
      for k, batch in enumerate(loader.eval_iterator(source, global_batch)):
        if k not in todo:
          continue
        gb = loader.make_global_batch({"image": batch["image"], "index": batch["index"]}, mesh)
        z, idx = jax.device_get(encode(codec.variables, gb["image"], gb["index"]))
        # With several processes a global batch holds its rows interleaved: put them in row order.
        keep = np.asarray(idx) >= 0
        order = np.argsort(np.asarray(idx)[keep])
        if is_main:
          with io.atomic_path(shard(k), suffix=".npy") as tmp:
            np.save(tmp, np.asarray(z, np.float32)[keep][order])
      if todo:
        log(f"ldm: encoded {split} in {time.time() - t0:.1f} s")
      if is_main:
        parts = [np.load(shard(k)) for k in range(num_batches)]
        full = np.concatenate(parts, axis=0)
        if full.shape[0] != n:
          raise RuntimeError(f"latent shards of {split} hold {full.shape[0]} rows, expected {n}")
        with io.atomic_path(os.path.join(out_dir, f"{split}.npy"), suffix=".npy") as tmp:
          np.save(tmp, full)
        latent_shape = list(full.shape[1:])
        if split == "train":
          f64 = full.astype(np.float64)
          std = float(f64.std())
          index["scale_factor"] = 1.0 / std if std > 1e-8 else 1.0
          index["latent_mean"] = float(f64.mean())
          index["latent_std"] = std
        index["latent_shape"] = latent_shape
        index["splits"][split] = {"n": n, "complete": True}
        io.write_json_atomic(index_path, index)
        for k in range(num_batches):
          os.remove(shard(k))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("ldm_latents")
    index = io.read_json(index_path)
  return index


NORM_MODES = ("global", "per_channel", "per_element", "per_label_element")
NORM_FILE = "latent_norm.npz"


@dataclasses.dataclass(frozen=True)
class LatentNorm:
  """normalised = (latent - shift) * scale; shift and scale broadcast against one latent (x, y, z, D).

  Modes, all fitted on the training latents:
    global       shift 0, scale 1 / std of every element (Rombach et al.; MONAI's tutorial)
    per_channel  each channel's mean and 1 / std
    per_element  each latent voxel's and channel's mean and 1 / std over the training subjects
                 (floored at `floor` x its channel's median element std, so constant background
                 is not blown up). The diffusion then models deviations from the mean anatomy: a
                 brain's layout is fixed by registration-like preprocessing, so the mean latent
                 already decodes to an average brain, and the network spends its few CPU steps on
                 what varies between subjects instead of first relearning the template.
    per_label_element  per_element with each label's own mean latent as the shift (the scale is
                 still pooled): a class-conditional Gaussian mean, fitted in closed form, under the
                 network. The label then acts twice, through the shift and through the network's
                 conditioning; measured on the 2-core CPU, the network alone learned about 7 % of
                 the AD - CN ventricle effect in 600 steps (BENCHMARKS.md), the shift carries it
                 from step 0. The label means are statistics of the training split (a release of
                 private data, listed by the privacy ledger) unless config.public fits them on the
                 public reference cohort (config_blocks/public.py).
  """
  mode: str
  shift: np.ndarray
  scale: np.ndarray
  label_shift: Optional[np.ndarray] = None   # (num_labels, x, y, z, D) in per_label_element mode

  @classmethod
  def fit(cls, latents: np.ndarray, mode: str, floor: float = 0.1, labels: Optional[np.ndarray] = None,
          num_labels: int = 0) -> "LatentNorm":
    z = np.asarray(latents, np.float64)
    safe = lambda sd: np.where(sd > 1e-8, sd, 1.0)
    label_shift = None
    if mode == "global":
      shift, sd = np.zeros((1,) * (z.ndim - 1)), np.full((1,) * (z.ndim - 1), z.std())
    elif mode == "per_channel":
      axes = tuple(range(z.ndim - 1))
      shift, sd = z.mean(axis=axes), z.std(axis=axes)
    elif mode in ("per_element", "per_label_element"):
      shift = z.mean(axis=0)
      if mode == "per_label_element":
        if labels is None:
          raise ValueError("per_label_element standardisation needs the training labels")
        labels = np.asarray(labels)
        n = max(int(num_labels), int(labels.max()) + 1)
        missing = [k for k in range(n) if not np.any(labels == k)]
        if missing:
          raise ValueError(f"per_label_element standardisation: labels {missing} have no training latents")
        label_shift = np.stack([z[labels == k].mean(axis=0) for k in range(n)])
        resid = z - label_shift[labels]
      else:
        resid = z - shift
      sd = np.sqrt(np.mean(resid ** 2, axis=0))
      typical = np.median(sd.reshape(-1, sd.shape[-1]), axis=0)   # per channel
      sd = np.maximum(sd, float(floor) * typical)
    else:
      raise ValueError(f"ldm.latents.standardize must be one of {NORM_MODES}, got {mode!r}")
    return cls(mode, shift.astype(np.float32), (1.0 / safe(sd)).astype(np.float32),
               None if label_shift is None else label_shift.astype(np.float32))

  @classmethod
  def from_meta(cls, meta: dict, ldm_directory: str | None = None) -> "LatentNorm":
    """From ldm.json and the stats file beside it (an ldm.json without 'latent_norm' used the
    global scale factor)."""
    entry = meta.get("latent_norm")
    if not entry:
      return cls("global", np.zeros((1,), np.float32), np.full((1,), float(meta["scale_factor"]), np.float32))
    if ldm_directory is None:
      raise ValueError("LatentNorm.from_meta needs the LDM directory to read " + str(entry.get("file")))
    with np.load(os.path.join(ldm_directory, entry["file"])) as f:
      return cls(str(entry["mode"]), f["shift"], f["scale"], f["label_shift"] if "label_shift" in f.files else None)

  def save(self, ldm_directory: str) -> dict:
    """Writes the stats file; returns ldm.json's 'latent_norm' entry."""
    extra = {} if self.label_shift is None else {"label_shift": self.label_shift}
    with io.atomic_path(os.path.join(ldm_directory, NORM_FILE), suffix=".npz") as tmp:
      np.savez(tmp, shift=self.shift, scale=self.scale, **extra)
    return {"mode": self.mode, "file": NORM_FILE}

  def _shift(self, labels, like):
    if self.label_shift is None:
      return self.shift
    if labels is None:
      raise ValueError(f"{self.mode} standardisation needs each latent's label")
    if isinstance(like, np.ndarray):
      return self.label_shift[np.asarray(labels)]
    return jnp.asarray(self.label_shift)[labels]

  def normalize(self, z, labels=None):
    """`labels`: int or (B,) class indices of z's rows (per_label_element only)."""
    return (z - self._shift(labels, z)) * self.scale

  def denormalize(self, x, labels=None):
    return x / self.scale + self._shift(labels, x)
