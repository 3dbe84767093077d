"""Loader benchmark: volumes/s and MB/s of the training iterator, with and without augmentation.

Writes a synthetic prepared cohort (the data/cache.py layout: cohort.tsv, cache/*.npy, prepared.json) to a
temporary directory, so it needs no real cohort, then times synthmri_jax.data.loader.train_iterator on it.
The files were just written, so reads come from the page cache: this measures the pipeline (npy decode,
augmentation, batching, threads), not the disk.

  python tools/bench_loader.py                                   # quickstart 4 mm and 1 mm sizes
  python tools/bench_loader.py --sizes 40x48x40:256 --batch 8 --threads 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pandas as pd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain  # noqa: E402

from synthmri_jax.data import cache, loader  # noqa: E402
from synthmri_jax.utils import io  # noqa: E402


def parse_sizes(text: str) -> list[tuple[tuple[int, int, int], int]]:
  """'40x48x40:128,160x192x160:16' -> [((40, 48, 40), 128), ((160, 192, 160), 16)]."""
  out = []
  for item in text.split(","):
    shape, _, count = item.strip().partition(":")
    dims = tuple(int(d) for d in shape.lower().split("x"))
    if len(dims) != 3 or not count:
      raise argparse.ArgumentTypeError(f"expected XxYxZ:COUNT, got {item!r}")
    out.append((dims, int(count)))
  return out


def write_cohort(workdir: str, shape: tuple[int, int, int], count: int, channels: int) -> cache.PreparedCohort:
  root = cache.data_dir(workdir)
  os.makedirs(os.path.join(root, "cache"), exist_ok=True)
  rng = np.random.default_rng(0)
  rows = []
  for i in range(count):
    rel = f"cache/sub-{i:04d}_image.npy"
    np.save(os.path.join(root, rel), rng.random(shape + (channels,), dtype=np.float32))
    rows.append(dict(participant_id=f"sub-{i:04d}", session_id="", label="CN", label_index=i % 2, age=70.0,
                     sex="F", split="train", image=rel, mask=""))
  pd.DataFrame(rows, columns=cache.TABLE_COLUMNS).to_csv(os.path.join(root, "cohort.tsv"), sep="\t", index=False)
  io.write_json_atomic(os.path.join(root, "prepared.json"), dict(
      shape=list(shape), spacing_mm=0.0, affine=np.eye(4).tolist(), channels=[f"c{c}" for c in range(channels)],
      labels=["CN", "AD"], normalization="none", splits={"train": count}, config_hash="bench", complete=True))
  return cache.load_prepared(workdir)


def bench(source: loader.Source, batch: int, augment: loader.Augment | None, epochs: float,
          read_options: grain.ReadOptions | None) -> tuple[float, float]:
  """(volumes/s, MB/s of image data) over `epochs` passes, after one warm-up batch."""
  it = loader.train_iterator(source, batch, 0, augment=augment, process_index=0, process_count=1,
                             read_options=read_options)
  first = next(it)
  volume_mb = first["image"][0].nbytes / 1e6
  steps = max(1, int(round(epochs * len(source) / batch)))
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  elapsed = time.perf_counter() - start
  it.close()
  rate = steps * batch / elapsed
  return rate, rate * volume_mb


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("40x48x40:128,160x192x160:16"),
                      help="comma-separated XxYxZ:COUNT (volume grid and number of volumes)")
  parser.add_argument("--channels", type=int, default=1)
  parser.add_argument("--batch", type=int, default=4, help="global batch size (one process)")
  parser.add_argument("--epochs", type=float, default=3.0, help="passes over the volumes to time")
  parser.add_argument("--threads", type=int, default=None, help="grain read threads (default: the loader's)")
  parser.add_argument("--prefetch", type=int, default=None, help="grain prefetch buffer in volumes")
  parser.add_argument("--jitter", type=float, default=0.05, help="intensity jitter for the augmented run")
  parser.add_argument("--flip-axes", default="0", help="flip axes for the augmented run")
  args = parser.parse_args(argv)

  read_options = None
  if args.threads is not None or args.prefetch is not None:
    read_options = grain.ReadOptions(num_threads=args.threads if args.threads is not None else 4,
                                     prefetch_buffer_size=args.prefetch if args.prefetch is not None else 2 * args.batch)
  flips = tuple(int(a) for a in args.flip_axes.split(",") if a.strip())
  augment = loader.Augment(intensity_jitter=args.jitter, flip_axes=flips)
  print(f"cpus={os.cpu_count()} batch={args.batch} channels={args.channels} threads="
        f"{'loader default' if read_options is None else read_options.num_threads}")
  print(f"{'shape':>14} {'volumes':>7} {'MB/vol':>7} {'augment':>22} {'vol/s':>9} {'MB/s':>9}")
  for shape, count in args.sizes:
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
      source = loader.CohortSource(write_cohort(tmp, shape, count, args.channels), "train")
      for aug in (None, augment):
        rate, mbs = bench(source, args.batch, aug, args.epochs, read_options)
        label = "none" if aug is None else f"jitter={aug.intensity_jitter} flip={aug.flip_axes}"
        mb = np.prod(shape) * args.channels * 4 / 1e6
        print(f"{'x'.join(map(str, shape)):>14} {count:>7} {mb:>7.2f} {label:>22} {rate:>9.1f} {mbs:>9.1f}",
              flush=True)


if __name__ == "__main__":
  main()
