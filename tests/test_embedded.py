"""The embedded cohort: simulated effects measured from the written NIfTI files, determinism,
idempotence and resume, clean storage, lesion masks that sit on the lesions, and T1w / T2w / FLAIR
sequences of one anatomy with their tissue contrasts."""

import filecmp
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi
from scipy import stats

from synthmri_jax.data import embedded, mni_template, rois

N = 16
SEQUENCES = ("T1w", "T2w", "FLAIR")
BASE = dict(num_subjects=N, spacing_mm=4.0, ad_fraction=0.5, ad_effect=1.0, age_range=(55.0, 90.0),
            lesions=False, seed=0)


def _cfg(**over):
  return dict(BASE, **over)


def _read(root, rel):
  return rois.load_ras(os.path.join(root, rel))


def _measure(root):
  table = pd.read_csv(os.path.join(root, "participants.tsv"), sep="\t")
  rows = [rois.measure_rois(*_read(root, p)) for p in table["path"]]
  return table.join(pd.DataFrame(rows))


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
  root = tmp_path_factory.mktemp("embedded")
  dirs = {}
  for name, cfg in [("ad1", _cfg()), ("ad0", _cfg(ad_effect=0.0)), ("ad2", _cfg(ad_effect=2.0)),
                    ("again", _cfg()), ("seed1", _cfg(num_subjects=4, seed=1)),
                    ("lesions", _cfg(num_subjects=6, lesions=True, lesion_fraction=0.7))]:
    dirs[name] = str(root / name)
    embedded.build_embedded_cohort(cfg, dirs[name])
  dirs["sequences"] = str(root / "sequences")
  embedded.build_embedded_cohort(_cfg(num_subjects=6, lesions=True, lesion_fraction=0.7), dirs["sequences"],
                                 sequences=SEQUENCES)
  dirs["measured"] = {k: _measure(dirs[k]) for k in ("ad1", "ad0", "ad2")}
  return dirs


def test_table(cohorts):
  t = pd.read_csv(os.path.join(cohorts["ad1"], "participants.tsv"), sep="\t")
  assert list(t.columns) == ["participant_id", "path", "label", "age", "sex"]
  assert len(t) == N and t["participant_id"].is_unique
  assert (t["label"] == "AD").sum() == N // 2 and set(t["label"]) == {"CN", "AD"}
  assert set(t["sex"]) <= {"M", "F"} and t["age"].between(55, 90).all()
  for rel in t["path"]:
    assert not os.path.isabs(rel) and os.path.exists(os.path.join(cohorts["ad1"], rel))
  lesion_table = pd.read_csv(os.path.join(cohorts["lesions"], "participants.tsv"), sep="\t")
  assert "mask_path" in lesion_table.columns


def test_files_clean_and_varied_storage(cohorts):
  t = pd.read_csv(os.path.join(cohorts["ad1"], "participants.tsv"), sep="\t")
  shape, affine = mni_template.output_grid(4.0)
  codes, dtypes = set(), set()
  for rel in t["path"]:
    img = nib.load(os.path.join(cohorts["ad1"], rel))
    h = img.header
    for field in ("descrip", "aux_file", "intent_name", "db_name"):
      assert h[field].item() in (b"", ""), (rel, field)
    codes.add(nib.aff2axcodes(img.affine))
    dtypes.add(str(img.get_data_dtype()))
    canon = nib.as_closest_canonical(img)     # every orientation lands on the one RAS grid
    assert canon.shape == shape and np.allclose(canon.affine, affine)
  assert ("R", "A", "S") in codes and len(codes) > 1
  assert {"int16", "float32"} <= dtypes


