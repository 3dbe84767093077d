"""DP-SGD in the shared trainer: per-example clipping, noise, Poisson batches, recorded epsilon."""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import scipy.stats

import toy_task as tt
from synthmri_jax.data import loader
from synthmri_jax.training import dp_accounting as dpa
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.training import dp_secret, optim, trainer
from synthmri_jax.training import dp_sgd

N = 8


@pytest.fixture(scope="module")
def data():
  d = tt.make_data(64)
  d["valid"] = np.ones(64, bool)
  return d


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))


def _batch(data, valid=None):
  b = {k: v[:N].copy() for k, v in data.items()}
  if valid is not None:
    b["valid"] = np.asarray(valid, bool)
  return b


def _host(tree):
  return jax.tree.map(lambda x: np.array(x, dtype=np.float64), jax.device_get(tree))


def _sgd_stepper(mesh, cfg, batch, dp):
  """A jitted step whose optimizer is plain SGD with lr 1, so params_before - params_after IS the gradient."""
  task = tt.ToyTask()
  bsh = mesh_lib.batch_sharding(mesh)
  init_fn, _, _, _ = trainer.build_state(task, cfg, mesh, trainer.shard_batch(batch, bsh))
  tx = optax.sgd(1.0)
  state = init_fn()
  state = state.replace(opt_state=tx.init(state.params))
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
    step = jax.jit(trainer.make_train_step(task, tx, cfg, dp))

  def grads(batch, seed):
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      new, metrics = step(state, trainer.shard_batch(batch, bsh), jax.random.key(seed))
    g = jax.tree.map(lambda a, b: a - b, _host(state.params), _host(new.params))
    return g, jax.device_get(metrics)

  return state, grads


