"""tools/linear_probe.py: the probe finds a planted signal and holds chance under the null, and the
matched real subsets are the study's own stratified subject subsample."""

import importlib.util
import os

import numpy as np
import pandas as pd

from synthmri_jax.evaluation.arms import subsample_real

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("linear_probe", os.path.join(REPO, "tools", "linear_probe.py"))
lp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lp)


def _planted(n, shift, seed):
  r = np.random.default_rng(seed)
  y = np.arange(n) % 2
  x = r.normal(size=(n, 50))
  x[:, :5] += shift * y[:, None]
  return x, y


def test_probe_finds_a_planted_signal_and_holds_chance_under_the_null():
  xtr, ytr = _planted(80, 1.5, 0)
  xte, yte = _planted(60, 1.5, 1)
  assert lp.probe_auc(xtr, ytr, xte, yte, c=0.1, n_boot=200)["auc"] > 0.95
  covered = 0
  for seed in range(20):                            # no signal: the interval holds 0.5 at ~95 %
    xtr, ytr = _planted(80, 0.0, 100 + seed)
    xte, yte = _planted(60, 0.0, 200 + seed)
    r = lp.probe_auc(xtr, ytr, xte, yte, c=0.1, n_boot=200)
    covered += r["ci_low"] <= 0.5 <= r["ci_high"]
  assert covered >= 16


def test_matched_real_subsets_are_the_studys_stratified_subject_subsample():
  table = pd.DataFrame({"participant_id": [f"sub-{i:03d}" for i in range(240)],
                        "label_index": [0] * 150 + [1] * 90})
  subsets = lp.matched_real_subsets(table, 64, draws=4, seed=0)
  assert len(subsets) == 4 and len({tuple(s) for s in subsets}) == 4
  for k, s in enumerate(subsets):
    assert len(s) == 64 and len(np.unique(s)) == 64               # 40 CN + 24 AD
    assert (table["label_index"].to_numpy()[s] == 1).sum() == 24
    np.testing.assert_array_equal(s, subsample_real(table, 64 / 240, k))
