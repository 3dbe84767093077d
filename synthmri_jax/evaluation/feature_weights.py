"""User feature-extractor weights for an extra FD / KID (evaluate.feature_weights): loaded from a local
file or checkpoint directory only (never downloaded) and checked against the architecture, with
errors that name the file."""

from __future__ import annotations

import os
from typing import Any

import flax.serialization
import jax
import numpy as np

from synthmri_jax.training import checkpoint as ckpt_lib
from synthmri_jax.tasks.classifier import ClassifierTask
from synthmri_jax.utils.errors import UserInputError


class FeatureWeightsError(UserInputError, ValueError):
  """evaluate.feature_weights cannot be used; the message names the file."""


def variables_from_checkpoint(directory: str) -> dict[str, Any]:
  """{'params': (EMA if kept) params, **model_state} from the last checkpoint in a trainer's checkpoint dir."""
  _, v = ckpt_lib.load_variables(directory)
  params = ckpt_lib.eval_params(v)
  return {"params": params, **(v.get("model_state") or {})}


def load(path: str) -> dict[str, Any]:
  """{'params': ..., **model_state} from a local checkpoint directory (this project's trainer), a
  flax msgpack file (flax.serialization.to_bytes of {'params': ...}) or an .npz of 'params/a/b'
  keys. Never downloads; any failure is a FeatureWeightsError naming the file."""
  if not os.path.exists(path):
    raise FeatureWeightsError(f"{path}: evaluate.feature_weights file not found (a local file or checkpoint "
                              "directory is needed; nothing is downloaded)")
  try:
    if os.path.isdir(path):
      sub = os.path.join(path, "checkpoints")
      return variables_from_checkpoint(sub if os.path.isdir(sub) else path)
    if path.endswith(".npz"):
      tree: dict[str, Any] = {}
      with np.load(path, allow_pickle=False) as z:
        for key in z.files:
          node = tree
          parts = key.split("/")
          for p in parts[:-1]:
            node = node.setdefault(p, {})
          node[parts[-1]] = np.asarray(z[key])
    else:
      with open(path, "rb") as f:
        tree = flax.serialization.msgpack_restore(f.read())
  except FeatureWeightsError:
    raise
  except Exception as e:
    raise FeatureWeightsError(f"{path}: cannot load feature extractor weights ({type(e).__name__}: {e})") from None
  if not isinstance(tree, dict) or not tree:
    raise FeatureWeightsError(f"{path}: no parameters found")
  return tree if "params" in tree else {"params": tree}


def check(path: str, task: ClassifierTask, variables: dict[str, Any], image_shape: tuple[int, ...]) -> None:
  """Every parameter of the extractor architecture present with the right shape, or an error naming the file."""
  abstract = jax.eval_shape(lambda: task.model.init(jax.random.key(0), np.zeros((1,) + tuple(image_shape), np.float32)))
  want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(
      jax.tree.map(lambda b: getattr(b, "value", b), abstract["params"],
                   is_leaf=lambda b: hasattr(b, "value") and hasattr(b, "names")))}
  got = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(variables["params"])}
  problems = [f"{k}: missing" for k in want if k not in got]
  problems += [f"{k}: shape {got[k]} != {want[k]}" for k in want if k in got and got[k] != want[k]]
  problems += [f"{k}: not in the architecture" for k in got if k not in want]
  if problems:
    raise FeatureWeightsError(
        f"{path}: weights do not fit the extractor architecture (classifier.model overlaid with "
        f"evaluate.feature_model): {len(problems)} problem(s), e.g. " + "; ".join(problems[:5]))
