"""The one train loop every model uses: a Task (task.py) in, a trained TrainState out.

    state = trainer.train(task, config, workdir, train_iter, eval_iter_fn)

- mesh from config.mesh (mesh.make_mesh); the state is created already sharded:
  jax.eval_shape(task.init) -> logical names -> NamedShardings (mesh.tree_shardings) ->
  jax.jit(init, out_shardings=...). Optimizer moments take their parameter's sharding.
- the step is jax.jit(make_train_step(...), in_shardings, out_shardings, donate_argnums=0),
  traced inside jax.set_mesh(mesh) with the logical-axis rules set.
- host-local numpy batches become global arrays split over ('data', 'fsdp').
- WORKDIR/checkpoints: async orbax saves every train.checkpoint_every steps and at the end,
  with the grain iterator position; a run with a checkpoint in WORKDIR resumes from it.
- WORKDIR/tb: TensorBoard scalars (train/*, eval/*) and task.summaries images.

DP-SGD (config.train.dp.enabled; optim.default_dp_config): the train iterator must be Poisson
sampled (loader.poisson_train_iterator, or `train_iterator` below, which picks it from the
config) so that batches are what the accountant assumes. Each step then takes per-example
gradients (jax.vmap of jax.grad of task.loss on each example as a batch of one, with its own
fold of the step key), scales each to global L2 norm <= l2_clip (padding rows and non-finite
gradients contribute exactly zero), sums them, adds N(0, (noise_multiplier * l2_clip)^2) per
coordinate and divides by the EXPECTED batch size. The optimizer (clip_norm, AdamW, EMA,
accumulation) only post-processes that noisy gradient. Under DP:
- model_state is NOT updated (a statistic of the raw batch would bypass clipping and noise);
  tasks that need batch statistics must not be trained with DP.
- a step is skipped only when the noisy gradient is non-finite, never on the private loss.
- every step counts towards epsilon, skipped or not; with grad_accum > 1 each micro-batch is
  its own noised release, so the accountant counts train.steps (batches), not updates.
- the batches and the noise come from the run's secret (training/dp_secret.py: drawn from the
  OS at the first start, kept in WORKDIR/dp_secret.json, 0600), not from config seeds or the
  checkpointed state.rng, which would let anyone with the config or a checkpoint replay them.
- logged training metrics (loss, dp_* diagnostics) are computed on private data without
  noise: they are for the operator, not for release.
- target_epsilon > 0 calibrates noise_multiplier (training.dp_accounting.calibrate_noise) for
  train.steps steps before the first one; WORKDIR/dp.json holds the settings and epsilon under
  both accountants for the steps actually taken (written at the start and at the end).
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import time
import warnings
import zlib
from typing import Any, Callable, Iterable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from synthmri_jax.data import loader as loader_lib
from synthmri_jax.training import checkpoint as ckpt_lib
from synthmri_jax.training import dp_accounting, dp_secret
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.training import optim
from synthmri_jax.training import task as task_lib
from synthmri_jax.sharding import unbox
from synthmri_jax.training.state import TrainState
from synthmri_jax.utils import durations
from synthmri_jax.utils import io

DP_FILE = "dp.json"   # WORKDIR/dp.json of a DP-SGD run: settings and epsilon spent


class NonFiniteError(RuntimeError):
  """Raised when train.max_consecutive_skips steps in a row had a non-finite loss or gradient."""


# ------------------------------------------------------------------------------ data


def shard_batch(batch: dict[str, Any], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays split along the leading (batch) dimension.

  Non-numeric entries (e.g. participant id strings) stay on the host and are dropped.
  """
  out = {}
  for k, v in batch.items():
    a = np.asarray(v)
    if a.dtype.kind not in "biuf":
      continue
    try:
      out[k] = jax.make_array_from_process_local_data(sharding, a)
    except ValueError as e:
      n = int(np.prod([sharding.mesh.shape[a_] for a_ in ("data", "fsdp")]))
      raise ValueError(f"batch entry {k!r} with shape {a.shape} cannot be split over data*fsdp = {n} "
                       f"devices: the global batch size must be a multiple of {n}") from e
  return out


# ------------------------------------------------------------------------------ state


