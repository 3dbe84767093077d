"""MONAI's 3D VQVAE block for block on our layers, and MONAI -> flax weight import (VQVAE, DiffusionModelUNet).

Why this exists: the throughput benchmark (tools/benchmark_throughput.py) must train the *same*
architecture in both frameworks, and our tokenizer (GroupNorm + SiLU ResBlocks, attention) is not
MONAI's VQVAE (plain ReLU residual units, no norms). The U-Net needs no mirror: models/unet.py
already follows MONAI's DiffusionModelUNet with with_conditioning=False. The weight import lets a
test copy MONAI's weights into ours and compare outputs, the strongest check that the
architectures match; it also lets a user start from a MONAI checkpoint.

    model = VQVAE(channels=(32, 64), num_res_channels=(32, 64), num_res_layers=1, num_embeddings=256, embedding_dim=32)
    (x_hat, q_loss), stats = model.apply(variables, x, train=True, mutable=["vq_stats"])   # x (B, X, Y, Z, C)

MONAI's VQVAE (monai.networks.nets.vqvae), with its default down/upsample parameters:
  encoder: per level, Conv(k4, s2, p1) + ReLU, num_res_layers x residual unit; Conv(k3) to embedding_dim
  residual unit: ReLU(x + Conv3(ReLU(Conv3(x))))
  decoder: Conv(k3) to the top width; per level (reversed), residual units, ConvTranspose(k4, s2, p1)
           (+ ReLU except after the last, which outputs out_channels)
  quantizer: EMA codebook (not a gradient parameter), commitment loss 0.25 * mse(sg(q), z).
Every convolution, the transposed ones included, is our backend-aware models.conv layer (native
XLA convs on GPU/TPU, the faster CPU formulations on CPU), so the benchmark measures our layers.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthmri_jax.models.conv import Conv3D, ConvTranspose3D
from synthmri_jax.models.layers import VOLUME_AXES
from synthmri_jax.models.quantizer import STATS, VectorQuantizer
from synthmri_jax.sharding import constrain
from synthmri_jax.sharding import unbox



class ResidualUnit(nn.Module):
  """MONAI's VQVAEResidualUnit: ReLU(x + conv2(ReLU(conv1(x))))."""

  res_channels: int
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, name: Conv3D(f, kernel_size=3, strides=1, padding=1, use_bias=True, dtype=self.dtype,
                                  impl=self.conv_impl, name=name)
    h = nn.relu(conv(self.res_channels, "conv1")(x))
    return constrain(nn.relu(x + conv(x.shape[-1], "conv2")(h)), VOLUME_AXES)


class VQVAE(nn.Module):
  """MONAI VQVAE (3D, default k4/s2/p1 down- and upsampling), channels-last. Returns (x_hat, quantisation loss)."""

  in_channels: int = 1
  out_channels: int = 1
  channels: Sequence[int] = (96, 96, 192)
  num_res_layers: int = 3
  num_res_channels: Sequence[int] = (96, 96, 192)
  num_embeddings: int = 32
  embedding_dim: int = 64
  commitment_cost: float = 0.25
  decay: float = 0.5
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  def setup(self):
    if len(self.num_res_channels) != len(self.channels):
      raise ValueError(f"num_res_channels {self.num_res_channels} needs one entry per level of {self.channels}")
    conv = lambda f, k, s, p, name: Conv3D(f, kernel_size=k, strides=s, padding=p, use_bias=True, dtype=self.dtype,
                                           impl=self.conv_impl, name=name)
    levels = len(self.channels)
    self.enc_down = [conv(c, 4, 2, 1, f"enc_down_{i}") for i, c in enumerate(self.channels)]
    self.enc_res = [[ResidualUnit(self.num_res_channels[i], self.dtype, self.conv_impl, name=f"enc_res_{i}_{j}")
                     for j in range(self.num_res_layers)] for i in range(levels)]
    self.enc_out = conv(self.embedding_dim, 3, 1, 1, "enc_out")
    rev, rev_res = list(reversed(self.channels)), list(reversed(self.num_res_channels))
    self.dec_in = conv(rev[0], 3, 1, 1, "dec_in")
    self.dec_res = [[ResidualUnit(rev_res[i], self.dtype, self.conv_impl, name=f"dec_res_{i}_{j}")
                     for j in range(self.num_res_layers)] for i in range(levels)]
    self.dec_up = [ConvTranspose3D(self.out_channels if i == levels - 1 else rev[i + 1], kernel_size=4, strides=2,
                                   padding=1, dtype=self.dtype, impl=self.conv_impl, name=f"dec_up_{i}")
                   for i in range(levels)]
    # MONAI's EMAQuantizer: no dead-code restarts; its codebook is not a gradient parameter.
    self.quantizer = VectorQuantizer(num_codes=self.num_embeddings, code_dim=self.embedding_dim, mode="ema",
                                     beta=self.commitment_cost, decay=self.decay, epsilon=self.epsilon,
                                     restart_threshold=0.0)

  def encode(self, x: jax.Array) -> jax.Array:
    h = constrain(x.astype(self.dtype), VOLUME_AXES)
    for down, units in zip(self.enc_down, self.enc_res):
      h = constrain(nn.relu(down(h)), VOLUME_AXES)
      for unit in units:
        h = unit(h)
    return self.enc_out(h)

  def decode(self, z: jax.Array) -> jax.Array:
    h = self.dec_in(z.astype(self.dtype))
    for i, (units, up) in enumerate(zip(self.dec_res, self.dec_up)):
      for unit in units:
        h = unit(h)
      h = up(h)
      if i < len(self.dec_up) - 1:
        h = nn.relu(h)
    return h

  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    z = self.encode(x)
    z_q, aux = self.quantizer(z.astype(jnp.float32), train=train)
    return self.decode(z_q.astype(self.dtype)).astype(jnp.float32), aux["loss"]


