"""What the loop writes for the operator: TensorBoard scalars and images (without TensorFlow), the
means of a log window, and the console line of a log step."""

from __future__ import annotations

import struct
import time
import zlib
from typing import Any, Callable

import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from synthmri_jax.training import task as task_lib
from synthmri_jax.utils import durations


def png(img: np.ndarray) -> bytes:
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
          height=img.shape[0], width=img.shape[1], colorspace=img.shape[2], encoded_image_string=png(img))))
    self._add(step, values)

  def flush(self) -> None:
    if self._w is not None:
      self._w.flush()

  def close(self) -> None:
    if self._w is not None:
      self._w.close()


def window_means(window: list[dict[str, np.ndarray]]) -> dict[str, float]:
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


def log_train(writer: SummaryWriter, say: Callable[[str], None], step: int, total: int,
               means: dict[str, float]) -> None:
  writer.scalars(step, {f"train/{k}": v for k, v in means.items()})
  writer.flush()
  eta = (total - step) / max(means["steps_per_s"], 1e-9)
  say(f"step {step}/{total} loss {means['loss']:.4g} grad_norm {means['grad_norm']:.3g} "
      f"lr {means['lr']:.3g} | {means['steps_per_s']:.2f} steps/s ETA {durations.short(eta)}"
      + (f" | skipped {int(means['total_skips'])}" if means["total_skips"] else ""))
