"""grain input pipeline: prepared cohort (or any random-access source) -> host-local batches -> global jax.Arrays.

Sources (random access, `len(src)` and `src[i] -> dict[str, np.ndarray]`; picklable):
  CohortSource(prepared, split, mmap=False)  one split of a prepared cohort (see data/cache.py); elements:
                                             image float32 (X,Y,Z,C), label int32, age float32 (NaN if
                                             unknown), sex int32 (0=F, 1=M), mask uint8 (X,Y,Z) when the
                                             cohort has masks
  ArraySource(arrays)                        a dict of equal-length arrays (cached latents, toy data); row i
                                             is {key: arrays[key][i]}
The pipeline adds `index` (int32 row index in the source; -1 for eval padding) and `valid` (bool).

Pipelines (every process builds the same global stream; only the slice it takes differs):
  train_iterator(source, global_batch_size, seed, *, augment=None, num_epochs=None,
                 process_index=None, process_count=None, read_options=None) -> grain.DatasetIterator
      Global stream = epoch 0 shuffled, epoch 1 shuffled differently, ... (forever when num_epochs is
      None). Process p takes stream positions p, p+P, p+2P, ...; its batches hold global_batch_size // P
      of them, so global step s is exactly stream positions [s*G, (s+1)*G) whatever the process count,
      and every example of an epoch is seen exactly once across processes. Batches run across epoch
      boundaries; with finite num_epochs the stream is cut to a multiple of G so every host yields the
      same number of full batches. Augmentation randomness is keyed on the stream position: it is
      reproducible, differs per epoch and does not depend on the process count.
  eval_iterator(source, global_batch_size, *, process_index=None, process_count=None,
                read_options=None) -> grain.DatasetIterator
      One pass in source order, padded with zero elements (valid=False, index=-1) to a multiple of G, so
      every example is evaluated exactly once: weight per-example results with batch['valid'].
  poisson_train_iterator(source, expected_batch_size, seed, *, max_batch_size=0, overflow_tolerance=1e-15,
                         multiple_of=1, augment=None, num_steps=None, process_index=None, process_count=None,
                         read_options=None) -> grain.DatasetIterator
      DP-SGD batches as the accountant (training/dp_accounting.py) assumes them: at every step each example
      joins independently with probability q = expected_batch_size / len(source). Batches have a fixed
      padded size M = PoissonSampling.max_batch_size (rows past the sampled ones: zeros, valid=False,
      index=-1), M chosen so that P(Binomial(n, q) > M) <= overflow_tolerance; on the rare step that
      samples more than M examples a uniformly random M of them are kept (truncated Poisson sampling,
      Chua et al. 2024: it costs at most (1 + e^eps) * steps * P(overflow) in delta, which the trainer
      records in dp.json with the exact number of overflowed steps). Step s's sample depends on (seed, s)
      only; process p takes padded positions p, p+P, ...; augmentation is keyed on (seed, s, position).
      The iterator carries `.poisson_sampling` (a PoissonSampling), which the trainer's DP mode reads.
  Augment (data/augment.py, re-exported here): the label-preserving augmentation the train pipelines apply.
  make_global_batch(batch, mesh) -> dict[str, jax.Array]
      Host-local numpy batch -> global arrays sharded over ('data', 'fsdp') on the batch dimension.

Checkpointing the iterator: `it.get_state()` is a small JSON-able dict; `it.set_state(state)` on a freshly
built iterator with the same arguments resumes exactly (the next batches are bitwise the ones that would
have come). Through orbax: `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` (one file per
process). Save the state of the batches the trainer has *consumed*: a device-prefetch wrapper that reads
ahead would save a state past them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, Protocol

import grain
import jax
import numpy as np
import scipy.stats
from jax.sharding import Mesh

from synthmri_jax.data.augment import Augment
from synthmri_jax.sharding import BATCH_AXES, batch_sharding, batch_shards
from synthmri_jax.data.cache import PreparedCohort
from synthmri_jax.utils import io

Element = dict[str, np.ndarray]
_SEX_CODES = {"f": 0, "female": 0, "0": 0, "m": 1, "male": 1, "1": 1}
_SHUFFLE_TAG, _AUGMENT_TAG, _POISSON_TAG = 0, 1, 2


class Source(Protocol):
  """What the pipeline reads: random access to per-example dicts of numpy arrays."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Element: ...