def test_ad_effect_zero_removes_label_dependence(cohorts):
  spec = embedded.CohortSpec.of(_cfg(ad_effect=0.0))
  as_ad = embedded.simulate_subject(spec, embedded.draw_subject(spec, 3, "AD"))[0]["T1w"]
  as_cn = embedded.simulate_subject(spec, embedded.draw_subject(spec, 3, "CN"))[0]["T1w"]
  np.testing.assert_array_equal(as_ad, as_cn)
  # Same seed: CN subjects are identical whatever ad_effect is; only AD subjects change.
  t = pd.read_csv(os.path.join(cohorts["ad1"], "participants.tsv"), sep="\t")
  for row in t.itertuples():
    a1, _ = _read(cohorts["ad1"], row.path)
    a0, _ = _read(cohorts["ad0"], row.path)
    assert np.array_equal(a1, a0) == (row.label == "CN"), row.participant_id


def test_ventricles_grow_with_ad_effect(cohorts):
  m1, m0, m2 = (cohorts["measured"][k] for k in ("ad1", "ad0", "ad2"))
  ad = m1["label"] == "AD"
  gain1 = np.log(m1["ventricle_ml"] / m0["ventricle_ml"])[ad]
  gain2 = np.log(m2["ventricle_ml"] / m0["ventricle_ml"])[ad]
  # ad_effect=1 is documented as ~+35 % ventricle volume in AD (age-adjusted cohort average).
  assert (gain1 > 0.05).all()
  assert 0.15 < gain1.mean() < 0.6, gain1.mean()
  assert gain2.mean() > 1.5 * gain1.mean()
  # Unpaired, as a classifier sees it: AD ventricles larger than CN ones.
  assert m1.loc[ad, "ventricle_ml"].median() > m1.loc[~ad, "ventricle_ml"].median()


def test_hippocampal_grey_matter_lower_in_ad(cohorts):
  m1, m0 = cohorts["measured"]["ad1"], cohorts["measured"]["ad0"]
  ad = m1["label"] == "AD"
  drop = (m0["hippocampus_intensity"] - m1["hippocampus_intensity"])[ad]
  # AD_HIPPO_LOSS darkens hippocampal GM by 0.6 of the GM-CSF contrast at the axes, less around.
  assert (drop > 0.02).all()
  assert 0.04 < drop.mean() < 0.25, drop.mean()
  assert m1.loc[ad, "hippocampus_intensity"].mean() < m1.loc[~ad, "hippocampus_intensity"].mean() - 0.03


def test_ventricles_grow_with_age(cohorts):
  m0 = cohorts["measured"]["ad0"]            # no label effect: age is the only systematic driver
  rho, _ = stats.spearmanr(m0["age"], m0["ventricle_ml"])
  assert rho > 0.4, rho
  young, old = m0["age"] < 70, m0["age"] > 78
  assert m0.loc[old, "ventricle_ml"].mean() > 1.2 * m0.loc[young, "ventricle_ml"].mean()


def test_sex_and_head_size(cohorts):
  m = cohorts["measured"]["ad0"]
  assert m.loc[m["sex"] == "M", "brain_ml"].mean() > m.loc[m["sex"] == "F", "brain_ml"].mean()


def test_deterministic(cohorts):
  a, b = cohorts["ad1"], cohorts["again"]
  t = pd.read_csv(os.path.join(a, "participants.tsv"), sep="\t")
  assert filecmp.cmp(os.path.join(a, "participants.tsv"), os.path.join(b, "participants.tsv"), shallow=False)
  for rel in t["path"]:
    assert filecmp.cmp(os.path.join(a, rel), os.path.join(b, rel), shallow=False), rel
  other = pd.read_csv(os.path.join(cohorts["seed1"], "participants.tsv"), sep="\t")
  for rel in other["path"]:
    assert not np.array_equal(_read(a, rel)[0], _read(cohorts["seed1"], rel)[0])


def test_subject_independent_of_cohort_size():
  small, large = embedded.CohortSpec.of(_cfg(num_subjects=4)), embedded.CohortSpec.of(_cfg(num_subjects=40))
  a = embedded.simulate_subject(small, embedded.draw_subject(small, 2, "CN"))[0]["T1w"]
  b = embedded.simulate_subject(large, embedded.draw_subject(large, 2, "CN"))[0]["T1w"]
  np.testing.assert_array_equal(a, b)


