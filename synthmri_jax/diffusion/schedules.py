"""Discrete-time DDPM noise schedules and the algebra between noise, clean data and velocity.

The linear schedules reproduce MONAI's `monai.networks.schedulers`, so a checkpoint trained here
and one trained with the PyTorch baseline see the same forward process:

  linear             betas = linspace(beta_start, beta_end, T)                 MONAI "linear_beta"
  scaled_linear      betas = linspace(sqrt(beta_start), sqrt(beta_end), T)**2  MONAI "scaled_linear_beta"
  squaredcos_cap_v2  abar(i) = f(i+1)/f(0), f(x) = cos(((x/T)+s)/(1+s)*pi/2)**2,
                     betas = clip(1 - abar_i/abar_{i-1}, 0, 0.999), abar recomputed
                     as cumprod(1 - betas)                    diffusers "squaredcos_cap_v2"

The cosine schedule is diffusers' (Nichol & Dhariwal 2021 with the 0.999 beta cap), not MONAI's
"cosine": MONAI clips the alphas to [1e-4, 0.9999] and keeps the unclipped f(i)/f(0) as abar
(abar_0 = 1 exactly, an infinite SNR at t = 0), which differs from this one by up to 1.6e-3 in
abar. The name "cosine" is refused rather than silently meaning either.

MONAI's defaults are beta_start=1e-4, beta_end=2e-2 for both linear kinds; its latent
diffusion tutorials use scaled_linear with 0.0015/0.0195 (`LDM_BETA_START`/`LDM_BETA_END`).
Arrays are computed in float64 numpy once and stored as float32, so they match the
formulas to float32 rounding (MONAI's torch float32 cumprod is itself only good to ~1e-6).

Timesteps `t` are integer indices 0..T-1 with one entry per batch element; t=0 is the
least noisy step (x_0 is clean data, x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1-abar_t) I)).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# MONAI names of the same formulas, accepted so configs written for the baseline work unchanged.
_ALIASES = {"linear_beta": "linear", "scaled_linear_beta": "scaled_linear"}

DEFAULT_BETA_START = 1e-4
DEFAULT_BETA_END = 2e-2
LDM_BETA_START = 0.0015
LDM_BETA_END = 0.0195


def linear_betas(num_train_timesteps: int, beta_start: float = DEFAULT_BETA_START,
                 beta_end: float = DEFAULT_BETA_END) -> np.ndarray:
  """Ho et al. 2020 linear betas (float64)."""
  return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)


def scaled_linear_betas(num_train_timesteps: int, beta_start: float = DEFAULT_BETA_START,
                        beta_end: float = DEFAULT_BETA_END) -> np.ndarray:
  """Linear in sqrt(beta): the Stable Diffusion / MONAI LDM schedule (float64)."""
  return np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), num_train_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_train_timesteps: int, s: float = 8e-3, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal 2021 cosine schedule as diffusers' squaredcos_cap_v2; the clip keeps the last
  step from being pure noise (beta=1)."""
  x = np.linspace(0.0, num_train_timesteps, num_train_timesteps + 1, dtype=np.float64)
  abar = np.cos((x / num_train_timesteps + s) / (1.0 + s) * np.pi * 0.5) ** 2
  abar = abar / abar[0]
  return np.clip(1.0 - abar[1:] / abar[:-1], 0.0, max_beta)


