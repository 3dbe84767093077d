"""Segmentation task for the shared trainer: cross-entropy + soft Dice on batch['mask'].

Cross-entropy alone under-segments small lesions (the background dominates the voxel count);
soft Dice alone is unstable early and on lesion-free volumes. The soft Dice is computed over the
whole batch (sums over examples and voxels) per foreground class, so a batch of lesion-free
scans contributes through the cross-entropy instead of a 0/0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from synthmri_jax.training import task as task_lib
from synthmri_jax.models.segmenter import UNet3D

_EPS = 1.0


@dataclasses.dataclass
class SegmenterTask:
  """Task for UNet3D on batches with 'image' (B, X, Y, Z, C) and 'mask' (B, X, Y, Z) integer labels."""

  model: UNet3D
  name: str = "segmenter"
  dice_weight: float = 1.0

  def init(self, rng, batch):
    return task_lib.split_params(self.model.init(rng, batch["image"], train=False))

  def _labels(self, batch):
    return jnp.clip(batch["mask"].astype(jnp.int32), 0, self.model.num_classes - 1)

  def loss(self, params, model_state, batch, rng, step):
    logits = self.model.apply({"params": params, **model_state}, batch["image"], train=True)
    labels = self._labels(batch)
    w = task_lib.valid_weights(batch, "mask")[:, None, None, None]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    ce = jnp.sum(ce * w) / jnp.maximum(jnp.sum(w) * ce[0].size, 1.0)
    probs = jax.nn.softmax(logits, axis=-1)[..., 1:]
    onehot = jax.nn.one_hot(labels, self.model.num_classes)[..., 1:]
    wv = w[..., None]
    inter = jnp.sum(probs * onehot * wv, axis=(0, 1, 2, 3))
    denom = jnp.sum((probs + onehot) * wv, axis=(0, 1, 2, 3))
    soft_dice = jnp.mean((2.0 * inter + _EPS) / (denom + _EPS))
    loss = ce + self.dice_weight * (1.0 - soft_dice)
    return loss, ({"ce": ce, "soft_dice": soft_dice}, model_state)

  def evaluate(self, params, model_state, batch):
    """Hard Dice of the foreground (any nonzero class) summed over valid examples (empty vs empty = 1)."""
    pred = self.predict(params, model_state, batch)["labels"] > 0
    target = self._labels(batch) > 0
    inter = jnp.sum(pred & target, axis=(1, 2, 3)).astype(jnp.float32)
    total = (jnp.sum(pred, axis=(1, 2, 3)) + jnp.sum(target, axis=(1, 2, 3))).astype(jnp.float32)
    dice = jnp.where(total > 0, 2.0 * inter / jnp.maximum(total, 1.0), 1.0)
    w = task_lib.valid_weights(batch, "mask")
    return {"dice": jnp.sum(dice * w), "count": jnp.sum(w)}

  def predict(self, params, model_state, batch) -> dict[str, jax.Array]:
    """Per-voxel label maps (B, X, Y, Z) uint8 (argmax over classes)."""
    logits = self.model.apply({"params": params, **model_state}, batch["image"], train=False)
    return {"labels": jnp.argmax(logits, axis=-1).astype(jnp.uint8)}
