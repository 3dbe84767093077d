"""The train step without DP: a pure `(state, batch, rng) -> (state, metrics)`, and the update,
EMA and non-finite skip every step (DP or not) ends with."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from synthmri_jax.training import optim
from synthmri_jax.training import task as task_lib
from synthmri_jax.training.state import TrainState


def cast_floats(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def all_finite(tree: Any) -> jax.Array:
  ok = jnp.array(True)
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      ok = ok & jnp.all(jnp.isfinite(x))
  return ok


def finish_step(state: TrainState, grads: Any, loss: jax.Array, metrics: dict, new_ms: Any, finite: jax.Array,
                 mask: Any, tx: optax.GradientTransformation, cfg, lr_fn: Callable) -> tuple[TrainState, dict]:
  """Optimizer update, EMA and the non-finite skip: shared by the normal and the DP step."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params = jax.tree.map(lambda t, old, new: new if t else old, mask, state.params, params)
  ema = state.ema_params
  if ema is not None:
    applied = optim.update_applied(opt_state, cfg)
    ema_decay = optim.ema_decay_at(cfg, optim.update_count(opt_state))
    ema = jax.tree.map(
        lambda t, e, p: jnp.where(applied, ema_decay * e + (1.0 - ema_decay) * p, e) if t else e,
        mask, ema, params)

  # One conditional, not a where() per leaf: XLA fuses the scalar `finite` (a chain of one `and` per
  # leaf) into every consumer, so per-leaf where()s held ~900 copies of a ~200-op chain (the quickstart
  # LDM step: 440k lines of HLO, 67 s to compile on CPU).
  kept = jax.lax.cond(finite, lambda: (params, opt_state, new_ms, ema),
                      lambda: (state.params, state.opt_state, state.model_state, state.ema_params))
  skipped = (~finite).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1,
      params=kept[0],
      opt_state=kept[1],
      model_state=kept[2],
      ema_params=kept[3],
      consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
      total_skips=state.total_skips + skipped)
  out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
  out.update(loss=loss, grad_norm=optax.tree.norm(grads), lr=lr_fn(state.opt_state),
             skipped=skipped, consecutive_skips=new_state.consecutive_skips,
             total_skips=new_state.total_skips)
  return new_state, out


def make_step(task: task_lib.Task, tx: optax.GradientTransformation, cfg) -> Callable:
  """Pure `(state, batch, rng) -> (new_state, metrics)`; rng is this step's typed key.

  A step whose loss, gradient or new model_state is not finite changes only step and the
  skip counters: params, opt_state, model_state and ema_params are returned bit-identical.
  Frozen params (task.trainable False) get a stop_gradient (no backward work) and keep their
  exact old values. With compute_dtype != float32 the float params and batch entries are
  cast for the loss; gradients and updates stay in the fp32 master params.
  """
  compute_dtype = jnp.dtype(cfg.compute_dtype)
  lr_fn = optim.current_lr(cfg)

  def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    mask = optim.trainable_mask(task, state.params)

    def loss_fn(params):
      params = jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p), mask, params)
      b = batch
      if compute_dtype != jnp.float32:
        params, b = cast_floats(params, compute_dtype), cast_floats(batch, compute_dtype)
      loss, (metrics, new_ms) = task.loss(params, state.model_state, b, rng, state.step)
      return jnp.asarray(loss, jnp.float32), (metrics, new_ms)

    (loss, (metrics, new_ms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_ms = jax.tree.map(lambda new, old: jnp.asarray(new).astype(old.dtype), new_ms, state.model_state)
    finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(new_ms)
    return finish_step(state, grads, loss, metrics, new_ms, finite, mask, tx, cfg, lr_fn)

  return train_step
