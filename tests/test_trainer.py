"""The shared trainer on one CPU device: learning, schedule, accumulation, freezing, skipping, EMA, bf16."""

import math
import os

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

import toy_task as tt
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.training import optim, trainer


@pytest.fixture(scope="module")
def data():
  return tt.make_data(64)


# One compiled step shared by the unit tests (compiles dominate on this CPU): Dense_0 frozen,
# EMA on, NaN loss on poisoned batches; constant lr so that accumulation can be compared.
TASK = tt.ToyTask(poison=True, frozen_prefix="Dense_0")
MAIN = dict(ema_decay=0.8, weight_decay=0.1, warmup_steps=0, steps=8)


@pytest.fixture(scope="module")
def main_stepper(data):
  return tt.make_stepper(TASK, tt.config(**MAIN), _batch(data, 0, 8))


def _batch(data, start, size):
  return {k: v[start:start + size] for k, v in data.items()}


def _host(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _bits_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(la, lb))


def test_loss_decreases_and_loop_outputs(tmp_path, data):
  logs = []
  cfg = tt.config(steps=60, lr=1e-2, warmup_steps=5, log_every=5, eval_every=30, checkpoint_every=30)
  state = trainer.train(tt.ToyTask(), cfg, str(tmp_path), tt.make_iter(data, 8), tt.eval_iter_fn(data, 8),
                        on_log=lambda s, m: logs.append((s, m)))
  losses = [m["loss"] for _, m in logs if "loss" in m]
  evals = [m["eval/sse"] for _, m in logs if "eval/sse" in m]
  assert int(state.step) == 60
  assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:2]), losses
  assert len(evals) == 2 and evals[-1] < evals[0]
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [30, 60]
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
  acc.Reload()
  tags = acc.Tags()
  for t in ("train/loss", "train/lr", "train/grad_norm", "train/steps_per_s", "eval/sse"):
    assert t in tags["scalars"], tags
  assert "summaries/input_mid_axial" in tags["images"]
  img = acc.Images("summaries/input_mid_axial")[-1]
  assert (img.width, img.height) == (tt.SPATIAL[1], tt.SPATIAL[0])

  # Staged training: a fresh run (other task config, other optimizer state) starts from these variables.
  staged = trainer.train(tt.ToyTask(frozen_prefix="Dense_0"), tt.config(steps=0), str(tmp_path / "stage2"),
                         tt.make_iter(data, 8), init_from=str(tmp_path / "checkpoints"))
  assert _bits_equal(_host(staged.params), _host(state.params))
  assert _bits_equal(_host(staged.model_state), _host(state.model_state))


def test_schedule_closed_form():
  cfg = optim.train_config(tt.config(steps=40, grad_accum=2, lr=2e-3, warmup_steps=4, end_lr_fraction=0.1))
  sched, total = optim.lr_schedule(cfg), 20  # 40 steps / 2 micro-batches per update
  for u in range(0, 25):
    if u < 4:
      want = 2e-3 * u / 4
    else:
      frac = min((u - 4) / (total - 4), 1.0)
      want = 2e-4 + (2e-3 - 2e-4) * 0.5 * (1 + math.cos(math.pi * frac))
    assert float(sched(u)) == pytest.approx(want, rel=1e-5, abs=1e-10), u
  const = optim.lr_schedule(optim.train_config(tt.config(schedule="constant", lr=1e-3, warmup_steps=2)))
  assert [float(const(u)) for u in (0, 1, 2, 50)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])


def test_lr_metric_and_grad_accum_equals_big_batch(data, main_stepper):
  k, micro = 4, 2
  big = _batch(data, 0, k * micro)
  init_acc, step_acc = tt.make_stepper(TASK, tt.config(**{**MAIN, "grad_accum": k, "steps": k * MAIN["steps"]}),
                                       _batch(data, 0, micro))
  init_big, step_big = main_stepper
  s_acc, s_big = init_acc(), init_big()
  p0 = _host(s_acc.params)
  assert _bits_equal(p0, _host(s_big.params))
  for i in range(k):
    s_acc, m = step_acc(s_acc, _batch(data, i * micro, micro), i)
    if i < k - 1:  # accumulating: no update yet, EMA untouched
      assert _bits_equal(_host(s_acc.params), p0) and _bits_equal(_host(s_acc.ema_params), p0)
  s_big, m_big = step_big(s_big, big, 0)
  assert float(m_big["lr"]) == pytest.approx(optim.train_config(tt.config(**MAIN)).lr)
  for a, b in zip(jax.tree.leaves(_host((s_acc.params, s_acc.ema_params))),
                  jax.tree.leaves(_host((s_big.params, s_big.ema_params)))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not _bits_equal(_host(s_big.params), p0)


def test_frozen_params_bit_identical(data, main_stepper):
  init, step = main_stepper
  state = init()
  before = _host(state.params)
  for i in range(4):
    state, _ = step(state, _batch(data, 8 * i, 8), i)
  after = _host(state.params)
  assert _bits_equal(before["Dense_0"], after["Dense_0"])  # frozen, though weight_decay=0.1
  assert _bits_equal(before["Dense_0"], _host(state.ema_params)["Dense_0"])
  assert not _bits_equal(before["Conv_0"], after["Conv_0"])
  assert not _bits_equal(before["Dense_1"], after["Dense_1"])
  # No Adam moments are kept for the frozen layer.
  frozen = [p for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state) if "Dense_0" in jax.tree_util.keystr(p)]
  assert frozen == []


