"""Cohort table: reading, every validation error reported at once, subject-level splits."""

import gzip
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from synthmri_jax.data import cohort
from synthmri_jax.data.cache import SPLITS

AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])


def volume(path, shape=(12, 12, 12), affine=AFFINE, fill=None, dtype=np.float32, seed=0):
  """A small 'head' (a bright cube on a dark background) unless `fill` overrides the voxels."""
  if fill is None:
    data = np.zeros(shape, np.float32)
    inner = tuple(slice(s // 4, s - s // 4) if s > 1 else slice(None) for s in shape[:3])
    data[inner] = 100 + np.random.default_rng(seed).normal(0, 5, data[inner].shape)
  else:
    data = np.broadcast_to(np.asarray(fill, np.float32), shape).copy()
  img = nib.Nifti1Image(data.astype(dtype), affine)
  img.header.set_data_dtype(dtype)
  nib.save(img, str(path))
  return os.path.basename(str(path))


def write_table(path, rows, sep="\t", encoding="utf-8"):
  pd.DataFrame(rows).to_csv(path, sep=sep, index=False, encoding=encoding)
  return str(path)


def row(pid, path, label="CN", age="70", sex="F", **extra):
  return dict(participant_id=pid, path=path, label=label, age=age, sex=sex, **extra)


def bad_cohort(tmp_path):
  """(rows, {line: (file, expected problem text)}): one row per validation error, plus good rows."""
  d = tmp_path
  good_mask = np.zeros((12, 12, 12), np.uint8)
  good_mask[5:7, 5:7, 5:7] = 1
  nib.save(nib.Nifti1Image(good_mask, AFFINE), str(d / "mask_ok.nii.gz"))
  nib.save(nib.Nifti1Image(good_mask[:10], AFFINE), str(d / "mask_shape.nii.gz"))
  nib.save(nib.Nifti1Image(good_mask, np.diag([3.0, 3.0, 3.5, 1.0])), str(d / "mask_affine.nii.gz"))
  nib.save(nib.Nifti1Image(good_mask.astype(np.float32) * 0.5, AFFINE), str(d / "mask_frac.nii.gz"))
  raw = open(d / volume(d / "src.nii.gz"), "rb").read()
  open(d / "truncated.nii.gz", "wb").write(raw[: len(raw) // 2])
  open(d / "garbage.nii.gz", "wb").write(gzip.compress(b"this is not a nifti file" * 20))
  nan = np.zeros((12, 12, 12), np.float32)
  nan[3:9, 3:9, 3:9] = 100
  nan[0, 0, 0] = np.nan
  inf = nan.copy()
  inf[0, 0, 0] = np.inf
  cases = [
      # (row, bad file or None for a good row, expected problem)
      (row("sub-01", volume(d / "ok1.nii.gz")), None, None),
      (row("sub-02", volume(d / "ok2.nii.gz", seed=1), label="AD", mask_path="mask_ok.nii.gz"), None, None),
      (row("sub-03", volume(d / "ok4d.nii.gz", shape=(12, 12, 12, 1))), None, None),  # singleton 4D: fine
      (row("sub-04", "missing.nii.gz"), "missing.nii.gz", "file not found"),
      (row("sub-05", "truncated.nii.gz"), "truncated.nii.gz", "corrupt"),
      (row("sub-06", "garbage.nii.gz"), "garbage.nii.gz", "corrupt"),
      (row("sub-07", volume(d / "flat.nii.gz", shape=(12, 12))), "flat.nii.gz", "2D"),
      (row("sub-08", volume(d / "slab.nii.gz", shape=(12, 12, 1))), "slab.nii.gz", "2D"),
      (row("sub-09", volume(d / "fmri.nii.gz", shape=(12, 12, 12, 3))), "fmri.nii.gz", "4D"),
      (row("sub-10", volume(d / "nan.nii.gz", fill=nan)), "nan.nii.gz", "1 NaN and 0 Inf"),
      (row("sub-11", volume(d / "inf.nii.gz", fill=inf)), "inf.nii.gz", "0 NaN and 1 Inf"),
      (row("sub-12", volume(d / "zeros.nii.gz", fill=0)), "zeros.nii.gz", "empty foreground"),
      (row("sub-13", volume(d / "const.nii.gz", fill=7)), "const.nii.gz", "empty foreground"),
      (row("sub-14", volume(d / "lab.nii.gz"), label="MCI"), "lab.nii.gz", "unknown label 'MCI'"),
      (row("sub-15", volume(d / "dup.nii.gz")), "dup.nii.gz", "duplicate path"),
      (row("sub-16", "dup.nii.gz"), "dup.nii.gz", "duplicate path"),
      (row("sub-17", volume(d / "m1.nii.gz"), mask_path="mask_shape.nii.gz"), "mask_shape.nii.gz", "does not match"),
      (row("sub-18", volume(d / "m2.nii.gz"), mask_path="mask_affine.nii.gz"), "mask_affine.nii.gz", "affine differs"),
      (row("sub-19", volume(d / "m3.nii.gz"), mask_path="mask_frac.nii.gz"), "mask_frac.nii.gz", "non-integer"),
      (row("sub-20", volume(d / "age.nii.gz"), age="seventy"), "age.nii.gz", "bad age 'seventy'"),
      (row("sub-21", volume(d / "age2.nii.gz"), age="nan"), "age2.nii.gz", "bad age 'nan'"),
      (row("sub-22", volume(d / "sex.nii.gz"), sex="X"), "sex.nii.gz", "bad sex 'X'"),
      (row("sub-23", volume(d / "split.nii.gz"), split="training"), "split.nii.gz", "bad split 'training'"),
      (row("sub-24", "", mask_path=""), None, "empty path_T1w"),
      (row("sub-25", volume(d / "sesA.nii.gz")), "sesA.nii.gz", "duplicate participant_id"),
      (row("sub-25", volume(d / "sesB.nii.gz")), "sesB.nii.gz", "duplicate participant_id"),
  ]
  rows = []
  for r, _, _ in cases:
    rows.append({"split": "", "mask_path": "", **r})
  expected = {i + 2: (f, p) for i, (_, f, p) in enumerate(cases) if p}
  return rows, expected


def test_every_bad_row_is_reported_at_once_with_its_file(tmp_path):
  rows, expected = bad_cohort(tmp_path)
  table = write_table(tmp_path / "participants.tsv", rows)
  df = cohort.read_cohort(table, ["T1w"])
  good, problems = cohort.validate(df, ["CN", "AD"])
  assert sorted(good["participant_id"]) == ["sub-01", "sub-02", "sub-03"]
  assert {p.line for p in problems} == set(expected)
  for line, (file, text) in expected.items():
    mine = [p for p in problems if p.line == line]
    assert any(text in p.problem for p in mine), (line, text, [str(p) for p in mine])
    if file:
      assert any(p.file == str(tmp_path / file) and text in p.problem for p in mine), (line, [str(p) for p in mine])
  err = cohort.CohortError(table, problems)
  assert isinstance(err, ValueError)
  message = str(err)
  assert f"in {len(expected)} row(s)" in message and "data.on_bad_file=skip" in message
  for line, (file, _) in expected.items():
    assert f"line {line} " in message
    if file:
      assert str(tmp_path / file) in message
  # The good rows are typed.
  assert good["age"].dtype == float and set(good["sex"]) == {"F"}
  assert good.set_index("participant_id").loc["sub-02", "label_index"] == 1


def test_missing_columns_are_one_table_error(tmp_path):
  table = write_table(tmp_path / "t.tsv", [dict(participant_id="a", label="CN", sex="M")])
  with pytest.raises(cohort.CohortError) as e:
    cohort.read_cohort(table, ["T1w"])
  assert "age" in str(e.value) and "path_T1w (or path)" in str(e.value) and table in str(e.value)
  table = write_table(tmp_path / "t2.tsv", [dict(participant_id="a", label="CN", sex="M", age=1, path_T1w="x")])
  with pytest.raises(cohort.CohortError, match="path_FLAIR"):
    cohort.read_cohort(table, ["T1w", "FLAIR"])
  with pytest.raises(cohort.CohortError, match="cohort table not found"):
    cohort.read_cohort(str(tmp_path / "nope.tsv"), ["T1w"])


def test_csv_with_bom_multi_sequence_and_paths_relative_to_the_table(tmp_path):
  sub = tmp_path / "study"
  (sub / "anat").mkdir(parents=True)
  volume(sub / "anat" / "t1.nii.gz")
  volume(sub / "anat" / "flair.nii.gz", seed=2)
  table = write_table(sub / "participants.csv", [dict(participant_id="p1", session_id="bl", path_T1w="anat/t1.nii.gz",
                                                     path_FLAIR=str(sub / "anat" / "flair.nii.gz"), label="AD",
                                                     age="71.5", sex="male")], sep=",", encoding="utf-8-sig")
  assert open(table, "rb").read(3) == b"\xef\xbb\xbf"                 # a spreadsheet export's BOM
  df = cohort.read_cohort(table, ["T1w", "FLAIR"])
  assert df.loc[0, "path_T1w"] == str(sub / "anat" / "t1.nii.gz")
  assert df.loc[0, "path_FLAIR"] == str(sub / "anat" / "flair.nii.gz")
  good, problems = cohort.validate(df, ["CN", "AD"])
  assert problems == [] and good.loc[0, "sex"] == "M" and good.loc[0, "age"] == 71.5
  assert good.loc[0, "session_id"] == "bl" and good.loc[0, "label_index"] == 1


def test_inspection_memo_skips_unchanged_files(tmp_path, monkeypatch):
  path = str(tmp_path / volume(tmp_path / "a.nii.gz"))
  memo = {}
  first = cohort.inspect_files([(path, "image")], memo=memo)
  calls = []
  monkeypatch.setattr(cohort, "inspect_file", lambda p, k: calls.append(p) or {"problems": ["x"]})
  assert cohort.inspect_files([(path, "image")], memo=memo) == first and calls == []
  volume(tmp_path / "a.nii.gz", seed=5)
  os.utime(path, ns=(1, 1))         # a changed file is inspected again
  assert cohort.inspect_files([(path, "image")], memo=memo)[(path, "image")] == {"problems": ["x"]}
  assert calls == [path]


# ------------------------------------------------------------------------------ splits

FRACTIONS = dict(train=0.6, val=0.1, test=0.15, holdout=0.15)


def split_frame(n_cn=70, n_ad=30, seed=0):
  """Participants with 1-3 sessions each, imbalanced labels (no files needed for splitting)."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n_cn + n_ad):
    label = "CN" if i < n_cn else "AD"
    for s in range(int(rng.integers(1, 4))):
      rows.append(dict(participant_id=f"sub-{i:03d}", session_id=f"ses-{s}", label=label,
                       label_index=int(label == "AD"), split=""))
  return pd.DataFrame(rows)


def test_splits_are_subject_level_stratified_and_seeded():
  df = split_frame()
  out = cohort.assign_splits(df, FRACTIONS, seed=3)
  per_participant = out.groupby("participant_id")["split"].nunique()
  assert (per_participant == 1).all()                                   # never in two splits
  assert set(out["split"]) == set(SPLITS)
  participants = out.drop_duplicates("participant_id")
  for label, n in (("CN", 70), ("AD", 30)):
    counts = participants[participants["label"] == label]["split"].value_counts()
    for split, frac in FRACTIONS.items():
      assert abs(counts.get(split, 0) - frac * n) < 1, (label, split, counts.to_dict())
  # Deterministic by seed, independent of the table's row order; another seed differs.
  again = cohort.assign_splits(df.sample(frac=1, random_state=7), FRACTIONS, seed=3)
  key = lambda f: f.sort_values(["participant_id", "session_id"])["split"].tolist()
  assert key(again) == key(out)
  assert key(cohort.assign_splits(df, FRACTIONS, seed=4)) != key(out)


def test_preset_splits_are_kept_and_conflicts_reported(tmp_path):
  df = split_frame(20, 20)
  df.loc[df["participant_id"] == "sub-000", "split"] = "holdout"
  df.loc[df["participant_id"] == "sub-025", "split"] = "test"
  out = cohort.assign_splits(df, FRACTIONS, seed=0)
  assert set(out[out["participant_id"] == "sub-000"]["split"]) == {"holdout"}
  assert set(out[out["participant_id"] == "sub-025"]["split"]) == {"test"}
  assert (out.groupby("participant_id")["split"].nunique() == 1).all()

  a, b = volume(tmp_path / "a.nii.gz"), volume(tmp_path / "b.nii.gz", seed=1)
  table = write_table(tmp_path / "t.tsv", [
      dict(row("p1", a, session_id="1", split="train")), dict(row("p1", b, session_id="2", split="test"))])
  _, problems = cohort.validate(cohort.read_cohort(table, ["T1w"]), ["CN", "AD"])
  assert {p.line for p in problems} == {2, 3}
  assert all("different splits" in p.problem for p in problems)


def test_bad_fractions_are_refused():
  with pytest.raises(ValueError, match="sum to 1"):
    cohort.split_fractions(dict(train=0.7, val=0.1, test=0.1, holdout=0.2))
  with pytest.raises(ValueError, match="unknown split"):
    cohort.split_fractions(dict(train=0.9, dev=0.1))


def test_write_bad_files_tsv(tmp_path):
  path = str(tmp_path / "bad_files.tsv")
  cohort.write_bad_files(path, [cohort.Problem(4, "sub-1", "", "/x/a.nii.gz", "file not found")])
  got = pd.read_csv(path, sep="\t", keep_default_na=False)
  assert got.to_dict("records") == [dict(line=4, participant_id="sub-1", session_id="", file="/x/a.nii.gz",
                                         problem="file not found")]
