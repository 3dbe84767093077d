"""grain pipeline: process sharding, seeded shuffle, iterator restore, augmentation, eval padding, global arrays."""

import itertools
import json
import os
import subprocess
import sys
import textwrap

import grain
import jax
import ml_collections
import numpy as np
import pandas as pd
import pytest

from synthmri_jax.data import cache
from synthmri_jax.data import augment, loader
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.utils import io
from conftest import fake_devices_flags

SHAPE = (6, 5, 4)


def write_cohort(workdir, n=11, channels=2, masks=True, split="train") -> cache.PreparedCohort:
  """A tiny prepared cohort laid out as data/cache.py specifies; voxel values encode the row."""
  root = cache.data_dir(str(workdir))
  os.makedirs(os.path.join(root, "cache"), exist_ok=True)
  rng = np.random.default_rng(123)
  rows = []
  for i in range(n):
    image = rng.random(SHAPE + (channels,), dtype=np.float32) + i
    np.save(os.path.join(root, "cache", f"sub-{i:02d}_image.npy"), image)
    mask_rel = ""
    if masks:
      mask = (rng.random(SHAPE) > 0.5).astype(np.uint8)
      mask_rel = f"cache/sub-{i:02d}_mask.npy"
      np.save(os.path.join(root, mask_rel), mask)
    rows.append(dict(participant_id=f"sub-{i:02d}", session_id="", label="AD" if i % 2 else "CN",
                     label_index=i % 2, age=60.0 + i, sex="M" if i % 3 == 0 else "F", split=split,
                     image=f"cache/sub-{i:02d}_image.npy", mask=mask_rel))
  pd.DataFrame(rows, columns=cache.TABLE_COLUMNS).to_csv(os.path.join(root, "cohort.tsv"), sep="\t", index=False)
  io.write_json_atomic(os.path.join(root, "prepared.json"), dict(
      shape=list(SHAPE), spacing_mm=4.0, affine=np.eye(4).tolist(), channels=["T1w", "T2w"][:channels],
      labels=["CN", "AD"], normalization="percentile", clip_percentiles=[0.5, 99.5], splits={split: n},
      config_hash="test", complete=True))
  return cache.load_prepared(str(workdir))


def toy_source(n: int) -> loader.ArraySource:
  return loader.ArraySource({"image": np.arange(n * 8, dtype=np.float32).reshape(n, 2, 2, 2, 1),
                             "label": (np.arange(n) % 2).astype(np.int32)})


def take(it, k):
  return [next(it) for _ in range(k)]


def host_streams(source, global_batch, seed, count, steps, **kw):
  """Per-process lists of example indices, in the order that process saw them."""
  out = []
  for p in range(count):
    it = loader.train_iterator(source, global_batch, seed, process_index=p, process_count=count, **kw)
    out.append(np.concatenate([b["index"] for b in take(it, steps)]))
  return out


def interleave(streams):
  """Global stream: process p's j-th example sits at position p + P*j."""
  count = len(streams)
  glob = np.empty(sum(len(s) for s in streams), np.int64)
  for p, s in enumerate(streams):
    glob[p::count] = s
  return glob


def test_cohort_source_elements(tmp_path):
  prepared = write_cohort(tmp_path, n=4)
  src = loader.CohortSource(prepared, "train")
  e = src[3]
  assert e["image"].shape == SHAPE + (2,) and e["image"].dtype == np.float32
  assert e["mask"].shape == SHAPE and e["mask"].dtype == np.uint8
  assert e["label"] == 1 and e["label"].dtype == np.int32
  assert e["sex"] == 1 and e["sex"].dtype == np.int32 and src[1]["sex"] == 0
  assert e["age"] == np.float32(63.0) and e["age"].dtype == np.float32
  np.testing.assert_array_equal(e["image"], np.load(os.path.join(prepared.root, "cache", "sub-03_image.npy")))
  assert "mask" not in loader.CohortSource(write_cohort(tmp_path / "nomask", n=2, masks=False), "train")[0]
  with pytest.raises(ValueError, match="empty"):
    loader.CohortSource(prepared, "val")
  batch = next(loader.train_iterator(src, 4, 0, process_index=0, process_count=1))
  assert batch["image"].shape == (4,) + SHAPE + (2,) and batch["mask"].shape == (4,) + SHAPE
  assert batch["index"].dtype == np.int32 and batch["valid"].all()
  # The tokenizer's image + mask input: the mask (0 / 1) as one more channel after the sequences.
  joint = loader.CohortSource(prepared, "train", mask_channel=True)[3]
  assert joint["image"].shape == SHAPE + (3,)
  np.testing.assert_array_equal(joint["image"][..., :2], e["image"])
  np.testing.assert_array_equal(joint["image"][..., 2], e["mask"].astype(np.float32))
  with pytest.raises(ValueError, match="no masks.*mask_channel"):
    loader.CohortSource(write_cohort(tmp_path / "nomask2", n=2, masks=False), "train", mask_channel=True)


