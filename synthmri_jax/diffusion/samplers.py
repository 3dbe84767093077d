"""DDPM ancestral and DDIM samplers as traceable loops, and classifier-free guidance.

Contract: `model_fn(x, t, cond) -> prediction` with x of shape (B, ...), t int32 of shape
(B,) (training timestep indices, as MONAI's DiffusionModelUNet takes them) and `cond` any
pytree with batch-leading leaves (or None), passed through untouched. The prediction kind
('epsilon', 'v_prediction', 'sample') is given to the sampler and must match training.

Samplers are pure functions of (model_fn, schedule, shape, rng, cond) built on
`jax.lax.fori_loop`; they are not jitted themselves. Close over the parameters inside the
function you jit, so params stay traced arguments rather than baked-in constants:

  @jax.jit
  def sample(params, rng, cond):
    fn = lambda x, t, c: unet.apply(params, x, t, c)
    return ddim_sample(cfg_model_fn(fn, scale, null_cond), schedule, shape, rng, cond)

Randomness: `rng` is one key for the batch or one key per batch element (shape (B,)). x_T ~
N(0, I) is drawn from split(rng)[0]; the noise of the step at training timestep t from
fold_in(split(rng)[1], t) (per element with per-element keys). So DDPM and DDIM(eta=1, all T
steps) consume identical noise, and with per-element threefry keys (JAX's default) a
subject's sample depends on its own key only, not on batch size or position: what resumable
sampling needs. rbg keys compile several times faster on CPU but are not vmap-exact, so
with them a sample also depends on its batch.

Step maths follow MONAI's DDPMScheduler / DDIMScheduler.step, except that `clip_sample`
defaults to False here: latents scaled by the latent scale factor are not bounded to
[-1, 1] and clipping them would distort samples (MONAI's default is True).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from synthmri_jax.diffusion.schedules import NoiseSchedule, PredictionType, check_prediction_type

Cond = Any
ModelFn = Callable[[jax.Array, jax.Array, Cond], jax.Array]


def _timestep_vector(t: jax.Array, batch: int) -> jax.Array:
  return jnp.full((batch,), t, dtype=jnp.int32)


def _predict(model_fn: ModelFn, schedule: NoiseSchedule, x: jax.Array, t: jax.Array, cond: Cond,
             prediction_type: PredictionType, clip_sample: bool,
             clip_range: tuple[float, float]) -> tuple[jax.Array, jax.Array]:
  """(x0, eps) implied by the model at scalar timestep t; x0 clipped if asked, eps never (as MONAI)."""
  tb = _timestep_vector(t, x.shape[0])
  out = model_fn(x, tb, cond)
  if out.shape != x.shape:
    raise ValueError(f"model_fn returned shape {out.shape}, expected {x.shape} (learned variance is not supported)")
  x0, eps = schedule.split_prediction(x, tb, out.astype(x.dtype), prediction_type)
  if clip_sample:
    x0 = jnp.clip(x0, clip_range[0], clip_range[1])
  return x0, eps


class _Noise:
  """The sampler's randomness from one key, or from one key per batch element.

  Per-element keys (a (B,) typed key array, or (B, 2) raw uint32 keys) make each sample a
  function of its own key only, independent of which batch it is drawn in.
  """

  def __init__(self, rng: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype):
    typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    self.per_example = rng.ndim == (1 if typed else 2)
    if self.per_example and rng.shape[0] != shape[0]:
      raise ValueError(f"{rng.shape[0]} keys for a batch of {shape[0]}")
    self.shape, self.dtype = tuple(shape), dtype
    if self.per_example:
      keys = jax.vmap(jax.random.split)(rng)
      self.init_key, self.step_key = keys[:, 0], keys[:, 1]
    else:
      self.init_key, self.step_key = jax.random.split(rng)

  def _normal(self, key: jax.Array) -> jax.Array:
    if self.per_example:
      return jax.vmap(lambda k: jax.random.normal(k, self.shape[1:], self.dtype))(key)
    return jax.random.normal(key, self.shape, self.dtype)

  def initial(self, x_T: jax.Array | None) -> jax.Array:
    if x_T is None:
      return self._normal(self.init_key)
    if tuple(x_T.shape) != self.shape:
      raise ValueError(f"x_T has shape {x_T.shape}, expected {self.shape}")
    return x_T.astype(self.dtype)

  def step(self, t: jax.Array) -> jax.Array:
    if self.per_example:
      return self._normal(jax.vmap(lambda k: jax.random.fold_in(k, t))(self.step_key))
    return self._normal(jax.random.fold_in(self.step_key, t))


def ddpm_sample(model_fn: ModelFn, schedule: NoiseSchedule, shape: tuple[int, ...], rng: jax.Array,
                cond: Cond = None, *, prediction_type: PredictionType = "epsilon",
                variance_type: Literal["fixed_small", "fixed_large"] = "fixed_small",
                clip_sample: bool = False, clip_range: tuple[float, float] = (-1.0, 1.0),
                x_T: jax.Array | None = None, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Ancestral sampling over all T training steps, t = T-1 .. 0 (Ho et al. 2020, Alg. 2).

  x_{t-1} = c0_t x0_hat + ct_t x_t + sigma_t z, the posterior q(x_{t-1} | x_t, x0_hat) with
  c0_t = sqrt(abar_{t-1}) beta_t / (1-abar_t), ct_t = sqrt(alpha_t)(1-abar_{t-1}) / (1-abar_t),
  abar_{-1} = 1, and sigma_t^2 = beta_t (1-abar_{t-1}) / (1-abar_t) clamped at 1e-20
  ('fixed_small') or beta_t ('fixed_large'); no noise is added at t = 0. `x_T` replaces the
  initial noise drawn from rng.
  """
  check_prediction_type(prediction_type)
  if variance_type not in ("fixed_small", "fixed_large"):
    raise ValueError(f"variance_type must be 'fixed_small' or 'fixed_large', got {variance_type!r}")
  num_t = schedule.num_train_timesteps
  noise = _Noise(rng, shape, dtype)
  x_init = noise.initial(x_T)
  abar_prev_all = jnp.concatenate([jnp.ones((1,), jnp.float32), schedule.alphas_cumprod[:-1]])
  omab_prev_all = jnp.concatenate([jnp.zeros((1,), jnp.float32), schedule.one_minus_alphas_cumprod[:-1]])

  def body(i: jax.Array, x: jax.Array) -> jax.Array:
    t = num_t - 1 - i
    x0, _ = _predict(model_fn, schedule, x, t, cond, prediction_type, clip_sample, clip_range)
    beta, alpha = schedule.betas[t], schedule.alphas[t]
    omab, omab_prev = schedule.one_minus_alphas_cumprod[t], omab_prev_all[t]
    c0 = jnp.sqrt(abar_prev_all[t]) * beta / omab
    ct = jnp.sqrt(alpha) * omab_prev / omab
    if variance_type == "fixed_small":
      var = jnp.maximum(omab_prev / omab * beta, 1e-20)
    else:
      var = beta
    z = noise.step(t)
    sigma = jnp.where(t > 0, jnp.sqrt(var), 0.0)
    return (c0 * x0 + ct * x + sigma * z).astype(dtype)

  return jax.lax.fori_loop(0, num_t, body, x_init)


