"""The privacy ledger: ε of every model that saw private data, and of the synthetic cohort as released.

The released cohort (WORKDIR/synthetic: images and participants.tsv) is a function of the LDM's
weights and of what the pipeline fit around them: the tokenizer that decodes the latents, the latent
standardisation, the conditioning's attribute statistics, the attribute model the subjects are drawn
from, and (sample.reject_copies) a filter against the private training scans. Each of these is a
release: DP-SGD (its dp.json), fit on the public reference cohort (config_blocks/public.py: no private record,
ε = 0), or fit on private data without a mechanism (ε = ∞). The cohort's ε is their basic composition,
finite only when none is of the last kind.

The unit of DP-SGD is a training record, one scan. A subject with k training scans is protected at
group level: (k ε, k e^{(k-1) ε} δ) (Vadhan 2017, Lemma 2.2); with one scan per subject the scan-level
and subject-level guarantees are the same.
"""

from __future__ import annotations

import glob
import math
import os
from typing import Any, Optional

import pandas as pd

from synthmri_jax import workdir as workdir_lib
from synthmri_jax.evaluation import embedding as embedding_lib
from synthmri_jax.training import dp_sgd
from synthmri_jax.utils import io

_SKIP_TRAIN_ARMS = ("TSTR", "SEG_synthetic")   # evaluation runs trained on synthetic data only

# Artefacts of a run that are computed from private data without noise and are not part of the
# released cohort: they stay in WORKDIR, for the people who may see the private data.
NOT_RELEASED = (
    "training logs and metrics (TensorBoard, ldm.json's final_loss, tokenizer_metrics.json when the tokenizer "
    "trained on the cohort; dp.json's metrics_note)",
    "the evaluation: the report, evaluation.json, privacy.json and the models it trains on real scans (TRTR, "
    "the privacy encoder); they describe the private cohort and are not DP",
    "dp_secret.json: the DP run's sampling and noise secret (never release it)",
)


def _dp_entry(name: str, path: str, saw_private: bool, records: list[Optional[dict]],
              statement: str = "trained on synthetic data only: inherits the generator's guarantee "
                               "(post-processing)") -> dict[str, Any]:
  """One model: DP if every training run it is made of has a complete, private dp.json."""
  entry: dict[str, Any] = {"model": name, "path": path, "saw_private_data": saw_private}
  if not saw_private:
    entry.update(private=True, epsilon=0.0, delta=0.0, statement=statement)
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


def group_privacy(epsilon: float, delta: float, k: int) -> tuple[float, float]:
  """(ε, δ)-DP for one record -> the guarantee for a group of k records: (k ε, k e^{(k-1) ε} δ)."""
  if k <= 1:
    return float(epsilon), float(delta)
  return k * float(epsilon), (k * math.exp((k - 1) * float(epsilon)) * float(delta)
                              if (k - 1) * epsilon < 700 else math.inf)


def max_train_scans_per_subject(workdir: str) -> Optional[int]:
  """The most training scans any one subject has in WORKDIR's prepared cohort (None: not prepared)."""
  path = os.path.join(workdir_lib.data_dir(workdir), "cohort.tsv")
  if not os.path.isfile(path):
    return None
  table = pd.read_csv(path, sep="\t", dtype={"participant_id": str}, keep_default_na=False)
  train = table[table["split"] == "train"]
  return int(train.groupby("participant_id").size().max()) if len(train) else 0


def _release(name: str, fit_on: str, entry: Optional[dict] = None) -> dict[str, Any]:
  """One input of the released cohort: 'public' (ε 0), 'dp' (its model entry's ε), or 'private' (ε ∞)."""
  if fit_on == "dp":
    return {"release": name, "source": "private data, DP-SGD", "private": True, "epsilon": entry["epsilon"],
            "delta": entry["delta"]}
  if fit_on == "public":
    return {"release": name, "source": "the public reference cohort", "private": True, "epsilon": 0.0, "delta": 0.0}
  return {"release": name, "source": "private data, no mechanism", "private": False, "epsilon": None, "delta": None}


