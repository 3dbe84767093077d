"""The secret randomness of a DP-SGD run: which rows each step samples, and its Gaussian noise.

The (ε, δ) guarantee assumes the adversary cannot predict the mechanism's coins. Seeds taken from
the config (public defaults) or from a checkpoint would let anyone regenerate every batch and
every noise draw, and subtract the noise. So a DP run draws both from the OS (`secrets`) the first
time it starts, keeps them in WORKDIR/dp_secret.json (mode 0600, beside the run's checkpoints;
read again on resume, so a resumed run stays exact) and nowhere else: not in config.json, the
TrainState (its `rng` stays the seeded, public run key), dp.json, TensorBoard, the synthetic
cohort or the report. Deleting the file and resuming starts a new, equally private, stream.
A non-DP run does not use this module and keeps its seeded determinism.

On several processes, process 0 owns the file and broadcasts the words to the others.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets

import jax
import numpy as np

from synthmri_jax.utils import io

FILE = "dp_secret.json"
WORDS = 4   # 32-bit words per secret (128 bits)


@dataclasses.dataclass(frozen=True, repr=False)
class DPSecret:
  sampling_words: tuple[int, ...]   # seeds the Poisson sampler (numpy SeedSequence words)
  noise_words: tuple[int, ...]      # folded into the noise key of every DP step

  @property
  def sampling_seed(self) -> int:
    """The sampler's seed as one non-negative int (the words, little-endian)."""
    return sum(int(w) << (32 * i) for i, w in enumerate(self.sampling_words))

  def noise_key(self) -> jax.Array:
    """A typed PRNG key from the noise words (the default threefry key holds 64 bits of them)."""
    key = jax.random.wrap_key_data(np.asarray(self.noise_words[:2], np.uint32))
    for w in self.noise_words[2:]:
      key = jax.random.fold_in(key, int(w))
    return key

  def __repr__(self) -> str:     # never print the words
    return "DPSecret(<secret>)"


def _fresh() -> list[int]:
  return [secrets.randbits(32) for _ in range(2 * WORDS)]


def _read(path: str) -> list[int]:
  try:
    with open(path) as f:
      blob = json.load(f)
    words = [int(w) for w in blob["sampling_words"]] + [int(w) for w in blob["noise_words"]]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path}: unreadable DP secret ({type(e).__name__}: {e}); move it away to start a "
                     "new noise stream (the run's checkpoints then continue with fresh randomness)") from None
  if len(words) != 2 * WORDS or not all(0 <= w < 2 ** 32 for w in words):
    raise ValueError(f"{path}: a DP secret holds {WORDS} + {WORDS} 32-bit words")
  return words


def _write(path: str, words: list[int]) -> None:
  blob = json.dumps({"sampling_words": words[:WORDS], "noise_words": words[WORDS:],
                     "note": "secret DP-SGD randomness of this run; never release this file"})
  with io.atomic_path(path) as tmp:
    os.chmod(tmp, 0o600)
    with open(tmp, "w") as f:
      f.write(blob)


def load_or_create(workdir: str) -> DPSecret:
  """The run's secret: read from WORKDIR/dp_secret.json, or drawn from the OS and written there."""
  path = os.path.join(os.path.abspath(workdir), FILE)
  words = None
  if jax.process_index() == 0:
    if os.path.exists(path):
      words = _read(path)
    else:
      words = _fresh()
      _write(path, words)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    local = np.asarray(words if words is not None else [0] * (2 * WORDS), np.uint32)
    words = [int(w) for w in np.asarray(multihost_utils.broadcast_one_to_all(local))]
  return DPSecret(tuple(words[:WORDS]), tuple(words[WORDS:]))
