"""Noise schedules and samplers: closed forms, the PyTorch baseline's formulas (MONAI, written
out in numpy here), forward-process moments, and samplers against models whose exact noise
prediction is known."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthmri_jax.diffusion import samplers, schedules

T = 1000


# ----------------------------------------------------------------- MONAI reference (numpy, float64)

def monai_betas(name: str, num_t: int, beta_start: float = 1e-4, beta_end: float = 2e-2):
  """monai.networks.schedulers.scheduler: NoiseSchedules + Scheduler.__init__."""
  if name == "linear_beta":
    betas = np.linspace(beta_start, beta_end, num_t)
  elif name == "scaled_linear_beta":
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_t) ** 2
  elif name == "squaredcos_cap_v2":
    # diffusers' betas_for_alpha_bar, step by step (not MONAI's formula: see monai_cosine)
    alpha_bar = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    betas = np.array([min(1 - alpha_bar((i + 1) / num_t) / alpha_bar(i / num_t), 0.999) for i in range(num_t)])
  else:
    raise ValueError(name)
  alphas = 1.0 - betas
  return betas, alphas, np.cumprod(alphas)


def monai_ddpm_step(out, t, x, noise, betas, alphas, ac, prediction_type, clip):
  """DDPMScheduler.step, variance_type='fixed_small'."""
  a_t, a_prev = ac[t], (ac[t - 1] if t > 0 else 1.0)
  b_t, b_prev = 1 - a_t, 1 - a_prev
  if prediction_type == "epsilon":
    x0 = (x - b_t**0.5 * out) / a_t**0.5
  else:
    x0 = a_t**0.5 * x - b_t**0.5 * out
  if clip:
    x0 = np.clip(x0, -1, 1)
  x_prev = (a_prev**0.5 * betas[t]) / b_t * x0 + alphas[t] ** 0.5 * b_prev / b_t * x
  if t > 0:
    x_prev = x_prev + max(b_prev / b_t * betas[t], 1e-20) ** 0.5 * noise
  return x_prev


def monai_ddim_step(out, t, prev_t, x, noise, ac, eta, prediction_type, clip):
  """DDIMScheduler.step with set_alpha_to_one=True."""
  a_t, a_prev = ac[t], (ac[prev_t] if prev_t >= 0 else 1.0)
  b_t = 1 - a_t
  if prediction_type == "epsilon":
    x0, eps = (x - b_t**0.5 * out) / a_t**0.5, out
  else:
    x0, eps = a_t**0.5 * x - b_t**0.5 * out, a_t**0.5 * out + b_t**0.5 * x
  if clip:
    x0 = np.clip(x0, -1, 1)
  var = (1 - a_prev) / b_t * (1 - a_t / a_prev)
  std = eta * var**0.5
  return a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps + std * noise


def monai_ddim_timesteps(num_t, n, steps_offset):
  ratio = num_t // n
  return (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + steps_offset


# ----------------------------------------------------------------- schedules

@pytest.mark.parametrize("name,monai_name,start,end", [
    ("linear", "linear_beta", 1e-4, 2e-2),
    ("scaled_linear", "scaled_linear_beta", 1e-4, 2e-2),
    ("scaled_linear", "scaled_linear_beta", schedules.LDM_BETA_START, schedules.LDM_BETA_END),
    ("squaredcos_cap_v2", "squaredcos_cap_v2", None, None),
])
def test_schedule_matches_monai_formulas(name, monai_name, start, end):
  kw = {} if start is None else dict(beta_start=start, beta_end=end)
  s = schedules.make_schedule(name, T, **kw)
  betas, alphas, ac = monai_betas(monai_name, T, **kw)
  assert s.num_train_timesteps == T and s.betas.dtype == jnp.float32
  np.testing.assert_allclose(s.betas, betas, atol=1e-6, rtol=0)
  np.testing.assert_allclose(s.alphas, alphas, atol=1e-6, rtol=0)
  np.testing.assert_allclose(s.alphas_cumprod, ac, atol=1e-6, rtol=0)
  np.testing.assert_allclose(s.one_minus_alphas_cumprod, 1 - ac, atol=1e-6, rtol=1e-6)
  # The MONAI names are accepted as aliases.
  np.testing.assert_array_equal(schedules.make_schedule(monai_name, T, **kw).betas, s.betas)


def monai_cosine(num_t: int, s: float = 8e-3):
  """monai.networks.schedulers.scheduler._cosine_beta: alphas clipped, abar the unclipped f(i)/f(0)."""
  x = np.linspace(0, num_t, num_t + 1)
  ac = np.cos(((x / num_t) + s) / (1 + s) * np.pi * 0.5) ** 2
  ac = ac / ac[0]
  return ac[:-1]


def test_cosine_is_named_for_what_it_is():
  """Our cosine schedule is diffusers' squaredcos_cap_v2; MONAI's 'cosine' differs by ~1.6e-3 in abar,
  so the bare name is refused instead of silently meaning one of them."""
  ours = np.asarray(schedules.make_schedule("squaredcos_cap_v2", T).alphas_cumprod, np.float64)
  gap = np.abs(ours - monai_cosine(T)).max()
  assert 1e-3 < gap < 2e-3, gap
  with pytest.raises(ValueError, match="ambiguous"):
    schedules.make_schedule("cosine", T)


def test_schedule_closed_forms():
  t = np.arange(T, dtype=np.float64)
  lin = schedules.make_schedule("linear")
  np.testing.assert_allclose(lin.betas, 1e-4 + (2e-2 - 1e-4) * t / (T - 1), atol=1e-9, rtol=1e-6)
  sl = schedules.make_schedule("scaled_linear", beta_start=0.0015, beta_end=0.0195)
  root = np.sqrt(0.0015) + (np.sqrt(0.0195) - np.sqrt(0.0015)) * t / (T - 1)
  np.testing.assert_allclose(sl.betas, root**2, atol=1e-9, rtol=1e-6)
  for s in (lin, sl):
    b = np.asarray(s.betas, np.float64)
    np.testing.assert_allclose(s.alphas_cumprod, np.exp(np.cumsum(np.log(1 - b))), rtol=1e-5)
  cos = schedules.make_schedule("squaredcos_cap_v2")
  f = lambda u: np.cos((u / T + 0.008) / 1.008 * np.pi / 2) ** 2
  # The cumulative product telescopes to f(t+1)/f(0) wherever the 0.999 clip is inactive: all but the last step.
  np.testing.assert_allclose(cos.alphas_cumprod[:-1], f(t[:-1] + 1) / f(0), atol=1e-7, rtol=1e-5)
  assert float(cos.betas[-1]) == pytest.approx(0.999) and float(cos.betas[:-1].max()) < 0.999
  for s in (lin, sl, cos):
    ac = np.asarray(s.alphas_cumprod)
    assert np.all(np.diff(ac) < 0) and 0 < ac[-1] < 0.01 and ac[0] > 0.998
    ac64 = np.cumprod(1 - np.asarray(s.betas, np.float64))
    np.testing.assert_allclose(s.snr(jnp.arange(T)), ac64 / (1 - ac64), rtol=5e-5)
  with pytest.raises(ValueError):
    schedules.make_schedule("quadratic")


def test_schedule_is_a_jittable_pytree():
  s = schedules.make_schedule("squaredcos_cap_v2", 50)
  leaves = jax.tree.leaves(s)
  assert len(leaves) == 4 and all(leaf.shape == (50,) for leaf in leaves)
  x0, noise, t = jnp.ones((3, 2, 2, 2, 1)), jnp.zeros((3, 2, 2, 2, 1)), jnp.array([0, 10, 49])
  out = jax.jit(lambda sch: sch.q_sample(x0, t, noise))(s)
  np.testing.assert_allclose(out[:, 0, 0, 0, 0], np.sqrt(np.asarray(s.alphas_cumprod)[[0, 10, 49]]), rtol=1e-6)


def test_q_sample_moments():
  s = schedules.make_schedule("linear")
  ts = jnp.array([0, 100, 500, 999])
  x0 = jnp.array([1.5, -0.7, 2.0, 0.3])[:, None] * jnp.ones((4, 200_000))
  xt = s.q_sample(x0, ts, jax.random.normal(jax.random.key(0), x0.shape))
  ac = np.asarray(s.alphas_cumprod)[np.asarray(ts)]
  n = x0.shape[1]
  mean, var = np.asarray(xt.mean(1)), np.asarray(xt.var(1))
  np.testing.assert_allclose(mean, np.sqrt(ac) * np.asarray(x0[:, 0]), atol=float(5 * np.sqrt((1 - ac).max() / n)))
  # Var of the sample variance of a Gaussian: 2 sigma^4 / n.
  np.testing.assert_allclose(var, 1 - ac, atol=0, rtol=5 * np.sqrt(2 / n))


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_prediction_conversions_are_exact_inverses(name):
  s = schedules.make_schedule(name)
  k1, k2 = jax.random.split(jax.random.key(1))
  shape = (6, 3, 4, 5, 2)
  x0, eps = jax.random.normal(k1, shape), jax.random.normal(k2, shape)
  t = jnp.array([0, 1, 250, 500, 998, 999])
  xt = s.q_sample(x0, t, eps)
  v = s.velocity(x0, eps, t)
  ac64 = np.cumprod(1 - np.asarray(s.betas, np.float64))[np.asarray(t)].reshape(-1, 1, 1, 1, 1)
  np.testing.assert_allclose(v, np.sqrt(ac64) * eps - np.sqrt(1 - ac64) * x0, atol=1e-5)
  tol = dict(atol=2e-4, rtol=1e-4)
  for kind in schedules.PREDICTION_TYPES:
    target = s.training_target(x0, eps, t, kind)
    x0_hat, eps_hat = s.split_prediction(xt, t, target, kind)
    np.testing.assert_allclose(eps_hat, eps, **tol)
    # eps -> x0 divides by sqrt(abar_t) (5e-5 at the cosine schedule's last step), amplifying float32
    # rounding accordingly; from v and x0 targets it stays exact.
    err = np.abs(np.asarray(x0_hat) - np.asarray(x0))
    assert np.all(err <= 2e-4 + (2e-7 / np.sqrt(ac64) if kind == "epsilon" else 0.0))
  np.testing.assert_array_equal(s.training_target(x0, eps, t, "epsilon"), eps)
  np.testing.assert_allclose(s.x0_from_v(xt, t, v), x0, **tol)
  np.testing.assert_allclose(s.eps_from_v(xt, t, v), eps, **tol)
  np.testing.assert_allclose(s.eps_from_x0(xt, t, x0), eps, **tol)
  np.testing.assert_allclose(s.x0_from_eps(xt[:4], t[:4], eps[:4]), x0[:4], **tol)
  np.testing.assert_allclose(s.v_from_eps(xt[:4], t[:4], eps[:4]), v[:4], **tol)
  with pytest.raises(ValueError):
    s.training_target(x0, eps, t, "score")


# ----------------------------------------------------------------- samplers

def test_ddim_timesteps():
  for n, off in [(50, 0), (50, 1), (1000, 0), (7, 3), (1, 0)]:
    np.testing.assert_array_equal(samplers.ddim_timesteps(T, n, "leading", off), monai_ddim_timesteps(T, n, off))
  tr = samplers.ddim_timesteps(T, 50, "trailing")
  assert tr[0] == T - 1 and tr[-1] == 19 and len(tr) == 50 and np.all(np.diff(tr) == -20)
  for n in (3, 7, 333, 1000):
    tr = samplers.ddim_timesteps(T, n, "trailing")
    assert len(tr) == n and tr[0] == T - 1 and tr[-1] >= 0 and np.all(np.diff(tr) < 0)
  with pytest.raises(ValueError):
    samplers.ddim_timesteps(T, 50, "leading", steps_offset=20)
  with pytest.raises(ValueError):
    samplers.ddim_timesteps(T, 1001)


def _key(seed: int) -> jax.Array:
  """rbg keys: the samplers accept any key, and rbg compiles several times faster than threefry on CPU
  (batch-independence with per-subject keys needs threefry, tested separately)."""
  return jax.random.key(seed, impl="rbg")


def _toy_eps(xp, a, x):
  """A nonlinear, t-dependent stand-in for a network (data ~ N(0.5, 0.7^2) plus a tanh), in jnp or np."""
  return xp.sqrt(1 - a) * (x - xp.sqrt(a) * 0.5) / (a * 0.49 + 1 - a) + 0.05 * xp.tanh(x)


def _toy_model(s: schedules.NoiseSchedule):
  def model_fn(x, t, cond):
    return _toy_eps(jnp, s.alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1)), x)
  return model_fn


@pytest.mark.parametrize("prediction_type,clip", [("epsilon", False), ("v_prediction", True)])
def test_samplers_match_monai_step_maths(prediction_type, clip):
  """Step by step against DDPMScheduler.step / DDIMScheduler.step in numpy, fed the same noise."""
  num_t = 40
  s = schedules.make_schedule("scaled_linear", num_t, beta_start=0.0015, beta_end=0.0195 * 1000 / num_t)
  betas, alphas, ac = (np.asarray(a, np.float64) for a in (s.betas, s.alphas, s.alphas_cumprod))
  shape, rng = (2, 3, 3, 3, 1), _key(7)
  init_key, step_key = jax.random.split(rng)
  noise = lambda t: np.asarray(jax.random.normal(jax.random.fold_in(step_key, t), shape), np.float64)
  x_T = np.asarray(jax.random.normal(init_key, shape), np.float64)

  got = samplers.ddpm_sample(_toy_model(s), s, shape, rng, prediction_type=prediction_type, clip_sample=clip)
  x = x_T
  for t in range(num_t - 1, -1, -1):
    x = monai_ddpm_step(_toy_eps(np, ac[t], x), t, x, noise(t), betas, alphas, ac, prediction_type, clip)
  np.testing.assert_allclose(got, x, atol=2e-4, rtol=1e-4)

  ddim = jax.jit(lambda eta: samplers.ddim_sample(_toy_model(s), s, shape, rng, num_inference_steps=8, eta=eta,
                                                  prediction_type=prediction_type, clip_sample=clip, steps_offset=1))
  for eta in (0.0, 0.7):
    x = x_T
    for t in monai_ddim_timesteps(num_t, 8, 1):
      x = monai_ddim_step(_toy_eps(np, ac[t], x), t, t - num_t // 8, x, noise(t), ac, eta, prediction_type, clip)
    np.testing.assert_allclose(ddim(eta), x, atol=2e-4, rtol=1e-4)


def test_ddim_eta0_is_deterministic_and_eta1_full_is_ddpm():
  s = schedules.make_schedule("linear", 100, beta_end=0.2)
  shape = (3, 4, 4, 4, 2)
  x_T = jax.random.normal(jax.random.key(3), shape)
  run = jax.jit(lambda rng, eta: samplers.ddim_sample(_toy_model(s), s, shape, rng, num_inference_steps=20,
                                                      eta=eta, x_T=x_T))
  np.testing.assert_array_equal(run(_key(0), 0.0), run(_key(1), 0.0))
  assert not np.allclose(run(_key(0), 1.0), run(_key(1), 1.0))
  # Without x_T the rng fixes x_T: the DDIM(eta=1, every step) chain is DDPM's, noise for noise.
  ddpm = jax.jit(lambda rng: samplers.ddpm_sample(_toy_model(s), s, shape, rng))
  ddim = samplers.ddim_sample(_toy_model(s), s, shape, _key(5), num_inference_steps=100, eta=1.0)
  np.testing.assert_allclose(ddim, ddpm(_key(5)), atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(ddpm(_key(5)), ddpm(_key(5)))


def test_per_example_keys_make_samples_batch_independent():
  """One threefry key per subject: a subject's sample does not depend on the batch it was drawn in."""
  s = schedules.make_schedule("squaredcos_cap_v2", 50)
  fn = _toy_model(s)
  keys = jax.random.split(jax.random.key(0), 4)
  sample = lambda k: samplers.ddim_sample(fn, s, (k.shape[0], 3, 3, 3, 1), k, num_inference_steps=10, eta=0.5)
  whole = sample(keys)
  assert not np.allclose(whole[0], whole[1])
  # The last two subjects alone, passed as legacy raw uint32 keys of shape (2, 2): same samples.
  raw = jax.random.key_data(keys[2:])
  np.testing.assert_allclose(sample(raw), whole[2:], atol=1e-6)
  with pytest.raises(ValueError):
    samplers.ddim_sample(fn, s, (3, 3), raw)


