"""Vector quantiser: exact nearest-code search without N x K x D tensors, straight-through and
commitment gradients, the EMA update formula, dead-code restart, perplexity / usage, cosine."""

import functools
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthmri_jax.models.quantizer import (STATS, VectorQuantizer, code_statistics, lookup_codes,
                                           nearest_codes)
from conftest import fake_devices_flags


def _brute_force(z, e):
  d = ((z[:, None, :].astype(np.float64) - e[None, :, :].astype(np.float64)) ** 2).sum(-1)
  return d.argmin(-1), d.min(-1)


def _init(model, z, seed=0):
  return nn.unbox(jax.jit(model.init)(jax.random.key(seed), z))


def _with_stats(variables, **stats):
  out = dict(variables)
  out[STATS] = {**variables[STATS], **{k: jnp.asarray(v) for k, v in stats.items()}}
  return out


@functools.partial(jax.jit, static_argnames=("model", "method"))
def _apply(model, variables, *args, method=None):
  return model.apply(variables, *args, method=method)


@functools.partial(jax.jit, static_argnames=("model",))
def _train_apply(model, variables, z, rng):
  return model.apply(variables, z, train=True, rngs={"vq": rng}, mutable=[STATS])


def _train_step(model, variables, z, seed=0):
  (z_q, aux), upd = _train_apply(model, variables, z, jax.random.key(seed))
  return z_q, aux, {**variables, **nn.unbox(upd)}


@pytest.mark.parametrize("chunk,token_chunk", [(None, None), (7, None), (32, None), (100, None),
                                               (128, None), (13, 64), (None, 299)])
def test_nearest_codes_matches_brute_force(chunk, token_chunk):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(300, 16)).astype(np.float32)
  e = rng.normal(size=(100, 16)).astype(np.float32)
  idx, dist = jax.jit(nearest_codes, static_argnums=(2, 3))(z, e, chunk, token_chunk)
  ref_idx, ref_dist = _brute_force(z, e)
  assert idx.dtype == jnp.int32 and idx.shape == (300,)
  np.testing.assert_array_equal(np.asarray(idx), ref_idx)
  np.testing.assert_allclose(np.asarray(dist), ref_dist, rtol=1e-4, atol=1e-4)


def _all_var_sizes(jaxpr):
  """Sizes of every value an equation produces, recursing into scan / map / pjit bodies."""
  sizes = []
  for eqn in jaxpr.eqns:
    sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          sizes += _all_var_sizes(inner)
  return sizes


def test_no_n_by_k_by_d_intermediate():
  n_tok, k, d, chunk = 2 * 8 * 8 * 8, 4096, 32, 512   # N*K*D = 134M, N*K = 4M
  z = jnp.zeros((2, 8, 8, 8, d))

  search = jax.make_jaxpr(lambda z, e: nearest_codes(z, e, chunk, 256))(
      jnp.zeros((n_tok, d)), jnp.zeros((k, d)))
  assert max(_all_var_sizes(search.jaxpr)) <= max(k * d, 256 * chunk)

  for mode in ("ema", "learned"):
    model = VectorQuantizer(k, d, mode=mode, chunk_size=chunk)
    variables = jax.eval_shape(lambda: _init(model, z))

    def loss(params, stats, z):
      (z_q, aux), upd = model.apply({**params, STATS: stats}, z, train=True,
                                    rngs={"vq": jax.random.key(0)}, mutable=[STATS])
      return jnp.sum(z_q ** 2) + aux["loss"], upd

    params = {c: v for c, v in variables.items() if c != STATS}
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 2), has_aux=True))(
        params, variables[STATS], z)
    sizes = _all_var_sizes(jaxpr.jaxpr)
    assert n_tok * k * d not in sizes
    assert max(sizes) < n_tok * k, (mode, max(sizes))


