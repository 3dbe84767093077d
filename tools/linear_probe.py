"""Linear-probe TSTR: a seconds-long, seed-free second read of a synthetic cohort's label signal.

  python tools/linear_probe.py --workdir runs/quickstart [--synthetic DIR] [--out probe.json]

Why: the study's CNN costs ~70 s per arm on 2 CPU cores, and one classifier seed moves its AUC by
±0.05-0.1 for reasons unrelated to the generator. A logistic regression on average-pooled voxels
(each feature standardised with its training set's mean and sd) trains in seconds and is
deterministic, so two generators, or two budgets of one, can be compared on the same footing. It
also answers "what are n synthetic scans worth?": the same probe trained on random real training
subsets of the synthetic cohort's size (`--draws` of them) gives the matched real reference.

Reads what the evaluate stage reads: the prepared real splits and the synthetic cohort ingested
onto the prepared grid (its cache in WORKDIR/evaluation/synthetic_cache, built on first use).
Every probe is tested on the real test split; AUCs carry the study's class-stratified bootstrap
interval (unit: test scans). Prints one line per probe; --out writes them as JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from synthmri_jax import workdir as workdir_lib  # noqa: E402
from synthmri_jax.data.cache import load_prepared  # noqa: E402
from synthmri_jax.evaluation import stats  # noqa: E402
from synthmri_jax.evaluation.arms import subsample_real  # noqa: E402
from synthmri_jax.evaluation.privacy.copies import load_split  # noqa: E402
from synthmri_jax.evaluation.synthetic_cohort import load_synthetic_cohort  # noqa: E402
from synthmri_jax.utils import io  # noqa: E402


def probe_auc(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
              c: float, n_boot: int, seed: int = 0) -> dict[str, Any]:
  """Logistic regression (L2, inverse strength `c`) on training-standardised features -> test AUC
  with its bootstrap interval (stats.auc_with_ci)."""
  from sklearn.linear_model import LogisticRegression
  if len(np.unique(y_train)) < 2:
    raise ValueError(f"the probe's training set has one class only ({np.unique(y_train).tolist()})")
  mu, sd = x_train.mean(0), x_train.std(0) + 1e-3
  model = LogisticRegression(C=float(c), max_iter=5000).fit((x_train - mu) / sd, y_train)
  probs = model.predict_proba((x_test - mu) / sd)
  return stats.auc_with_ci(y_test, probs if probs.shape[1] > 2 else probs[:, 1], n_boot=n_boot, seed=seed)


def matched_real_subsets(table, size: int, draws: int, seed: int) -> list[np.ndarray]:
  """`draws` real training subsets of about `size` scans: the study's own REAL_<fraction> subsample
  (arms.subsample_real: subject-level, label-stratified) at fraction size / n, seeds seed, seed+1, ..."""
  return [subsample_real(table, size / len(table), seed + k) for k in range(int(draws))]


def run(workdir: str, synthetic: str = "", *, pool: int = 2, c: float = 0.1, draws: int = 5, n_boot: int = 1000,
        seed: int = 0, log=print) -> dict[str, Any]:
  workdir = os.path.abspath(workdir)
  real = load_prepared(workdir)
  folder = os.path.abspath(synthetic) if synthetic else workdir_lib.synthetic_dir(workdir)
  syn = load_synthetic_cohort(folder, real, workdir_lib.synthetic_cache_dir(workdir), log=log)
  flat = lambda prepared, split: load_split(prepared, split, pool).reshape(len(prepared.split(split)), -1)
  labels = lambda prepared, split: prepared.split(split)["label_index"].to_numpy(np.int32)
  xr, yr = flat(real, "train"), labels(real, "train")
  xt, yt = flat(real, "test"), labels(real, "test")
  xs, ys = flat(syn.prepared, "train"), syn.labels
  kw = dict(c=c, n_boot=n_boot, seed=seed)
  out: dict[str, Any] = {"workdir": workdir, "synthetic_dir": folder, "pool": pool, "C": c, "unit": "test scans",
                         "n_test": int(len(yt)), "probes": {}}

  def record(name: str, n: int, r: dict[str, Any]) -> None:
    out["probes"][name] = {"n_train": int(n), "auc": r["auc"], "ci": [r["ci_low"], r["ci_high"]]}
    log(f"{name:<12} {n:4d} training scans: test AUC {r['auc']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]")

  record("TRTR", len(yr), probe_auc(xr, yr, xt, yt, **kw))
  record("TSTR", len(ys), probe_auc(xs, ys, xt, yt, **kw))
  if len(ys) < len(yr):
    aucs = []
    for k, idx in enumerate(matched_real_subsets(real.split("train"), len(ys), draws, seed)):
      r = probe_auc(xr[idx], yr[idx], xt, yt, **kw)
      record(f"REAL_{len(ys)}#{k}", len(idx), r)
      aucs.append(r["auc"])
    out["matched_real"] = {"n_train": int(len(ys)), "subsample": "evaluation.arms.subsample_real", "draws": int(draws), "auc_mean": float(np.mean(aucs)),
                           "auc_min": float(np.min(aucs)), "auc_max": float(np.max(aucs))}
    log(f"real subsets of {len(ys)} scans ({draws} draws): AUC mean {np.mean(aucs):.3f}, range "
        f"{np.min(aucs):.3f}-{np.max(aucs):.3f}; TSTR {out['probes']['TSTR']['auc']:.3f}")
  return out


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--workdir", required=True, help="a workdir whose prepare stage has run")
  p.add_argument("--synthetic", default="", help="synthetic cohort folder (default: WORKDIR/synthetic)")
  p.add_argument("--pool", type=int, default=2, help="average-pooling factor per axis before the probe")
  p.add_argument("--C", type=float, default=0.1, help="inverse L2 strength of the logistic regression")
  p.add_argument("--draws", type=int, default=5, help="random real subsets of the synthetic cohort's size")
  p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of each AUC interval")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="", help="write the probes as JSON here")
  a = p.parse_args(argv)
  out = run(a.workdir, a.synthetic, pool=a.pool, c=a.C, draws=a.draws, n_boot=a.n_boot, seed=a.seed)
  if a.out:
    io.write_json_atomic(a.out, out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
  main()
