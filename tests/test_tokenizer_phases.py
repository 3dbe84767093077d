"""Phased training of the dual tokenizer (each phase trains its part, the rest stays bit-identical)
and the tokenizer stage (phases chained through checkpoints, metrics, skip on rerun).

A file of its own so that pytest-xdist's per-file workers share the tokenizer's compiles.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from synthmri_jax.tasks import tokenizer as T
from test_tokenizer import N, SIZE, Stepper, bits_equal, blobs, host, names, tiny_config


@pytest.fixture(scope="module")
def volumes():
  return {"image": blobs(), "valid": np.ones((N,), bool)}

# ------------------------------------------------------------------------------ phased training


@pytest.mark.parametrize("phase", [pytest.param("clinical", marks=pytest.mark.slow), "generative"])
def test_frozen_params_stay_bit_identical(phase, volumes):
  task = T.DualTask(tiny_config("dual"), 1, phase)
  s = Stepper(task, volumes, lr=1e-2, warmup_steps=0)
  before = host(s.state)
  for _ in range(2):
    s.step(volumes)
  after = host(s.state)
  frozen, trained = [], []
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before.params), jax.tree.leaves(after.params)):
    (trained if task.trainable(names(path)) else frozen).append((names(path), a, b))
  assert frozen and trained
  assert all(a.tobytes() == b.tobytes() for _, a, b in frozen), [p for p, a, b in frozen if a.tobytes() != b.tobytes()]
  assert sum(not np.array_equal(a, b) for _, a, b in trained) > len(trained) // 2
  vq_before, vq_after = before.model_state["vq_stats"], after.model_state["vq_stats"]
  if phase == "generative":   # the frozen clinical codebook is not EMA-updated either
    assert bits_equal(vq_before["clinical_vq"], vq_after["clinical_vq"])
    assert not bits_equal(vq_before["generative_vq"], vq_after["generative_vq"])
  else:
    assert bits_equal(vq_before["generative_vq"], vq_after["generative_vq"])
    assert not bits_equal(vq_before["clinical_vq"], vq_after["clinical_vq"])
  assert bits_equal(before.model_state["perceptual"], after.model_state["perceptual"])


# ------------------------------------------------------------------------------ the tokenizer stage


def _prepared_cohort(workdir, n_train=4, n_val=2):
  """A minimal prepared cohort (the data/cache.py contract) of blob volumes."""
  from synthmri_jax.utils import io
  root = os.path.join(workdir, "data")
  os.makedirs(os.path.join(root, "cache"), exist_ok=True)
  x = blobs(n_train + n_val, seed=5)
  rows = []
  for i in range(n_train + n_val):
    rel = f"cache/sub-{i:02d}.npy"
    np.save(os.path.join(root, rel), x[i])
    rows.append(dict(participant_id=f"{i:02d}", session_id="", label="CN", label_index=0, age=70.0, sex="F",
                     split="train" if i < n_train else "val", image=rel, mask=""))
  pd.DataFrame(rows).to_csv(os.path.join(root, "cohort.tsv"), sep="\t", index=False)
  io.write_json_atomic(os.path.join(root, "prepared.json"),
                       dict(shape=[SIZE] * 3, channels=["T1w"], labels=["CN", "AD"], complete=True,
                            config_hash="test", spacing_mm=4.0, affine=np.eye(4).tolist()))


@pytest.mark.slow
def test_tokenizer_stage_trains_phases_and_skips(tmp_path):
  import ml_collections
  from synthmri_jax.pipeline import tokenizer as tokenizer_stage
  _prepared_cohort(str(tmp_path))
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = ml_collections.ConfigDict(dict(batch_size=2, flip_axes="", intensity_jitter=0.0, shuffle_seed=0))
  config.tokenizer = tiny_config("dual")
  config.tokenizer.train.log_every = 2
  # two of the three phases: the chain (each phase from the last one's checkpoint) is the same for
  # joint, whose step the frozen-params and overfitting tests compile; a third compile here is ~70 s
  config.tokenizer.phases = "clinical,generative"
  for s in ("clinical", "generative"):
    config.tokenizer.phase_train[s].steps = 3
  m = tokenizer_stage.run(config, str(tmp_path))
  path = tmp_path / "tokenizer" / "tokenizer_metrics.json"
  on_disk = json.loads(path.read_text())
  assert on_disk["config_hash"] == m["config_hash"]
  for k in ("psnr", "ssim", "boundary_band_l1", "codebooks", "clinical_modes", "phases"):
    assert k in on_disk, k
  assert set(on_disk["codebooks"]) >= {"clinical", "generative"}
  assert set(on_disk["clinical_modes"]) >= {"encoded", "predicted", "null"}
  for s in ("clinical", "generative"):
    assert (tmp_path / "tokenizer" / s / "checkpoints" / "3").is_dir()
  assert not (tmp_path / "tokenizer" / "joint").exists() and set(on_disk["phases"]) == {"clinical", "generative"}
  # Phase 2 started from phase 1: the frozen trunk equals phase 1's trunk.
  from synthmri_jax.training import checkpoint as ckpt_lib
  _, s1 = ckpt_lib.load_variables(str(tmp_path / "tokenizer" / "clinical" / "checkpoints"))
  _, s2 = ckpt_lib.load_variables(str(tmp_path / "tokenizer" / "generative" / "checkpoints"))
  assert bits_equal(s1["params"]["tokenizer"]["trunk"], s2["params"]["tokenizer"]["trunk"])
  mtime = path.stat().st_mtime
  assert tokenizer_stage.run(config, str(tmp_path))["config_hash"] == m["config_hash"]
  assert path.stat().st_mtime == mtime
  model, variables = tokenizer_stage.load_tokenizer(config, str(tmp_path))
  z = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_generative))(variables, jnp.asarray(blobs(1)))
  assert z.shape == (1, 4, 4, 4, 4)