def cohort_releases(workdir: str, by: dict[str, dict]) -> list[dict[str, Any]]:
  """Every input of the released synthetic cohort, with where it came from (the module docstring)."""
  ldm = io.read_json(os.path.join(workdir_lib.ldm_dir(workdir), workdir_lib.LDM_META_FILE)) or {}
  state = io.read_json(os.path.join(workdir, workdir_lib.SYNTHETIC_STATE_FILE)) or {}
  out = []
  if "tokenizer" in by:
    t = by["tokenizer"]
    out.append(_release("tokenizer weights (the decoder of every synthetic scan)",
                        "public" if not t["saw_private_data"] else "dp" if t["private"] else "private", t))
  if "ldm" in by:
    m = by["ldm"]
    out.append(_release("LDM weights", "dp" if m["private"] else "private", m))
  fit = "public" if ldm.get("fit_on") == "public" else "private"
  out.append(_release("latent standardisation (ldm.json latent_norm, scale_factor)", fit))
  out.append(_release("conditioning statistics (continuous attributes' mean and scale in ldm.json)", fit))
  if state:
    out.append(_release("attribute model (label and sex frequencies, age density) the subjects are drawn from",
                        "public" if state.get("attributes_fit_on") == "public" else "private"))
    if state.get("reject_copies"):
      out.append(_release("copy rejection (sample.reject_copies: regenerates subjects that resemble private "
                          "training scans under a non-DP encoder)", "private"))
  return out


def models_epsilon(workdir: str) -> dict[str, Any]:
  """Every model trained in WORKDIR with its ε, and the ledger of the synthetic cohort."""
  workdir = os.path.abspath(workdir)
  read = lambda d: io.read_json(os.path.join(d, dp_sgd.DP_FILE))
  models = []
  tok_root = workdir_lib.tokenizer_dir(workdir)
  tok_runs = _run_dirs(tok_root) if os.path.isdir(tok_root) else []
  if tok_runs:
    tok_meta = io.read_json(os.path.join(tok_root, workdir_lib.TOKENIZER_METRICS_FILE)) or {}
    models.append(_dp_entry("tokenizer", tok_root, tok_meta.get("fit_on") != "public", [read(d) for d in tok_runs],
                            statement="trained on the public reference cohort only (no private scan): ε = 0"))
  ldm_root = workdir_lib.ldm_dir(workdir)
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
  releases = cohort_releases(workdir, by)
  missing = [k for k in ("tokenizer", "ldm") if k not in by]
  k = max_train_scans_per_subject(workdir)
  cohort: dict[str, Any] = {"releases": releases, "not_released": list(NOT_RELEASED),
                            "non_private_releases": [r["release"] for r in releases if not r["private"]]}
  if missing or not all(r["private"] for r in releases):
    why = [f"{m} not found" for m in missing] + [f"{r['release']}: {r['source']}" for r in releases if not r["private"]]
    cohort.update(epsilon=None, delta=None, statement="non-private (ε = ∞): " + "; ".join(why))
  else:
    eps = sum(r["epsilon"] for r in releases)
    delta = sum(r["delta"] for r in releases)
    cohort.update(epsilon=eps, delta=delta,
                  statement=f"(ε, δ) = ({eps:.3g}, {delta:.3g}) per training scan, by basic composition of the "
                            "releases below (post-processing covers the sampling and decoding)")
    unit: dict[str, Any] = {"record": "scan", "max_train_scans_per_subject": k}
    if k is not None and k >= 1:
      se, sd = group_privacy(eps, delta, k)
      unit.update(subject_epsilon=se, subject_delta=sd,
                  statement="one scan per training subject: the guarantee is per subject" if k == 1 else
                  f"up to {k} training scans per subject: per subject (group privacy) ε = {se:.3g}, δ = {sd:.3g}")
    cohort["privacy_unit"] = unit
  return {"models": models, "synthetic_cohort": cohort}