def test_straight_through_and_loss_gradients():
  beta = 0.3
  model = VectorQuantizer(32, 8, mode="learned", beta=beta, restart_threshold=0.0)
  z = jax.random.normal(jax.random.key(1), (2, 3, 3, 3, 8))
  variables = _init(model, z)
  params, stats = variables["params"], variables[STATS]
  w = jax.random.normal(jax.random.key(2), z.shape)

  def run(params, z):
    z_q, aux = model.apply({"params": params, STATS: stats}, z)
    return z_q, aux["commitment_loss"], aux["codebook_loss"]

  @jax.jit
  def grads(params, z):
    # One forward, three cotangents: reconstruction part, commitment loss, codebook loss.
    (z_q, _, _), vjp = jax.vjp(run, params, z)
    zero, one = jnp.zeros(()), jnp.ones(())
    return z_q, vjp((w, zero, zero)), vjp((jnp.zeros_like(z_q), one, zero)), vjp(
        (jnp.zeros_like(z_q), zero, one))

  z_q, (g_params, g_z), (g_commit_cb, g_commit), (g_cb, _) = grads(params, z)
  np.testing.assert_allclose(g_z, w, rtol=1e-6)   # d loss / d z == d loss / d z_q
  np.testing.assert_array_equal(g_params["codebook"], 0.0)

  e = np.asarray(params["codebook"])
  zf = np.asarray(z).reshape(-1, 8)
  idx = _brute_force(zf, e)[0]
  np.testing.assert_array_equal(np.asarray(z_q).reshape(-1, 8), e[idx])
  n = zf.size
  np.testing.assert_allclose(np.asarray(g_commit).reshape(-1, 8), 2 * beta * (zf - e[idx]) / n,
                             rtol=1e-5, atol=1e-7)
  expected = np.zeros_like(e)
  np.add.at(expected, idx, -2.0 * (zf - e[idx]) / n)
  np.testing.assert_allclose(g_cb["codebook"], expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(g_commit_cb["codebook"], 0.0)   # commitment moves only z


def test_ema_update_matches_formula():
  k, d, decay, eps = 4, 2, 0.9, 1e-2
  model = VectorQuantizer(k, d, decay=decay, epsilon=eps, restart_threshold=0.0)
  codebook = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float32)
  size = np.array([2.0, 1.0, 0.5, 3.0], np.float32)
  embed_sum = np.array([[0.2, -0.2], [9.0, 1.0], [0.0, 5.0], [30.0, 29.0]], np.float32)
  z = np.array([[0.5, -0.5], [1.0, 0.5], [9.0, 1.0], [11.0, 9.0], [-0.3, 0.2]], np.float32)
  assign = np.array([0, 0, 1, 3, 0])

  variables = _with_stats(_init(model, z), codebook=codebook, ema_cluster_size=size,
                          ema_embed_sum=embed_sum)
  _, aux, new = _train_step(model, variables, z)
  np.testing.assert_array_equal(aux["indices"], assign)

  counts = np.bincount(assign, minlength=k).astype(np.float64)
  sums = np.zeros((k, d))
  np.add.at(sums, assign, z)
  exp_size = decay * size + (1 - decay) * counts
  exp_sum = decay * embed_sum + (1 - decay) * sums
  total = exp_size.sum()
  smoothed = (exp_size + eps) / (total + k * eps) * total
  st = new[STATS]
  np.testing.assert_allclose(st["ema_cluster_size"], exp_size, rtol=1e-6)
  np.testing.assert_allclose(st["ema_embed_sum"], exp_sum, rtol=1e-6)
  np.testing.assert_allclose(st["codebook"], exp_sum / smoothed[:, None], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(st["steps_since_used"])[[0, 1, 3]], 0)

  # From fresh stats (zero mass) a code that was never assigned keeps its initial value.
  fresh = _init(model, z)
  _, aux, new = _train_step(model, _with_stats(fresh, codebook=codebook), z)
  np.testing.assert_array_equal(new[STATS]["codebook"][2], codebook[2])
  size1 = (1 - decay) * counts
  smoothed1 = (size1 + eps) / (size1.sum() + k * eps) * size1.sum()
  np.testing.assert_allclose(np.asarray(new[STATS]["codebook"])[[0, 1, 3]],
                             ((1 - decay) * sums / smoothed1[:, None])[[0, 1, 3]], rtol=1e-5)

  # Evaluation never touches the stats.
  _, upd = jax.jit(lambda v, z: model.apply(v, z, train=False, mutable=[STATS]))(variables, z)
  for name, value in nn.unbox(upd)[STATS].items():
    np.testing.assert_array_equal(value, variables[STATS][name])