def test_nonfinite_step_skipped_and_counted(data, main_stepper):
  init, step = main_stepper
  state, _ = step(init(), _batch(data, 0, 8), 0)
  before = _host(state)
  bad = _batch(data, 8, 8)
  bad["poison"] = bad["poison"].copy()
  bad["poison"][3] = 1.0
  for i in (1, 2):
    state, m = step(state, bad, i)
    assert int(m["skipped"]) == 1 and int(m["consecutive_skips"]) == i
  after = _host(state)
  for field in ("params", "opt_state", "model_state", "ema_params", "rng"):
    assert _bits_equal(getattr(before, field), getattr(after, field)), field
  assert int(after.step) == 3 and int(after.total_skips) == 2 and int(after.consecutive_skips) == 2
  state, m = step(state, _batch(data, 16, 8), 3)
  assert int(m["skipped"]) == 0 and int(state.consecutive_skips) == 0 and int(state.total_skips) == 2
  assert not _bits_equal(before.params, _host(state.params))


def test_consecutive_skips_stop_the_run(tmp_path, data):
  def poisoned():
    i = 0
    while True:
      b = _batch(data, (8 * i) % 64, 8)
      b["poison"] = np.ones(8, np.float32) if i >= 2 else b["poison"]
      i += 1
      yield b

  with pytest.raises(trainer.NonFiniteError, match=r"3 train steps in a row had a non-finite"):
    trainer.train(tt.ToyTask(poison=True), tt.config(steps=20, max_consecutive_skips=3), str(tmp_path), poisoned())


def test_ema_decay_warmup_closed_form():
  cfg = optim.train_config(tt.config(ema_decay=0.99))
  got = [float(optim.ema_decay_at(cfg, n)) for n in (1, 10, 100, 890, 5000)]
  np.testing.assert_allclose(got, [2 / 11, 11 / 20, 101 / 110, 0.99, 0.99], rtol=1e-6)
  cfg.ema_warmup = False
  assert float(optim.ema_decay_at(cfg, 1)) == pytest.approx(0.99)


def test_ema_closed_form(data, main_stepper):
  d = MAIN["ema_decay"]
  init, step = main_stepper
  state = init()
  ema = _host(state.params)
  assert _bits_equal(ema, _host(state.ema_params))
  for i in range(5):   # train.ema_warmup: update n decays by min(d, (1 + n) / (10 + n)), so 2/11 first
    state, _ = step(state, _batch(data, 8 * i, 8), i)
    p = _host(state.params)
    dn = min(d, (2.0 + i) / (11.0 + i))
    ema = jax.tree.map(lambda e, x: np.float32(dn) * e + np.float32(1 - dn) * x, ema, p)
  for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(_host(state.ema_params))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_bf16_compute_keeps_fp32_master(data, main_stepper):
  b = _batch(data, 0, 8)
  init32, step32 = main_stepper
  init16, step16 = tt.make_stepper(TASK, tt.config(**MAIN, compute_dtype="bfloat16"), b)
  s32, m32 = step32(init32(), b, 0)
  s16, m16 = step16(init16(), b, 0)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves((s16.params, s16.opt_state, s16.model_state))
             if np.issubdtype(x.dtype, np.floating))
  assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=5e-2)
  assert int(m16["skipped"]) == 0
  for a, b in zip(jax.tree.leaves(_host(s16.params)), jax.tree.leaves(_host(s32.params))):
    np.testing.assert_allclose(a, b, atol=5e-3)


def test_logical_rules_resolution():
  sizes = {"data": 2, "fsdp": 4, "tensor": 2}
  conv = ("conv_spatial",) * 3 + ("conv_in", "conv_out")
  assert mesh_lib.logical_to_spec(conv, (3, 3, 3, 8, 6), sizes) == jax.sharding.PartitionSpec(
      None, None, None, "fsdp", "tensor")
  # fsdp=4 does not divide 6 input channels: replicated on that dimension instead of failing.
  assert mesh_lib.logical_to_spec(conv, (3, 3, 3, 6, 6), sizes) == jax.sharding.PartitionSpec(
      None, None, None, None, "tensor")
  # batch over (data, fsdp): keeps the prefix of axes that divides.
  assert mesh_lib.logical_to_spec(("batch", None), (6, 3), sizes) == jax.sharding.PartitionSpec("data")
  with pytest.raises(ValueError, match="no rule"):
    mesh_lib.logical_to_spec(("embedd",), (8,), sizes)


def test_unknown_train_field_is_an_error():
  with pytest.raises(ValueError, match="unknown config.train fields"):
    optim.train_config(tt.config(learning_rate=1.0))
