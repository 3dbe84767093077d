"""The LDM task and the `ldm` / `sample` stages.

- conditioning, for real: on a toy latent cohort where class 1 has +1 mean in channel 0 and
  channel 1 grows with age (like the embedded cohort's ventricles), a tiny model trained with the
  shared trainer reproduces the class difference in its class-conditional samples (DDIM and
  DDPM), the difference disappears with the label turned off (null token), and samples drawn for
  attributes from the tabular model keep the age relation; the tabular model follows the
  training distribution;
- training resume of the ldm stage (checkpoint N, restart, same losses and params as straight);
- the stages end to end with a stand-in tokenizer defined here (average-pool / upsample):
  latent cache, skip when complete, sampling resume (interrupted run keeps its subjects, the
  rest match a straight run byte for byte), the BIDS folder and its privacy checks.
"""

import copy
import glob
import gzip
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from synthmri_jax import workdir as workdir_lib
from synthmri_jax.generation.attributes import AttributeModel
from synthmri_jax.generation.generator import Generator
from synthmri_jax.latents import LatentCodec
from synthmri_jax.pipeline import ldm as ldm_stage
from synthmri_jax.pipeline import sample as sample_stage
from synthmri_jax.data import loader
from synthmri_jax.data.cache import load_prepared
from synthmri_jax.diffusion.schedules import make_schedule
from synthmri_jax.evaluation import synthetic_cohort
from synthmri_jax.models import unet as U
from synthmri_jax.training import trainer
from synthmri_jax.training.checkpoint import load_variables
from synthmri_jax.tasks.ldm import LDMTask
from synthmri_jax.config_blocks.ldm import ldm_config, sample_config

LATENT = (4, 4, 4, 2)
LABELS = ["CN", "AD"]
ATTRS = U.parse_attributes("age:continuous,sex:categorical:2")


