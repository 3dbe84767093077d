"""The privacy embedding: a small 3D conv encoder trained contrastively on the real training scans.

Copy detection needs a similarity under which a scan and a lightly perturbed copy of it (shifted
by a few voxels, rescaled in intensity, noisier) are near-identical while two different subjects
are not. Generic features (a diagnosis classifier's) are trained to ignore identity; SimCLR
(Chen et al. 2020) learns exactly this invariance: two random augmentations of the same scan are
positives, every other scan in the batch a negative (NT-Xent loss), so the embedding separates
subjects and is invariant to the augmentations.

    encoder = train_encoder(config, workdir)          # cached in WORKDIR/evaluation/privacy_encoder/
    emb = encoder.embed(volumes)                      # (n, proj_dim) float32, volumes (n, X, Y, Z, C)
    emb = encoder.embed_source(loader.CohortSource(prepared, "val"))

Trained through the shared trainer (ContrastiveTask) on `privacy.encoder.splits` of the prepared
cohort, by default the training split only: the calibration of the copy threshold compares the
validation scans with the training scans and must treat them exactly as it will treat new
synthetic scans, which the encoder has not seen either; an encoder fitted to the validation
scans would push them away from the training scans and τ would come out too low. The encoder
saw private data and is an evaluation tool: it is never exported with the synthetic cohort.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synthmri_jax import workdir as workdir_lib
from synthmri_jax.data import loader
from synthmri_jax.data.cache import PreparedCohort, load_prepared
from synthmri_jax.evaluation import privacy_stats
from synthmri_jax.models.classifier import group_norm
from synthmri_jax.models.conv import Conv3D
from synthmri_jax.models.layers import VOLUME_AXES
from synthmri_jax.training import checkpoint as ckpt_lib
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.training import trainer
from synthmri_jax.sharding import constrain
from synthmri_jax.utils import io

ENCODER_DIR = os.path.join("evaluation", "privacy_encoder")
META_FILE = "encoder.json"
CACHE_VERSION = 1   # bump when the model or the views change: a cached encoder is then retrained


def encoder_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), ENCODER_DIR)


# ------------------------------------------------------------------------------ the model


class PrivacyEncoder(nn.Module):
  """(B, X, Y, Z, C) -> (B, proj_dim) float32 embedding (the SimCLR projection: copy detection
  wants exactly the invariance NT-Xent trained there, whereas the representation before the head
  keeps what the augmentations change; Chen et al. prefer the latter for *other* tasks).

  Average-pooled by `pool` first (identity lives in anatomy, not in single voxels), then one conv
  per stage (stride 2 after the first); the last feature map is flattened, not averaged, so the
  embedding keeps where things are, which is what tells two subjects of one template apart.
  """

  channels: Sequence[int] = (16, 32, 64)
  embed_dim: int = 128
  proj_dim: int = 64
  norm_groups: int = 4
  pool: int = 2
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, project: bool = False, projection: bool = True):
    """project=True: (representation, projection) for the loss; else the embedding used for
    similarity: the projection (projection=True, the space the invariance was trained in) or the
    representation before the head."""
    x = constrain(x.astype(self.dtype), VOLUME_AXES)
    if self.pool > 1:
      x = nn.avg_pool(x, (self.pool,) * 3, strides=(self.pool,) * 3, padding="SAME")
    for i, c in enumerate(self.channels):
      if i > 0:
        x = nn.silu(group_norm(x.shape[-1], self.norm_groups, self.dtype, f"norm_{i}")(x))
      x = Conv3D(int(c), kernel_size=3, strides=1 if i == 0 else 2, padding="SAME", use_bias=True,
                 impl=self.conv_impl, dtype=self.dtype, name=f"conv_{i}")(x)
      x = constrain(x, VOLUME_AXES)
    x = nn.silu(group_norm(x.shape[-1], self.norm_groups, self.dtype, "final_norm")(x))
    h = x.reshape(x.shape[0], -1).astype(jnp.float32)
    emb = nn.Dense(self.embed_dim, dtype=jnp.float32, name="embed")(h)
    if not project and not projection:
      return emb
    p = nn.Dense(self.proj_dim, dtype=jnp.float32, name="proj_0")(nn.silu(emb))
    p = nn.Dense(self.proj_dim, dtype=jnp.float32, name="proj_1")(nn.silu(p))
    return (emb, p) if project else p


def build_model(enc_cfg) -> PrivacyEncoder:
  return PrivacyEncoder(channels=tuple(int(c) for c in enc_cfg.channels), embed_dim=int(enc_cfg.embed_dim),
                        proj_dim=int(enc_cfg.proj_dim), norm_groups=int(enc_cfg.norm_groups), pool=int(enc_cfg.pool),
                        dtype=jnp.dtype(str(enc_cfg.dtype)), conv_impl=str(enc_cfg.conv_impl))


# ------------------------------------------------------------------------------ augmentation and loss


def shift_volume(x: np.ndarray, shifts: Sequence[int]) -> np.ndarray:
  """x (X, Y, Z, ...) moved by integer voxels along the three spatial axes, zero-filled."""
  out = np.zeros_like(x)
  src = tuple(slice(max(0, -d), x.shape[a] - max(0, d)) for a, d in enumerate(shifts))
  dst = tuple(slice(max(0, d), x.shape[a] - max(0, -d)) for a, d in enumerate(shifts))
  out[dst] = x[src]
  return out


@dataclasses.dataclass(frozen=True)
class Views:
  """Two random views of one scan (a grain RandomMap; host numpy, cheap next to the network).

  Each view: integer shift by up to max_shift voxels per axis (zero fill), per-channel gain
  U(1-j, 1+j) and offset U(-j, j), Gaussian noise of std U(0, noise_std). Offset and noise
  reach the background too: a generator's output is not exactly zero outside the head.
  """

  max_shift: int = 3
  intensity: float = 0.1
  noise_std: float = 0.05
  is_identity = False   # (loader.train_iterator applies any non-identity augmentation)

  def view(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if self.max_shift > 0:
      x = shift_volume(x, rng.integers(-self.max_shift, self.max_shift + 1, size=3))
    if self.intensity > 0:
      j, c = self.intensity, x.shape[-1]
      x = x * rng.uniform(1 - j, 1 + j, c).astype(np.float32) + rng.uniform(-j, j, c).astype(np.float32)
    if self.noise_std > 0:
      x = x + np.float32(rng.uniform(0, self.noise_std)) * rng.standard_normal(x.shape, dtype=np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)

  def __call__(self, element: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    x = element["image"]
    return {"view_a": self.view(x, rng), "view_b": self.view(x, rng)}


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
  """SimCLR's NT-Xent over 2B views: (mean loss, top-1 accuracy of finding the positive)."""
  b = z1.shape[0]
  z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-8)
  sim = z @ z.T / temperature
  sim = jnp.where(jnp.eye(2 * b, dtype=bool), -jnp.inf, sim)
  target = jnp.concatenate([jnp.arange(b) + b, jnp.arange(b)])
  logp = jax.nn.log_softmax(sim, axis=1)
  loss = -jnp.mean(logp[jnp.arange(2 * b), target])
  acc = jnp.mean((jnp.argmax(sim, axis=1) == target).astype(jnp.float32))
  return loss, acc


