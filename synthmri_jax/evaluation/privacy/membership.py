"""Membership inference on the LDM: members are its training latents, non-members the holdout split
encoded by the same tokenizer; the loss attack (Matsumoto et al. 2023) per timestep and averaged,
and PIA (Kong et al. 2024); ROC-AUC with bootstrap intervals, and the TPR at a low FPR only
where the non-members can resolve it."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from synthmri_jax import workdir as workdir_lib
from synthmri_jax.config_blocks.privacy import block as privacy_block
from synthmri_jax.data.cache import PreparedCohort
from synthmri_jax.evaluation import membership_stats
from synthmri_jax.utils import io


def diffusion_attack_scores(apply_fn: Callable, schedule, params: Any, x0: np.ndarray, cond: dict[str, np.ndarray],
                            timesteps: Sequence[int], *, prediction_type: str = "epsilon", noise_draws: int = 4,
                            pia_timestep: int = 200, batch_size: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
  """Per-example attack inputs for a latent diffusion model.

  apply_fn(params, x_t, t, cond) -> the model output (prediction_type). Returns {"losses":
  (n, len(timesteps)) denoising MSE (mean over latent elements and `noise_draws` draws, the
  noise keyed by (seed, example position, timestep, draw): pass different seeds for members
  and non-members), "pia": (n,) membership_stats.pia_attack_score}. One jitted model call,
  reused for every timestep, draw and batch (batches padded to a fixed size).
  """
  x0 = np.asarray(x0, np.float32)
  n = len(x0)
  names = sorted(cond)

  @jax.jit
  def eps_and_loss(params, x, c, t, noise, clean):
    """(predicted eps, MSE to the training target) at timestep t for x_t = q_sample(x, t, noise),
    or for x_t = x itself when `clean` (PIA's t = 0 query)."""
    x_t = jnp.where(clean, x, schedule.q_sample(x, t, noise))
    out = apply_fn(params, x_t, t, c).astype(jnp.float32)
    target = schedule.training_target(x, noise, t, prediction_type).astype(jnp.float32)
    eps = schedule.split_prediction(x_t, t, out, prediction_type)[1]
    return eps, jnp.mean(jnp.square(out - target).reshape(x.shape[0], -1), axis=1)

  @jax.jit
  def draw(pos, t_idx, d):
    keys = jax.vmap(lambda p: jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
        jax.random.key(seed), p), t_idx), d))(pos)
    size = int(np.prod(x0.shape[1:]))
    return jax.vmap(lambda k: jax.random.normal(k, (size,)).reshape(x0.shape[1:]))(keys)

  losses, pia = np.zeros((n, len(timesteps))), np.zeros(n)
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(n, start + batch_size))
    full = np.concatenate([idx, np.repeat(idx[-1:], batch_size - len(idx))])
    x = jnp.asarray(x0[full])
    c = {k: jnp.asarray(np.asarray(cond[k])[full]) for k in names}
    pos = jnp.asarray(full, jnp.int32)
    for i, t in enumerate(timesteps):
      tt = jnp.full((batch_size,), int(t), jnp.int32)
      acc = 0.0
      for d in range(int(noise_draws)):
        acc = acc + eps_and_loss(params, x, c, tt, draw(pos, i, d), False)[1]
      losses[idx, i] = np.asarray(jax.device_get(acc))[:len(idx)] / int(noise_draws)
    # PIA: eps0 = model(x0, t=0), then the deterministic x_t built with eps0 at the attack timestep.
    zero_t = jnp.zeros((batch_size,), jnp.int32)
    e0 = eps_and_loss(params, x, c, zero_t, jnp.zeros_like(x), True)[0]
    et = eps_and_loss(params, x, c, jnp.full((batch_size,), int(pia_timestep), jnp.int32), e0, False)[0]
    e0, et = jax.device_get((e0, et))
    pia[idx] = membership_stats.pia_attack_score(np.asarray(e0)[:len(idx)], np.asarray(et)[:len(idx)])
  return {"losses": losses, "pia": pia}


