"""3D ResNet-style classifier: the diagnosis model of the TSTR / TRTR study and the default
feature extractor of FD / KID.

Why this shape: the study trains it a dozen times per evaluation (arms x seeds), so it must be
small and fast on CPU while still finding focal anatomy (ventricles, hippocampi). Pre-activation
residual blocks with GroupNorm (batch-size independent, so the 1 %-real arm with a handful of
subjects trains like the others) and a stride-2 convolution at the start of every stage after
the first; global average pooling gives the penultimate features. Normalisation sits only on
the residual branches: GroupNorm normalises each scan on its own, so a GroupNorm on the main path
(before a downsampling or the pooling) would erase exactly the per-scan global amounts that
separate classes (how much CSF, how dark the hippocampi), and the network could not learn them
(measured on the quickstart cohort: test AUC ~0.5-0.6 with it, see the classify stage logs). `stem_stride=2` makes the
stem a strided convolution, so no residual block runs at the full grid: ~8x less compute, the
setting that keeps the quickstart study within minutes on 2 CPU cores (the strided stem still
reads every voxel).

The penultimate features are the global mean of the last stage's output and the global mean of its
SiLU, side by side (2 x channels[-1]). The SiLU is the only nonlinearity on the main path; pooled
alone, it can die: when a run drives the main path negative everywhere, silu(x) ~ 0 and its
gradient vanishes, the loss stays at ln 2 and the run never leaves chance (measured on the
quickstart cohort, 2026-12-03: AUG and TSTR runs stuck at loss 0.6931, pooled features -0.001 to
-0.13 with a spread across scans of 1e-4 to 5e-3). The linear half keeps a gradient whatever the
SiLU half does; the SiLU half keeps the nonlinear read-out (linear pooling alone lost ~0.04 TRTR AUC).

    model = ResNet3D(num_classes=2)
    logits = model.apply(variables, x)                          # (B, K)
    logits, feats = model.apply(variables, x, return_features=True)
    feats = model.apply(variables, x, method=ResNet3D.features)   # (B, 2 * channels[-1]) float32

Binary problems use K = 2 logits and a softmax, like multi-class ones, so the task and the
statistics need no special case (the positive-class score is probs[:, 1]). Every 3D
convolution goes through synthmri_jax.models.conv.Conv3D (backend-specific formulation).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from synthmri_jax.models import layers
from synthmri_jax.models.conv import Conv3D
from synthmri_jax.sharding import constrain

# He init (variance 2 / fan_in) rather than conv.py's PyTorch default (1 / (3 fan_in)): with the
# latter the main path shrinks ~6x in variance per convolution, scans become nearly
# indistinguishable at the pooled features, and some seeds never leave chance level.
HE_INIT = nn.initializers.he_normal()


def group_norm(channels: int, groups: int, dtype: Any, name: str | None = None) -> nn.GroupNorm:
  """GroupNorm with the largest group count <= `groups` that divides `channels`; scale / bias
  annotated 'norm' (replicated). Statistics in float32 whatever the activation dtype."""
  g = math.gcd(int(channels), max(1, int(groups)))
  return nn.GroupNorm(num_groups=g, dtype=dtype, param_dtype=jnp.float32, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class ResBlock(nn.Module):
  """Pre-activation residual block: x + conv(act(GN(conv(act(GN(x)))))); channels unchanged."""

  channels: int
  norm_groups: int = 4
  dropout: float = 0.0
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.silu(group_norm(self.channels, self.norm_groups, self.dtype, "norm_0")(x))
    h = Conv3D(self.channels, kernel_size=3, strides=1, padding="SAME", use_bias=True, impl=self.conv_impl,
               dtype=self.dtype, kernel_init=HE_INIT, name="conv_0")(h)
    h = nn.silu(group_norm(self.channels, self.norm_groups, self.dtype, "norm_1")(h))
    if self.dropout > 0:
      h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = Conv3D(self.channels, kernel_size=3, strides=1, padding="SAME", use_bias=True, impl=self.conv_impl,
               dtype=self.dtype, kernel_init=HE_INIT, name="conv_1")(h)
    return constrain(x + h, layers.VOLUME_AXES)


class ResNet3D(nn.Module):
  """Volumes (B, X, Y, Z, C) -> class logits (B, num_classes); see the module docstring.

  Args:
    num_classes: number of logits (2 for binary).
    channels: width of each stage; each stage after the first halves the grid (stride-2 conv).
    blocks: residual blocks per stage, one int for all stages or one per stage.
    stem_stride: stride of the first convolution (2 halves the grid before the first stage).
    norm_groups: GroupNorm groups (the largest count <= this dividing the width is used).
    dropout: dropout rate inside the residual blocks (train=True only).
    dtype: compute dtype (params stay float32).
    conv_impl: the 3D convolution's formulation (models.conv.select_impl).
  """

  num_classes: int = 2
  channels: Sequence[int] = (8, 16, 32)
  blocks: int | Sequence[int] = 1
  stem_stride: int = 1
  input_pool: int = 1
  norm_groups: int = 4
  dropout: float = 0.0
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False, return_features: bool = False):
    if self.num_classes < 2:
      raise ValueError(f"num_classes must be >= 2 (binary uses 2 logits), got {self.num_classes}")
    blocks = tuple(int(n) for n in layers.per_level(self.blocks, len(self.channels), "blocks"))
    x = constrain(x.astype(self.dtype), layers.VOLUME_AXES)
    if self.input_pool > 1:
      k = (int(self.input_pool),) * 3
      x = constrain(nn.avg_pool(x, k, strides=k, padding="SAME"), layers.VOLUME_AXES)
    x = Conv3D(self.channels[0], kernel_size=3, strides=self.stem_stride, padding="SAME", use_bias=True,
               impl=self.conv_impl, dtype=self.dtype, kernel_init=HE_INIT, name="stem")(x)
    for i, (c, n) in enumerate(zip(self.channels, blocks)):
      if i > 0:
        x = Conv3D(c, kernel_size=3, strides=2, padding="SAME", use_bias=True, impl=self.conv_impl,
                   dtype=self.dtype, kernel_init=HE_INIT, name=f"down_{i}")(x)
        x = constrain(x, layers.VOLUME_AXES)
      for j in range(n):
        x = ResBlock(c, self.norm_groups, self.dropout, self.dtype, self.conv_impl, name=f"stage{i}_block{j}")(x, train)
    x = x.astype(jnp.float32)   # pooled twice: linear and SiLU, see the module docstring
    feats = jnp.concatenate([jnp.mean(x, axis=(1, 2, 3)), jnp.mean(nn.silu(x), axis=(1, 2, 3))], axis=-1)
    feats = constrain(feats, ("batch", "act_channels"))
    h = nn.Dropout(self.dropout, deterministic=not train)(feats) if self.dropout > 0 else feats
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="head",
                      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(h)
    return (logits, feats) if return_features else logits

  def features(self, x, train: bool = False):
    """Penultimate features (B, 2 * channels[-1]), float32: the FD / KID embedding."""
    return self(x, train=train, return_features=True)[1]


def from_config(model_cfg, num_classes: int) -> ResNet3D:
  """ResNet3D from a `classifier.model` config block."""
  return ResNet3D(num_classes=int(num_classes), channels=tuple(int(c) for c in model_cfg.channels),
                  blocks=model_cfg.blocks if isinstance(model_cfg.blocks, int) else tuple(model_cfg.blocks),
                  stem_stride=int(model_cfg.get("stem_stride", 1)), input_pool=int(model_cfg.get("input_pool", 1)),
                  norm_groups=int(model_cfg.norm_groups), dropout=float(model_cfg.dropout),
                  dtype=jnp.dtype(str(model_cfg.dtype)), conv_impl=str(model_cfg.conv_impl))
