"""Pluggable 3D feature network for the tokenizers' perceptual loss.

What the default is, honestly: no pretrained 3D medical network can be downloaded here, so
the default feature net has FIXED RANDOM weights (He-normal, from a seed in the config):
a "random-projection perceptual loss". Random conv features compare local structure
(edges, texture, contrast) at several scales, which is why LPIPS-style distances on
untrained networks still beat plain L2/L1 as perceptual proxies (Zhang et al., 2018,
"rand" baselines) -- but they are NOT a learned notion of anatomy, and numbers from this
loss are not comparable with the article's (3D ResNet-50 pretrained on medical images).

User weights: pass a local file in config.tokenizer.perceptual.weights:
  *.npz      one array per parameter, keys are '/'-joined flax paths, e.g.
             'stage0_conv0/kernel' (kernels are DHWIO: (kd, kh, kw, in, out), like flax;
             a PyTorch Conv3d weight (out, in, kd, kh, kw) maps by .transpose(2, 3, 4, 1, 0))
  *.msgpack  flax.serialization.to_bytes of the same tree (optionally wrapped as {'params': tree})
The architecture (FeatureNet3D below) is fixed by `channels` and `in_channels`:
  stage 0:  conv 3x3x3 -> LeakyReLU 0.2                              (stage0_conv0)
  stage i>0: conv 3x3x3 stride 2 -> LeakyReLU 0.2 -> conv 3x3x3 -> LeakyReLU 0.2
                                                         (stage{i}_conv0, stage{i}_conv1)
  features = output of every stage (full resolution, 1/2, 1/4, ...). One conv at full
  resolution only: that is where 3D convs cost the most.
A file whose tree or shapes differ is rejected with an error naming the file and listing
the missing, unexpected and mis-shaped parameters. To use the project's own trained
encoder instead, save its matching stages in this layout.

Distance (LPIPS without learned channel weights): per stage, unit-normalise the feature
vector at every voxel, mean squared difference over voxels and channels; stages averaged.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synthmri_jax.models.conv import Conv3D


class FeatureNet3D(nn.Module):
  """Volumes -> the list of per-stage feature maps the perceptual distance compares.

  Args:
    channels: width of each stage (each after the first halves the grid).
    dtype: compute dtype (params stay float32).
  """
  channels: Sequence[int] = (16, 32, 64)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> list[jax.Array]:
    feats = []
    h = x.astype(self.dtype)
    for i, c in enumerate(self.channels):
      for j, stride in enumerate((1,) if i == 0 else (2, 1)):
        h = Conv3D(c, kernel_size=3, strides=stride, padding="SAME", use_bias=True, dtype=self.dtype,
                   name=f"stage{i}_conv{j}")(h)
        h = nn.leaky_relu(h, 0.2)
      feats.append(h)
    return feats


def _plain(tree: Any) -> Any:
  """Unboxes flax partitioning metadata and converts to nested dicts of numpy arrays."""
  tree = jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return jax.tree.map(np.asarray, flax.core.unfreeze(tree))


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(_flatten(v, key))
    else:
      out[key] = np.asarray(v)
  return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, v in flat.items():
    node = out
    parts = key.split("/")
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def random_params(net: FeatureNet3D, in_channels: int, seed: int) -> dict[str, Any]:
  """The default fixed random weights (a pure function of the seed and the architecture)."""
  with jax.ensure_compile_time_eval():   # concrete even when called under jit / eval_shape (task.init)
    x = jnp.zeros((1, 8, 8, 8, in_channels), jnp.float32)
    return _plain(net.init(jax.random.key(int(seed)), x)["params"])


def save_params(path: str, params: Any) -> None:
  """Writes a param tree as .npz ('/'-joined keys) or .msgpack, by the file's extension."""
  params = _plain(params)
  if path.endswith(".npz"):
    np.savez(path, **_flatten(params))
  elif path.endswith(".msgpack"):
    with open(path, "wb") as f:
      f.write(flax.serialization.msgpack_serialize(params))
  else:
    raise ValueError(f"{path}: perceptual weights must be .npz or .msgpack")


def load_params(path: str, net: FeatureNet3D, in_channels: int) -> dict[str, Any]:
  """User weights from a local .npz / .msgpack, checked against the architecture of `net`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"perceptual weights file {path!r} does not exist")
  try:
    if path.endswith(".npz"):
      with np.load(path) as f:
        tree = _unflatten({k: f[k] for k in f.files})
    elif path.endswith(".msgpack"):
      with open(path, "rb") as f:
        tree = flax.serialization.msgpack_restore(f.read())
    else:
      raise ValueError("expected a .npz or .msgpack file")
  except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same clear message
    raise ValueError(f"perceptual weights file {path!r} could not be read: {e}") from e
  if isinstance(tree, dict) and set(tree) == {"params"}:
    tree = tree["params"]
  expected = _flatten(random_params(net, in_channels, 0))
  got = _flatten(tree) if isinstance(tree, dict) else {}
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  shapes = sorted(f"{k}: file {got[k].shape} vs model {expected[k].shape}"
                  for k in set(expected) & set(got) if got[k].shape != expected[k].shape)
  if missing or unexpected or shapes:
    raise ValueError(
        f"perceptual weights file {path!r} does not match FeatureNet3D(channels={tuple(net.channels)}, "
        f"in_channels={in_channels}): missing {missing or 'none'}; unexpected {unexpected or 'none'}; "
        f"shape mismatches {shapes or 'none'}. Set config.tokenizer.perceptual.channels to the file's "
        "architecture (see synthmri_jax/models/perceptual.py for the layout)")
  return _unflatten({k: np.asarray(v, np.float32) for k, v in got.items()})


class Perceptual:
  """The perceptual distance with its (non-trainable) weights; `params` lives in the task's model_state."""

  def __init__(self, channels: Sequence[int] = (16, 32, 64), weights: str = "", seed: int = 1234,
               dtype: Any = jnp.float32):
    self.net = FeatureNet3D(channels=tuple(int(c) for c in channels), dtype=dtype)
    self.weights = str(weights or "")
    self.seed = int(seed)

  @property
  def description(self) -> str:
    if self.weights:
      return f"FeatureNet3D{tuple(self.net.channels)} with user weights from {self.weights}"
    return f"FeatureNet3D{tuple(self.net.channels)} with fixed random weights (seed {self.seed}): random-projection perceptual loss"

  def init_params(self, in_channels: int) -> dict[str, Any]:
    if self.weights:
      return load_params(self.weights, self.net, in_channels)
    return random_params(self.net, in_channels, self.seed)

  def features(self, params: Any, x: jax.Array) -> list[jax.Array]:
    return self.net.apply({"params": params}, x)

  def distance(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-volume perceptual distance (B,); gradients flow to both inputs (stop one for a loss target)."""
    params = jax.lax.stop_gradient(params)
    b = x.shape[0]
    fx = self.features(params, jnp.concatenate([x, y], axis=0))
    total = jnp.zeros((b,), jnp.float32)
    for f in fx:
      f = f.astype(jnp.float32)
      f = f * jax.lax.rsqrt(jnp.sum(f * f, axis=-1, keepdims=True) + 1e-10)
      d = jnp.square(f[:b] - f[b:])
      total = total + jnp.mean(d.reshape(b, -1), axis=-1) * f.shape[-1]
    return total / len(fx)


def from_config(pcfg: Any, dtype: Any = jnp.float32) -> Perceptual:
  return Perceptual(channels=tuple(pcfg.channels), weights=str(pcfg.weights), seed=int(pcfg.seed), dtype=dtype)
