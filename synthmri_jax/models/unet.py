"""Conditional 3D diffusion U-Net (MONAI's DiffusionModelUNet, block for block) with tabular tokens.

    unet = DiffusionUNet(out_channels=8, channels=(32, 64), attention_levels=(False, True),
                         conditioning=Conditioning(num_classes=2, attributes=parse_attributes("age:continuous,sex:categorical:2")))
    eps = unet.apply(variables, x_t, t, {"label": y, "age": age, "sex": sex})   # x_t (B, X, Y, Z, C), t (B,) int

Architecture (names and shapes follow MONAI so that `monai_unet_config`-style settings give the
same parameter count): sinusoidal timestep embedding (cos | sin, width channels[0]) -> MLP to
4*channels[0]; conv_in; per level num_res_blocks ResBlocks (GN, SiLU, conv, + Dense(temb), GN,
SiLU, conv zero-initialised, 1x1x1 skip when widths differ), each followed by an attention block
where attention_levels[i], and a stride-2 3x3x3 conv between levels; a middle block (ResBlock,
attention, ResBlock); the mirrored up path with num_res_blocks + 1 ResBlocks per level on the
concatenated skips and nearest-neighbour 2x upsampling + 3x3x3 conv; GN, SiLU, conv_out
(zero-initialised). Attention is MONAI's SpatialTransformer when conditioning
(GN, 1x1x1 proj_in, [LN self-attention, LN cross-attention to the condition tokens, LN GEGLU
MLP] x transformer_num_layers, 1x1x1 proj_out zero-initialised) and SpatialAttentionBlock
otherwise (GN, self-attention with biased q/k/v); both through jax.nn.dot_product_attention, so
GPUs get the fused cuDNN kernel. Every 3D conv goes through synthmri_jax.models.conv (Conv3D;
UpsampleConv3D for upsample + conv, one sub-pixel conv on CPU). The blocks are written here
rather than taken from models/layers.py because their parameter tree is MONAI's state_dict
layout (2-D q/k/v kernels, 'skip_connection', 'time_embed_0'), which
models/monai_mirror.load_monai_unet maps weight for weight (tests/test_benchmark_parity.py);
norms, dense init, the timestep embedding and the attention-kernel choice are layers.py's.
A grid not divisible by 2^(levels-1) is zero-padded on the way in and cropped on the way out.

Conditioning (a joint MRI + tabular design: attributes enter as tokens through
cross-attention): the class label and each tabular attribute becomes one token of width
token_dim -- a categorical value through an embedding table, a continuous one (standardised with
the training split's mean / std) through Fourier features and a 2-layer MLP. Every attribute has
its own learned null token, used when its value is missing: label / categorical < 0, continuous
non-finite. That one convention serves three purposes: missing values in a cohort table,
classifier-free guidance (the unconditional branch is all-null; `null_conditions`), and
condition dropout in training (`drop_conditions`: each attribute independently with
p_each, so the model handles any subset of given attributes; and all at once with p_all, so the
fully unconditional model CFG needs is trained explicitly rather than only with p_each^n).
Optionally (`cond_in_temb`) the mean of the tokens is also projected into the timestep
embedding, so the condition reaches every ResBlock and not only the attention levels.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthmri_jax.models import layers
from synthmri_jax.models.conv import Conv3D, UpsampleConv3D
from synthmri_jax.sharding import constrain

LABEL = "label"
KINDS = ("continuous", "categorical")
Cond = Mapping[str, jax.Array]


# ------------------------------------------------------------------------------ conditions


@dataclasses.dataclass(frozen=True)
class Attribute:
  """One tabular attribute: a column of the cohort table that becomes one condition token.

  continuous: value standardised as (x - mean) / scale (the training split's statistics);
  categorical: integer codes 0..num_classes-1. Missing: NaN (continuous) or < 0 (categorical).
  """

  name: str
  kind: str
  num_classes: int = 0
  mean: float = 0.0
  scale: float = 1.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"attribute {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
    if self.kind == "categorical" and self.num_classes < 1:
      raise ValueError(f"categorical attribute {self.name!r} needs num_classes >= 1")
    if self.name == LABEL:
      raise ValueError(f"{LABEL!r} is the class label; it is always conditioned on and is not an attribute")
    if not self.scale > 0:
      raise ValueError(f"attribute {self.name!r}: scale must be > 0, got {self.scale}")


def parse_attributes(spec: str) -> tuple[Attribute, ...]:
  """'age:continuous,sex:categorical:2' -> Attributes (statistics filled in later by `with_stats`)."""
  out = []
  for item in [s.strip() for s in str(spec).split(",") if s.strip()]:
    parts = [p.strip() for p in item.split(":")]
    if len(parts) == 2 and parts[1] == "continuous":
      out.append(Attribute(parts[0], "continuous"))
    elif len(parts) == 3 and parts[1] == "categorical" and parts[2].isdigit():
      out.append(Attribute(parts[0], "categorical", num_classes=int(parts[2])))
    else:
      raise ValueError(f"attribute spec {item!r}: expected 'name:continuous' or 'name:categorical:<num_classes>'")
  names = [a.name for a in out]
  if len(set(names)) != len(names):
    raise ValueError(f"attribute names repeat in {spec!r}")
  return tuple(out)


def with_stats(attributes: Sequence[Attribute], values: Mapping[str, np.ndarray]) -> tuple[Attribute, ...]:
  """Continuous attributes standardised by the mean / std of the finite `values[name]` (the training split)."""
  out = []
  for a in attributes:
    if a.kind == "continuous":
      v = np.asarray(values[a.name], np.float64)
      v = v[np.isfinite(v)]
      mean = float(v.mean()) if v.size else 0.0
      std = float(v.std()) if v.size > 1 else 0.0
      a = dataclasses.replace(a, mean=mean, scale=std if std > 1e-6 else 1.0)
    out.append(a)
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Conditioning:
  """What the model conditions on: the class label (num_classes >= 1) and tabular attributes."""

  num_classes: int
  attributes: tuple[Attribute, ...] = ()
  token_dim: int = 64
  fourier_features: int = 8

  @property
  def names(self) -> tuple[str, ...]:
    return (LABEL,) + tuple(a.name for a in self.attributes)

  def kind(self, name: str) -> str:
    if name == LABEL:
      return "categorical"
    return next(a.kind for a in self.attributes if a.name == name)


def _null_value(x: jax.Array, kind: str) -> jax.Array:
  return jnp.full_like(x, jnp.nan) if kind == "continuous" else jnp.full_like(x, -1)


def null_conditions(cond: Cond, conditioning: Conditioning, names: str | Sequence[str] = "all") -> dict[str, jax.Array]:
  """`cond` with the named entries ('all', or a list such as ['label']) replaced by their null value."""
  names = conditioning.names if names == "all" else tuple(names)
  unknown = [n for n in names if n not in conditioning.names]
  if unknown:
    raise ValueError(f"unknown condition names {unknown}; known: {conditioning.names}")
  return {k: (_null_value(jnp.asarray(v), conditioning.kind(k)) if k in names else v) for k, v in cond.items()}


def drop_conditions(cond: Cond, conditioning: Conditioning, rng: jax.Array, p_each: float, p_all: float) -> dict[str, jax.Array]:
  """Condition dropout for classifier-free guidance (see the module docstring).

  Each condition is nulled independently with probability p_each, and all of them together with
  probability p_all, per example.
  """
  k_all, k_each = jax.random.split(rng)
  batch = jnp.asarray(cond[LABEL]).shape[0]
  drop_all = jax.random.bernoulli(k_all, p_all, (batch,))
  out = {}
  for i, name in enumerate(conditioning.names):
    v = jnp.asarray(cond[name])
    drop = drop_all | jax.random.bernoulli(jax.random.fold_in(k_each, i), p_each, (batch,))
    out[name] = jnp.where(drop, _null_value(v, conditioning.kind(name)), v)
  return out


def _dense(features: int, name: str, names=("embed", "mlp"), use_bias: bool = True, dtype=jnp.float32) -> nn.Dense:
  return layers.dense(features, names, use_bias=use_bias, dtype=dtype, name=name)


class ConditionEncoder(nn.Module):
  """Condition dict -> tokens (B, 1 + #attributes, token_dim): label first, then attributes in order."""

  conditioning: Conditioning
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, cond: Cond, batch: int) -> jax.Array:
    c = self.conditioning
    d = c.token_dim
    emb_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "mlp"))
    tokens = []

    def categorical(name: str, n: int) -> jax.Array:
      v = jnp.asarray(cond[name]).astype(jnp.int32) if name in cond else jnp.full((batch,), -1, jnp.int32)
      idx = jnp.where((v < 0) | (v >= n), n, v)     # index n: the learned null token
      return nn.Embed(n + 1, d, embedding_init=emb_init, name=f"{name}_embed")(idx)

    tokens.append(categorical(LABEL, c.num_classes))
    freqs = jnp.asarray(2.0 ** np.linspace(-2.0, 3.0, c.fourier_features), jnp.float32) * 2.0 * math.pi
    for a in c.attributes:
      if a.kind == "categorical":
        tokens.append(categorical(a.name, a.num_classes))
        continue
      v = jnp.asarray(cond[a.name], jnp.float32) if a.name in cond else jnp.full((batch,), jnp.nan, jnp.float32)
      given = jnp.isfinite(v)
      z = jnp.where(given, (v - a.mean) / a.scale, 0.0)[:, None]
      feats = jnp.concatenate([z, jnp.sin(z * freqs), jnp.cos(z * freqs)], axis=-1)
      h = nn.silu(_dense(d, f"{a.name}_mlp0", names=(None, "mlp"))(feats))
      h = _dense(d, f"{a.name}_mlp1", names=("mlp", "embed"))(h)
      null = self.param(f"{a.name}_null", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("mlp",)),
                        (d,), jnp.float32)
      tokens.append(jnp.where(given[:, None], h, null[None]))
    out = jnp.stack(tokens, axis=1).astype(self.dtype)
    return constrain(out, layers.TOKEN_AXES)


