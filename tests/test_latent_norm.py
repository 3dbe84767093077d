"""LatentNorm: each standardisation mode gives zero-mean, unit-variance training latents in its
own sense, round-trips exactly, and survives a save / load through ldm.json."""

import numpy as np
import pytest

from synthmri_jax.latents import LatentNorm


@pytest.fixture
def latents():
  rng = np.random.default_rng(0)
  # (N, x, y, z, D): a fixed per-position "anatomy" plus subject variation whose spread differs per channel.
  template = rng.normal(0, 2.0, (4, 5, 3, 3))
  spread = np.array([0.1, 1.0, 3.0])
  return (template + rng.normal(0, 1, (64, 4, 5, 3, 3)) * spread).astype(np.float32)


@pytest.mark.parametrize("mode", ["global", "per_channel", "per_element"])
def test_modes_standardise_in_their_own_sense_and_invert(latents, mode, tmp_path):
  norm = LatentNorm.fit(latents, mode)
  x = norm.normalize(latents)
  if mode == "global":
    assert x.std() == pytest.approx(1.0, rel=1e-4) and norm.shift.item() == 0.0
  elif mode == "per_channel":
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2, 3)), 1.0, rtol=1e-4)
  else:
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=0), 1.0, rtol=1e-3)
    # The mean latent is the shift: a zero sample decodes to the training mean.
    np.testing.assert_allclose(norm.denormalize(np.zeros_like(latents[0])), latents.mean(axis=0), atol=1e-5)
  np.testing.assert_allclose(norm.denormalize(x), latents, rtol=1e-5, atol=1e-5)
  entry = norm.save(str(tmp_path))
  back = LatentNorm.from_meta({"latent_norm": entry}, str(tmp_path))
  assert back.mode == mode
  np.testing.assert_array_equal(back.normalize(latents), x)


def test_per_element_floor_keeps_constant_background_finite():
  z = np.zeros((16, 2, 2, 2, 2), np.float32)
  z[:, 0] = np.random.default_rng(1).normal(0, 1, (16, 2, 2, 2))   # half the grid varies, half is constant
  norm = LatentNorm.fit(z, "per_element", floor=0.1)
  assert np.all(np.isfinite(norm.scale))
  # A constant element is scaled as if its std were 0.1 x its channel's median element std, not 1 / 1e-8.
  typical = np.median(z.std(axis=0).reshape(-1, 2), axis=0)
  assert np.all(typical > 0.1)
  np.testing.assert_allclose(norm.scale[1], np.broadcast_to(1.0 / (0.1 * typical), (2, 2, 2)), rtol=1e-5)
  np.testing.assert_allclose(norm.scale[0], 1.0 / z[:, 0].std(axis=0), rtol=1e-5)


def test_old_ldm_json_reads_as_global_scale():
  norm = LatentNorm.from_meta({"scale_factor": 0.5})
  np.testing.assert_allclose(norm.normalize(np.full((2, 2), 4.0)), 2.0)
  with pytest.raises(ValueError, match="standardize"):
    LatentNorm.fit(np.zeros((2, 2, 2)), "per_voxel")


def test_per_label_element_centres_each_label_and_needs_labels(latents, tmp_path):
  import jax.numpy as jnp
  labels = np.arange(len(latents)) % 2
  shifted = latents + labels[:, None, None, None, None] * 5.0    # label 1 sits 5 higher everywhere
  norm = LatentNorm.fit(shifted, "per_label_element", labels=labels, num_labels=2)
  x = norm.normalize(shifted, labels)
  for k in (0, 1):
    np.testing.assert_allclose(x[labels == k].mean(axis=0), 0.0, atol=1e-4)
  # The pooled scale is the within-label spread: the 5-unit label gap does not inflate it.
  np.testing.assert_allclose(norm.scale, LatentNorm.fit(latents, "per_element").scale, rtol=0.2)
  # Zero decodes to each label's own mean, through numpy and inside jax alike.
  zero = np.zeros((2,) + latents.shape[1:], np.float32)
  back = norm.denormalize(zero, np.array([0, 1]))
  np.testing.assert_allclose(back[1] - back[0], 5.0 + latents[1::2].mean(0) - latents[::2].mean(0), atol=1e-4)
  np.testing.assert_allclose(np.asarray(norm.denormalize(jnp.asarray(zero), jnp.array([0, 1]))), back, atol=1e-5)
  np.testing.assert_allclose(norm.denormalize(x, labels), shifted, atol=1e-4)
  loaded = LatentNorm.from_meta({"latent_norm": norm.save(str(tmp_path))}, str(tmp_path))
  np.testing.assert_array_equal(loaded.label_shift, norm.label_shift)
  with pytest.raises(ValueError, match="label"):
    norm.normalize(shifted)
  with pytest.raises(ValueError, match="no training latents"):
    LatentNorm.fit(latents, "per_label_element", labels=np.zeros(len(latents), int), num_labels=2)
