"""The train state: everything a resumed run needs besides the data iterator position."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """One pytree, sharded as a whole and saved as a whole.

  step: number of train steps taken (batches consumed), skipped ones included.
  params: fp32 master parameters (plain arrays, no partitioning boxes).
  opt_state: optax state of optim.make_optimizer.
  model_state: the task's non-gradient collections (dict; may be empty).
  ema_params: exponential moving average of params, or None when train.ema_decay == 0.
  rng: raw uint32 key data of the run key; step s uses fold_in(run_key, s).
  consecutive_skips / total_skips: steps whose loss, gradient or new model_state was
    non-finite; such steps change nothing but these counters, `step` and nothing else.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any
  ema_params: Any
  rng: jax.Array
  consecutive_skips: jax.Array
  total_skips: jax.Array

  @property
  def eval_params(self):
    """The parameters to evaluate and sample with: the EMA when it is kept."""
    return self.params if self.ema_params is None else self.ema_params

  def run_key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)