@dataclasses.dataclass
class ContrastiveTask:
  """Task for the shared trainer: NT-Xent between batch['view_a'] and batch['view_b'] (Views)."""

  model: PrivacyEncoder
  temperature: float = 0.1
  name: str = "privacy_encoder"

  def init(self, rng, batch):
    variables = dict(self.model.init(rng, batch["view_a"], project=True))
    return variables.pop("params"), variables

  def loss(self, params, model_state, batch, rng, step):
    b = batch["view_a"].shape[0]
    _, p = self.model.apply({"params": params, **model_state},
                            jnp.concatenate([batch["view_a"], batch["view_b"]]), project=True)
    loss, acc = nt_xent(p[:b], p[b:], self.temperature)
    return loss, ({"top1": acc}, model_state)


# ------------------------------------------------------------------------------ training and caching


@dataclasses.dataclass
class Encoder:
  """A trained privacy encoder: `embed` volumes, `embed_source` a grain source."""

  model: PrivacyEncoder
  variables: dict[str, Any]
  meta: dict[str, Any]
  batch_size: int = 8

  def __post_init__(self):
    self._fn = jax.jit(lambda v, x: self.model.apply(v, x))

  def embed(self, volumes: np.ndarray) -> np.ndarray:
    """(n, X, Y, Z, C) volumes on the prepared grid -> (n, proj_dim) float32, in order."""
    v = np.asarray(volumes, np.float32)
    if v.ndim == 4:
      v = v[..., None]
    out = []
    for i in range(0, len(v), self.batch_size):
      chunk = v[i:i + self.batch_size]
      pad = self.batch_size - len(chunk)
      if pad:   # fixed shapes: one compilation
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
      out.append(np.asarray(jax.device_get(self._fn(self.variables, chunk)))[:self.batch_size - pad])
    return np.concatenate(out, axis=0) if out else np.zeros((0, self.model.proj_dim), np.float32)

  def embed_source(self, source: loader.Source) -> np.ndarray:
    """Every element of `source` ('image' key), in source order."""
    out = np.zeros((len(source), self.model.proj_dim), np.float32)
    for batch in loader.eval_iterator(source, self.batch_size, process_index=0, process_count=1):
      e = np.asarray(jax.device_get(self._fn(self.variables, np.asarray(batch["image"], np.float32))))
      valid = np.asarray(batch["valid"], bool)
      out[np.asarray(batch["index"])[valid]] = e[valid]
    return out


