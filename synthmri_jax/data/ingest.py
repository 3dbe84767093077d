"""Ingest of one scan onto the prepared grid, shared by the prepare stage and the synthetic-cohort
loader (so a synthetic scan goes through exactly the real data's preprocessing), and the worker
pool both run it in."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
from typing import Any, Callable, Sequence

import numpy as np

from synthmri_jax.data import nifti
from synthmri_jax.utils import durations, io

PREPROCESS_VERSION = 1
ON_BAD_FILE = ("error", "skip")


def save_npy(path: str, array: np.ndarray) -> None:
  with io.atomic_path(path, suffix=".npy") as tmp:
    np.save(tmp, array)


def process_row(task: dict[str, Any]) -> tuple[int, float]:
  """Preprocesses one scan (or, with task["prepared_space"], reads one already in the prepared
  space) and writes its cache files (mask first, image last). Runs in a worker process; only the
  index and the time travel back."""
  t0 = time.time()
  try:
    if task.get("prepared_space"):
      out = nifti.read_prepared_space(task["paths"], task["mask_path"] or None, shape=task["shape"],
                                      spacing_mm=task["spacing_mm"], normalization=task["normalization"])
    else:
      out = nifti.preprocess(task["paths"], task["mask_path"] or None, shape=task["shape"],
                             spacing_mm=task["spacing_mm"], normalization=task["normalization"],
                             clip_percentiles=task["clip_percentiles"])
  except nifti.VolumeError:
    raise
  except Exception as e:
    raise RuntimeError(f"preprocessing {', '.join(task['paths'])} failed: {type(e).__name__}: {e}") from e
  if task["mask_out"]:
    save_npy(task["mask_out"], out.mask)
  save_npy(task["image_out"], out.image)
  return task["index"], time.time() - t0


class Progress:
  """'prepare: scans 12/160 (3 cached before) | 2.10/s | ETA 1m04s', at most once a second."""

  def __init__(self, what: str, total: int, done: int = 0, stage: str = "prepare"):
    self.stage, self.what, self.total, self.done, self.start_done = stage, what, total, done, done
    self.t0 = self.last = time.time()

  def update(self, n: int = 1) -> None:
    self.done += n
    now = time.time()
    if now - self.last < 1.0 and self.done < self.total:
      return
    self.last = now
    rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    before = f" ({self.start_done} cached before)" if self.start_done else ""
    print(f"{self.stage}: {self.what} {self.done}/{self.total}{before} | {rate:.2f}/s | ETA {durations.short(eta)}", flush=True)


class WorkerPool:
  """A spawn-based process pool when workers > 1 (fork is unsafe once jax or threads are up),
  else plain in-process calls; `map` keeps order, `run_unordered` yields as results arrive."""

  def __init__(self, workers: int):
    self.workers = max(1, workers)
    self._ex: concurrent.futures.ProcessPoolExecutor | None = None

  def __enter__(self) -> "WorkerPool":
    return self

  def __exit__(self, *exc) -> None:
    if self._ex is not None:
      self._ex.shutdown(wait=True, cancel_futures=True)

  def _executor(self, n_items: int) -> concurrent.futures.ProcessPoolExecutor | None:
    if self.workers <= 1 or n_items <= 1:
      return None
    if self._ex is None:
      self._ex = concurrent.futures.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
    return self._ex

  def map(self, fn: Callable, *iterables) -> list:
    """map(fn, *iterables) as a list, in order."""
    args = [list(it) for it in iterables]
    ex = self._executor(len(args[0]) if args else 0)
    return list(map(fn, *args)) if ex is None else list(ex.map(fn, *args))

  def progress_map(self, what: str) -> Callable:
    """A map(fn, *iterables) -> list, in order, printing progress lines as items finish."""

    def map_fn(fn: Callable, *iterables) -> list:
      args = [list(it) for it in iterables]
      n = len(args[0]) if args else 0
      ex = self._executor(n)
      results = map(fn, *args) if ex is None else ex.map(fn, *args)
      progress, out = Progress(what, n), []
      for r in results:
        out.append(r)
        progress.update()
      return out

    return map_fn

  def run_unordered(self, fn: Callable, items: Sequence[Any]):
    ex = self._executor(len(items))
    if ex is None:
      for item in items:
        yield fn(item)
      return
    futures = [ex.submit(fn, item) for item in items]
    try:
      for f in concurrent.futures.as_completed(futures):
        yield f.result()
    finally:
      for f in futures:
        f.cancel()