def _oracle(s: schedules.NoiseSchedule, x0_star: jax.Array, prediction_type: str):
  """Exact prediction for a data distribution that is a point mass at x0_star."""
  def model_fn(x, t, cond):
    eps = s.eps_from_x0(x, t, x0_star)
    return eps if prediction_type == "epsilon" else s.velocity(x0_star, eps, t)
  return model_fn


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_samplers_recover_a_point_mass(prediction_type):
  shape = (2, 4, 4, 4, 3)
  x0_star = 1.5 * jnp.tanh(jax.random.normal(jax.random.key(11), shape))
  cos = schedules.make_schedule("squaredcos_cap_v2")
  sl = schedules.make_schedule("scaled_linear", beta_start=0.0015, beta_end=0.0195)
  kw = dict(prediction_type=prediction_type)
  for out in (samplers.ddpm_sample(_oracle(cos, x0_star, prediction_type), cos, shape, _key(0), **kw),
              samplers.ddim_sample(_oracle(sl, x0_star, prediction_type), sl, shape, _key(1),
                                   num_inference_steps=25, **kw),
              samplers.ddim_sample(_oracle(cos, x0_star, prediction_type), cos, shape, _key(2),
                                   num_inference_steps=10, eta=1.0, spacing="trailing", **kw)):
    np.testing.assert_allclose(out, x0_star, atol=1e-4)