def test_clipping_bounds_every_example(data, mesh):
  cfg = optim.train_config(tt.config(clip_norm=0.0))
  task = tt.ToyTask()
  batch = _batch(data, valid=[1, 1, 1, 1, 1, 1, 0, 0])
  init_fn, _, _, _ = trainer.build_state(task, cfg, mesh, trainer.shard_batch(batch, mesh_lib.batch_sharding(mesh)))
  state = init_fn()
  jb = jax.tree.map(jnp.asarray, batch)
  per_example = jax.jit(lambda keys, clip: dp_sgd.clipped_example_grads(
      task, state.params, state.model_state, jb, keys, jb["valid"], state.step, clip))
  keys = jax.random.split(jax.random.key(0), N)
  raw, (_, _, norm, used) = per_example(keys, 1e9)
  norm = np.asarray(norm)
  clip = float(np.sort(norm[:6])[2]) * 1.001     # three examples above C, three below
  clipped, _ = per_example(keys, clip)
  norms = np.sqrt(sum(np.sum(np.asarray(x, np.float64).reshape(N, -1) ** 2, axis=1) for x in jax.tree.leaves(clipped)))
  assert np.all(norms <= clip * (1 + 1e-5)), norms
  assert np.all(norms[6:] == 0) and list(np.asarray(used)) == [True] * 6 + [False] * 2   # padding: nothing
  big = norm[:6] > clip
  assert big.sum() == 3
  np.testing.assert_allclose(norms[:6][big], clip, rtol=1e-5)
  for c, r in zip(jax.tree.leaves(clipped), jax.tree.leaves(raw)):   # small ones untouched, big ones rescaled
    c, r = np.asarray(c, np.float64)[:6], np.asarray(r, np.float64)[:6]
    np.testing.assert_allclose(c[~big], r[~big], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(c[big], r[big] * (clip / norm[:6][big]).reshape((-1,) + (1,) * (r.ndim - 1)),
                               rtol=1e-4, atol=1e-9)

  # Through the whole step (noise 0; rows scanned one at a time): the optimizer gets sum(clipped) / B.
  dp = dp_sgd.DPStep(l2_clip=clip, noise_multiplier=0.0, expected_batch_size=4, microbatch=1)
  _, grads = _sgd_stepper(mesh, cfg, batch, dp)
  g, metrics = grads(batch, 0)
  # (same keys: the step folds row i into fold_in(rng, 0))
  row = jax.random.fold_in(jax.random.key(0), 0)
  keys = jax.vmap(lambda i: jax.random.fold_in(row, i))(jnp.arange(N))
  clipped, _ = per_example(keys, clip)
  for got, c in zip(jax.tree.leaves(g), jax.tree.leaves(clipped)):
    np.testing.assert_allclose(got, np.asarray(c, np.float64).sum(0) / 4, rtol=1e-4, atol=1e-6)  # f32 params
  assert metrics["dp_batch_size"] == 6 and metrics["grad_norm"] <= 6 * clip / 4 * (1 + 1e-5)


def test_no_noise_no_clipping_equals_normal_step(data):
  cfg = tt.config(steps=4, warmup_steps=0, ema_decay=0.5)
  batch = _batch(data)
  task = tt.ToyTask()
  init_a, step_a = tt.make_stepper(task, cfg, batch)
  sa, _ = step_a(init_a(), batch, 0)
  # The DP step, same init, same optimizer (AdamW + global clipping + EMA).
  c = optim.train_config(cfg)
  m = mesh_lib.make_mesh(cfg.mesh)
  bsh, rep = mesh_lib.batch_sharding(m), mesh_lib.replicated(m)
  init_b, _, state_sh, tx = trainer.build_state(task, c, m, trainer.shard_batch(batch, bsh))
  dp = dp_sgd.DPStep(l2_clip=1e9, noise_multiplier=0.0, expected_batch_size=N, microbatch=3)  # chunks, padded
  state_b = init_b()
  run_key = jax.random.wrap_key_data(np.asarray(jax.device_get(state_b.rng)))
  with jax.set_mesh(m), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
    step_b = jax.jit(trainer.make_train_step(task, tx, c, dp), in_shardings=(state_sh, bsh, rep),
                     out_shardings=(state_sh, rep))
    sb, mb = step_b(state_b, trainer.shard_batch(batch, bsh), jax.random.fold_in(run_key, 0))
  for x, y in zip(jax.tree.leaves(_host(sa.params)), jax.tree.leaves(_host(sb.params))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  for x, y in zip(jax.tree.leaves(_host(sa.ema_params)), jax.tree.leaves(_host(sb.ema_params))):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  assert int(sb.step) == 1 and float(mb["dp_clip_fraction"]) == 0.0
  # model_state is not updated from private data under DP.
  assert np.array_equal(_host(sb.model_state)["stats"]["feature_mean"], np.zeros(8))


def test_noise_std_matches_formula(data, mesh):
  cfg = optim.train_config(tt.config(clip_norm=0.0))
  clip, sigma, b = 0.5, 1.3, 4
  empty = _batch(data, valid=[0] * N)      # no example sampled: the gradient is pure noise
  dp = dp_sgd.DPStep(l2_clip=clip, noise_multiplier=sigma, expected_batch_size=b, microbatch=N)  # one vmap
  _, grads = _sgd_stepper(mesh, cfg, empty, dp)
  draws = [np.concatenate([x.ravel() for x in jax.tree.leaves(grads(empty, s)[0])]) for s in range(3)]
  z = np.concatenate(draws) / (sigma * clip / b)
  assert z.size > 1500
  assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
  assert abs(z.std() - 1.0) < 4.0 / np.sqrt(2 * z.size) + 0.01 and abs(z.mean()) < 4.0 / np.sqrt(z.size)
  assert not np.allclose(draws[0], draws[1])      # fresh noise every step key
  # With examples, the mean of the noisy gradient is sum(clipped) / B.
  full = _batch(data)
  mean = np.mean([np.concatenate([x.ravel() for x in jax.tree.leaves(grads(full, s)[0])]) for s in range(6)], 0)
  _, exact = _sgd_stepper(mesh, cfg, full, dp_sgd.DPStep(l2_clip=clip, noise_multiplier=0.0, expected_batch_size=b))
  # (exact's example keys differ per seed only through the toy loss's unused noise, so any seed works)
  target = np.concatenate([x.ravel() for x in jax.tree.leaves(exact(full, 0)[0])])
  assert np.abs(mean - target).max() < 5 * sigma * clip / b / np.sqrt(6)


def test_poisson_sampler_matches_the_accountant():
  n, b = 50, 5
  src = loader.ArraySource({"x": np.arange(n, dtype=np.float32)})
  it = loader.poisson_train_iterator(src, b, seed=3, process_index=0, process_count=1)
  s = it.poisson_sampling
  assert s.q == dpa.sampling_probability(b, n) == dpa.dp_sgd_summary(1.0, b, n, 10)["sampling_probability"]
  assert s.max_batch_size == loader.poisson_max_batch_size(n, b, 1e-15) and s.overflow_probability <= 1e-15
  steps = 2000
  member = np.zeros((steps, n), bool)
  for t in range(steps):
    batch = next(it)
    assert batch["x"].shape == (s.max_batch_size,)
    idx = batch["index"][batch["valid"]]
    assert (batch["index"][~batch["valid"]] == -1).all() and len(set(idx.tolist())) == len(idx)
    np.testing.assert_array_equal(batch["x"][batch["valid"]], idx.astype(np.float32))
    member[t, idx] = True
  freq = member.mean(0)
  # Each example joins each batch with probability q, independently of the others and of past steps.
  assert abs(freq.mean() - s.q) < 3 * np.sqrt(s.q * (1 - s.q) / (steps * n))
  assert scipy.stats.chisquare(member.sum(0)).pvalue > 1e-3        # the same q for every example
  sizes = member.sum(1)
  assert abs(sizes.var() / (n * s.q * (1 - s.q)) - 1) < 0.15         # Binomial(n, q), not a fixed size
  assert abs(np.mean(member[:, 0] & member[:, 1]) - s.q ** 2) < 4 * np.sqrt(s.q ** 2 / steps)
  assert abs(np.mean(member[1:, 0] & member[:-1, 0]) - s.q ** 2) < 4 * np.sqrt(s.q ** 2 / steps)
  # Two processes see the padded positions of the same global sample.
  parts = [next(loader.poisson_train_iterator(src, b, 3, process_index=p, process_count=2, max_batch_size=12))
           for p in range(2)]
  glob = np.empty(12, np.int32)
  glob[0::2], glob[1::2] = parts[0]["index"], parts[1]["index"]
  ref = loader.PoissonSampling(n, b, 12, 3).sample(0)
  np.testing.assert_array_equal(glob[:len(ref)], ref)
  assert (glob[len(ref):] == -1).all()
  # A tight cap truncates to a uniform subset and the overflows are counted exactly.
  tight = loader.PoissonSampling(n, b, 5, 3)
  over = [t for t in range(200) if tight.count(t) > 5]
  assert tight.overflow_steps(200) == len(over) > 0 and all(len(tight.sample(t)) == 5 for t in over)


def test_dp_json_records_dataset_epsilon(tmp_path, data):
  n, b, steps = 40, 4, 6
  src = loader.ArraySource({k: data[k][:n] for k in ("x", "y", "index", "poison")})
  cfg = tt.config(steps=steps, log_every=3, checkpoint_every=100, warmup_steps=0,
                  dp=dict(enabled=True, l2_clip=0.5, target_epsilon=2.0, accountant="rdp", delta=1e-3))
  it = trainer.train_iterator(cfg, src, b, seed=1, workdir=str(tmp_path))
  logs = []
  state = trainer.train(tt.ToyTask(), cfg, str(tmp_path), it, on_log=lambda s, m: logs.append(m))
  rec = json.load(open(os.path.join(tmp_path, dp_sgd.DP_FILE)))
  noise = dpa.calibrate_noise(2.0, b, n, steps, 1e-3, "rdp")   # (PLD calibration at small noise takes ~30 s)
  assert rec["complete"] and rec["steps"] == steps == int(state.step) and rec["private"]
  assert rec["noise_multiplier"] == pytest.approx(noise, rel=1e-12)
  assert rec["epsilon_pld"] == pytest.approx(dpa.epsilon(noise, b, n, steps, 1e-3, "pld"), rel=1e-9)
  assert rec["epsilon_rdp"] == pytest.approx(dpa.epsilon(noise, b, n, steps, 1e-3, "rdp"), rel=1e-9)
  assert rec["epsilon_pld"] < rec["epsilon_rdp"] <= 2.0
  assert rec["sampling_probability"] == b / n and rec["dataset_size"] == n and rec["l2_clip"] == 0.5
  assert rec["overflow_steps"] == 0 and rec["delta_total"] < 1.01e-3
  assert "dp_batch_size" in logs[0] and np.isfinite(logs[-1]["loss"])
  # A DP config with a plain (shuffled fixed-size) iterator is refused: the accountant would not apply.
  with pytest.raises(ValueError, match="Poisson"):
    trainer.train(tt.ToyTask(), cfg, str(tmp_path / "bad"), tt.make_iter(data, 4))
  with pytest.raises(ValueError, match="unknown config.train.dp"):
    optim.train_config(tt.config(dp=dict(enabled=True, clip=1.0)))


def _dp_run(workdir, data, steps, n=40, b=4):
  src = loader.ArraySource({k: data[k][:n] for k in ("x", "y", "index", "poison")})
  cfg = tt.config(steps=steps, log_every=2, checkpoint_every=2, warmup_steps=0,
                  dp=dict(enabled=True, l2_clip=0.5, noise_multiplier=1.0))
  it = trainer.train_iterator(cfg, src, b, seed=1, workdir=str(workdir))
  state = trainer.train(tt.ToyTask(), cfg, str(workdir), it)
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state.params))])


