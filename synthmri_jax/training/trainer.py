"""The one train loop every model uses: a Task (task.py) in, a trained TrainState out.

    state = trainer.train(task, config, workdir, train_iter, eval_iter_fn)

- mesh from config.mesh (mesh.make_mesh); the state is created already sharded:
  jax.eval_shape(task.init) -> logical names -> NamedShardings (mesh.tree_shardings) ->
  jax.jit(init, out_shardings=...). Optimizer moments take their parameter's sharding.
- the step is jax.jit(make_train_step(...), in_shardings, out_shardings, donate_argnums=0),
  traced inside jax.set_mesh(mesh) with the logical-axis rules set.
- host-local numpy batches become global arrays split over ('data', 'fsdp').
- WORKDIR/checkpoints: async orbax saves every train.checkpoint_every steps and at the end,
  with the grain iterator position; a run with a checkpoint in WORKDIR resumes from it.
- WORKDIR/tb: TensorBoard scalars (train/*, eval/*) and task.summaries images.

DP-SGD (config.train.dp.enabled): the step is dp_sgd.make_dp_step; the mechanism, what it does
not update and how it is accounted are in training/dp_sgd.py.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from synthmri_jax.data import loader as loader_lib
from synthmri_jax.training import checkpoint as ckpt_lib
from synthmri_jax.training import dp_secret, dp_sgd, train_step
from synthmri_jax.training import summaries as summaries_lib
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.training import optim
from synthmri_jax.training import task as task_lib
from synthmri_jax.sharding import unbox
from synthmri_jax.training.state import TrainState



class NonFiniteError(RuntimeError):
  """Raised when train.max_consecutive_skips steps in a row had a non-finite loss or gradient."""


# ------------------------------------------------------------------------------ data


def shard_batch(batch: dict[str, Any], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays split along the leading (batch) dimension.

  Non-numeric entries (e.g. participant id strings) stay on the host and are dropped.
  """
  out = {}
  for k, v in batch.items():
    a = np.asarray(v)
    if a.dtype.kind not in "biuf":
      continue
    try:
      out[k] = jax.make_array_from_process_local_data(sharding, a)
    except ValueError as e:
      n = int(np.prod([sharding.mesh.shape[a_] for a_ in ("data", "fsdp")]))
      raise ValueError(f"batch entry {k!r} with shape {a.shape} cannot be split over data*fsdp = {n} "
                       f"devices: the global batch size must be a multiple of {n}") from e
  return out


# ------------------------------------------------------------------------------ state


def _opt_state_shardings(abstract_opt: Any, abstract_params: Any, params_sh: Any, rep) -> Any:
  """Each optimizer-state leaf that mirrors a parameter (Adam moments, MultiSteps' accumulator)
  takes that parameter's sharding; counters and everything else are replicated.

  A leaf mirrors a parameter when the trailing dict keys of its path are the parameter's path
  and the shapes agree (optax.tree_map_params cannot see through multi_transform's masks).
  """
  table = {}
  for (path, a), s in zip(jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree.leaves(params_sh)):
    table[optim.path_names(path)] = (tuple(a.shape), s)

  def one(path, leaf):
    keys = []
    for k in reversed(path):
      if not isinstance(k, jax.tree_util.DictKey):
        break
      keys.append(str(k.key))
    hit = table.get(tuple(reversed(keys)))
    return hit[1] if hit is not None and hit[0] == tuple(leaf.shape) else rep

  return jax.tree_util.tree_map_with_path(one, abstract_opt)


def build_state(task: task_lib.Task, cfg, mesh: jax.sharding.Mesh, batch: dict[str, jax.Array]):
  """(init_fn, abstract_state, state_shardings, tx) without allocating anything.

  init_fn() materialises the state directly in its shardings; abstract_state (shapes, dtypes
  and shardings) is the restore target when a checkpoint exists. Call it outside
  jax.set_mesh: inside, flax's boxes would constrain each param at init with flax's own
  resolver (which rejects repeated names and non-dividing axes).
  """
  rep = mesh_lib.replicated(mesh)
  init_key, run_key = jax.random.split(jax.random.key(int(cfg.seed)))
  boxed_params, boxed_ms = jax.eval_shape(task.init, init_key, batch)
  params_sh = mesh_lib.tree_shardings(boxed_params, mesh)
  ms_sh = mesh_lib.tree_shardings(boxed_ms, mesh)
  abstract_params = unbox(boxed_params)
  tx = optim.make_optimizer(cfg, optim.trainable_mask(task, abstract_params))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  use_ema = cfg.ema_decay > 0
  state_sh = TrainState(
      step=rep, params=params_sh, opt_state=_opt_state_shardings(abstract_opt, abstract_params, params_sh, rep),
      model_state=ms_sh, ema_params=params_sh if use_ema else None, rng=rep, consecutive_skips=rep,
      total_skips=rep)

  def init(init_key, run_key_data, batch):
    params, model_state = task.init(init_key, batch)
    params, model_state = unbox(params), unbox(model_state)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params), model_state=model_state,
                      ema_params=jax.tree.map(jnp.copy, params) if use_ema else None, rng=run_key_data,
                      consecutive_skips=zero, total_skips=zero)

  run_key_data = jax.random.key_data(run_key)
  abstract_state = jax.eval_shape(init, init_key, run_key_data, batch)
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_state, state_sh)
  jitted = jax.jit(init, out_shardings=state_sh)
  init_fn = lambda: jitted(init_key, run_key_data, batch)
  return init_fn, abstract_state, state_sh, tx


