"""The privacy report of a synthetic cohort: copies, distance to closest record, membership
inference on the LDM, and epsilon of every model that saw private data.

    report = run_privacy(config, workdir, synthetic_volumes, synthetic_ids)   # -> WORKDIR/evaluation/privacy.json
    report = run_privacy_on(config, workdir, synthetic)   # on an ingested cohort (evaluation.stage.load_synthetic)
    flags = flag_generated(config, workdir, volumes)  # sample.reject_copies: is each new volume a copy?

Copies (Dar et al. 2024) use two similarities to the training scans, each with its threshold τ
calibrated on real data only (calibration split vs train, privacy_stats.calibrate_threshold):
- 'embedding': Pearson correlation of the contrastive privacy encoder's embeddings
  (evaluation.embedding), invariant to small shifts, intensity changes and noise by training;
- 'voxel': 3D-tiled normalised L2 on `voxel_pool`-averaged volumes (privacy_stats), which needs
  no training and catches near-verbatim copies whatever the encoder learned.
privacy.copy_rule picks the flagging rule; 'either' flags a scan when one measure exceeds its τ
and calibrates each at 1 - (1 - quantile) / 2 (Bonferroni), so that genuinely new scans are still
flagged at most at 1 - quantile overall. `copies` in privacy.json lists every flagged synthetic
scan with its nearest training participant and score, so a user can remove it.

DCR / NNDR (privacy_stats.dcr_report): synthetic -> train beside holdout -> train, under both
measures. Membership inference: members are the LDM's training latents, non-members the holdout
split encoded by the same tokenizer; loss attack (Matsumoto et al. 2023) per timestep and
averaged, and PIA (Kong et al. 2024); ROC-AUC and TPR at 1 % FPR with bootstrap intervals.

privacy.json carries a key over its inputs (privacy block, the synthetic scans' bytes and ids, the
prepared cohort, ldm.json, the generative models' DP records); a rerun with the same key returns
the saved report without touching the encoder.

Epsilon: each model's WORKDIR/.../dp.json (written by the trainer's DP-SGD mode) or
'non-private (ε = ∞)'. The synthetic cohort inherits the guarantee of everything that shaped it
(tokenizer, LDM, and the non-DP statistics listed under `non_private_releases`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from synthmri_jax.data import loader
from synthmri_jax.data.cache import SPLITS, PreparedCohort, load_prepared
from synthmri_jax.evaluation import embedding as embedding_lib
from synthmri_jax.evaluation import privacy_stats
from synthmri_jax.evaluation.privacy_config import block as privacy_block
from synthmri_jax.training import trainer
from synthmri_jax import workdir as workdir_lib
from synthmri_jax.utils import io

PRIVACY_FILE = workdir_lib.PRIVACY_FILE
MEASURES = ("embedding", "voxel")
COPY_RULES = ("embedding", "voxel", "either")
_SKIP_TRAIN_ARMS = ("TSTR", "SEG_synthetic")   # evaluation runs trained on synthetic data only


def pool_volumes(volumes: np.ndarray, factor: int) -> np.ndarray:
  """(n, X, Y, Z[, C]) -> block means over factor^3 voxels (edges zero-padded), float32."""
  v = np.asarray(volumes, np.float32)
  if v.ndim == 4:
    v = v[..., None]
  f = int(factor)
  if f <= 1:
    return v
  pad = [(0, 0)] + [(0, -s % f) for s in v.shape[1:4]] + [(0, 0)]
  v = np.pad(v, pad)
  n, x, y, z, c = v.shape
  return v.reshape(n, x // f, f, y // f, f, z // f, f, c).mean(axis=(2, 4, 6))


def _load_split(prepared: PreparedCohort, split: str, pool: int) -> np.ndarray:
  src = loader.CohortSource(prepared, split, mmap=True)
  return np.concatenate([pool_volumes(src[i]["image"][None], pool) for i in range(len(src))], axis=0)


def _measure_quantiles(pc) -> dict[str, float]:
  rule = str(pc.copy_rule)
  if rule not in COPY_RULES:
    raise ValueError(f"privacy.copy_rule must be one of {COPY_RULES}, got {rule!r}")
  q = float(pc.quantile)
  if rule == "either":
    return {m: 1.0 - (1.0 - q) / 2.0 for m in MEASURES}
  return {rule: q}


# ------------------------------------------------------------------------------ copy checking


class CopyChecker:
  """Synthetic (or freshly generated) volumes -> copy flags against the training split.

  Built once per process and workdir by copy_checker(): the privacy encoder, the training
  scans' embeddings and pooled volumes, and τ per measure calibrated on
  `privacy.calibration_split` vs train.
  """

  def __init__(self, config, workdir: str, *, log: Callable[[str], None] = print,
               encoder: Optional[embedding_lib.Encoder] = None):
    pc = privacy_block(config)
    self.pc, self.workdir = pc, os.path.abspath(workdir)
    self.prepared = prepared = load_prepared(self.workdir)
    self.quantiles = _measure_quantiles(pc)
    self.rule = str(pc.copy_rule)
    self.voxel_kw = dict(tiles=tuple(int(t) for t in pc.voxel_tiles), aggregate=str(pc.voxel_aggregate))
    self.train_ids = prepared.split("train")["participant_id"].astype(str).tolist()
    cal_splits = [x.strip() for x in str(pc.calibration_split).split(",") if x.strip()]
    if not cal_splits or "train" in cal_splits or any(x not in SPLITS for x in cal_splits) \
        or sum(len(prepared.split(x)) for x in cal_splits) < 1:
      raise ValueError(f"privacy.calibration_split {pc.calibration_split!r} must name non-empty splits other than "
                       "train (comma-separated)")
    self.calibration_split = ",".join(cal_splits)
    cal_splits = [x for x in cal_splits if len(prepared.split(x))]
    self.n_calibration = sum(len(prepared.split(x)) for x in cal_splits)
    self.encoder = encoder if encoder is not None else embedding_lib.train_encoder(config, self.workdir, log=log)
    self.train = {"embedding": self.encoder.embed_source(loader.CohortSource(prepared, "train")),
                  "voxel": _load_split(prepared, "train", int(pc.voxel_pool))}
    cal = {"embedding": np.concatenate([self.encoder.embed_source(loader.CohortSource(prepared, x))
                                        for x in cal_splits]),
           "voxel": np.concatenate([_load_split(prepared, x, int(pc.voxel_pool)) for x in cal_splits])}
    self.calibration = {}
    for m, q in self.quantiles.items():
      self.calibration[m] = privacy_stats.calibrate_threshold(self.train[m], cal[m], self._metric(m), quantile=q,
                                                              direction=str(pc.direction), **self._kw(m))

  def _metric(self, measure: str) -> str:
    return "pearson" if measure == "embedding" else "tiled_l2"

  def _kw(self, measure: str) -> dict[str, Any]:
    return {} if measure == "embedding" else dict(self.voxel_kw)

  @property
  def taus(self) -> dict[str, float]:
    return {m: float(c["tau"]) for m, c in self.calibration.items()}

  def features(self, volumes: np.ndarray) -> dict[str, np.ndarray]:
    v = np.asarray(volumes, np.float32)
    v = v[..., None] if v.ndim == 4 else v
    return {"embedding": self.encoder.embed(v), "voxel": pool_volumes(v, int(self.pc.voxel_pool))}

  def neighbors(self, feats: dict[str, np.ndarray], k: int = 1) -> dict[str, privacy_stats.Neighbors]:
    return {m: privacy_stats.nearest_neighbors(feats[m], self.train[m], self._metric(m), k=k, **self._kw(m))
            for m in MEASURES}

  def flags(self, nn: dict[str, privacy_stats.Neighbors]) -> dict[str, Any]:
    """Per volume: is_copy (the rule), flagged_by, and per measure score / train index."""
    n = len(nn["embedding"].index)
    by = {m: nn[m].similarity[:, 0] > self.calibration[m]["tau"] for m in self.quantiles}
    is_copy = np.zeros(n, bool)
    for f in by.values():
      is_copy |= f
    default = "embedding" if "embedding" in self.quantiles else "voxel"

    def primary_of(i: int) -> str:
      hit = [m for m in MEASURES if m in by and by[m][i]]   # the embedding first
      return hit[0] if hit else default

    primary = [primary_of(i) for i in range(n)]
    return {"is_copy": is_copy, "flagged_by": [[m for m in by if by[m][i]] for i in range(n)],
            "measure": primary,
            "score": np.array([nn[primary[i]].similarity[i, 0] for i in range(n)]),
            "train_index": np.array([nn[primary[i]].index[i, 0] for i in range(n)], np.int64),
            **{f"{m}_score": nn[m].similarity[:, 0] for m in MEASURES},
            **{f"{m}_train_index": nn[m].index[:, 0] for m in MEASURES}}

  def __call__(self, volumes: np.ndarray) -> dict[str, Any]:
    """Flags of new volumes (n, X, Y, Z[, C]) on the prepared grid and intensity scale: is_copy (n,),
    train_participant_id, score and measure (the flagging measure, embedding first), flagged_by."""
    f = self.flags(self.neighbors(self.features(volumes)))
    f["train_participant_id"] = [self.train_ids[int(j)] for j in f["train_index"]]
    return f


_CHECKERS: dict[tuple[str, str], CopyChecker] = {}


def copy_checker(config, workdir: str, *, log: Callable[[str], None] = print) -> CopyChecker:
  """The CopyChecker of this workdir and privacy config, built once per process."""
  pc = privacy_block(config)
  key = (os.path.abspath(workdir), pc.to_json(sort_keys=True))
  if key not in _CHECKERS:
    _CHECKERS[key] = CopyChecker(config, workdir, log=log)
  return _CHECKERS[key]


def flag_generated(config, workdir: str, volumes: np.ndarray, *, log: Callable[[str], None] = print) -> dict[str, Any]:
  """For sample.reject_copies: checks generated volumes (n, X, Y, Z[, C]) -- or one (X, Y, Z[, C])
  with a leading axis added by the caller -- against the training split with the same encoder,
  measures, rule and τ as run_privacy. Returns {"is_copy": bool (n,), "train_participant_id":
  [n], "score": (n,), "measure": [n], "flagged_by": [n lists], "tau": {measure: τ}}. The first
  call trains (or loads) the privacy encoder and calibrates; later calls only embed and compare.
  """
  checker = copy_checker(config, workdir, log=log)
  out = checker(volumes)
  out["tau"] = checker.taus
  return out


# ------------------------------------------------------------------------------ figures


def mid_slices(v: np.ndarray) -> list[np.ndarray]:
  """Axial, coronal, sagittal mid slices of channel 0 of an RAS+ volume, oriented for imshow."""
  v = np.asarray(v, np.float32)
  v = v[..., 0] if v.ndim == 4 else v
  x, y, z = (s // 2 for s in v.shape)
  return [v[:, :, z].T, v[:, y, :].T, v[x, :, :].T]


def save_pair_figure(path: str, synthetic: np.ndarray, train: np.ndarray, title: str) -> str:
  """Mid slices of a synthetic scan (top) and its nearest training scan (bottom), one PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = [mid_slices(synthetic), mid_slices(train)]
  lo = min(float(np.min(r)) for row in rows for r in row)
  hi = max(float(np.max(r)) for row in rows for r in row)
  fig, axes = plt.subplots(2, 3, figsize=(7.5, 5.4))
  for i, (row, name) in enumerate(zip(rows, ("synthetic", "nearest train"))):
    for j, (img, view) in enumerate(zip(row, ("axial", "coronal", "sagittal"))):
      ax = axes[i, j]
      ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi if hi > lo else lo + 1)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(view, fontsize=9)
      if j == 0:
        ax.set_ylabel(name, fontsize=9)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  with io.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=90, format="png")
  plt.close(fig)
  return path


