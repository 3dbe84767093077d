"""The `tokenizer` stage: train config.tokenizer.variant on the prepared cohort (or, with config.public,
on the public reference cohort: config_blocks/public.py), evaluate on that cohort's 'val'.

    python -m synthmri_jax.main --config configs/quickstart.py --workdir W --config.stages=tokenizer

Layout:
  W/tokenizer/<phase>/checkpoints, W/tokenizer/<phase>/tb   one run of the shared trainer per phase
      dual: clinical -> generative -> joint (config.tokenizer.phases), each initialised from the
      previous phase's last checkpoint; vqvae / vqgan: one phase named after the variant
  W/tokenizer/tokenizer_metrics.json   written atomically once everything is trained and evaluated:
      val PSNR / SSIM (3D) / L1 / boundary-band L1, codebook usage + perplexity per codebook over
      the split, for the dual model the same with encoded / predicted / null clinical latents,
      steps/s per phase, parameter count, what the perceptual net and the boundary band were.
A rerun with the same tokenizer config and cohort skips; an interrupted run resumes from the
phase checkpoints. `load_tokenizer` gives the LDM stage the trained model and its variables.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synthmri_jax.data import loader
from synthmri_jax.pipeline import prepare as prepare_stage
from synthmri_jax.data.cache import load_prepared
from synthmri_jax.latents import LatentCodec
from synthmri_jax.models.quantizer import code_statistics
from synthmri_jax.models.tokenizer import build_tokenizer
from synthmri_jax.training import checkpoint as ckpt_lib
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.training import optim, trainer
from synthmri_jax.training import summaries
from synthmri_jax.tasks.tokenizer import DUAL_PHASES, make_task, mid_slices, slice_images
from synthmri_jax import workdir as workdir_lib
from synthmri_jax.utils import config_files, io
from synthmri_jax.utils.errors import UserInputError

METRICS_FILE = workdir_lib.TOKENIZER_METRICS_FILE


def phase_names(tcfg) -> list[str]:
  if str(tcfg.variant) != "dual":
    return [str(tcfg.variant)]
  names = [s.strip() for s in str(tcfg.phases).split(",") if s.strip()]
  bad = [s for s in names if s not in DUAL_PHASES]
  if not names or bad:
    raise ValueError(f"config.tokenizer.phases must name phases among {DUAL_PHASES}, got {tcfg.phases!r}")
  return names


def phase_dir(workdir: str, phase: str) -> str:
  return os.path.join(workdir_lib.tokenizer_dir(workdir), phase)


def train_config(config, phase: str) -> ml_collections.ConfigDict:
  """config.train (if any) <- tokenizer.train <- tokenizer.phase_train.<phase or 'main'>, validated."""
  tcfg = config.tokenizer
  merged = ml_collections.ConfigDict()
  base = config.get("train", None)
  for block in (base, tcfg.get("train", None), tcfg.phase_train.get(phase if phase in DUAL_PHASES else "main")):
    if block is not None:
      for k in block.keys():
        merged[k] = block[k]
  if "seed" not in merged and "seed" in config:
    merged.seed = int(config.seed)
  cfg = optim.train_config(merged)   # unknown keys -> clear error
  out = ml_collections.ConfigDict()
  out.train = cfg
  return out


def _config_key(config, prepared) -> str:
  # the stage's mesh only splits the same computation (tests/test_spatial.py): not part of the key
  return workdir_lib.fingerprint({
      # (mask_channel off is the tokenizer as it was before the field existed: the same key)
      "tokenizer": {k: v for k, v in config_files.plain(config.tokenizer).items()
                    if k != "mesh" and not (k == "mask_channel" and not v)},
      "train": config_files.plain(config.train) if "train" in config else None,
      "cohort": prepared.meta.get("config_hash"), "shape": list(prepared.shape), "batch": batch_size(config)})


def input_channels(config, prepared) -> list[str]:
  """What the tokenizer encodes, channel by channel: the cohort's sequences, then "mask" when
  tokenizer.mask_channel (image and lesion mask in one latent)."""
  return list(prepared.channels) + (["mask"] if bool(config.tokenizer.get("mask_channel", False)) else [])


def batch_size(config) -> int:
  b = int(config.tokenizer.get("batch_size", 0) or 0)
  return b if b > 0 else int(config.data.batch_size)


def _mesh(config):
  """The tokenizer's train mesh: config.mesh with tokenizer.mesh's entries (e.g. spatial = 4 at 1 mm)."""
  return mesh_lib.mesh_from_config(config, stage="tokenizer")


def evaluate_split(task, params, model_state, source, batch_size: int, mesh) -> dict[str, Any]:
  """Per-volume means of task.eval_outputs over `source`, split-level codebook statistics, and
  '_images' (input | reconstruction mid slices of the first volume) for TensorBoard."""
  rep = mesh_lib.replicated(mesh)
  bsh = mesh_lib.batch_sharding(mesh)
  sums: dict[str, float] = {}
  counts: dict[str, np.ndarray] = {}
  total = 0.0
  images: dict[str, np.ndarray] = {}
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
    fn = jax.jit(task.eval_outputs, out_shardings=rep)
    for b in loader.eval_iterator(source, batch_size):
      out = jax.device_get(fn(params, model_state, trainer.shard_batch(b, bsh)))
      valid = np.asarray(out.pop("valid"), np.float64)
      if not images:
        x_sl = mid_slices(np.asarray(b["image"]))
        images.update(slice_images(x_sl, {k: out[f"slices_{k}"] for k in x_sl}))
        if "slices_predicted_axial" in out:
          images.update({f"predicted_clinical_{k}": v for k, v in
                         slice_images(x_sl, {k: out[f"slices_predicted_{k}"] for k in x_sl}).items()})
      total += valid.sum()
      for k, v in out.items():
        v = np.asarray(v, np.float64)
        if k.startswith("slices_"):
          continue
        if k.startswith("counts_"):
          counts[k[7:]] = counts.get(k[7:], 0) + v
        else:
          sums[k] = sums.get(k, 0.0) + float((v * valid).sum())
  result: dict[str, Any] = {k: v / max(total, 1.0) for k, v in sums.items()}
  result["num_volumes"] = int(total)
  result["_images"] = images
  result["codebooks"] = {}
  for name, c in counts.items():
    st = {k: float(v) for k, v in code_statistics(jnp.asarray(c)).items()}
    result["codebooks"][name] = {"usage": st["usage"], "perplexity": st["perplexity"], "num_codes": int(c.shape[0]),
                                 "codes_used": int((c > 0).sum())}
  return result


def train_variant(config, workdir: str, *, log: Callable[[str], None] = print,
                  on_log: Optional[Callable[[str, int, dict], None]] = None) -> dict[str, Any]:
  """Trains every phase of config.tokenizer on its training cohort (`prepare.fit_cohort`) and evaluates
  on that cohort's 'val'. Returns the metrics dict (also what `run` writes). Resumes phase checkpoints.
  """
  tcfg = config.tokenizer
  prepared = prepare_stage.fit_cohort(config, workdir)
  in_channels = len(input_channels(config, prepared))
  with_mask = bool(tcfg.get("mask_channel", False))
  train_src = loader.CohortSource(prepared, "train", mask_channel=with_mask)
  val_src = loader.CohortSource(prepared, "val", mask_channel=with_mask)
  batch = batch_size(config)
  augment = loader.Augment.from_config(config.data)
  mesh = _mesh(config)
  phases = phase_names(tcfg)
  prev, task, state = None, None, None
  per_phase: dict[str, Any] = {}
  for i, phase in enumerate(phases):
    task = make_task(tcfg, in_channels, phase if tcfg.variant == "dual" else "main")
    tc = train_config(config, phase)
    sdir = phase_dir(workdir, phase)
    it = loader.train_iterator(train_src, batch, seed=int(config.data.shuffle_seed) + i, augment=augment)
    rates: list[float] = []

    def logged(step, values, phase=phase, rates=rates):
      if "steps_per_s" in values:
        rates.append(float(values["steps_per_s"]))
      if on_log is not None:
        on_log(phase, step, values)

    t0 = time.time()
    init_from = os.path.join(prev, "checkpoints") if prev else None
    log(f"tokenizer: phase {phase} ({i + 1}/{len(phases)}), {tc.train.steps} steps, batch {batch}, "
        f"lr {tc.train.lr}" + (f", from {init_from}" if init_from else ""))
    eval_fn = (lambda: loader.eval_iterator(val_src, batch)) if bool(tcfg.get("phase_eval", True)) else None
    state = trainer.train(task, tc, sdir, it, eval_fn, mesh=mesh, init_from=init_from, on_log=logged)
    steady = rates[1:] if len(rates) > 1 else rates
    per_phase[phase] = {"steps": int(tc.train.steps), "lr": float(tc.train.lr), "seconds": round(time.time() - t0, 1),
                        "steps_per_s": float(np.median(steady)) if steady else None,
                        "trainable_params": _count(state.params, task)}
    prev = sdir
  log("tokenizer: evaluating on the val split")
  metrics = evaluate_split(task, state.eval_params, state.model_state, val_src, batch, mesh)
  images = metrics.pop("_images")
  if jax.process_index() == 0:
    writer = summaries.SummaryWriter(os.path.join(phase_dir(workdir, phases[-1]), "tb"))
    step = int(jax.device_get(state.step))
    writer.scalars(step, {f"final_eval/{k}": v for k, v in metrics.items() if isinstance(v, float)})
    writer.images(step, {f"final_eval/{k}": v for k, v in images.items()})
    writer.close()
  return _summary(config, prepared, task, state, metrics, per_phase)


def _count(params, task) -> int:
  flat = jax.tree_util.tree_leaves_with_path(params)
  total = 0
  for path, x in flat:
    names = tuple(str(getattr(k, "key", k)) for k in path)
    fn = getattr(task, "trainable", None)
    if fn is None or fn(names):
      total += int(np.prod(x.shape))
  return total


def _summary(config, prepared, task, state, m, per_phase) -> dict[str, Any]:
  tcfg = config.tokenizer
  n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params.get("tokenizer", state.params))))
  out = {
      "variant": str(tcfg.variant), "split": "val", "num_volumes": m["num_volumes"],
      # what it was trained and evaluated on: the privacy ledger (evaluation/privacy/epsilon.py) reads it
      "fit_on": prepare_stage.fit_on(config), "train_cohort": prepared.root,
      "train_cohort_hash": prepared.meta.get("config_hash"),
      "psnr": m["psnr"], "ssim": m["ssim"], "l1": m["l1"], "boundary_band_l1": m["band_l1"],
      "codebooks": m["codebooks"], "phases": per_phase, "tokenizer_params": n_params,
      "volume_shape": list(prepared.shape), "channels": input_channels(config, prepared),
      "boundary_band": ("cohort masks (edge band where a volume's mask has no boundary)" if prepared.has_masks
                        else "image edges (top {:.0%} gradient magnitude), no masks in the cohort").format(
                            float(tcfg.loss.edge_fraction)) + f", half-width {int(tcfg.loss.boundary_width)} voxel(s)",
      "perceptual": task.perceptual.description,
      "data_range": 1.0,
  }
  patch = int(tcfg.model.get("patch_size", 1))
  if str(tcfg.variant) == "dual":
    out["clinical_modes"] = {mode: {"psnr": m[f"psnr_{mode}"], "ssim": m[f"ssim_{mode}"],
                                    "boundary_band_l1": m[f"band_l1_{mode}"]} for mode in ("encoded", "predicted", "null")}
    out["clinical_modes"]["prior_top1_accuracy"] = m["prior_accuracy"]
    out["psnr_clinical_head"] = m["psnr_clinical_head"]
    out["latents"] = {"clinical": _latent_shape(prepared.shape, int(tcfg.clinical.level), int(tcfg.clinical.code_dim), patch),
                      "generative": _latent_shape(prepared.shape, len(tcfg.model.channels) - 1,
                                                  int(tcfg.generative.code_dim), patch)}
  else:
    out["latents"] = {"generative": _latent_shape(prepared.shape, len(tcfg.model.channels) - 1,
                                                  int(tcfg.generative.code_dim), patch)}
  return out


def _latent_shape(shape, level, dim, patch=1) -> list[int]:
  return [int(s) // (int(patch) * 2 ** level) for s in shape] + [dim]


def run(config, workdir: str) -> dict[str, Any]:
  """The pipeline stage: skips when tokenizer_metrics.json matches this config and cohort."""
  if "tokenizer" not in config:
    raise ValueError("config has no `tokenizer` block; attach synthmri_jax.config_blocks.tokenizer."
                     "tokenizer_config(...) as config.tokenizer")
  workdir = os.path.abspath(workdir)
  path = os.path.join(workdir, "tokenizer", METRICS_FILE)
  prepared = prepare_stage.fit_cohort(config, workdir)
  key = _config_key(config, prepared)
  done = io.read_json(path)
  if done and done.get("config_hash") == key:
    print(f"tokenizer: {path} is complete for this config, skipping", flush=True)
    return done
  t0 = time.time()
  metrics = train_variant(config, workdir)
  metrics["config_hash"] = key
  metrics["seconds"] = round(time.time() - t0, 1)
  if jax.process_index() == 0:
    io.write_json_atomic(path, metrics)
  line = f"tokenizer ({metrics['variant']}): val PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}"
  if "clinical_modes" in metrics:
    cm = metrics["clinical_modes"]
    line += f" | clinical predicted {cm['predicted']['psnr']:.2f} dB, null {cm['null']['psnr']:.2f} dB"
  print(line, flush=True)
  return metrics


def load_tokenizer(config, workdir: str, phase: Optional[str] = None):
  """(model, variables) of the trained tokenizer for the LDM: variables = {'params', 'vq_stats'}.

  Uses the EMA params when the run kept them, else the params, of the last phase (or `phase`).

      z = model.apply(variables, x, method=model.encode_generative)
      x_hat = model.apply(variables, z, method=model.decode_from_generative)
  """
  tcfg = config.tokenizer
  phase = phase or phase_names(tcfg)[-1]
  prepared = load_prepared(workdir)
  _, loaded = ckpt_lib.load_variables(os.path.join(phase_dir(workdir, phase), "checkpoints"))
  params = ckpt_lib.eval_params(loaded)
  model = build_tokenizer(tcfg, len(input_channels(config, prepared)))
  return model, {"params": params["tokenizer"], "vq_stats": loaded["model_state"].get("vq_stats", {})}


def tokenizer_codec(config, workdir: str, clinical: Optional[str] = None) -> LatentCodec:
  """The trained tokenizer of WORKDIR/tokenizer as a LatentCodec.

  encode: encode_generative (quantised or not per ldm.latents.quantized); decode:
  decode_from_generative with the clinical path `clinical` (default config.sample.clinical,
  else 'predicted'), which snaps a sampled latent to its nearest codes first.
  """
  metrics = io.read_json(os.path.join(os.path.abspath(workdir), "tokenizer", METRICS_FILE))
  if not metrics:
    raise UserInputError(f"{workdir}/tokenizer: no trained tokenizer (tokenizer_metrics.json missing); "
                         "run the 'tokenizer' stage first")
  model, variables = load_tokenizer(config, workdir)
  phase = phase_names(config.tokenizer)[-1]
  ckpt_dir = os.path.join(phase_dir(workdir, phase), "checkpoints")
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
  with_mask = bool(config.tokenizer.get("mask_channel", False))
  return LatentCodec(encode, decode, variables, key,
                     f"{metrics.get('variant')} tokenizer, phase {phase} step {max(steps) if steps else '?'}"
                     + (", image + mask channel" if with_mask else ""), mask_channel=with_mask)