def operating_point(report: dict[str, Any], fpr: float = 0.01) -> dict[str, Any]:
  """TPR at `fpr` only where it is resolvable (>= 1/fpr non-members); always the TPR at the smallest
  FPR the non-members resolve (1 / n_nonmembers), so a small holdout says what it can measure."""
  hit, low = report["tpr_at_fpr"][str(fpr)], report["tpr_at_smallest_fpr"]
  return {"tpr_at_1pct_fpr": hit["tpr"] if hit["resolvable"] else None,
          "tpr_at_1pct_fpr_resolvable": bool(hit["resolvable"]),
          "smallest_resolvable_fpr": low["fpr"], "tpr_at_smallest_fpr": low["tpr"]}


def membership_inference(members: dict[str, np.ndarray], nonmembers: dict[str, np.ndarray],
                         timesteps: Sequence[int], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
  """Loss attack (mean over timesteps, and per timestep) and PIA from diffusion_attack_scores outputs."""
  loss = membership_stats.membership_inference_report(
      membership_stats.loss_attack_score(members["losses"]), membership_stats.loss_attack_score(nonmembers["losses"]),
      fprs=(0.01,), n_boot=n_boot, seed=seed)
  per_t = membership_stats.mia_by_timestep(members["losses"], nonmembers["losses"], list(timesteps), n_boot=n_boot,
                                        seed=seed)
  pia = membership_stats.membership_inference_report(members["pia"], nonmembers["pia"], fprs=(0.01,), n_boot=n_boot,
                                                  seed=seed)
  summary = lambda r: {"auc": r["auc"]["auc"], "auc_ci": [r["auc"]["ci_low"], r["auc"]["ci_high"]],
                       **operating_point(r), "advantage": r["advantage"]}
  return {"n_members": loss["n_members"], "n_nonmembers": loss["n_nonmembers"],
          "loss_attack": {**summary(loss), "timesteps": [int(t) for t in timesteps], "per_timestep": per_t,
                          "detail": loss},
          "pia": {**summary(pia), "detail": pia}}


def split_bias_control(control: dict[str, np.ndarray], nonmembers: dict[str, np.ndarray], control_split: str,
                       nonmember_split: str, timesteps: Sequence[int], n_boot: int = 1000,
                       seed: int = 0) -> dict[str, Any]:
  """The same attacks with a second non-member split in the members' place.

  Neither split was trained on, so any AUC away from 0.5 is what the attack picks up from how the
  splits differ (size, composition, chance), not membership: published attacks on medical models
  reach real-attack AUCs between two non-member splits. The real attack's AUC is evidence of
  memorisation only where it clears this one.
  """
  r = membership_inference(control, nonmembers, timesteps, n_boot, seed)
  keep = ("auc", "auc_ci", "advantage")
  return {"control_split": control_split, "nonmember_split": nonmember_split,
          "n_control": r["n_members"], "n_nonmembers": r["n_nonmembers"],
          "loss_attack": {k: r["loss_attack"][k] for k in keep}, "pia": {k: r["pia"][k] for k in keep}}


def ldm_membership_inference(config, workdir: str, prepared: PreparedCohort, *, codec=None,
                             log: Callable[[str], None] = print) -> dict[str, Any]:
  """Members (the LDM's cached training latents) vs the holdout split encoded by the same codec."""
  pc = privacy_block(config)
  m = pc.mia
  if not m.enabled:
    return {"skipped": "privacy.mia.enabled is false"}
  ldm_root = os.path.join(os.path.abspath(workdir), "ldm")
  if not os.path.exists(os.path.join(ldm_root, workdir_lib.LDM_META_FILE)):
    return {"skipped": f"no trained LDM in {ldm_root} (ldm.json missing)"}
  from synthmri_jax.training import checkpoint as ckpt_lib   # the LDM's modules only when there is one
  from synthmri_jax.models import unet as unet_lib
  from synthmri_jax.latents import LatentNorm
  from synthmri_jax.pipeline import tokenizer
  from synthmri_jax.tasks import ldm as ldm_task

  meta = io.read_json(os.path.join(workdir_lib.ldm_dir(workdir), workdir_lib.LDM_META_FILE))
  if not meta or not meta.get("complete"):
    return {"skipped": f"the LDM in {workdir_lib.ldm_dir(workdir)} is not complete (ldm.json)"}
  hold_split = str(pc.holdout_split)
  if len(prepared.split(hold_split)) < 2:
    return {"skipped": f"the {hold_split!r} split has fewer than 2 scans: no non-members to attack with"}
  index = io.read_json(os.path.join(workdir_lib.latents_dir(workdir), "index.json")) or {}
  norm = LatentNorm.from_meta(meta, workdir_lib.ldm_dir(workdir))
  attributes = ldm_task.attributes_from_meta(meta)
  latent_shape = tuple(meta["latent_shape"])
  model, schedule = ldm_task.build(meta["ldm"], latent_shape[-1], len(meta["labels"]), attributes)
  step, loaded = ckpt_lib.load_variables(os.path.join(workdir_lib.ldm_dir(workdir), "checkpoints"))
  params = ckpt_lib.eval_params(loaded)
  prediction_type = str(meta["ldm"]["diffusion"]["prediction_type"])

  member_cond = ldm_task.split_attributes(prepared, "train", attributes)
  members = norm.normalize(np.load(os.path.join(workdir_lib.latents_dir(workdir), "train.npy")).astype(np.float32),
                           member_cond[unet_lib.LABEL])
  codec = codec if codec is not None else tokenizer.tokenizer_codec(config, workdir)

  def split_latents(split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A split's normalised latents (the LDM stage's cache, else encoded once and cached) and conditions."""
    cond = ldm_task.split_attributes(prepared, split, attributes)
    cached = os.path.join(workdir_lib.latents_dir(workdir), f"{split}.npy")
    cache = os.path.join(workdir_lib.evaluation_dir(workdir), "privacy", f"{split}_latents_{codec.key}.npy")
    if (index.get("splits") or {}).get(split, {}).get("complete") and os.path.exists(cached):
      z = np.load(cached).astype(np.float32)
    elif os.path.exists(cache):
      z = np.load(cache)
    else:
      log(f"privacy: encoding the {split} split with the LDM's tokenizer for membership inference")
      src = codec.source(prepared, split)
      enc = jax.jit(codec.encode)
      z = np.concatenate([np.asarray(jax.device_get(enc(codec.variables, src[i]["image"][None])), np.float32)
                          for i in range(len(src))], axis=0)
      if jax.process_index() == 0:
        with io.atomic_path(cache, suffix=".npy") as tmp:
          np.save(tmp, z)
    return norm.normalize(z, cond[unet_lib.LABEL]), cond

  hold, hold_cond = split_latents(hold_split)
  if int(m.max_members) > 0 and len(members) > int(m.max_members):
    pick = np.sort(np.random.default_rng(int(pc.seed)).choice(len(members), int(m.max_members), replace=False))
    members, member_cond = members[pick], {k: v[pick] for k, v in member_cond.items()}
  names = model.conditioning.names if model.conditioning is not None else ()
  apply_fn = lambda p, x, t, c: model.apply({"params": p}, x, t, c if names else None)
  kw = dict(prediction_type=prediction_type, noise_draws=int(m.noise_draws), pia_timestep=int(m.pia_timestep),
            batch_size=int(m.batch_size), seed=int(pc.seed))
  t0 = time.time()
  sm = diffusion_attack_scores(apply_fn, schedule, params, members, {k: member_cond[k] for k in names},
                               m.timesteps, **kw)
  sh = diffusion_attack_scores(apply_fn, schedule, params, hold, {k: hold_cond[k] for k in names}, m.timesteps,
                               **{**kw, "seed": int(pc.seed) + 1})   # i.i.d. noise, not the members' draws
  out = membership_inference(sm, sh, m.timesteps, int(pc.n_boot), int(pc.seed))
  control = str(m.control_split).strip()
  if not control:
    out["split_bias_control"] = {"skipped": "privacy.mia.control_split is empty"}
  elif control in (hold_split, "train") or len(prepared.split(control)) < 2:
    out["split_bias_control"] = {"skipped": f"control split {control!r} is the holdout or train split, or has "
                                            "fewer than 2 scans"}
  else:
    zc, cc = split_latents(control)
    sc = diffusion_attack_scores(apply_fn, schedule, params, zc, {k: cc[k] for k in names}, m.timesteps,
                                 **{**kw, "seed": int(pc.seed) + 2})
    out["split_bias_control"] = split_bias_control(sc, sh, control, hold_split, m.timesteps, int(pc.n_boot),
                                                   int(pc.seed))
  out.update(ldm_step=int(step), nonmember_split=hold_split, prediction_type=prediction_type,
             latent_cache_key=index.get("key"), seconds=round(time.time() - t0, 1))
  return out
