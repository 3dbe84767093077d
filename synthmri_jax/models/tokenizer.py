"""3D VQ tokenizers: the single-path VQ-VAE (also VQGAN's generator) and the dual-codebook BrainG3N tokenizer.

Both expose the two methods the latent DDPM uses, so it does not care which variant it got:

    z = model.apply(v, x, method=model.encode_generative)                  # (B, x, y, z, D)
    x_hat = model.apply(v, z, method=model.decode_from_generative)         # (B, X, Y, Z, C)

Levels: `channels[i]` is the width at 1/2^i of the volume grid; the last level holds the
(generative) latent, so the grid must be divisible by 2^(len(channels) - 1).

Dual-codebook tokenizer (DualTokenizer):
  x -> trunk (levels 0..c) -> clinical quantiser (Kc x Dc, at 1/2^c)            -> z_c
                      \\-> generative encoder (levels c+1..g) -> quantiser (Kg x Dg) -> z_g
  decoder(z_g, clinical tokens(z_c)) -> x_hat;   clinical head(z_c) -> x_hat_c;   prior(z_g) -> logits over Kc
- The generative encoder continues from the trunk (VQ-VAE-2 style hierarchy), so the latent
  the DDPM models is a coarse summary of the same features the clinical codes describe.
- Where the decoder reads the clinical path: at the generative latent's resolution. z_c is
  projected, folded space-to-depth by 2^(g-c) (each token carries the full 2^(g-c)-cube of
  clinical detail, nothing is pooled away) and becomes one context token per generative
  voxel. The token count then equals the generative grid (quickstart 10x12x10 = 1,200;
  1 mm with a 1/8 latent: 20x24x20 = 9,600), which full cross-attention can afford; at the
  clinical grid itself it would be 8x more tokens and 64x the attention cost.
- Fusion ('cross_attention+aligned', the default): the decoder cross-attends to the tokens
  (3D sin-cos positions added to queries and keys, so the alignment is easy to learn) AND
  adds a zero-initialised projection of the token at its own position. The aligned path is
  what makes reconstruction train in minutes; cross-attention adds non-local context.
  'cross_attention' uses attention only.
- Generation has no scan to encode, so the clinical path must come from somewhere. Two
  modes, both trained: 'predicted' (the default) -- a small conditional prior, a conv net
  from the quantised generative latent to logits over the clinical codebook at the clinical
  grid, trained by cross-entropy on the encoded clinical indices (VQ-VAE-2's conditional
  prior, here a factorised per-voxel one); its argmax codes are looked up and decoded. And
  'null' -- a learned null token replaces every clinical token; the decoder is trained with
  clinical-feature dropout (config clinical.dropout), so this mode is a true fallback rather
  than an untrained input. The stage runner measures reconstruction with encoded,
  predicted and null clinical latents.
- The clinical head decodes z_c alone: it is what stage 1 ("clinical encoder, decoder
  frozen") trains against, and it keeps the clinical latent decodable during joint tuning.

Every 3D convolution goes through synthmri_jax.models.conv (backend-specific formulation).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthmri_jax.models import layers
from synthmri_jax.models.tokenizer_blocks import (DecoderStack, EncoderStack, LatentHead,
                                                 attention_mask, check_grid, conv, group_count, quantizer,
                                                 space_to_depth)
from synthmri_jax.sharding import constrain

CLINICAL_MODES = ("encoded", "predicted", "null")


# ------------------------------------------------------------------------------ VQ-VAE


class VQVAE(nn.Module):
  """Single-path 3D VQ-VAE: encoder to 1/2^(L-1), one codebook, mirrored decoder; attention at
  `attention_levels` (the lowest level by default) and in the bottleneck.

  quantize=False makes it a plain continuous autoencoder (no codebook; the latent a DDPM models
  is the encoder output, decoded as it comes): on a small CPU budget the VQ bottleneck (a few
  dozen live codes early in training) blurs exactly the fine anatomy a disease changes.

  Args:
    channels: width of each level; the latent sits at 1/2^(L-1) of the (patched) grid.
    num_res_blocks: ResBlocks per level, one int or one per level.
    attention_levels: per level, whether it has self-attention (a bool applies to all).
    num_heads: attention heads.
    norm_groups: GroupNorm groups.
    out_channels: channels of the reconstruction (the input's channels).
    num_codes: codebook size (quantize=True).
    code_dim: channels of the latent (and of each code).
    patch_size: space_to_depth patching of the input before the first level (1: none).
    quantize: vector-quantise the latent (False: a continuous autoencoder).
    vq: the quantizer's settings (config.tokenizer.vq: EMA decay, dead-code restarts...).
    remat: rematerialise every ResBlock and attention block in the backward pass: activation
      memory for compute (at 1 mm the full-resolution levels do not fit a 16 GiB chip without it).
    dtype: compute dtype (params stay float32).
  """
  channels: Sequence[int] = (16, 32, 64)
  num_res_blocks: Sequence[int] | int = 1
  attention_levels: Sequence[bool] | bool = (False, False, True)
  num_heads: int = 4
  norm_groups: int = 8
  out_channels: int = 1
  num_codes: int = 256
  code_dim: int = 8
  patch_size: int = 1
  quantize: bool = True
  vq: Any = None
  remat: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    L = len(self.channels)
    nres = layers.per_level(self.num_res_blocks, L, "num_res_blocks")
    kw = dict(channels=tuple(self.channels), attention_levels=attention_mask(self.attention_levels, L),
              num_heads=self.num_heads, norm_groups=self.norm_groups, patch=int(self.patch_size), remat=self.remat,
              dtype=self.dtype)
    self.encoder = EncoderStack(levels=tuple(range(L)), num_res_blocks=nres, **kw)
    self.quant_head = LatentHead(self.code_dim, self.norm_groups, self.dtype)
    if self.quantize:
      self.quantizer = quantizer(self.num_codes, self.code_dim, self.vq, "quantizer")
    self.decoder = DecoderStack(top=L - 1, num_res_blocks=nres, mid_blocks=2, out_channels=self.out_channels,
                                **kw)

  def encode(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict | None]:
    """x -> (quantised latent, quantiser aux); (encoder output, None) when quantize=False."""
    check_grid(x.shape[1:4], len(self.channels), self.patch_size)
    z = self.quant_head(self.encoder(x))
    return self.quantizer(z, train=train) if self.quantize else (z, None)

  def decode(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.decoder(z)

  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, Any]:
    z, aux = self.encode(x, train)
    x_hat, feats = self.decode(z)
    return {"x_hat": x_hat, "features": feats, "z": z, "vq": aux}

  def encode_generative(self, x: jax.Array, quantize: bool = True) -> jax.Array:
    """The latent a DDPM models: quantised codes (quantize=True) or the encoder output before quantisation."""
    check_grid(x.shape[1:4], len(self.channels), self.patch_size)
    z = self.quant_head(self.encoder(x))
    return self.quantizer(z)[0] if quantize and self.quantize else z

  def decode_from_generative(self, z: jax.Array, clinical: str = "null", quantize: bool = True) -> jax.Array:
    """Latent -> volume; a sampled latent is snapped to its nearest codes first (quantize=True).
    `clinical` is accepted for interface parity with DualTokenizer (there is no clinical path)."""
    del clinical
    if quantize and self.quantize:
      z = self.quantizer(z)[0]
    return self.decoder(z)[0]


# ------------------------------------------------------------------------------ dual tokenizer


class ClinicalPrior(nn.Module):
  """p(clinical codes | generative latent), factorised over clinical voxels (VQ-VAE-2's conditional prior,
  without the autoregression: generation then costs one forward pass).

  ResBlocks at the generative resolution (cheap), nearest + 3x3x3 conv upsampling to the
  clinical grid, GN, SiLU and a linear layer give logits over the Kc clinical codes. With Kc = 16,384 the logits of a 1 mm volume would be
  gigabytes, so cross-entropy and argmax scan the codebook in chunks of `logit_chunk` codes
  (rematerialised in the backward pass): memory O(tokens x chunk).
  """
  num_codes: int
  channels: int
  levels_up: int
  num_res_blocks: int
  norm_groups: int
  logit_chunk: int = 4096
  dtype: Any = jnp.float32

  def setup(self):
    self.conv_in = conv(self.channels, 3, self.dtype, "conv_in")
    g = group_count(self.norm_groups, self.channels)
    self.blocks_in = [layers.ResBlock3D(self.channels, num_groups=g, dtype=self.dtype, name=f"in_block{j}")
                      for j in range(self.num_res_blocks)]
    self.ups = [layers.Upsample(self.channels, dtype=self.dtype, name=f"up_{i}") for i in range(self.levels_up)]
    self.norm_out = layers.GroupNorm(num_groups=g, dtype=self.dtype, name="norm_out")
    self.logits_kernel = self.param(
        "logits_kernel", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "codebook")),
        (self.channels, self.num_codes), jnp.float32)
    self.logits_bias = self.param(
        "logits_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("codebook",)), (self.num_codes,),
        jnp.float32)

  def __call__(self, z_gen: jax.Array) -> jax.Array:
    """(B, xg, yg, zg, Dg) -> hidden (B, xc, yc, zc, channels) float32 (logits = hidden @ W + b)."""
    h = self.conv_in(z_gen.astype(self.dtype))
    for blk in self.blocks_in:
      h = blk(h)
    for up in self.ups:
      h = up(h)
    return nn.silu(self.norm_out(h)).astype(jnp.float32)

  def _chunks(self):
    k = self.num_codes
    c = max(1, min(int(self.logit_chunk), k))
    n = -(-k // c)
    pad = n * c - k
    w = jnp.pad(self.logits_kernel, ((0, 0), (0, pad)))
    b = jnp.pad(self.logits_bias, (0, pad), constant_values=-jnp.inf)
    return w.reshape(w.shape[0], n, c).transpose(1, 0, 2), b.reshape(n, c), c

  def cross_entropy(self, hidden: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-voxel cross-entropy (targets int, hidden.shape[:-1]) and whether argmax == target."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    w, b, c = self._chunks()

    @jax.checkpoint
    def body(carry, xs):
      m, s, best, arg = carry
      j, wj, bj = xs
      logits = h @ wj + bj[None, :]
      mj = jnp.max(logits, axis=-1)
      new_m = jnp.maximum(m, mj)
      s = s * jnp.exp(m - new_m) + jnp.sum(jnp.exp(logits - new_m[:, None]), axis=-1)
      aj = jnp.argmax(logits, axis=-1).astype(jnp.int32) + j * c
      better = mj > best
      return (new_m, s, jnp.where(better, mj, best), jnp.where(better, aj, arg)), None

    n = h.shape[0]
    init = (jnp.full((n,), -jnp.inf), jnp.zeros((n,)), jnp.full((n,), -jnp.inf), jnp.zeros((n,), jnp.int32))
    (m, s, _, arg), _ = jax.lax.scan(body, init, (jnp.arange(w.shape[0], dtype=jnp.int32), w, b))
    target_logit = jnp.sum(h * jnp.take(self.logits_kernel, t, axis=1).T, axis=-1) + jnp.take(self.logits_bias, t)
    ce = m + jnp.log(s) - target_logit
    return ce.reshape(targets.shape), (arg == t).reshape(targets.shape)

  def argmax(self, hidden: jax.Array) -> jax.Array:
    """Most likely clinical code per voxel, (B, xc, yc, zc) int32."""
    h = jax.lax.stop_gradient(hidden).reshape(-1, hidden.shape[-1])
    w, b, c = self._chunks()

    def body(carry, xs):
      best, arg = carry
      j, wj, bj = xs
      logits = h @ wj + bj[None, :]
      mj = jnp.max(logits, axis=-1)
      aj = jnp.argmax(logits, axis=-1).astype(jnp.int32) + j * c
      better = mj > best
      return (jnp.where(better, mj, best), jnp.where(better, aj, arg)), None

    n = h.shape[0]
    (_, arg), _ = jax.lax.scan(body, (jnp.full((n,), -jnp.inf), jnp.zeros((n,), jnp.int32)),
                               (jnp.arange(w.shape[0], dtype=jnp.int32), w, b))
    return arg.reshape(hidden.shape[:-1])


class ClinicalTokens(nn.Module):
  """Clinical latent (B, xc, yc, zc, Dc) -> context tokens (B, N_gen, C_gen) on the generative grid:
  3x3x3 conv + SiLU, space-to-depth fold by 2^(g-c), linear projection; and the learned null token."""
  width: int          # channels at the clinical level
  out_width: int      # channels at the generative level
  fold: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z_clin: jax.Array | None, batch: int, grid: Sequence[int],
               drop: jax.Array | None = None) -> jax.Array:
    """drop: (B,) bool, True -> that volume's tokens are the null token. z_clin None: all null."""
    null = self.param("null", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("mlp",)),
                      (self.out_width,), jnp.float32)
    n = int(np.prod(grid))
    null_tokens = jnp.broadcast_to(null.astype(self.dtype), (batch, n, self.out_width))
    if z_clin is None:
      return null_tokens
    h = nn.silu(conv(self.width, 3, self.dtype, "conv")(z_clin.astype(self.dtype)))
    h = space_to_depth(h, self.fold)
    tokens = layers.dense(self.out_width, ("embed", "mlp"), dtype=self.dtype, name="proj")(h.reshape(batch, n, -1))
    tokens = constrain(tokens, layers.TOKEN_AXES)
    if drop is not None:
      tokens = jnp.where(drop[:, None, None], null_tokens, tokens)
    return tokens


