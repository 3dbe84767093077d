"""The tokenizers' building blocks: encoder / decoder stacks (MONAI-style residual levels with
optional self-attention), the latent head, patching (space_to_depth) and the per-level options."""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthmri_jax.models import layers
from synthmri_jax.models.conv import Conv3D
from synthmri_jax.models.quantizer import VectorQuantizer
from synthmri_jax.sharding import constrain



def space_to_depth(x: jax.Array, f: int) -> jax.Array:
  """(B, X, Y, Z, C) -> (B, X/f, Y/f, Z/f, f^3 C): each f-cube becomes one voxel's channels."""
  if f == 1:
    return x
  b, X, Y, Z, c = x.shape
  x = x.reshape(b, X // f, f, Y // f, f, Z // f, f, c)
  return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, X // f, Y // f, Z // f, f ** 3 * c)


def depth_to_space(x: jax.Array, f: int) -> jax.Array:
  """The inverse of space_to_depth: (B, X, Y, Z, f^3 C) -> (B, fX, fY, fZ, C)."""
  if f == 1:
    return x
  b, X, Y, Z, fc = x.shape
  c = fc // f ** 3
  x = x.reshape(b, X, Y, Z, f, f, f, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, X * f, Y * f, Z * f, c)


def sincos_3d(grid: Sequence[int], dim: int) -> np.ndarray:
  """Fixed 3D sin-cos position embedding (X*Y*Z, dim): a third of the features per axis."""
  per_axis = max(2, (dim // 6) * 2)
  feats = []
  for n in grid:
    pos = np.arange(n, dtype=np.float64)
    freqs = 1.0 / (10000.0 ** (np.arange(per_axis // 2) / max(per_axis // 2, 1)))
    ang = pos[:, None] * freqs[None, :] * math.pi / 2.0
    feats.append(np.concatenate([np.sin(ang), np.cos(ang)], axis=-1))
  X, Y, Z = grid
  e = np.concatenate([
      np.broadcast_to(feats[0][:, None, None], (X, Y, Z, per_axis)),
      np.broadcast_to(feats[1][None, :, None], (X, Y, Z, per_axis)),
      np.broadcast_to(feats[2][None, None, :], (X, Y, Z, per_axis))], axis=-1).reshape(X * Y * Z, -1)
  out = np.zeros((X * Y * Z, dim), np.float32)
  out[:, :min(dim, e.shape[1])] = e[:, :dim]
  return out


def attention_mask(value: bool | Sequence[bool], levels: int) -> tuple[bool, ...]:
  """attention_levels as one bool per level (MONAI's convention, as in the U-Net); one bool: every level."""
  out = layers.per_level(value, levels, "attention_levels")
  if not all(isinstance(a, (bool, np.bool_)) for a in out):
    raise ValueError(f"attention_levels is one bool per level (e.g. {(False,) * (levels - 1) + (True,)}), "
                     f"got {value!r}: level indices are not accepted")
  return tuple(bool(a) for a in out)


def check_grid(shape: Sequence[int], levels: int, patch: int = 1) -> None:
  m = int(patch) * 2 ** (levels - 1)
  if any(int(s) % m for s in shape):
    raise ValueError(f"volume grid {tuple(shape)} must be divisible by patch_size * 2^(levels-1) = {m} for "
                     f"{levels} tokenizer levels; pad the data grid (config.data.shape) or use fewer levels")


def conv(features: int, kernel: int, dtype, name: str, strides: int = 1) -> Conv3D:
  return Conv3D(features, kernel_size=kernel, strides=strides, padding="SAME", use_bias=True, dtype=dtype,
                name=name)


def group_count(groups: int, *channels: int) -> int:
  """The largest group count <= `groups` dividing every channel count (GroupNorm needs that)."""
  g = int(groups)
  for c in channels:
    g = math.gcd(g, int(c))
  return max(g, 1)


def _norm_act(h: jax.Array, groups: int, dtype, name: str) -> jax.Array:
  return nn.silu(layers.GroupNorm(num_groups=group_count(groups, h.shape[-1]), dtype=dtype, name=name)(h))


def _resblock(h: jax.Array, features: int, groups: int, dtype, name: str, remat: bool = False) -> jax.Array:
  block = nn.remat(layers.ResBlock3D) if remat else layers.ResBlock3D
  return block(features, num_groups=group_count(groups, h.shape[-1], features), dtype=dtype, name=name)(h)


def _self_attention(h: jax.Array, num_heads: int, groups: int, dtype, name: str, remat: bool = False) -> jax.Array:
  c = h.shape[-1]
  if c % num_heads:
    raise ValueError(f"{c} channels are not divisible by num_heads={num_heads}")
  block = nn.remat(layers.SpatialSelfAttention3D) if remat else layers.SpatialSelfAttention3D
  return block(head_channels=c // num_heads, num_groups=group_count(groups, c), dtype=dtype, name=name)(h)


class EncoderStack(nn.Module):
  """Encoder levels `levels[0]..levels[-1]`: level 0 starts with a 3x3x3 stem, every other
  level with a stride-2 downsample; then ResBlocks and, where configured, self-attention.

  patch > 1 folds each patch^3 cube into channels before the stem (level 0 then sits at
  1/patch of the volume grid): on a CPU a conv with one input channel at the full grid runs
  at a few GFLOP/s, so on small grids the patch stem is several times cheaper per step.
  """
  channels: Sequence[int]
  levels: Sequence[int]
  num_res_blocks: Sequence[int]
  attention_levels: Sequence[bool]     # one per level of `channels`
  num_heads: int
  norm_groups: int
  patch: int = 1
  remat: bool = False                  # rematerialise ResBlocks and attention in the backward pass
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    for i in self.levels:
      c = self.channels[i]
      if i == 0:
        h = conv(c, 3, self.dtype, "stem")(space_to_depth(h, self.patch).astype(self.dtype))
      else:
        h = layers.Downsample(c, dtype=self.dtype, name=f"down_{i}")(h)
      h = constrain(h, layers.VOLUME_AXES)
      for j in range(self.num_res_blocks[i]):
        h = _resblock(h, c, self.norm_groups, self.dtype, f"level{i}_block{j}", self.remat)
      if self.attention_levels[i]:
        h = _self_attention(h, self.num_heads, self.norm_groups, self.dtype, f"level{i}_attn", self.remat)
    return h


class LatentHead(nn.Module):
  """Features -> GN, SiLU, 1x1x1 conv to the code dimension (the quantiser's input)."""
  code_dim: int
  norm_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h):
    h = _norm_act(h, self.norm_groups, self.dtype, "norm")
    return conv(self.code_dim, 1, self.dtype, "proj")(h).astype(jnp.float32)


class DecoderStack(nn.Module):
  """Latent at level `top` -> volume: input conv, mid ResBlocks (+ fusion with context tokens
  and self-attention), then upsample level by level to full resolution, GN, SiLU, conv_out.

  `context` (B, N_top, C_top) tokens on the top grid are fused after the first mid block
  (see DualTokenizer for the modes). Returns (x_hat, features before conv_out): the VQGAN
  adaptive weight needs conv_out's input. patch > 1: conv_out predicts each patch^3 cube as
  channels, unfolded depth-to-space (the mirror of EncoderStack's patch stem).
  """
  channels: Sequence[int]
  top: int
  num_res_blocks: Sequence[int]
  mid_blocks: int
  attention_levels: Sequence[bool]     # one per level of `channels`
  num_heads: int
  norm_groups: int
  out_channels: int
  fusion: str = "none"          # 'none' | 'cross_attention' | 'cross_attention+aligned'
  patch: int = 1
  remat: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, context: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    c_top = self.channels[self.top]
    h = constrain(conv(c_top, 3, self.dtype, "conv_in")(z.astype(self.dtype)), layers.VOLUME_AXES)
    for j in range(self.mid_blocks):
      h = _resblock(h, c_top, self.norm_groups, self.dtype, f"mid_block{j}", self.remat)
      if j == 0 and context is not None and self.fusion != "none":
        h = self._fuse(h, context)
      if j == 0 and self.attention_levels[self.top]:
        h = _self_attention(h, self.num_heads, self.norm_groups, self.dtype, "mid_attn", self.remat)
    for i in reversed(range(self.top)):
      c = self.channels[i]
      h = constrain(layers.Upsample(c, dtype=self.dtype, name=f"up_{i}")(h), layers.VOLUME_AXES)
      for j in range(self.num_res_blocks[i]):
        h = _resblock(h, c, self.norm_groups, self.dtype, f"level{i}_block{j}", self.remat)
      if self.attention_levels[i]:
        h = _self_attention(h, self.num_heads, self.norm_groups, self.dtype, f"level{i}_attn", self.remat)
    feats = _norm_act(h, self.norm_groups, self.dtype, "norm_out")
    out = conv(self.out_channels * self.patch ** 3, 3, self.dtype, "conv_out")(feats)
    return depth_to_space(out, self.patch).astype(jnp.float32), feats

  def _fuse(self, h: jax.Array, context: jax.Array) -> jax.Array:
    """h + CrossAttn(q from h + pos, k/v from context + pos) [+ aligned projection of the context].

    The block adds its input to its output, so adding pos to h and subtracting it afterwards
    puts the positions into the queries (and context keys) without shifting the residual stream.
    """
    b, X, Y, Z, c = h.shape
    if c % self.num_heads:
      raise ValueError(f"{c} channels are not divisible by num_heads={self.num_heads}")
    pos = jnp.asarray(sincos_3d((X, Y, Z), c), self.dtype)
    ctx = context.astype(self.dtype) + pos[None]
    pos_v = pos.reshape(1, X, Y, Z, c)
    h = layers.SpatialCrossAttention3D(head_channels=c // self.num_heads, num_groups=group_count(self.norm_groups, c),
                                       dtype=self.dtype, name="cross_attn")(h + pos_v, ctx) - pos_v
    if self.fusion == "cross_attention+aligned":
      aligned = layers.dense(c, ("embed", "mlp"), zero_init=True, dtype=self.dtype, name="aligned")(context)
      h = h + aligned.astype(h.dtype).reshape(b, X, Y, Z, c)
    return constrain(h, layers.VOLUME_AXES)


def quantizer(num_codes: int, code_dim: int, vq: Any, name: str) -> VectorQuantizer:
  vq = dict(vq or {})
  return VectorQuantizer(num_codes=int(num_codes), code_dim=int(code_dim), mode=str(vq.get("mode", "ema")),
                         beta=float(vq.get("beta", 0.25)), decay=float(vq.get("decay", 0.99)),
                         cosine=bool(vq.get("cosine", False)),
                         restart_threshold=float(vq.get("restart_threshold", 1e-2)),
                         chunk_size=int(vq.get("chunk_size", 4096)), name=name)
