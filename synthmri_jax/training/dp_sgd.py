"""DP-SGD: the step (per-example clipped gradients + Gaussian noise on Poisson-sampled batches),
its set-up from train.dp and the Poisson sampler, and WORKDIR/dp.json (settings and epsilon).
The mechanism, what it does not update, where its randomness comes from and how it is accounted:
docs/DP_SGD.md."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from synthmri_jax.data import loader as loader_lib
from synthmri_jax.training import dp_accounting, optim, train_step
from synthmri_jax.training import task as task_lib
from synthmri_jax.training.state import TrainState
from synthmri_jax.utils import backend as backend_lib
from synthmri_jax.utils import io

DP_FILE = "dp.json"   # WORKDIR/dp.json of a DP-SGD run: settings and epsilon spent


@dataclasses.dataclass(frozen=True)
class DPStep:
  """The DP-SGD step's constants (resolve_dp): C, sigma, the expected batch size B, microbatch."""

  l2_clip: float
  noise_multiplier: float
  expected_batch_size: int
  microbatch: int = 0


def _clipped_grad_fn(task: task_lib.Task, params: Any, model_state: Any, step: jax.Array, l2_clip: Any,
                     mask: Any, compute_dtype: Any) -> Callable:
  """(example, key, ok) -> (clipped gradient, (loss, metrics, norm, used)) for ONE example."""
  mask = jax.tree.map(lambda _: True, params) if mask is None else mask
  compute_dtype = jnp.dtype(compute_dtype)
  clip = jnp.asarray(l2_clip, jnp.float32)

  def example_loss(p, example, key):
    p = jax.tree.map(lambda t, x: x if t else jax.lax.stop_gradient(x), mask, p)
    b = jax.tree.map(lambda x: x[None], example)
    if compute_dtype != jnp.float32:
      p, b = train_step.cast_floats(p, compute_dtype), train_step.cast_floats(b, compute_dtype)
    loss, (metrics, _) = task.loss(p, model_state, b, key, step)
    return jnp.asarray(loss, jnp.float32), metrics

  grad_fn = jax.value_and_grad(example_loss, has_aux=True)

  def one(example, key, ok):
    (loss, metrics), g = grad_fn(params, example, key)
    norm = optax.tree.norm(g).astype(jnp.float32)
    used = ok & jnp.isfinite(norm)
    scale = jnp.where(used, jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-12)), 0.0)
    g = jax.tree.map(lambda x: jnp.where(used, x.astype(jnp.float32) * scale, 0.0), g)
    return g, (loss, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}, norm, used)

  return one


def clipped_example_grads(task: task_lib.Task, params: Any, model_state: Any, batch: dict[str, jax.Array],
                          keys: jax.Array, valid: jax.Array, step: jax.Array, l2_clip: float, *,
                          mask: Any = None, compute_dtype: Any = jnp.float32) -> tuple[Any, tuple]:
  """Per-example gradients of task.loss (each row a batch of one, with its key), each scaled to
  global L2 norm <= l2_clip; rows that are not `valid` or have a non-finite gradient give zeros.

  Returns (grads with a leading example axis, (loss_i, metrics_i, norm_i, used_i)); norm_i is
  the norm before clipping. `mask`: optim.trainable_mask (frozen leaves get no gradient).
  Vectorised with jax.vmap.
  """
  one = _clipped_grad_fn(task, params, model_state, step, l2_clip, mask, compute_dtype)
  return jax.vmap(one)(batch, keys, valid.astype(bool))


def dp_microbatch(dp: "DPStep") -> int:
  """Rows per vectorised chunk: train.dp.microbatch, or for 0 one row at a time on CPU (as fast
  as a vmapped batch there, with one row of gradients in memory) and the whole batch at once
  on accelerators (where vmap parallelises the per-example gradients)."""
  if dp.microbatch > 0:
    return int(dp.microbatch)
  return 1 if backend_lib.target() == "cpu" else 0