def test_two_processes_see_every_example_once_per_epoch():
  n, g = 11, 4
  src = toy_source(n)
  steps = 3 * n // g + 1
  streams = host_streams(src, g, seed=5, count=2, steps=steps)
  glob = interleave(streams)
  epochs = [glob[e * n:(e + 1) * n] for e in range(3)]
  for ep in epochs:
    assert sorted(ep.tolist()) == list(range(n))   # union = all, and no example twice (disjoint hosts)
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  # Global step s holds stream positions [s*G, (s+1)*G) whatever the process count.
  single = host_streams(src, g, seed=5, count=1, steps=steps)[0]
  np.testing.assert_array_equal(glob, single)


def test_finite_epochs_give_equal_full_batches_per_host():
  n, g = 11, 4
  src = toy_source(n)
  per_host = [list(loader.train_iterator(src, g, 1, num_epochs=2, process_index=p, process_count=2))
              for p in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == 2 * n // g
  glob = interleave([np.concatenate([b["index"] for b in h]) for h in per_host])
  assert sorted(glob[:n].tolist()) == list(range(n))
  assert all(b["index"].shape == (g // 2,) for h in per_host for b in h)


def test_batch_not_divisible_by_processes():
  with pytest.raises(ValueError, match="not divisible by the process count"):
    loader.train_iterator(toy_source(8), 5, 0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    loader.train_iterator(toy_source(8), 4, 0, process_index=2, process_count=2)


def test_shuffle_deterministic_and_seeded():
  src = toy_source(16)
  a = host_streams(src, 4, seed=0, count=1, steps=8)[0]
  b = host_streams(src, 4, seed=0, count=1, steps=8)[0]
  c = host_streams(src, 4, seed=1, count=1, steps=8)[0]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a[:16], c[:16])
  assert not np.array_equal(a[:16], a[16:])
  # grain shuffles epoch e with seed+e; derived seeds keep seed 1 from replaying seed 0's next epoch.
  assert not np.array_equal(a[16:], c[:16])
  assert not np.array_equal(a[:16], np.arange(16))


def test_iterator_restore_is_bitwise(tmp_path):
  prepared = write_cohort(tmp_path, n=9)
  src = loader.CohortSource(prepared, "train")
  aug = loader.Augment(intensity_jitter=0.1, flip_axes=(0, 2))
  make = lambda: loader.train_iterator(src, 4, 7, augment=aug, process_index=1, process_count=2)
  it = make()
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))     # what grain.checkpoint writes
  expected = take(it, 5)                             # crosses an epoch boundary (9 examples, 2 per host batch)
  fresh = make()
  fresh.set_state(state)
  for want, got in zip(expected, take(fresh, 5)):
    assert want.keys() == got.keys()
    for k in want:
      assert want[k].dtype == got[k].dtype and want[k].tobytes() == got[k].tobytes(), k
  # A restored iterator differs from one started afresh (the state really moved).
  assert not np.array_equal(next(make())["index"], expected[0]["index"])


def test_iterator_restore_through_orbax(tmp_path):
  import orbax.checkpoint as ocp
  src = toy_source(10)
  make = lambda: loader.train_iterator(src, 2, 3, augment=loader.Augment(0.05), process_index=0, process_count=1)
  it = make()
  take(it, 4)
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
    mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = take(it, 3)
  fresh = make()
  with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as mngr:
    mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  for want, got in zip(expected, take(fresh, 3)):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["index"], got["index"])


def _flip_subset(out, original, axes):
  """The subset of `axes` whose flip turns `original` into `out`, or None."""
  for r in range(len(axes) + 1):
    for chosen in itertools.combinations(axes, r):
      if np.array_equal(out, np.flip(original, chosen) if chosen else original):
        return chosen
  return None


