"""Membership-inference scoring of a generator: attack scores from its diffusion losses (loss
attack, Matsumoto et al. 2023; PIA, Kong et al. 2024) and the attack's success against chance.

Pure numpy over per-example scores or losses the caller supplies (evaluation/privacy/membership.py
computes them from the trained LDM). Members are the generator's training subjects, non-members
the holdout split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from synthmri_jax.evaluation import stats


def membership_inference_report(member_scores: np.ndarray, nonmember_scores: np.ndarray,
                                fprs: Sequence[float] = (0.01, 0.001), n_boot: int = 2000,
                                seed: int = 0, alpha: float = 0.05) -> dict[str, Any]:
  """Attack success from per-example scores, higher = "more likely a member".

  Members are the generator's training subjects, non-members the holdout split. Returns
  {"n_members", "n_nonmembers", "auc" (stats.auc_with_ci's dict), "tpr_at_fpr" {str(fpr):
  stats.tpr_at_fpr_with_ci's dict}, "advantage" (max TPR − FPR over the ROC: the best
  balanced-accuracy gain, 0 for a blind attack), "tpr_at_smallest_fpr" {"fpr": 1 / n_nonmembers,
  "tpr"}}. 0.5 AUC and TPR ≈ FPR mean no
  measurable leakage; at 0.1 % FPR fewer than 1,000 non-members cannot resolve the rate
  (see "resolvable").
  """
  m = _scores(member_scores, "member_scores")
  h = _scores(nonmember_scores, "nonmember_scores")
  y = np.r_[np.ones(len(m), int), np.zeros(len(h), int)]
  s = np.r_[m, h]
  curve = stats.roc_curve_points(y, s, drop_intermediate=False)
  return {"n_members": int(len(m)), "n_nonmembers": int(len(h)),
          "auc": stats.auc_with_ci(y, s, n_boot=n_boot, seed=seed, alpha=alpha),
          "tpr_at_fpr": {str(f): stats.tpr_at_fpr_with_ci(y, s, f, n_boot=n_boot, seed=seed, alpha=alpha)
                         for f in fprs},
          # the operating point every holdout resolves: one false positive (FPR = 1 / n_nonmembers)
          "tpr_at_smallest_fpr": {"fpr": 1.0 / len(h), "tpr": float(stats.tpr_at_fpr(y, s, 1.0 / len(h)))},
          "advantage": float(np.max(curve["tpr"] - curve["fpr"]))}


def loss_attack_score(losses: np.ndarray,
                      timestep_index: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
  """Loss-based membership score (Matsumoto et al. 2023): −mean diffusion loss.

  `losses` is (n,) or (n, n_timesteps): per example and timestep, the denoising loss
  ‖ε − ε_θ(√ᾱ_t x₀ + √(1−ᾱ_t) ε, t)‖² (mean over latent elements), with the noise ε
  drawn once per (example, timestep) by a fixed seed and the same timesteps for members
  and non-members. The mean is over the columns in `timestep_index` (default all). Trained-on
  examples have lower loss, hence the sign. One column at a time gives the per-timestep
  attack.
  """
  x = np.asarray(losses, np.float64)
  if x.ndim == 1:
    x = x[:, None]
  if x.ndim != 2:
    raise ValueError(f"losses must be (n,) or (n, n_timesteps), got {np.shape(losses)}")
  if timestep_index is not None:
    x = x[:, np.asarray(timestep_index)]
    if x.ndim == 1:
      x = x[:, None]
  return -x.mean(axis=1)


def pia_attack_score(eps_pred_t0: np.ndarray, eps_pred_t: np.ndarray, p: float = 2.0) -> np.ndarray:
  """PIA membership score (Kong et al. 2024, proximal initialisation): −‖ε_θ(x_t, t) − ε₀‖_p.

  Inputs, both (n, *latent): eps_pred_t0 = ε₀ = ε_θ(x₀, t=0), the model's noise prediction
  at the first timestep for the clean latent x₀; eps_pred_t = ε_θ(x_t, t) for the
  deterministic x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε₀ (ε₀ in place of random noise) at the attack
  timestep t (Kong et al. use t around 100–200 of 1,000). The norm is over all latent
  elements. A member's trajectory is consistent, so its two predictions agree: higher
  score = more likely a member.
  """
  a = np.asarray(eps_pred_t0, np.float64)
  b = np.asarray(eps_pred_t, np.float64)
  if a.shape != b.shape or a.ndim < 2:
    raise ValueError(f"eps_pred_t0 {a.shape} and eps_pred_t {b.shape} must both be (n, *latent)")
  if not p > 0:
    raise ValueError(f"p must be > 0, got {p!r}")
  diff = np.abs((b - a).reshape(len(a), -1))
  return -np.sum(diff ** p, axis=1) ** (1.0 / p)


def mia_by_timestep(member_losses: np.ndarray, nonmember_losses: np.ndarray,
                    timesteps: Sequence[int], n_boot: int = 2000, seed: int = 0,
                    alpha: float = 0.05, fpr: float = 0.01) -> list[dict[str, Any]]:
  """Loss attack at each timestep column: [{"timestep", "auc", "ci_low", "ci_high",
  "tpr_at_fpr", "fpr"}], from (n, n_timesteps) loss arrays (see `loss_attack_score`)."""
  m, h = np.asarray(member_losses, np.float64), np.asarray(nonmember_losses, np.float64)
  if m.ndim != 2 or h.ndim != 2 or m.shape[1] != h.shape[1] or m.shape[1] != len(timesteps):
    raise ValueError(f"need (n, {len(timesteps)}) loss arrays, got {m.shape} and {h.shape}")
  y = np.r_[np.ones(len(m), int), np.zeros(len(h), int)]
  rows = []
  for c, t in enumerate(timesteps):
    s = np.r_[loss_attack_score(m, [c]), loss_attack_score(h, [c])]
    a = stats.auc_with_ci(y, s, n_boot=n_boot, seed=seed, alpha=alpha)
    rows.append({"timestep": int(t), "auc": a["auc"], "ci_low": a["ci_low"], "ci_high": a["ci_high"],
                 "tpr_at_fpr": stats.tpr_at_fpr(y, s, fpr), "fpr": float(fpr)})
  return rows


def _scores(x: np.ndarray, name: str) -> np.ndarray:
  s = np.asarray(x, np.float64).ravel()
  if s.size < 2 or not np.all(np.isfinite(s)):
    raise ValueError(f"{name} must hold at least 2 finite scores")
  return s