def _gaussian_chain_moments(ac, betas, mu, sd, timesteps, ddpm: bool):
  """Exact output mean/std of the discretised reverse chain for N(mu, sd^2) data: with the exact eps
  every step is affine in x plus Gaussian noise, so the moments follow by recursion from N(0, 1)."""
  m, v = np.zeros_like(mu), np.ones_like(mu)
  for i, t in enumerate(timesteps):
    a = ac[t]
    p = (t - 1) if ddpm else (timesteps[i + 1] if i + 1 < len(timesteps) else -1)
    ap = ac[p] if p >= 0 else 1.0
    d = a * sd**2 + 1 - a
    e1, e0 = np.sqrt(1 - a) / d, -np.sqrt((1 - a) * a) * mu / d       # eps_hat = e1 x + e0
    x1, x0 = (1 - np.sqrt(1 - a) * e1) / np.sqrt(a), -np.sqrt(1 - a) * e0 / np.sqrt(a)  # x0_hat
    if ddpm:
      c0, ct = np.sqrt(ap) * betas[t] / (1 - a), np.sqrt(1 - betas[t]) * (1 - ap) / (1 - a)
      A, B, var = c0 * x1 + ct, c0 * x0, ((1 - ap) / (1 - a) * betas[t] if t > 0 else 0.0)
    else:
      A, B, var = np.sqrt(ap) * x1 + np.sqrt(1 - ap) * e1, np.sqrt(ap) * x0 + np.sqrt(1 - ap) * e0, 0.0
    m, v = A * m + B, A * A * v + var
  return m, np.sqrt(v)


