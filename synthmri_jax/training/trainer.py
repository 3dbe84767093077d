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
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from typing import Any, Callable, Iterable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from synthmri_jax.training import checkpoint as ckpt_lib
from synthmri_jax.training import mesh as mesh_lib
from synthmri_jax.training import optim
from synthmri_jax.training import task as task_lib
from synthmri_jax.training.state import TrainState, unbox


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


# ------------------------------------------------------------------------------ steps


def _cast_floats(tree: Any, dtype) -> Any:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _all_finite(tree: Any) -> jax.Array:
  ok = jnp.array(True)
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      ok = ok & jnp.all(jnp.isfinite(x))
  return ok


def make_train_step(task: task_lib.Task, tx: optax.GradientTransformation, cfg) -> Callable:
  """Pure `(state, batch, rng) -> (new_state, metrics)`; rng is this step's typed key.

  A step whose loss, gradient or new model_state is not finite changes only step and the
  skip counters: params, opt_state, model_state and ema_params are returned bit-identical.
  Frozen params (task.trainable False) get a stop_gradient (no backward work) and keep their
  exact old values. With compute_dtype != float32 the float params and batch entries are
  cast for the loss; gradients and updates stay in the fp32 master params.
  """
  compute_dtype = jnp.dtype(cfg.compute_dtype)
  lr_fn = optim.current_lr(cfg)
  ema_decay = float(cfg.ema_decay)

  def train_step(state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
    mask = optim.trainable_mask(task, state.params)

    def loss_fn(params):
      params = jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p), mask, params)
      b = batch
      if compute_dtype != jnp.float32:
        params, b = _cast_floats(params, compute_dtype), _cast_floats(batch, compute_dtype)
      loss, (metrics, new_ms) = task.loss(params, state.model_state, b, rng, state.step)
      return jnp.asarray(loss, jnp.float32), (metrics, new_ms)

    (loss, (metrics, new_ms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    new_ms = jax.tree.map(lambda new, old: jnp.asarray(new).astype(old.dtype), new_ms, state.model_state)
    finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new_ms)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = jax.tree.map(lambda t, old, new: new if t else old, mask, state.params, params)
    ema = state.ema_params
    if ema is not None:
      applied = optim.update_applied(opt_state, cfg)
      ema = jax.tree.map(
          lambda t, e, p: jnp.where(applied, ema_decay * e + (1.0 - ema_decay) * p, e) if t else e,
          mask, ema, params)

    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    skipped = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        model_state=keep(new_ms, state.model_state),
        ema_params=None if ema is None else keep(ema, state.ema_params),
        consecutive_skips=jnp.where(finite, 0, state.consecutive_skips + 1),
        total_skips=state.total_skips + skipped)
    out = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    out.update(loss=loss, grad_norm=optax.tree.norm(grads), lr=lr_fn(state.opt_state),
               skipped=skipped, consecutive_skips=new_state.consecutive_skips,
               total_skips=new_state.total_skips)
    return new_state, out

  return train_step


def _reduce_eval(outputs: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Sums per-batch eval metrics; divides by the summed 'count' if present, else by #batches."""
  if not outputs:
    return {}
  sums = {k: float(np.sum([np.asarray(o[k], np.float64) for o in outputs])) for k in outputs[0]}
  denom = sums.pop("count") if "count" in sums else float(len(outputs))
  return {k: v / max(denom, 1e-12) for k, v in sums.items()}


# ------------------------------------------------------------------------------ logging


def _png(img: np.ndarray) -> bytes:
  """Minimal PNG encoder (uint8 HxWxC, C in 1/3/4) so TensorBoard images need no TF/PIL."""
  h, w, c = img.shape
  color = {1: 0, 3: 2, 4: 6}[c]
  raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))
  chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


class SummaryWriter:
  """TensorBoard event writer on tensorboard's own EventFileWriter (flax's needs TensorFlow).

  Only process 0 writes; elsewhere every call is a no-op.
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self._w = EventFileWriter(logdir) if enabled else None

  def _add(self, step: int, values: list) -> None:
    if self._w is not None and values:
      self._w.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                        summary=summary_pb2.Summary(value=values)))

  def scalars(self, step: int, scalars: dict[str, float]) -> None:
    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in scalars.items()])

  def images(self, step: int, images: dict[str, Any]) -> None:
    values = []
    for k, v in images.items():
      img = task_lib.as_image(v)
      values.append(summary_pb2.Summary.Value(tag=k, image=summary_pb2.Summary.Image(
          height=img.shape[0], width=img.shape[1], colorspace=img.shape[2], encoded_image_string=_png(img))))
    self._add(step, values)

  def flush(self) -> None:
    if self._w is not None:
      self._w.flush()

  def close(self) -> None:
    if self._w is not None:
      self._w.close()


def _fmt_time(s: float) -> str:
  if not np.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _window_means(window: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Means over the logged window, ignoring skipped steps (their metrics are NaN by definition)."""
  ok = [m for m in window if int(m["skipped"]) == 0]
  out = {}
  for k in window[-1]:
    if k in ("skipped",):
      out[k] = float(sum(int(m[k]) for m in window))
    elif k in ("consecutive_skips", "total_skips"):
      out[k] = float(window[-1][k])
    else:
      out[k] = float(np.mean([np.asarray(m[k], np.float64) for m in ok])) if ok else float("nan")
  return out