def ddim_timesteps(num_train_timesteps: int, num_inference_steps: int,
                   spacing: Literal["leading", "trailing"] = "leading", steps_offset: int = 0) -> np.ndarray:
  """Descending int32 timesteps visited by DDIM (static: a numpy array).

  'leading' is MONAI's DDIMScheduler.set_timesteps: ratio = T // n, t_k = k*ratio + steps_offset
  for k = n-1 .. 0 (so with T=1000, n=50: 980, 960, ..., 0; the noisiest step T-1 is never
  visited and x_T ~ N(0, I) is fed in at t = 980). 'trailing' (diffusers) ends at T-1:
  t_k = round(T - k*T/n) - 1, better with few steps; steps_offset does not apply to it.
  """
  if not 1 <= num_inference_steps <= num_train_timesteps:
    raise ValueError(f"num_inference_steps must be in [1, {num_train_timesteps}], got {num_inference_steps}")
  if spacing == "leading":
    ratio = num_train_timesteps // num_inference_steps
    if not 0 <= steps_offset < ratio:
      raise ValueError(f"steps_offset must be in [0, T // num_inference_steps = {ratio}), got {steps_offset}")
    ts = (np.arange(num_inference_steps) * ratio).round()[::-1] + steps_offset
  elif spacing == "trailing":
    stride = num_train_timesteps / num_inference_steps
    ts = np.round(num_train_timesteps - np.arange(num_inference_steps) * stride) - 1
  else:
    raise ValueError(f"spacing must be 'leading' or 'trailing', got {spacing!r}")
  return ts.astype(np.int32)


