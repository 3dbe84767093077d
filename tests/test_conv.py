"""models/conv.py and models/layers.py: every conv impl equals an independent float64 numpy
reference (forward, input gradient, kernel gradient); the layers match their MONAI semantics."""

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthmri_jax.models import conv as C
from synthmri_jax.models import layers as L

IMPLS = ("native", "cpu")


def _rand(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _key(seed=0):
  """RBG keys: flax init with them compiles ~5x faster than with threefry keys (test time)."""
  return jax.random.key(seed, impl="rbg")



# ------------------------------------------------------------ float64 numpy reference

def _windows(xp, k, s, out):
  """(tap, slice of xp that tap meets) for a strided correlation."""
  for t in np.ndindex(*k):
    yield t, tuple([slice(None)] + [slice(t[i], t[i] + s[i] * (out[i] - 1) + 1, s[i]) for i in range(3)])


def np_conv(x, w, s, pads, g):
  """y = correlation(x, w) and the gradients of <y, g> w.r.t. x and w (g may be None: shape only)."""
  k = w.shape[:3]
  xp = np.pad(x, [(0, 0)] + list(pads) + [(0, 0)])
  out = [(xp.shape[1 + i] - k[i]) // s[i] + 1 for i in range(3)]
  y = np.zeros((x.shape[0], *out, w.shape[-1]))
  for t, sl in _windows(xp, k, s, out):
    y += xp[sl] @ w[t]
  if g is None:
    return y, None, None
  dxp, dw = np.zeros_like(xp), np.zeros_like(w)
  for t, sl in _windows(xp, k, s, out):
    dxp[sl] += g @ w[t].T
    dw[t] = np.einsum("ndhwi,ndhwo->io", xp[sl], g)
  crop = tuple([slice(None)] + [slice(lo, lo + x.shape[1 + i]) for i, (lo, _) in enumerate(pads)])
  return y, dxp[crop], dw


def np_conv_transpose(x, w, s, p, op, g):
  """PyTorch ConvTranspose3d by explicit scatter: y[s*i + t - p] += x[i] w[t]."""
  k = w.shape[:3]
  n = x.shape[1:4]
  out = [(n[i] - 1) * s[i] - 2 * p + k[i] + op for i in range(3)]
  full = [max(s[i] * (n[i] - 1) + k[i], p + out[i]) for i in range(3)]
  yf = np.zeros((x.shape[0], *full, w.shape[-1]))
  for t, sl in _windows(yf, k, s, n):
    yf[sl] += x @ w[t]
  crop = tuple([slice(None)] + [slice(p, p + out[i]) for i in range(3)])
  if g is None:
    return yf[crop], None, None
  gf = np.zeros_like(yf)
  gf[crop] = g
  dx, dw = np.zeros_like(x), np.zeros_like(w)
  for t, sl in _windows(gf, k, s, n):
    dx += gf[sl] @ w[t].T
    dw[t] = np.einsum("ndhwi,ndhwo->io", x, gf[sl])
  return yf[crop], dx, dw


def np_upsample_conv(x, w, scale, pads, g):
  u = x
  for ax in (1, 2, 3):
    u = np.repeat(u, scale, axis=ax)
  y, du, dw = np_conv(u, w, (1, 1, 1), pads, g)
  if g is None:
    return y, None, None
  b, d, h, ww, c = x.shape
  dx = du.reshape(b, d, scale, h, scale, ww, scale, c).sum((2, 4, 6))
  return y, dx, dw


# name: (op, input spatial, cin, cout, kernel, stride, padding arg, output_padding)
CASES = {
    "s1_k3_same_odd": ("conv", (5, 6, 7), 3, 4, 3, 1, "SAME", 0),
    "s1_k3_pad1_even": ("conv", (4, 6, 4), 5, 3, 3, 1, 1, 0),
    "s1_k1": ("conv", (3, 4, 5), 6, 3, 1, 1, 0, 0),
    "s1_k3_cin1": ("conv", (5, 4, 5), 1, 4, 3, 1, "SAME", 0),
    "s1_k3_valid": ("conv", (5, 6, 5), 9, 2, 3, 1, "VALID", 0),
    "s2_k3_pad1_even": ("conv", (6, 4, 6), 9, 3, 3, 2, 1, 0),   # DiffusionModelUNet downsample
    "s2_k3_pad1_odd": ("conv", (7, 5, 5), 9, 3, 3, 2, 1, 0),
    "s2_k3_same_odd": ("conv", (5, 7, 5), 3, 2, 3, 2, "SAME", 0),
    "s2_k4_pad1_cin1": ("conv", (8, 6, 8), 1, 4, 4, 2, 1, 0),   # VQVAE first downsample
    "s2_k4_pad1": ("conv", (6, 8, 6), 9, 3, 4, 2, 1, 0),
    "s2_k4_same_odd": ("conv", (7, 5, 6), 3, 2, 4, 2, "SAME", 0),
    "s2_k1": ("conv", (5, 6, 4), 4, 3, 1, 2, 0, 0),
    "tr_k4_s2_p1_phases": ("transpose", (3, 4, 3), 5, 9, 4, 2, 1, 0),   # VQVAE upsample, >= 8 outputs
    "tr_k4_s2_p1_shared": ("transpose", (4, 3, 5), 9, 2, 4, 2, 1, 0),   # VQVAE last layer, few outputs
    "tr_k3_s2_p1_op1": ("transpose", (3, 4, 4), 3, 9, 3, 2, 1, 1),
    "tr_k2_s2_p0": ("transpose", (3, 3, 4), 4, 3, 2, 2, 0, 0),
    "tr_k3_s1_p1": ("transpose", (4, 3, 3), 3, 2, 3, 1, 1, 0),
    "up_k3_same_phases": ("upsample", (3, 4, 3), 5, 9, 3, 2, "SAME", 0),   # DiffusionModelUNet upsample
    "up_k3_same_shared": ("upsample", (3, 3, 4), 9, 2, 3, 2, "SAME", 0),
    "up_k1": ("upsample", (2, 3, 3), 4, 9, 1, 2, 0, 0),
}


def _case_data(name):
  op, spatial, cin, cout, k, s, pad, op_pad = CASES[name]
  rng = np.random.default_rng(zlib.crc32(name.encode()))
  x = rng.normal(size=(2, *spatial, cin))
  w = rng.normal(size=(k, k, k, cin, cout)) / np.sqrt(k ** 3 * cin)
  if op == "conv":
    pads = C.resolve_padding(pad, (k,) * 3, (s,) * 3, spatial)
    ref = lambda g: np_conv(x, w, (s,) * 3, pads, g)
    fn = lambda x, w, impl: C.conv3d(x, w, s, pad, impl=impl)
  elif op == "transpose":
    ref = lambda g: np_conv_transpose(x, w, (s,) * 3, pad, op_pad, g)
    fn = lambda x, w, impl: C.conv_transpose3d(x, w, s, pad, op_pad, impl=impl)
  else:
    up = [n * s for n in spatial]
    pads = C.resolve_padding(pad, (k,) * 3, (1, 1, 1), up)
    ref = lambda g: np_upsample_conv(x, w, s, pads, g)
    fn = lambda x, w, impl: C.upsample_conv3d(x, w, s, pad, impl=impl)
  g = rng.normal(size=ref(None)[0].shape)
  return x, w, g, ref(g), fn


def _fwd_and_grads(fn, impl):
  def f(x, w, g):
    y, vjp = jax.vjp(lambda x, w: fn(x, w, impl), x, w)
    return (y, *vjp(g.astype(y.dtype)))
  return jax.jit(f)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


@pytest.mark.parametrize("name", sorted(CASES))
def test_impls_match_float64_reference(name):
  x, w, g, (y_ref, dx_ref, dw_ref), fn = _case_data(name)
  for impl in IMPLS:
    y, dx, dw = _fwd_and_grads(fn, impl)(*(jnp.asarray(a, jnp.float32) for a in (x, w, g)))
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    for what, got, want in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
      assert _rel(got, want) < 1e-5, (impl, what, _rel(got, want))
  with jax.enable_x64(True):  # the formulations are exact rewrites, not approximations
    y, dx, dw = _fwd_and_grads(fn, "cpu")(*(jnp.asarray(a, jnp.float64) for a in (x, w, g)))
    assert y.dtype == jnp.float64
    for what, got, want in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
      assert _rel(got, want) < 1e-12, ("float64", what, _rel(got, want))


@pytest.mark.parametrize("name", ["s1_k3_same_odd", "s2_k4_pad1", "tr_k4_s2_p1_phases", "up_k3_same_phases"])
def test_bfloat16(name):
  x, w, g, (y_ref, dx_ref, dw_ref), fn = _case_data(name)
  for impl in IMPLS:
    y, dx, dw = _fwd_and_grads(fn, impl)(*(jnp.asarray(a, jnp.bfloat16) for a in (x, w, g)))
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    for what, got, want in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
      assert _rel(got, want) < 3e-2, (impl, what, _rel(got, want))


def test_select_impl():
  assert C.select_impl("auto", "cpu") == "cpu"
  for backend in ("gpu", "cuda", "rocm", "tpu"):
    assert C.select_impl("auto", backend) == "native"
  assert C.select_impl("native", "cpu") == "native" and C.select_impl("cpu", "gpu") == "cpu"
  assert C.select_impl("auto") == ("cpu" if jax.default_backend() == "cpu" else "native")
  with pytest.raises(ValueError):
    C.select_impl("cudnn")


def _conv_ranks(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  ranks = []
  def walk(j):
    for e in j.eqns:
      if e.primitive.name == "conv_general_dilated":
        ranks.append(e.invars[0].aval.ndim)
      for v in e.params.values():  # custom_vjp / pjit / scan bodies
        for sub in (v if isinstance(v, (list, tuple)) else [v]):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)
  walk(jaxpr.jaxpr)
  return ranks


def test_cpu_impl_uses_no_3d_convolution():
  x, w = jnp.ones((1, 4, 4, 4, 16)), jnp.ones((3, 3, 3, 16, 16))
  w4 = jnp.ones((4, 4, 4, 16, 16))
  for fn, args in ((lambda x, w: C.conv3d(x, w, 1, "SAME", impl="cpu"), (x, w)),
                   (lambda x, w: C.conv3d(x, w, 2, 1, impl="cpu"), (x, w)),
                   (lambda x, w: C.conv_transpose3d(x, w, 2, 1, impl="cpu"), (x, w4)),
                   (lambda x, w: C.upsample_conv3d(x, w, 2, impl="cpu"), (x, w))):
    grad = jax.grad(lambda x, w: fn(x, w).sum(), (0, 1))
    ranks = _conv_ranks(grad, *args)
    assert ranks and all(r == 4 for r in ranks), ranks
  assert set(_conv_ranks(lambda x, w: C.conv3d(x, w, 1, "SAME", impl="native"), x, w)) == {5}


def test_padding_resolution():
  assert C.resolve_padding(1, (3,) * 3, (2,) * 3, (6, 6, 6)) == [(1, 1)] * 3
  assert C.resolve_padding("SAME", (3,) * 3, (2,) * 3, (6, 7, 6)) == [(0, 1), (1, 1), (0, 1)]
  assert C.resolve_padding([(0, 1), 2, (1, 0)], (3,) * 3, (1,) * 3, (4,) * 3) == [(0, 1), (2, 2), (1, 0)]
  with pytest.raises(ValueError):
    C.resolve_padding("CIRCULAR", (3,) * 3, (1,) * 3, (4,) * 3)


# ------------------------------------------------------------------------------- layers

@pytest.mark.parametrize("module,x_shape", [
    (C.Conv3D(6, 3, strides=2, padding=1), (2, 6, 5, 4, 3)),
    (C.ConvTranspose3D(6, 4, strides=2, padding=1), (2, 3, 4, 3, 9)),
    (C.UpsampleConv3D(9, 3), (2, 3, 2, 3, 4)),
])
def test_layers_params_portable_and_annotated(module, x_shape):
  x = _rand(x_shape, 1)
  variables = jax.jit(module.init)(_key(), x)
  boxed = variables["params"]
  assert boxed["kernel"].names == C.KERNEL_AXES and boxed["bias"].names == C.BIAS_AXES
  k = module.kernel_size
  assert boxed["kernel"].value.shape == (k, k, k, x_shape[-1], module.features)
  outs = {impl: jax.jit(module.clone(impl=impl).apply)(variables, x) for impl in IMPLS}
  assert _rel(outs["cpu"], outs["native"]) < 1e-5
  y16 = jax.jit(module.clone(dtype=jnp.bfloat16, impl="native").apply)(variables, x)
  assert y16.dtype == jnp.bfloat16 and _rel(y16, outs["native"]) < 3e-2


# Layer tests run the native conv (a few ops per conv: quick to compile); each compares the
# CPU formulation once, and the convs themselves are tested above.
def _init_apply(module, *args):
  variables = nn.unbox(jax.jit(module.init)(_key(), *args))
  return variables, jax.jit(module.apply)(variables, *args)


def _perturb(variables, seed=3, scale=0.1):
  """Random values for every parameter (zero-initialised convs would hide bugs)."""
  leaves, tree = jax.tree.flatten(variables)
  return jax.tree.unflatten(tree, [a + scale * _rand(a.shape, seed + i) for i, a in enumerate(leaves)])


def test_resblock_identity_at_init_and_channel_change():
  x = _rand((2, 4, 3, 4, 8), 1)
  emb = _rand((2, 16), 2)
  block = L.ResBlock3D(8, num_groups=4, conv_impl="native")
  variables, y = _init_apply(block, x, emb)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))  # conv2 starts at zero, skip is identity
  assert "skip" not in variables["params"] and variables["params"]["time_emb_proj"]["kernel"].shape == (16, 8)
  wider = L.ResBlock3D(12, num_groups=4, emb_mode="scale_shift", dropout=0.5, conv_impl="native")
  variables, y = _init_apply(wider, x, emb)
  assert y.shape == (2, 4, 3, 4, 12)
  p = variables["params"]
  assert p["skip"]["kernel"].shape == (1, 1, 1, 8, 12) and p["time_emb_proj"]["kernel"].shape == (16, 24)
  variables = _perturb(variables)
  apply = jax.jit(wider.apply)
  outs = {"native": apply(variables, x, emb), "cpu": jax.jit(wider.clone(conv_impl="cpu").apply)(variables, x, emb)}
  assert _rel(outs["cpu"], outs["native"]) < 1e-5
  assert _rel(apply(variables, x, 2 * emb), outs["native"]) > 1e-3  # the embedding is used
  dropped = jax.jit(lambda v, x, e, r: wider.apply(v, x, e, deterministic=False, rngs={"dropout": r}))(
      variables, x, emb, _key(5))
  assert _rel(dropped, outs["native"]) > 1e-3
  no_emb = jax.eval_shape(L.ResBlock3D(12, num_groups=4).init, _key(), x)
  assert "time_emb_proj" not in no_emb["params"]