@pytest.mark.parametrize("mode", ["ema", "learned"])
def test_dead_code_is_restarted_from_encoder_outputs(mode):
  k, d = 8, 4
  model = VectorQuantizer(k, d, mode=mode, decay=0.9, restart_threshold=0.5)
  rng = np.random.default_rng(3)
  codebook = rng.normal(size=(k, d)).astype(np.float32)
  codebook[5] = 30.0   # never the nearest code
  z = rng.normal(size=(2, 2, 2, 2, d)).astype(np.float32)
  size = np.full((k,), 5.0, np.float32)
  size[5] = 0.0
  variables = _init(model, z)
  if mode == "ema":
    variables = _with_stats(variables, codebook=codebook, ema_cluster_size=size,
                            ema_embed_sum=codebook * size[:, None])
  else:
    variables = _with_stats({**variables, "params": {"codebook": jnp.asarray(codebook)}},
                            ema_cluster_size=size)

  def restarted_code(seed):
    _, aux, new = _train_step(model, variables, z, seed)
    assert float(aux["restarts"]) == 1.0
    np.testing.assert_allclose(new[STATS]["ema_cluster_size"][5], 1.0)
    cb = np.asarray(_apply(model, new, method=VectorQuantizer.get_codebook))
    others = np.delete(np.arange(k), 5)
    if mode == "ema":
      np.testing.assert_allclose(new[STATS]["ema_embed_sum"][5], cb[5])
      assert not np.allclose(cb[others], codebook[others])   # live codes moved by the EMA
    else:
      np.testing.assert_array_equal(cb[others], codebook[others])
    return np.asarray(cb[5])

  flat = z.reshape(-1, d)
  picks = []
  for seed in range(6):
    code = restarted_code(seed)
    match = np.flatnonzero(np.all(np.isclose(flat, code, rtol=0, atol=1e-5), axis=-1))
    assert match.size >= 1, code   # one of the current encoder outputs
    picks.append(int(match[0]))
  np.testing.assert_allclose(restarted_code(0), flat[picks[0]], rtol=0, atol=1e-5)   # same rng
  assert len(set(picks)) > 1

  # An explicit rng replaces the 'vq' stream.
  (_, aux), _ = jax.jit(lambda v, z: model.apply(v, z, train=True, rng=jax.random.key(0),
                                                 mutable=[STATS]))(variables, z)
  assert float(aux["restarts"]) == 1.0


