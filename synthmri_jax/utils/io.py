"""Atomic writes (a file is either absent or complete, never half-written), and thread-safe .npy reads."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path next to `path`; renames it onto `path` only if the body succeeds.

  `suffix` keeps extensions that writers look at (e.g. ".nii.gz", ".npy").
  """
  directory = os.path.dirname(os.path.abspath(path)) or "."
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp" + suffix, dir=directory)
  os.close(fd)
  os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets the usual umask mode
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_text_atomic(path: str, text: str) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


def write_json_atomic(path: str, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: str, default: Any = None) -> Any:
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def _json_default(o):
  import numpy as np
  if isinstance(o, np.generic):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"not JSON serialisable: {type(o)}")


# CPython 3.11's parser is not safe to enter from several threads at once: np.load parses the
# .npy header with ast.literal_eval, and grain's reader threads calling it together raised
# "SystemError: AST constructor recursion depth mismatch" in a quickstart run. Headers are
# parsed under one lock; the data are read outside it.
_NPY_HEADER_LOCK = threading.Lock()


def json_safe(obj: Any) -> Any:
  """NaN / inf -> None (e.g. the SD of one seed), so evaluation.json is strict JSON."""
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


def load_npy(path: str, mmap: bool = False) -> np.ndarray:
  """np.load of a .npy file, safe from many threads; mmap=True returns a read-only memmap."""
  with _NPY_HEADER_LOCK:
    arr = np.load(path, mmap_mode="r")
  return arr if mmap else np.array(arr)