def _np_mha(p, x, ctx):
  """softmax(Q K^T / sqrt(d)) V per head, in float64 numpy, from the module's parameters."""
  f = lambda a: np.asarray(a, np.float64)
  proj = lambda name, a: np.einsum("btc,chd->bthd", a, f(p[name]["kernel"])) + (
      f(p[name]["bias"]) if "bias" in p[name] else 0)
  q, k, v = proj("to_q", x), proj("to_k", ctx), proj("to_v", ctx)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  a = np.exp(logits - logits.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", a, v)
  return np.einsum("bqhd,hdc->bqc", o, f(p["out_proj"]["kernel"])) + f(p["out_proj"]["bias"])


def _np_group_norm(x, groups, eps, scale, bias):
  b, c = x.shape[0], x.shape[-1]
  xg = np.asarray(x, np.float64).reshape(b, -1, groups, c // groups)
  xn = (xg - xg.mean((1, 3), keepdims=True)) / np.sqrt(xg.var((1, 3), keepdims=True) + eps)
  return xn.reshape(x.shape) * np.asarray(scale) + np.asarray(bias)


def test_self_attention_matches_numpy_softmax_reference():
  x = _rand((2, 3, 2, 4, 16), 1)
  block = L.SpatialSelfAttention3D(head_channels=8, num_groups=4)
  variables = _perturb(_init_apply(block, x)[0])
  p = variables["params"]
  y = jax.jit(block.apply)(variables, x)
  t = _np_group_norm(x, 4, 1e-6, p["norm"]["scale"], p["norm"]["bias"]).reshape(2, -1, 16)
  want = np.asarray(x, np.float64) + _np_mha(p["attn"], t, t).reshape(x.shape)
  assert p["attn"]["to_q"]["kernel"].shape == (16, 2, 8)
  assert _rel(y, want) < 1e-5


def test_cross_attention_uses_context_and_falls_back_to_self_attention():
  x = _rand((2, 2, 3, 2, 16), 1)
  ctx = _rand((2, 5, 6), 2)
  block = L.SpatialCrossAttention3D(head_channels=4, num_groups=4)
  variables = _perturb(_init_apply(block, x, ctx)[0])
  p = variables["params"]
  assert p["attn"]["to_k"]["kernel"].shape == (6, 4, 4)  # keys / values come from the 6-channel context
  apply = jax.jit(block.apply)
  y = apply(variables, x, ctx)
  t = _np_group_norm(x, 4, 1e-6, p["norm"]["scale"], p["norm"]["bias"]).reshape(2, -1, 16)
  c = np.asarray(ctx, np.float64)
  c = (c - c.mean(-1, keepdims=True)) / np.sqrt(c.var(-1, keepdims=True) + 1e-5)
  c = c * np.asarray(p["context_norm"]["scale"]) + np.asarray(p["context_norm"]["bias"])
  assert _rel(y, np.asarray(x, np.float64) + _np_mha(p["attn"], t, c).reshape(x.shape)) < 1e-5
  perm = ctx[:, ::-1]  # attention is a weighted sum over context tokens: their order is irrelevant
  assert _rel(apply(variables, x, perm), y) < 1e-5
  other = apply(variables, x, ctx.at[1].multiply(-1.0))  # a different context for sample 1 only
  assert _rel(other[1], y[1]) > 1e-3
  np.testing.assert_allclose(other[0], y[0], rtol=1e-6, atol=1e-6)
  vol = ctx.reshape(2, 5, 1, 1, 6)  # a feature volume is flattened into tokens
  assert _rel(jax.jit(block.apply)(variables, x, vol), y) < 1e-6
  # Without context: self-attention over the normed voxels (MONAI's CrossAttentionBlock).
  self_block = L.SpatialCrossAttention3D(head_channels=4, num_groups=4)
  sv = _perturb(_init_apply(self_block, x)[0])
  sp = sv["params"]
  ts = _np_group_norm(x, 4, 1e-6, sp["norm"]["scale"], sp["norm"]["bias"]).reshape(2, -1, 16)
  assert _rel(jax.jit(self_block.apply)(sv, x), np.asarray(x, np.float64) + _np_mha(sp["attn"], ts, ts).reshape(x.shape)) < 1e-5


def test_spatial_transformer_identity_at_init_and_context_dependence():
  x = _rand((1, 2, 2, 3, 16), 1)
  ctx = _rand((1, 4, 8), 2)
  block = L.SpatialTransformer3D(head_channels=8, num_groups=4, conv_impl="native")
  variables, y = _init_apply(block, x, ctx)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))  # zero proj_out (MONAI)
  assert variables["params"]["block0"]["attn2"]["to_k"]["kernel"].shape == (8, 2, 8)
  variables = _perturb(variables)
  apply = jax.jit(block.apply)
  y = apply(variables, x, ctx)
  assert _rel(apply(variables, x, 2.0 * ctx), y) > 1e-4
  assert _rel(jax.jit(block.clone(conv_impl="cpu").apply)(variables, x, ctx), y) < 1e-5


