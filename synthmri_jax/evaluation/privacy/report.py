"""The privacy report (WORKDIR/evaluation/privacy.json): copies, DCR / NNDR, membership inference
and epsilon, keyed over its inputs so that a rerun with the same key returns the saved report."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from synthmri_jax import workdir as workdir_lib
from synthmri_jax.config_blocks.privacy import block as privacy_block
from synthmri_jax.data import loader
from synthmri_jax.evaluation import privacy_stats
from synthmri_jax.evaluation.privacy.copies import MEASURES, copy_checker, load_split, save_pair_figure
from synthmri_jax.evaluation.privacy.epsilon import models_epsilon
from synthmri_jax.evaluation.privacy.membership import ldm_membership_inference
from synthmri_jax.utils import io

PRIVACY_FILE = workdir_lib.PRIVACY_FILE


def run_privacy(config, workdir: str, synthetic_volumes: np.ndarray, synthetic_ids: Sequence[str], *,
                codec=None, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The whole privacy report of a synthetic cohort on the prepared grid; writes
  WORKDIR/evaluation/privacy.json (atomic) and the closest-pair figures, returns the report."""
  pc = privacy_block(config)
  workdir = os.path.abspath(workdir)
  t0 = time.time()
  ids = [str(i) for i in synthetic_ids]
  vols = np.asarray(synthetic_volumes, np.float32)
  vols = vols[..., None] if vols.ndim == 4 else vols
  if len(ids) != len(vols) or len(vols) < 2:
    raise ValueError(f"need >= 2 synthetic volumes with one id each, got {len(vols)} volumes and {len(ids)} ids")
  key = result_key(pc, workdir, vols, ids)
  out_path = os.path.join(workdir_lib.evaluation_dir(workdir), PRIVACY_FILE)
  done = io.read_json(out_path)
  if done and done.get("complete") and done.get("key") == key:
    log(f"privacy: {out_path} is up to date (key {key}); not recomputed")
    _log_summary(done, log)
    return done
  checker = copy_checker(config, workdir, log=log)
  prepared = checker.prepared
  feats = checker.features(vols)
  nn = checker.neighbors(feats, k=1)
  flags = checker.flags(nn)
  train_ids = checker.train_ids

  measures = _measures(checker, nn, ids, int(pc.num_figures))
  copies, memorized = _copies(checker, flags, ids)
  n = len(ids)
  q = float(pc.quantile)
  expected = sum(float(privacy_stats.null_copy_count(n, checker.n_calibration, checker.quantiles[m]).mean()) / n
                 for m in checker.quantiles)
  pairs = _closest_pair_figures(checker, nn, flags, vols, ids, workdir, int(pc.num_figures))

  # DCR / NNDR against the holdout split.
  hold_split = str(pc.holdout_split)
  dcr: dict[str, Any] = {}
  if len(prepared.split(hold_split)) >= 2 and len(train_ids) >= 2:
    hold = {"embedding": checker.encoder.embed_source(loader.CohortSource(prepared, hold_split)),
            "voxel": load_split(prepared, hold_split, int(pc.voxel_pool))}
    for mname in MEASURES:
      dcr[mname] = privacy_stats.dcr_report(feats[mname], checker.train[mname], hold[mname], checker.metric(mname),
                                            **checker.distance_kwargs(mname))
  else:
    dcr = {"skipped": f"the {hold_split!r} split needs >= 2 scans"}

  mia = ldm_membership_inference(config, workdir, prepared, codec=codec, log=log)

  epsilon = models_epsilon(workdir)
  report = {
      "complete": True,
      "key": key,
      "synthetic": {"n": n},
      "real": {"n_train": len(train_ids), "calibration_split": checker.calibration_split,
               "n_calibration": checker.n_calibration, "holdout_split": hold_split,
               "n_holdout": int(len(prepared.split(hold_split)))},
      "copy_rule": checker.rule, "quantile": q, "measure_quantiles": checker.quantiles, "tau": checker.taus,
      "n_copies": len(copies), "copy_fraction": len(copies) / n,
      "expected_false_copy_fraction": expected,
      "copies": copies,
      "n_memorized": len(memorized), "memorized": sorted(memorized.values(), key=lambda e: -e["max_score"]),
      "closest_pairs": pairs,
      "measures": measures,
      "dcr": dcr,
      "membership_inference": mia,
      "epsilon": epsilon,
      "encoder": {k: checker.encoder.meta.get(k) for k in ("key", "splits", "n_scans", "steps", "reidentification",
                                                            "final_metrics")},
      "seconds": round(time.time() - t0, 1),
  }
  if jax.process_index() == 0:
    io.write_json_atomic(out_path, report)
  _log_summary(report, log)
  return report


