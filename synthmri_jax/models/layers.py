"""Building blocks shared by every model: norms, residual blocks, attention, down/upsampling.

Block semantics follow MONAI's DiffusionModelUNet (monai/networks/nets/diffusion_model_unet.py
and the SABlock / CrossAttentionBlock / SpatialAttentionBlock it uses) so a model assembled
from them has MONAI's parameter count: same norms (GroupNorm eps 1e-6), same zero-initialised
last convs, PyTorch-default init. Every 3D conv goes through models/conv.py (native on
GPU/TPU, 2D-conv/dot formulations on CPU). Parameters carry logical axis names (mesh.py's
table); activations are constrained to ('batch', 'act_spatial' x3, 'act_channels') and
tokens to ('batch', 'act_tokens', ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthmri_jax.models.conv import Conv3D, UpsampleConv3D, torch_like_init
from synthmri_jax.sharding import constrain
from synthmri_jax.utils import backend as backend_lib

Array = jax.Array

VOLUME_AXES = ("batch", "act_spatial", "act_spatial", "act_spatial", "act_channels")
TOKEN_AXES = ("batch", "act_tokens", "act_channels")
HEAD_AXES = ("batch", "act_tokens", "act_heads", None)

_NORM_AXES = ("norm",)


def constrain_volume(x: Array) -> Array:
  return constrain(x, VOLUME_AXES)


def constrain_tokens(x: Array) -> Array:
  return constrain(x, TOKEN_AXES)



def per_level(value: Any, levels: int, name: str) -> tuple:
  """A model field given once for all resolution levels, or once per level, as one entry per level."""
  if isinstance(value, (int, bool)):
    return (value,) * levels
  out = tuple(value)
  if len(out) != levels:
    raise ValueError(f"{name} needs one entry per level ({levels}), got {out}")
  return out

class GroupNorm(nn.GroupNorm):
  """flax GroupNorm (stats in f32) with MONAI's eps and 'norm'-annotated scale / bias."""
  num_groups: int | None = 32
  epsilon: float = 1e-6
  scale_init: Callable = nn.with_logical_partitioning(nn.initializers.ones_init(), _NORM_AXES)
  bias_init: Callable = nn.with_logical_partitioning(nn.initializers.zeros_init(), _NORM_AXES)


class LayerNorm(nn.LayerNorm):
  """flax LayerNorm with torch's eps (1e-5, MONAI's transformer blocks) and 'norm' annotations."""
  epsilon: float = 1e-5
  scale_init: Callable = nn.with_logical_partitioning(nn.initializers.ones_init(), _NORM_AXES)
  bias_init: Callable = nn.with_logical_partitioning(nn.initializers.zeros_init(), _NORM_AXES)


