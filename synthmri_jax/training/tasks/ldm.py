"""The `ldm` stage: a conditional 3D DDPM on the tokenizer's generative latents.

    python -m synthmri_jax.main --config configs/quickstart.py --workdir W --config.stages=ldm

Layout:
  W/ldm/latents/index.json         cache key, latent shape, scale factor, per split: rows and shards
  W/ldm/latents/<split>.npy        float32 (N, x, y, z, D) unscaled latents in the split table's row
                                   order; written from per-batch shards (<split>_<k>.npy) once all exist
  W/ldm/checkpoints, W/ldm/tb      the shared trainer's run
  W/ldm/run.json                   what the checkpoints were trained for (refuses a mismatched resume)
  W/ldm/ldm.json                   written when training is done: what `sample` needs (model block,
                                   attributes with their statistics, scale factor, labels, steps/s)

Latents: the training split (and val, for the eval loss) is encoded ONCE by the tokenizer,
batch-sharded over the mesh; each batch is saved atomically, so an interrupted encoding resumes at
the first missing batch. The latents are standardised so the diffusion sees unit-variance data and
the schedule's signal-to-noise ratios mean what they say (`LatentNorm`): 'global' is Rombach et
al.'s single scale factor, 1 / std of every training-latent element (MONAI's tutorial);
'per_channel' subtracts each channel's mean and divides by its std, for codecs whose channels
differ in spread (a 0.12 channel under a global 1 / 0.5 scale is drowned by the noise at half
the schedule). The model trains on normalised latents; sampling inverts the map before decoding.

The tokenizer enters through one adapter, `LatentCodec` (`tokenizer_codec`), so the stage does not
care which tokenizer variant was trained; tests pass their own codec.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synthmri_jax.data import loader
from synthmri_jax.data.cache import PreparedCohort, load_prepared
from synthmri_jax.diffusion.schedules import NoiseSchedule, check_prediction_type, make_schedule
from synthmri_jax.models import unet as unet_lib
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.training import optim, trainer
from synthmri_jax import workdir as workdir_lib
from synthmri_jax.utils import io
from synthmri_jax.utils.errors import UserInputError

META_FILE = workdir_lib.LDM_META_FILE
RUN_FILE = "run.json"
LATENT_KEY = "latent"
CACHE_VERSION = 1


class StaleRunError(UserInputError, RuntimeError):
  """WORKDIR/ldm holds checkpoints of a model trained for another config, tokenizer or cohort."""


def ldm_dir(workdir: str) -> str:
  return workdir_lib.ldm_dir(workdir)




def plain_block(cfg: Any) -> Any:
  return json.loads(cfg.to_json(sort_keys=True)) if hasattr(cfg, "to_json") else cfg


# ------------------------------------------------------------------------------ the tokenizer adapter


@dataclasses.dataclass(frozen=True)
class LatentCodec:
  """Volume <-> generative latent: the only place the LDM and the sampler touch the tokenizer.

  encode(variables, x) -> z: (B, X, Y, Z, C) -> (B, x, y, z, D); decode(variables, z) -> x.
  Both are pure and jittable; `variables` travels as an argument (not a baked-in constant).
  `key` identifies the model and its weights (part of the latent cache key).
  """

  encode: Callable[[Any, jax.Array], jax.Array]
  decode: Callable[[Any, jax.Array], jax.Array]
  variables: Any
  key: str
  description: str = ""


def tokenizer_codec(config, workdir: str, clinical: Optional[str] = None) -> LatentCodec:
  """The trained tokenizer of WORKDIR/tokenizer as a LatentCodec.

  encode: encode_generative (quantised or not per ldm.latents.quantized); decode:
  decode_from_generative with the clinical path `clinical` (default config.sample.clinical,
  else 'predicted'), which snaps a sampled latent to its nearest codes first.
  """
  from synthmri_jax.training.tasks import tokenizer_stage  # heavy; only when the real tokenizer is used

  metrics = io.read_json(os.path.join(os.path.abspath(workdir), "tokenizer", tokenizer_stage.METRICS_FILE))
  if not metrics:
    raise UserInputError(f"{workdir}/tokenizer: no trained tokenizer (tokenizer_metrics.json missing); "
                         "run the 'tokenizer' stage first")
  model, variables = tokenizer_stage.load_tokenizer(config, workdir)
  stage = tokenizer_stage.stage_names(config.tokenizer)[-1]
  ckpt_dir = os.path.join(tokenizer_stage.stage_dir(workdir, stage), "checkpoints")
  steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
  quantized = bool(config.ldm.latents.quantized)
  if clinical is None:
    clinical = str(config.sample.clinical) if "sample" in config else "predicted"

  def encode(v, x):
    return model.apply(v, x, quantize=quantized, method=model.encode_generative)

  def decode(v, z):
    return model.apply(v, z, clinical=clinical, method=model.decode_from_generative)

  key = workdir_lib.fingerprint({"tokenizer": metrics.get("config_hash"), "step": max(steps) if steps else None,
               "quantized": quantized})
  return LatentCodec(encode, decode, variables, key,
                     f"{metrics.get('variant')} tokenizer, stage {stage} step {max(steps) if steps else '?'}")


# ------------------------------------------------------------------------------ config


def train_config(config) -> ml_collections.ConfigDict:
  """config.train (if any) <- ldm.train, validated; seed from config.seed unless set."""
  merged = ml_collections.ConfigDict()
  for block in (config.get("train", None), config.ldm.get("train", None)):
    if block is not None:
      for k in block.keys():
        merged[k] = block[k]
  if "seed" not in merged and "seed" in config:
    merged.seed = int(config.seed)
  out = ml_collections.ConfigDict()
  out.train = optim.train_config(merged)
  return out


def batch_size(config) -> int:
  b = int(config.ldm.get("batch_size", 0) or 0)
  return b if b > 0 else int(config.data.batch_size)


def make_mesh(config) -> jax.sharding.Mesh:
  return mesh_lib.mesh_from_config(config)


def round_up(n: int, mesh: jax.sharding.Mesh) -> int:
  k = int(np.prod([mesh.shape[a] for a in loader.BATCH_AXES]))
  return -(-int(n) // k) * k


# ------------------------------------------------------------------------------ attributes


def split_attributes(prepared: PreparedCohort, split: str, attributes) -> dict[str, np.ndarray]:
  """label (int32) and every attribute of a split's rows: continuous float32 (NaN missing),
  categorical int32 (-1 missing; 'sex' F/M -> 0/1, others integer codes)."""
  src = loader.CohortSource(prepared, split)   # the loader's own parsing of age / sex
  rows = prepared.split(split)
  out = {unet_lib.LABEL: src.labels.astype(np.int32)}
  for a in attributes:
    if a.name == "age":
      out["age"] = src.ages.astype(np.float32)
      continue
    if a.name == "sex":
      out["sex"] = src.sexes.astype(np.int32)
      continue
    if a.name not in rows.columns:
      raise UserInputError(f"ldm.cond.attributes names {a.name!r}, which is not a column of the prepared cohort "
                           f"table ({', '.join(rows.columns)})")
    raw = rows[a.name].astype(str).str.strip().replace({"": "nan", "n/a": "nan", "NaN": "nan"})
    vals = raw.astype(float).to_numpy()
    if a.kind == "continuous":
      out[a.name] = vals.astype(np.float32)
    else:
      bad = np.isfinite(vals) & ((vals != np.round(vals)) | (vals < 0) | (vals >= a.num_classes))
      if bad.any():
        raise UserInputError(f"categorical attribute {a.name!r} must hold integer codes 0..{a.num_classes - 1} "
                             f"(blank = missing); found {sorted(set(raw[bad]))[:5]}")
      out[a.name] = np.where(np.isfinite(vals), vals, -1).astype(np.int32)
  return out


def attributes_from_meta(meta: dict[str, Any]) -> tuple[unet_lib.Attribute, ...]:
  return tuple(unet_lib.Attribute(**a) for a in meta["attributes"])


# ------------------------------------------------------------------------------ latent cache


def _latent_fields(config) -> dict[str, Any]:
  """The latents-block fields that change the latents (not which splits are encoded, nor the batching)."""
  return {k: v for k, v in plain_block(config.ldm.latents).items() if k not in ("splits", "encode_batch_size")}


def latents_dir(workdir: str) -> str:
  return os.path.join(ldm_dir(workdir), "latents")


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
  out_dir = latents_dir(workdir)
  os.makedirs(out_dir, exist_ok=True)
  index_path = os.path.join(out_dir, "index.json")
  splits = _encode_splits(config, prepared)
  key = workdir_lib.fingerprint({"codec": codec.key, "cohort": prepared.meta.get("config_hash"),
               "latents": _latent_fields(config), "version": CACHE_VERSION})
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

  global_batch = round_up(int(config.ldm.latents.encode_batch_size or 0) or int(config.data.batch_size), mesh)
  rep = mesh_lib.replicated(mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
    encode = jax.jit(lambda v, x, i: (codec.encode(v, x), i), out_shardings=rep)
    for split in splits:
      entry = index["splits"].get(split, {})
      if entry.get("complete"):
        continue
      source = loader.CohortSource(prepared, split)
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
                 from step 0. The label means are statistics of the private training split (the
                 privacy report lists them as a non-private release).
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


class LatentSource:
  """A split's latents (memory-mapped), normalised by `norm`, with label and attributes."""

  def __init__(self, path: str, norm: LatentNorm, conds: dict[str, np.ndarray]):
    self.path, self.norm = path, norm
    self.latents = np.load(path, mmap_mode="r")
    self.conds = conds
    n = len(self.latents)
    for k, v in conds.items():
      if len(v) != n:
        raise ValueError(f"{path}: {n} latents but {len(v)} values of {k!r}")

  def __len__(self) -> int:
    return len(self.latents)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    label = self.conds[unet_lib.LABEL][i] if unet_lib.LABEL in self.conds else None
    out = {LATENT_KEY: self.norm.normalize(np.asarray(self.latents[i], np.float32), label).astype(np.float32)}
    out.update({k: v[i] for k, v in self.conds.items()})
    return out