def _right_broadcast(v: jax.Array, ndim: int) -> jax.Array:
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """betas, alphas = 1 - betas, alphas_cumprod (abar) and 1 - abar, each float32 of shape (T,).

  1 - abar is stored rather than recomputed because in float32 it loses three digits at
  small t (abar_0 = 1 - 1e-4); it feeds sqrt(1 - abar) and the posterior coefficients.
  A pytree of arrays only, so it can be passed through jit / shard_map as an argument or
  closed over as a constant; T is the static array length.
  """

  betas: jax.Array
  alphas: jax.Array
  alphas_cumprod: jax.Array
  one_minus_alphas_cumprod: jax.Array

  @property
  def num_train_timesteps(self) -> int:
    return int(self.betas.shape[0])

  def _coef(self, arr: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    return _right_broadcast(jnp.take(arr, jnp.asarray(t, jnp.int32)), ndim)

  def sqrt_abar(self, t: jax.Array, ndim: int = 1) -> jax.Array:
    """sqrt(abar_t), shaped to broadcast against a (B, ...) array of rank `ndim`."""
    return self._coef(jnp.sqrt(self.alphas_cumprod), t, ndim)

  def sqrt_one_minus_abar(self, t: jax.Array, ndim: int = 1) -> jax.Array:
    return self._coef(jnp.sqrt(self.one_minus_alphas_cumprod), t, ndim)

  def snr(self, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio abar_t / (1 - abar_t), e.g. for min-SNR loss weighting."""
    t = jnp.asarray(t, jnp.int32)
    return jnp.take(self.alphas_cumprod, t) / jnp.take(self.one_minus_alphas_cumprod, t)

  def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (MONAI `add_noise`); t has shape (B,)."""
    out = self.sqrt_abar(t, x0.ndim) * x0 + self.sqrt_one_minus_abar(t, x0.ndim) * noise
    return out.astype(x0.dtype)

  def velocity(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (Salimans & Ho 2022; MONAI `get_velocity`)."""
    out = self.sqrt_abar(t, x0.ndim) * noise - self.sqrt_one_minus_abar(t, x0.ndim) * x0
    return out.astype(x0.dtype)

  def training_target(self, x0: jax.Array, noise: jax.Array, t: jax.Array,
                      prediction_type: PredictionType = "epsilon") -> jax.Array:
    """What the network regresses onto for x_t = q_sample(x0, t, noise)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
      return noise
    if prediction_type == "v_prediction":
      return self.velocity(x0, noise, t)
    return x0

  def split_prediction(self, x_t: jax.Array, t: jax.Array, model_output: jax.Array,
                       prediction_type: PredictionType = "epsilon") -> tuple[jax.Array, jax.Array]:
    """(x0, eps) implied by a network output of the given kind; exact inverse of the targets."""
    check_prediction_type(prediction_type)
    sa = self.sqrt_abar(t, x_t.ndim)
    sb = self.sqrt_one_minus_abar(t, x_t.ndim)
    if prediction_type == "epsilon":
      eps = model_output
      x0 = (x_t - sb * eps) / sa
    elif prediction_type == "v_prediction":
      # sa^2 + sb^2 = 1 makes the inverse a rotation, stable at every t.
      x0 = sa * x_t - sb * model_output
      eps = sa * model_output + sb * x_t
    else:
      x0 = model_output
      eps = (x_t - sa * x0) / sb
    return x0.astype(x_t.dtype), eps.astype(x_t.dtype)

  def eps_from_x0(self, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    return ((x_t - self.sqrt_abar(t, x_t.ndim) * x0) / self.sqrt_one_minus_abar(t, x_t.ndim)).astype(x_t.dtype)

  def x0_from_eps(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    return ((x_t - self.sqrt_one_minus_abar(t, x_t.ndim) * eps) / self.sqrt_abar(t, x_t.ndim)).astype(x_t.dtype)

  def x0_from_v(self, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    return (self.sqrt_abar(t, x_t.ndim) * x_t - self.sqrt_one_minus_abar(t, x_t.ndim) * v).astype(x_t.dtype)

  def eps_from_v(self, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
    return (self.sqrt_abar(t, x_t.ndim) * v + self.sqrt_one_minus_abar(t, x_t.ndim) * x_t).astype(x_t.dtype)

  def v_from_eps(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """v given x_t and eps (x0 eliminated): v = (eps - sqrt(1-abar) x_t) / sqrt(abar)."""
    return self.velocity(self.x0_from_eps(x_t, t, eps), eps, t)


def check_prediction_type(prediction_type: str) -> None:
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def schedule_from_betas(betas: np.ndarray) -> NoiseSchedule:
  """Schedule from float64 betas; the cumulative product is taken in float64 before the cast."""
  betas = np.asarray(betas, np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
    raise ValueError("betas must be a 1-D array in (0, 1)")
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  # 1 - prod(1 - beta) without cancellation: -expm1(sum(log1p(-beta))).
  one_minus_abar = -np.expm1(np.cumsum(np.log1p(-betas)))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return NoiseSchedule(betas=f32(betas), alphas=f32(alphas), alphas_cumprod=f32(abar),
                       one_minus_alphas_cumprod=f32(one_minus_abar))


def make_schedule(name: str = "linear", num_train_timesteps: int = 1000,
                  beta_start: float = DEFAULT_BETA_START, beta_end: float = DEFAULT_BETA_END,
                  cosine_s: float = 8e-3) -> NoiseSchedule:
  """Schedule by name: 'linear', 'scaled_linear' (MONAI names accepted too) or 'squaredcos_cap_v2'.

  beta_start/beta_end are ignored by 'squaredcos_cap_v2'.
  """
  kind = _ALIASES.get(name, name)
  if kind == "cosine":
    raise ValueError("noise schedule 'cosine' is ambiguous: MONAI's 'cosine' (clipped alphas, abar_0 = 1) is not "
                     "implemented; 'squaredcos_cap_v2' is diffusers' cosine schedule (Nichol & Dhariwal, beta <= "
                     "0.999), whose abar differs from MONAI's by up to 1.6e-3")
  if num_train_timesteps < 2:
    raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
  if kind == "linear":
    betas = linear_betas(num_train_timesteps, beta_start, beta_end)
  elif kind == "scaled_linear":
    betas = scaled_linear_betas(num_train_timesteps, beta_start, beta_end)
  elif kind == "squaredcos_cap_v2":
    betas = cosine_betas(num_train_timesteps, cosine_s)
  else:
    raise ValueError(f"unknown noise schedule {name!r}; expected one of {SCHEDULES}")
  return schedule_from_betas(betas)