def dense(features: int, axes: tuple[str, str] = ("embed", "mlp"), *, use_bias: bool = True,
          zero_init: bool = False, dtype=None, param_dtype=jnp.float32, name: str | None = None) -> nn.Dense:
  """nn.Dense with PyTorch's default init and logical axis names (kernel `axes`, bias axes[1])."""
  init = nn.initializers.zeros_init() if zero_init else torch_like_init()
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def timestep_embedding(timesteps: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding [cos, sin] of (B,) timesteps, as MONAI's get_timestep_embedding."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class ResBlock3D(nn.Module):
  """GroupNorm-SiLU-Conv3x3 twice, plus skip (1x1x1 conv when channels change).

  With `emb` (B, E) (the diffusion timestep embedding) a Dense(SiLU(emb)) is injected after
  the first conv: emb_mode 'add' adds it (MONAI DiffusionUNetResnetBlock), 'scale_shift'
  applies norm2(h) * (1 + scale) + shift (ADM / diffusers). The second conv starts at zero
  (MONAI's zero_module), so a fresh block is the identity on its skip path. Dropout sits
  before the second conv.
  """
  features: int
  num_groups: int = 32
  epsilon: float = 1e-6
  emb_mode: str = "add"
  dropout: float = 0.0
  zero_init_last: bool = True
  conv_impl: str = "auto"         # models.conv formulation of the block's convs
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array | None = None, *, deterministic: bool = True) -> Array:
    if self.emb_mode not in ("add", "scale_shift"):
      raise ValueError(f"emb_mode must be 'add' or 'scale_shift', got {self.emb_mode!r}")
    kw = dict(impl=self.conv_impl, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = dict(num_groups=self.num_groups, epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(GroupNorm(**norm, name="norm1")(x))
    h = Conv3D(self.features, 3, name="conv1", **kw)(h)
    scale_shift = None
    if emb is not None:
      width = self.features * (2 if self.emb_mode == "scale_shift" else 1)
      e = dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name="time_emb_proj")(nn.silu(emb))
      e = e[:, None, None, None, :]
      if self.emb_mode == "add":
        h = h + e
      else:
        scale_shift = jnp.split(e, 2, axis=-1)
    h = GroupNorm(**norm, name="norm2")(h)
    if scale_shift is not None:
      h = h * (1 + scale_shift[0]) + scale_shift[1]
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
    h = Conv3D(self.features, 3, name="conv2",
               kernel_init=nn.initializers.zeros_init() if self.zero_init_last else None, **kw)(h)
    skip = x if x.shape[-1] == self.features else Conv3D(self.features, 1, name="skip", **kw)(x)
    return constrain_volume(skip + h)


def select_attention_impl(impl: str | None, dtype, head_dim: int, backend: str | None = None) -> str | None:
  """jax.nn.dot_product_attention `implementation`: 'auto' -> cuDNN's fused kernel on GPU for
  bf16/fp16 with head_dim a multiple of 8 up to 128 (its supported case), else XLA."""
  if impl != "auto":
    return impl
  backend = backend_lib.target() if backend is None else backend
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if backend == "gpu" and half and head_dim % 8 == 0 and head_dim <= 128 else None


# Attention scores one query chunk may hold per batch element (queries x keys x heads). Above it,
# queries are processed in chunks, each rematerialised in the backward pass, so memory grows with
# the chunk, not with N x M: at 1 mm each attention block of the tokenizer's top level (12,584
# tokens, 4 heads) would otherwise hold 6.3e8 scores, 2.5 GB in fp32, per volume.
SCORE_BUDGET = 2 ** 26


def attend(q: Array, k: Array, v: Array, implementation: str | None = None,
           score_budget: int = SCORE_BUDGET) -> Array:
  """jax.nn.dot_product_attention of q (B, N, H, D) over k, v (B, M, H, D), exact, in query chunks
  when N x M x H exceeds `score_budget` (softmax runs over keys, so each query is independent)."""
  b, n, h, d = q.shape
  m = k.shape[1]
  if n * m * h <= score_budget:
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  chunk = max(1, score_budget // (m * h))
  steps = -(-n // chunk)
  qs = jnp.pad(q, ((0, 0), (0, steps * chunk - n), (0, 0), (0, 0))).reshape(b, steps, chunk, h, d)
  one = jax.checkpoint(lambda qc: jax.nn.dot_product_attention(qc, k, v, implementation=implementation))
  o = jax.lax.map(one, jnp.moveaxis(qs, 1, 0))            # (steps, B, chunk, H, D)
  return jnp.moveaxis(o, 0, 1).reshape(b, steps * chunk, h, -1)[:, :n]


class HeadProjection(nn.Module):
  """y = x . kernel + bias contracting the last `in_axes` axes of x into `features`.

  nn.DenseGeneral's job, but the kernel is created at its full rank (e.g. (C, heads, head_dim))
  so its logical names apply as they are: DenseGeneral initialises a flattened 2D kernel and
  reshapes it, which fails under a global mesh with 3 logical names on a rank-2 value. Param
  paths and shapes are DenseGeneral's ('kernel', 'bias'); init is PyTorch's nn.Linear
  U(+-1/sqrt(fan_in)) over the contracted axes.
  """
  features: tuple[int, ...]
  in_axes: int
  axes: tuple[str, ...]
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_in = int(self.in_axes)
    in_shape = x.shape[-n_in:]
    fan_in = int(np.prod(in_shape))
    bound = 1.0 / np.sqrt(fan_in)
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    kernel = self.param("kernel", nn.with_logical_partitioning(uniform, self.axes),
                        (*in_shape, *self.features), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype),
                            ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[n_in:]),
                        tuple(self.features), self.param_dtype)
      y = y + bias.astype(dtype)
    return y


class MultiHeadAttention(nn.Module):
  """Multi-head attention of x (B, N, C) over context (B, M, Cc) (or over x when context is None).

  Separate q/k/v projections to (heads, head_dim) and an output projection back to C, as
  MONAI's SABlock / CrossAttentionBlock with use_combined_linear=False; the attention itself
  is jax.nn.dot_product_attention, so GPUs get a fused kernel. Dropout on the output.
  """
  num_heads: int
  head_dim: int
  qkv_bias: bool = False
  dropout: float = 0.0
  attention_impl: str | None = "auto"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def _proj(self, name: str, bias: bool):
    return HeadProjection((self.num_heads, self.head_dim), in_axes=1, use_bias=bias, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name,
                          axes=("embed", "heads", "head_dim"))

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None, *, deterministic: bool = True) -> Array:
    kv = x if context is None else context
    q = constrain(self._proj("to_q", self.qkv_bias)(x), HEAD_AXES)
    k = constrain(self._proj("to_k", self.qkv_bias)(kv), HEAD_AXES)
    v = constrain(self._proj("to_v", self.qkv_bias)(kv), HEAD_AXES)
    impl = select_attention_impl(self.attention_impl, q.dtype, self.head_dim)
    o = attend(q, k, v, implementation=impl)
    o = HeadProjection((x.shape[-1],), in_axes=2, dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj",
                       axes=("heads", "head_dim", "embed"))(o)
    o = nn.Dropout(self.dropout)(o, deterministic=deterministic)
    return constrain_tokens(o)


