"""3D segmentation U-Net: lesion Dice on the real test split for a model trained on synthetic vs
on real scans (BrainG3N's utility measure for cohorts with masks).

Encoder: stem, then per level a stride-2 convolution and residual blocks (the classifier's
ResBlock); decoder: nearest-neighbour 2x upsampling + convolution (conv.UpsampleConv3D: sub-pixel
phases on CPU; no transposed convolution, which checkerboards), concatenation with the skip, a
merging convolution and residual blocks; a 1x1x1 convolution gives per-voxel class logits. Volumes whose
sides are not multiples of 2^(levels-1) are zero-padded on the way in and cropped on the way out,
so any prepared grid works. The loss (cross-entropy + soft Dice) lives in the task.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from synthmri_jax.models import layers
from synthmri_jax.models.classifier import ResBlock, group_norm
from synthmri_jax.models.layers import VOLUME_AXES
from synthmri_jax.models.conv import Conv3D, UpsampleConv3D
from synthmri_jax.sharding import constrain


class UNet3D(nn.Module):
  """Volumes (B, X, Y, Z, C) -> per-voxel logits (B, X, Y, Z, num_classes) (class 0 = background).

  Args:
    num_classes: classes per voxel, background included.
    channels: width of each level; the grid is padded to a multiple of 2^(levels - 1) and
      cropped back at the output.
    blocks: residual blocks per level, one int or one per level.
    norm_groups: GroupNorm groups (the largest count <= this dividing the width is used).
    dtype: compute dtype (params stay float32).
    conv_impl: the 3D convolution's formulation (models.conv.select_impl).
  """

  num_classes: int = 2
  channels: Sequence[int] = (8, 16, 32)
  blocks: int | Sequence[int] = 1
  norm_groups: int = 4
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  def _conv(self, features: int, kernel: int, stride: int, name: str) -> Conv3D:
    return Conv3D(features, kernel_size=kernel, strides=stride, padding="SAME", use_bias=True, impl=self.conv_impl,
                  dtype=self.dtype, name=name)

  @nn.compact
  def __call__(self, x, train: bool = False):
    levels = len(self.channels)
    blocks = tuple(int(n) for n in layers.per_level(self.blocks, levels, "blocks"))
    spatial = x.shape[1:4]
    m = 2 ** (levels - 1)
    pad = [(0, -s % m) for s in spatial]
    if any(p for _, p in pad):
      x = jnp.pad(x, [(0, 0)] + pad + [(0, 0)])
    h = constrain(x.astype(self.dtype), VOLUME_AXES)
    h = self._conv(self.channels[0], 3, 1, "stem")(h)
    skips = []
    for i, c in enumerate(self.channels):
      if i > 0:
        h = nn.silu(group_norm(h.shape[-1], self.norm_groups, self.dtype, f"down_norm_{i}")(h))
        h = constrain(self._conv(c, 3, 2, f"down_{i}")(h), VOLUME_AXES)
      for j in range(blocks[i]):
        h = ResBlock(c, self.norm_groups, 0.0, self.dtype, self.conv_impl, name=f"enc{i}_block{j}")(h, train)
      skips.append(h)
    for i in reversed(range(levels - 1)):
      c = self.channels[i]
      h = nn.silu(group_norm(h.shape[-1], self.norm_groups, self.dtype, f"up_norm_{i}")(h))
      h = UpsampleConv3D(c, kernel_size=3, scale=2, padding="SAME", use_bias=True, impl=self.conv_impl,
                         dtype=self.dtype, name=f"up_{i}")(h)
      h = jnp.concatenate([h, skips[i]], axis=-1)
      h = constrain(self._conv(c, 3, 1, f"merge_{i}")(h), VOLUME_AXES)
      for j in range(blocks[i]):
        h = ResBlock(c, self.norm_groups, 0.0, self.dtype, self.conv_impl, name=f"dec{i}_block{j}")(h, train)
    h = nn.silu(group_norm(h.shape[-1], self.norm_groups, self.dtype, "final_norm")(h))
    logits = self._conv(self.num_classes, 1, 1, "head")(h).astype(jnp.float32)
    return logits[:, :spatial[0], :spatial[1], :spatial[2]]


def from_config(model_cfg, num_classes: int) -> UNet3D:
  """UNet3D from a `classifier.segmenter.model` config block."""
  return UNet3D(num_classes=int(num_classes), channels=tuple(int(c) for c in model_cfg.channels),
                blocks=model_cfg.blocks if isinstance(model_cfg.blocks, int) else tuple(model_cfg.blocks),
                norm_groups=int(model_cfg.norm_groups), dtype=jnp.dtype(str(model_cfg.dtype)),
                conv_impl=str(model_cfg.conv_impl))
