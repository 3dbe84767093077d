"""The 'prepare' stage on a tiny synthetic cohort: outputs per the cache contract, error and
skip modes, resume after a crash without redoing finished scans, stale-config refusal."""

import importlib.util
import json
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from synthmri_jax.data import cache, cohort, ingest, nifti
from synthmri_jax.pipeline import prepare

AFFINE = np.array([[-2.0, 0, 0, 30], [0, 2.0, 0, -36], [0, 0, 2.0, -24], [0, 0, 0, 1]])   # LAS, 2 mm


def quickstart(repo_root):
  spec = importlib.util.spec_from_file_location("quickstart", os.path.join(repo_root, "configs", "quickstart.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def make_cohort(root, n=10, bad=0, seed=0):
  """n participants (alternating CN/AD; the first has two sessions), each with a lesion mask;
  `bad` extra rows point at missing files."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  rows = []
  for i in range(n):
    for ses in range(2 if i == 0 else 1):
      data = np.zeros((30, 36, 28), np.float32)
      c = np.array([15, 18, 14]) + rng.integers(-2, 3, 3)
      g = np.indices(data.shape) - c[:, None, None, None]
      head = (g[0] / 11.0) ** 2 + (g[1] / 14.0) ** 2 + (g[2] / 10.0) ** 2 < 1
      data[head] = rng.normal(100 + 5 * i, 5, head.sum())
      lesion = (g ** 2).sum(0) < 9
      data[lesion] = 250
      name = f"sub-{i:02d}_ses-{ses}"
      nib.save(nib.Nifti1Image(data, AFFINE), os.path.join(root, f"{name}_T1w.nii.gz"))
      nib.save(nib.Nifti1Image(lesion.astype(np.uint8), AFFINE), os.path.join(root, f"{name}_mask.nii.gz"))
      rows.append(dict(participant_id=f"sub-{i:02d}", session_id=f"ses-{ses}", path=f"{name}_T1w.nii.gz",
                       mask_path=f"{name}_mask.nii.gz", label="AD" if i % 2 else "CN", age=60 + i, sex="MF"[i % 2]))
  for j in range(bad):
    rows.append(dict(participant_id=f"bad-{j}", session_id="", path=f"gone-{j}.nii.gz", mask_path="",
                     label="CN", age=70, sex="F"))
  table = os.path.join(root, "participants.tsv")
  pd.DataFrame(rows).to_csv(table, sep="\t", index=False)
  return table


@pytest.fixture
def config(repo_root, tmp_path):
  c = quickstart(repo_root)
  c.data.cohort_tsv = make_cohort(str(tmp_path / "bids"))
  c.data.shape = (16, 16, 16)
  c.data.spacing_mm = 3.0
  c.data.num_workers = 0
  return c


def test_prepare_writes_the_cache_contract(config, tmp_path):
  workdir = str(tmp_path / "run")
  meta = prepare.run(config, workdir)
  prepared = cache.load_prepared(workdir)
  t = prepared.table
  assert list(t.columns) == list(cache.TABLE_COLUMNS) and len(t) == 11
  assert prepared.shape == (16, 16, 16) and prepared.channels == ["T1w"] and prepared.labels == ["CN", "AD"]
  assert prepared.has_masks and meta["complete"] and meta["config_hash"] == prepared.meta["config_hash"]
  assert sum(meta["splits"].values()) == 11 and meta["n_participants"] == 10
  assert meta["split_participants"] == dict(train=6, val=1, test=2, holdout=1)   # 10 x (.6, .1, .15, .15)
  assert t.groupby("participant_id")["split"].nunique().max() == 1
  assert set(t["sex"]) == {"M", "F"} and (t["label_index"] == (t["label"] == "AD")).all()
  np.testing.assert_allclose(prepared.affine, nifti.centred_affine((16, 16, 16), 3.0))
  for r in t.to_dict("records"):
    image, mask = prepared.load_image(r), prepared.load_mask(r)
    assert image.dtype == np.float32 and image.shape == (16, 16, 16, 1) and mask.dtype == np.uint8
    assert image.min() == 0.0 and image.max() == 1.0
    assert image[..., 0][mask == 1].mean() > 0.9              # the lesion mask sits on the bright lesion
  # The cached arrays are exactly what the NIfTI layer computes for the row.
  r = t.iloc[3]
  bids = os.path.dirname(config.data.cohort_tsv)
  src = f"{r['participant_id']}_{r['session_id']}"
  want = nifti.preprocess([os.path.join(bids, f"{src}_T1w.nii.gz")], os.path.join(bids, f"{src}_mask.nii.gz"),
                          shape=(16, 16, 16), spacing_mm=3.0)
  np.testing.assert_array_equal(prepared.load_image(r), want.image)
  np.testing.assert_array_equal(prepared.load_mask(r), want.mask)


def test_error_mode_lists_every_bad_row_and_writes_nothing(config, tmp_path):
  config.data.cohort_tsv = make_cohort(str(tmp_path / "bids2"), n=4, bad=3)
  workdir = str(tmp_path / "run")
  with pytest.raises(cohort.CohortError) as e:
    prepare.run(config, workdir)
  for j in range(3):
    assert os.path.join(str(tmp_path / "bids2"), f"gone-{j}.nii.gz") in str(e.value)
  assert not os.path.exists(os.path.join(workdir, "data", "prepared.json"))
  assert not os.path.exists(os.path.join(workdir, "data", "cache"))


def test_skip_mode_drops_bad_rows_and_lists_them(config, tmp_path):
  config.data.cohort_tsv = make_cohort(str(tmp_path / "bids2"), n=4, bad=2)
  config.data.on_bad_file = "skip"
  workdir = str(tmp_path / "run")
  meta = prepare.run(config, workdir)
  bad = pd.read_csv(os.path.join(workdir, "data", "bad_files.tsv"), sep="\t", keep_default_na=False)
  assert bad["participant_id"].tolist() == ["bad-0", "bad-1"]
  assert bad["file"].tolist() == [os.path.join(str(tmp_path / "bids2"), f"gone-{j}.nii.gz") for j in range(2)]
  assert (bad["problem"].str.contains("file not found")).all()
  assert meta["n_bad_rows"] == 2 and len(cache.load_prepared(workdir).table) == 5


def _mtimes(workdir):
  d = os.path.join(workdir, "data", "cache")
  return {n: os.stat(os.path.join(d, n)).st_mtime_ns for n in os.listdir(d)}


@pytest.mark.parametrize("sequences", ["T1w,mask", "T1w,T1w"])
def test_a_sequence_named_mask_or_given_twice_is_refused_before_anything_is_written(config, tmp_path, sequences):
  config.data.sequences = sequences
  workdir = str(tmp_path / "run")
  with pytest.raises(ValueError, match="names must be distinct, and 'mask' is the lesion mask's"):
    prepare.run(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "data"))


def test_resume_after_a_crash_redoes_only_the_missing_scans(config, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  real = ingest.process_row
  calls = []

  def crash_after_4(task):
    if len(calls) == 4:
      raise KeyboardInterrupt("killed")
    calls.append(task["index"])
    return real(task)

  monkeypatch.setattr(ingest, "process_row", crash_after_4)
  with pytest.raises(KeyboardInterrupt):
    prepare.run(config, workdir)
  meta = json.load(open(os.path.join(workdir, "data", "prepared.json")))
  assert meta["complete"] is False
  with pytest.raises(FileNotFoundError, match="run the 'prepare' stage"):
    cache.load_prepared(workdir)
  before = _mtimes(workdir)
  assert len([n for n in before if n.endswith(".image.npy")]) == 4
  # What a SIGKILL mid-write would leave: a temp file. The rerun must not trip over it.
  open(os.path.join(workdir, "data", "cache", ".x.image.npy.abc.tmp.npy"), "wb").write(b"half")

  redone = []
  monkeypatch.setattr(ingest, "process_row", lambda task: redone.append(task["index"]) or real(task))
  prepare.run(config, workdir)
  assert len(redone) == 11 - 4 and not set(redone) & set(calls)
  after = _mtimes(workdir)
  assert all(after[n] == t for n, t in before.items() if not n.startswith("."))   # finished ones untouched
  assert not any(n.startswith(".") for n in after)
  prepared = cache.load_prepared(workdir)
  assert len(prepared.table) == 11

  # A complete cohort: a rerun does nothing and changes nothing.
  outputs = [os.path.join(workdir, "data", n) for n in ("cohort.tsv", "prepared.json")]
  stamps = [os.stat(p).st_mtime_ns for p in outputs]
  redone.clear()
  prepare.run(config, workdir)
  assert redone == [] and _mtimes(workdir) == after
  assert [os.stat(p).st_mtime_ns for p in outputs] == stamps


def test_changed_data_config_is_refused_but_loader_fields_are_not(config, tmp_path):
  workdir = str(tmp_path / "run")
  prepare.run(config, workdir)
  config.data.batch_size = 2
  config.data.intensity_jitter = 0.0
  prepare.run(config, workdir)                       # loader-only changes reuse the cache
  config.data.spacing_mm = 4.0
  with pytest.raises(prepare.StaleCacheError, match=r"spacing_mm: 3\.0 -> 4\.0"):
    prepare.run(config, workdir)
  config.data.spacing_mm = 3.0
  with open(config.data.cohort_tsv, "a") as f:
    f.write("sub-99\tses-0\tsub-01_ses-0_T1w.nii.gz\t\tCN\t70\tF\n")
  with pytest.raises(prepare.StaleCacheError, match="content changed"):
    prepare.run(config, workdir)


def test_two_worker_processes_give_the_same_cache(config, tmp_path):
  config.data.cohort_tsv = make_cohort(str(tmp_path / "bids3"), n=4)
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  prepare.run(config, a)
  config.data.num_workers = 2
  prepare.run(config, b)
  pa, pb = cache.load_prepared(a), cache.load_prepared(b)
  pd.testing.assert_frame_equal(pa.table, pb.table)
  for r in pa.table.to_dict("records"):
    np.testing.assert_array_equal(pa.load_image(r), pb.load_image(r))
    np.testing.assert_array_equal(pa.load_mask(r), pb.load_mask(r))


def test_prepare_caches_the_embedded_sequences_as_channels_in_order(repo_root, tmp_path):
  """data.sequences = T1w,T2w,FLAIR on the embedded cohort: one cache channel per sequence, in the
  order named, each what preprocessing its own file gives, and with the sequences' contrasts
  (T2w brightest where T1w is darkest inside the brain; FLAIR not)."""
  c = quickstart(repo_root)
  c.data.sequences = "T1w,T2w,FLAIR"
  c.data.embedded.update(dict(num_subjects=6, spacing_mm=6.0, lesions=True, vary_storage=True))
  c.data.update(dict(shape=(28, 32, 28), spacing_mm=6.0, num_workers=0))
  workdir = str(tmp_path / "seq")
  prepare.run(c, workdir)
  prepared = cache.load_prepared(workdir)
  assert prepared.channels == ["T1w", "T2w", "FLAIR"] and prepared.has_masks
  table = pd.read_csv(os.path.join(workdir, "embedded", "participants.tsv"), sep="\t")
  root = os.path.join(workdir, "embedded")
  for r in prepared.table.to_dict("records")[:2]:
    row = table[table["participant_id"] == r["participant_id"]].iloc[0]
    own = nifti.preprocess([os.path.join(root, row[f"path_{q}"]) for q in prepared.channels],
                           os.path.join(root, row["mask_path"]), shape=(28, 32, 28), spacing_mm=6.0)
    image = prepared.load_image(r)
    np.testing.assert_allclose(image, own.image, atol=1e-6)
    brain = image[..., 0] > 0
    t1, t2, flair = (image[..., k][brain] for k in range(3))
    dark = t1 < np.percentile(t1, 10)          # CSF-like in T1w
    assert t2[dark].mean() > t2[~dark].mean() + 0.1 and flair[dark].mean() < flair[~dark].mean()