# ------------------------------------------------------------------------------ blocks


def _norm(groups: int, dtype, name: str) -> nn.Module:
  return layers.GroupNorm(num_groups=groups, dtype=dtype, name=name)


def conv_kernel_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """PyTorch's default conv init U(+-1/sqrt(fan_in)) (models.conv.torch_like_init), drawn flat and
  reshaped: XLA:CPU compiles threefry over a 5-D shape ~5x slower, which dominated init time."""
  fan_in = int(np.prod(shape[:-1]))
  lim = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, (int(np.prod(shape)),), dtype, -lim, lim).reshape(shape)


def _conv(features: int, kernel: int, dtype, impl: str, name: str, strides: int = 1, zero: bool = False):
  return Conv3D(features, kernel_size=kernel, strides=strides, padding=1 if kernel == 3 else 0, use_bias=True,
                dtype=dtype, impl=impl, name=name, kernel_init=nn.initializers.zeros if zero else conv_kernel_init)


class TimestepResBlock(nn.Module):
  """MONAI's DiffusionUNetResnetBlock: x + conv2(SiLU(GN(conv1(SiLU(GN(x))) + Dense(SiLU(temb)))))."""

  out_channels: int
  norm_num_groups: int
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
    h = nn.silu(_norm(self.norm_num_groups, self.dtype, "norm1")(x))
    h = _conv(self.out_channels, 3, self.dtype, self.conv_impl, "conv1")(h)
    e = _dense(self.out_channels, "time_emb_proj", dtype=self.dtype)(nn.silu(temb))
    h = h + e[:, None, None, None, :].astype(h.dtype)
    h = nn.silu(_norm(self.norm_num_groups, self.dtype, "norm2")(h))
    h = _conv(self.out_channels, 3, self.dtype, self.conv_impl, "conv2", zero=True)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, self.conv_impl, "skip_connection")(x)
    return constrain(x + h, layers.VOLUME_AXES)


