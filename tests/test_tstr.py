"""The TSTR / TRTR study end to end on a tiny prepared cohort, its sanity checks, evaluation.json,
and the ingest of foreign synthetic cohort folders."""

import json
import os

import jax
import ml_collections
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from synthmri_jax.data import loader, nifti
from synthmri_jax.latents import LatentCodec
from synthmri_jax.pipeline import evaluate as evaluate_stage
from synthmri_jax.pipeline import prepare
from synthmri_jax.data.cache import load_prepared
from synthmri_jax.config_blocks import evaluate as config_lib
from synthmri_jax.evaluation import arms, codec_check, feature_weights, tstr
from synthmri_jax.evaluation.synthetic_cohort import load_synthetic
from synthmri_jax.evaluation.synthetic_cohort import (SyntheticCohortError, load_synthetic_cohort,
                                                      write_cohort_folder)

SOURCE_SHAPE, SPACING, GRID = (24, 24, 24), 2.0, (16, 16, 16)


@pytest.fixture(scope="module", autouse=True)
def _fast_init_compile():
  """jax's default partitionable threefry compiles each random-init op in ~5 s on this CPU
  (0.8 s without); the models and their numerics are otherwise the same."""
  with jax.threefry_partitionable(False):
    yield


def _subject(r: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray]:
  """A sphere 'brain' with a dark central 'ventricle' (larger for label 1, overlapping classes)
  and a bright 'lesion' blob at a random place (the mask)."""
  g = np.stack(np.meshgrid(*[np.arange(s) for s in SOURCE_SHAPE], indexing="ij"), -1).astype(np.float32)
  centre = np.array(SOURCE_SHAPE) / 2 - 0.5 + r.uniform(-1, 1, 3)
  d = np.sqrt(((g - centre) ** 2).sum(-1))
  img = np.where(d <= 6.5, 0.8, 0.0).astype(np.float32)
  vent = max(0.5, r.normal(1.6 + 1.0 * label, 0.45))
  img[d <= vent] = 0.25
  lc = centre + r.uniform(-3.5, 3.5, 3)
  lesion = (np.sqrt(((g - lc) ** 2).sum(-1)) <= r.uniform(1.5, 2.5)) & (d <= 6.0) & (d > vent + 0.5)
  img[lesion] = 1.3
  img = img + (d <= 6.5) * r.normal(0, 0.04, SOURCE_SHAPE).astype(np.float32)
  return img, lesion.astype(np.uint8)