def _load_into(state: TrainState, state_sh: TrainState, directory: str) -> tuple[TrainState, str]:
  """Overwrites params / model_state leaves with those of the same path and shape from another run."""
  step, loaded = ckpt_lib.load_variables(directory)
  stats = {}

  def merge(name, tree, shardings, source):
    hit, total = 0, 0

    def one(path, x, s):
      nonlocal hit, total
      total += 1
      node = source
      for k in optim.path_names(path):
        node = node.get(k) if isinstance(node, dict) else None
      if node is None or tuple(np.shape(node)) != tuple(x.shape):
        return x
      hit += 1
      return jax.device_put(np.asarray(node, dtype=x.dtype), s)

    out = jax.tree_util.tree_map_with_path(one, tree, shardings)
    stats[name] = f"{hit}/{total}"
    return out

  params = merge("params", state.params, state_sh.params, loaded["params"] or {})
  model_state = merge("model_state", state.model_state, state_sh.model_state, loaded["model_state"] or {})
  ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
  msg = f"initialised from {directory} step {step}: params {stats['params']}, model_state {stats['model_state']} leaves"
  return state.replace(params=params, model_state=model_state, ema_params=ema), msg


def make_train_step(task: task_lib.Task, tx: optax.GradientTransformation, cfg,
                    dp: Optional[dp_sgd.DPStep] = None) -> Callable:
  """The pure `(state, batch, rng) -> (new_state, metrics)` step: train_step.make_step, or with `dp`
  the DP-SGD step (dp_sgd.make_dp_step)."""
  return train_step.make_step(task, tx, cfg) if dp is None else dp_sgd.make_dp_step(task, tx, cfg, dp)


def jit_train_step(task: task_lib.Task, tx: optax.GradientTransformation, cfg, state_sh: TrainState,
                   mesh: jax.sharding.Mesh, dp: Optional[dp_sgd.DPStep] = None) -> Callable:
  """The jitted step `train` runs: state in its shardings (donated), the batch split over
  ('data', 'fsdp'), the key and the metrics replicated. Trace it inside jax.set_mesh(mesh) with the
  logical-axis rules set (tools/aot_compile.py lowers this same function for other platforms)."""
  rep = mesh_lib.replicated(mesh)
  return jax.jit(make_train_step(task, tx, cfg, dp), in_shardings=(state_sh, mesh_lib.batch_sharding(mesh), rep),
                 out_shardings=(state_sh, rep), donate_argnums=0)


def train_iterator(config, source: loader_lib.Source, global_batch_size: int, seed: int, *,
                   augment: Optional[loader_lib.Augment] = None,
                   mesh: Optional[jax.sharding.Mesh] = None, workdir: Optional[str] = None) -> Any:
  """The train iterator a stage should hand to `train`: loader.train_iterator, or with
  config.train.dp.enabled the Poisson-sampled one (expected batch global_batch_size, padded
  to a multiple of the mesh's data*fsdp size) that the accountant assumes.

  A DP iterator ignores `seed`: its rows are drawn from the secret of `workdir` (the directory
  later given to `train`; dp_secret.load_or_create), so the batches cannot be regenerated from
  the config."""
  cfg = optim.train_config(config)
  if not cfg.dp.enabled:
    return loader_lib.train_iterator(source, global_batch_size, seed, augment=augment)
  if workdir is None:
    raise ValueError("config.train.dp.enabled: trainer.train_iterator needs the run's workdir, whose secret "
                     "seeds the Poisson sampler (a config seed would make the batches public)")
  shards = 1 if mesh is None else mesh_lib.batch_shards(mesh)
  return loader_lib.poisson_train_iterator(
      source, global_batch_size, dp_secret.load_or_create(workdir).sampling_seed,
      max_batch_size=int(cfg.dp.max_batch_size),
      overflow_tolerance=float(cfg.dp.overflow_tolerance), multiple_of=shards, augment=augment)