def _heads(x: jax.Array, num_heads: int) -> jax.Array:
  b, n, c = x.shape
  return constrain(x.reshape(b, n, num_heads, c // num_heads), layers.HEAD_AXES)


class Attention(nn.Module):
  """Multi-head attention (MONAI SABlock / CrossAttentionBlock): q/k/v projections, out_proj with bias.

  jax.nn.dot_product_attention picks the fused cuDNN kernel on GPU when shapes allow.
  """

  num_heads: int
  head_dim: int
  out_dim: int
  qkv_bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    ctx = x if context is None else context.astype(x.dtype)
    inner = self.num_heads * self.head_dim
    q = _heads(_dense(inner, "to_q", use_bias=self.qkv_bias, dtype=self.dtype)(x), self.num_heads)
    k = _heads(_dense(inner, "to_k", use_bias=self.qkv_bias, dtype=self.dtype)(ctx), self.num_heads)
    v = _heads(_dense(inner, "to_v", use_bias=self.qkv_bias, dtype=self.dtype)(ctx), self.num_heads)
    o = jax.nn.dot_product_attention(q, k, v, implementation=layers.select_attention_impl("auto", q.dtype,
                                                                                         self.head_dim))
    o = o.reshape(x.shape[0], x.shape[1], inner)
    return _dense(self.out_dim, "out_proj", names=("mlp", "embed"), dtype=self.dtype)(o)


class SpatialSelfAttention(nn.Module):
  """MONAI's SpatialAttentionBlock: x + SelfAttention(GN(x)) over all voxels, q/k/v with bias."""

  num_head_channels: int
  norm_num_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None, context: jax.Array | None = None) -> jax.Array:
    del temb, context
    b, X, Y, Z, c = x.shape
    h = _norm(self.norm_num_groups, self.dtype, "norm")(x).reshape(b, X * Y * Z, c)
    h = constrain(h, layers.TOKEN_AXES)
    heads = max(1, c // self.num_head_channels)
    h = Attention(heads, c // heads, c, qkv_bias=True, dtype=self.dtype, name="attn")(h)
    return constrain(x + h.reshape(b, X, Y, Z, c), layers.VOLUME_AXES)


class TransformerBlock(nn.Module):
  """MONAI's DiffusionUNetTransformerBlock: self-attention, cross-attention, GEGLU MLP, each pre-LN + residual."""

  num_heads: int
  head_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
    d = x.shape[-1]
    ln = lambda name: layers.LayerNorm(dtype=self.dtype, name=name)
    x = x + Attention(self.num_heads, self.head_dim, d, dtype=self.dtype, name="attn1")(ln("norm1")(x))
    x = x + Attention(self.num_heads, self.head_dim, d, dtype=self.dtype, name="attn2")(ln("norm2")(x), context)
    h = _dense(8 * d, "ff_linear1", dtype=self.dtype)(ln("norm3")(x))
    value, gate = jnp.split(h, 2, axis=-1)
    h = _dense(d, "ff_linear2", names=("mlp", "embed"), dtype=self.dtype)(value * nn.gelu(gate, approximate=False))
    return constrain(x + h, layers.TOKEN_AXES)


class SpatialTransformer(nn.Module):
  """MONAI's SpatialTransformer: x + proj_out(transformer blocks(proj_in(GN(x)))), proj_out zero-initialised.

  The voxels attend to each other and, in each block's cross-attention, to the condition tokens
  (self-attention again when there are none, as in MONAI).
  """

  num_head_channels: int
  norm_num_groups: int
  num_layers: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None, context: jax.Array | None = None) -> jax.Array:
    del temb
    b, X, Y, Z, c = x.shape
    heads = max(1, c // self.num_head_channels)
    inner = heads * (c // heads)
    h = _norm(self.norm_num_groups, self.dtype, "norm")(x)
    h = _conv(inner, 1, self.dtype, self.conv_impl, "proj_in")(h)
    h = constrain(h.reshape(b, X * Y * Z, inner), layers.TOKEN_AXES)
    for i in range(self.num_layers):
      h = TransformerBlock(heads, inner // heads, dtype=self.dtype, name=f"transformer_blocks_{i}")(h, context)
    h = _conv(c, 1, self.dtype, self.conv_impl, "proj_out", zero=True)(h.reshape(b, X, Y, Z, inner))
    return constrain(x + h, layers.VOLUME_AXES)


# ------------------------------------------------------------------------------ the U-Net


class DiffusionUNet(nn.Module):
  """Noise / velocity predictor eps(x_t, t, cond); see the module docstring.

  with_conditioning=True (the default) uses SpatialTransformers with cross-attention to the
  condition tokens (requires `conditioning`); False uses self-attention blocks only (MONAI's
  with_conditioning=False). num_class_embeds adds MONAI's class embedding of cond['label'] to
  the timestep embedding (labels < 0 use an extra null row). remat wraps every ResBlock and
  attention block in nn.remat.

  Args:
    out_channels: channels of the prediction (the latent's channels).
    channels: width of each resolution level; each level after the first halves the grid.
    num_res_blocks: ResBlocks per level, one int for all levels or one per level.
    attention_levels: per level, whether its blocks are followed by attention (a
      SpatialTransformer with cross-attention, or self-attention without conditioning).
    num_head_channels: channels per attention head, one int or one per level.
    norm_num_groups: GroupNorm groups (MONAI's name); must divide every level's width.
    with_conditioning: cross-attention to the condition tokens (needs `conditioning`).
    transformer_num_layers: transformer blocks per SpatialTransformer.
    conditioning: the label and attributes the model is conditioned on (tokens, and with
      cond_in_temb also added to the timestep embedding).
    cond_in_temb: add the pooled condition embedding to the timestep embedding too.
    num_class_embeds: MONAI's class embedding of cond['label'] (None: off).
    remat: rematerialise every block in the backward pass (memory for compute).
    dtype: compute dtype (params stay float32).
    conv_impl: the 3D convolution's formulation (models.conv.select_impl; "auto" by backend).
  """

  out_channels: int
  channels: Sequence[int] = (32, 64, 64)
  num_res_blocks: int | Sequence[int] = 1
  attention_levels: Sequence[bool] = (False, True, True)
  num_head_channels: int | Sequence[int] = 8
  norm_num_groups: int = 32
  with_conditioning: bool = True
  transformer_num_layers: int = 1
  conditioning: Conditioning | None = None
  cond_in_temb: bool = True
  num_class_embeds: int | None = None
  remat: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  def _block(self, cls):
    return nn.remat(cls) if self.remat else cls

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Cond | None = None) -> jax.Array:
    levels = len(self.channels)
    blocks = layers.per_level(self.num_res_blocks, levels, "num_res_blocks")
    attn = tuple(bool(a) for a in layers.per_level(self.attention_levels, levels, "attention_levels"))
    head_ch = layers.per_level(self.num_head_channels, levels, "num_head_channels")
    if self.with_conditioning and self.conditioning is None:
      raise ValueError("with_conditioning=True needs a `conditioning` (label / attributes)")
    b = x.shape[0]
    spatial = x.shape[1:4]
    m = 2 ** (levels - 1)
    pad = [(0, -s % m) for s in spatial]
    if any(p for _, p in pad):
      x = jnp.pad(x, [(0, 0)] + pad + [(0, 0)])
    cond = {} if cond is None else dict(cond)

    temb_dim = 4 * self.channels[0]
    temb = layers.timestep_embedding(jnp.broadcast_to(jnp.asarray(t), (b,)), self.channels[0]).astype(self.dtype)
    temb = _dense(temb_dim, "time_embed_0", names=(None, "mlp"), dtype=self.dtype)(temb)
    temb = _dense(temb_dim, "time_embed_2", names=("mlp", "embed"), dtype=self.dtype)(nn.silu(temb))
    if self.num_class_embeds is not None:
      lab = jnp.asarray(cond.get(LABEL, jnp.full((b,), -1)), jnp.int32)
      lab = jnp.where((lab < 0) | (lab >= self.num_class_embeds), self.num_class_embeds, lab)
      temb = temb + nn.Embed(self.num_class_embeds + 1, temb_dim, name="class_embedding",
                             embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "mlp")),
                             dtype=self.dtype)(lab)
    context = None
    if self.conditioning is not None:
      context = ConditionEncoder(self.conditioning, dtype=self.dtype, name="cond_encoder")(cond, b)
      if self.cond_in_temb:
        temb = temb + _dense(temb_dim, "cond_temb", names=("embed", "mlp"), dtype=self.dtype)(context.mean(axis=1))

    res = self._block(TimestepResBlock)
    if self.with_conditioning:
      mk_attn = lambda c, hc, name: self._block(SpatialTransformer)(
          hc, self.norm_num_groups, self.transformer_num_layers, self.dtype, self.conv_impl, name=name)
    else:
      mk_attn = lambda c, hc, name: self._block(SpatialSelfAttention)(hc, self.norm_num_groups, self.dtype, name=name)
      context = None

    h = constrain(_conv(self.channels[0], 3, self.dtype, self.conv_impl, "conv_in")(x.astype(self.dtype)), layers.VOLUME_AXES)
    skips = [h]
    for i, c in enumerate(self.channels):
      for j in range(blocks[i]):
        h = res(c, self.norm_num_groups, self.dtype, self.conv_impl, name=f"down_{i}_res_{j}")(h, temb)
        if attn[i]:
          h = mk_attn(c, head_ch[i], f"down_{i}_attn_{j}")(h, temb, context)
        skips.append(h)
      if i < levels - 1:
        h = constrain(_conv(c, 3, self.dtype, self.conv_impl, f"down_{i}_downsample", strides=2)(h), layers.VOLUME_AXES)
        skips.append(h)

    top = self.channels[-1]
    h = res(top, self.norm_num_groups, self.dtype, self.conv_impl, name="mid_res_0")(h, temb)
    h = mk_attn(top, head_ch[-1], "mid_attn")(h, temb, context)
    h = res(top, self.norm_num_groups, self.dtype, self.conv_impl, name="mid_res_1")(h, temb)

    for i in reversed(range(levels)):
      c = self.channels[i]
      for j in range(blocks[i] + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(c, self.norm_num_groups, self.dtype, self.conv_impl, name=f"up_{i}_res_{j}")(h, temb)
        if attn[i]:
          h = mk_attn(c, head_ch[i], f"up_{i}_attn_{j}")(h, temb, context)
      if i > 0:
        # Nearest 2x upsampling + 3x3x3 conv as one sub-pixel conv on CPU (models/conv.py).
        h = UpsampleConv3D(c, 3, scale=2, padding=1, dtype=self.dtype, impl=self.conv_impl, kernel_init=conv_kernel_init,
                           name=f"up_{i}_upsample")(h)
        h = constrain(h, layers.VOLUME_AXES)

    h = nn.silu(_norm(self.norm_num_groups, self.dtype, "out_norm")(h))
    out = _conv(self.out_channels, 3, self.dtype, self.conv_impl, "conv_out", zero=True)(h)
    out = out[:, :spatial[0], :spatial[1], :spatial[2]]
    return out.astype(jnp.float32)


def from_config(ldm_cfg: Any, out_channels: int, num_classes: int, attributes: Sequence[Attribute]) -> DiffusionUNet:
  """The U-Net of a `config.ldm` block (attributes already carrying their training statistics)."""
  m, c = ldm_cfg.model, ldm_cfg.cond
  conditioning = Conditioning(num_classes=int(num_classes), attributes=tuple(attributes),
                              token_dim=int(c.token_dim), fourier_features=int(c.fourier_features))
  return DiffusionUNet(
      out_channels=int(out_channels), channels=tuple(int(x) for x in m.channels),
      num_res_blocks=m.num_res_blocks if isinstance(m.num_res_blocks, int) else tuple(int(x) for x in m.num_res_blocks),
      attention_levels=tuple(bool(a) for a in m.attention_levels),
      num_head_channels=(m.num_head_channels if isinstance(m.num_head_channels, int)
                         else tuple(int(x) for x in m.num_head_channels)),
      norm_num_groups=int(m.norm_num_groups), with_conditioning=True,
      transformer_num_layers=int(m.transformer_num_layers), conditioning=conditioning,
      cond_in_temb=bool(c.in_temb), remat=bool(m.remat), dtype=jnp.dtype(str(m.dtype)), conv_impl=str(m.conv_impl))