def ddim_sample(model_fn: ModelFn, schedule: NoiseSchedule, shape: tuple[int, ...], rng: jax.Array,
                cond: Cond = None, *, num_inference_steps: int = 50, eta: float | jax.Array = 0.0,
                prediction_type: PredictionType = "epsilon",
                spacing: Literal["leading", "trailing"] = "leading", steps_offset: int = 0,
                set_alpha_to_one: bool = True, clip_sample: bool = False,
                clip_range: tuple[float, float] = (-1.0, 1.0), x_T: jax.Array | None = None,
                dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """DDIM (Song et al. 2021, eq. 12) over `ddim_timesteps(...)`; eta=0 is deterministic given x_T.

  From t to the next visited timestep p (abar_p = 1, or abar_0 if not set_alpha_to_one, after
  the last): sigma^2 = eta^2 (1-abar_p)/(1-abar_t) (1 - abar_t/abar_p),
  x_p = sqrt(abar_p) x0_hat + sqrt(1 - abar_p - sigma^2) eps_hat + sigma z. As in MONAI, eps_hat
  is the model's (unclipped) noise estimate even when x0_hat is clipped. eta may be traced.
  `x_T` replaces the initial noise drawn from rng (with eta = 0 the result then ignores rng).
  """
  check_prediction_type(prediction_type)
  ts = ddim_timesteps(schedule.num_train_timesteps, num_inference_steps, spacing, steps_offset)
  timesteps = jnp.asarray(ts)
  prev_timesteps = jnp.asarray(np.concatenate([ts[1:], [-1]]).astype(np.int32))
  final_abar = jnp.float32(1.0) if set_alpha_to_one else schedule.alphas_cumprod[0]
  final_omab = jnp.float32(0.0) if set_alpha_to_one else schedule.one_minus_alphas_cumprod[0]
  noise = _Noise(rng, shape, dtype)
  x_init = noise.initial(x_T)
  # A Python eta of 0 draws no per-step noise at all (cheaper to compile and run).
  stochastic = not (isinstance(eta, (int, float)) and eta == 0)
  eta = jnp.asarray(eta, jnp.float32)

  def body(k: jax.Array, x: jax.Array) -> jax.Array:
    t, p = timesteps[k], prev_timesteps[k]
    x0, eps = _predict(model_fn, schedule, x, t, cond, prediction_type, clip_sample, clip_range)
    omab = schedule.one_minus_alphas_cumprod[t]
    abar_prev = jnp.where(p >= 0, schedule.alphas_cumprod[jnp.maximum(p, 0)], final_abar)
    omab_prev = jnp.where(p >= 0, schedule.one_minus_alphas_cumprod[jnp.maximum(p, 0)], final_omab)
    # 1 - abar_t / abar_p written as (omab_t - omab_p) / abar_p to avoid cancellation.
    var = omab_prev / omab * (omab - omab_prev) / abar_prev
    sigma = eta * jnp.sqrt(jnp.maximum(var, 0.0))
    x_prev = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(jnp.maximum(omab_prev - sigma**2, 0.0)) * eps
    if stochastic:
      x_prev = x_prev + sigma * noise.step(t)
    return x_prev.astype(dtype)

  return jax.lax.fori_loop(0, len(ts), body, x_init)


def cfg_model_fn(model_fn: ModelFn, guidance_scale: float | jax.Array,
                 null_cond: Cond | Callable[[Cond], Cond]) -> ModelFn:
  """Classifier-free guidance (Ho & Salimans 2022): pred_u + s (pred_c - pred_u).

  Conditional and unconditional predictions come from one call on a doubled batch
  [cond; null] so the network runs once per step. `null_cond` is the "condition dropped"
  input the model was trained with: a pytree shaped like `cond`, or a function cond -> that.
  s = 1 is the conditional model, s = 0 the unconditional. The mix is applied to the raw
  prediction: eps, v and x0 are affine in one another for fixed (x_t, t), so guiding any of
  them is the same as guiding eps. A Python scale of exactly 0 or 1 skips the doubled batch.
  """

  def guided(x: jax.Array, t: jax.Array, cond: Cond) -> jax.Array:
    null = null_cond(cond) if callable(null_cond) else null_cond
    if isinstance(guidance_scale, (int, float)) and guidance_scale in (0, 1):
      return model_fn(x, t, cond if guidance_scale == 1 else null)
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, null)
    out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
    pred_c, pred_u = jnp.split(out, 2, axis=0)
    s = jnp.asarray(guidance_scale, pred_c.dtype)
    return pred_u + s * (pred_c - pred_u)

  return guided