# ------------------------------------------------------------------------------ membership inference


def diffusion_attack_scores(apply_fn: Callable, schedule, params: Any, x0: np.ndarray, cond: dict[str, np.ndarray],
                            timesteps: Sequence[int], *, prediction_type: str = "epsilon", noise_draws: int = 4,
                            pia_timestep: int = 200, batch_size: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
  """Per-example attack inputs for a latent diffusion model.

  apply_fn(params, x_t, t, cond) -> the model output (prediction_type). Returns {"losses":
  (n, len(timesteps)) denoising MSE (mean over latent elements and `noise_draws` draws, the
  noise keyed by (seed, example position, timestep, draw): pass different seeds for members
  and non-members), "pia": (n,) privacy_stats.pia_attack_score}. One jitted model call,
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
    pia[idx] = privacy_stats.pia_attack_score(np.asarray(e0)[:len(idx)], np.asarray(et)[:len(idx)])
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
  loss = privacy_stats.membership_inference_report(
      privacy_stats.loss_attack_score(members["losses"]), privacy_stats.loss_attack_score(nonmembers["losses"]),
      fprs=(0.01,), n_boot=n_boot, seed=seed)
  per_t = privacy_stats.mia_by_timestep(members["losses"], nonmembers["losses"], list(timesteps), n_boot=n_boot,
                                        seed=seed)
  pia = privacy_stats.membership_inference_report(members["pia"], nonmembers["pia"], fprs=(0.01,), n_boot=n_boot,
                                                  seed=seed)
  summary = lambda r: {"auc": r["auc"]["auc"], "auc_ci": [r["auc"]["ci_low"], r["auc"]["ci_high"]],
                       **operating_point(r), "advantage": r["advantage"]}
  return {"n_members": loss["n_members"], "n_nonmembers": loss["n_nonmembers"],
          "loss_attack": {**summary(loss), "timesteps": [int(t) for t in timesteps], "per_timestep": per_t,
                          "detail": loss},
          "pia": {**summary(pia), "detail": pia}}


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
  from synthmri_jax.training.tasks import ldm as ldm_lib

  meta = io.read_json(os.path.join(ldm_lib.ldm_dir(workdir), ldm_lib.META_FILE))
  if not meta or not meta.get("complete"):
    return {"skipped": f"the LDM in {ldm_lib.ldm_dir(workdir)} is not complete (ldm.json)"}
  hold_split = str(pc.holdout_split)
  if len(prepared.split(hold_split)) < 2:
    return {"skipped": f"the {hold_split!r} split has fewer than 2 scans: no non-members to attack with"}
  index = io.read_json(os.path.join(ldm_lib.latents_dir(workdir), "index.json")) or {}
  norm = ldm_lib.LatentNorm.from_meta(meta, ldm_lib.ldm_dir(workdir))
  attributes = ldm_lib.attributes_from_meta(meta)
  latent_shape = tuple(meta["latent_shape"])
  model, schedule = ldm_lib.build(meta["ldm"], latent_shape[-1], len(meta["labels"]), attributes)
  step, loaded = ckpt_lib.load_variables(os.path.join(ldm_lib.ldm_dir(workdir), "checkpoints"))
  params = ckpt_lib.eval_params(loaded)
  prediction_type = str(meta["ldm"]["diffusion"]["prediction_type"])

  member_cond = ldm_lib.split_attributes(prepared, "train", attributes)
  members = norm.normalize(np.load(os.path.join(ldm_lib.latents_dir(workdir), "train.npy")).astype(np.float32),
                           member_cond[unet_lib.LABEL])
  codec = codec if codec is not None else ldm_lib.tokenizer_codec(config, workdir)
  cache = os.path.join(workdir_lib.evaluation_dir(workdir), "privacy", f"{hold_split}_latents_{codec.key}.npy")
  if os.path.exists(cache):
    hold = np.load(cache)
  else:
    log(f"privacy: encoding the {hold_split} split with the LDM's tokenizer for membership inference")
    src = loader.CohortSource(prepared, hold_split)
    enc = jax.jit(codec.encode)
    hold = np.concatenate([np.asarray(jax.device_get(enc(codec.variables, src[i]["image"][None])), np.float32)
                           for i in range(len(src))], axis=0)
    if jax.process_index() == 0:
      with io.atomic_path(cache, suffix=".npy") as tmp:
        np.save(tmp, hold)
  hold_cond = ldm_lib.split_attributes(prepared, hold_split, attributes)
  hold = norm.normalize(hold, hold_cond[unet_lib.LABEL])
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
  out.update(ldm_step=int(step), nonmember_split=hold_split, prediction_type=prediction_type,
             latent_cache_key=index.get("key"), seconds=round(time.time() - t0, 1))
  return out


# ------------------------------------------------------------------------------ epsilon per model


def _dp_entry(name: str, path: str, saw_private: bool, records: list[Optional[dict]]) -> dict[str, Any]:
  """One model: DP if every training run it is made of has a complete, private dp.json."""
  entry: dict[str, Any] = {"model": name, "path": path, "saw_private_data": saw_private}
  if not saw_private:
    entry.update(private=True, epsilon=0.0, statement="trained on synthetic data only: inherits the generator's "
                 "guarantee (post-processing)")
    return entry
  ok = records and all(r and r.get("private") and r.get("epsilon_pld") is not None for r in records)
  if not ok:
    entry.update(private=False, epsilon=None, statement="non-private (ε = ∞)")
    return entry
  eps_pld = sum(float(r["epsilon_pld"]) for r in records)
  eps_rdp = sum(float(r["epsilon_rdp"]) for r in records)
  delta = sum(float(r.get("delta_total") or r["delta"]) for r in records)
  entry.update(private=True, epsilon=eps_pld, epsilon_pld=eps_pld, epsilon_rdp=eps_rdp, delta=delta,
               runs=[{k: r.get(k) for k in ("task", "steps", "noise_multiplier", "l2_clip", "sampling_probability",
                                            "epsilon_pld", "epsilon_rdp", "delta", "delta_total", "overflow_steps")}
                     for r in records],
               statement=f"DP-SGD: ε = {eps_pld:.3g} (PLD; RDP {eps_rdp:.3g}), δ = {delta:.3g}"
               + (" (basic composition of its training stages)" if len(records) > 1 else ""))
  return entry


def _run_dirs(root: str) -> list[str]:
  """Trainer run folders (with checkpoints/) under root, root itself included."""
  return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", "checkpoints"), recursive=True)
                if os.path.isdir(p))


def models_epsilon(workdir: str) -> dict[str, Any]:
  """Every model trained in WORKDIR with its ε, and what that means for the synthetic cohort."""
  workdir = os.path.abspath(workdir)
  read = lambda d: io.read_json(os.path.join(d, trainer.DP_FILE))
  models = []
  tok_root = os.path.join(workdir, "tokenizer")
  tok_runs = _run_dirs(tok_root) if os.path.isdir(tok_root) else []
  if tok_runs:
    models.append(_dp_entry("tokenizer", tok_root, True, [read(d) for d in tok_runs]))
  ldm_root = os.path.join(workdir, "ldm")
  if os.path.isdir(os.path.join(ldm_root, "checkpoints")):
    models.append(_dp_entry("ldm", ldm_root, True, [read(ldm_root)]))
  runs = os.path.join(workdir_lib.evaluation_dir(workdir), "runs")
  for d in _run_dirs(runs) if os.path.isdir(runs) else []:
    rel = os.path.relpath(d, runs)
    arm = rel.split(os.sep)[0]
    models.append(_dp_entry(f"evaluation/{rel}", d, arm not in _SKIP_TRAIN_ARMS, [read(d)]))
  enc = io.read_json(os.path.join(embedding_lib.encoder_dir(workdir), embedding_lib.META_FILE)) or {}
  if enc.get("run_dir") and os.path.isdir(enc["run_dir"]):   # the current encoder (older keys are unused)
    e = _dp_entry("privacy_encoder", enc["run_dir"], True, [read(enc["run_dir"])])
    e["statement"] += "; evaluation tool, never exported"
    models.append(e)

  by = {m["model"]: m for m in models}
  generator = [by[k] for k in ("tokenizer", "ldm") if k in by]
  non_private_releases = [
      "LDM latent standardisation (mean and std of the training latents: global, per channel, per element or "
      "per label and element)",
      "sample stage attribute model (per-label label / sex frequencies and age KDE or normal fit on the training split)",
  ]
  if generator and all(m["private"] for m in generator) and len(generator) == 2:
    eps = sum(m["epsilon"] for m in generator)
    cohort = {"epsilon_generator_upper_bound": eps, "delta": sum(m["delta"] for m in generator),
              "statement": f"tokenizer + LDM: ε ≤ {eps:.3g} by basic composition, for the network weights; the "
                           "cohort is formally DP only if the non-private releases below are made private too"}
  else:
    missing = [k for k in ("tokenizer", "ldm") if k not in by or not by[k]["private"]]
    cohort = {"epsilon_generator_upper_bound": None, "delta": None,
              "statement": "non-private (ε = ∞): " + ", ".join(
                  f"{k} {'not found' if k not in by else 'trained without DP'}" for k in missing)}
  cohort["non_private_releases"] = non_private_releases
  return {"models": models, "synthetic_cohort": cohort}


# ------------------------------------------------------------------------------ the report


def run_privacy(config, workdir: str, synthetic_volumes: np.ndarray, synthetic_ids: Sequence[str], *,
                codec=None, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The whole privacy report of a synthetic cohort on the prepared grid; writes
  WORKDIR/evaluation/privacy.json (atomic) and the closest-pair figures, returns the report."""
  pc = privacy_block(config)
  workdir = os.path.abspath(workdir)
  t0 = time.time()
  ids = [str(i) for i in synthetic_ids]
  vols = np.asarray(synthetic_volumes, np.float32)
  vols = vols[..., None] if vols.ndim == 4 else vols
  if len(ids) != len(vols) or len(vols) < 2:
    raise ValueError(f"need >= 2 synthetic volumes with one id each, got {len(vols)} volumes and {len(ids)} ids")
  key = _result_key(pc, workdir, vols, ids)
  out_path = os.path.join(workdir_lib.evaluation_dir(workdir), PRIVACY_FILE)
  done = io.read_json(out_path)
  if done and done.get("complete") and done.get("key") == key:
    log(f"privacy: {out_path} is up to date (key {key}); not recomputed")
    _log_summary(done, log)
    return done
  checker = copy_checker(config, workdir, log=log)
  prepared = checker.prepared
  feats = checker.features(vols)
  nn = checker.neighbors(feats, k=1)
  flags = checker.flags(nn)
  train_ids = checker.train_ids

  measures = {}
  for mname in MEASURES:
    if mname in checker.calibration:
      rep = privacy_stats.copy_report(nn[mname], checker.calibration[mname], ids, train_ids, int(pc.num_figures))
      measures[mname] = {**rep, "calibration": checker.calibration[mname]}
    else:
      best = nn[mname].similarity[:, 0]
      order = np.argsort(-best, kind="stable")[: int(pc.num_figures)]
      measures[mname] = {"used_for_flagging": False, "closest_pairs": [
          {"synthetic_id": ids[i], "train_id": train_ids[int(nn[mname].index[i, 0])], "score": float(best[i])}
          for i in order]}

  copies = []
  for i in np.flatnonzero(flags["is_copy"]):
    mname = flags["measure"][i]
    copies.append({
        "participant_id": ids[i], "nearest_train_participant_id": train_ids[int(flags["train_index"][i])],
        "score": float(flags["score"][i]), "measure": mname, "tau": checker.taus[mname],
        "flagged_by": flags["flagged_by"][i],
        **{f"{m}_score": float(flags[f"{m}_score"][i]) for m in MEASURES},
        **{f"{m}_nearest_train_participant_id": train_ids[int(flags[f"{m}_train_index"][i])] for m in MEASURES}})
  copies.sort(key=lambda c: -c["score"])
  memorized: dict[str, dict[str, Any]] = {}
  for c in copies:
    e = memorized.setdefault(c["nearest_train_participant_id"], {"train_participant_id": c["nearest_train_participant_id"],
                                                                 "n_copies": 0, "max_score": c["score"],
                                                                 "copies": []})
    e["n_copies"] += 1
    e["copies"].append(c["participant_id"])
  n = len(ids)
  q = float(pc.quantile)
  expected = sum(float(privacy_stats.null_copy_count(n, checker.n_calibration, checker.quantiles[m]).mean()) / n
                 for m in checker.quantiles)

  # Closest pairs (primary measure: the embedding) as figures.
  fig_dir = os.path.join(workdir_lib.evaluation_dir(workdir), "figures")
  primary = "embedding"
  best = nn[primary].similarity[:, 0]
  order = np.argsort(-best, kind="stable")[: int(pc.num_figures)]
  train_src = loader.CohortSource(prepared, "train", mmap=True)
  pairs = []
  for rank, i in enumerate(order):
    j = int(nn[primary].index[i, 0])
    path = os.path.join(fig_dir, f"privacy_pair_{rank:02d}.png")
    title = (f"{ids[i]} vs train {train_ids[j]}: embedding r = {best[i]:.3f} (τ {checker.taus.get(primary, math.nan):.3f}), "
             f"voxel s = {flags['voxel_score'][i]:.3f}" + (" — COPY" if flags["is_copy"][i] else ""))
    if jax.process_index() == 0:
      save_pair_figure(path, vols[i], np.asarray(train_src[j]["image"]), title)
    pairs.append({"participant_id": ids[i], "train_participant_id": train_ids[j], "embedding_score": float(best[i]),
                  "voxel_score": float(flags["voxel_score"][i]), "is_copy": bool(flags["is_copy"][i]),
                  "figure": os.path.relpath(path, workdir)})

  # DCR / NNDR against the holdout split.
  hold_split = str(pc.holdout_split)
  dcr: dict[str, Any] = {}
  if len(prepared.split(hold_split)) >= 2 and len(train_ids) >= 2:
    hold = {"embedding": checker.encoder.embed_source(loader.CohortSource(prepared, hold_split)),
            "voxel": _load_split(prepared, hold_split, int(pc.voxel_pool))}
    for mname in MEASURES:
      dcr[mname] = privacy_stats.dcr_report(feats[mname], checker.train[mname], hold[mname], checker._metric(mname),
                                            **checker._kw(mname))
  else:
    dcr = {"skipped": f"the {hold_split!r} split needs >= 2 scans"}

  mia = ldm_membership_inference(config, workdir, prepared, codec=codec, log=log)

  epsilon = models_epsilon(workdir)
  report = {
      "complete": True,
      "key": key,
      "synthetic": {"n": n},
      "real": {"n_train": len(train_ids), "calibration_split": checker.calibration_split,
               "n_calibration": checker.n_calibration, "holdout_split": hold_split,
               "n_holdout": int(len(prepared.split(hold_split)))},
      "copy_rule": checker.rule, "quantile": q, "measure_quantiles": checker.quantiles, "tau": checker.taus,
      "n_copies": len(copies), "copy_fraction": len(copies) / n,
      "expected_false_copy_fraction": expected,
      "copies": copies,
      "n_memorized": len(memorized), "memorized": sorted(memorized.values(), key=lambda e: -e["max_score"]),
      "closest_pairs": pairs,
      "measures": measures,
      "dcr": dcr,
      "membership_inference": mia,
      "epsilon": epsilon,
      "encoder": {k: checker.encoder.meta.get(k) for k in ("key", "splits", "n_scans", "steps", "reidentification",
                                                            "final_metrics")},
      "seconds": round(time.time() - t0, 1),
  }
  if jax.process_index() == 0:
    io.write_json_atomic(out_path, report)
  _log_summary(report, log)
  return report


def _result_key(pc, workdir: str, vols: np.ndarray, ids: Sequence[str]) -> str:
  """What privacy.json depends on: the privacy block, the synthetic scans themselves, the prepared
  cohort, the LDM the membership attacks query (ldm.json) and every model's DP record. A rerun
  with the same key reuses the finished report; any change recomputes it."""
  from synthmri_jax.training.tasks import ldm as ldm_lib
  prepared = io.read_json(os.path.join(workdir_lib.data_dir(workdir), workdir_lib.PREPARED_META_FILE)) or {}
  ldm_meta = io.read_json(os.path.join(ldm_lib.ldm_dir(workdir), ldm_lib.META_FILE))
  h = hashlib.sha256(json.dumps({
      "privacy": pc.to_dict(), "ids": list(ids), "prepared": prepared.get("config_hash"),
      "ldm": ldm_meta,
      # The privacy encoder's entry appears once this report has trained it: not an input.
      "epsilon": [m for m in models_epsilon(workdir)["models"] if m["model"] != "privacy_encoder"]},
      sort_keys=True, default=str).encode())
  h.update(np.ascontiguousarray(vols, np.float32).tobytes())
  return h.hexdigest()[:16]


def _log_summary(r: dict[str, Any], log: Callable[[str], None]) -> None:
  log(f"privacy: {r['n_copies']}/{r['synthetic']['n']} synthetic scans flagged as copies "
      f"(expected from calibration alone: {r['expected_false_copy_fraction']:.1%}), "
      f"{r['n_memorized']} training scans memorised; τ " + ", ".join(f"{k} {v:.4f}" for k, v in r["tau"].items()))
  d = r["dcr"].get("embedding") if isinstance(r["dcr"], dict) else None
  if d:
    log(f"privacy: closer to train than to holdout: {d['closer_to_train_share']:.0%} (expected "
        f"{d['expected_share']:.0%}, p = {d['share_p_value']:.3g})")
  mia = r["membership_inference"]
  if "skipped" in mia:
    log(f"privacy: membership inference skipped: {mia['skipped']}")
  else:
    op = lambda a: (f"TPR@1%FPR {a['tpr_at_1pct_fpr']:.3f}" if a["tpr_at_1pct_fpr_resolvable"] else
                    f"TPR@{a['smallest_resolvable_fpr']:.1%}FPR {a['tpr_at_smallest_fpr']:.3f} (1 % FPR not resolvable "
                    f"with {mia['n_nonmembers']} non-members)")
    log(f"privacy: MIA loss AUC {mia['loss_attack']['auc']:.3f} {op(mia['loss_attack'])}; "
        f"PIA AUC {mia['pia']['auc']:.3f} {op(mia['pia'])}")
  for m in r["epsilon"]["models"]:
    log(f"privacy: {m['model']}: {m['statement']}")


def run_privacy_on(config, workdir: str, synthetic, *, log: Callable[[str], None] = print) -> dict[str, Any]:
  """run_privacy on an ingested synthetic cohort (synthetic_cohort.load_synthetic_cohort)."""
  src = synthetic.source()
  vols = np.stack([src[i]["image"] for i in range(len(src))])
  return run_privacy(config, workdir, vols, synthetic.table["participant_id"].astype(str).tolist(), log=log)
