"""Latent sampling from a trained LDM (`Generator`: batched, mesh-sharded, classifier-free guidance),
the trained LDM of a workdir with its decoder (`Trained`, `load_trained`), and the paired
conditioning check's volumes (`paired_samples`)."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from synthmri_jax import sharding as mesh_lib
from synthmri_jax import workdir as workdir_lib
from synthmri_jax.data import loader
from synthmri_jax.data.cache import load_prepared
from synthmri_jax.diffusion.samplers import cfg_model_fn, ddim_sample, ddpm_sample
from synthmri_jax.diffusion.schedules import NoiseSchedule
from synthmri_jax.generation.attributes import plan_subjects
from synthmri_jax.latents import LatentCodec, LatentNorm
from synthmri_jax.models import unet as unet_lib
from synthmri_jax.tasks import ldm as ldm_task
from synthmri_jax.training import checkpoint as ckpt_lib
from synthmri_jax.utils import io
from synthmri_jax.utils.errors import UserInputError

SAMPLERS = ("ddim", "ddpm")


@functools.partial(jax.jit, static_argnames=("model", "shape", "prediction_type", "sampler", "steps", "eta",
                                             "spacing", "guidance_scale", "guidance_null"))
def _sample(params, schedule, seeds, cond, *, model, shape, prediction_type, sampler, steps, eta, spacing,
            guidance_scale, guidance_null):
  """Module-level and keyed on static settings, so every Generator with the same model and settings
  shares one compiled sampler (a resumed or repeated run in one process does not recompile)."""
  keys = jax.vmap(jax.random.key)(seeds)
  fn = lambda x, t, c: model.apply({"params": params}, x, t, c)
  if model.conditioning is not None:
    fn = cfg_model_fn(fn, guidance_scale, lambda c: unet_lib.null_conditions(c, model.conditioning, guidance_null))
  if sampler == "ddim":
    return ddim_sample(fn, schedule, shape, keys, cond, num_inference_steps=steps, eta=eta,
                       prediction_type=prediction_type, spacing=spacing)
  return ddpm_sample(fn, schedule, shape, keys, cond, prediction_type=prediction_type)


class Generator:
  """Batched, mesh-sharded latent sampling with classifier-free guidance.

  `latents(params, seeds, cond)` returns scaled latents, one per seed; subject i's latent depends
  only on its seed and conditions (per-element keys) and on the fixed batch it falls in.
  """

  def __init__(self, model: unet_lib.DiffusionUNet, schedule: NoiseSchedule, latent_shape: Sequence[int], *,
               prediction_type: str = "epsilon", sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
               spacing: str = "trailing", guidance_scale: float = 1.0, guidance_null: str | Sequence[str] = "all",
               batch_size: int = 8, mesh: Optional[jax.sharding.Mesh] = None):
    if sampler not in SAMPLERS:
      raise UserInputError(f"sample.sampler must be one of {SAMPLERS}, got {sampler!r}")
    self.model, self.schedule = model, schedule
    self.latent_shape = tuple(int(s) for s in latent_shape)
    self.mesh = mesh if mesh is not None else mesh_lib.mesh_from_config(None)
    self.batch_size = loader.round_up(max(1, int(batch_size)), self.mesh)
    null = guidance_null
    if isinstance(null, str):
      null = "all" if null.strip() == "all" else tuple(s.strip() for s in null.split(",") if s.strip())
    else:
      null = tuple(null)
    if model.conditioning is not None and null != "all":
      unet_lib.null_conditions({}, model.conditioning, null)   # validates the names
    self._static = dict(model=model, shape=(self.batch_size,) + self.latent_shape, prediction_type=str(prediction_type),
                        sampler=sampler, steps=int(steps), eta=float(eta), spacing=str(spacing),
                        guidance_scale=float(guidance_scale), guidance_null=null)
    self._bsh = mesh_lib.batch_sharding(self.mesh)

  def _put(self, a: np.ndarray) -> jax.Array:
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, self._bsh, lambda idx: a[idx])

  def batch(self, params, seeds: np.ndarray, cond: Mapping[str, np.ndarray]) -> jax.Array:
    """One full batch (len(seeds) == batch_size) -> latents, batch-sharded on the mesh."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      return _sample(params, self.schedule, self._put(np.asarray(seeds, np.uint32)),
                     {k: self._put(v) for k, v in cond.items()}, **self._static)

  def lower(self, params, seeds, cond) -> jax.stages.Lowered:
    """The sampling program of one batch lowered for this generator's mesh, from abstract
    (jax.ShapeDtypeStruct) or concrete arguments: what `batch` runs (tools/aot_compile.py)."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      return _sample.lower(params, self.schedule, seeds, cond, **self._static)

  def pad(self, idx: np.ndarray, seeds: np.ndarray, cond: Mapping[str, np.ndarray]):
    """Seeds and conditions of rows `idx`, padded to a full batch by repeating the last row."""
    full = np.concatenate([idx, np.repeat(idx[-1:], self.batch_size - len(idx))])
    return seeds[full], {k: np.asarray(v)[full] for k, v in cond.items()}

  def latents(self, params, seeds: np.ndarray, cond: Mapping[str, np.ndarray]) -> np.ndarray:
    """Every row, in fixed batches of batch_size; host numpy (N, *latent_shape)."""
    n = len(seeds)
    out = []
    for start in range(0, n, self.batch_size):
      idx = np.arange(start, min(n, start + self.batch_size))
      s, c = self.pad(idx, np.asarray(seeds), cond)
      out.append(np.asarray(jax.device_get(self.batch(params, s, c)))[: len(idx)])
    return np.concatenate(out, axis=0)


@dataclasses.dataclass
class Trained:
  """The trained LDM of a workdir and the codec that decodes its latents: what sampling needs."""
  meta: dict
  labels: list
  attributes: list
  latent_shape: tuple
  model: Any
  schedule: NoiseSchedule
  step: int
  params: Any
  codec: LatentCodec
  mesh: jax.sharding.Mesh
  ldm_dir: str

  def generator(self, s) -> Generator:
    """A Generator with the settings of a `sample` config block."""
    return Generator(self.model, self.schedule, self.latent_shape,
                     prediction_type=str(self.meta["ldm"]["diffusion"]["prediction_type"]), sampler=str(s.sampler),
                     steps=int(s.steps), eta=float(s.eta), spacing=str(s.spacing),
                     guidance_scale=float(s.guidance_scale), guidance_null=s.guidance_null,
                     batch_size=int(s.batch_size), mesh=self.mesh)

  def decoder(self) -> Callable:
    """Jitted (codec variables, normalised latents, their labels) -> volumes, replicated."""
    norm = LatentNorm.from_meta(self.meta, self.ldm_dir)
    codec = self.codec
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      return jax.jit(lambda v, z, y: codec.decode(v, norm.denormalize(z, y)),
                     out_shardings=mesh_lib.replicated(self.mesh))


def load_trained(config, workdir: str, codec: Optional[LatentCodec] = None) -> Trained:
  """The workdir's trained LDM (EMA params when kept) with its codec (default: the tokenizer,
  decoding through config.sample.clinical)."""
  meta = io.read_json(os.path.join(workdir_lib.ldm_dir(workdir), workdir_lib.LDM_META_FILE))
  if not meta or not meta.get("complete"):
    raise UserInputError(f"{workdir_lib.ldm_dir(workdir)}: no trained LDM (ldm.json missing); run the 'ldm' stage first")
  labels = list(meta["labels"])
  attributes = ldm_task.attributes_from_meta(meta)
  latent_shape = tuple(meta["latent_shape"])
  model, schedule = ldm_task.build(meta["ldm"], latent_shape[-1], len(labels), attributes)
  step, loaded = ckpt_lib.load_variables(os.path.join(workdir_lib.ldm_dir(workdir), "checkpoints"))
  params = ckpt_lib.eval_params(loaded)
  codec = codec if codec is not None else _trained_codec(config, workdir, clinical=str(config.sample.clinical))
  return Trained(meta, labels, attributes, latent_shape, model, schedule, int(step), params, codec,
                 mesh_lib.mesh_from_config(config), workdir_lib.ldm_dir(workdir))


def paired_samples(config, workdir: str, num_pairs: int, case: str, control: str, *,
                   codec: Optional[LatentCodec] = None) -> dict[str, np.ndarray]:
  """The conditioning check's volumes: `num_pairs` subjects drawn as the sample stage draws them
  (same attribute model, sample.seed), each generated twice from the same initial noise and the
  same attributes, once labelled `case` and once `control`. Any difference between the two is
  what the label alone changes. Returns {"case": (n, X, Y, Z, C), "control": same, "seed": (n,)}.
  """
  workdir = os.path.abspath(workdir)
  g = load_trained(config, workdir, codec)
  for name in (case, control):
    if name not in g.labels:
      raise UserInputError(f"paired check: label {name!r} is not one of the LDM's labels {g.labels}")
  prepared = load_prepared(workdir)
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.sample.num_subjects = int(num_pairs)
  plan = plan_subjects(sub, prepared, g.attributes, g.labels)
  gen, decode = g.generator(config.sample), g.decoder()
  out = {}
  for key, name in (("case", case), ("control", control)):
    cond = {k: np.asarray(plan[k]) for k in g.model.conditioning.names}
    cond[unet_lib.LABEL] = np.full(len(plan["seed"]), g.labels.index(name), np.int32)
    z = gen.latents(g.params, plan["seed"], cond)
    vols = []
    for start in range(0, len(z), gen.batch_size):
      chunk = z[start:start + gen.batch_size]
      pad = np.concatenate([chunk, np.repeat(chunk[-1:], gen.batch_size - len(chunk), axis=0)])
      y = np.full(len(pad), g.labels.index(name), np.int32)
      with jax.set_mesh(g.mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
        vols.append(np.asarray(jax.device_get(decode(g.codec.variables, pad, y)), np.float32)[: len(chunk)])
    out[key] = np.concatenate(vols)
  out["seed"] = np.asarray(plan["seed"])
  return out


def _trained_codec(config, workdir: str, clinical: str) -> LatentCodec:
  from synthmri_jax.pipeline import tokenizer   # heavy; only when the real tokenizer is used
  return tokenizer.tokenizer_codec(config, workdir, clinical=clinical)