# ---------------------------------------------------------------- sources


class CohortSource:
  """One split of a prepared cohort, read from the npy cache (never NIfTI).

  mask_channel: the image gains the lesion mask (0 / 1) as its last channel, the input of a
  tokenizer that encodes image and mask together (tokenizer.mask_channel)."""

  def __init__(self, prepared: PreparedCohort, split: str, *, mmap: bool = False, mask_channel: bool = False):
    rows = prepared.split(split)
    if len(rows) == 0:
      raise ValueError(f"{prepared.root}: split {split!r} is empty")
    self.root = prepared.root
    self.split = split
    self.mmap = mmap
    self.images = [str(p) for p in rows["image"]]
    masks = [str(m) if isinstance(m, str) else "" for m in rows["mask"]]
    with_mask = [bool(m) for m in masks]
    if any(with_mask) and not all(with_mask):
      missing = [rows["participant_id"][i] for i, ok in enumerate(with_mask) if not ok]
      raise ValueError(f"{prepared.root}: split {split!r} has masks for some scans but not for {missing}; "
                       "a batch needs a mask for every scan or for none")
    self.masks = masks if all(with_mask) else None
    self.mask_channel = bool(mask_channel)
    if self.mask_channel and self.masks is None:
      raise ValueError(f"{prepared.root}: split {split!r} has no masks, so the mask cannot be a channel "
                       "(tokenizer.mask_channel needs a cohort with a mask_path for every scan)")
    self.labels = rows["label_index"].astype(np.int32).to_numpy()
    self.ages = np.asarray(
        [float(a) if str(a).strip() not in ("", "nan", "NaN", "n/a") else np.nan for a in rows["age"]], np.float32)
    sexes, bad = [], []
    for pid, s in zip(rows["participant_id"], rows["sex"]):
      code = _SEX_CODES.get(str(s).strip().lower())
      if code is None:
        bad.append(f"{pid}: {s!r}")
      sexes.append(-1 if code is None else code)
    if bad:
      raise ValueError(f"{prepared.root}: sex must be F/M (or female/male, 0/1); bad rows: {bad}")
    self.sexes = np.asarray(sexes, np.int32)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> Element:
    element = {
        "image": io.load_npy(os.path.join(self.root, self.images[index]), self.mmap).astype(np.float32, copy=False),
        "label": self.labels[index],
        "age": self.ages[index],
        "sex": self.sexes[index],
    }
    if self.masks is not None:
      element["mask"] = io.load_npy(os.path.join(self.root, self.masks[index]), self.mmap).astype(np.uint8, copy=False)
      if self.mask_channel:
        element["image"] = np.concatenate([element["image"], (element["mask"] > 0)[..., None].astype(np.float32)], -1)
    return element

  def __repr__(self) -> str:
    return f"CohortSource(root={self.root!r}, split={self.split!r}, n={len(self)})"


class ArraySource:
  """Rows of a dict of equal-length arrays (np arrays or np.load(..., mmap_mode='r') memmaps)."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    if not arrays:
      raise ValueError("ArraySource needs at least one array")
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"ArraySource arrays differ in length: {lengths}")
    if next(iter(lengths.values())) == 0:
      raise ValueError("ArraySource arrays are empty")
    self.arrays = dict(arrays)

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def __getitem__(self, index: int) -> Element:
    return {k: np.asarray(v[index]) for k, v in self.arrays.items()}

  def __repr__(self) -> str:
    return f"ArraySource(keys={sorted(self.arrays)}, n={len(self)})"


# ---------------------------------------------------------------- pipelines


def per_host_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size < 1:
    raise ValueError(f"global batch size must be >= 1, got {global_batch_size}")
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the process count "
                     f"{process_count}; every host needs an equal share")
  return global_batch_size // process_count


def steps_per_epoch(source: Source, global_batch_size: int) -> float:
  """Training steps for one pass over the source (fractional: batches run across epoch boundaries)."""
  return len(source) / global_batch_size


def eval_num_batches(source: Source, global_batch_size: int) -> int:
  return -(-len(source) // global_batch_size)


def seed_words(seed: int) -> list[int]:
  """A non-negative seed as 32-bit SeedSequence words, low first ([seed] below 2^32), so a 128-bit
  secret seed keeps all its bits."""
  seed = int(seed)
  if seed < 0:
    raise ValueError(f"seeds are non-negative, got {seed}")
  words = [seed & 0xFFFFFFFF]
  while seed >> 32:
    seed >>= 32
    words.append(seed & 0xFFFFFFFF)
  return words


def _derive_seed(seed: int, tag: int) -> int:
  """Decorrelated 32-bit seeds: grain's shuffle uses seed+epoch, so raw seeds s and s+1 would share epochs."""
  return int(np.random.SeedSequence([*seed_words(seed), tag]).generate_state(1, np.uint32)[0])


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is not in [0, {count})")
  return index, count