def _key(enc_cfg, prepared: PreparedCohort) -> str:
  blob = {"encoder": json.loads(enc_cfg.to_json(sort_keys=True)) if hasattr(enc_cfg, "to_json") else enc_cfg,
          "cohort": prepared.meta.get("config_hash"), "shape": prepared.meta.get("shape"),
          "n": {s: int(len(prepared.split(s))) for s in ("train", "val", "test", "holdout")},
          "version": CACHE_VERSION}
  return workdir_lib.fingerprint(blob)


class _Concat:
  """Rows of several sources one after the other (the encoder's training set)."""

  def __init__(self, sources: Sequence[loader.Source]):
    self.sources = list(sources)
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __getitem__(self, i: int):
    k = int(np.searchsorted(self.offsets, i, side="right") - 1)
    e = self.sources[k][int(i - self.offsets[k])]
    return {"image": e["image"]}


def _splits(spec: str, prepared: PreparedCohort) -> list[str]:
  names = [s.strip() for s in str(spec).split(",") if s.strip()]
  bad = [s for s in names if s not in ("train", "val", "test", "holdout")]
  if bad or not names:
    raise ValueError(f"privacy.encoder.splits must name splits among train, val, test, holdout; got {spec!r}")
  return [s for s in names if len(prepared.split(s))]