def _opt_state_shardings(abstract_opt: Any, abstract_params: Any, params_sh: Any, rep) -> Any:
  """Each optimizer-state leaf that mirrors a parameter (Adam moments, MultiSteps' accumulator)
  takes that parameter's sharding; counters and everything else are replicated.

  A leaf mirrors a parameter when the trailing dict keys of its path are the parameter's path
  and the shapes agree (optax.tree_map_params cannot see through multi_transform's masks).
  """
  table = {}
  for (path, a), s in zip(jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(params_sh)):
    table[optim.path_names(path)] = (tuple(a.shape), s)

  def one(path, leaf):
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.append(str(k.key))
    hit = table.get(tuple(reversed(keys)))
    return hit[1] if hit is not None and hit[0] == tuple(leaf.shape) else rep

  return jax.tree_util.tree_map_with_path(one, abstract_opt)


def build_state(task: task_lib.Task, cfg, mesh: jax.sharding.Mesh, batch: dict[str, jax.Array]):
  """(init_fn, abstract_state, state_shardings, tx) without allocating anything.

  init_fn() materialises the state directly in its shardings; abstract_state (shapes, dtypes
  and shardings) is the restore target when a checkpoint exists. Call it outside
  jax.set_mesh: inside, flax's boxes would constrain each param at init with flax's own
  resolver (which rejects repeated names and non-dividing axes).
  """
  rep = mesh_lib.replicated(mesh)
  init_key, run_key = jax.random.split(jax.random.key(int(cfg.seed)))
  boxed_params, boxed_ms = jax.eval_shape(task.init, init_key, batch)
  params_sh = mesh_lib.tree_shardings(boxed_params, mesh)
  ms_sh = mesh_lib.tree_shardings(boxed_ms, mesh)
  abstract_params = unbox(boxed_params)
  tx = optim.make_optimizer(cfg, optim.trainable_mask(task, abstract_params))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  use_ema = cfg.ema_decay > 0
  state_sh = TrainState(
      step=rep, params=params_sh, opt_state=_opt_state_shardings(abstract_opt, abstract_params, params_sh, rep),
      model_state=ms_sh, ema_params=params_sh if use_ema else None, rng=rep, consecutive_skips=rep,
      total_skips=rep)

  def init(init_key, run_key_data, batch):
    params, model_state = task.init(init_key, batch)
    params, model_state = unbox(params), unbox(model_state)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), model_state=model_state,
                      ema_params=jax.tree.map(jnp.copy, params) if use_ema else None, rng=run_key_data,
                      consecutive_skips=zero, total_skips=zero)

  run_key_data = jax.random.key_data(run_key)
  abstract_state = jax.eval_shape(init, init_key, run_key_data, batch)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sh)
  jitted = jax.jit(init, out_shardings=state_sh)
  init_fn = lambda: jitted(init_key, run_key_data, batch)
  return init_fn, abstract_state, state_sh, tx


def _load_into(state: TrainState, state_sh: TrainState, directory: str) -> tuple[TrainState, str]:
  """Overwrites params / model_state leaves with those of the same path and shape from another run."""
  step, loaded = ckpt_lib.load_variables(directory)
  stats = {}

  def merge(name, tree, shardings, source):
    hit, total = 0, 0

    def one(path, x, s):
      nonlocal hit, total
      total += 1
      node = source
      for k in optim.path_names(path):
        node = node.get(k) if isinstance(node, dict) else None
      if node is None or tuple(np.shape(node)) != tuple(x.shape):
        return x
      hit += 1
      return jax.device_put(np.asarray(node, dtype=x.dtype), s)

    out = jax.tree_util.tree_map_with_path(one, tree, shardings)
    stats[name] = f"{hit}/{total}"
    return out

  params = merge("params", state.params, state_sh.params, loaded["params"] or {})
  model_state = merge("model_state", state.model_state, state_sh.model_state, loaded["model_state"] or {})
  ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
  msg = f"initialised from {directory} step {step}: params {stats['params']}, model_state {stats['model_state']} leaves"
  return state.replace(params=params, model_state=model_state, ema_params=ema), msg


# ------------------------------------------------------------------------------ steps


