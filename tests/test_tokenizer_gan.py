"""The VQGAN's adversarial terms: they route gradients to the right networks, start late and are
weighted adaptively. A file of its own so that pytest-xdist's per-file workers can share the
tokenizer's compiles between two workers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthmri_jax.sharding import unbox
from synthmri_jax.tasks import tokenizer as T
from test_tokenizer import N, blobs, tiny_config


@pytest.fixture(scope="module")
def volumes():
  return {"image": blobs(), "valid": np.ones((N,), bool)}


@pytest.fixture(scope="module")
def vqgan(volumes):
  task = T.VQGANTask(tiny_config("vqgan"), 1)
  params, ms = jax.jit(task.init)(jax.random.key(0), volumes)
  return task, unbox(params), unbox(ms)


def tree_norm(t):
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(t))))


def test_gan_terms_route_gradients(vqgan, volumes):
  task, params, ms = vqgan
  x = jnp.asarray(volumes["image"])

  def term(p, name):
    out = task.model.apply({"params": p["tokenizer"], "vq_stats": ms["vq_stats"]}, x)
    return task.gan_terms(p, ms, x, out["x_hat"], out["features"], task.band(volumes))[name]

  g_hinge, g_adv = jax.jit(lambda p: (jax.grad(term)(p, "hinge"), jax.grad(term)(p, "g_adv")))(params)
  assert tree_norm(g_hinge["tokenizer"]) == 0.0 and tree_norm(g_hinge["discriminator"]) > 0
  assert tree_norm(g_adv["discriminator"]) == 0.0 and tree_norm(g_adv["tokenizer"]) > 0


def test_gan_delayed_start_and_adaptive_weight(vqgan, volumes):
  task, params, ms = vqgan
  loss = jax.jit(jax.grad(task.loss, has_aux=True))
  for step, active in ((0, False), (task.gcfg.start_step, True)):
    g, (m, _) = loss(params, ms, volumes, jax.random.key(1), jnp.int32(step))
    assert (tree_norm(g["discriminator"]) > 0) == active
    assert float(m["gan_active"]) == float(active)
    lam = float(m["gan_adaptive_weight"])
    assert (lam > 0 and np.isfinite(lam)) if active else lam == 0.0