def _measures(checker, nn, ids: Sequence[str], num_figures: int) -> dict[str, Any]:
  """Per similarity measure: its copy report where it is calibrated, else its closest pairs only."""
  train_ids = checker.train_ids
  measures = {}
  for mname in MEASURES:
    if mname in checker.calibration:
      rep = privacy_stats.copy_report(nn[mname], checker.calibration[mname], ids, train_ids, num_figures)
      measures[mname] = {**rep, "calibration": checker.calibration[mname]}
    else:
      best = nn[mname].similarity[:, 0]
      order = np.argsort(-best, kind="stable")[:num_figures]
      measures[mname] = {"used_for_flagging": False, "closest_pairs": [
          {"synthetic_id": ids[i], "train_id": train_ids[int(nn[mname].index[i, 0])], "score": float(best[i])}
          for i in order]}
  return measures


def _copies(checker, flags, ids: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
  """The flagged synthetic scans (most similar first), and the training subjects they copy."""
  train_ids = checker.train_ids
  copies = []
  for i in np.flatnonzero(flags["is_copy"]):
    mname = flags["measure"][i]
    copies.append({
        "participant_id": ids[i], "nearest_train_participant_id": train_ids[int(flags["train_index"][i])],
        "score": float(flags["score"][i]), "measure": mname, "tau": checker.taus[mname],
        "flagged_by": flags["flagged_by"][i],
        **{f"{m}_score": float(flags[f"{m}_score"][i]) for m in MEASURES},
        **{f"{m}_nearest_train_participant_id": train_ids[int(flags[f"{m}_train_index"][i])] for m in MEASURES}})
  copies.sort(key=lambda c: -c["score"])
  memorized: dict[str, dict[str, Any]] = {}
  for c in copies:
    e = memorized.setdefault(c["nearest_train_participant_id"], {"train_participant_id": c["nearest_train_participant_id"],
                                                                 "n_copies": 0, "max_score": c["score"],
                                                                 "copies": []})
    e["n_copies"] += 1
    e["copies"].append(c["participant_id"])
  return copies, memorized


def _closest_pair_figures(checker, nn, flags, vols: np.ndarray, ids: Sequence[str], workdir: str,
                          num_figures: int) -> list[dict[str, Any]]:
  """The closest synthetic / train pairs under the primary measure (the embedding), as figures."""
  fig_dir = os.path.join(workdir_lib.evaluation_dir(workdir), "figures")
  primary, train_ids = "embedding", checker.train_ids
  best = nn[primary].similarity[:, 0]
  order = np.argsort(-best, kind="stable")[:num_figures]
  train_src = loader.CohortSource(checker.prepared, "train", mmap=True)
  pairs = []
  for rank, i in enumerate(order):
    j = int(nn[primary].index[i, 0])
    path = os.path.join(fig_dir, f"privacy_pair_{rank:02d}.png")
    title = (f"{ids[i]} vs train {train_ids[j]}: embedding r = {best[i]:.3f} (τ {checker.taus.get(primary, math.nan):.3f}), "
             f"voxel s = {flags['voxel_score'][i]:.3f}" + (" — COPY" if flags["is_copy"][i] else ""))
    if jax.process_index() == 0:
      save_pair_figure(path, vols[i], np.asarray(train_src[j]["image"]), title)
    pairs.append({"participant_id": ids[i], "train_participant_id": train_ids[j], "embedding_score": float(best[i]),
                  "voxel_score": float(flags["voxel_score"][i]), "is_copy": bool(flags["is_copy"][i]),
                  "figure": os.path.relpath(path, workdir)})
  return pairs


def result_key(pc, workdir: str, vols: np.ndarray, ids: Sequence[str]) -> str:
  """What privacy.json depends on: the privacy block, the synthetic scans themselves, the prepared
  cohort, the LDM the membership attacks query (ldm.json) and every model's DP record. A rerun
  with the same key reuses the finished report; any change recomputes it."""
  prepared = io.read_json(os.path.join(workdir_lib.data_dir(workdir), workdir_lib.PREPARED_META_FILE)) or {}
  ldm_meta = io.read_json(os.path.join(workdir_lib.ldm_dir(workdir), workdir_lib.LDM_META_FILE))
  h = hashlib.sha256(json.dumps({
      "privacy": pc.to_dict(), "ids": list(ids), "prepared": prepared.get("config_hash"),
      "ldm": ldm_meta,
      # The privacy encoder's entry appears once this report has trained it: not an input.
      "epsilon": [m for m in models_epsilon(workdir)["models"] if m["model"] != "privacy_encoder"]},
      sort_keys=True, default=str).encode())
  h.update(np.ascontiguousarray(vols, np.float32).tobytes())
  return h.hexdigest()[:16]


def _log_summary(r: dict[str, Any], log: Callable[[str], None]) -> None:
  log(f"privacy: {r['n_copies']}/{r['synthetic']['n']} synthetic scans flagged as copies "
      f"(expected from calibration alone: {r['expected_false_copy_fraction']:.1%}), "
      f"{r['n_memorized']} training scans memorised; τ " + ", ".join(f"{k} {v:.4f}" for k, v in r["tau"].items()))
  d = r["dcr"].get("embedding") if isinstance(r["dcr"], dict) else None
  if d:
    log(f"privacy: closer to train than to holdout: {d['closer_to_train_share']:.0%} (expected "
        f"{d['expected_share']:.0%}, p = {d['share_p_value']:.3g})")
  mia = r["membership_inference"]
  if "skipped" in mia:
    log(f"privacy: membership inference skipped: {mia['skipped']}")
  else:
    op = lambda a: (f"TPR@1%FPR {a['tpr_at_1pct_fpr']:.3f}" if a["tpr_at_1pct_fpr_resolvable"] else
                    f"TPR@{a['smallest_resolvable_fpr']:.1%}FPR {a['tpr_at_smallest_fpr']:.3f} (1 % FPR not resolvable "
                    f"with {mia['n_nonmembers']} non-members)")
    log(f"privacy: MIA loss AUC {mia['loss_attack']['auc']:.3f} {op(mia['loss_attack'])}; "
        f"PIA AUC {mia['pia']['auc']:.3f} {op(mia['pia'])}")
    ctrl = mia.get("split_bias_control") or {}
    if "loss_attack" in ctrl:
      log(f"privacy: split-bias control ({ctrl['control_split']} vs {ctrl['nonmember_split']}, both non-members): "
          f"loss AUC {ctrl['loss_attack']['auc']:.3f}, PIA AUC {ctrl['pia']['auc']:.3f}")
  for m in r["epsilon"]["models"]:
    log(f"privacy: {m['model']}: {m['statement']}")


def run_privacy_on(config, workdir: str, synthetic, *, log: Callable[[str], None] = print) -> dict[str, Any]:
  """run_privacy on an ingested synthetic cohort (synthetic_cohort.load_synthetic_cohort)."""
  src = synthetic.source()
  vols = np.stack([src[i]["image"] for i in range(len(src))])
  return run_privacy(config, workdir, vols, synthetic.table["participant_id"].astype(str).tolist(), log=log)
