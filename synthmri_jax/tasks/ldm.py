"""The LDM's task: a conditional denoising loss on standardised latents, the latent data source
with each row's label and attributes, and the (U-Net, schedule) builder from an ldm block."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synthmri_jax.data import loader
from synthmri_jax.data.cache import PreparedCohort
from synthmri_jax.diffusion.schedules import NoiseSchedule, check_prediction_type, make_schedule
from synthmri_jax.latents import LatentNorm
from synthmri_jax.models import unet as unet_lib
from synthmri_jax.utils.errors import UserInputError

LATENT_KEY = "latent"


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