def make_dp_step(task: task_lib.Task, tx: optax.GradientTransformation, cfg, dp: DPStep) -> Callable:
  """DP-SGD `(state, batch, rng) -> (new_state, metrics)` on a padded Poisson batch.

  batch['valid'] (absent: all rows valid) marks the sampled rows. Row i uses the key
  fold_in(fold_in(rng, 0), i); clipped_example_grads gives its clipped gradient; the gradient
  handed to the optimizer is (sum_i g_i + N(0, (sigma C)^2 I)) / B, B the expected batch size,
  noise drawn from fold_in(rng, 1) as one flat vector over the trainable leaves. Rows are processed k =
  dp_microbatch(dp) at a time under lax.scan (same result, k rows of gradients in memory; the
  last chunk padded with invalid rows; k = 1 scans single rows without vmap). Metrics:
  the valid-weighted mean loss and task metrics, dp_batch_size, dp_clip_fraction (valid rows
  with norm > C) and dp_mean_norm (mean norm before clipping).
  """
  lr_fn = optim.current_lr(cfg)
  clip, std = float(dp.l2_clip), float(dp.noise_multiplier) * float(dp.l2_clip)
  expected = float(dp.expected_batch_size)

  def dp_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    mask = optim.trainable_mask(task, state.params)
    n = jax.tree.leaves(batch)[0].shape[0]
    valid = batch["valid"].astype(bool) if "valid" in batch else jnp.ones((n,), bool)
    row_key = jax.random.fold_in(rng, 0)
    keys = jax.vmap(lambda i: jax.random.fold_in(row_key, i))(jnp.arange(n))
    one = _clipped_grad_fn(task, state.params, state.model_state, state.step, clip, mask, cfg.compute_dtype)
    grads_of = lambda b, k, v: jax.vmap(one)(b, k, v)
    k = dp_microbatch(dp)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    if k <= 0 or k >= n:
      g, per = grads_of(batch, keys, valid)
      summed = jax.tree.map(lambda x: jnp.sum(x, axis=0), g)
    elif k == 1:   # a scan over single rows, no vmap; padding rows skip their forward/backward
      row0 = jax.tree.map(lambda x: x[0], (batch, keys, valid))
      shapes = jax.eval_shape(one, *row0)

      def body1(acc, xs):
        # A Poisson batch is padded to P(overflow) <= tolerance (~3x the expected size at
        # q = 1/6): lax.cond runs the gradient only for sampled rows.
        g, per = jax.lax.cond(xs[2], lambda: one(*xs),
                              lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
        return jax.tree.map(jnp.add, acc, g), per

      summed, per = jax.lax.scan(body1, zeros, (batch, keys, valid))
    else:
      m = -(-n // k) * k   # rows padded (valid=False) to whole micro-batches
      chunk = lambda x: jnp.pad(x, [(0, m - n)] + [(0, 0)] * (x.ndim - 1)).reshape((m // k, k) + x.shape[1:])

      def body(acc, xs):
        g, per = grads_of(*xs)
        return jax.tree.map(lambda a, b: a + jnp.sum(b, axis=0), acc, g), per

      keys_padded = jnp.concatenate([keys, keys[:1].repeat(m - n, axis=0)]).reshape((m // k, k))
      summed, per = jax.lax.scan(body, zeros, (jax.tree.map(chunk, batch), keys_padded, chunk(valid)))
      per = jax.tree.map(lambda x: x.reshape((m,) + x.shape[2:])[:n], per)
    loss_i, metrics_i, norm_i, used_i = per

    leaves, treedef = jax.tree.flatten(summed)
    trainable = jax.tree.leaves(mask)
    if std > 0.0:
      # One draw for every trainable coordinate (a threefry kernel per leaf compiles slowly on CPU).
      sizes = [int(np.prod(x.shape)) if t else 0 for x, t in zip(leaves, trainable)]
      flat = jax.random.normal(jax.random.fold_in(rng, 1), (sum(sizes),), jnp.float32)
      offsets = np.cumsum([0] + sizes)
      leaves = [x + std * flat[o:o + size].reshape(x.shape) if size else x
                for x, o, size in zip(leaves, offsets, sizes)]
    noisy = [x / expected for x in leaves]
    grads = jax.tree.map(lambda g_, p: g_.astype(p.dtype), jax.tree.unflatten(treedef, noisy), state.params)

    count = jnp.sum(valid.astype(jnp.float32))
    mean = lambda v: jnp.sum(jnp.where(valid, v, 0.0)) / jnp.maximum(count, 1.0)
    metrics = {name: mean(v) for name, v in metrics_i.items()}
    metrics.update(dp_batch_size=count, dp_clip_fraction=mean((norm_i > clip).astype(jnp.float32)),
                   dp_mean_norm=mean(jnp.where(used_i, norm_i, 0.0)))
    return train_step.finish_step(state, grads, mean(loss_i), metrics, state.model_state, train_step.all_finite(grads), mask, tx,
                        cfg, lr_fn)

  return dp_step


def resolve_dp(cfg, sampling: loader_lib.PoissonSampling, task_name: str = "") -> tuple[DPStep, dict[str, Any]]:
  """(DPStep, the dp.json record before training) from train.dp and the Poisson sampler.

  sigma is train.dp.noise_multiplier, or with target_epsilon > 0 the smallest noise whose
  epsilon after train.steps steps is <= target (dp_accounting.calibrate_noise, train.dp.accountant).
  """
  d = cfg.dp
  n, b, steps = int(sampling.dataset_size), int(sampling.expected_batch_size), int(cfg.steps)
  delta = float(d.delta) if d.delta > 0 else dp_accounting.default_delta(n)
  if d.target_epsilon > 0:
    noise = dp_accounting.calibrate_noise(float(d.target_epsilon), b, n, max(steps, 1), delta, str(d.accountant))
    source = f"calibrated ({d.accountant}) to target epsilon {float(d.target_epsilon):g} over {steps} steps"
  else:
    noise = float(d.noise_multiplier)
    source = "train.dp.noise_multiplier"
  step = DPStep(l2_clip=float(d.l2_clip), noise_multiplier=float(noise), expected_batch_size=b,
                microbatch=int(d.microbatch))
  record = {
      "enabled": True, "task": task_name, "mechanism": "dp_sgd_poisson_subsampled_gaussian",
      "neighboring_relation": "add_or_remove_one", "l2_clip": step.l2_clip,
      "noise_multiplier": step.noise_multiplier, "noise_std": step.noise_multiplier * step.l2_clip,
      "noise_source": source, "target_epsilon": float(d.target_epsilon) or None,
      "calibration_accountant": str(d.accountant), "delta": delta, "planned_steps": steps,
      "sampling": sampling.to_json(), "dataset_size": n, "expected_batch_size": b,
      "sampling_probability": sampling.q, "grad_accum": int(cfg.grad_accum),
      "model_state": "not updated under DP (kept at its initial / loaded value)",
      "metrics_note": "logged training metrics are computed on private data without noise; not for release",
  }
  return step, record


def dp_record_for_steps(record: dict[str, Any], sampling: loader_lib.PoissonSampling, steps: int) -> dict[str, Any]:
  """`record` with epsilon (both accountants, dp_accounting.dp_sgd_summary) for `steps` steps and
  the truncation term of delta: (1 + e^eps_pld) * steps * P(overflow per step)."""
  out = dict(record, steps=int(steps))
  noise, n, b, delta = record["noise_multiplier"], record["dataset_size"], record["expected_batch_size"], record["delta"]
  if steps <= 0:
    eps = {"epsilon_pld": 0.0, "epsilon_rdp": 0.0}
  elif noise <= 0:
    eps = {"epsilon_pld": None, "epsilon_rdp": None}
  else:
    summary = dp_accounting.dp_sgd_summary(noise, b, n, int(steps), delta)
    eps = {k: summary[k] for k in ("epsilon_pld", "epsilon_rdp")}
  out.update(eps)
  out["private"] = eps["epsilon_pld"] is not None
  p = sampling.overflow_probability
  e = eps["epsilon_pld"]
  if e is None:
    trunc = None
  else:
    trunc = 0.0 if p == 0.0 or steps <= 0 else (math.inf if e > 700 else (1.0 + math.exp(e)) * steps * p)
  out.update(overflow_probability_per_step=p, overflow_steps=int(sampling.overflow_steps(steps)),
             delta_truncation=trunc, delta_total=None if trunc is None else delta + trunc)
  return out


def write_dp_record(workdir: str, record: dict[str, Any]) -> None:
  if jax.process_index() == 0:
    io.write_json_atomic(os.path.join(workdir, DP_FILE), record)


def finish(say: Callable[[str], None], workdir: str, record: dict[str, Any], step: int, complete: bool) -> None:
  """Writes the spent budget's dp.json at the end of a run (or its interruption) and says it."""
  write_dp_record(workdir, dict(record, complete=complete))
  if record["epsilon_pld"] is not None:
    say(f"DP-SGD: {step} steps spent epsilon {record['epsilon_pld']:.4g} (PLD) / {record['epsilon_rdp']:.4g} (RDP) "
        f"at delta {record['delta']:.3g}; {record['overflow_steps']} truncated batches")


def setup(cfg, train_iter, dp_sampling: Optional[loader_lib.PoissonSampling], name: str):
  """(DPStep, dp.json record, sampler) of a DP run, or (None, None, dp_sampling) without DP."""
  if not cfg.dp.enabled:
    return None, None, dp_sampling
  dp_sampling = dp_sampling if dp_sampling is not None else getattr(train_iter, "poisson_sampling", None)
  if dp_sampling is None:
    raise ValueError(f"[{name}] config.train.dp.enabled needs Poisson-sampled batches (what the accountant "
                     "assumes): build the iterator with trainer.train_iterator(config, ...) or "
                     "loader.poisson_train_iterator, or pass dp_sampling=")
  dp_step, dp_record = resolve_dp(cfg, dp_sampling, name)
  return dp_step, dp_record, dp_sampling


def check_batch(first: dict[str, jax.Array], sampling: loader_lib.PoissonSampling, name: str) -> None:
  rows = int(next(iter(first.values())).shape[0])
  if rows != sampling.max_batch_size or "valid" not in first:
    raise ValueError(f"[{name}] DP batches must be the sampler's padded {sampling.max_batch_size} rows "
                     f"with a 'valid' mask; got {rows} rows{'' if 'valid' in first else ' and no valid mask'}")


def announce(say: Callable[[str], None], name: str, workdir: str, dp_step: DPStep, dp_record: dict[str, Any],
                 sampling: loader_lib.PoissonSampling, total: int, has_model_state: bool) -> dict[str, Any]:
  """Writes the planned dp.json (complete=False), says the budget, warns on a costly truncation."""
  planned = dp_record_for_steps(dp_record, sampling, total)
  write_dp_record(workdir, dict(planned, complete=False))
  eps = planned["epsilon_pld"]
  say(f"DP-SGD: clip {dp_step.l2_clip:g}, noise multiplier {dp_step.noise_multiplier:.4g} ({planned['noise_source']}), "
      f"q {sampling.q:.4g} (expected batch {sampling.expected_batch_size} of {sampling.dataset_size}, "
      f"padded to {sampling.max_batch_size}), delta {planned['delta']:.3g}: epsilon after {total} steps "
      + ("inf (no noise: not private)" if eps is None else f"{eps:.4g} (PLD), {planned['epsilon_rdp']:.4g} (RDP)"))
  if has_model_state:
    say("DP-SGD: the task's model_state is kept fixed (not updated from private batches)")
  if planned["delta_truncation"] is not None and planned["delta_truncation"] > 0.01 * planned["delta"]:
    warnings.warn(f"[{name}] Poisson batches truncated at {sampling.max_batch_size} add up to "
                  f"{planned['delta_truncation']:.3g} to delta = {planned['delta']:.3g}: lower "
                  "train.dp.overflow_tolerance or raise train.dp.max_batch_size", RuntimeWarning, stacklevel=3)
  return planned
