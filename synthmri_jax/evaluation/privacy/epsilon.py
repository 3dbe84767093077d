"""Epsilon of every model that saw private data: each run's dp.json (written by DP-SGD training),
or 'non-private (ε = ∞)'."""

from __future__ import annotations

import glob
import os
from typing import Any, Optional

from synthmri_jax import workdir as workdir_lib
from synthmri_jax.evaluation import embedding as embedding_lib
from synthmri_jax.training import dp_sgd
from synthmri_jax.utils import io

_SKIP_TRAIN_ARMS = ("TSTR", "SEG_synthetic")   # evaluation runs trained on synthetic data only


def _dp_entry(name: str, path: str, saw_private: bool, records: list[Optional[dict]]) -> dict[str, Any]:
  """One model: DP if every training run it is made of has a complete, private dp.json."""
  entry: dict[str, Any] = {"model": name, "path": path, "saw_private_data": saw_private}
  if not saw_private:
    entry.update(private=True, epsilon=0.0, statement="trained on synthetic data only: inherits the generator's "
                 "guarantee (post-processing)")
    return entry
  ok = records and all(r and r.get("private") and r.get("epsilon_pld") is not None for r in records)
  if not ok:
    entry.update(private=False, epsilon=None, statement="non-private (ε = ∞)")
    return entry
  eps_pld = sum(float(r["epsilon_pld"]) for r in records)
  eps_rdp = sum(float(r["epsilon_rdp"]) for r in records)
  delta = sum(float(r.get("delta_total") or r["delta"]) for r in records)
  entry.update(private=True, epsilon=eps_pld, epsilon_pld=eps_pld, epsilon_rdp=eps_rdp, delta=delta,
               runs=[{k: r.get(k) for k in ("task", "steps", "noise_multiplier", "l2_clip", "sampling_probability",
                                            "epsilon_pld", "epsilon_rdp", "delta", "delta_total", "overflow_steps")}
                     for r in records],
               statement=f"DP-SGD: ε = {eps_pld:.3g} (PLD; RDP {eps_rdp:.3g}), δ = {delta:.3g}"
               + (" (basic composition of its training stages)" if len(records) > 1 else ""))
  return entry


def _run_dirs(root: str) -> list[str]:
  """Trainer run folders (with checkpoints/) under root, root itself included."""
  return sorted(os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", "checkpoints"), recursive=True)
                if os.path.isdir(p))


def models_epsilon(workdir: str) -> dict[str, Any]:
  """Every model trained in WORKDIR with its ε, and what that means for the synthetic cohort."""
  workdir = os.path.abspath(workdir)
  read = lambda d: io.read_json(os.path.join(d, dp_sgd.DP_FILE))
  models = []
  tok_root = os.path.join(workdir, "tokenizer")
  tok_runs = _run_dirs(tok_root) if os.path.isdir(tok_root) else []
  if tok_runs:
    models.append(_dp_entry("tokenizer", tok_root, True, [read(d) for d in tok_runs]))
  ldm_root = os.path.join(workdir, "ldm")
  if os.path.isdir(os.path.join(ldm_root, "checkpoints")):
    models.append(_dp_entry("ldm", ldm_root, True, [read(ldm_root)]))
  runs = os.path.join(workdir_lib.evaluation_dir(workdir), "runs")
  for d in _run_dirs(runs) if os.path.isdir(runs) else []:
    rel = os.path.relpath(d, runs)
    arm = rel.split(os.sep)[0]
    models.append(_dp_entry(f"evaluation/{rel}", d, arm not in _SKIP_TRAIN_ARMS, [read(d)]))
  enc = io.read_json(os.path.join(embedding_lib.encoder_dir(workdir), embedding_lib.META_FILE)) or {}
  if enc.get("run_dir") and os.path.isdir(enc["run_dir"]):   # the current encoder (older keys are unused)
    e = _dp_entry("privacy_encoder", enc["run_dir"], True, [read(enc["run_dir"])])
    e["statement"] += "; evaluation tool, never exported"
    models.append(e)

  by = {m["model"]: m for m in models}
  generator = [by[k] for k in ("tokenizer", "ldm") if k in by]
  non_private_releases = [
      "LDM latent standardisation (mean and std of the training latents: global, per channel, per element or "
      "per label and element)",
      "sample stage attribute model (per-label label / sex frequencies and age KDE or normal fit on the training split)",
  ]
  if generator and all(m["private"] for m in generator) and len(generator) == 2:
    eps = sum(m["epsilon"] for m in generator)
    cohort = {"epsilon_generator_upper_bound": eps, "delta": sum(m["delta"] for m in generator),
              "statement": f"tokenizer + LDM: ε ≤ {eps:.3g} by basic composition, for the network weights; the "
                           "cohort is formally DP only if the non-private releases below are made private too"}
  else:
    missing = [k for k in ("tokenizer", "ldm") if k not in by or not by[k]["private"]]
    cohort = {"epsilon_generator_upper_bound": None, "delta": None,
              "statement": "non-private (ε = ∞): " + ", ".join(
                  f"{k} {'not found' if k not in by else 'trained without DP'}" for k in missing)}
  cohort["non_private_releases"] = non_private_releases
  return {"models": models, "synthetic_cohort": cohort}