def test_perplexity_and_usage():
  k, d = 16, 8
  model = VectorQuantizer(k, d, mode="learned", restart_threshold=0.0, usage_window=2)
  codebook = np.asarray(jax.random.normal(jax.random.key(4), (k, d)))
  variables = _init(model, jnp.zeros((1, d)))
  variables = {**variables, "params": {"codebook": jnp.asarray(codebook)}}

  z = np.tile(codebook[:8], (4, 1))   # uniform over 8 codes
  _, aux = _apply(model, variables, z)
  np.testing.assert_allclose(aux["perplexity"], 8.0, rtol=1e-5)
  np.testing.assert_allclose(aux["batch_usage"], 8 / k)
  _, aux = _apply(model, variables, np.tile(codebook[3], (10, 1)))
  np.testing.assert_allclose(aux["perplexity"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(code_statistics(jnp.array([3.0, 3.0, 0.0, 3.0]))["perplexity"], 3.0,
                             rtol=1e-6)

  # Windowed usage: the number of distinct codes assigned in the last `usage_window` steps.
  steps = [list(range(8)), [8, 9, 9], [10]]
  expected = [8, 10, 3]
  for codes, n_used in zip(steps, expected):
    _, aux, variables = _train_step(model, variables, codebook[codes])
    assert int(round(float(aux["usage"]) * k)) == n_used
    assert int(round(float(aux["batch_usage"]) * k)) == len(set(codes))


def test_cosine_lookup_is_unit_norm_max_cosine():
  k, d = 64, 16
  model = VectorQuantizer(k, d, cosine=True, chunk_size=24)
  rng = np.random.default_rng(5)
  codebook = (rng.normal(size=(k, d)) * rng.uniform(0.1, 10.0, size=(k, 1))).astype(np.float32)
  z = (rng.normal(size=(4, 5, d)) * 3.0).astype(np.float32)
  variables = _with_stats(_init(model, z), codebook=codebook)
  z_q, aux = _apply(model, variables, z)
  np.testing.assert_allclose(np.linalg.norm(z_q, axis=-1), 1.0, rtol=1e-5)
  cos = (z.reshape(-1, d) @ codebook.T) / (
      np.linalg.norm(z.reshape(-1, d), axis=-1)[:, None] * np.linalg.norm(codebook, axis=-1))
  np.testing.assert_array_equal(np.asarray(aux["indices"]).reshape(-1), cos.argmax(-1))
  unit = codebook / np.linalg.norm(codebook, axis=-1, keepdims=True)
  np.testing.assert_allclose(z_q, unit[cos.argmax(-1)].reshape(z_q.shape), rtol=1e-5, atol=1e-6)


def test_lookup_decodes_indices():
  model = VectorQuantizer(32, 8, chunk_size=5)
  z = jax.random.normal(jax.random.key(6), (2, 2, 3, 4, 8)).astype(jnp.bfloat16)
  variables = _init(model, z)
  z_q, aux = _apply(model, variables, z)
  assert z_q.dtype == jnp.bfloat16 and aux["indices"].shape == (2, 2, 3, 4)
  decoded = _apply(model, variables, aux["indices"], method=VectorQuantizer.lookup)
  np.testing.assert_array_equal(decoded.astype(jnp.bfloat16), z_q)
  np.testing.assert_array_equal(decoded, lookup_codes(variables[STATS]["codebook"],
                                                      aux["indices"]))


_SHARDED = textwrap.dedent("""
  import types
  import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
  from synthmri_jax.models.quantizer import STATS, VectorQuantizer
  from synthmri_jax.sharding import LOGICAL_AXIS_RULES, make_mesh

  mesh = make_mesh(types.SimpleNamespace(data=2, fsdp=2, tensor=1))
  for mode in ("ema",):
    model = VectorQuantizer(64, 8, mode=mode, chunk_size=24, token_chunk_size=100,
                            restart_threshold=0.5)
    z = jax.random.normal(jax.random.key(0), (4, 6, 6, 6, 8))
    boxed = model.init(jax.random.key(1), z)
    variables = nn.unbox(boxed)

    def step(variables, z, rng):
      (z_q, aux), upd = model.apply(variables, z, train=True, rngs={"vq": rng}, mutable=[STATS])
      return z_q, aux, nn.unbox(upd)

    ref = jax.jit(step)(variables, z, jax.random.key(2))
    shard = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, LOGICAL_AXIS_RULES)
    z_shard = nn.logical_to_mesh_sharding(
        jax.sharding.PartitionSpec("batch"), mesh, LOGICAL_AXIS_RULES)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
      out = jax.jit(step, in_shardings=(shard, z_shard, None))(
          jax.device_put(variables, shard), jax.device_put(z, z_shard), jax.random.key(2))
    assert out[0].sharding.spec[0] == ("data", "fsdp"), out[0].sharding
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(out)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  print("OK")
""")


def test_sharded_jit_matches_single_device(repo_root):
  env = {**os.environ, "XLA_FLAGS": fake_devices_flags(4),
         "JAX_PLATFORMS": "cpu", "PYTHONPATH": repo_root}
  res = subprocess.run([sys.executable, "-c", _SHARDED], env=env, cwd=repo_root,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
