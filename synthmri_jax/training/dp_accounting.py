"""Privacy accounting for DP-SGD: (ε, δ) of a run and the noise needed for a target ε.

Thin wrappers over Google's `dp_accounting` package so that the pre-training budget tool
(tools/dp_budget.py), the trainer and the privacy report all account one and the same
mechanism: T steps of the Poisson-subsampled Gaussian mechanism with sampling
probability q = batch_size / dataset_size (each example joins each batch independently
with probability q, so batches have *expected* size batch_size), noise standard deviation
noise_multiplier × clipping norm, and add-or-remove-one adjacency. A trainer that draws
fixed-size shuffled batches instead does not get this guarantee: sample batches the way
the accountant assumes.

Two accountants:
- 'pld' (privacy loss distributions): numerically tight up to its discretisation; the
  number to report.
- 'rdp' (Rényi DP over a fixed grid of orders): a classic upper bound, looser (larger ε)
  than PLD; reported beside it for comparison with papers that use RDP (Opacus, TF Privacy).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Iterator
from typing import Literal

import dp_accounting
from absl import logging as absl_logging
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp

Accountant = Literal["pld", "rdp"]
ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")

# PLD discretisation of the privacy-loss axis: 1e-4 is dp_accounting's default and keeps ε
# within ~1e-4 of the exact value; coarser values trade accuracy (pessimistically) for speed.
DEFAULT_PLD_DISCRETIZATION = 1e-4


def default_delta(dataset_size: int) -> float:
  """δ = 1 / (10 n): well below 1/n, the level at which releasing one record verbatim is 'private'."""
  _check_positive_int("dataset_size", dataset_size)
  return 1.0 / (10.0 * dataset_size)


def sampling_probability(batch_size: int, dataset_size: int) -> float:
  """Poisson sampling rate q = batch_size / dataset_size; q > 1 is not a valid DP-SGD setting."""
  _check_positive_int("batch_size", batch_size)
  _check_positive_int("dataset_size", dataset_size)
  if batch_size > dataset_size:
    raise ValueError(
        f"batch_size ({batch_size}) > dataset_size ({dataset_size}): sampling probability "
        f"q = {batch_size / dataset_size:.4g} > 1")
  return float(batch_size) / float(dataset_size)


def steps_for_epochs(epochs: float, batch_size: int, dataset_size: int) -> int:
  """Steps for `epochs` passes in expectation: ceil(epochs · n / B) (rounded up, so ε is not under-stated)."""
  if not (isinstance(epochs, numbers.Real) and math.isfinite(epochs) and epochs > 0):
    raise ValueError(f"epochs must be a positive finite number, got {epochs!r}")
  q = sampling_probability(batch_size, dataset_size)
  # Round before ceil so that e.g. 50 epochs at q = 1/12 give 600 steps, not 601.
  return max(1, math.ceil(round(epochs / q, 9)))


def dp_sgd_event(noise_multiplier: float, sampling_prob: float,
                 steps: int) -> dp_accounting.DpEvent:
  """The DpEvent of DP-SGD: `steps` self-compositions of a Poisson-subsampled Gaussian."""
  _check_noise(noise_multiplier)
  if not (0.0 < sampling_prob <= 1.0):
    raise ValueError(f"sampling probability must be in (0, 1], got {sampling_prob!r}")
  _check_positive_int("steps", steps)
  return dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          float(sampling_prob), dp_accounting.GaussianDpEvent(float(noise_multiplier))),
      int(steps))


def make_accountant(accountant: Accountant = "pld",
                    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION
                    ) -> dp_accounting.PrivacyAccountant:
  """A fresh, empty accountant of the requested kind (add-or-remove-one adjacency)."""
  if accountant == "pld":
    if not pld_discretization > 0:
      raise ValueError(f"pld_discretization must be > 0, got {pld_discretization!r}")
    return dp_pld.PLDAccountant(value_discretization_interval=pld_discretization)
  if accountant == "rdp":
    return dp_rdp.RdpAccountant()
  raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def epsilon(noise_multiplier: float, batch_size: int, dataset_size: int, steps: int,
            delta: float, accountant: Accountant = "pld",
            pld_discretization: float = DEFAULT_PLD_DISCRETIZATION) -> float:
  """ε spent by `steps` DP-SGD steps at (noise_multiplier, q = batch_size / dataset_size, δ)."""
  q = sampling_probability(batch_size, dataset_size)
  _check_delta(delta, dataset_size)
  event = dp_sgd_event(noise_multiplier, q, steps)
  acc = make_accountant(accountant, pld_discretization)
  with _quiet_rdp():
    return float(acc.compose(event).get_epsilon(float(delta)))


def calibrate_noise(target_epsilon: float, batch_size: int, dataset_size: int, steps: int,
                    delta: float, accountant: Accountant = "pld", tol: float = 1e-4,
                    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION) -> float:
  """Smallest noise multiplier (within `tol`) whose ε at δ is ≤ target_epsilon.

  dp_accounting's calibrate_dp_mechanism brackets and bisects on the noise and returns a
  value on the safe side: epsilon(returned noise) ≤ target_epsilon always holds.
  """
  if not (isinstance(target_epsilon, numbers.Real) and math.isfinite(target_epsilon)
          and target_epsilon > 0):
    raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon!r}")
  if not tol > 0:
    raise ValueError(f"tol must be > 0, got {tol!r}")
  q = sampling_probability(batch_size, dataset_size)
  _check_delta(delta, dataset_size)
  _check_positive_int("steps", steps)
  make_accountant(accountant, pld_discretization)  # validate the kind before searching

  def make_event(noise: float) -> dp_accounting.DpEvent:
    # The bracket search starts at noise 0: the mechanism is then non-private (ε = ∞).
    if noise <= 0:
      return dp_accounting.NonPrivateDpEvent()
    return dp_sgd_event(noise, q, steps)

  with _quiet_rdp():
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(accountant, pld_discretization), make_event,
        float(target_epsilon), float(delta),
        bracket_interval=dp_accounting.LowerEndpointAndGuess(0.0, 1.0), tol=tol))


def dp_sgd_summary(noise_multiplier: float, batch_size: int, dataset_size: int, steps: int,
                   delta: float | None = None) -> dict[str, float | int | str]:
  """Settings and ε under both accountants, as one JSON-ready record for the privacy report."""
  delta = default_delta(dataset_size) if delta is None else delta
  return {
      "mechanism": "poisson_subsampled_gaussian",
      "neighboring_relation": "add_or_remove_one",
      "noise_multiplier": float(noise_multiplier),
      "batch_size": int(batch_size),
      "dataset_size": int(dataset_size),
      "sampling_probability": sampling_probability(batch_size, dataset_size),
      "steps": int(steps),
      "delta": float(delta),
      **{f"epsilon_{a}": epsilon(noise_multiplier, batch_size, dataset_size, steps, delta, a)
         for a in ACCOUNTANTS},
  }


def _check_positive_int(name: str, value: int) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_noise(noise_multiplier: float) -> None:
  if not (isinstance(noise_multiplier, numbers.Real) and math.isfinite(noise_multiplier)
          and noise_multiplier > 0):
    raise ValueError(
        f"noise_multiplier must be a positive finite number, got {noise_multiplier!r} "
        "(noise 0 means no differential privacy: ε = ∞)")


def _check_delta(delta: float, dataset_size: int) -> None:
  if not (isinstance(delta, numbers.Real) and 0.0 < delta < 1.0):
    raise ValueError(f"delta must be in (0, 1), got {delta!r}")
  if delta >= 1.0 / dataset_size:
    warnings.warn(
        f"delta = {delta:g} >= 1/n = {1.0 / dataset_size:g}: a mechanism that publishes one "
        f"random record in full satisfies this δ; use δ well below 1/n, e.g. "
        f"{default_delta(dataset_size):g}", UserWarning, stacklevel=3)


@contextlib.contextmanager
def _quiet_rdp() -> Iterator[None]:
  """Silence the RDP accountant's per-order 'failed to converge, excluding this order' warnings.

  They concern fractional orders near 1 that never give the minimum ε, and would otherwise
  print a screenful for each calibration step.
  """
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(level)