def _heads(channels: int, head_channels: int) -> int:
  if channels % head_channels:
    raise ValueError(f"{channels} channels are not divisible into heads of {head_channels}")
  return channels // head_channels


def _tokens(x: Array) -> Array:
  return x.reshape(x.shape[0], -1, x.shape[-1]) if x.ndim == 5 else x


class SpatialSelfAttention3D(nn.Module):
  """x + Attention(GroupNorm(x)) over the D*H*W voxels as tokens (MONAI SpatialAttentionBlock)."""
  head_channels: int = 32
  num_groups: int = 32
  epsilon: float = 1e-6
  attention_impl: str | None = "auto"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, d, h, w, c = x.shape
    t = GroupNorm(self.num_groups, epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="norm")(x)
    t = constrain_tokens(t.reshape(b, d * h * w, c))
    t = MultiHeadAttention(_heads(c, self.head_channels), self.head_channels, qkv_bias=True,
                           attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="attn")(t)
    return constrain_volume(x + t.reshape(b, d, h, w, c))


class SpatialCrossAttention3D(nn.Module):
  """x + Attention(q = GroupNorm(x) voxels, k/v = context tokens).

  `context` is (B, M, Cc) tokens or a (B, D', H', W', Cc) feature volume (flattened), e.g.
  the clinical-path features the tokenizer decoder attends to. Without context it is
  self-attention (as MONAI's CrossAttentionBlock).
  """
  head_channels: int = 32
  num_groups: int = 32
  epsilon: float = 1e-6
  dropout: float = 0.0
  attention_impl: str | None = "auto"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None, *, deterministic: bool = True) -> Array:
    b, d, h, w, c = x.shape
    t = GroupNorm(self.num_groups, epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="norm")(x)
    t = constrain_tokens(t.reshape(b, d * h * w, c))
    if context is not None:
      context = constrain_tokens(LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                                           name="context_norm")(_tokens(context)))
    t = MultiHeadAttention(_heads(c, self.head_channels), self.head_channels, qkv_bias=True, dropout=self.dropout,
                           attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="attn")(t, context, deterministic=deterministic)
    return constrain_volume(x + t.reshape(b, d, h, w, c))


