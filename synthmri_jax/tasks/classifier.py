"""Classification task for the shared trainer: softmax cross-entropy on batch['label'].

The trainer's `evaluate` contract is scalar sums; AUC and its interval need the per-example
probabilities, so `predict` returns them (with the penultimate features for FD / KID), and
`predict_source` runs it over a whole source in order (synthmri_jax.evaluation.tstr computes
AUC from there with scikit-learn).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from synthmri_jax.data import loader
from synthmri_jax.training import task as task_lib
from synthmri_jax.models.classifier import ResNet3D


@dataclasses.dataclass
class ClassifierTask:
  """Task (synthmri_jax.training.task) for ResNet3D on batches with 'image' (B, X, Y, Z, C) and 'label'."""

  model: ResNet3D
  name: str = "classifier"
  label_smoothing: float = 0.0

  def init(self, rng, batch):
    return task_lib.split_params(self.model.init({"params": rng, "dropout": rng}, batch["image"], train=False))

  def _ce(self, logits, labels):
    if self.label_smoothing > 0:
      target = optax.smooth_labels(jax.nn.one_hot(labels, self.model.num_classes), self.label_smoothing)
      return optax.softmax_cross_entropy(logits, target)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

  def loss(self, params, model_state, batch, rng, step):
    logits = self.model.apply({"params": params, **model_state}, batch["image"], train=True, rngs={"dropout": rng})
    labels = batch["label"].astype(jnp.int32)
    w = task_lib.valid_weights(batch, "label")
    ce = self._ce(logits.astype(jnp.float32), labels)
    loss = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
    acc = jnp.sum((jnp.argmax(logits, -1) == labels) * w) / jnp.maximum(jnp.sum(w), 1.0)
    return loss, ({"accuracy": acc}, model_state)

  def evaluate(self, params, model_state, batch):
    logits = self.model.apply({"params": params, **model_state}, batch["image"], train=False)
    labels = batch["label"].astype(jnp.int32)
    w = task_lib.valid_weights(batch, "label")
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return {"loss": jnp.sum(ce * w), "accuracy": jnp.sum((jnp.argmax(logits, -1) == labels) * w),
            "count": jnp.sum(w)}

  def predict(self, params, model_state, batch) -> dict[str, jax.Array]:
    """Per-example class probabilities (B, K) and penultimate features (B, D)."""
    logits, feats = self.model.apply({"params": params, **model_state}, batch["image"], train=False,
                                     return_features=True)
    return {"probs": jax.nn.softmax(logits.astype(jnp.float32), axis=-1), "features": feats}


def predict_source(predict: Callable, variables: dict[str, Any], source: loader.Source, batch_size: int,
                   keys: tuple[str, ...] = ("image",)) -> dict[str, np.ndarray]:
  """Runs a task's `predict(params, model_state, batch)` over every element of `source`, in source order.

  `variables` = {'params': ..., **model_state} as host arrays. Evaluation sets are small, so this
  runs on the default device of this process, on the whole source (every host computes the same
  thing: no cross-host gather is needed). Returns {output name: (len(source), ...) array}.
  """
  params = variables["params"]
  model_state = {k: v for k, v in variables.items() if k != "params"}
  fn = jax.jit(predict)
  out: dict[str, np.ndarray] = {}
  n = len(source)
  for batch in loader.eval_iterator(source, batch_size, process_index=0, process_count=1):
    inputs = {k: batch[k] for k in keys}
    got = jax.device_get(fn(params, model_state, inputs))
    index, valid = np.asarray(batch["index"]), np.asarray(batch["valid"], bool)
    for k, v in got.items():
      v = np.asarray(v)
      if k not in out:
        out[k] = np.zeros((n,) + v.shape[1:], v.dtype)
      out[k][index[valid]] = v[valid]
  return out