def _cast_floats(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _all_finite(tree: Any) -> jax.Array:
  ok = jnp.array(True)
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      ok = ok & jnp.all(jnp.isfinite(x))
  return ok


def _finish_step(state: TrainState, grads: Any, loss: jax.Array, metrics: dict, new_ms: Any, finite: jax.Array,
                 mask: Any, tx: optax.GradientTransformation, cfg, lr_fn: Callable) -> tuple[TrainState, dict]:
  """Optimizer update, EMA and the non-finite skip: shared by the normal and the DP step."""
  ema_decay = float(cfg.ema_decay)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params = jax.tree.map(lambda t, old, new: new if t else old, mask, state.params, params)
  ema = state.ema_params
  if ema is not None:
    applied = optim.update_applied(opt_state, cfg)
    ema = jax.tree.map(
        lambda t, e, p: jnp.where(applied, ema_decay * e + (1.0 - ema_decay) * p, e) if t else e,
        mask, ema, params)

  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  skipped = (~finite).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      model_state=keep(new_ms, state.model_state),
      ema_params=None if ema is None else keep(ema, state.ema_params),
      consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
      total_skips=state.total_skips + skipped)
  out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
  out.update(loss=loss, grad_norm=optax.tree.norm(grads), lr=lr_fn(state.opt_state),
             skipped=skipped, consecutive_skips=new_state.consecutive_skips,
             total_skips=new_state.total_skips)
  return new_state, out


@dataclasses.dataclass(frozen=True)
class DPStep:
  """The DP-SGD step's constants (resolve_dp): C, sigma, the expected batch size B, microbatch."""

  l2_clip: float
  noise_multiplier: float
  expected_batch_size: int
  microbatch: int = 0


def make_train_step(task: task_lib.Task, tx: optax.GradientTransformation, cfg,
                    dp: Optional[DPStep] = None) -> Callable:
  """Pure `(state, batch, rng) -> (new_state, metrics)`; rng is this step's typed key.

  A step whose loss, gradient or new model_state is not finite changes only step and the
  skip counters: params, opt_state, model_state and ema_params are returned bit-identical.
  Frozen params (task.trainable False) get a stop_gradient (no backward work) and keep their
  exact old values. With compute_dtype != float32 the float params and batch entries are
  cast for the loss; gradients and updates stay in the fp32 master params.
  With `dp`, the DP-SGD step of the module docstring (make_dp_train_step).
  """
  if dp is not None:
    return make_dp_train_step(task, tx, cfg, dp)
  compute_dtype = jnp.dtype(cfg.compute_dtype)
  lr_fn = optim.current_lr(cfg)

  def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    mask = optim.trainable_mask(task, state.params)

    def loss_fn(params):
      params = jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p), mask, params)
      b = batch
      if compute_dtype != jnp.float32:
        params, b = _cast_floats(params, compute_dtype), _cast_floats(batch, compute_dtype)
      loss, (metrics, new_ms) = task.loss(params, state.model_state, b, rng, state.step)
      return jnp.asarray(loss, jnp.float32), (metrics, new_ms)

    (loss, (metrics, new_ms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_ms = jax.tree.map(lambda new, old: jnp.asarray(new).astype(old.dtype), new_ms, state.model_state)
    finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new_ms)
    return _finish_step(state, grads, loss, metrics, new_ms, finite, mask, tx, cfg, lr_fn)

  return train_step


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
      p, b = _cast_floats(p, compute_dtype), _cast_floats(b, compute_dtype)
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
  return 1 if jax.default_backend() == "cpu" else 0


def make_dp_train_step(task: task_lib.Task, tx: optax.GradientTransformation, cfg, dp: DPStep) -> Callable:
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

  def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
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
    return _finish_step(state, grads, mean(loss_i), metrics, state.model_state, _all_finite(grads), mask, tx,
                        cfg, lr_fn)

  return train_step


# ------------------------------------------------------------------------------ DP-SGD set-up


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


def train_iterator(config, source: loader_lib.Source, global_batch_size: int, seed: int, *,
                   augment: Optional[loader_lib.Augment] = None,
                   mesh: Optional[jax.sharding.Mesh] = None, workdir: Optional[str] = None) -> Any:
  """The train iterator a stage should hand to `train`: loader.train_iterator, or with
  config.train.dp.enabled the Poisson-sampled one (expected batch global_batch_size, padded
  to a multiple of the mesh's data*fsdp size) that the accountant assumes.

  A DP iterator ignores `seed`: its rows are drawn from the secret of `workdir` (the directory
  later given to `train`; dp_secret.load_or_create), so the batches cannot be regenerated from
  the config."""
  cfg = optim.train_config(config)
  if not cfg.dp.enabled:
    return loader_lib.train_iterator(source, global_batch_size, seed, augment=augment)
  if workdir is None:
    raise ValueError("config.train.dp.enabled: trainer.train_iterator needs the run's workdir, whose secret "
                     "seeds the Poisson sampler (a config seed would make the batches public)")
  shards = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in loader_lib.BATCH_AXES]))
  return loader_lib.poisson_train_iterator(
      source, global_batch_size, dp_secret.load_or_create(workdir).sampling_seed,
      max_batch_size=int(cfg.dp.max_batch_size),
      overflow_tolerance=float(cfg.dp.overflow_tolerance), multiple_of=shards, augment=augment)