def _default_read_options(batch: int) -> grain.ReadOptions:
  # Bounded prefetch: at 1 mm a volume is ~20 MB, grain's default buffer of 500 would hold 10 GB.
  return grain.ReadOptions(num_threads=min(8, max(2, batch)), prefetch_buffer_size=max(4, 2 * batch))


class _AddIndex(grain.transforms.MapWithIndex):
  """Adds the source row (indices past one epoch wrap around) and valid=True; a class so it pickles."""

  def __init__(self, n: int):
    self.n = n

  def map_with_index(self, index: int, element: Element) -> Element:
    return {**element, "index": np.int32(index % self.n), "valid": np.bool_(True)}


def _with_index(source: Source) -> grain.MapDataset:
  return grain.MapDataset.source(source).map_with_index(_AddIndex(len(source)))


def train_dataset(source: Source, global_batch_size: int, seed: int, *, augment: Augment | None = None,
                  num_epochs: int | None = None, process_index: int | None = None,
                  process_count: int | None = None,
                  read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """The training pipeline of this process as a grain.IterDataset (see the module docstring)."""
  p, count = _processes(process_index, process_count)
  batch = per_host_batch_size(global_batch_size, count)
  ds = _with_index(source).shuffle(seed=_derive_seed(seed, _SHUFFLE_TAG)).repeat(num_epochs)
  if augment is not None and not augment.is_identity:
    ds = ds.random_map(augment, seed=_derive_seed(seed, _AUGMENT_TAG))
  if num_epochs is not None:
    usable = len(ds) // global_batch_size * global_batch_size
    if usable == 0:
      raise ValueError(f"{num_epochs} epoch(s) of {len(source)} examples make no full global batch of "
                       f"{global_batch_size}")
    ds = ds[:usable]
  ds = ds[p::count]
  return ds.to_iter_dataset(read_options or _default_read_options(batch)).batch(batch, drop_remainder=True)


def train_iterator(source: Source, global_batch_size: int, seed: int, *, augment: Augment | None = None,
                   num_epochs: int | None = None, process_index: int | None = None,
                   process_count: int | None = None,
                   read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """Iterator over this host's training batches; checkpoint it with get_state()/set_state()."""
  return iter(train_dataset(source, global_batch_size, seed, augment=augment, num_epochs=num_epochs,
                            process_index=process_index, process_count=process_count, read_options=read_options))


class _PaddedSource:
  """The source followed by zero elements up to `length`; pads carry valid=False, index=-1."""

  def __init__(self, source: Source, length: int):
    self.source = source
    self.length = length
    self.n = len(source)
    self.pad = {k: np.zeros_like(v) for k, v in source[0].items()}
    self.pad.update(index=np.int32(-1), valid=np.bool_(False))

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> Element:
    if index < self.n:
      return {**self.source[index], "index": np.int32(index), "valid": np.bool_(True)}
    return dict(self.pad)


def eval_dataset(source: Source, global_batch_size: int, *, process_index: int | None = None,
                 process_count: int | None = None,
                 read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """One ordered, padded pass (see the module docstring)."""
  p, count = _processes(process_index, process_count)
  batch = per_host_batch_size(global_batch_size, count)
  padded = _PaddedSource(source, eval_num_batches(source, global_batch_size) * global_batch_size)
  ds = grain.MapDataset.source(padded)[p::count]
  return ds.to_iter_dataset(read_options or _default_read_options(batch)).batch(batch, drop_remainder=True)


def eval_iterator(source: Source, global_batch_size: int, *, process_index: int | None = None,
                  process_count: int | None = None,
                  read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """Iterator over this host's evaluation batches; every host yields eval_num_batches() of them."""
  return iter(eval_dataset(source, global_batch_size, process_index=process_index,
                           process_count=process_count, read_options=read_options))


# ---------------------------------------------------------------- Poisson sampling (DP-SGD)


def poisson_max_batch_size(dataset_size: int, expected_batch_size: int, overflow_tolerance: float = 1e-15,
                           multiple_of: int = 1) -> int:
  """Smallest padded batch M (a multiple of `multiple_of`) with P(Binomial(n, q) > M) <= overflow_tolerance.

  Capped at n rounded up (nothing can overflow then): on small cohorts M may equal the dataset.
  """
  n, b = int(dataset_size), int(expected_batch_size)
  if not 1 <= b <= n:
    raise ValueError(f"expected batch size must be in [1, dataset size {n}], got {b}")
  if not 0.0 < overflow_tolerance < 1.0:
    raise ValueError(f"overflow_tolerance must be in (0, 1), got {overflow_tolerance}")
  q = b / n
  m = max(b, int(scipy.stats.binom.isf(overflow_tolerance, n, q)))
  while m < n and scipy.stats.binom.sf(m, n, q) > overflow_tolerance:
    m += 1
  m = min(m, n)
  k = max(1, int(multiple_of))
  return -(-m // k) * k


@dataclasses.dataclass(frozen=True)
class PoissonSampling:
  """Which rows step s trains on: each of `dataset_size` rows independently with probability q.

  Drawn as count ~ Binomial(n, q), then that many distinct rows uniformly (the same law as n
  independent coin flips, at O(count) cost), from a generator seeded by (seed, s) alone.
  """

  dataset_size: int
  expected_batch_size: int
  max_batch_size: int
  seed: int = dataclasses.field(repr=False)   # secret in a DP run: not printed, not in to_json

  def __post_init__(self):
    if not 1 <= self.expected_batch_size <= self.dataset_size:
      raise ValueError(f"expected_batch_size {self.expected_batch_size} must be in [1, {self.dataset_size}]")
    if self.max_batch_size < self.expected_batch_size:
      raise ValueError(f"max_batch_size {self.max_batch_size} < expected_batch_size {self.expected_batch_size}")

  @property
  def q(self) -> float:
    return self.expected_batch_size / self.dataset_size

  @property
  def overflow_probability(self) -> float:
    """P(a step samples more than max_batch_size rows)."""
    return float(scipy.stats.binom.sf(self.max_batch_size, self.dataset_size, self.q))

  def _rng(self, step: int) -> np.random.Generator:
    return np.random.default_rng([*seed_words(self.seed), _POISSON_TAG, int(step)])

  def count(self, step: int) -> int:
    """How many rows step `step` sampled (before truncation to max_batch_size)."""
    return int(self._rng(step).binomial(self.dataset_size, self.q))

  def sample(self, step: int) -> np.ndarray:
    """The rows of step `step`, in random order, truncated to max_batch_size (a uniform subset)."""
    rng = self._rng(step)
    k = int(rng.binomial(self.dataset_size, self.q))
    rows = rng.choice(self.dataset_size, size=k, replace=False)
    return rows[:self.max_batch_size].astype(np.int64)

  def overflow_steps(self, num_steps: int) -> int:
    """Steps among [0, num_steps) whose sample was truncated (exact: the samples are deterministic)."""
    return sum(self.count(s) > self.max_batch_size for s in range(int(num_steps)))

  def to_json(self) -> dict[str, Any]:
    # the seed is left out: a DP run's sampling seed is secret (training/dp_secret.py)
    return {**{k: v for k, v in dataclasses.asdict(self).items() if k != "seed"}, "sampling_probability": self.q,
            "overflow_probability_per_step": self.overflow_probability}


class _PoissonSlots:
  """(step, slot) -> element for one process: slot j is padded position p + j*P of step `step`'s batch."""

  def __init__(self, source: Source, sampling: PoissonSampling, per_host: int, process_index: int,
               process_count: int, num_steps: int | None, augment: Augment | None, seed: int):
    self.source, self.sampling, self.per_host = source, sampling, per_host
    self.p, self.count = process_index, process_count
    self.length = per_host * (int(num_steps) if num_steps is not None else 2 ** 40)
    self.augment = augment if augment is not None and not augment.is_identity else None
    self.aug_seed = _derive_seed(seed, _AUGMENT_TAG)
    self.pad = {k: np.zeros_like(v) for k, v in source[0].items()}
    self.pad.update(index=np.int32(-1), valid=np.bool_(False))
    self._cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self.length

  def _rows(self, step: int) -> np.ndarray:
    rows = self._cache.get(step)
    if rows is None:
      if len(self._cache) > 64:
        self._cache.clear()
      rows = self._cache[step] = self.sampling.sample(step)
    return rows

  def __getitem__(self, k: int) -> Element:
    step, j = divmod(int(k), self.per_host)
    pos = self.p + j * self.count
    rows = self._rows(step)
    if pos >= len(rows):
      return dict(self.pad)
    element = {**self.source[int(rows[pos])], "index": np.int32(rows[pos]), "valid": np.bool_(True)}
    if self.augment is not None:
      element = self.augment(element, np.random.default_rng([self.aug_seed, step, pos]))
    return element

  def __getstate__(self):
    return {**self.__dict__, "_cache": {}}


def poisson_train_dataset(source: Source, expected_batch_size: int, seed: int, *, max_batch_size: int = 0,
                          overflow_tolerance: float = 1e-15, multiple_of: int = 1, augment: Augment | None = None,
                          num_steps: int | None = None, process_index: int | None = None,
                          process_count: int | None = None,
                          read_options: grain.ReadOptions | None = None) -> tuple[grain.IterDataset, PoissonSampling]:
  """(this process's Poisson-sampled pipeline, its PoissonSampling); see the module docstring.

  max_batch_size 0: poisson_max_batch_size(n, B, overflow_tolerance); either way rounded up to a
  multiple of lcm(multiple_of, process count) (pass the mesh's data*fsdp size).
  """
  p, count = _processes(process_index, process_count)
  n = len(source)
  step = int(np.lcm(max(1, int(multiple_of)), count))
  if max_batch_size:
    cap = -(-int(max_batch_size) // step) * step
  else:
    cap = poisson_max_batch_size(n, expected_batch_size, overflow_tolerance, step)
  sampling = PoissonSampling(dataset_size=n, expected_batch_size=int(expected_batch_size), max_batch_size=cap,
                             seed=int(seed))
  per_host = per_host_batch_size(cap, count)
  slots = _PoissonSlots(source, sampling, per_host, p, count, num_steps, augment, seed)
  ds = grain.MapDataset.source(slots)
  ds = ds.to_iter_dataset(read_options or _default_read_options(per_host)).batch(per_host, drop_remainder=True)
  return ds, sampling


def poisson_train_iterator(source: Source, expected_batch_size: int, seed: int, **kwargs) -> grain.DatasetIterator:
  """Iterator over this host's Poisson-sampled batches (`poisson_train_dataset`'s arguments);
  checkpointable like train_iterator, with `.poisson_sampling` set."""
  ds, sampling = poisson_train_dataset(source, expected_batch_size, seed, **kwargs)
  it = iter(ds)
  it.poisson_sampling = sampling
  return it


# ---------------------------------------------------------------- global arrays


def round_up(n: int, mesh: Mesh) -> int:
  """n rounded up to a multiple of the batch axes' shard count (a global batch must divide evenly)."""
  k = batch_shards(mesh)
  return -(-int(n) // k) * k


def make_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host-local batch (leading dim global_batch // process_count) -> global jax.Arrays on the mesh.

  Every process must call this with its own batch of the same shape at the same step.
  """
  sharding = batch_sharding(mesh)
  shards = batch_shards(mesh)
  out = {}
  for key, local in batch.items():
    local = np.asarray(local)
    if local.ndim == 0:
      raise ValueError(f"batch[{key!r}] is a scalar; every leaf needs a leading batch dimension")
    global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    if global_shape[0] % shards:
      raise ValueError(f"global batch {global_shape[0]} is not divisible by the {shards} shards of mesh axes "
                       f"{BATCH_AXES} {dict(mesh.shape)}")
    out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
  return out


def global_batches(iterator: Any, mesh: Mesh) -> Any:
  """Yields make_global_batch(b, mesh) for b in iterator (no read-ahead, so the iterator's state stays exact)."""
  for batch in iterator:
    yield make_global_batch(batch, mesh)


__all__ = [
    "ArraySource", "Augment", "CohortSource", "PoissonSampling", "Source",
    "eval_dataset", "eval_iterator", "eval_num_batches", "global_batches", "make_global_batch",
    "per_host_batch_size", "poisson_max_batch_size", "poisson_train_dataset", "poisson_train_iterator", "round_up",
    "steps_per_epoch", "train_dataset", "train_iterator",
]
