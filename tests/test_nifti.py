"""NIfTI layer: orientation, scaling/dtype/endianness, resampling geometry, mask alignment,
normalisation, atomic writes and clean headers, on tiny synthetic volumes."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from synthmri_jax.data import nifti


def head(shape=(30, 34, 28), seed=0):
  """An ellipsoidal 'head' with an off-centre bright blob: asymmetric on every axis, so any
  orientation mistake moves the blob."""
  rng = np.random.default_rng(seed)
  g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
  data = np.where((g ** 2).sum(0) < 0.7, 100.0, 0.0)
  blob = ((g[0] - 0.35) ** 2 + (g[1] + 0.3) ** 2 + (g[2] - 0.25) ** 2) < 0.03
  data[blob] = 200.0
  data += rng.normal(0, 2.0, shape)
  return data.astype(np.float32), blob


def flip(data, affine, axes):
  """Same object, stored with `axes` flipped: data reversed, affine compensating."""
  data, affine = data.copy(), affine.copy()
  for ax in axes:
    f = np.eye(4)
    f[ax, ax], f[ax, 3] = -1, data.shape[ax] - 1
    affine = affine @ f
    data = np.flip(data, ax)
  return np.ascontiguousarray(data), affine


def transpose(data, affine, order):
  """Same object with voxel axes permuted (e.g. a sagittal acquisition)."""
  p = np.zeros((4, 4))
  for new, old in enumerate(order):
    p[old, new] = 1
  p[3, 3] = 1
  return np.ascontiguousarray(np.transpose(data, order)), affine @ p


AFFINE = np.array([[2.0, 0, 0, -30], [0, 2.0, 0, -40], [0, 0, 2.0, -20], [0, 0, 0, 1]])


def save(path, data, affine, dtype=np.float32):
  img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
  img.header.set_data_dtype(dtype)
  nib.save(img, str(path))
  return str(path)


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
def test_las_lpi_ras_and_transposed_inputs_land_identically(tmp_path, ext):
  data, _ = head()
  variants = {
      "RAS": (data, AFFINE),
      "LAS": flip(data, AFFINE, [0]),
      "LPI": flip(data, AFFINE, [0, 1, 2]),
      "ASL": transpose(*flip(data, AFFINE, [0]), (1, 2, 0)),
  }
  loaded = {}
  for name, (d, a) in variants.items():
    path = save(tmp_path / f"{name}{ext}", d, a)
    assert "".join(nib.aff2axcodes(nib.load(path).affine)) == name
    loaded[name] = nifti.load_canonical(path)
  for name, (d, a) in loaded.items():
    np.testing.assert_array_equal(d, data, err_msg=name)
    np.testing.assert_allclose(a, AFFINE, atol=1e-5, err_msg=name)
  # And the full preprocessing (grid, resampling, normalisation) agrees too.
  outs = [nifti.preprocess([str(tmp_path / f"{n}{ext}")], None, shape=(20, 20, 20), spacing_mm=3.0)
          for n in variants]
  for out in outs[1:]:
    np.testing.assert_allclose(out.image, outs[0].image, atol=1e-5)
    np.testing.assert_allclose(out.affine, outs[0].affine, atol=1e-5)


def _write_raw(path, raw, header):
  """A .nii file byte by byte, so the scaling and byte order are exactly what the test says."""
  header.set_data_shape(raw.shape)
  with open(path, "wb") as f:
    header.write_to(f)
    f.write(b"\0" * (int(header.get_data_offset()) - f.tell()))
    f.write(raw.tobytes(order="F"))


def test_int16_with_scl_slope_inter_is_scaled(tmp_path):
  raw = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 50
  hdr = nib.Nifti1Header()
  hdr.set_data_dtype(np.int16)
  hdr.set_sform(AFFINE, code=1)
  hdr.set_qform(AFFINE, code=1)
  hdr["scl_slope"], hdr["scl_inter"] = 0.5, -10.0
  path = str(tmp_path / "scaled.nii")
  _write_raw(path, raw, hdr)
  assert nib.load(path).get_data_dtype() == np.int16
  data, affine = nifti.load_canonical(path)
  assert data.dtype == np.float32
  np.testing.assert_array_equal(data, raw.astype(np.float32) * 0.5 - 10.0)
  np.testing.assert_allclose(affine, AFFINE)


def test_big_endian_float_reads_like_little_endian(tmp_path):
  values = (np.random.default_rng(1).normal(size=(5, 4, 3)) * 1e3).astype(np.float32)
  hdr = nib.Nifti1Header(endianness=">")
  hdr.set_data_dtype(np.dtype(">f4"))
  hdr.set_sform(AFFINE, code=1)
  path = str(tmp_path / "big.nii")
  _write_raw(path, values.astype(">f4"), hdr)
  assert nib.load(path).header.endianness == ">"
  data, _ = nifti.load_canonical(path)
  np.testing.assert_array_equal(data, values)
  assert data.dtype.byteorder in ("=", "<", "|")


def test_mgz_and_singleton_4d_load_like_3d_nifti(tmp_path):
  data, _ = head((12, 14, 10))
  nib.save(nib.MGHImage(data, AFFINE), str(tmp_path / "v.mgz"))
  save(tmp_path / "v4.nii.gz", data[..., None], AFFINE)
  for name in ("v.mgz", "v4.nii.gz"):
    got, affine = nifti.load_canonical(str(tmp_path / name))
    np.testing.assert_array_equal(got, data, err_msg=name)
    np.testing.assert_allclose(affine, AFFINE, atol=1e-5)


@pytest.mark.parametrize("shape,problem", [((10, 12), "2D"), ((10, 12, 1), "2D"), ((6, 7, 8, 2), "4D")])
def test_non_3d_volumes_are_refused(tmp_path, shape, problem):
  path = save(tmp_path / "x.nii.gz", np.ones(shape), np.eye(4))
  with pytest.raises(nifti.VolumeError, match=problem) as e:
    nifti.load_volume(path)
  assert e.value.path == path


def test_cube_resampled_1mm_to_4mm_lands_on_the_right_voxels():
  # A 20 mm cube: source voxels 20..39 at 1 mm (extent 19.5..39.5 mm + offset), stored LAS.
  src = np.zeros((64, 64, 64), np.float32)
  src[20:40, 20:40, 20:40] = 1.0
  affine = np.eye(4)
  affine[:3, 3] = (-32.0, 5.0, 11.0)
  las, las_affine = flip(src, affine, [0])
  canon = nib.as_closest_canonical(nib.Nifti1Image(las, las_affine))
  data, canon_affine = np.asarray(canon.dataobj), canon.affine
  # A 4 mm grid whose voxel 3 spans exactly the cube's first millimetres: 4 mm voxels 3..7.
  target = np.diag([4.0, 4.0, 4.0, 1.0])
  target[:3, 3] = affine[:3, 3] + 19.5 + 2.0 - 3 * 4.0
  out = nifti.resample(data, canon_affine, nifti.Grid((11, 11, 11), target), order=1)
  expected = np.zeros((11, 11, 11), bool)
  expected[3:8, 3:8, 3:8] = True
  np.testing.assert_array_equal(out > 0.5, expected)
  np.testing.assert_allclose(out[4:7, 4:7, 4:7], 1.0, atol=0.02)
  # Volume (mm^3) is preserved: 20^3 mm^3.
  assert abs(out.sum() * 64 - 8000) / 8000 < 0.01


def test_brain_grid_centres_the_object_and_keeps_its_world_position():
  src = np.zeros((50, 60, 40), np.float32)
  src[5:25, 30:50, 8:30] = 100.0    # 20 x 20 x 22 voxels, far from the array centre
  affine = np.diag([1.2, 0.9, 1.5, 1.0])
  affine[:3, 3] = (-20, 7, -3)
  grid = nifti.brain_grid(src, affine, (16, 16, 16), 3.0)
  out = nifti.resample(src, affine, grid)

  def com_mm(d, a):
    idx = np.argwhere(d > 0) if d.dtype == bool else np.indices(d.shape).reshape(3, -1).T
    w = np.ones(len(idx)) if d.dtype == bool else d.reshape(-1)
    return (a @ np.c_[idx, np.ones(len(idx))].T)[:3] @ w / w.sum()

  # Within a quarter of a 3 mm voxel (sampling a box edge at 3 mm cannot do much better).
  np.testing.assert_allclose(com_mm(out, grid.affine), com_mm(src, affine), atol=0.75)
  centre_vox = np.linalg.solve(grid.affine, np.append(com_mm(src, affine), 1))[:3]
  np.testing.assert_allclose(centre_vox, 7.5, atol=0.5)       # the middle of a 16-voxel axis
  # Mass in mm^3 * intensity is preserved: 20 * 1.2 * 20 * 0.9 * 22 * 1.5 mm^3.
  np.testing.assert_allclose(out.sum() * 27, 100 * 20 * 1.2 * 20 * 0.9 * 22 * 1.5, rtol=0.02)


def test_mask_stays_on_its_image_feature_and_channels_align(tmp_path):
  data, blob = head((40, 44, 36), seed=3)
  labels = blob.astype(np.uint8)
  labels[8:12, 20:24, 15:18] = 2                     # a second label, inside the head
  data[8:12, 20:24, 15:18] = 160.0
  affine = np.diag([1.1, 1.3, 1.6, 1.0])
  affine[:3, 3] = (-22, -28, -29)
  img_path = save(tmp_path / "img.nii.gz", *flip(data, affine, [0, 1, 2]))          # LPI
  mask_path = save(tmp_path / "mask.nii.gz", *flip(labels, affine, [0, 1, 2]), dtype=np.uint8)
  # A second sequence of the same object on another grid (RAS, 1 mm) and contrast (inverted).
  world = nifti.Grid((48, 60, 60), nifti.centred_affine((48, 60, 60), 1.0, (0, 0, 0)))
  second = nifti.resample(300 - data * (data > 50), affine, world, order=1, antialias=False) * (
      nifti.resample((data > 50).astype(np.float32), affine, world, order=1) > 0.5)
  t2_path = save(tmp_path / "t2.nii.gz", second, world.affine)

  out = nifti.preprocess([img_path, t2_path], mask_path, shape=(24, 24, 24), spacing_mm=2.0)
  assert out.image.shape == (24, 24, 24, 2) and out.mask.dtype == np.uint8
  assert set(np.unique(out.mask)) == {0, 1, 2}
  img = out.image[..., 0]
  # Nearest-neighbour labels land where the image shows the features.
  on_blob = img[out.mask == 1].mean()
  assert np.median(img[out.mask == 1]) > 0.99 and on_blob > 0.9
  for ax in range(3):          # and it is the best-aligned position: a 1-voxel shift fits worse
    for step in (-1, 1):
      assert img[np.roll(out.mask, step, axis=ax) == 1].mean() < on_blob - 0.05
  assert 0.6 < np.median(img[out.mask == 2]) < 0.9
  assert np.median(img[(out.mask == 0) & (img > 0.2)]) < 0.6
  blob_vox = np.argwhere(img > 0.9).mean(0)
  np.testing.assert_allclose(np.argwhere(out.mask == 1).mean(0), blob_vox, atol=0.5)
  # The blob is dark in the second channel, at the same voxels.
  t2 = out.image[..., 1]
  np.testing.assert_allclose(np.argwhere((t2 < 0.3) & (img > 0.5)).mean(0), blob_vox, atol=0.75)


def test_percentile_and_zscore_normalisation_values():
  rng = np.random.default_rng(0)
  data = np.zeros((20, 20, 20), np.float32)
  data[4:16, 4:16, 4:16] = rng.uniform(50, 150, (12, 12, 12))
  fg = data > 0
  found = nifti.foreground_mask(data)
  assert found.sum() > 0.99 * fg.sum() and not (found & ~fg).any()
  pct = nifti.normalize(data, fg, "percentile", (1, 99))
  lo, hi = np.percentile(data[fg], (1, 99))
  assert pct.min() == 0.0 and pct.max() == 1.0
  assert (pct[~fg] == 0).all()
  np.testing.assert_allclose(pct[fg], np.clip((data[fg] - lo) / (hi - lo), 0, 1), atol=1e-6)
  z = nifti.normalize(data, fg, "zscore", (1, 99))
  assert abs(z[fg].mean()) < 1e-4 and abs(z[fg].std() - 1) < 1e-3
  with pytest.raises(ValueError, match="unknown normalization"):
    nifti.normalize(data, fg, "minmax")


def test_failed_write_leaves_no_file_and_no_temp_and_keeps_the_old_one(tmp_path, monkeypatch):
  path = str(tmp_path / "out.nii.gz")
  nifti.write_nifti(path, np.ones((4, 4, 4), np.float32), AFFINE)
  before = open(path, "rb").read()

  def half_then_fail(img, filename):
    with open(filename, "wb") as f:
      f.write(b"partial")
    raise OSError("disk full")

  monkeypatch.setattr(nib, "save", half_then_fail)
  with pytest.raises(OSError, match="disk full"):
    nifti.write_nifti(path, np.zeros((4, 4, 4), np.float32), AFFINE)
  with pytest.raises(OSError, match="disk full"):
    nifti.write_nifti(str(tmp_path / "new.nii"), np.zeros((4, 4, 4), np.float32), AFFINE)
  assert os.listdir(tmp_path) == ["out.nii.gz"]
  assert open(path, "rb").read() == before
  with pytest.raises(ValueError, match=r"\.nii or \.nii\.gz"):
    nifti.write_nifti(str(tmp_path / "x.img"), np.zeros((2, 2, 2)), AFFINE)


def test_written_header_is_clean_whatever_the_source_carried(tmp_path):
  data, _ = head((10, 12, 8))
  src = nib.Nifti1Image(data, AFFINE)
  h = src.header
  h["descrip"], h["aux_file"] = b"sub-0042 J. Doe", b"sub-0042.lut"
  h["db_name"], h["intent_name"] = b"ADNI_0042", b"secret"
  h["data_type"] = b"sub-0042"
  h.extensions.append(nib.nifti1.Nifti1Extension("comment", b"patient sub-0042"))
  src_path = str(tmp_path / "sub-0042_T1w.nii.gz")
  nib.save(src, src_path)
  assert b"sub-0042" in gzip.open(src_path).read()

  loaded, affine = nifti.load_canonical(src_path)
  out_path = str(tmp_path / "clean.nii.gz")
  nifti.write_nifti(out_path, loaded, affine)
  out = nib.load(out_path)
  for field in ("descrip", "aux_file", "db_name", "intent_name", "data_type"):
    assert out.header[field].item() == b"", field
  assert len(out.header.extensions) == 0
  assert int(out.header["sform_code"]) == 1 and int(out.header["qform_code"]) == 1
  assert out.header.get_xyzt_units() == ("mm", "sec")
  np.testing.assert_allclose(out.affine, affine, atol=1e-5)
  np.testing.assert_array_equal(out.get_fdata(dtype=np.float32), loaded)
  raw = open(out_path, "rb").read()
  assert raw[3] & 0x08 == 0                     # gzip FNAME flag: no file name stored
  assert raw[4:8] == b"\0\0\0\0"                # gzip mtime 0
  assert b"sub-0042" not in gzip.decompress(raw) and b"clean" not in raw
