"""Orbax checkpoints of the train state AND the grain iterator: a restore is the exact continuation.

Layout: DIR/<step>/state (the TrainState pytree, sharded arrays) and DIR/<step>/data (one
JSON per process with its grain iterator state, via grain.checkpoint's orbax handler).
Saves are asynchronous: `save` returns once the arrays are copied off the devices and the
iterator state is written, so training continues (and may donate the state buffers) while
files are written. The trainer decides when to save (every N steps and at the end); the
manager keeps the last K.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp


def iterator_has_state(it: Any) -> bool:
  """True for grain iterators that can be checkpointed (DatasetIterator / DataLoaderIterator)."""
  return isinstance(it, (grain.DatasetIterator, grain.DataLoaderIterator))


class Checkpointer:
  """A CheckpointManager with the two items the trainer needs."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=int(keep) if keep else None,
                                             enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_iter: Any = None) -> None:
    """Starts saving `state` (and the iterator position, if it has one) as `step`."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None and iterator_has_state(data_iter):
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self._mngr.save(int(step), args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """The state saved at `step`, placed per the shardings in `abstract_state`.

    `abstract_state`: pytree of jax.ShapeDtypeStruct with .sharding set. `data_iter`, if
    given, is moved to the saved position in place (it must be built the same way).
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    restore_data = (data_iter is not None and iterator_has_state(data_iter)
                    and os.path.isdir(os.path.join(self.directory, str(step), "data")))
    if restore_data:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self._mngr.restore(int(step), args=ocp.args.Composite(**items))
    return out["state"]

  def reached_preemption(self, step: int) -> bool:
    """True when a multi-host preemption notice says to save now (False without jax.distributed)."""
    return bool(self._mngr.reached_preemption(int(step)))

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def load_variables(directory: str, step: Optional[int] = None) -> tuple[int, dict[str, Any]]:
  """(step, {'params', 'model_state', 'ema_params'}) as host numpy trees from another run.

  For starting a stage from the previous stage's checkpoint (their optimizer states differ,
  so only these are read; no target structure is needed).
  """
  mngr = ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    tree = mngr.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  finally:
    mngr.close()
  to_np = lambda t: jax.tree.map(np.asarray, t)
  return int(step), {k: to_np(tree.get(k)) for k in ("params", "model_state", "ema_params")}


def eval_params(variables: dict[str, Any]) -> Any:
  """The params to evaluate / sample with from load_variables' dict: the EMA params when the run
  kept them, else the params (TrainState.eval_params for a restored checkpoint)."""
  return variables["ema_params"] if variables.get("ema_params") else variables["params"]