def test_augment_flips_only_allowed_axes_with_mask():
  rng = np.random.default_rng(0)
  image = rng.random(SHAPE + (1,), dtype=np.float32)
  mask = (rng.random(SHAPE) > 0.5).astype(np.uint8)
  aug = loader.Augment(intensity_jitter=0.0, flip_axes=(0, 2))
  seen = set()
  for seed in range(64):
    out = aug({"image": image, "mask": mask, "label": np.int32(1)}, np.random.default_rng(seed))
    chosen = _flip_subset(out["image"], image, (0, 1, 2))
    assert chosen is not None and 1 not in chosen
    expected_mask = np.flip(mask, chosen) if chosen else mask
    np.testing.assert_array_equal(out["mask"], expected_mask)
    assert out["label"] == 1
    seen.add(chosen)
  assert seen == {(), (0,), (2,), (0, 2)}
  # Default config: no flips at all.
  none = loader.Augment.from_config(ml_collections.ConfigDict(dict(flip_axes="", intensity_jitter=0.0)))
  assert none.flip_axes == () and none.is_identity


def test_augment_flips_in_pipeline_match_mask(tmp_path):
  prepared = write_cohort(tmp_path, n=6, channels=1)
  src = loader.CohortSource(prepared, "train")
  it = loader.train_iterator(src, 3, 0, augment=loader.Augment(flip_axes=(1,)), process_index=0, process_count=1)
  flipped = 0
  for batch in take(it, 6):
    for b in range(3):
      e = src[int(batch["index"][b])]
      chosen = _flip_subset(batch["image"][b], e["image"], (0, 1, 2))
      assert chosen in ((), (1,))
      np.testing.assert_array_equal(batch["mask"][b], np.flip(e["mask"], chosen) if chosen else e["mask"])
      flipped += bool(chosen)
  assert 0 < flipped < 18


def test_augment_jitter_within_bounds():
  j = 0.1
  image = np.zeros(SHAPE + (2,), np.float32)
  image[:3] = 1.0
  aug = loader.Augment.from_config(ml_collections.ConfigDict(dict(flip_axes="", intensity_jitter=j)))
  gains, offsets = [], []
  for seed in range(100):
    out = aug({"image": image}, np.random.default_rng(seed))["image"]
    assert out.dtype == np.float32 and out.shape == image.shape
    offset, gain = out[4, 0, 0], out[0, 0, 0] - out[4, 0, 0]
    np.testing.assert_allclose(out[3:], np.broadcast_to(offset, out[3:].shape), rtol=0, atol=0)
    gains.append(gain)
    offsets.append(offset)
  gains, offsets = np.array(gains), np.array(offsets)
  assert np.all(np.abs(gains - 1) <= j + 1e-6) and np.all(np.abs(offsets) <= j + 1e-6)
  assert gains.std() > j / 4 and offsets.std() > j / 4             # really random,
  assert not np.allclose(gains[:, 0], gains[:, 1])                  # and per channel
  with pytest.raises(ValueError, match="flip_axes"):
    loader.Augment.from_config(ml_collections.ConfigDict(dict(flip_axes="3", intensity_jitter=0.0)))
  assert loader.Augment.from_config(ml_collections.ConfigDict(dict(flip_axes="0, 2", intensity_jitter=0.0))).flip_axes == (0, 2)


def test_augment_shift_moves_image_and_mask_together_by_at_most_s():
  """Each output is the input translated by one integer offset per axis in [-s, s] (zero-filled),
  the mask by the same offset; every offset occurs."""
  s = 2
  rng = np.random.default_rng(0)
  image = rng.random(SHAPE + (1,), dtype=np.float32) + 1.0      # > 0 everywhere: the fill shows
  mask = (rng.random(SHAPE) > 0.5).astype(np.uint8)
  aug = loader.Augment(shift_voxels=s)
  assert not aug.is_identity
  seen = set()
  for seed in range(60):
    out = aug({"image": image, "mask": mask}, np.random.default_rng(seed))
    hits = [d for d in itertools.product(range(-s, s + 1), repeat=3)
            if np.array_equal(out["image"], augment.shift(image, d))]
    assert len(hits) == 1, seed
    d = hits[0]
    np.testing.assert_array_equal(out["mask"], augment.shift(mask, d))
    # closed form of the fill: exactly the entering slabs are zero
    zero = np.zeros(SHAPE, bool)
    for ax, k in enumerate(d):
      sl = [slice(None)] * 3
      sl[ax] = slice(0, k) if k > 0 else slice(SHAPE[ax] + k, SHAPE[ax])
      zero[tuple(sl)] = True
    assert np.array_equal(out["image"][..., 0] == 0, zero)
    seen.update(d)
  assert seen == set(range(-s, s + 1))
  with pytest.raises(ValueError, match="shift_voxels"):
    loader.Augment(shift_voxels=-1)
  cfg = ml_collections.ConfigDict(dict(flip_axes="", intensity_jitter=0.0, shift_voxels=1))
  assert loader.Augment.from_config(cfg).shift_voxels == 1