def toy_cohort(n: int, seed: int = 0):
  """Labels, ages (AD older), sexes (AD more often M) and latents: channel 0 = label + noise,
  channel 1 = (age - 72.5) / 10 + noise -- the 'ventricles grow with age' relation."""
  r = np.random.default_rng(seed)
  label = np.repeat([0, 1], n // 2).astype(np.int32)
  age = np.where(label == 1, r.uniform(65, 90, n), r.uniform(55, 80, n)).astype(np.float32)
  sex = (r.uniform(size=n) < np.where(label == 1, 0.6, 0.3)).astype(np.int32)
  z = 0.4 * r.standard_normal((n,) + LATENT).astype(np.float32)
  z[..., 0] += label[:, None, None, None]
  z[..., 1] += ((age - 72.5) / 10.0)[:, None, None, None]
  return {"latent": z, "label": label, "age": age, "sex": sex}


def tiny_model(attributes, channels=(16, 32), attention=(False, True)) -> U.DiffusionUNet:
  cond = U.Conditioning(num_classes=2, attributes=tuple(attributes), token_dim=32, fourier_features=6)
  return U.DiffusionUNet(out_channels=LATENT[-1], channels=channels, num_res_blocks=1, attention_levels=attention,
                         num_head_channels=8, norm_num_groups=8, conditioning=cond)


def train_cfg(**kw):
  c = ml_collections.ConfigDict(dict(steps=300, lr=2e-3, warmup_steps=20, weight_decay=0.0, clip_norm=1.0,
                                     log_every=50, eval_every=0, checkpoint_every=1000, seed=0))
  c.update(kw)
  return ml_collections.ConfigDict({"train": c})


PRED = "v_prediction"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny model trained on the toy cohort (v-prediction; a 200-step squaredcos_cap_v2 schedule keeps DDPM short)."""
  data = toy_cohort(128)
  attrs = U.with_stats(ATTRS, data)
  model = tiny_model(attrs)
  schedule = make_schedule("squaredcos_cap_v2", 200)
  task = LDMTask(model, schedule, PRED, dropout_each=0.1, dropout_all=0.15)
  it = loader.train_iterator(loader.ArraySource(data), 16, seed=0)
  workdir = str(tmp_path_factory.mktemp("ldm_toy"))
  state = trainer.train(task, train_cfg(), workdir, it)
  return dict(data=data, attrs=attrs, model=model, schedule=schedule, params=state.params,
              checkpoints=os.path.join(workdir, "checkpoints"))


def _gen(t, **kw):
  return Generator(t["model"], t["schedule"], LATENT,
                            **{"steps": 25, "batch_size": 32, "prediction_type": PRED, **kw})


def _cond(label, age, sex):
  return {"label": np.asarray(label, np.int32), "age": np.asarray(age, np.float32), "sex": np.asarray(sex, np.int32)}


@pytest.mark.slow
def test_class_conditional_samples_reproduce_the_class_difference(trained):
  n = 32
  seeds = np.arange(2 * n, dtype=np.uint32)
  age, sex = np.full(2 * n, 72.5), np.tile([0, 1], n)
  label = np.repeat([0, 1], n)
  diffs = {}
  for gen in (_gen(trained), _gen(trained, sampler="ddpm")):
    z = gen.latents(trained["params"], seeds, _cond(label, age, sex))
    ch0 = z[..., 0].mean(axis=(1, 2, 3))
    diff = diffs[gen._static["sampler"]] = ch0[n:].mean() - ch0[:n].mean()
    assert 0.7 < diff < 1.3, (gen._static["sampler"], diff, ch0)
    # Channel 1 follows age alone, but age and label are confounded in the training data (AD older):
    # a model that read channel 1 off the label would give the data's AD - CN difference at any age.
    # At the same age in both groups the difference must be well under that (measured: 0.31-0.41
    # against 1.0; the tiny model leaks some of the label into it).
    ch1 = z[..., 1].mean(axis=(1, 2, 3))
    data_ch1 = trained["data"]["latent"][..., 1].mean(axis=(1, 2, 3))
    confounded = data_ch1[trained["data"]["label"] == 1].mean() - data_ch1[trained["data"]["label"] == 0].mean()
    assert confounded > 0.8, confounded
    assert abs(ch1[n:].mean() - ch1[:n].mean()) < 0.5 * confounded, (ch1[n:].mean() - ch1[:n].mean(), confounded)
  # Label turned off (null token): both groups come from the same label mixture.
  z = _gen(trained).latents(trained["params"], seeds, _cond(np.full(2 * n, -1), age, sex))
  ch0 = z[..., 0].mean(axis=(1, 2, 3))
  assert abs(ch0[n:].mean() - ch0[:n].mean()) < 0.4, ch0
  assert 0.15 < ch0.mean() < 0.85, ch0   # a mixture of both classes, not one of them
  # Guidance on the label alone sharpens the difference (scale 3 > conditional).
  z = _gen(trained, guidance_scale=3.0, guidance_null="label").latents(trained["params"], seeds,
                                                                      _cond(label, age, sex))
  ch0 = z[..., 0].mean(axis=(1, 2, 3))
  assert ch0[n:].mean() - ch0[:n].mean() > diffs["ddim"] + 0.15


@pytest.mark.slow
def test_tabular_attributes_follow_training_and_keep_the_image_relation(trained):
  data = trained["data"]
  model = AttributeModel.fit(LABELS, data, trained["attrs"], "kde")
  plan = model.sample(600, seed=3)
  y = plan["label"]
  assert np.bincount(y).tolist() == [300, 300]   # exact training fractions
  for c in (0, 1):
    real = data["age"][data["label"] == c]
    assert stats.ks_2samp(plan["age"][y == c], real).pvalue > 0.01
    assert abs(plan["sex"][y == c].mean() - data["sex"][data["label"] == c].mean()) < 0.08
  assert len(set(plan["seed"].tolist())) == 600
  # Same seed, same subjects; requested fractions / ranges are honoured.
  again = model.sample(600, seed=3)
  assert all(np.array_equal(plan[k], again[k]) for k in plan)
  ask = model.sample(40, seed=1, label_fractions=np.array([0.25, 0.75]), ranges={"age": (60.0, 70.0)},
                     categorical_fractions={"sex": np.array([1.0, 0.0])})
  assert np.bincount(ask["label"]).tolist() == [10, 30]
  assert ask["age"].min() >= 60 and ask["age"].max() <= 70 and np.all(ask["sex"] == 0)

  # The image keeps its relation with the generated age: channel 1 follows (age - 72.5) / 10.
  sub = model.sample(32, seed=5)
  z = _gen(trained).latents(trained["params"], sub["seed"], {k: sub[k] for k in ("label", "age", "sex")})
  ch1 = z[..., 1].mean(axis=(1, 2, 3))
  r = np.corrcoef(sub["age"], ch1)[0, 1]
  slope = np.polyfit(sub["age"], ch1, 1)[0]
  assert r > 0.7 and 0.06 < slope < 0.14, (r, slope)


# ------------------------------------------------------------------------------ the stages


def stand_in_codec() -> LatentCodec:
  """Tokenizer stand-in for these tests only: 2x average pooling / nearest upsampling."""

  def encode(v, x):
    b, X, Y, Z, c = x.shape
    return x.reshape(b, X // 2, 2, Y // 2, 2, Z // 2, 2, c).mean(axis=(2, 4, 6)) * v["gain"]

  def decode(v, z):
    z = z / v["gain"]
    for axis in (1, 2, 3):
      z = jnp.repeat(z, 2, axis=axis)
    return z

  return LatentCodec(encode, decode, {"gain": jnp.float32(3.0)}, key="pool2", description="test stand-in")


def write_prepared(workdir: str, n: int = 24) -> None:
  """A prepared cohort (the data/cache.py contract) of 8x8x8 volumes whose block means carry the label."""
  root = os.path.join(workdir, "data")
  os.makedirs(os.path.join(root, "cache"))
  r = np.random.default_rng(0)
  rows = []
  for i in range(n):
    pid = f"sub-train{i:03d}"
    label = i % 2
    img = (0.5 + 0.3 * label + 0.1 * r.standard_normal((8, 8, 8, 1))).astype(np.float32)
    np.save(os.path.join(root, "cache", f"{pid}.npy"), img)
    rows.append(dict(participant_id=pid, session_id="", label=LABELS[label], label_index=label,
                     age=f"{r.uniform(55, 90):.1f}", sex="MF"[i % 3 == 0], split="val" if i >= n - 4 else "train",
                     image=f"cache/{pid}.npy", mask=""))
  pd.DataFrame(rows).to_csv(os.path.join(root, "cohort.tsv"), sep="\t", index=False)
  affine = np.diag([4.0, 4.0, 4.0, 1.0])
  affine[:3, 3] = -14.0
  meta = {"complete": True, "shape": [8, 8, 8], "spacing_mm": 4.0, "normalization": "percentile",
          "clip_percentiles": [0.5, 99.5], "channels": ["T1w"], "labels": LABELS, "affine": affine.tolist(),
          "config_hash": "toy", "cohort_tsv": os.path.join(workdir, "secret_cohort.tsv")}
  with open(os.path.join(root, "prepared.json"), "w") as f:
    json.dump(meta, f)


def tiny_ldm_config() -> ml_collections.ConfigDict:
  """The quickstart LDM block shrunk to one 8-channel level (compiles in seconds); shared with
  test_privacy_ldm.py."""
  c = ldm_config("quickstart")
  c.model.channels = (8,)
  c.model.attention_levels = (True,)
  c.model.num_head_channels = 8
  c.model.norm_num_groups = 4
  c.cond.token_dim = 16
  c.batch_size = 8
  return c


def stage_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = "ldm,sample"
  c.data = ml_collections.ConfigDict(dict(batch_size=4, shuffle_seed=0, labels="CN,AD"))
  c.ldm = tiny_ldm_config()
  c.ldm.train.update(dict(steps=6, warmup_steps=1, log_every=1, checkpoint_every=3))
  c.sample = sample_config("quickstart")
  c.sample.update(dict(num_subjects=10, batch_size=4, steps=4, guidance_scale=1.5))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c


def record(losses, step, metrics):
  if "loss" in metrics:   # train logs (eval logs carry eval/* only)
    losses.append((step, metrics["loss"]))


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory):
  base = tmp_path_factory.mktemp("stages")
  work = str(base / "work")
  write_prepared(work)
  config, codec = stage_config(), stand_in_codec()
  logs, losses = [], []
  meta = ldm_stage.run(config, work, codec=codec, log=logs.append, on_log=lambda s, m: record(losses, s, m))
  again = []
  ldm_stage.run(config, work, codec=codec, log=again.append)
  return dict(base=base, work=work, config=config, codec=codec, meta=meta, logs=logs, again=again, losses=losses)


def test_ldm_stage_caches_latents_and_skips_when_complete(stage_run):
  work, meta = stage_run["work"], stage_run["meta"]
  index = json.load(open(os.path.join(work, "ldm", "latents", "index.json")))
  z = np.load(os.path.join(work, "ldm", "latents", "train.npy"))
  assert z.shape == (20, 4, 4, 4, 1) and index["splits"]["val"]["n"] == 4
  assert not glob.glob(os.path.join(work, "ldm", "latents", "train_*.npy"))   # shards merged
  np.testing.assert_allclose(meta["scale_factor"], 1.0 / z.std(), rtol=1e-5)
  assert meta["complete"] and meta["step"] == 6 and meta["latent_shape"] == [4, 4, 4, 1]
  ages = [a for a in meta["attributes"] if a["name"] == "age"][0]
  assert 55 < ages["mean"] < 90 and ages["scale"] > 1
  assert any("skipping" in line for line in stage_run["again"]), stage_run["again"]


def test_ldm_training_resume_matches_straight_run(stage_run):
  # The straight run saved steps 3 and 6; a copy without step 6 (and without ldm.json) resumes at 3.
  work, config = stage_run["work"], stage_run["config"]
  other = str(stage_run["base"] / "resumed")
  os.makedirs(other)
  os.symlink(os.path.join(work, "data"), os.path.join(other, "data"))
  shutil.copytree(os.path.join(work, "ldm"), os.path.join(other, "ldm"))
  shutil.rmtree(os.path.join(other, "ldm", "checkpoints", "6"))
  os.remove(os.path.join(other, "ldm", "ldm.json"))
  losses = []
  config = copy.deepcopy(config)
  config.ldm.latents.splits = "train"   # no eval pass (one compile less); not part of the checkpoint's identity
  ldm_stage.run(config, other, codec=stage_run["codec"], log=lambda m: None, on_log=lambda s, m: record(losses, s, m))
  assert [s for s, _ in stage_run["losses"]] == [1, 2, 3, 4, 5, 6]
  assert losses == stage_run["losses"][3:]
  _, a = load_variables(os.path.join(work, "ldm", "checkpoints"))
  _, b = load_variables(os.path.join(other, "ldm", "checkpoints"))
  for x, y in zip(jax.tree.leaves(a["ema_params"]), jax.tree.leaves(b["ema_params"])):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _snapshot(folder: str) -> dict[str, bytes]:
  out = {}
  for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
    if os.path.isfile(path):
      out[os.path.relpath(path, folder)] = open(path, "rb").read()
  return out


class _Stop(Exception):
  pass


def test_sampling_resumes_and_same_seed_gives_same_subjects(stage_run):
  work, config, codec = stage_run["work"], stage_run["config"], stage_run["codec"]
  out = os.path.join(work, "synthetic")

  def stop_after_first_batch(done, total):
    raise _Stop()

  with pytest.raises(_Stop):
    sample_stage.run(config, work, codec=codec, on_progress=stop_after_first_batch, log=lambda m: None)
  first = sorted(glob.glob(os.path.join(out, "sub-*", "anat", "*.nii.gz")))
  assert len(first) == 4 and not os.path.exists(os.path.join(out, "participants.tsv"))
  mtimes = {f: os.stat(f).st_mtime_ns for f in first}
  os.remove(first[1])   # as if killed mid-batch: that batch is regenerated, its other files kept
  logs = []
  sample_stage.run(config, work, codec=codec, log=logs.append)
  assert len(glob.glob(os.path.join(out, "sub-*", "anat", "*.nii.gz"))) == 10
  for f, t in mtimes.items():
    if f != first[1]:
      assert os.stat(f).st_mtime_ns == t, f
  assert any("ETA" in line for line in logs) and any("s/volume" in line for line in logs[-1:])

  # A straight run in a fresh workdir with the same config and checkpoint: identical cohort.
  fresh = str(stage_run["base"] / "fresh")
  os.makedirs(fresh)
  for d in ("data", "ldm"):
    os.symlink(os.path.join(work, d), os.path.join(fresh, d))
  sample_stage.run(config, fresh, codec=codec, log=lambda m: None)
  a, b = _snapshot(out), _snapshot(os.path.join(fresh, "synthetic"))
  assert sorted(a) == sorted(b) and len(a) == 12
  for k in a:
    assert a[k] == b[k], k
  skip = []
  sample_stage.run(config, work, codec=codec, log=skip.append)
  assert any("skipping" in line for line in skip)


def test_synthetic_folder_is_bids_and_private(stage_run):
  work = stage_run["work"]
  out = os.path.join(work, "synthetic")
  if not os.path.exists(os.path.join(out, "participants.tsv")):
    sample_stage.run(stage_run["config"], work, codec=stage_run["codec"], log=lambda m: None)
  desc = json.load(open(os.path.join(out, "dataset_description.json")))
  assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
  gen = desc["GeneratedBy"][0]
  assert gen["Name"] == "synthmri_jax" and gen["Version"] and gen["CheckpointStep"] == 6
  assert gen["ConfigHash"] == workdir_lib.config_hash(stage_run["config"])
  table = pd.read_csv(os.path.join(out, "participants.tsv"), sep="\t", dtype=str)
  assert list(table.columns) == ["participant_id", "label", "age", "sex", "seed"]
  assert table["participant_id"].tolist() == [f"sub-synth{i:04d}" for i in range(1, 11)]
  assert set(table["label"]) <= set(LABELS) and set(table["sex"]) <= {"F", "M"}
  assert table["label"].value_counts().to_dict() == {"CN": 5, "AD": 5}   # the training split is 10 / 10
  affine = np.asarray(json.load(open(os.path.join(work, "data", "prepared.json")))["affine"])
  # Declared in the prepared space (so the study reads the volumes as written), and on its scale.
  assert desc["SynthmriPreparedSpace"] == load_prepared(work).space()
  for pid in table["participant_id"]:
    img = nib.load(os.path.join(out, pid, "anat", f"{pid}_T1w.nii.gz"))
    assert img.shape == (8, 8, 8) and np.allclose(img.affine, affine)
    assert 0.0 <= float(np.min(img.dataobj)) and float(np.max(img.dataobj)) <= 1.0
    h = img.header
    for field in ("descrip", "aux_file", "db_name", "intent_name"):
      assert h[field].item() in (b"", ""), (field, h[field])
  # No training subject id, no path of the workdir / source table anywhere, NIfTI payloads included.
  for rel, content in _snapshot(out).items():
    text = gzip.decompress(content) if rel.endswith(".gz") else content
    for needle in (b"sub-train", b"secret_cohort", work.encode(), b"/tmp", b"cache/"):
      assert needle not in text, (rel, needle)


def test_image_and_mask_pairs_are_written_together(stage_run):
  """A codec with a mask channel: every synthetic subject gets the decoded mask channel (> 0.5) as
  its *_mask.nii.gz, on the image's grid, with a sidecar and a mask_path column. The stand-in decodes
  its mask as (image > 0.65), so each written mask must equal its own subject's thresholded image."""
  work = str(stage_run["base"] / "mask_work")
  shutil.copytree(stage_run["work"], work, ignore=shutil.ignore_patterns("synthetic", "synthetic_state.json"))
  plain = stage_run["codec"]

  def decode(v, z):
    x = plain.decode(v, z)
    return jnp.concatenate([x, (x > 0.65).astype(x.dtype)], axis=-1)

  # The same encoder and key (the LDM's latents are the same); the decoder adds the mask channel.
  codec = LatentCodec(lambda v, x: plain.encode(v, x[..., :1]), decode, plain.variables, key=plain.key,
                      description="test stand-in + mask", mask_channel=True)
  sample_stage.run(stage_run["config"], work, codec=codec, log=lambda m: None)
  out = os.path.join(work, "synthetic")
  table = pd.read_csv(os.path.join(out, "participants.tsv"), sep="\t", dtype=str)
  assert list(table.columns) == ["participant_id", "label", "age", "sex", "seed", "mask_path"]
  resolved = synthetic_cohort.resolve_table(os.path.join(out, "participants.tsv"), ["T1w"])
  with_lesion = 0
  for pid, mask_path in zip(table["participant_id"], resolved["mask_path"]):
    image = nib.load(os.path.join(out, pid, "anat", f"{pid}_T1w.nii.gz"))
    mask = nib.load(mask_path)
    assert mask_path.endswith(f"{pid}/anat/{pid}_mask.nii.gz") and mask.get_data_dtype() == np.uint8
    assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), (np.asarray(image.dataobj) > 0.65).astype(np.uint8))
    with_lesion += bool(np.asarray(mask.dataobj).any())
    assert json.load(open(mask_path.replace(".nii.gz", ".json")))["Labels"] == {"0": "background", "1": "lesion"}
  assert 0 < with_lesion < len(table)       # AD latents sit near 0.8, CN near 0.5: some masks, not all


