"""The conditional diffusion U-Net: shapes, sensitivity to t and to every condition, null tokens and
condition dropout, remat, logical sharding annotations, and MONAI's parameter count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthmri_jax.models import unet as U
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.sharding import unbox

COND = U.Conditioning(num_classes=2, attributes=(U.Attribute("age", "continuous", mean=70.0, scale=10.0),
                                                 U.Attribute("sex", "categorical", num_classes=2)),
                      token_dim=16, fourier_features=4)


def tiny(**kw) -> U.DiffusionUNet:
  kw = {"channels": (8, 16), "attention_levels": (False, True), **kw}
  return U.DiffusionUNet(out_channels=2, num_res_blocks=1, num_head_channels=8, norm_num_groups=4, conditioning=COND, **kw)


def cond(label, age, sex):
  return {"label": jnp.asarray(label, jnp.int32), "age": jnp.asarray(age, jnp.float32),
          "sex": jnp.asarray(sex, jnp.int32)}


@jax.jit
def perturb(params):
  """Zero-initialised output convs (as MONAI) make a fresh model output 0: perturb every parameter
  (drawn flat: threefry over 5-D shapes compiles slowly on CPU)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  return jax.tree.unflatten(treedef, [p + 0.1 * jax.random.normal(k, (p.size,)).reshape(p.shape)
                                      for p, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def setup():
  model = tiny()
  # 5 and 3 are not multiples of 2^(levels-1): the model pads and crops (one compile covers it).
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3, 2))
  t = jnp.array([10, 500], jnp.int32)
  c = cond([0, 1], [65.0, 80.0], [0, 1])
  boxed = jax.jit(model.init)(jax.random.key(1), x, t, c)["params"]
  params = unbox(boxed)
  noisy = perturb(params)
  apply = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
  return dict(model=model, x=x, t=t, c=c, boxed=boxed, params=params, noisy=noisy, apply=apply)


def test_shapes_zero_init_and_padding(setup):
  s = setup
  out = s["apply"](s["params"], s["x"], s["t"], s["c"])
  assert out.shape == s["x"].shape and out.dtype == jnp.float32
  assert float(jnp.abs(out).max()) == 0.0   # conv_out is zero-initialised
  out = s["apply"](s["noisy"], s["x"], s["t"], s["c"])
  assert out.shape == s["x"].shape and bool(jnp.all(jnp.isfinite(out))) and float(jnp.abs(out).max()) > 0


def test_sensitive_to_timestep_and_each_condition(setup):
  s = setup
  f = lambda t=s["t"], c=s["c"]: np.asarray(s["apply"](s["noisy"], s["x"], t, c))
  base = f()
  assert np.all(np.isfinite(base))

  def changed(other):
    d = np.abs(other - base).reshape(2, -1).max(axis=1)
    return d > 1e-4

  np.testing.assert_array_equal(changed(f(t=jnp.array([10, 900]))), [False, True])
  np.testing.assert_array_equal(changed(f(c=cond([1, 1], [65.0, 80.0], [0, 1]))), [True, False])
  np.testing.assert_array_equal(changed(f(c=cond([0, 1], [65.0, 60.0], [0, 1]))), [False, True])
  np.testing.assert_array_equal(changed(f(c=cond([0, 1], [65.0, 80.0], [1, 1]))), [True, False])
  # Null tokens: missing values (label/sex -1, age NaN) differ from any given value and stay finite.
  nulls = f(c=cond([-1, 1], [65.0, np.nan], [0, -1]))
  assert np.all(np.isfinite(nulls))
  np.testing.assert_array_equal(changed(nulls), [True, True])
  # null_conditions is the same as writing the null values by hand.
  by_fn = f(c=U.null_conditions(s["c"], COND, ["label"]))
  np.testing.assert_allclose(by_fn, f(c=cond([-1, -1], [65.0, 80.0], [0, 1])), atol=1e-5)
  all_null = U.null_conditions(s["c"], COND)
  assert np.all(np.asarray(all_null["label"]) == -1) and np.all(np.isnan(np.asarray(all_null["age"])))
  # No condition at all == every condition null (compared on the condition tokens).
  enc = U.ConditionEncoder(COND)
  tokens = lambda c: np.asarray(enc.apply({"params": s["noisy"]["cond_encoder"]}, c, 2))
  np.testing.assert_array_equal(tokens({}), tokens(all_null))
  assert not np.array_equal(tokens({}), tokens(s["c"]))


def test_condition_dropout_rates():
  n = 20000
  c = cond(np.ones(n), np.full(n, 70.0), np.ones(n))
  out = U.drop_conditions(c, COND, jax.random.key(0), p_each=0.2, p_all=0.1)
  lab = np.asarray(out["label"]) < 0
  age = np.isnan(np.asarray(out["age"]))
  sex = np.asarray(out["sex"]) < 0
  p = 0.1 + 0.9 * 0.2
  for m in (lab, age, sex):
    assert abs(m.mean() - p) < 0.015
  # Independent per attribute beyond the joint drop: all three null ~ 0.1 + 0.9 * 0.2^3.
  assert abs((lab & age & sex).mean() - (0.1 + 0.9 * 0.008)) < 0.01
  # Kept values are untouched.
  assert np.all(np.asarray(out["age"])[~age] == 70.0)


