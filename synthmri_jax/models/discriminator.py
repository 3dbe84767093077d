"""3D PatchGAN discriminator for VQGAN, after MONAI's PatchDiscriminator.

Layer for layer as MONAI's (spatial_dims=3, kernel_size=4, LeakyReLU 0.2): an initial
stride-2 conv with bias and no norm; `num_layers` convs without bias, each doubling the
width, stride 2 except the last (stride 1), each followed by a norm and LeakyReLU; a final
stride-1 conv to `out_channels` logits. One logit per receptive-field patch, not per volume.

Differences, on purpose: GroupNorm instead of MONAI's default BatchNorm (no batch statistics
to thread through the GAN's single params tree, and batch-size independence at the small
batches 3D volumes allow), and SAME padding (MONAI pads 1, which shrinks the stride-1 layers
by one voxel; the logit grid here is ceil(X / 2^num_layers) per axis).
Every convolution goes through synthmri_jax.models.conv.Conv3D.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synthmri_jax.models import layers
from synthmri_jax.models.conv import Conv3D
from synthmri_jax.sharding import constrain



class PatchDiscriminator(nn.Module):
  """Volumes (B, X, Y, Z, C) -> patch logits (B, ceil(X / 2^num_layers), ..., out_channels).

  Args:
    channels: width of the first conv; each further layer doubles it.
    num_layers: strided layers after the first conv (the last at stride 1).
    kernel_size: cubic kernel of every conv (MONAI's 4).
    norm_groups: GroupNorm groups (instead of MONAI's BatchNorm; see the module docstring).
    out_channels: logits per patch.
    negative_slope: LeakyReLU slope.
    dtype: compute dtype (params stay float32).
  """
  channels: int = 32
  num_layers: int = 3
  kernel_size: int = 4
  norm_groups: int = 8
  out_channels: int = 1
  negative_slope: float = 0.2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, return_features: bool = False):
    """x (B, X, Y, Z, C) -> patch logits (B, x, y, z, out_channels) float32 (and every layer's
    output, MONAI's feature-matching list, with return_features=True)."""
    k = self.kernel_size
    act = lambda h: nn.leaky_relu(h, self.negative_slope)
    feats = []
    h = Conv3D(self.channels, kernel_size=k, strides=2, padding="SAME", use_bias=True, dtype=self.dtype,
               name="initial_conv")(x.astype(self.dtype))
    h = constrain(act(h), layers.VOLUME_AXES)
    feats.append(h)
    width = self.channels
    for i in range(self.num_layers):
      width *= 2
      stride = 1 if i == self.num_layers - 1 else 2
      h = Conv3D(width, kernel_size=k, strides=stride, padding="SAME", use_bias=False, dtype=self.dtype,
                 name=f"conv_{i}")(h)
      groups = math.gcd(width, self.norm_groups)
      h = layers.GroupNorm(num_groups=groups, dtype=self.dtype, name=f"norm_{i}")(h)
      h = constrain(act(h), layers.VOLUME_AXES)
      feats.append(h)
    logits = Conv3D(self.out_channels, kernel_size=k, strides=1, padding="SAME", use_bias=True, dtype=self.dtype,
                    name="final_conv")(h).astype(jnp.float32)
    feats.append(logits)
    return (logits, feats) if return_features else logits


def from_config(gan_cfg: Any, dtype: Any = jnp.float32) -> PatchDiscriminator:
  """From config.tokenizer.gan: channels, num_layers."""
  return PatchDiscriminator(channels=int(gan_cfg.channels), num_layers=int(gan_cfg.num_layers), dtype=dtype)
