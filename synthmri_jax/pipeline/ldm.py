"""The `ldm` stage: a conditional 3D DDPM on the tokenizer's generative latents.

    python -m synthmri_jax.main --config configs/quickstart.py --workdir W --config.stages=ldm

Layout:
  W/ldm/latents/                   the latent cache (synthmri_jax.latents)
  W/ldm/checkpoints, W/ldm/tb      the shared trainer's run
  W/ldm/run.json                   what the checkpoints were trained for (refuses a mismatched resume)
  W/ldm/ldm.json                   written when training is done: what `sample` needs (model block,
                                   attributes with their statistics, scale factor, labels, steps/s)

The tokenizer enters through one adapter, `latents.LatentCodec` (`pipeline.tokenizer.tokenizer_codec`),
so the stage does not care which tokenizer variant was trained; tests pass their own codec.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from synthmri_jax import sharding as mesh_lib
from synthmri_jax import workdir as workdir_lib
from synthmri_jax.config_blocks import public
from synthmri_jax.data import loader
from synthmri_jax.pipeline import prepare as prepare_stage
from synthmri_jax.data.cache import PreparedCohort, load_prepared
from synthmri_jax.latents import NORM_FILE, LatentCodec, LatentNorm, encode_latents, latent_fields
from synthmri_jax.models import unet as unet_lib
from synthmri_jax.tasks.ldm import LDMTask, LatentSource, build, split_attributes
from synthmri_jax.training import optim, trainer
from synthmri_jax.utils import config_files, io
from synthmri_jax.utils.errors import UserInputError

META_FILE = workdir_lib.LDM_META_FILE
RUN_FILE = "run.json"


class StaleRunError(UserInputError, RuntimeError):
  """WORKDIR/ldm holds checkpoints of a model trained for another config, tokenizer or cohort."""


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


def _model_key(config, codec: LatentCodec, prepared: PreparedCohort, fit_cohort: PreparedCohort) -> str:
  """What the checkpoints depend on (not train.steps: more steps resume the same run)."""
  blk = config_files.plain(config.ldm)
  fit = fit_cohort.meta.get("config_hash") if fit_cohort is not prepared else None
  return workdir_lib.fingerprint({k: blk.get(k) for k in ("model", "cond", "diffusion")} | {"latents": latent_fields(config)} |
               {"codec": codec.key, "cohort": prepared.meta.get("config_hash"), "labels": prepared.labels} |
               ({"public": fit} if fit else {}))


def run(config, workdir: str, *, codec: Optional[LatentCodec] = None,
            log: Callable[[str], None] = print,
            on_log: Optional[Callable[[int, dict[str, float]], None]] = None) -> dict[str, Any]:
  """The pipeline stage: encode latents (once), train the U-Net, write WORKDIR/ldm/ldm.json.

  Skips when ldm.json is complete for this config, tokenizer and cohort; resumes checkpoints.
  codec: the tokenizer adapter (default: the trained tokenizer of WORKDIR); on_log: the
  trainer's (step, metrics) callback.
  """
  if "ldm" not in config:
    raise ValueError("config has no `ldm` block; attach synthmri_jax.config_blocks.ldm.ldm_config(...) "
                     "as config.ldm")
  workdir = os.path.abspath(workdir)
  out_dir = workdir_lib.ldm_dir(workdir)
  prepared = load_prepared(workdir)
  codec = codec if codec is not None else _trained_codec(config, workdir)
  tc = train_config(config)
  fit_cohort = prepare_stage.fit_cohort(config, workdir, prepared)
  model_key = _model_key(config, codec, prepared, fit_cohort)
  key = workdir_lib.fingerprint({"model": model_key, "train": config_files.plain(tc.train), "batch": batch_size(config),
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
  mesh = mesh_lib.mesh_from_config(config)
  index = encode_latents(config, workdir, prepared, codec, mesh, log=log)
  latent_shape = tuple(index["latent_shape"])
  ldir = workdir_lib.latents_dir(workdir)
  # The standardisation and the attributes' statistics: fit on the public reference cohort when
  # config.public is on (they are released with the model: config_blocks/public.py), else on the train split.
  fit_dir, fit_index = ldir, index
  if fit_cohort is not prepared:
    fit_root = os.path.dirname(fit_cohort.root)   # the public cohort's workdir (its data/ is fit_cohort.root)
    if str(config.ldm.latents.get("standardize", "global")) == "per_label_element":
      public.check_labels(prepared.labels, fit_cohort)
    fit_index = encode_latents(config, fit_root, fit_cohort, codec, mesh, log=log)
    fit_dir = workdir_lib.latents_dir(fit_root)
  norm = LatentNorm.fit(np.load(os.path.join(fit_dir, "train.npy"), mmap_mode="r"),
                        str(config.ldm.latents.get("standardize", "global")),
                        float(config.ldm.latents.get("std_floor", 0.1)),
                        labels=split_attributes(fit_cohort, "train", ())[unet_lib.LABEL],
                        num_labels=len(prepared.labels))

  attributes = unet_lib.parse_attributes(config.ldm.cond.attributes)
  train_conds = split_attributes(prepared, "train", attributes)
  attributes = unet_lib.with_stats(attributes, split_attributes(fit_cohort, "train", attributes))
  model, schedule = build(config.ldm, latent_shape[-1], len(prepared.labels), attributes)
  task = LDMTask(model, schedule, str(config.ldm.diffusion.prediction_type),
                 float(config.ldm.cond.dropout_each), float(config.ldm.cond.dropout_all))
  if jax.process_index() == 0:
    io.write_json_atomic(run_path, {"model_key": model_key})

  train_src = LatentSource(os.path.join(ldir, "train.npy"), norm, train_conds)
  gb = loader.round_up(batch_size(config), mesh)
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
      "ldm": config_files.plain(config.ldm), "attributes": [dataclasses.asdict(a) for a in attributes],
      "labels": prepared.labels, "latent_shape": list(latent_shape),
      "scale_factor": float(fit_index["scale_factor"]),
      "fit_on": prepare_stage.fit_on(config),
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



def _trained_codec(config, workdir: str) -> LatentCodec:
  from synthmri_jax.pipeline import tokenizer   # heavy; only when the real tokenizer is used
  return tokenizer.tokenizer_codec(config, workdir)