# ------------------------------------------------------------------------------ the task


def _flat_normal(key: jax.Array, shape, dtype) -> jax.Array:
  # Drawn flat and reshaped: threefry over a 5-D shape compiles far slower on XLA:CPU.
  return jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)


class LDMTask:
  """Denoising loss: ||model(x_t, t, dropped cond) - target||^2, t ~ U{0..T-1}, target eps or v."""

  name = "ldm"

  def __init__(self, model: unet_lib.DiffusionUNet, schedule: NoiseSchedule, prediction_type: str = "epsilon",
               dropout_each: float = 0.1, dropout_all: float = 0.1):
    check_prediction_type(prediction_type)
    if prediction_type == "sample":
      raise ValueError("the LDM trains 'epsilon' or 'v_prediction'")
    self.model, self.schedule, self.prediction_type = model, schedule, prediction_type
    self.conditioning = model.conditioning
    self.dropout_each, self.dropout_all = float(dropout_each), float(dropout_all)

  def cond(self, batch) -> dict[str, jax.Array]:
    names = self.conditioning.names if self.conditioning is not None else ()
    return {k: batch[k] for k in names}

  def init(self, rng, batch):
    x = batch[LATENT_KEY]
    t = jnp.zeros((x.shape[0],), jnp.int32)
    variables = self.model.init(rng, x, t, self.cond(batch))
    return variables["params"], {}

  def _per_example(self, params, x0, t, noise, cond):
    x_t = self.schedule.q_sample(x0, t, noise)
    pred = self.model.apply({"params": params}, x_t, t, cond)
    target = self.schedule.training_target(x0, noise, t, self.prediction_type)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2, 3, 4))

  def loss(self, params, model_state, batch, rng, step):
    del step
    x0 = batch[LATENT_KEY]
    k_t, k_n, k_d = jax.random.split(rng, 3)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, self.schedule.num_train_timesteps)
    noise = _flat_normal(k_n, x0.shape, x0.dtype)
    cond = self.cond(batch)
    if self.conditioning is not None:
      cond = unet_lib.drop_conditions(cond, self.conditioning, k_d, self.dropout_each, self.dropout_all)
    mse = self._per_example(params, x0, t, noise, cond)
    loss = jnp.mean(mse)
    return loss, ({"mse": loss}, model_state)

  def evaluate(self, params, model_state, batch):
    """Conditional denoising MSE with noise and t fixed per example (comparable across evaluations)."""
    x0 = batch[LATENT_KEY]
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(20251122), i))(batch["index"])
    t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0,
                                              self.schedule.num_train_timesteps))(keys)
    noise = jax.vmap(lambda k: _flat_normal(jax.random.fold_in(k, 1), x0.shape[1:], x0.dtype))(keys)
    mse = self._per_example(params, x0, t, noise, self.cond(batch))
    valid = batch["valid"].astype(jnp.float32)
    return {"mse": jnp.sum(mse * valid), "count": jnp.sum(valid)}