def _mtimes(root):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(root) for f in files}


def test_idempotent_and_resumes(tmp_path):
  cfg = _cfg(num_subjects=4)
  out = str(tmp_path / "c")
  tsv = embedded.build_embedded_cohort(cfg, out)
  before = _mtimes(out)
  assert embedded.build_embedded_cohort(cfg, out) == tsv
  assert _mtimes(out) == before
  # Interrupted build: one image missing and no completion marker -> only that one is written.
  t = pd.read_csv(tsv, sep="\t")
  victim = os.path.join(out, t["path"][2])
  with open(victim, "rb") as f:
    original = f.read()
  os.remove(victim)
  os.remove(os.path.join(out, ".embedded_complete.json"))
  embedded.build_embedded_cohort(cfg, out)
  after = _mtimes(out)
  for path, mtime in before.items():
    if path != victim and not path.endswith(".json") and not path.endswith(".tsv"):
      assert after[path] == mtime, path
  with open(victim, "rb") as f:
    assert f.read() == original
  assert not [f for f in os.listdir(os.path.dirname(victim)) if f.endswith(".tmp.nii.gz")]
  # Another cfg in the same directory replaces the build.
  embedded.build_embedded_cohort(_cfg(num_subjects=3), out)
  assert len(pd.read_csv(tsv, sep="\t")) == 3
  assert sorted(n for n in os.listdir(out) if n.startswith("sub-")) == ["sub-0001", "sub-0002", "sub-0003"]


def test_refuses_foreign_directory(tmp_path):
  (tmp_path / "participants.tsv").write_text("participant_id\tpath\n")
  with pytest.raises(FileExistsError):
    embedded.build_embedded_cohort(_cfg(num_subjects=2), str(tmp_path))


def test_bad_config_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="ad_fraction"):
    embedded.build_embedded_cohort(_cfg(ad_fraction=1.5), str(tmp_path / "x"))


def test_lesion_masks_sit_on_hyperintense_lesions(cohorts):
  root = cohorts["lesions"]
  t = pd.read_csv(os.path.join(root, "participants.tsv"), sep="\t")
  with_lesion = 0
  for row in t.itertuples():
    image, affine = _read(root, row.path)
    mask, mask_affine = _read(root, row.mask_path)
    assert mask.shape == image.shape and np.allclose(mask_affine, affine)
    assert set(np.unique(mask)) <= {0, 1}
    if not mask.any():
      continue
    with_lesion += 1
    assert (image[mask > 0] > 0).all()                       # inside the brain
    norm = image / rois.measure_rois(image, affine)["white_matter_level"]
    bright = norm > 1.3                                      # the enhancing rim
    assert bright.sum() >= 3
    assert (mask[bright] > 0).mean() > 0.8                   # bright voxels are lesion voxels
    assert bright[mask > 0].mean() > 0.05                    # and the lesion has a bright rim
  assert 0 < with_lesion < len(t)                           # lesion_fraction=0.7: some, not all


def test_sequences_share_one_anatomy_and_leave_t1w_as_it_was(cohorts):
  """Adding T2w and FLAIR changes no T1w file or mask, and every sequence has the same brain."""
  root, t1_only = cohorts["sequences"], cohorts["lesions"]
  t = pd.read_csv(os.path.join(root, "participants.tsv"), sep="\t")
  assert list(t.columns) == ["participant_id", "path_T1w", "path_T2w", "path_FLAIR", "label", "age", "sex",
                             "mask_path"]
  single = pd.read_csv(os.path.join(t1_only, "participants.tsv"), sep="\t")
  for row, ref in zip(t.itertuples(), single.itertuples()):
    assert filecmp.cmp(os.path.join(root, row.path_T1w), os.path.join(t1_only, ref.path), shallow=False)
    assert filecmp.cmp(os.path.join(root, row.mask_path), os.path.join(t1_only, ref.mask_path), shallow=False)
    images = [_read(root, getattr(row, f"path_{q}")) for q in SEQUENCES]
    for image, affine in images[1:]:
      np.testing.assert_allclose(affine, images[0][1])
      np.testing.assert_array_equal(image > 0, images[0][0] > 0)      # one brain, one grid


