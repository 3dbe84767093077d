"""The privacy report against the real LDM stage (slow: compiles a U-Net twice): membership
inference on the ldm stage's model and cached latents, and the LDM's own loss trained with DP-SGD."""

import json
import os

import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from synthmri_jax import workdir as workdir_lib
from synthmri_jax.data import cache
from synthmri_jax.evaluation import privacy
from synthmri_jax.config_blocks.privacy import dp_config
from synthmri_jax.training import trainer
from synthmri_jax.training import dp_sgd
from synthmri_jax.latents import LatentCodec, LatentNorm
from synthmri_jax.pipeline import ldm as ldm_stage
from synthmri_jax.tasks import ldm as ldm_task
from test_ldm import tiny_ldm_config
from synthmri_jax.utils import io
from test_privacy import SPLITS, _cohort, _config


def _pool_codec():
  """Tokenizer stand-in: 4x average pooling (20x24x20 -> 5x6x5 latents) / nearest upsampling."""

  def encode(v, x):
    b, X, Y, Z, c = x.shape
    return x.reshape(b, X // 4, 4, Y // 4, 4, Z // 4, 4, c).mean(axis=(2, 4, 6)) * v["gain"]

  def decode(v, z):
    for axis in (1, 2, 3):
      z = jnp.repeat(z, 4, axis=axis)
    return z / v["gain"]

  return LatentCodec(encode, decode, {"gain": jnp.float32(3.0)}, key="pool4", description="test stand-in")


def _public_cohort(work):
  """WORKDIR/public: the private cohort's scans at half the intensity and 20 years older, so that
  anything fit on it is told apart from the same fit on the private cohort in closed form."""
  root = workdir_lib.public_dir(work)
  _cohort(root)
  prepared = cache.load_prepared(root)
  for rel in prepared.table["image"]:
    path = os.path.join(prepared.root, rel)
    np.save(path, 0.5 * np.load(path))
  table = prepared.table.assign(age=prepared.table["age"] + 20)
  table.to_csv(os.path.join(prepared.root, "cohort.tsv"), sep="\t", index=False)
  meta = dict(prepared.meta, config_hash="public-test",
              split_labels={s: {lab: int(((table["split"] == s) & (table["label"] == lab)).sum()) for lab in ("CN", "AD")}
                            for s in SPLITS})
  io.write_json_atomic(os.path.join(prepared.root, "prepared.json"), meta)


def _ldm_config():
  c = _config()
  c.public = ml_collections.ConfigDict(dict(enabled=True))   # norm, age statistics, attribute model: public
  c.data = ml_collections.ConfigDict(dict(batch_size=8, shuffle_seed=0, labels="CN,AD"))
  c.ldm = tiny_ldm_config()
  c.ldm.latents.splits = "train"
  c.ldm.train.update(dict(steps=8, warmup_steps=1, log_every=4, checkpoint_every=8))
  c.privacy.mia.timesteps = (50, 200)
  c.privacy.mia.noise_draws = 1
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c


@pytest.mark.slow
def test_membership_inference_and_dp_sgd_on_the_ldm(tmp_path):
  work = str(tmp_path / "with_ldm")
  _cohort(work)
  _public_cohort(work)
  config, codec = _ldm_config(), _pool_codec()
  ldm_stage.run(config, work, codec=codec, log=lambda m: None)
  # config.public: the standardisation and the age statistics come from the public cohort. Its latents
  # are half the private ones (a linear codec), so its label means halve and its scales double.
  meta = json.load(open(os.path.join(work, "ldm", "ldm.json")))
  assert meta["fit_on"] == "public"
  norm = LatentNorm.from_meta(meta, os.path.join(work, "ldm"))
  prepared = cache.load_prepared(work)
  train = ldm_task.split_attributes(prepared, "train", ())["label"]
  own = LatentNorm.fit(np.load(os.path.join(work, "ldm", "latents", "train.npy")), norm.mode, labels=train,
                       num_labels=2)
  assert norm.mode == "per_label_element"
  np.testing.assert_allclose(norm.label_shift, 0.5 * own.label_shift, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(norm.scale, 2.0 * own.scale, rtol=1e-5)
  age = next(a for a in meta["attributes"] if a["name"] == "age")
  assert age["mean"] == pytest.approx(prepared.split("train")["age"].mean() + 20)
  mia = privacy.ldm_membership_inference(config, work, cache.load_prepared(work), codec=codec, log=lambda m: None)
  assert mia["n_members"] == SPLITS["train"] and mia["n_nonmembers"] == SPLITS["holdout"]
  for attack in ("loss_attack", "pia"):
    a = mia[attack]
    assert 0.0 <= a["auc"] <= 1.0 and 0.0 <= a["tpr_at_smallest_fpr"] <= 1.0
    assert a["tpr_at_1pct_fpr_resolvable"] == (mia["n_nonmembers"] >= 100)
    assert (a["tpr_at_1pct_fpr"] is None) == (not a["tpr_at_1pct_fpr_resolvable"])
  assert [r["timestep"] for r in mia["loss_attack"]["per_timestep"]] == [50, 200]
  assert os.path.exists(os.path.join(work, "evaluation", "privacy", f"holdout_latents_{codec.key}.npy"))
  # The split-bias control: val (not in ldm.latents.splits here, so encoded once and cached) in the
  # members' place, against the same holdout scores.
  ctrl = mia["split_bias_control"]
  assert ctrl["control_split"] == "val" and ctrl["n_control"] == SPLITS["val"]
  assert ctrl["n_nonmembers"] == SPLITS["holdout"] and 0.0 <= ctrl["loss_attack"]["auc"] <= 1.0
  assert os.path.exists(os.path.join(work, "evaluation", "privacy", f"val_latents_{codec.key}.npy"))

  # The same U-Net trained with DP-SGD through the shared trainer: per-example gradients of the
  # LDM's own loss (condition dropout, random t and noise per example), Poisson batches, dp.json.
  attributes = ldm_task.attributes_from_meta(meta)
  model, schedule = ldm_task.build(meta["ldm"], meta["latent_shape"][-1], 2, attributes)
  task = ldm_task.LDMTask(model, schedule)
  prepared = cache.load_prepared(work)
  src = ldm_task.LatentSource(os.path.join(work, "ldm", "latents", "train.npy"), LatentNorm.from_meta(meta, os.path.join(work, "ldm")),
                             ldm_task.split_attributes(prepared, "train", attributes))
  cfg = ml_collections.ConfigDict(dict(train=dict(steps=4, warmup_steps=1, log_every=2, checkpoint_every=4,
                                                  dp=dp_config(target_epsilon=0.0, noise_multiplier=1.0,
                                                               l2_clip=1.0)),
                                       mesh=dict(data=-1, fsdp=1, tensor=1)))
  logs = []
  dp_dir = os.path.join(work, "ldm_dp")
  state = trainer.train(task, cfg, dp_dir, trainer.train_iterator(cfg, src, 8, seed=0, workdir=dp_dir),
                        on_log=lambda s, m: logs.append(m))
  rec = json.load(open(os.path.join(dp_dir, dp_sgd.DP_FILE)))
  assert int(state.step) == 4 and rec["complete"] and rec["steps"] == 4 and rec["private"]
  assert rec["sampling_probability"] == 8 / SPLITS["train"] and np.isfinite(logs[-1]["loss"])
  assert 0 < logs[-1]["dp_batch_size"] <= rec["sampling"]["max_batch_size"]

  # sample.reject_copies: subjects the copy check flags are regenerated with a new seed (same
  # attributes) until none is flagged; the check here is a stand-in that flags sub-synth0002 once
  # (the real check's encoder and calibration are tested in test_privacy.py).
  from synthmri_jax.pipeline import sample as sample_stage
  from synthmri_jax.config_blocks.ldm import sample_config
  config.sample = sample_config("quickstart")
  config.sample.update(dict(num_subjects=3, batch_size=4, steps=2, reject_copies=True, reject_max_attempts=2))
  calls = []

  def fake_flags(cfg, wd, volumes, log=print):
    calls.append(np.asarray(volumes).copy())
    flag = np.zeros(len(volumes), bool)
    if len(calls) == 1:
      flag[1] = True
    return {"is_copy": flag, "score": np.where(flag, 0.99, 0.1), "measure": ["embedding"] * len(volumes)}

  monkey = pytest.MonkeyPatch()
  monkey.setattr(privacy, "flag_generated", fake_flags)
  try:
    state = sample_stage.run(config, work, codec=codec, log=lambda m: None)
  finally:
    monkey.undo()
  assert state["rejections"]["count"] == 1
  # the attribute model is the public cohort's (ages 80-109; the private train split's are 60-89)
  assert state["attributes_fit_on"] == "public"
  assert pd.read_csv(os.path.join(work, "synthetic", "participants.tsv"), sep="\t")["age"].mean() > 83
  assert [r["participant_id"] for r in state["rejections"]["subjects"]] == ["sub-synth0002"]
  table = pd.read_csv(os.path.join(work, "synthetic", "participants.tsv"), sep="\t")
  first = table["seed"].tolist()
  assert first[1] == state["reseeded"]["1"] and len(calls) == 2 and len(calls[1]) == 1
  # The regenerated subject is a new image (new seed), the others are what the first pass made.
  assert not np.allclose(calls[1][0], calls[0][1])
  written = np.asarray(nib.load(
      os.path.join(work, "synthetic", "sub-synth0002", "anat", "sub-synth0002_T1w.nii.gz")).get_fdata())
  assert np.abs(written - calls[1][0][..., 0]).max() < 1e-3

  # A subject flagged on every attempt stops the stage with a message naming it.
  config.sample.seed = 1
  monkey.setattr(privacy, "flag_generated", lambda cfg, wd, v, log=print: {
      "is_copy": np.ones(len(v), bool), "score": np.ones(len(v)), "measure": ["embedding"] * len(v)})
  try:
    with pytest.raises(Exception, match="still flagged as copies"):
      sample_stage.run(config, work, codec=codec, log=lambda m: None)
  finally:
    monkey.undo()