class DualTokenizer(nn.Module):
  """BrainG3N's dual-codebook tokenizer (see the module docstring for the design).

  Args:
    channels, num_res_blocks, attention_levels, num_heads, norm_groups, out_channels,
      patch_size, vq, remat, dtype: as in VQVAE.
    clinical_level: the level whose features the clinical codebook quantises (finer than the
      generative latent at the last level).
    clinical_codes, clinical_dim: the clinical codebook's size and code width.
    clinical_fusion: how the decoder reads the clinical latent: 'cross_attention', or
      'cross_attention+aligned' (also added, upsampled, to the aligned decoder level).
    clinical_head_blocks: ResBlocks of the clinical reconstruction head (the clinical phase's
      target).
    generative_codes, generative_dim: the generative codebook's size and code width.
    prior_channels, prior_res_blocks: width and depth of the ClinicalPrior that predicts the
      clinical codes from the generative latent at generation time.
    prior_logit_chunk: codes per chunk of the prior's chunked cross-entropy (memory bound).
  """
  channels: Sequence[int] = (16, 32, 64)
  num_res_blocks: Sequence[int] | int = 1
  attention_levels: Sequence[bool] | bool = (False, False, True)
  num_heads: int = 4
  norm_groups: int = 8
  out_channels: int = 1
  clinical_level: int = 1
  clinical_codes: int = 1024
  clinical_dim: int = 16
  clinical_fusion: str = "cross_attention+aligned"
  clinical_head_blocks: int = 1
  generative_codes: int = 256
  generative_dim: int = 8
  prior_channels: int = 32
  prior_res_blocks: int = 1
  prior_logit_chunk: int = 4096
  patch_size: int = 1
  vq: Any = None
  remat: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    L = len(self.channels)
    c, g = int(self.clinical_level), L - 1
    if not 0 <= c < g:
      raise ValueError(f"clinical.level must be in [0, {g}) for {L} levels (generative latent at level {g}), got {c}")
    if self.clinical_fusion not in ("cross_attention", "cross_attention+aligned"):
      raise ValueError(f"clinical.fusion must be 'cross_attention' or 'cross_attention+aligned', "
                       f"got {self.clinical_fusion!r}")
    nres = layers.per_level(self.num_res_blocks, L, "num_res_blocks")
    kw = dict(channels=tuple(self.channels), attention_levels=attention_mask(self.attention_levels, L),
              num_heads=self.num_heads, norm_groups=self.norm_groups, patch=int(self.patch_size), remat=self.remat,
              dtype=self.dtype)
    self.trunk = EncoderStack(levels=tuple(range(c + 1)), num_res_blocks=nres, **kw)
    self.clinical_quant_head = LatentHead(self.clinical_dim, self.norm_groups, self.dtype)
    self.clinical_vq = quantizer(self.clinical_codes, self.clinical_dim, self.vq, "clinical_vq")
    self.clinical_head = DecoderStack(top=c, num_res_blocks=(0,) * L, mid_blocks=self.clinical_head_blocks,
                                      out_channels=self.out_channels,
                                      **{**kw, "attention_levels": (False,) * L})
    self.generative_encoder = EncoderStack(levels=tuple(range(c + 1, g + 1)), num_res_blocks=nres, **kw)
    self.generative_quant_head = LatentHead(self.generative_dim, self.norm_groups, self.dtype)
    self.generative_vq = quantizer(self.generative_codes, self.generative_dim, self.vq, "generative_vq")
    self.clinical_tokens = ClinicalTokens(self.channels[c], self.channels[g], 2 ** (g - c), self.dtype)
    self.decoder = DecoderStack(top=g, num_res_blocks=nres, mid_blocks=2, out_channels=self.out_channels,
                                fusion=self.clinical_fusion, **kw)
    self.prior = ClinicalPrior(self.clinical_codes, self.prior_channels, g - c, self.prior_res_blocks,
                               self.norm_groups, self.prior_logit_chunk, self.dtype)

  # -- pieces the training task composes per stage

  def encode_clinical(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict, jax.Array]:
    """x -> (z_c quantised, clinical quantiser aux, trunk features)."""
    check_grid(x.shape[1:4], len(self.channels), self.patch_size)
    feats = self.trunk(x)
    z_c, aux = self.clinical_vq(self.clinical_quant_head(feats), train=train)
    return z_c, aux, feats

  def encode_generative_from_trunk(self, feats: jax.Array, train: bool = False,
                                   quantize: bool = True) -> tuple[jax.Array, dict | None]:
    z = self.generative_quant_head(self.generative_encoder(feats))
    if not quantize:
      return z, None
    return self.generative_vq(z, train=train)

  def decode(self, z_gen: jax.Array, z_clin: jax.Array | None,
             drop: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(x_hat, conv_out input features); z_clin None = 'null' mode; drop (B,) bool = per-volume null."""
    grid = z_gen.shape[1:4]
    ctx = self.clinical_tokens(z_clin, z_gen.shape[0], grid, drop)
    return self.decoder(z_gen, ctx)

  def decode_clinical_head(self, z_clin: jax.Array) -> jax.Array:
    return self.clinical_head(z_clin)[0]

  def prior_hidden(self, z_gen: jax.Array) -> jax.Array:
    return self.prior(jax.lax.stop_gradient(z_gen))

  def prior_cross_entropy(self, z_gen: jax.Array, clinical_indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy of the encoded clinical codes under the prior, and its top-1 accuracy.
    The generative latent is stop-gradiented: the prior never shapes the latent the DDPM models."""
    ce, hit = self.prior.cross_entropy(self.prior_hidden(z_gen), jax.lax.stop_gradient(clinical_indices))
    return jnp.mean(ce), jnp.mean(hit.astype(jnp.float32))

  def predict_clinical(self, z_gen: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(clinical indices, clinical latent) from the prior's argmax."""
    idx = self.prior.argmax(self.prior_hidden(z_gen))
    return idx, self.clinical_vq.lookup(idx)

  # -- the whole model (used for init and the joint stage)

  def __call__(self, x: jax.Array, train: bool = False, drop: jax.Array | None = None) -> dict[str, Any]:
    z_c, aux_c, feats = self.encode_clinical(x, train)
    z_g, aux_g = self.encode_generative_from_trunk(feats, train)
    x_hat, out_feats = self.decode(z_g, z_c, drop)
    ce, acc = self.prior_cross_entropy(z_g, aux_c["indices"])
    return {"x_hat": x_hat, "features": out_feats, "x_hat_clinical": self.decode_clinical_head(z_c),
            "z_clinical": z_c, "z_generative": z_g, "vq_clinical": aux_c, "vq_generative": aux_g,
            "prior_ce": ce, "prior_accuracy": acc}

  # -- the interface of the latent DDPM

  def encode_generative(self, x: jax.Array, quantize: bool = True) -> jax.Array:
    """x (B, X, Y, Z, C) -> generative latent (B, X/2^g, Y/2^g, Z/2^g, Dg), quantised unless quantize=False."""
    _, _, feats = self.encode_clinical(x)
    return self.encode_generative_from_trunk(feats, quantize=quantize)[0]

  def decode_from_generative(self, z_gen: jax.Array, clinical: str = "predicted", quantize: bool = True) -> jax.Array:
    """Generative latent -> volume, with the clinical path 'predicted' by the prior or 'null'.

    A sampled latent is first snapped to its nearest generative codes (quantize=True), the
    inputs the decoder and the prior were trained on.
    """
    if clinical not in ("predicted", "null"):
      raise ValueError(f"clinical must be 'predicted' or 'null' when decoding a generative latent, got {clinical!r}")
    if quantize:
      z_gen = self.generative_vq(z_gen)[0]
    z_clin = self.predict_clinical(z_gen)[1] if clinical == "predicted" else None
    return self.decode(z_gen, z_clin)[0]


# ------------------------------------------------------------------------------ construction


def build_tokenizer(tcfg: Any, in_channels: int) -> nn.Module:
  """The model of config.tokenizer for volumes with `in_channels` channels (vqgan -> its VQVAE generator)."""
  m = tcfg.model
  dtype = jnp.dtype(str(m.get("dtype", "float32")))
  vq = dict(tcfg.vq)
  common = dict(channels=tuple(int(c) for c in m.channels),
                num_res_blocks=tuple(int(n) for n in layers.per_level(m.num_res_blocks, len(m.channels), "num_res_blocks")),
                attention_levels=tuple(m.attention_levels), num_heads=int(m.num_heads),
                norm_groups=int(m.norm_groups), out_channels=int(in_channels), patch_size=int(m.get("patch_size", 1)),
                vq=vq, remat=bool(m.get("remat", False)), dtype=dtype)
  variant = str(tcfg.variant)
  if variant in ("vqvae", "vqgan"):
    return VQVAE(num_codes=int(tcfg.generative.num_codes), code_dim=int(tcfg.generative.code_dim),
                 quantize=bool(tcfg.generative.get("quantize", True)), **common)
  if variant == "dual":
    return DualTokenizer(
        clinical_level=int(tcfg.clinical.level), clinical_codes=int(tcfg.clinical.num_codes),
        clinical_dim=int(tcfg.clinical.code_dim), clinical_fusion=str(tcfg.clinical.fusion),
        clinical_head_blocks=int(tcfg.clinical.head_res_blocks),
        generative_codes=int(tcfg.generative.num_codes), generative_dim=int(tcfg.generative.code_dim),
        prior_channels=int(tcfg.prior.channels), prior_res_blocks=int(tcfg.prior.num_res_blocks),
        prior_logit_chunk=int(tcfg.prior.logit_chunk), **common)
  raise ValueError(f"tokenizer.variant must be 'dual', 'vqvae' or 'vqgan', got {variant!r}")