def test_samplers_reproduce_a_gaussian():
  """Data N(mu, sd^2) per dimension: x_t ~ N(sqrt(a) mu, a sd^2 + 1 - a), so the exact
  E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) mu) / (a sd^2 + 1 - a)."""
  s = schedules.make_schedule("linear")
  mu, sd = np.array([0.8, -1.5, 0.0]), np.array([0.3, 1.0, 2.0])

  def fn(x, t, cond):
    a = s.alphas_cumprod[t][:, None]
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * sd**2 + 1 - a)

  n = 20_000
  betas = np.asarray(s.betas, np.float64)
  ac = np.cumprod(1 - betas)
  # 100 DDIM steps shrink the spread of a narrow Gaussian by ~4 % (discretisation, reproduced exactly
  # by the chain moments); DDPM's 1000 steps by ~1 %.
  runs = [(samplers.ddpm_sample(fn, s, (n, 3), _key(2)), np.arange(T)[::-1], True, 0.03),
          (samplers.ddim_sample(fn, s, (n, 3), _key(3), num_inference_steps=100),
           samplers.ddim_timesteps(T, 100), False, 0.06)]
  for out, ts, ddpm, data_rtol in runs:
    out = np.asarray(out, np.float64)
    se_mean, se_std = sd / np.sqrt(n), sd / np.sqrt(2 * n)
    chain_mean, chain_std = _gaussian_chain_moments(ac, betas, mu, sd, ts, ddpm)
    np.testing.assert_array_less(np.abs(out.mean(0) - chain_mean), 5 * se_mean)
    np.testing.assert_array_less(np.abs(out.std(0) - chain_std), 5 * se_std)
    # And the chain itself lands on the data distribution.
    np.testing.assert_allclose(out.mean(0), mu, atol=0.02)
    np.testing.assert_allclose(out.std(0), sd, rtol=data_rtol)