def test_sequence_contrast_orders_tissues_as_mr_does(cohorts):
  """CSF dark in T1w, bright in T2w, suppressed in FLAIR; GM above WM in T2w and FLAIR; lesions
  bright in T2w and FLAIR. Voxels are classed by the subject's own T1w (over its white-matter
  level, away from the brain's edge and any lesion): CSF < 0.45, GM 0.68-0.82, WM > 0.95. A
  sequence's level in a class is its median ratio to T1w at the same voxels (gain and bias field
  cancel), so a sequence drawn with T1w's contrast would give 1 everywhere."""
  root = cohorts["sequences"]
  t = pd.read_csv(os.path.join(root, "participants.tsv"), sep="\t")
  level = {q: {"CSF": [], "GM": [], "WM": []} for q in SEQUENCES}
  lesion = {q: [] for q in SEQUENCES}
  for row in t.itertuples():
    (t1, affine), mask = _read(root, row.path_T1w), _read(root, row.mask_path)[0] > 0
    wm_level = rois.measure_rois(t1, affine)["white_matter_level"]
    inner = ndi.binary_erosion(t1 > 0, iterations=2) & ~ndi.binary_dilation(mask, iterations=3)
    classes = {"CSF": inner & (t1 < 0.45 * wm_level), "GM": inner & (t1 > 0.68 * wm_level) & (t1 < 0.82 * wm_level),
               "WM": inner & (t1 > 0.95 * wm_level)}
    for q in SEQUENCES:
      image = _read(root, getattr(row, f"path_{q}"))[0]
      for name, where in classes.items():
        level[q][name].append(np.median(image[where] / t1[where]))
      if mask.any():    # the whole tumour's median against the subject's white matter
        lesion[q].append(np.median(image[mask]) / np.median(image[classes["WM"]]))
  level = {q: {k: float(np.mean(v)) for k, v in d.items()} for q, d in level.items()}
  assert all(v == pytest.approx(1.0) for v in level["T1w"].values()), level
  t2, flair = level["T2w"], level["FLAIR"]
  assert t2["WM"] < t2["GM"] < t2["CSF"] and t2["CSF"] > 4 * t2["WM"], level   # CSF bright in T2w
  assert flair["CSF"] < flair["WM"] < flair["GM"], level                       # CSF suppressed in FLAIR
  assert flair["GM"] > 1.3 * flair["WM"] and flair["CSF"] < 0.85 * flair["WM"] < 0.3 * t2["CSF"], level
  assert len(lesion["T2w"]) >= 2 and min(lesion["T2w"]) > 1.4 and min(lesion["FLAIR"]) > 1.2, lesion


def test_a_sequence_does_not_depend_on_the_others():
  """FLAIR alone equals the FLAIR of a T1w + T2w + FLAIR cohort: its noise stream is its own."""
  cfg = _cfg(num_subjects=3, lesions=True)
  alone, full = embedded.CohortSpec.of(cfg, ("FLAIR",)), embedded.CohortSpec.of(cfg, SEQUENCES)
  a = embedded.simulate_subject(alone, embedded.draw_subject(alone, 1, "CN"))[0]
  b = embedded.simulate_subject(full, embedded.draw_subject(full, 1, "CN"))[0]
  assert list(a) == ["FLAIR"] and list(b) == list(SEQUENCES)
  np.testing.assert_array_equal(a["FLAIR"], b["FLAIR"])
  with pytest.raises(ValueError, match="PD.*FLAIR.*T1w.*T2w"):
    embedded.CohortSpec.of(cfg, ("T1w", "PD"))
