"""The `train` config block and the optax optimizer built from it.

AdamW with linear warmup + cosine decay, global-norm clipping, a freeze mask and gradient
accumulation (optax.MultiSteps). Units: `train.steps` counts train steps = batches
consumed; the learning-rate schedule counts optimizer updates = steps // grad_accum.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from synthmri_jax.training import task as task_lib


def default_train_config() -> ml_collections.ConfigDict:
  """Every field of `config.train` the trainer reads, with its default."""
  t = ml_collections.ConfigDict()
  t.steps = 1000               # train steps (batches); optimizer updates = steps // grad_accum
  t.lr = 1e-4                  # peak learning rate
  t.warmup_steps = 100         # linear warmup from 0, in optimizer updates
  t.schedule = "cosine"        # after warmup: "cosine" (to end_lr_fraction * lr at the last update) or "constant"
  t.end_lr_fraction = 0.0
  t.adam_b1 = 0.9
  t.adam_b2 = 0.999
  t.adam_eps = 1e-8
  t.weight_decay = 1e-4        # decoupled (AdamW); applied to params with ndim >= 2 only (not biases / norm scales)
  t.clip_norm = 1.0            # global-norm clipping of the (accumulated) gradient; 0: off
  t.grad_accum = 1             # micro-batches per optimizer update (optax.MultiSteps)
  t.ema_decay = 0.0            # EMA of params, updated once per optimizer update; 0: off
  t.ema_warmup = True          # cap the decay at (1 + n) / (10 + n) after n updates (ema_decay_at)
  t.compute_dtype = "float32"  # "bfloat16": params and float batch entries cast for the loss; fp32 master params
  t.max_consecutive_skips = 10  # stop after this many non-finite steps in a row
  t.log_every = 50             # progress line + TensorBoard scalars (means over the window)
  t.eval_every = 500           # 0: evaluate only at the end (if the caller gives eval data)
  t.checkpoint_every = 500     # async orbax save every N steps (and always at the end)
  t.keep_checkpoints = 3
  t.seed = 0                   # run key: params init and per-step rngs
  t.dp = default_dp_config()   # DP-SGD (off by default); see trainer.py "DP-SGD"
  return t


def default_dp_config() -> ml_collections.ConfigDict:
  """`train.dp`: DP-SGD with per-example clipping, Gaussian noise and Poisson-sampled batches."""
  d = ml_collections.ConfigDict()
  d.enabled = False
  d.l2_clip = 1.0              # C: each example's gradient is scaled to global L2 norm <= C
  d.noise_multiplier = 1.0     # sigma: noise std = sigma * C per coordinate (used when target_epsilon is 0)
  d.target_epsilon = 0.0       # > 0: sigma calibrated before training so that train.steps steps spend this epsilon
  d.delta = 0.0                # 0: 1 / (10 n), n = the private training set's size
  d.accountant = "pld"         # accountant of the calibration ('pld' | 'rdp'); dp.json reports both
  d.max_batch_size = 0         # padded Poisson batch; 0: smallest with P(overflow) <= overflow_tolerance
  d.overflow_tolerance = 1e-15  # per-step P(Binomial(n, q) > max_batch_size); costs (1 + e^eps) * steps * it in delta
  d.microbatch = 0             # per-example gradients vectorised this many rows at a time (lax.scan over chunks;
                               # 1: no vmap); 0: auto = 1 on CPU (least memory, same speed), the whole batch on GPU/TPU
  return d


def train_config(config: Any) -> ml_collections.ConfigDict:
  """Defaults overlaid with `config.train` (or with `config` itself if it is the train block).

  Unknown keys are an error so that a typo does not silently train with a default.
  """
  out = default_train_config()
  block = None
  if config is not None:
    block = config.get("train", None) if "steps" not in config else config
  if block is not None:
    unknown = sorted(set(block.keys()) - set(out.keys()))
    if unknown:
      raise ValueError(f"unknown config.train fields {unknown}; known: {sorted(out.keys())}")
    for k in block.keys():
      if k == "dp":
        given = block[k]
        given = given.to_dict() if hasattr(given, "to_dict") else dict(given or {})
        bad = sorted(set(given) - set(out.dp.keys()))
        if bad:
          raise ValueError(f"unknown config.train.dp fields {bad}; known: {sorted(out.dp.keys())}")
        for kk, v in given.items():
          out.dp[kk] = v
      else:
        out[k] = block[k]
  if out.grad_accum < 1:
    raise ValueError(f"train.grad_accum must be >= 1, got {out.grad_accum}")
  if out.compute_dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"train.compute_dtype must be float32, bfloat16 or float16, got {out.compute_dtype!r}")
  if out.schedule not in ("cosine", "constant"):
    raise ValueError(f"train.schedule must be 'cosine' or 'constant', got {out.schedule!r}")
  if not 0.0 <= out.ema_decay < 1.0:
    raise ValueError(f"train.ema_decay must be in [0, 1), got {out.ema_decay}")
  dp = out.dp
  if dp.enabled:
    if not dp.l2_clip > 0:
      raise ValueError(f"train.dp.l2_clip must be > 0, got {dp.l2_clip}")
    if dp.target_epsilon < 0 or (dp.target_epsilon == 0 and dp.noise_multiplier < 0):
      raise ValueError("train.dp: set noise_multiplier >= 0 or target_epsilon > 0")
    if dp.accountant not in ("pld", "rdp"):
      raise ValueError(f"train.dp.accountant must be 'pld' or 'rdp', got {dp.accountant!r}")
    if not 0.0 <= dp.delta < 1.0:
      raise ValueError(f"train.dp.delta must be in [0, 1) (0: 1/(10 n)), got {dp.delta}")
    if dp.microbatch < 0:
      raise ValueError(f"train.dp.microbatch must be >= 0, got {dp.microbatch}")
  return out


def num_updates(cfg) -> int:
  return max(1, int(cfg.steps) // int(cfg.grad_accum))


def lr_schedule(cfg) -> optax.Schedule:
  """lr(u) for optimizer update u: lr * u / warmup for u < warmup, then cosine (or constant).

  Cosine: end + (lr - end) * (1 + cos(pi * (u - warmup) / (U - warmup))) / 2, U = number of
  updates, end = end_lr_fraction * lr; constant after U.
  """
  lr, warmup = float(cfg.lr), int(cfg.warmup_steps)
  end = float(cfg.end_lr_fraction) * lr
  total = num_updates(cfg)

  def schedule(count):
    u = jnp.asarray(count, jnp.float32)
    warm = lr * u / max(warmup, 1)
    if cfg.schedule == "constant":
      after = jnp.full_like(u, lr)
    else:
      frac = jnp.clip((u - warmup) / max(total - warmup, 1), 0.0, 1.0)
      after = end + (lr - end) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    return jnp.where(u < warmup, warm, after)

  return schedule


def path_names(path) -> tuple[str, ...]:
  """('decoder', 'Conv_0', 'kernel') from a jax key path."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def trainable_mask(task: task_lib.Task, params: Any) -> Any:
  """Tree of python bools (same structure as params) from task.trainable(path)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: task_lib.is_trainable(task, path_names(p)), params)


def make_optimizer(cfg, mask: Any) -> optax.GradientTransformation:
  """optax chain for the train block; `mask` from trainable_mask (False: frozen).

  Frozen leaves go through optax.set_to_zero (no Adam moments are allocated for them); the
  train step additionally keeps their old values so they stay bit-identical.
  """
  inner = optax.chain(
      optax.clip_by_global_norm(float(cfg.clip_norm)) if cfg.clip_norm > 0 else optax.identity(),
      optax.adamw(lr_schedule(cfg), b1=float(cfg.adam_b1), b2=float(cfg.adam_b2), eps=float(cfg.adam_eps),
                  weight_decay=float(cfg.weight_decay),
                  mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)),
  )
  labels = jax.tree.map(lambda t: "train" if t else "frozen", mask)
  if all(jax.tree.leaves(mask)):
    tx = inner
  else:
    tx = optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()}, labels)
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(cfg.grad_accum))
  return tx


def update_count(opt_state: Any) -> jax.Array:
  """Optimizer updates applied so far (the schedule's step), read from the optax state."""
  found = optax.tree_utils.tree_get_all_with_path(
      opt_state, "count", filtering=lambda path, _: getattr(path[-1], "tuple_name", "") == "ScaleByScheduleState")
  if not found:  # everything frozen: nothing schedules
    return jnp.zeros((), jnp.int32)
  return found[0][1]


def ema_decay_at(cfg, count: jax.Array) -> jax.Array:
  """The EMA's decay for the update that brings the optimizer's count to `count`.

  A constant decay keeps decay**n of the random init after n updates: 0.99**150 = 0.22 of it in the
  quickstart LDM's 150 steps, so the sampled model was a fifth noise. With train.ema_warmup the
  decay is capped at (1 + n) / (10 + n) (the warmup of TF's ExponentialMovingAverage with
  num_updates and of diffusers' EMAModel): the average forgets the init within its first updates
  and reaches `ema_decay` after (10 decay - 1) / (1 - decay) updates (890 at 0.99).
  """
  decay = jnp.asarray(float(cfg.ema_decay), jnp.float32)
  if not bool(cfg.ema_warmup):
    return decay
  n = jnp.asarray(count, jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def update_applied(new_opt_state: Any, cfg) -> jax.Array | bool:
  """Whether this step applied an optimizer update (False on MultiSteps' accumulating steps)."""
  if cfg.grad_accum > 1:
    return new_opt_state.mini_step == 0
  return True


def current_lr(cfg) -> Callable[[Any], jax.Array]:
  schedule = lr_schedule(cfg)
  return lambda opt_state: schedule(update_count(opt_state))