def _reduce_eval(outputs: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Sums per-batch eval metrics; divides by the summed 'count' if present, else by #batches."""
  if not outputs:
    return {}
  sums = {k: float(np.sum([np.asarray(o[k], np.float64) for o in outputs])) for k in outputs[0]}
  denom = sums.pop("count") if "count" in sums else float(len(outputs))
  return {k: v / max(denom, 1e-12) for k, v in sums.items()}


# ------------------------------------------------------------------------------ the loop


def _check_skips(metrics: dict[str, Any], max_consecutive: int, name: str, ckpt_dir: str) -> None:
  if max_consecutive > 0 and int(metrics["consecutive_skips"]) >= max_consecutive:
    raise NonFiniteError(
        f"[{name}] {int(metrics['consecutive_skips'])} train steps in a row had a non-finite loss, "
        f"gradient or model state (train.max_consecutive_skips={max_consecutive}); their "
        f"updates were skipped, so params are those of the last finite step ({int(metrics['total_skips'])} "
        f"skipped in total). Lower train.lr, enable train.clip_norm, or check the data / loss for "
        f"NaN/Inf. Checkpoints in {ckpt_dir} hold only finite states.")


def _evaluate(state: TrainState, step: int, eval_iter_fn, p_eval, summaries, bsh, writer: summaries_lib.SummaryWriter,
              say: Callable[[str], None], on_log) -> None:
  """task.evaluate over eval_iter_fn's batches (on the EMA params if kept) and task.summaries of its first batch."""
  if eval_iter_fn is None or (p_eval is None and summaries is None):
    return
  t0 = time.time()
  outputs, first_batch = [], None
  for b in eval_iter_fn():
    gb = shard_batch(b, bsh)
    if first_batch is None:
      first_batch = gb
    if p_eval is None:
      break
    outputs.append(p_eval(state.eval_params, state.model_state, gb))
  result = {f"eval/{k}": v for k, v in _reduce_eval(jax.device_get(outputs)).items()}
  if summaries is not None and first_batch is not None:
    writer.images(step, {f"summaries/{k}": v for k, v in
                         summaries(state.eval_params, state.model_state, first_batch).items()})
  if result:
    writer.scalars(step, result)
    say(f"eval step {step}: " + ", ".join(f"{k[5:]} {v:.4g}" for k, v in sorted(result.items()))
        + f" ({time.time() - t0:.1f}s)")
    if on_log is not None:
      on_log(step, result)
  writer.flush()


def _start(ckpt, latest, abstract_state, it, init_fn, first, init_from, state_sh, say):
  """(state, the batch to train on first): the latest checkpoint with the iterator's position, or
  a fresh init (optionally loaded from init_from) that trains on the batch `build_state` shaped."""
  if latest is not None:
    state = ckpt.restore(latest, abstract_state, it)
    say(f"resumed from {ckpt.directory} step {latest}"
        + ("" if ckpt_lib.iterator_has_state(it) else " (the data iterator is not a grain iterator: its position was not restored)"))
    return state, None
  state = init_fn()
  if init_from:
    state, msg = _load_into(state, state_sh, init_from)
    say(msg)
  return state, first


class _LogWindow:
  """The metrics since the last log line: their means, the step rate, TensorBoard and on_log."""

  def __init__(self, writer, say, total: int, on_log):
    self.writer, self.say, self.total, self.on_log = writer, say, total, on_log
    self.metrics: list = []
    self.restart_clock()

  def restart_clock(self) -> None:
    """Starts timing anew (after an evaluation, which must not count as training time)."""
    self.t0, self.steps = time.time(), 0

  def add(self, metrics) -> None:
    self.metrics.append(metrics)
    self.steps += 1

  def flush(self, step: int) -> None:
    means = summaries_lib.window_means(jax.device_get(self.metrics))
    means["steps_per_s"] = self.steps / max(time.time() - self.t0, 1e-9)
    self.metrics = []
    self.restart_clock()
    summaries_lib.log_train(self.writer, self.say, step, self.total, means)
    if self.on_log is not None:
      self.on_log(step, means)


def train(task: task_lib.Task, config, workdir: str, train_iter: Iterable[dict[str, np.ndarray]],
          eval_iter_fn: Optional[Callable[[], Iterable[dict[str, np.ndarray]]]] = None, *,
          mesh: Optional[jax.sharding.Mesh] = None, init_from: Optional[str] = None,
          on_log: Optional[Callable[[int, dict[str, float]], None]] = None,
          dp_sampling: Optional[loader_lib.PoissonSampling] = None) -> TrainState:
  """Trains `task` for config.train.steps steps (resuming from WORKDIR/checkpoints) and returns the state.

  train_iter: endless iterator of host-local numpy batch dicts (this host's share of the global
    batch); a grain DatasetIterator is checkpointed with the state (others restart from their
    beginning on resume).
  eval_iter_fn: returns a fresh finite iterable of eval batches; used every train.eval_every
    steps and at the end (task.evaluate on the EMA params if kept; task.summaries on its first
    batch).
  mesh: defaults to mesh.make_mesh(config.mesh) (all devices on 'data' if config has no mesh).
  init_from: a checkpoint directory of another run whose params / model_state (same path and
    shape) replace the fresh init when this run starts from scratch (staged training).
  on_log: called on process 0 with (step, {name: value}) at every log and eval.
  dp_sampling: with train.dp.enabled, the Poisson sampler of train_iter (default: its
    `.poisson_sampling`, set by loader.poisson_train_iterator); WORKDIR/dp.json records epsilon.
  """
  cfg = optim.train_config(config)
  dp_step, dp_record, dp_sampling = dp_sgd.setup(cfg, train_iter, dp_sampling, task.name)
  mesh = mesh_lib.mesh_from_config(config) if mesh is None else mesh
  is_main = jax.process_index() == 0
  say = (lambda msg: print(f"[{task.name}] {msg}", flush=True)) if is_main else (lambda msg: None)
  bsh, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)

  it: Iterator = iter(train_iter)
  first = shard_batch(next(it), bsh)
  if dp_step is not None:
    dp_sgd.check_batch(first, dp_sampling, task.name)
  init_fn, abstract_state, state_sh, tx = build_state(task, cfg, mesh, first)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  writer = summaries_lib.SummaryWriter(os.path.join(workdir, "tb"), enabled=is_main)
  try:
    latest = ckpt.latest_step()
    state, pending = _start(ckpt, latest, abstract_state, it, init_fn, first, init_from, state_sh, say)
    del first

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
    start, total = int(jax.device_get(state.step)), int(cfg.steps)
    say(f"{n_params:,} params, mesh {dict(mesh.shape)}, steps {start}->{total}, "
        f"grad_accum {cfg.grad_accum}, compute {cfg.compute_dtype}")
    if dp_step is not None:
      planned = dp_sgd.announce(say, task.name, workdir, dp_step, dp_record, dp_sampling, total,
                             bool(jax.tree.leaves(abstract_state.model_state)))

    evaluate, summaries = task_lib.evaluate_fn(task), task_lib.summaries_fn(task)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      p_step = jit_train_step(task, tx, cfg, state_sh, mesh, dp_step)
      p_eval = None
      if evaluate is not None:
        p_eval = jax.jit(evaluate, in_shardings=(state_sh.params, state_sh.model_state, bsh), out_shardings=rep)

      def run_eval(step: int) -> None:
        _evaluate(state, step, eval_iter_fn, p_eval, summaries, bsh, writer, say, on_log if is_main else None)

      check_skips = lambda metrics: _check_skips(metrics, cfg.max_consecutive_skips, task.name, ckpt.directory)

      # DP: the noise (and every per-example key) comes from the run's secret, not the seeded state.rng.
      run_key = (dp_secret.load_or_create(workdir).noise_key() if dp_step is not None
                 else jax.random.wrap_key_data(np.asarray(jax.device_get(state.rng))))
      window, prev, preempted = _LogWindow(writer, say, total, on_log if is_main else None), None, False
      step = start
      while step < total:
        if pending is not None:
          batch, pending = pending, None
        else:
          try:
            batch = shard_batch(next(it), bsh)
          except StopIteration:
            say(f"train data exhausted after step {step} (of {total})")
            break
        state, metrics = p_step(state, batch, jax.random.fold_in(run_key, step))
        step += 1
        if prev is not None:
          check_skips(prev)  # one step behind, so the host never waits for the step it just queued
        prev = metrics
        window.add(metrics)
        if step % cfg.log_every == 0 or step == total:
          window.flush(step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != total:
          run_eval(step)
          window.restart_clock()
        preempted = ckpt.reached_preemption(step)
        if step % cfg.checkpoint_every == 0 or step == total or preempted:
          ckpt.save(step, state, it)
        if preempted:
          say(f"preemption notice: saved step {step}, stopping; rerun to resume")
          break
      if prev is not None:
        check_skips(prev)
      if step > start and ckpt.latest_step() != step:  # data ran out before train.steps
        ckpt.save(step, state, it)
      if not preempted and (step > start or latest is None):
        run_eval(step)
      if dp_step is not None:
        done = planned if step == total else dp_sgd.dp_record_for_steps(dp_record, dp_sampling, step)
        dp_sgd.finish(say, workdir, done, step, complete=not preempted and step >= total)
    return state
  finally:
    ckpt.close()
    writer.close()