def test_down_and_upsample():
  x = _rand((2, 6, 4, 5, 8), 1)
  down = L.Downsample(12, conv_impl="native")
  variables, y = _init_apply(down, x)
  assert y.shape == (2, 3, 2, 3, 12)
  k, b = variables["params"]["conv"]["kernel"], variables["params"]["conv"]["bias"]
  y_ref, _, _ = np_conv(np.asarray(x, np.float64), np.asarray(k, np.float64), (2, 2, 2), [(1, 1)] * 3, None)
  assert _rel(y, y_ref + np.asarray(b)) < 1e-5
  assert L.Downsample(use_conv=False).apply({}, x[:, :, :, :4]).shape == (2, 3, 2, 2, 8)
  up = L.Upsample(4, conv_impl="native")
  variables, y = _init_apply(up, x)
  k, b = variables["params"]["conv"]["kernel"], variables["params"]["conv"]["bias"]
  y_ref, _, _ = np_upsample_conv(np.asarray(x, np.float64), np.asarray(k, np.float64), 2, [(1, 1)] * 3, None)
  assert y.shape == (2, 12, 8, 10, 4) and _rel(y, y_ref + np.asarray(b)) < 1e-5
  plain = L.Upsample(use_conv=False).apply({}, x)
  np.testing.assert_array_equal(np.asarray(plain)[:, 1::2, ::2, 1::2], np.asarray(x))