@pytest.mark.parametrize("count", [1, 2])
def test_eval_batches_cover_each_example_once(tmp_path, count):
  n, g = 11, 4
  prepared = write_cohort(tmp_path, n=n)
  src = loader.CohortSource(prepared, "train")
  seen, valid_total = [], 0
  for p in range(count):
    batches = list(loader.eval_iterator(src, g, process_index=p, process_count=count))
    assert len(batches) == loader.eval_num_batches(src, g) == 3
    for b in batches:
      assert b["image"].shape[0] == g // count
      seen += b["index"][b["valid"]].tolist()
      valid_total += int(b["valid"].sum())
      pads = ~b["valid"]
      assert (b["index"][pads] == -1).all() and not b["image"][pads].any() and not b["mask"][pads].any()
      for i in np.flatnonzero(b["valid"]):
        np.testing.assert_array_equal(b["image"][i], src[int(b["index"][i])]["image"])
  assert sorted(seen) == list(range(n)) and valid_total == n


def test_global_batch_on_one_device():
  m = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  batch = next(loader.train_iterator(toy_source(6), 3, 0, process_index=0, process_count=1))
  arrays = loader.make_global_batch(batch, m)
  assert set(arrays) == set(batch)
  for k, v in arrays.items():
    assert isinstance(v, jax.Array) and v.shape == batch[k].shape
    np.testing.assert_array_equal(np.asarray(v), batch[k])
    assert v.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))


def test_global_batch_on_four_fake_devices(repo_root):
  code = textwrap.dedent("""
      import ml_collections, numpy as np
      from synthmri_jax.data import loader
      from synthmri_jax import sharding as mesh_lib
      m = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=1)))
      batch = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "label": np.arange(8, dtype=np.int32)}
      out = loader.make_global_batch(batch, m)
      assert out["image"].shape == (8, 3)
      assert all(s.data.shape == (2, 3) for s in out["image"].addressable_shards)
      np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
      try:
        loader.make_global_batch({"x": np.zeros((6, 2))}, m)
        raise SystemExit("expected an error for 6 rows on 4 shards")
      except ValueError as e:
        assert "not divisible" in str(e)
      print("ok")
  """)
  env = dict(os.environ, XLA_FLAGS=fake_devices_flags(4), JAX_PLATFORMS="cpu",
             PYTHONPATH=repo_root)
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_load_npy_from_many_threads(tmp_path):
  """utils.io.load_npy: grain's reader threads load .npy files at once (CPython 3.11's parser,
  used for the headers, is not thread-safe); every read returns its own file's data."""
  import concurrent.futures

  from synthmri_jax.utils import io as io_lib
  arrays = [np.random.default_rng(i).normal(size=(3, 4, 5)).astype(np.float32) for i in range(64)]
  paths = []
  for i, a in enumerate(arrays):
    paths.append(str(tmp_path / f"v{i}.npy"))
    np.save(paths[-1], a)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    got = list(pool.map(lambda j: io_lib.load_npy(paths[j % 64], mmap=bool(j % 2)), range(512)))
  for j, g in enumerate(got):
    np.testing.assert_array_equal(g, arrays[j % 64])
    assert isinstance(g, np.memmap) == bool(j % 2) and (g.flags.writeable != bool(j % 2))


def test_codec_round_trip_carries_the_mask_channel(tmp_path):
  """A mask-channel codec's round trip splits image and mask channels; an identity codec keeps
  every mask (Dice 1), a codec that decodes an empty mask channel keeps none (Dice 0)."""
  from synthmri_jax.evaluation import codec_check
  from synthmri_jax.latents import LatentCodec
  prepared = write_cohort(tmp_path, n=6, channels=2)
  identity = LatentCodec(lambda v, x: x, lambda v, z: z, {}, key="id", mask_channel=True)
  rt = codec_check.round_trip(identity, prepared, ["train"], batch_size=4)
  assert rt["before"].shape == (6,) + SHAPE + (2,) and rt["mask_before"].shape == (6,) + SHAPE
  src = loader.CohortSource(prepared, "train")
  np.testing.assert_array_equal(rt["mask_before"], np.stack([src[i]["mask"] for i in range(6)]))
  np.testing.assert_allclose(rt["after"], rt["before"])
  kept = codec_check.mask_dice(rt, n_boot=200)
  assert kept["mean"] == 1.0 and kept["n"] == 6 and kept["unit"] == "subjects"
  erase = LatentCodec(lambda v, x: x, lambda v, z: z.at[..., -1].set(0.0), {}, key="erase", mask_channel=True)
  lost = codec_check.mask_dice(codec_check.round_trip(erase, prepared, ["train"], batch_size=4), n_boot=200)
  assert lost["mean"] == 0.0