@pytest.mark.slow
def test_loss_attack_finds_a_tiny_ldm_that_memorised_8_latents(trained, tmp_path):
  """The membership attack against a real (tiny) LDM trained by the shared trainer: the module's
  model, fine-tuned to memorise 8 latents, is told from 64 unseen latents of the same distribution
  by its loss attack (AUC >= 0.9); the module's model itself, which saw none of the 72 (it trained
  on 128 others of the same distribution), tells nothing (AUC near 0.5)."""
  from synthmri_jax.evaluation import privacy
  data = toy_cohort(72, seed=5)
  member = np.zeros(72, bool)
  member[::9] = True                       # 4 CN, 4 AD
  members = {k: v[member] for k, v in data.items()}
  model, schedule = trained["model"], trained["schedule"]
  task = LDMTask(model, schedule, PRED, dropout_each=0.0, dropout_all=0.0)
  it = loader.train_iterator(loader.ArraySource(members), 8, seed=0)
  state = trainer.train(task, train_cfg(steps=100, warmup_steps=5), str(tmp_path / "memorise"), it,
                        init_from=trained["checkpoints"])
  apply = lambda p, x, t, c: model.apply({"params": p}, x, t, c)
  cond = lambda d: {k: d[k] for k in ("label", "age", "sex")}
  kw = dict(timesteps=(10, 30), noise_draws=2, pia_timestep=30, batch_size=8)

  def attack(params):
    """One scoring pass over all 72 latents; the noise is keyed by position."""
    s = privacy.diffusion_attack_scores(apply, schedule, params, data["latent"], cond(data), seed=0, **kw)
    split = lambda keep: {k: v[keep] for k, v in s.items()}
    return privacy.membership_inference(split(member), split(~member), kw["timesteps"], n_boot=200)["loss_attack"]

  memorised = attack(state.params)
  assert memorised["auc"] >= 0.9, memorised["auc"]
  assert abs(attack(trained["params"])["auc"] - 0.5) < 0.2