# ------------------------------------------------------------------------------ MONAI weight import


def _np(t: Any) -> np.ndarray:
  return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def conv_kernel(w: Any) -> np.ndarray:
  """PyTorch Conv3d weight (out, in, kx, ky, kz) -> our (kx, ky, kz, in, out)."""
  return np.ascontiguousarray(_np(w).transpose(2, 3, 4, 1, 0))


def transpose_kernel(w: Any) -> np.ndarray:
  """PyTorch ConvTranspose3d weight (in, out, kx, ky, kz) -> our ConvTranspose3D kernel (kx, ky, kz, in, out)."""
  return np.ascontiguousarray(_np(w).transpose(2, 3, 4, 0, 1))


def _set(tree: dict, path: Sequence[str], value: np.ndarray) -> None:
  node = tree
  for k in path[:-1]:
    if k not in node:
      raise KeyError(f"no parameter {'/'.join(path)} (missing {k!r})")
    node = node[k]
  old = node[path[-1]]
  if tuple(old.shape) != tuple(value.shape):
    raise ValueError(f"{'/'.join(path)}: ours {tuple(old.shape)}, MONAI's {tuple(value.shape)}")
  node[path[-1]] = jnp.asarray(value, dtype=old.dtype)


def _conv(tree, path, sd, prefix):
  _set(tree, [*path, "kernel"], conv_kernel(sd[prefix + ".weight"]))
  _set(tree, [*path, "bias"], _np(sd[prefix + ".bias"]))


def _dense(tree, path, sd, prefix):
  _set(tree, [*path, "kernel"], np.ascontiguousarray(_np(sd[prefix + ".weight"]).T))
  _set(tree, [*path, "bias"], _np(sd[prefix + ".bias"]))


def _norm(tree, path, sd, prefix):
  _set(tree, [*path, "scale"], _np(sd[prefix + ".weight"]))
  _set(tree, [*path, "bias"], _np(sd[prefix + ".bias"]))


def _copy(tree: Any) -> dict:
  return jax.tree.map(lambda x: x, unbox(tree))


def _finish(out: dict) -> dict:
  """Every parameter must have come from MONAI; other state (VQ usage counters) MONAI lacks starts at zero.

  `variables` may be abstract (jax.eval_shape(model.init, ...)): importing weights then needs no
  initialisation pass at all.
  """
  missing = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(out["params"])
             if isinstance(x, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f"our parameters with no MONAI counterpart (architectures differ): {missing[:10]}")
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, out)