def _write_real_cohort(root: str, n: int = 80) -> str:
  r = np.random.default_rng(0)
  affine = np.diag([SPACING] * 3 + [1.0])
  rows = []
  for i in range(n):
    label = i % 2
    img, mask = _subject(r, label)
    pid = f"sub-{i:04d}"
    os.makedirs(os.path.join(root, pid), exist_ok=True)
    nib.save(nib.Nifti1Image(img, affine), os.path.join(root, pid, "t1.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), os.path.join(root, pid, "mask.nii.gz"))
    rows.append(dict(participant_id=pid, path=f"{pid}/t1.nii.gz", mask_path=f"{pid}/mask.nii.gz",
                     label=["CN", "AD"][label], age=60 + i % 20, sex="MF"[i % 2]))
  path = os.path.join(root, "cohort.tsv")
  pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
  return path


def _config(table: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  d = c.data = ml_collections.ConfigDict()
  d.cohort_tsv, d.sequences, d.labels = table, "T1w", "CN,AD"
  d.spacing_mm, d.shape = SPACING, GRID
  d.normalization, d.clip_percentiles, d.on_bad_file = "percentile", (0.5, 99.5), "error"
  d.split_seed = 0
  d.split_fractions = ml_collections.ConfigDict(dict(train=0.45, val=0.1, test=0.4, holdout=0.05))
  d.num_workers = 1
  d.embedded = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  cls = c.classifier = config_lib.classifier_config()
  cls.model.channels, cls.model.norm_groups = (4, 8), 2
  cls.train.steps, cls.train.lr, cls.train.warmup_steps, cls.train.log_every = 60, 3e-3, 5, 30
  cls.segmenter.model.channels, cls.segmenter.model.norm_groups = (4, 8), 2
  cls.segmenter.train.steps, cls.segmenter.train.warmup_steps, cls.segmenter.train.log_every = 30, 5, 30
  ev = c.evaluate = config_lib.evaluate_config()
  ev.seeds, ev.arms, ev.real_fractions = 1, "TSTR,AUG", (0.1,)
  ev.n_boot, ev.fidelity_boot, ev.kid_subsets, ev.diversity_pairs, ev.num_workers = 300, 20, 10, 6, 1
  return c


@pytest.fixture(scope="module")
def prepared_workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("real")
  table = _write_real_cohort(str(root / "cohort"))
  workdir = str(root / "work")
  config = _config(table)
  prepare.run(config, workdir)
  return config, workdir


def _copy_of_train(workdir: str, folder: str, shuffle: bool = False, masks: bool = True) -> str:
  real = load_prepared(workdir)
  src = loader.CohortSource(real, "train")
  labels = [real.labels[int(src[i]["label"])] for i in range(len(src))]
  if shuffle:
    labels = list(np.random.default_rng(1).permutation(labels))
  write_cohort_folder(folder, [src[i]["image"] for i in range(len(src))], labels, real.affine,
                      masks=[src[i]["mask"] for i in range(len(src))] if masks else None)
  return folder


@pytest.fixture(scope="module")
def copy_study(prepared_workdir, tmp_path_factory):
  config, workdir = prepared_workdir
  config = ml_collections.ConfigDict(config.to_dict())
  config.evaluate.synthetic_dir = _copy_of_train(workdir, str(tmp_path_factory.mktemp("syn") / "copy"))
  return config, workdir, evaluate_stage.run(config, workdir)


@pytest.mark.slow
def test_copy_of_train_gives_tstr_close_to_trtr(copy_study):
  _, _, out = copy_study
  arms = out["classification"]["arms"]
  trtr, tstr_ = arms["TRTR"]["auc_over_seeds"]["mean"], arms["TSTR"]["auc_over_seeds"]["mean"]
  assert trtr > 0.75, trtr
  assert abs(tstr_ - trtr) < 0.1, (tstr_, trtr)
  assert abs(out["classification"]["comparisons"]["TSTR-TRTR"]["seed_mean_scores"]["delta"]) < 0.1


@pytest.mark.slow
def test_evaluation_json_keys_and_intervals(copy_study):
  _, workdir, out = copy_study
  with open(os.path.join(workdir, "evaluation", "evaluation.json")) as f:
    saved = json.load(f)
  assert saved["schema"] == tstr.SCHEMA and saved["synthetic"]["content_hash"] == out["synthetic"]["content_hash"]
  arms = saved["classification"]["arms"]
  assert set(arms) == {"TRTR", "TSTR", "AUG_0.1", "REAL_0.1"}
  for arm in arms.values():
    assert arm["n_seeds"] == 1 and arm["auc_over_seeds"]["n"] == 1
    for p in arm["per_seed"]:
      assert p["ci_low"] <= p["auc"] <= p["ci_high"] and p["unit"] == "subjects"
    e = arm["seed_mean_scores"]
    assert e["ci_low"] <= e["auc"] <= e["ci_high"] and e["n_seeds"] == 1
  # The 10 % arm: a stratified subject subsample, >= 1 per class; AUG adds every synthetic scan.
  n_real = arms["REAL_0.1"]["per_seed"][0]["n_train_real"]
  assert 2 <= n_real <= 0.1 * saved["real"]["n_train"] + 2
  assert arms["AUG_0.1"]["per_seed"][0]["n_train_synthetic"] == saved["synthetic"]["n"] == saved["real"]["n_train"]
  comps = saved["classification"]["comparisons"]
  assert set(comps) == {"TSTR-TRTR", "AUG_0.1-REAL_0.1", "AUG_0.1-TRTR"}
  for c in comps.values():
    e = c["seed_mean_scores"]
    assert e["ci_low"] <= e["delta"] <= e["ci_high"] and 0 <= e["p_value"] <= 1 and c["n_seeds"] == 1
  assert "value" in saved["classification"]["tstr_trtr_ratio"]
  fid = saved["fidelity"]
  for key in ("FD_trtr_classifier", "KID_trtr_classifier"):
    v = fid[key]["real_test_vs_synthetic"]
    assert v["ci_low"] <= v["ci_high"] and v["n_seeds"] == 1 and np.isfinite(v["value"])
  assert fid["FD_trtr_classifier"]["real_test_vs_synthetic"]["n_b"] == saved["synthetic"]["n"]
  div = fid["ms_ssim_diversity"]["channels"]["T1w"]
  assert 0 < div["synthetic"]["mean"] <= 1 and 0 < div["real_train"]["mean"] <= 1
  seg = saved["segmentation"]
  for name in ("SEG_real", "SEG_synthetic"):
    d = seg[name]["per_seed"][0]["dice"]
    assert d["ci_low"] <= d["mean"] <= d["ci_high"] and seg[name]["n_seeds"] == 1 and d["unit"] == "subjects"
    # Lesion-wise detection: the subject mean of each scan's detected share, from the run's own counts.
    det, fp = seg[name]["per_seed"][0]["lesions_detected"], seg[name]["per_seed"][0]["false_positives_per_scan"]
    found = json.load(open(os.path.join(workdir, "evaluation", "runs", name, "seed0", "result.json")))["test"]["detection"]
    share = [f["detected"] / f["lesions"] for f in found if f["lesions"]]
    assert det["mean"] == pytest.approx(np.mean(share)) and det["ci_low"] <= det["mean"] <= det["ci_high"]
    assert fp["mean"] == pytest.approx(np.mean([f["false_positives"] for f in found])) and fp["unit"] == "subjects"
  assert seg["delta_synthetic_minus_real"]["n_seeds"] == 1
  for arm in ("TRTR", "TSTR", "SEG_real"):
    assert os.path.exists(os.path.join(workdir, "evaluation", "runs", arm, "seed0", "result.json"))


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_user_extractor(copy_study, tmp_path):
  config, workdir, out = copy_study
  result = os.path.join(workdir, "evaluation", "runs", "TSTR", "seed0", "result.json")
  before = os.stat(result).st_mtime_ns
  config = ml_collections.ConfigDict(config.to_dict())
  config.evaluate.feature_weights = os.path.join(workdir, "evaluation", "runs", "REAL_0.1", "seed0")
  config.evaluate.feature_name = "real10"
  again = evaluate_stage.run(config, workdir)
  assert os.stat(result).st_mtime_ns == before
  assert again["classification"]["arms"]["TSTR"]["per_seed"] == out["classification"]["arms"]["TSTR"]["per_seed"]
  assert "FD_real10" in again["fidelity"] and "KID_real10" in again["fidelity"]
  bad = tmp_path / "weights.msgpack"
  bad.write_bytes(b"not a msgpack file")
  config.evaluate.feature_weights = str(bad)
  with pytest.raises(feature_weights.FeatureWeightsError, match="weights.msgpack"):
    evaluate_stage.run(config, workdir)


def _codec(template: np.ndarray | None) -> LatentCodec:
  """A stand-in codec: `decode(encode(x))` is x (identity), or one fixed scan for every scan."""
  decode = (lambda v, z: z) if template is None else (lambda v, z: jax.numpy.broadcast_to(template, z.shape))
  return LatentCodec(lambda v, x: x, decode, {}, key="identity" if template is None else "template")


@pytest.mark.slow
def test_codec_arm_trains_on_the_round_trips(copy_study, tmp_path):
  """Through a perfect codec the CODEC arm is TRTR again; another codec's round trips retrain it
  (its run key holds the round-trip cohort's hash) while TRTR is reused."""
  config, workdir, first = copy_study
  config = ml_collections.ConfigDict(config.to_dict())
  config.evaluate.arms = "TSTR,CODEC"
  real = load_prepared(workdir)
  one_scan = loader.CohortSource(real, "train")[0]["image"]
  syn = load_synthetic(config, workdir)
  keys, aucs = [], []
  for template in (None, one_scan):
    cohort = codec_check.round_trip_cohort(_codec(template), real, "train", str(tmp_path / "rt"),
                                           str(tmp_path / "cache"), log=lambda m: None)
    assert len(cohort) == len(real.split("train"))
    assert cohort.table["label"].tolist() == real.split("train")["label"].tolist()
    cls = tstr.Study(config, workdir, syn, codec_cohort=cohort).run()["classification"]
    assert cls["arms"]["CODEC"]["per_seed"][0]["n_train_codec"] == len(cohort)
    assert cls["arms"]["CODEC"]["per_seed"][0]["n_train_real"] == 0
    assert "CODEC-TRTR" in cls["comparisons"] and "value" in cls["codec_trtr_ratio"]
    assert cls["arms"]["TRTR"]["per_seed"] == first["classification"]["arms"]["TRTR"]["per_seed"]   # reused
    with open(os.path.join(workdir, "evaluation", "runs", "CODEC", "seed0", "result.json")) as f:
      keys.append(json.load(f)["key"])
    aucs.append(cls["arms"]["CODEC"]["auc_over_seeds"]["mean"])
  trtr = first["classification"]["arms"]["TRTR"]["auc_over_seeds"]["mean"]
  assert abs(aucs[0] - trtr) < 0.1, (aucs, trtr)     # the identity codec: the real train scans again
  assert keys[0] != keys[1]                          # one scan for all: a different training set, retrained


@pytest.mark.slow
def test_shuffled_labels_give_chance_tstr(copy_study, tmp_path):
  config, workdir, first = copy_study
  config = ml_collections.ConfigDict(config.to_dict())
  config.evaluate.synthetic_dir = _copy_of_train(workdir, str(tmp_path / "shuffled"), shuffle=True, masks=False)
  config.evaluate.arms = "TSTR"
  out = evaluate_stage.run(config, workdir)
  arms = out["classification"]["arms"]
  assert arms["TRTR"]["per_seed"] == first["classification"]["arms"]["TRTR"]["per_seed"]   # reused, not retrained
  auc = arms["TSTR"]["auc_over_seeds"]["mean"]
  assert abs(auc - 0.5) < 0.2, auc
  assert arms["TRTR"]["auc_over_seeds"]["mean"] - auc > 0.2
  assert out["segmentation"] == {"skipped": "the synthetic cohort has no masks"}


def _anatomy(world: np.ndarray, shift: np.ndarray) -> np.ndarray:
  """An asymmetric toy head defined in world mm, so any grid can sample the same object."""
  p = world - shift
  inside = (p[..., 0] / 15) ** 2 + (p[..., 1] / 12) ** 2 + (p[..., 2] / 10) ** 2 <= 1
  v = inside * (0.7 + 0.1 * p[..., 0] / 15 + 0.05 * np.sin(p[..., 1] / 3.0))
  v = np.where(inside & (p[..., 0] > 3) & (p[..., 1] > 2) & (p[..., 2] > 0), 1.2, v)
  return np.where(inside & (p[..., 0] < -6) & (np.abs(p[..., 1]) < 4), 0.3, v).astype(np.float32)


def _sampled(n: int, spacing: float, shift: np.ndarray) -> nib.Nifti1Image:
  affine = np.diag([spacing] * 3 + [1.0])
  affine[:3, 3] = -spacing * (n - 1) / 2
  ijk = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1)
  return nib.Nifti1Image(_anatomy(ijk * spacing + affine[:3, 3], shift), affine)


def test_foreign_folder_is_ingested_onto_the_grid(prepared_workdir, tmp_path):
  """A generator's folder stored LPS, at 3 mm, as scaled int16, with BIDS names and no path
  column, lands on the prepared grid exactly as the same volumes stored RAS float32 do, and
  matches the 2 mm original put through the real data's preprocessing."""
  _, workdir = prepared_workdir
  real = load_prepared(workdir)
  plain, foreign, refs, rows = tmp_path / "plain", tmp_path / "foreign", [], []
  for i in range(3):
    shift = np.random.default_rng(i).uniform(-3, 3, 3)
    ref_path = str(tmp_path / f"ref{i}.nii.gz")
    nib.save(_sampled(24, 2.0, shift), ref_path)
    refs.append(nifti.preprocess([ref_path], None, shape=real.shape, spacing_mm=2.0).image)
    img3 = _sampled(16, 3.0, shift)
    pid = f"sub-gen{i:03d}"
    os.makedirs(plain / pid)
    nib.save(img3, str(plain / pid / "t1.nii.gz"))
    lps = img3.as_reoriented(nib.orientations.axcodes2ornt("LPS"))
    stored = nib.Nifti1Image(np.round(np.asarray(lps.dataobj) / 1e-3).astype(np.int16), lps.affine)
    stored.header.set_slope_inter(1e-3, 0.0)
    os.makedirs(foreign / pid / "anat")
    nib.save(stored, str(foreign / pid / "anat" / f"{pid}_T1w.nii.gz"))
    rows.append(dict(participant_id=pid, label=["CN", "AD"][i % 2], age=70, sex="F", seed=i))
  pd.DataFrame(rows).to_csv(foreign / "participants.tsv", sep="\t", index=False)
  pd.DataFrame([dict(r, path=f"{r['participant_id']}/t1.nii.gz") for r in rows]).to_csv(
      plain / "participants.tsv", sep="\t", index=False)
  cache = str(tmp_path / "cache")
  syn = load_synthetic_cohort(str(foreign), real, cache)
  ras = load_synthetic_cohort(str(plain), real, cache)
  assert len(syn) == 3 and not syn.has_masks and list(syn.labels) == [0, 1, 0] and syn.key != ras.key
  for i in range(3):
    x, y = syn.source()[i]["image"], ras.source()[i]["image"]
    assert x.shape == GRID + (1,) and np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1
    assert np.abs(x - y).max() < 0.02
    corr = lambda a, b: np.corrcoef(a.ravel(), b.ravel())[0, 1]
    assert corr(x, refs[i]) > 0.6 and corr(x, refs[i]) > corr(x, refs[i][::-1]) + 0.15
  assert load_synthetic_cohort(str(foreign), real, cache).key == syn.key   # cached
  with open(foreign / "participants.tsv", "a") as f:
    f.write("sub-gen999\tCN\t70\tF\t9\n")
  with pytest.raises(SyntheticCohortError, match="sub-gen999_T1w.nii.gz.*file not found"):
    load_synthetic_cohort(str(foreign), real, cache)
  skipped = load_synthetic_cohort(str(foreign), real, cache, on_bad_file="skip")
  assert len(skipped) == 3 and skipped.n_skipped == 1 and skipped.key != syn.key


def test_volumes_declared_in_the_prepared_space_are_read_as_written(prepared_workdir, tmp_path):
  """A generator's output on the study grid and scale must reach the classifier as written. Run
  through the preprocessing again it would not (percentile normalisation is not idempotent: a
  prepared scan's foreground p0.5 is well above 0), which is what the declaration avoids."""
  _, workdir = prepared_workdir
  real = load_prepared(workdir)
  src = loader.CohortSource(real, "test")
  images = [src[i]["image"] for i in range(4)]
  images[0] = images[0] * 1.2 - 0.1          # out of the [0, 1] scale: clipped, like nifti.normalize does
  # Like a prepared quickstart scan: its darkest foreground voxels sit near 0.3, not at 0.
  images[1] = np.where(nifti.foreground_mask(images[1][..., 0])[..., None], 0.3 + 0.7 * images[1], 0.0)
  labels = [real.labels[int(src[i]["label"])] for i in range(4)]
  declared = str(tmp_path / "declared")
  write_cohort_folder(declared, images, labels, real.affine, space=real.space())
  plain = str(tmp_path / "plain")
  write_cohort_folder(plain, images, labels, real.affine)
  log = []
  a = load_synthetic_cohort(declared, real, str(tmp_path / "c"), log=log.append)
  b = load_synthetic_cohort(plain, real, str(tmp_path / "c"), log=lambda m: None)
  assert any("as they are" in m for m in log) and a.prepared.meta["read_as_is"] and not b.prepared.meta["read_as_is"]
  for i in range(4):
    x, y = a.source()[i]["image"], b.source()[i]["image"]
    np.testing.assert_array_equal(x, np.clip(images[i], 0, 1).astype(np.float32))
    if i == 1:
      assert np.abs(y - x).max() > 0.2    # a second normalisation stretches its contrast
  # Declared for another study's grid: preprocessed like any foreign volume, and said so.
  other = dict(real.space(), spacing_mm=1.0)
  moved = str(tmp_path / "other")
  write_cohort_folder(moved, images, labels, real.affine, space=other)
  log = []
  c = load_synthetic_cohort(moved, real, str(tmp_path / "c"), log=log.append)
  assert not c.prepared.meta["read_as_is"] and any("another prepared space" in m for m in log)
  # Declared, but a volume is off the grid: the error names the file.
  bad = str(tmp_path / "bad")
  write_cohort_folder(bad, [images[0][:-2]] + images[1:], labels, real.affine, space=real.space())
  with pytest.raises(nifti.VolumeError, match=r"sub-synth0001_T1w.nii.gz.*declared in the prepared space.*\(14, 16, 16\)"):
    load_synthetic_cohort(bad, real, str(tmp_path / "c"), log=lambda m: None)


def test_bad_folders_name_the_problem(prepared_workdir, tmp_path):
  _, workdir = prepared_workdir
  real = load_prepared(workdir)
  with pytest.raises(SyntheticCohortError, match="does not exist"):
    load_synthetic_cohort(str(tmp_path / "nowhere"), real, str(tmp_path / "c"))
  (tmp_path / "nolabel").mkdir()
  pd.DataFrame([dict(participant_id="sub-1", age=70, sex="F")]).to_csv(tmp_path / "nolabel" / "participants.tsv",
                                                                      sep="\t", index=False)
  with pytest.raises(SyntheticCohortError, match="missing required column.*label"):
    load_synthetic_cohort(str(tmp_path / "nolabel"), real, str(tmp_path / "c"))


def test_subsample_is_stratified_subject_level():
  table = pd.DataFrame({"participant_id": [f"p{i // 2}" for i in range(40)],   # 2 sessions each
                        "label_index": [(i // 2) % 2 for i in range(40)]})
  idx = arms.subsample_real(table, 0.01, seed=3)
  chosen = table.iloc[idx]
  assert sorted(chosen["label_index"].unique()) == [0, 1]
  assert chosen.groupby("participant_id").size().eq(2).all() and chosen["participant_id"].nunique() == 2
  idx10 = arms.subsample_real(table, 0.5, seed=3)
  assert table.iloc[idx10]["participant_id"].nunique() == 10
  assert not np.array_equal(idx10, arms.subsample_real(table, 0.5, seed=4))
  assert len(arms.subsample_real(table, 1.0, seed=0)) == 40