def test_classifier_free_guidance():
  calls = []

  def model_fn(x, t, cond):
    calls.append(x.shape[0])
    lab = cond["label"].astype(x.dtype)[:, None]
    return x * (1.0 + lab) + 0.1 * cond["age"][:, None] + 1e-3 * t[:, None]

  x = jax.random.normal(jax.random.key(0), (4, 5))
  t = jnp.array([3, 3, 3, 3], jnp.int32)
  cond = {"label": jnp.array([0, 1, 1, 0]), "age": jnp.array([60.0, 70.0, 80.0, 90.0])}
  null = {"label": jnp.full((4,), -1), "age": jnp.zeros((4,))}
  c, u = model_fn(x, t, cond), model_fn(x, t, null)
  null_fn = lambda cd: {"label": jnp.full_like(cd["label"], -1), "age": jnp.zeros_like(cd["age"])}
  traced = jax.jit(lambda x, t, cd, sc: samplers.cfg_model_fn(model_fn, sc, null_fn)(x, t, cd))
  for scale in (1.0, 0.0, 2.5):
    for null_arg in (null, null_fn):
      calls.clear()
      out = samplers.cfg_model_fn(model_fn, scale, null_arg)(x, t, cond)
      np.testing.assert_allclose(out, u + scale * (c - u), rtol=1e-6, atol=1e-6)
      assert calls == [8 if scale == 2.5 else 4]  # one network call; doubled batch only when needed
    # A traced scale always takes the doubled batch and gives the same mix.
    calls.clear()
    np.testing.assert_allclose(traced(x, t, cond, scale), u + scale * (c - u), rtol=1e-5, atol=1e-5)
    assert calls in ([], [8])  # [] once jit has cached the trace
  np.testing.assert_array_equal(samplers.cfg_model_fn(model_fn, 1.0, null)(x, t, cond), c)
  np.testing.assert_array_equal(samplers.cfg_model_fn(model_fn, 0.0, null)(x, t, cond), u)
  # Guided sampling end to end under jit, params as a traced argument closed over inside.
  s = schedules.make_schedule("squaredcos_cap_v2", 30)
  sample = jax.jit(lambda params, rng, cd: samplers.ddim_sample(
      samplers.cfg_model_fn(lambda x, t, c: params * model_fn(x, t, c), 3.0, null), s, (4, 5), rng, cd,
      num_inference_steps=10))
  out = sample(jnp.float32(0.1), _key(0), cond)
  assert out.shape == (4, 5) and np.all(np.isfinite(out))