def load_monai_vqvae(variables: Mapping[str, Any], state_dict: Mapping[str, Any], channels: Sequence[int],
                     num_res_layers: int) -> dict:
  """Our VQVAE variables (concrete or abstract) with every weight and the EMA codebook from a MONAI VQVAE state_dict."""
  out = {k: _copy(v) for k, v in variables.items()}
  p, sd, levels = out["params"], state_dict, len(channels)
  used = set()
  sd_used = _Tracking(sd, used)
  for i in range(levels):
    base = i * (1 + num_res_layers)
    _conv(p, [f"enc_down_{i}"], sd_used, f"encoder.blocks.{base}.conv")
    for j in range(num_res_layers):
      for c in ("conv1", "conv2"):
        _conv(p, [f"enc_res_{i}_{j}", c], sd_used, f"encoder.blocks.{base + 1 + j}.{c}.conv")
  _conv(p, ["enc_out"], sd_used, f"encoder.blocks.{levels * (1 + num_res_layers)}.conv")
  _conv(p, ["dec_in"], sd_used, "decoder.blocks.0.conv")
  for i in range(levels):
    base = 1 + i * (1 + num_res_layers)
    for j in range(num_res_layers):
      for c in ("conv1", "conv2"):
        _conv(p, [f"dec_res_{i}_{j}", c], sd_used, f"decoder.blocks.{base + j}.{c}.conv")
    up = f"decoder.blocks.{base + num_res_layers}.conv"
    _set(p, [f"dec_up_{i}", "kernel"], transpose_kernel(sd_used[up + ".weight"]))
    _set(p, [f"dec_up_{i}", "bias"], _np(sd_used[up + ".bias"]))
  q = "quantizer.quantizer."
  _set(out[STATS], ["quantizer", "codebook"], _np(sd_used[q + "embedding.weight"]))
  _set(out[STATS], ["quantizer", "ema_cluster_size"], _np(sd_used[q + "ema_cluster_size"]))
  _set(out[STATS], ["quantizer", "ema_embed_sum"], _np(sd_used[q + "ema_w"]))
  _check_all_used(sd, used)
  return _finish(out)


def load_monai_unet(variables: Mapping[str, Any], state_dict: Mapping[str, Any], channels: Sequence[int],
                    attention_levels: Sequence[bool], num_res_blocks: int) -> dict:
  """Our DiffusionUNet(with_conditioning=False) variables (concrete or abstract) with every weight from MONAI's."""
  out = {k: _copy(v) for k, v in variables.items()}
  p, used = out["params"], set()
  sd = _Tracking(state_dict, used)
  levels = len(channels)

  def res(path, prefix):
    _norm(p, [path, "norm1"], sd, prefix + ".norm1")
    _conv(p, [path, "conv1"], sd, prefix + ".conv1.conv")
    _dense(p, [path, "time_emb_proj"], sd, prefix + ".time_emb_proj")
    _norm(p, [path, "norm2"], sd, prefix + ".norm2")
    _conv(p, [path, "conv2"], sd, prefix + ".conv2.conv")
    if prefix + ".skip_connection.conv.weight" in state_dict:
      _conv(p, [path, "skip_connection"], sd, prefix + ".skip_connection.conv")

  def attn(path, prefix):
    _norm(p, [path, "norm"], sd, prefix + ".norm")
    for name in ("to_q", "to_k", "to_v", "out_proj"):
      _dense(p, [path, "attn", name], sd, f"{prefix}.attn.{name}")

  _conv(p, ["conv_in"], sd, "conv_in.conv")
  _dense(p, ["time_embed_0"], sd, "time_embed.0")
  _dense(p, ["time_embed_2"], sd, "time_embed.2")
  for i in range(levels):
    for j in range(num_res_blocks):
      res(f"down_{i}_res_{j}", f"down_blocks.{i}.resnets.{j}")
      if attention_levels[i]:
        attn(f"down_{i}_attn_{j}", f"down_blocks.{i}.attentions.{j}")
    if i < levels - 1:
      _conv(p, [f"down_{i}_downsample"], sd, f"down_blocks.{i}.downsampler.op.conv")
  res("mid_res_0", "middle_block.resnet_1")
  attn("mid_attn", "middle_block.attention")
  res("mid_res_1", "middle_block.resnet_2")
  for k in range(levels):
    i = levels - 1 - k
    for j in range(num_res_blocks + 1):
      res(f"up_{i}_res_{j}", f"up_blocks.{k}.resnets.{j}")
      if attention_levels[i]:
        attn(f"up_{i}_attn_{j}", f"up_blocks.{k}.attentions.{j}")
    if i > 0:
      _conv(p, [f"up_{i}_upsample"], sd, f"up_blocks.{k}.upsampler.postconv.conv")
  _norm(p, ["out_norm"], sd, "out.0")
  _conv(p, ["conv_out"], sd, "out.2.conv")
  _check_all_used(state_dict, used)
  return _finish(out)


class _Tracking(dict):
  """A read-only view of a state_dict that records which entries were read."""

  def __init__(self, sd: Mapping[str, Any], used: set):
    super().__init__(sd)
    self._used = used

  def __getitem__(self, key):
    self._used.add(key)
    return super().__getitem__(key)


def _check_all_used(state_dict: Mapping[str, Any], used: set) -> None:
  left = sorted(k for k in state_dict if k not in used)
  if left:
    raise ValueError(f"MONAI weights with no counterpart in our model (architectures differ): {left[:10]}"
                     + (f" and {len(left) - 10} more" if len(left) > 10 else ""))