def test_remat_same_outputs_and_gradients(setup):
  s = setup
  one_level = dict(channels=(8,), attention_levels=(True,))   # one level keeps the two grad compiles short
  plain, remat = tiny(**one_level), tiny(remat=True, **one_level)
  params = perturb(unbox(jax.jit(plain.init)(jax.random.key(4), s["x"], s["t"], s["c"])["params"]))
  loss = lambda model: lambda p: jnp.mean(model.apply({"params": p}, s["x"], s["t"], s["c"]) ** 2)
  l1, g1 = jax.jit(jax.value_and_grad(loss(plain)))(params)
  l2, g2 = jax.jit(jax.value_and_grad(loss(remat)))(params)
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-6)


def test_params_carry_logical_names(setup):
  boxed = setup["boxed"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  plain = [x for x in leaves if not isinstance(x, nn.Partitioned)]
  assert not plain, f"{len(plain)} parameters without logical axis names"
  mesh = mesh_lib.make_mesh(type("M", (), dict(data=-1, fsdp=1, tensor=1))())
  shardings = mesh_lib.tree_shardings(boxed, mesh)
  assert len(jax.tree.leaves(shardings)) == len(leaves)


def _monai_param_count(cin, cout, ch, nrb, attn):
  """MONAI DiffusionModelUNet(spatial_dims=3, with_conditioning=False) parameter count, from its layer list."""
  T = 4 * ch[0]
  conv = lambda i, o, k: i * o * k ** 3 + o
  gn = lambda c: 2 * c
  lin = lambda i, o: i * o + o
  res = lambda i, o: gn(i) + conv(i, o, 3) + lin(T, o) + gn(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)
  at = lambda c: gn(c) + 4 * lin(c, c)   # SpatialAttentionBlock: GN, q/k/v with bias, out_proj
  n = conv(cin, ch[0], 3) + lin(ch[0], T) + lin(T, T)
  prev = ch[0]
  for i, c in enumerate(ch):
    for j in range(nrb):
      n += res(prev if j == 0 else c, c) + (at(c) if attn[i] else 0)
    prev = c
    if i < len(ch) - 1:
      n += conv(c, c, 3)
  n += 2 * res(ch[-1], ch[-1]) + at(ch[-1])
  rc, ra, out = ch[::-1], attn[::-1], ch[-1]
  for i in range(len(rc)):
    prev, out, inp = out, rc[i], rc[min(i + 1, len(rc) - 1)]
    for j in range(nrb + 1):
      n += res((prev if j == 0 else out) + (inp if j == nrb else out), out) + (at(out) if ra[i] else 0)
    if i < len(rc) - 1:
      n += conv(out, out, 3)
  return n + gn(ch[0]) + conv(ch[0], cout, 3)


def test_monai_benchmark_config_matches_parameter_count():
  # The benchmark model: DiffusionModelUNet(3D, 3->3 ch, channels 32/64/64, 1 res block, attention
  # at levels 2-3): 2,974,051 parameters, counted from MONAI's layer formulas by _monai_param_count
  # (and against MONAI itself in test_benchmark_parity.py when torch is installed).
  m = U.DiffusionUNet(out_channels=3, channels=(32, 64, 64), num_res_blocks=1, attention_levels=(False, True, True),
                      num_head_channels=8, norm_num_groups=32, with_conditioning=False)
  shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 8, 8, 8, 3)), jnp.zeros((1,), jnp.int32))
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(unbox(shapes)))
  assert n == _monai_param_count(3, 3, (32, 64, 64), 1, (False, True, True)) == 2_974_051


def test_chunked_attention_equals_one_pass_with_gradients():
  """layers.attend over query chunks (here 7 of them, the last one padded) gives the softmax
  attention of the whole, values and gradients, against a plain einsum reference."""
  from synthmri_jax.models import layers
  kq, kk, kv = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(kq, (2, 45, 2, 4))
  k = jax.random.normal(kk, (2, 11, 2, 4))
  v = jax.random.normal(kv, (2, 11, 2, 4))

  def reference(q, k, v):
    s = jnp.einsum("bnhd,bmhd->bhnm", q, k) / np.sqrt(q.shape[-1])
    return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(s, axis=-1), v)

  budget = 7 * 11 * 2          # chunks of 7 queries: 45 = 6 x 7 + 3
  out = layers.attend(q, k, v, score_budget=budget)
  np.testing.assert_allclose(np.asarray(out), np.asarray(reference(q, k, v)), rtol=1e-5, atol=1e-6)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  g1 = jax.grad(loss(lambda *a: layers.attend(*a, score_budget=budget)), argnums=(0, 1, 2))(q, k, v)
  g2 = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