# ------------------------------------------------------------------------------ the loop


def train(task: task_lib.Task, config, workdir: str, train_iter: Iterable[dict[str, np.ndarray]],
          eval_iter_fn: Optional[Callable[[], Iterable[dict[str, np.ndarray]]]] = None, *,
          mesh: Optional[jax.sharding.Mesh] = None, init_from: Optional[str] = None,
          on_log: Optional[Callable[[int, dict[str, float]], None]] = None) -> TrainState:
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
  """
  cfg = optim.train_config(config)
  mesh = mesh_lib.mesh_from_config(config) if mesh is None else mesh
  is_main = jax.process_index() == 0
  say = (lambda msg: print(f"[{task.name}] {msg}", flush=True)) if is_main else (lambda msg: None)
  bsh, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)

  it: Iterator = iter(train_iter)
  first = shard_batch(next(it), bsh)
  init_fn, abstract_state, state_sh, tx = build_state(task, cfg, mesh, first)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints)
  writer = SummaryWriter(os.path.join(workdir, "tb"), enabled=is_main)
  try:
    latest = ckpt.latest_step()
    if latest is not None:
      state = ckpt.restore(latest, abstract_state, it)
      pending = None
      say(f"resumed from {ckpt.directory} step {latest}"
          + ("" if ckpt_lib.iterator_has_state(it) else " (the data iterator is not a grain iterator: its position was not restored)"))
    else:
      state = init_fn()
      pending = first
      if init_from:
        state, msg = _load_into(state, state_sh, init_from)
        say(msg)
    del first

    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
    start, total = int(jax.device_get(state.step)), int(cfg.steps)
    say(f"{n_params:,} params, mesh {dict(mesh.shape)}, steps {start}->{total}, "
        f"grad_accum {cfg.grad_accum}, compute {cfg.compute_dtype}")

    evaluate, summaries = task_lib.evaluate_fn(task), task_lib.summaries_fn(task)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      p_step = jax.jit(make_train_step(task, tx, cfg), in_shardings=(state_sh, bsh, rep),
                       out_shardings=(state_sh, rep), donate_argnums=0)
      p_eval = None
      if evaluate is not None:
        p_eval = jax.jit(evaluate, in_shardings=(state_sh.params, state_sh.model_state, bsh), out_shardings=rep)

      def run_eval(step: int) -> None:
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
          if on_log is not None and is_main:
            on_log(step, result)
        writer.flush()

      def check_skips(metrics) -> None:
        if cfg.max_consecutive_skips > 0 and int(metrics["consecutive_skips"]) >= cfg.max_consecutive_skips:
          raise NonFiniteError(
              f"[{task.name}] {int(metrics['consecutive_skips'])} train steps in a row had a non-finite loss, "
              f"gradient or model state (train.max_consecutive_skips={cfg.max_consecutive_skips}); their "
              f"updates were skipped, so params are those of the last finite step ({int(metrics['total_skips'])} "
              f"skipped in total). Lower train.lr, enable train.clip_norm, or check the data / loss for "
              f"NaN/Inf. Checkpoints in {ckpt.directory} hold only finite states.")

      run_key = jax.random.wrap_key_data(np.asarray(jax.device_get(state.rng)))
      window, prev, preempted = [], None, False
      t_window, steps_in_window = time.time(), 0
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
        steps_in_window += 1
        if prev is not None:
          check_skips(prev)  # one step behind, so the host never waits for the step it just queued
        prev = metrics
        window.append(metrics)

        if step % cfg.log_every == 0 or step == total:
          means = _window_means(jax.device_get(window))
          window = []
          dt = time.time() - t_window
          means["steps_per_s"] = steps_in_window / max(dt, 1e-9)
          t_window, steps_in_window = time.time(), 0
          writer.scalars(step, {f"train/{k}": v for k, v in means.items()})
          writer.flush()
          eta = (total - step) / max(means["steps_per_s"], 1e-9)
          say(f"step {step}/{total} loss {means['loss']:.4g} grad_norm {means['grad_norm']:.3g} "
              f"lr {means['lr']:.3g} | {means['steps_per_s']:.2f} steps/s ETA {_fmt_time(eta)}"
              + (f" | skipped {int(means['total_skips'])}" if means["total_skips"] else ""))
          if on_log is not None and is_main:
            on_log(step, means)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != total:
          run_eval(step)
          t_window = time.time()
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
    return state
  finally:
    ckpt.close()
    writer.close()


_AllData = mesh_lib._AllData  # kept for callers that built a mesh with it; prefer mesh.mesh_from_config