def build(ldm_cfg, out_channels: int, num_classes: int, attributes) -> tuple[unet_lib.DiffusionUNet, NoiseSchedule]:
  """(U-Net, schedule) from an ldm config block (a ConfigDict, or its JSON dict from ldm.json)."""
  if isinstance(ldm_cfg, dict):
    ldm_cfg = ml_collections.ConfigDict(ldm_cfg)
  d = ldm_cfg.diffusion
  schedule = make_schedule(str(d.schedule), int(d.num_train_timesteps), float(d.beta_start), float(d.beta_end))
  return unet_lib.from_config(ldm_cfg, out_channels, num_classes, attributes), schedule


# ------------------------------------------------------------------------------ the stage


def _model_key(config, codec: LatentCodec, prepared: PreparedCohort) -> str:
  """What the checkpoints depend on (not train.steps: more steps resume the same run)."""
  blk = plain_block(config.ldm)
  return workdir_lib.fingerprint({k: blk.get(k) for k in ("model", "cond", "diffusion")} | {"latents": _latent_fields(config)} |
               {"codec": codec.key, "cohort": prepared.meta.get("config_hash"), "labels": prepared.labels})


def run_ldm(config, workdir: str, *, codec: Optional[LatentCodec] = None,
            log: Callable[[str], None] = print,
            on_log: Optional[Callable[[int, dict[str, float]], None]] = None) -> dict[str, Any]:
  """The pipeline stage: encode latents (once), train the U-Net, write WORKDIR/ldm/ldm.json.

  Skips when ldm.json is complete for this config, tokenizer and cohort; resumes checkpoints.
  codec: the tokenizer adapter (default: the trained tokenizer of WORKDIR); on_log: the
  trainer's (step, metrics) callback.
  """
  if "ldm" not in config:
    raise ValueError("config has no `ldm` block; attach synthmri_jax.training.tasks.ldm_config.ldm_config(...) "
                     "as config.ldm")
  workdir = os.path.abspath(workdir)
  out_dir = ldm_dir(workdir)
  prepared = load_prepared(workdir)
  codec = codec if codec is not None else tokenizer_codec(config, workdir)
  tc = train_config(config)
  model_key = _model_key(config, codec, prepared)
  key = workdir_lib.fingerprint({"model": model_key, "train": plain_block(tc.train), "batch": batch_size(config),
               "shuffle_seed": int(config.data.shuffle_seed)})
  meta_path = os.path.join(out_dir, META_FILE)
  done = io.read_json(meta_path)
  if done and done.get("complete") and done.get("key") == key:
    log(f"ldm: {meta_path} is complete for this config, skipping")
    return done

  run_path = os.path.join(out_dir, RUN_FILE)
  run = io.read_json(run_path)
  has_ckpt = os.path.isdir(os.path.join(out_dir, "checkpoints")) and any(
      d.isdigit() for d in os.listdir(os.path.join(out_dir, "checkpoints")))
  if run and run.get("model_key") != model_key and has_ckpt:
    raise StaleRunError(f"{out_dir}/checkpoints were trained for another ldm model / conditioning / tokenizer / "
                        "cohort; resuming them would be wrong. Delete that folder to retrain, or use another --workdir.")
  mesh = make_mesh(config)
  index = encode_latents(config, workdir, prepared, codec, mesh, log=log)
  latent_shape = tuple(index["latent_shape"])
  ldir = latents_dir(workdir)
  train_labels = split_attributes(prepared, "train", ())[unet_lib.LABEL]
  norm = LatentNorm.fit(np.load(os.path.join(ldir, "train.npy"), mmap_mode="r"),
                        str(config.ldm.latents.get("standardize", "global")),
                        float(config.ldm.latents.get("std_floor", 0.1)), labels=train_labels,
                        num_labels=len(prepared.labels))

  attributes = unet_lib.parse_attributes(config.ldm.cond.attributes)
  train_conds = split_attributes(prepared, "train", attributes)
  attributes = unet_lib.with_stats(attributes, train_conds)
  model, schedule = build(config.ldm, latent_shape[-1], len(prepared.labels), attributes)
  task = LDMTask(model, schedule, str(config.ldm.diffusion.prediction_type),
                 float(config.ldm.cond.dropout_each), float(config.ldm.cond.dropout_all))
  if jax.process_index() == 0:
    io.write_json_atomic(run_path, {"model_key": model_key})

  train_src = LatentSource(os.path.join(ldir, "train.npy"), norm, train_conds)
  gb = round_up(batch_size(config), mesh)
  # trainer.train_iterator: Poisson-sampled batches when train.dp is enabled (DP-SGD on the generator).
  it = trainer.train_iterator(tc, train_src, gb, int(config.data.shuffle_seed), mesh=mesh, workdir=out_dir)
  eval_fn = None
  if index["splits"].get("val", {}).get("complete"):
    val_src = LatentSource(os.path.join(ldir, "val.npy"), norm, split_attributes(prepared, "val", attributes))
    eval_fn = lambda: loader.eval_iterator(val_src, gb)
  rates: list[float] = []
  losses: list[float] = []

  def logged(step, values):
    if "steps_per_s" in values:
      rates.append(float(values["steps_per_s"]))
      losses.append(float(values["loss"]))
    if on_log is not None:
      on_log(step, values)

  log(f"ldm: {len(train_src)} training latents {latent_shape}, {norm.mode} standardisation, batch {gb}, "
      f"{tc.train.steps} steps, conditioning on {', '.join(model.conditioning.names)}")
  t0 = time.time()
  state = trainer.train(task, tc, out_dir, it, eval_fn, mesh=mesh, on_log=logged)
  steady = rates[1:] if len(rates) > 1 else rates
  meta = {
      "complete": True, "key": key, "model_key": model_key, "codec": codec.description,
      "ldm": plain_block(config.ldm), "attributes": [dataclasses.asdict(a) for a in attributes],
      "labels": prepared.labels, "latent_shape": list(latent_shape),
      "scale_factor": float(index["scale_factor"]),
      "latent_norm": norm.save(out_dir) if jax.process_index() == 0 else {"mode": norm.mode, "file": NORM_FILE},
      "step": int(jax.device_get(state.step)), "steps_per_s": float(np.median(steady)) if steady else None,
      "final_loss": losses[-1] if losses else None, "seconds": round(time.time() - t0, 1),
      "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params))),
      "batch_size": gb, "num_train_latents": len(train_src),
  }
  if jax.process_index() == 0:
    io.write_json_atomic(meta_path, meta)
  rate = f"{meta['steps_per_s']:.2f} steps/s" if meta["steps_per_s"] else "n/a steps/s"
  log(f"ldm: trained to step {meta['step']} ({rate}, {meta['params']:,} params); wrote {meta_path}")
  return meta
