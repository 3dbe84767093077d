"""The one backend-aware 3D convolution every model uses (inputs NDHWC, kernels DHWIO).

XLA:CPU runs 3D convolutions on slow generic loops, and strided / transposed ones
catastrophically so, while its 2D convolutions and dots go to fast library kernels.
`impl='cpu'` computes the same math as 2D convolutions and dots. Measured on the 2-core
CPU (tools/bench_conv.py, batch 2, f32, native/cpu time for fwd+bwd): stride-1 3x3x3
3-8x faster, stride-2 28-490x (XLA's input gradient of a strided 3D conv is a naive
dilated loop), transposed 4x4x4 40-220x (native: 7-27 s per call), nearest-upsample + conv
7x, 1x1x1 2x.

* stride-s k x k x k: k depth-sliced 2D convs (stride s in H, W) summed. Autodiff gives
  2D backward convs; XLA's 2D backward-filter conv beat a dot-formulated weight gradient
  (per-tap or im2col dots) 3-10x here, so there is no custom VJP.
* 1x1x1: one dot. Tiny receptive fields (k^3 * cin <= 64, e.g. a 1-channel input): im2col
  + one dot, after space-to-depth when strided; 2D convs with 1-8 input channels are
  memory-bound.
* transposed conv and nearest-upsample + conv: sub-pixel form. Output phase r of a stride-s
  up-conv is a stride-1 conv of the low-resolution input with a sub-kernel (transposed
  4^3 conv: 2^3 taps; upsample + 3^3 conv: 2^3 summed taps, 3.4x fewer FLOPs than
  convolving the upsampled volume). With >= 8 output channels each phase is its own conv
  (exact FLOPs); with fewer, all phases share one conv with s^3 * cout outputs.

`impl='native'` is lax.conv_general_dilated (cuDNN / TPU convs are fast) and is the
reference every other form is tested against (tests/test_conv.py). 'auto' picks 'cpu' on
the CPU backend, 'native' elsewhere. Parameters are identical for every impl, so
checkpoints move between backends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from synthmri_jax.utils import backend as backend_lib

Array = jax.Array
Padding = Union[str, int, Sequence[int], Sequence[tuple[int, int]]]

IMPLS = ("auto", "native", "cpu")
KERNEL_AXES = ("conv_spatial", "conv_spatial", "conv_spatial", "conv_in", "conv_out")
BIAS_AXES = ("conv_out",)

_DN3 = ("NDHWC", "DHWIO", "NDHWC")
_DN2 = ("NHWC", "HWIO", "NHWC")
# im2col + one dot when k^3 * cin is at most this: 2D convs with very few input channels
# are memory-bound on CPU (4x4x4 stride-2 conv of a 1-channel 48x56x48 volume: 64 columns).
_IM2COL_MAX = 64
# Up-convs with fewer output channels run all s^3 phases as one conv (a 1-channel phase
# conv is a mat-vec: 3x slower than the shared conv for 32->1 at 24x28x24).
_PHASE_MIN_COUT = 8


def select_impl(impl: str = "auto", backend: str | None = None) -> str:
  """'native' or 'cpu'. 'auto' -> 'cpu' iff the backend (default: utils.backend.target(), the platform
  being built for) is CPU."""
  if impl not in IMPLS:
    raise ValueError(f"conv impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  backend = backend_lib.target() if backend is None else backend
  return "cpu" if backend == "cpu" else "native"


def _triple(v, name: str) -> tuple[int, int, int]:
  if isinstance(v, int):
    return (v, v, v)
  v = tuple(int(a) for a in v)
  if len(v) != 3:
    raise ValueError(f"{name} must be an int or 3 ints, got {v}")
  return v


def resolve_padding(padding: Padding, kernel: Sequence[int], strides: Sequence[int],
                    spatial: Sequence[int]) -> list[tuple[int, int]]:
  """Explicit (lo, hi) per spatial dim.

  An int p (or 3 ints) pads p on both sides, as in PyTorch / MONAI. 'SAME' is XLA's: output
  ceil(n / s), extra padding at the high end, so for stride 2 it differs from MONAI's
  `padding=1`; pass ints when porting a MONAI architecture.
  """
  if isinstance(padding, str):
    mode = padding.upper()
    if mode == "VALID":
      return [(0, 0)] * 3
    if mode != "SAME":
      raise ValueError(f"padding must be 'SAME', 'VALID', int(s) or (lo, hi) pairs, got {padding!r}")
    pads = []
    for n, k, s in zip(spatial, kernel, strides):
      total = max((-(-n // s) - 1) * s + k - n, 0)
      pads.append((total // 2, total - total // 2))
    return pads
  if isinstance(padding, int):
    return [(padding, padding)] * 3
  padding = list(padding)
  if len(padding) != 3:
    raise ValueError(f"padding needs 3 entries, got {padding}")
  return [(p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in padding]


def _acc_dtype(dtype) -> Any:
  """Accumulate partial sums in f32 for half-precision inputs (what GPU convs do internally)."""
  return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


def _pad(x: Array, pads: Sequence[tuple[int, int]]) -> Array:
  """Zero-pad (negative = crop) the three spatial dims."""
  if all(lo == 0 and hi == 0 for lo, hi in pads):
    return x
  cfg = [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)]
  return lax.pad(x, jnp.zeros((), x.dtype), cfg)


# ----------------------------------------------------------------------------- native

def _conv_native(x, w, strides, pads, precision=None):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DN3, precision=precision)


def _conv_transpose_native(x, w, strides, pads, output_padding, precision=None):
  # PyTorch's ConvTranspose3d = correlation of the stride-dilated input with the flipped kernel.
  k = w.shape[:3]
  full = [(k[i] - 1 - pads[i][0], k[i] - 1 - pads[i][1] + output_padding[i]) for i in range(3)]
  return lax.conv_general_dilated(x, jnp.flip(w, (0, 1, 2)), (1, 1, 1), full, lhs_dilation=strides,
                                  dimension_numbers=_DN3, precision=precision)


def _upsample_nearest(x: Array, scale: Sequence[int]) -> Array:
  b, d, h, w, c = x.shape
  sd, sh, sw = scale
  x = jnp.broadcast_to(x[:, :, None, :, None, :, None, :], (b, d, sd, h, sh, w, sw, c))
  return x.reshape(b, d * sd, h * sh, w * sw, c)


# -------------------------------------------------------------------------------- cpu

def _conv_cpu(x, w, strides, pads, precision=None):
  """Strided 3D correlation from 2D convs / dots (see the module docstring)."""
  out_dtype = x.dtype
  acc = _acc_dtype(x.dtype)
  k = w.shape[:3]
  cin, cout = w.shape[3:]
  x = _pad(x, [(min(lo, 0), min(hi, 0)) for lo, hi in pads])  # crops first, so pads are >= 0 below
  pads = [(max(lo, 0), max(hi, 0)) for lo, hi in pads]
  n = x.shape[1:4]
  out = [(n[i] + pads[i][0] + pads[i][1] - k[i]) // strides[i] + 1 for i in range(3)]
  if min(out) < 1:
    raise ValueError(f"conv output would be empty: input {n}, kernel {k}, strides {strides}, pads {pads}")
  b = x.shape[0]
  sd, sh, sw = strides
  small = math.prod(k) * cin <= _IM2COL_MAX
  if small and strides != (1, 1, 1) and k != (1, 1, 1):
    kp = [-(-k[i] // strides[i]) for i in range(3)]
    if math.prod(kp) * math.prod(strides) * cin <= _IM2COL_MAX:
      return _conv_cpu(*_space_to_depth(x, w, strides, pads, out), (1, 1, 1), [(0, 0)] * 3, precision)
    small = False

  if k == (1, 1, 1) or small:
    xp = _pad(x, pads)
    cols = [lax.slice(xp, (0, a, bb, c, 0),
                      (b, a + sd * (out[0] - 1) + 1, bb + sh * (out[1] - 1) + 1, c + sw * (out[2] - 1) + 1, cin),
                      (1, sd, sh, sw, 1))
            for a in range(k[0]) for bb in range(k[1]) for c in range(k[2])]
    cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    y = jnp.einsum("ndhwk,ko->ndhwo", cols, w.reshape(-1, cout), precision=precision,
                   preferred_element_type=acc)
    return y.astype(out_dtype)

  xp = _pad(x, [pads[0], (0, 0), (0, 0)])
  y = None
  for a in range(k[0]):
    xs = lax.slice_in_dim(xp, a, a + sd * (out[0] - 1) + 1, sd, axis=1)
    z = lax.conv_general_dilated(xs.reshape(b * out[0], *xs.shape[2:]), w[a], (sh, sw), pads[1:],
                                 dimension_numbers=_DN2, precision=precision, preferred_element_type=acc)
    y = z if y is None else y + z
  return y.reshape(b, out[0], *y.shape[1:]).astype(out_dtype)


def _space_to_depth(x, w, strides, pads, out):
  """A strided conv as a stride-1 VALID conv: s^3 input phases become channels, the kernel is
  zero-padded to a multiple of s and split alike (for 1-channel inputs: 2x faster fwd+bwd
  than strided 2D convs or strided im2col, whose input gradient is an interior-padded scatter)."""
  b, cin, cout = x.shape[0], w.shape[3], w.shape[4]
  k, n, s = w.shape[:3], x.shape[1:4], strides
  kp = [-(-k[i] // s[i]) for i in range(3)]
  length = [s[i] * (out[i] + kp[i] - 1) for i in range(3)]
  x = _pad(x, [(pads[i][0], length[i] - n[i] - pads[i][0]) for i in range(3)])
  q = [length[i] // s[i] for i in range(3)]
  x = x.reshape(b, q[0], s[0], q[1], s[1], q[2], s[2], cin).transpose(0, 1, 3, 5, 2, 4, 6, 7)
  x = x.reshape(b, *q, math.prod(s) * cin)
  w = jnp.pad(w, [(0, kp[i] * s[i] - k[i]) for i in range(3)] + [(0, 0), (0, 0)])
  w = w.reshape(kp[0], s[0], kp[1], s[1], kp[2], s[2], cin, cout).transpose(0, 2, 4, 1, 3, 5, 6, 7)
  return x, w.reshape(*kp, math.prod(s) * cin, cout)


def _transpose_phase_taps(k: int, s: int, p: int) -> np.ndarray:
  """taps[o, r] = kernel tap t of a transposed conv reaching output phase r from input offset o, or -1.

  PyTorch semantics y[s*i + t - p] += x[i] w[t]: output s*m + r gets x[m + o] w[t] where
  t = s*((r + p)//s - o) + (r + p) % s.
  """
  pairs = {}
  for r in range(s):
    for t in range(k):
      if (t - r - p) % s == 0:
        pairs[(r, (r + p - t) // s)] = t
  return _taps_table(pairs, s)


def _upsample_phase_taps(k: int, s: int, p_lo: int) -> list[list[list[int]]]:
  """Nearest-upsample by s then conv (pad p_lo): output s*m + r gets x[m + (r + t - p_lo)//s] w[t]."""
  pairs: dict = {}
  for r in range(s):
    for t in range(k):
      pairs.setdefault((r, (r + t - p_lo) // s), []).append(t)
  return _taps_table(pairs, s)


def _taps_table(pairs: dict, s: int):
  offsets = [o for _, o in pairs]
  omin, omax = min(offsets), max(offsets)
  table = [[pairs.get((r, o)) for r in range(s)] for o in range(omin, omax + 1)]
  return omin, table


def _selection(table, k: int) -> np.ndarray:
  """One-hot S[u, r, t]: combined kernel tap u of phase r sums kernel taps t (exact in any dtype)."""
  sel = np.zeros((len(table), len(table[0]), k), np.float32)
  for u, row in enumerate(table):
    for r, taps in enumerate(row):
      for t in ([] if taps is None else [taps] if isinstance(taps, int) else taps):
        sel[u, r, t] = 1.0
  return sel


def _subpixel_cpu(x, w, scale, phase_tables, out_shape, precision=None):
  """Stride-`scale` up-conv y[s*m + r] = sum_u x[m + omin + u] (S w)[u, r], phase by phase."""
  b, n = x.shape[0], x.shape[1:4]
  cin, cout = w.shape[3:]
  s = scale
  m = [-(-out_shape[i] // s[i]) for i in range(3)]  # per-phase output length
  sel = [_selection(phase_tables[i][1], w.shape[i]) for i in range(3)]
  omin = [phase_tables[i][0] for i in range(3)]
  length = [sel[i].shape[0] for i in range(3)]
  wc = jnp.einsum("adt,beu,cfv,tuvio->abcdefio", *(jnp.asarray(a, w.dtype) for a in sel), w,
                  precision=lax.Precision.HIGHEST)

  def x_pads(i, u0, u1):  # phase output m in [0, M) reads x[m + omin + u], u in [u0, u1)
    lo = -(omin[i] + u0)
    return (lo, m[i] - 1 + omin[i] + u1 - 1 - (n[i] - 1))

  if cout >= _PHASE_MIN_COUT:
    def used(i, r):  # combined taps that phase r of dim i actually uses (None: no tap reaches it)
      nz = np.nonzero(sel[i][:, r, :].any(-1))[0]
      return (int(nz[0]), int(nz[-1]) + 1) if nz.size else None
    phases = []
    for rd in range(s[0]):
      for rh in range(s[1]):
        for rw in range(s[2]):
          ranges = used(0, rd), used(1, rh), used(2, rw)
          if None in ranges:
            phases.append(jnp.zeros((b, *m, cout), x.dtype))
            continue
          (a0, a1), (b0, b1), (c0, c1) = ranges
          phases.append(_conv_cpu(x, wc[a0:a1, b0:b1, c0:c1, rd, rh, rw], (1, 1, 1),
                                  [x_pads(0, a0, a1), x_pads(1, b0, b1), x_pads(2, c0, c1)], precision))
    z = jnp.stack(phases, axis=-2)
  else:
    wc = jnp.moveaxis(wc.reshape(*length, s[0] * s[1] * s[2], cin, cout), 3, 4)
    wc = wc.reshape(*length, cin, s[0] * s[1] * s[2] * cout)
    z = _conv_cpu(x, wc, (1, 1, 1), [x_pads(i, 0, length[i]) for i in range(3)], precision)
  z = z.reshape(b, m[0], m[1], m[2], s[0], s[1], s[2], cout).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  z = z.reshape(b, m[0] * s[0], m[1] * s[1], m[2] * s[2], cout)
  return z[:, :out_shape[0], :out_shape[1], :out_shape[2]]


# ------------------------------------------------------------------------- public API

def _check(x, w, name):
  if x.ndim != 5 or w.ndim != 5:
    raise ValueError(f"{name}: expects x NDHWC and w DHWIO, got shapes {x.shape}, {w.shape}")
  if x.shape[-1] != w.shape[3]:
    raise ValueError(f"{name}: x has {x.shape[-1]} channels, kernel expects {w.shape[3]}")


def conv3d(x: Array, w: Array, strides: int | Sequence[int] = 1, padding: Padding = "SAME", *,
           impl: str = "auto", precision=None) -> Array:
  """3D cross-correlation (PyTorch Conv3d / lax.conv semantics). x (B,D,H,W,Cin), w (kd,kh,kw,Cin,Cout)."""
  _check(x, w, "conv3d")
  strides = _triple(strides, "strides")
  pads = resolve_padding(padding, w.shape[:3], strides, x.shape[1:4])
  if select_impl(impl) == "native":
    return _conv_native(x, w, strides, pads, precision)
  return _conv_cpu(x, w, strides, pads, precision)


def conv_transpose3d(x: Array, w: Array, strides: int | Sequence[int] = 2, padding: int | Sequence = 1,
                     output_padding: int | Sequence[int] = 0, *, impl: str = "auto", precision=None) -> Array:
  """PyTorch ConvTranspose3d semantics: y[s*i + t - p] += x[i] w[t]; output (n-1)s - 2p + k + output_padding.

  w is (kd,kh,kw,Cin,Cout): a PyTorch weight (Cin,Cout,kd,kh,kw) ports by transposing to
  (2,3,4,0,1), without a flip. padding is ints (lo, hi or symmetric), not 'SAME'.
  """
  _check(x, w, "conv_transpose3d")
  strides = _triple(strides, "strides")
  output_padding = _triple(output_padding, "output_padding")
  pads = resolve_padding(padding, w.shape[:3], strides, x.shape[1:4])
  if select_impl(impl) == "native":
    return _conv_transpose_native(x, w, strides, pads, output_padding, precision)
  k = w.shape[:3]
  out = [(x.shape[1 + i] - 1) * strides[i] - pads[i][0] - pads[i][1] + k[i] + output_padding[i] for i in range(3)]
  tables = [_transpose_phase_taps(k[i], strides[i], pads[i][0]) for i in range(3)]
  return _subpixel_cpu(x, w, strides, tables, out, precision)


def upsample_conv3d(x: Array, w: Array, scale: int | Sequence[int] = 2, padding: Padding = "SAME", *,
                    impl: str = "auto", precision=None) -> Array:
  """Nearest-neighbour upsampling by `scale`, then a stride-1 conv3d (MONAI's 'nontrainable' Upsample + post-conv).

  On CPU computed at the low resolution as sub-pixel phases with summed kernel taps
  (never materialising the upsampled volume; 3.4x fewer FLOPs for a 3x3x3 kernel).
  """
  _check(x, w, "upsample_conv3d")
  scale = _triple(scale, "scale")
  up_shape = [x.shape[1 + i] * scale[i] for i in range(3)]
  pads = resolve_padding(padding, w.shape[:3], (1, 1, 1), up_shape)
  if select_impl(impl) == "native":
    return _conv_native(_upsample_nearest(x, scale), w, (1, 1, 1), pads, precision)
  k = w.shape[:3]
  out = [up_shape[i] + pads[i][0] + pads[i][1] - k[i] + 1 for i in range(3)]
  tables = [_upsample_phase_taps(k[i], scale[i], pads[i][0]) for i in range(3)]
  return _subpixel_cpu(x, w, scale, tables, out, precision)


# ---------------------------------------------------------------------- flax modules

def torch_like_init(in_axis: int = -2, out_axis: int = -1) -> Callable:
  """PyTorch's default conv weight init U(+-1/sqrt(fan_in)), as MONAI's models start from."""
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=in_axis, out_axis=out_axis)


class _ConvBase(nn.Module):
  features: int
  kernel_size: int | Sequence[int] = 3
  use_bias: bool = True
  impl: str = "auto"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable | None = None
  bias_init: Callable = nn.initializers.zeros_init()

  def _params(self, cin: int, default_init: Callable):
    k = _triple(self.kernel_size, "kernel_size")
    init = self.kernel_init if self.kernel_init is not None else default_init
    kernel = self.param("kernel", nn.with_logical_partitioning(init, KERNEL_AXES),
                        (*k, cin, self.features), self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, BIAS_AXES),
                        (self.features,), self.param_dtype)
    return kernel, bias

  def _finish(self, y, bias):
    return y if bias is None else y + bias


class Conv3D(_ConvBase):
  """Conv3d layer, NDHWC, kernel (kd,kh,kw,Cin,Cout) 'kernel' (+ 'bias'); see conv3d for the impls."""
  strides: int | Sequence[int] = 1
  padding: Padding = "SAME"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel, bias = self._params(x.shape[-1], torch_like_init())
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return self._finish(conv3d(x, kernel, self.strides, self.padding, impl=self.impl,
                               precision=self.precision), bias)


class ConvTranspose3D(_ConvBase):
  """ConvTranspose3d layer with PyTorch semantics (see conv_transpose3d); MONAI VQVAE uses k=4, s=2, p=1."""
  kernel_size: int | Sequence[int] = 4
  strides: int | Sequence[int] = 2
  padding: int | Sequence = 1
  output_padding: int | Sequence[int] = 0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    # fan_in over (k^3 * Cout), as torch computes it for a (Cin, Cout, k, k, k) transposed weight.
    kernel, bias = self._params(x.shape[-1], torch_like_init(in_axis=-1, out_axis=-2))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return self._finish(conv_transpose3d(x, kernel, self.strides, self.padding, self.output_padding,
                                         impl=self.impl, precision=self.precision), bias)


class UpsampleConv3D(_ConvBase):
  """Nearest upsampling by `scale` + stride-1 conv (MONAI DiffusionModelUNet's up path); see upsample_conv3d."""
  scale: int | Sequence[int] = 2
  padding: Padding = "SAME"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel, bias = self._params(x.shape[-1], torch_like_init())
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return self._finish(upsample_conv3d(x, kernel, self.scale, self.padding, impl=self.impl,
                                        precision=self.precision), bias)