class TransformerBlock(nn.Module):
  """Pre-LN self-attention, cross-attention (context), GEGLU feed-forward; MONAI DiffusionUNetTransformerBlock."""
  num_heads: int
  head_dim: int
  dropout: float = 0.0
  attention_impl: str | None = "auto"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None, *, deterministic: bool = True) -> Array:
    c = x.shape[-1]
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(num_heads=self.num_heads, head_dim=self.head_dim, dropout=self.dropout,
                attention_impl=self.attention_impl, **dt)
    x = x + MultiHeadAttention(**attn, name="attn1")(LayerNorm(**dt, name="norm1")(x), deterministic=deterministic)
    x = x + MultiHeadAttention(**attn, name="attn2")(LayerNorm(**dt, name="norm2")(x),
                                                    None if context is None else _tokens(context),
                                                    deterministic=deterministic)
    h = dense(8 * c, ("embed", "mlp"), **dt, name="ff_in")(LayerNorm(**dt, name="norm3")(x))
    h, gate = jnp.split(h, 2, axis=-1)
    h = nn.Dropout(self.dropout)(h * nn.gelu(gate, approximate=False), deterministic=deterministic)
    h = dense(c, ("mlp", "embed"), **dt, name="ff_out")(h)
    return constrain_tokens(x + nn.Dropout(self.dropout)(h, deterministic=deterministic))


class SpatialTransformer3D(nn.Module):
  """GroupNorm, 1x1x1 proj_in, TransformerBlocks over voxel tokens with cross-attention to
  `context`, zero-initialised 1x1x1 proj_out, residual (MONAI SpatialTransformer, the
  DiffusionModelUNet's conditioning block)."""
  head_channels: int = 32
  num_layers: int = 1
  num_groups: int = 32
  epsilon: float = 1e-6
  dropout: float = 0.0
  attention_impl: str | None = "auto"
  conv_impl: str = "auto"         # models.conv formulation of the block's convs
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None, *, deterministic: bool = True) -> Array:
    b, d, h, w, c = x.shape
    dt = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    t = GroupNorm(self.num_groups, epsilon=self.epsilon, **dt, name="norm")(x)
    t = Conv3D(c, 1, impl=self.conv_impl, **dt, name="proj_in")(t)
    t = constrain_tokens(t.reshape(b, d * h * w, c))
    for i in range(self.num_layers):
      t = TransformerBlock(_heads(c, self.head_channels), self.head_channels, dropout=self.dropout,
                           attention_impl=self.attention_impl, **dt, name=f"block{i}")(
                               t, context, deterministic=deterministic)
    t = Conv3D(c, 1, impl=self.conv_impl, kernel_init=nn.initializers.zeros_init(), **dt,
               name="proj_out")(t.reshape(b, d, h, w, c))
    return constrain_volume(x + t)


class Downsample(nn.Module):
  """Halves D, H, W: stride-2 3x3x3 conv with padding 1 (MONAI DiffusionUnetDownsample), or 2x2x2 average pooling."""
  features: int | None = None
  use_conv: bool = True
  conv_impl: str = "auto"         # models.conv formulation of the block's convs
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if not self.use_conv:
      if self.features not in (None, x.shape[-1]):
        raise ValueError("Downsample without a conv cannot change the channel count")
      return nn.avg_pool(x, (2, 2, 2), (2, 2, 2))
    return constrain_volume(Conv3D(self.features or x.shape[-1], 3, strides=2, padding=1, impl=self.conv_impl,
                                   dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x))


class Upsample(nn.Module):
  """Doubles D, H, W: nearest-neighbour, then (use_conv) a 3x3x3 conv (MONAI's 'nontrainable' Upsample +
  post_conv in DiffusionModelUNet). On CPU the pair runs as one sub-pixel conv (models/conv.py)."""
  features: int | None = None
  use_conv: bool = True
  conv_impl: str = "auto"         # models.conv formulation of the block's convs
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if not self.use_conv:
      b, d, h, w, c = x.shape
      x = jnp.broadcast_to(x[:, :, None, :, None, :, None, :], (b, d, 2, h, 2, w, 2, c))
      return x.reshape(b, 2 * d, 2 * h, 2 * w, c)
    return constrain_volume(UpsampleConv3D(self.features or x.shape[-1], 3, scale=2, impl=self.conv_impl,
                                           dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x))