def test_dp_randomness_is_secret_per_run_and_resume_stays_exact(tmp_path, data):
  """Same config, same seeds: two DP runs still draw different batches and noise (the OS secret),
  a resumed run equals the straight run with the same secret, and the secret is in no other file."""
  a, b = _dp_run(tmp_path / "a", data, 4), _dp_run(tmp_path / "b", data, 4)
  assert np.abs(a - b).max() > 1e-3                          # different noise from the same config
  secret_a = json.load(open(tmp_path / "a" / dp_secret.FILE))
  assert secret_a != json.load(open(tmp_path / "b" / dp_secret.FILE))
  assert os.stat(tmp_path / "a" / dp_secret.FILE).st_mode & 0o777 == 0o600
  # Resume: the run's copy without its last checkpoint continues from step 2 to the same params.
  shutil.copytree(tmp_path / "a", tmp_path / "c")
  shutil.rmtree(tmp_path / "c" / "checkpoints" / "4")
  resumed, straight = _dp_run(tmp_path / "c", data, 4), a
  np.testing.assert_array_equal(resumed, straight)
  # The words appear in no other file of the run (checkpoints, dp.json, TensorBoard): as decimal
  # text, or as the raw little-endian bytes the noise key holds.
  words = secret_a["sampling_words"] + secret_a["noise_words"]
  seed = dp_secret.load_or_create(str(tmp_path / "a")).sampling_seed
  needles = [str(w).encode() for w in words if w > 10 ** 6] + [str(seed).encode(),
             np.asarray(secret_a["noise_words"][:2], "<u4").tobytes()]
  for root, _, files in os.walk(tmp_path / "a"):
    for name in files:
      if name == dp_secret.FILE:
        continue
      blob = open(os.path.join(root, name), "rb").read()
      assert not any(n in blob for n in needles), os.path.join(root, name)
  assert "seed" not in json.load(open(tmp_path / "a" / dp_sgd.DP_FILE))["sampling"]
  assert "<secret>" in repr(dp_secret.load_or_create(str(tmp_path / "a")))


def test_a_dp_iterator_without_a_workdir_is_refused(data):
  src = loader.ArraySource({k: data[k][:40] for k in ("x", "y", "index", "poison")})
  with pytest.raises(ValueError, match="needs the run's workdir"):
    trainer.train_iterator(tt.config(dp=dict(enabled=True)), src, 4, seed=1)


def test_seed_words_keep_small_seeds_streams():
  """Below 2^32 a seed is one word, as before 128-bit secrets: seeded (non-DP) streams are unchanged."""
  assert loader.seed_words(7) == [7] and loader.seed_words(2 ** 32 + 5) == [5, 1]
  s = loader.PoissonSampling(40, 4, 12, 7)
  np.testing.assert_array_equal(s.sample(3), loader.PoissonSampling(40, 4, 12, 7).sample(3))
  big = loader.PoissonSampling(40, 4, 12, 2 ** 100 + 7)     # the high bits count
  assert any(not np.array_equal(big.sample(t), s.sample(t)) for t in range(5))