def train_encoder(config, workdir: str, *, log: Callable[[str], None] = print,
                  mesh: Optional[jax.sharding.Mesh] = None) -> Encoder:
  """The privacy encoder of WORKDIR (trained once, then read from WORKDIR/evaluation/privacy_encoder/).

  `config.privacy.encoder` (privacy_config.privacy_config) sets the model and training; a
  cached encoder made for another encoder config or cohort is retrained in a fresh run folder.
  """
  from synthmri_jax.config_blocks.privacy import block as privacy_block

  enc = privacy_block(config).encoder
  workdir = os.path.abspath(workdir)
  prepared = load_prepared(workdir)
  key = _key(enc, prepared)
  root = encoder_dir(workdir)
  run_dir = os.path.join(root, key)
  meta_path = os.path.join(root, META_FILE)
  model = build_model(enc)
  meta = io.read_json(meta_path)
  if meta and meta.get("complete") and meta.get("key") == key:
    _, v = ckpt_lib.load_variables(os.path.join(run_dir, "checkpoints"))
    variables = {"params": v["params"], **(v.get("model_state") or {})}
    return Encoder(model, variables, meta, int(enc.batch_size))

  splits = _splits(enc.splits, prepared)
  source = _Concat([loader.CohortSource(prepared, s) for s in splits])
  batch = min(int(enc.batch_size), len(source))
  if batch < 2:
    raise ValueError(f"the privacy encoder needs at least 2 scans in {splits}, got {len(source)}")
  task = ContrastiveTask(model, float(enc.temperature))
  views = Views(int(enc.max_shift), float(enc.intensity_jitter), float(enc.noise_std))
  c = ml_collections.ConfigDict()
  c.train = ml_collections.ConfigDict(dict(enc.train.to_dict() if hasattr(enc.train, "to_dict") else enc.train))
  if "seed" not in c.train:
    c.train.seed = int(config.get("seed", 0))
  if config.get("mesh", None) is not None:
    c.mesh = config.mesh
  mesh = mesh if mesh is not None else mesh_lib.mesh_from_config(c)
  shards = mesh_lib.batch_shards(mesh)
  batch = max(shards, batch // shards * shards)
  it = loader.train_iterator(source, batch, seed=int(c.train.seed), augment=views)
  log(f"privacy encoder: contrastive training on {len(source)} scans ({', '.join(splits)}), batch {batch}, "
      f"{int(c.train.steps)} steps")
  t0 = time.time()
  final: dict[str, float] = {}
  state = trainer.train(task, c, run_dir, it, None, mesh=mesh, on_log=lambda s, m: final.update(m))
  variables = {"params": jax.device_get(state.params), **jax.device_get(state.model_state)}
  encoder = Encoder(model, variables, {}, int(enc.batch_size))
  check = [s for s in ("val", "holdout", "test") if s not in splits and len(prepared.split(s))]
  reid = {"seen": {"split": splits[0], **reidentification(encoder, views, loader.CohortSource(prepared, splits[0]))}}
  if check:
    reid["unseen"] = {"split": check[0], **reidentification(encoder, views, loader.CohortSource(prepared, check[0]))}
  meta = {"complete": True, "key": key, "run_dir": run_dir, "splits": splits, "n_scans": len(source),
          "batch_size": batch, "steps": int(jax.device_get(state.step)), "seconds": round(time.time() - t0, 1),
          "final_metrics": {k: float(v) for k, v in final.items()},
          "reidentification": reid,
          "encoder": json.loads(enc.to_json(sort_keys=True)) if hasattr(enc, "to_json") else dict(enc)}
  if jax.process_index() == 0:
    io.write_json_atomic(meta_path, meta)
  log(f"privacy encoder: re-identifies perturbed views of {reid['seen']['top1']:.0%} of its {reid['seen']['n']} "
      f"{splits[0]} scans" + (f" and of {reid['unseen']['top1']:.0%} of {reid['unseen']['n']} unseen "
                               f"{check[0]} scans" if check else "") + f" ({time.time() - t0:.0f} s)")
  encoder.meta = meta
  return encoder


def reidentification(encoder: Encoder, views: Views, source: loader.Source, seed: int = 7) -> dict[str, Any]:
  """Top-1 re-identification: view A of each scan (one random augmentation) must be most
  Pearson-similar to view B of the same scan among all views B. On the training scans this is
  the copy-detection task itself (a perturbed copy must find its source); on unseen scans it
  says how far the invariance generalises."""
  pairs = [views(source[i], np.random.default_rng([seed, i])) for i in range(len(source))]
  a = encoder.embed(np.stack([p["view_a"] for p in pairs]))
  b = encoder.embed(np.stack([p["view_b"] for p in pairs]))
  sim = privacy_stats.similarity_matrix(a, b, "pearson")
  top1 = float(np.mean(np.argmax(sim, axis=1) == np.arange(len(pairs))))
  return {"top1": top1, "n": len(pairs), "positive_similarity_median": float(np.median(np.diag(sim)))}