def _reduce_eval(outputs: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Sums per-batch eval metrics; divides by the summed 'count' if present, else by #batches."""
  if not outputs:
    return {}
  sums = {k: float(np.sum([np.asarray(o[k], np.float64) for o in outputs])) for k in outputs[0]}
  denom = sums.pop("count") if "count" in sums else float(len(outputs))
  return {k: v / max(denom, 1e-12) for k, v in sums.items()}


# ------------------------------------------------------------------------------ logging


def _png(img: np.ndarray) -> bytes:
  """Minimal PNG encoder (uint8 HxWxC, C in 1/3/4) so TensorBoard images need no TF/PIL."""
  h, w, c = img.shape
  color = {1: 0, 3: 2, 4: 6}[c]
  raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))
  chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


class SummaryWriter:
  """TensorBoard event writer on tensorboard's own EventFileWriter (flax's needs TensorFlow).

  Only process 0 writes; elsewhere every call is a no-op.
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self._w = EventFileWriter(logdir) if enabled else None

  def _add(self, step: int, values: list) -> None:
    if self._w is not None and values:
      self._w.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                        summary=summary_pb2.Summary(value=values)))

  def scalars(self, step: int, scalars: dict[str, float]) -> None:
    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()])

  def images(self, step: int, images: dict[str, Any]) -> None:
    values = []
    for k, v in images.items():
      img = task_lib.as_image(v)
      values.append(summary_pb2.Summary.Value(tag=k, image=summary_pb2.Summary.Image(
          height=img.shape[0], width=img.shape[1], colorspace=img.shape[2], encoded_image_string=_png(img))))
    self._add(step, values)

  def flush(self) -> None:
    if self._w is not None:
      self._w.flush()

  def close(self) -> None:
    if self._w is not None:
      self._w.close()


def _window_means(window: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Means over the logged window, ignoring skipped steps (their metrics are NaN by definition)."""
  ok = [m for m in window if int(m["skipped"]) == 0]
  out = {}
  for k in window[-1]:
    if k in ("skipped",):
      out[k] = float(sum(int(m[k]) for m in window))
    elif k in ("consecutive_skips", "total_skips"):
      out[k] = float(window[-1][k])
    else:
      out[k] = float(np.mean([np.asarray(m[k], np.float64) for m in ok])) if ok else float("nan")
  return out


# ------------------------------------------------------------------------------ the loop


def _dp_setup(cfg, train_iter, dp_sampling: Optional[loader_lib.PoissonSampling], name: str):
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


def _check_dp_batch(first: dict[str, jax.Array], sampling: loader_lib.PoissonSampling, name: str) -> None:
  rows = int(next(iter(first.values())).shape[0])
  if rows != sampling.max_batch_size or "valid" not in first:
    raise ValueError(f"[{name}] DP batches must be the sampler's padded {sampling.max_batch_size} rows "
                     f"with a 'valid' mask; got {rows} rows{'' if 'valid' in first else ' and no valid mask'}")


