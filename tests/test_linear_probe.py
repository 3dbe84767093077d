"""tools/linear_probe.py: the pooling is a block mean, the probe finds a planted signal and holds
chance under the null, and the matched real subsets keep their size and class ratio."""

import importlib.util
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("linear_probe", os.path.join(REPO, "tools", "linear_probe.py"))
lp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lp)


class ArraySource:
  """What pooled_features reads from a CohortSource: indexing -> {"image"}, and .labels."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.images)

  def __getitem__(self, i):
    return {"image": self.images[i]}


def test_pooled_features_are_block_means_over_the_cropped_grid():
  v = np.arange(5 * 4 * 2 * 2, dtype=np.float32).reshape(1, 5, 4, 2, 2)   # odd X: the last slab is cropped
  feats, labels = lp.pooled_features(ArraySource(v, np.array([1])), pool=2)
  expect = v[0, :4].reshape(2, 2, 2, 2, 1, 2, 2).mean((1, 3, 5)).ravel()
  np.testing.assert_allclose(feats[0], expect)
  assert feats.shape == (1, 2 * 2 * 1 * 2) and labels.tolist() == [1]


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


def test_matched_real_subsets_keep_size_and_class_ratio():
  y = np.array([0] * 150 + [1] * 90)
  subsets = lp.matched_real_subsets(y, 64, draws=4, seed=0)
  assert len(subsets) == 4 and len({tuple(s) for s in subsets}) == 4
  for s in subsets:
    assert len(s) == 64 and len(np.unique(s)) == 64
    assert np.sum(y[s] == 1) == round(90 / 240 * 64)