def test_timestep_embedding_and_attention_selection():
  e = L.timestep_embedding(jnp.array([0.0, 10.0]), 7)
  assert e.shape == (2, 7)
  np.testing.assert_allclose(np.asarray(e[0]), [1, 1, 1, 0, 0, 0, 0], atol=1e-7)
  freqs = np.exp(-np.log(10000.0) * np.arange(3) / 3)
  np.testing.assert_allclose(np.asarray(e[1, :6]), np.concatenate([np.cos(10 * freqs), np.sin(10 * freqs)]), rtol=1e-5)
  assert L.select_attention_impl("auto", jnp.bfloat16, 64, backend="gpu") == "cudnn"
  assert L.select_attention_impl("auto", jnp.float32, 64, backend="gpu") is None
  assert L.select_attention_impl("auto", jnp.bfloat16, 64, backend="cpu") is None
  assert L.select_attention_impl("xla", jnp.bfloat16, 64, backend="gpu") == "xla"


def test_configure_cpu_flags(monkeypatch):
  from synthmri_jax import xla_flags
  monkeypatch.delenv(xla_flags.OPT_OUT_ENV, raising=False)
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_flags.configure_cpu_flags(env)
  assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8 " + xla_flags.YNN_FLAG
  assert not xla_flags.configure_cpu_flags(env)  # already present: unchanged
  own = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
  assert not xla_flags.configure_cpu_flags(own) and own["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="
  assert not xla_flags.configure_cpu_flags({"JAX_PLATFORMS": "cuda"})
  assert not xla_flags.configure_cpu_flags({"JAX_PLATFORMS": "cpu", xla_flags.OPT_OUT_ENV: "1"})