def _announce_dp(say: Callable[[str], None], name: str, workdir: str, dp_step: DPStep, dp_record: dict[str, Any],
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


def _check_skips(metrics: dict[str, Any], max_consecutive: int, name: str, ckpt_dir: str) -> None:
  if max_consecutive > 0 and int(metrics["consecutive_skips"]) >= max_consecutive:
    raise NonFiniteError(
        f"[{name}] {int(metrics['consecutive_skips'])} train steps in a row had a non-finite loss, "
        f"gradient or model state (train.max_consecutive_skips={max_consecutive}); their "
        f"updates were skipped, so params are those of the last finite step ({int(metrics['total_skips'])} "
        f"skipped in total). Lower train.lr, enable train.clip_norm, or check the data / loss for "
        f"NaN/Inf. Checkpoints in {ckpt_dir} hold only finite states.")


def _log_train(writer: "SummaryWriter", say: Callable[[str], None], step: int, total: int,
               means: dict[str, float]) -> None:
  writer.scalars(step, {f"train/{k}": v for k, v in means.items()})
  writer.flush()
  eta = (total - step) / max(means["steps_per_s"], 1e-9)
  say(f"step {step}/{total} loss {means['loss']:.4g} grad_norm {means['grad_norm']:.3g} "
      f"lr {means['lr']:.3g} | {means['steps_per_s']:.2f} steps/s ETA {durations.short(eta)}"
      + (f" | skipped {int(means['total_skips'])}" if means["total_skips"] else ""))


def _evaluate(state: TrainState, step: int, eval_iter_fn, p_eval, summaries, bsh, writer: "SummaryWriter",
              say: Callable[[str], None], on_log) -> None:
  """task.evaluate over eval_iter_fn's batches (on the EMA params if kept) and task.summaries of its first batch."""
  if eval_iter_fn is None or (p_eval is None and summaries is None):
    return
  t0 = time.time()
  outputs, first_batch = [], None
  for b in eval_iter_fn():
    gb = shard_batch(b, bsh)
    if first_batch is None:
      first_batch = gb
    if p_eval is None:
      break
    outputs.append(p_eval(state.eval_params, state.model_state, gb))
  result = {f"eval/{k}": v for k, v in _reduce_eval(jax.device_get(outputs)).items()}
  if summaries is not None and first_batch is not None:
    writer.images(step, {f"summaries/{k}": v for k, v in
                         summaries(state.eval_params, state.model_state, first_batch).items()})
  if result:
    writer.scalars(step, result)
    say(f"eval step {step}: " + ", ".join(f"{k[5:]} {v:.4g}" for k, v in sorted(result.items()))
        + f" ({time.time() - t0:.1f}s)")
    if on_log is not None:
      on_log(step, result)
  writer.flush()


def train(task: task_lib.Task, config, workdir: str, train_iter: Iterable[dict[str, np.ndarray]],
          eval_iter_fn: Optional[Callable[[], Iterable[dict[str, np.ndarray]]]] = None, *,
          mesh: Optional[jax.sharding.Mesh] = None, init_from: Optional[str] = None,
          on_log: Optional[Callable[[int, dict[str, float]], None]] = None,
          dp_sampling: Optional[loader_lib.PoissonSampling] = None) -> TrainState:
  """Trains `task` for config.train.steps steps (resuming from WORKDIR/checkpoints) and returns the state.

  train_iter: endless iterator of host-local numpy batch dicts (this host's share of the global
    batch); a grain DatasetIterator is checkpointed with the state (others restart from their
    beginning on resume).
  eval_iter_fn: returns a fresh finite iterable of eval batches; used every train.eval_every
    steps and at the end (task.evaluate on the EMA params if kept; task.summaries on its first
    batch).
  mesh: defaults to mesh.make_mesh(config.mesh) (all devices on 'data' if config has no mesh).
  init_from: a checkpoint directory of another run whose params / model_state (same path and
    shape) replace the fresh init when this run starts from scratch (staged training).
  on_log: called on process 0 with (step, {name: value}) at every log and eval.
  dp_sampling: with train.dp.enabled, the Poisson sampler of train_iter (default: its
    `.poisson_sampling`, set by loader.poisson_train_iterator); WORKDIR/dp.json records epsilon.
  """
  cfg = optim.train_config(config)
  dp_step, dp_record, dp_sampling = _dp_setup(cfg, train_iter, dp_sampling, task.name)
  mesh = mesh_lib.mesh_from_config(config) if mesh is None else mesh
  is_main = jax.process_index() == 0
  say = (lambda msg: print(f"[{task.name}] {msg}", flush=True)) if is_main else (lambda msg: None)
  bsh, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)

  it: Iterator = iter(train_iter)
  first = shard_batch(next(it), bsh)
  if dp_step is not None:
    _check_dp_batch(first, dp_sampling, task.name)
  init_fn, abstract_state, state_sh, tx = build_state(task, cfg, mesh, first)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  writer = SummaryWriter(os.path.join(workdir, "tb"), enabled=is_main)
  try:
    latest = ckpt.latest_step()
    if latest is not None:
      state = ckpt.restore(latest, abstract_state, it)
      pending = None
      say(f"resumed from {ckpt.directory} step {latest}"
          + ("" if ckpt_lib.iterator_has_state(it) else " (the data iterator is not a grain iterator: its position was not restored)"))
    else:
      state = init_fn()
      pending = first
      if init_from:
        state, msg = _load_into(state, state_sh, init_from)
        say(msg)
    del first

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
    start, total = int(jax.device_get(state.step)), int(cfg.steps)
    say(f"{n_params:,} params, mesh {dict(mesh.shape)}, steps {start}->{total}, "
        f"grad_accum {cfg.grad_accum}, compute {cfg.compute_dtype}")
    if dp_step is not None:
      planned = _announce_dp(say, task.name, workdir, dp_step, dp_record, dp_sampling, total,
                             bool(jax.tree.leaves(abstract_state.model_state)))

    evaluate, summaries = task_lib.evaluate_fn(task), task_lib.summaries_fn(task)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      p_step = jax.jit(make_train_step(task, tx, cfg, dp_step), in_shardings=(state_sh, bsh, rep),
                       out_shardings=(state_sh, rep), donate_argnums=0)
      p_eval = None
      if evaluate is not None:
        p_eval = jax.jit(evaluate, in_shardings=(state_sh.params, state_sh.model_state, bsh), out_shardings=rep)

      def run_eval(step: int) -> None:
        _evaluate(state, step, eval_iter_fn, p_eval, summaries, bsh, writer, say, on_log if is_main else None)

      check_skips = lambda metrics: _check_skips(metrics, cfg.max_consecutive_skips, task.name, ckpt.directory)

      # DP: the noise (and every per-example key) comes from the run's secret, not the seeded state.rng.
      run_key = (dp_secret.load_or_create(workdir).noise_key() if dp_step is not None
                 else jax.random.wrap_key_data(np.asarray(jax.device_get(state.rng))))
      window, prev, preempted = [], None, False
      t_window, steps_in_window = time.time(), 0
      step = start
      while step < total:
        if pending is not None:
          batch, pending = pending, None
        else:
          try:
            batch = shard_batch(next(it), bsh)
          except StopIteration:
            say(f"train data exhausted after step {step} (of {total})")
            break
        state, metrics = p_step(state, batch, jax.random.fold_in(run_key, step))
        step += 1
        steps_in_window += 1
        if prev is not None:
          check_skips(prev)  # one step behind, so the host never waits for the step it just queued
        prev = metrics
        window.append(metrics)

        if step % cfg.log_every == 0 or step == total:
          means = _window_means(jax.device_get(window))
          means["steps_per_s"] = steps_in_window / max(time.time() - t_window, 1e-9)
          window, t_window, steps_in_window = [], time.time(), 0
          _log_train(writer, say, step, total, means)
          if on_log is not None and is_main:
            on_log(step, means)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != total:
          run_eval(step)
          t_window = time.time()
        preempted = ckpt.reached_preemption(step)
        if step % cfg.checkpoint_every == 0 or step == total or preempted:
          ckpt.save(step, state, it)
        if preempted:
          say(f"preemption notice: saved step {step}, stopping; rerun to resume")
          break
      if prev is not None:
        check_skips(prev)
      if step > start and ckpt.latest_step() != step:  # data ran out before train.steps
        ckpt.save(step, state, it)
      if not preempted and (step > start or latest is None):
        run_eval(step)
      if dp_step is not None:
        done = planned if step == total else dp_record_for_steps(dp_record, dp_sampling, step)
        write_dp_record(workdir, dict(done, complete=not preempted and step >= total))
        if done["epsilon_pld"] is not None:
          say(f"DP-SGD: {step} steps spent epsilon {done['epsilon_pld']:.4g} (PLD) / {done['epsilon_rdp']:.4g} (RDP) "
              f"at delta {done['delta']:.3g}; {done['overflow_steps']} truncated batches")
    return state
  finally:
    ckpt.close()
    writer.close()
