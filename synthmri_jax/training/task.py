"""The contract between a model and the shared trainer (synthmri_jax.training.trainer).

A model author writes a Task: how to initialise variables and what the loss is. The
trainer owns everything else (mesh, shardings, optimizer, the jitted step, skipping
non-finite updates, EMA, checkpoints, evaluation, TensorBoard), so there is one loop.

Threading of state and randomness:
- `params` is the 'params' collection, the only thing the optimizer updates. `init` may
  return it boxed (nn.with_logical_partitioning); the trainer reads the logical names to
  place each array, then stores plain arrays, so `loss` always receives plain arrays and
  `model.apply({'params': params, **model_state}, ...)` just works.
- `model_state` is every other collection (EMA codebooks 'vq_stats', batch stats, ...): a
  dict of collections, no gradient flows into it. `loss` returns its new value (apply with
  `mutable=list(model_state)`); the trainer keeps it only when the step is finite.
- `rng` passed to `loss` is a fresh typed key per step, `fold_in(run_key, step)`: the same
  step gets the same key after a resume. Split it for dropout / noise / VQ restarts.
- `step` is the int32 step counter (e.g. to delay a GAN discriminator).

`init` runs under jax.eval_shape, then under jax.jit with out_shardings, without a mesh
context: activation constraints inside it are no-ops and `batch` is only there for shapes.
`loss`, `evaluate` run under jax.jit inside jax.set_mesh(mesh) with the logical-axis rules
set, so activation constraints (synthmri_jax.sharding.constrain) apply.

GANs (VQGAN) use ONE params tree {'generator': ..., 'discriminator': ...} and one summed
loss; each part sees the other through jax.lax.stop_gradient:
    d_real = D(params['discriminator'], x);  d_fake = D(params['discriminator'], stop_gradient(x_hat))
    g_adv  = -D(stop_gradient(params['discriminator']), x_hat).mean()
    loss   = rec + w * g_adv + disc_weight(step) * hinge(d_real, d_fake)
The gradient of `loss` w.r.t. the generator then comes only from rec + g_adv and w.r.t. the
discriminator only from the hinge term, so one optimizer step updates both (same lr and
schedule; scale a term to change its effective rate).
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
ModelState = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@runtime_checkable
class Task(Protocol):
  """What a model supplies. `evaluate`, `summaries` and `trainable` are optional methods."""

  name: str

  def init(self, rng: jax.Array, batch: Batch) -> tuple[Params, ModelState]:
    """Variables for one model: ('params' collection, dict of the other collections)."""
    ...

  def loss(self, params: Params, model_state: ModelState, batch: Batch, rng: jax.Array,
           step: jax.Array) -> tuple[jax.Array, tuple[Metrics, ModelState]]:
    """Scalar loss to minimise, (scalar metrics to log, new model_state)."""
    ...

  # Optional:
  #
  # def evaluate(self, params, model_state, batch) -> dict[str, jax.Array]:
  #   Scalar metrics of one eval batch (jitted). The trainer sums them over the eval set;
  #   if the dict has a 'count' entry (e.g. number of valid examples) every other entry is
  #   divided by the total count, otherwise by the number of batches. So return sums with
  #   a 'count', or per-batch means without one.
  #
  # def summaries(self, params, model_state, batch) -> dict[str, np.ndarray]:
  #   Images for TensorBoard, (H, W) or (H, W, 1|3) floats in [0, 1] or uint8; called on the
  #   host with the first eval batch (e.g. mid axial/coronal/sagittal slices, input | output).
  #
  # def trainable(self, path: tuple[str, ...]) -> bool:
  #   False for a params leaf (path of dict keys, e.g. ('decoder', 'Conv_0', 'kernel')) that
  #   must not change: it gets no gradient, no optimizer state, and stays bit-identical.


def split_params(variables: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
  """(params, the other collections) of a model's init output: what Task.init returns."""
  rest = dict(variables)
  return rest.pop("params"), rest


def valid_weights(batch: Mapping[str, Any], key: str) -> jax.Array:
  """(B,) float32 row weights: batch['valid'] (eval and Poisson padding rows are 0), or ones for the
  rows of batch[key] when the batch has no padding."""
  if "valid" in batch:
    return batch["valid"].astype(jnp.float32)
  return jnp.ones((batch[key].shape[0],), jnp.float32)


def evaluate_fn(task: Task):
  return getattr(task, "evaluate", None)


def summaries_fn(task: Task):
  return getattr(task, "summaries", None)


def is_trainable(task: Task, path: tuple[str, ...]) -> bool:
  fn = getattr(task, "trainable", None)
  return True if fn is None else bool(fn(path))


def as_image(x: Any) -> np.ndarray:
  """uint8 (H, W, C) with C in {1, 3, 4} from a float [0, 1] or uint8 image."""
  a = np.asarray(x)
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise ValueError(f"summary images must be (H, W) or (H, W, 1|3|4), got {a.shape}")
  if a.dtype != np.uint8:
    a = np.round(np.clip(np.nan_to_num(a.astype(np.float32)), 0.0, 1.0) * 255.0).astype(np.uint8)
  return a
