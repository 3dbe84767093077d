"""Vector quantiser for 3D latents: EMA or learned codebooks, dead-code restart, usage metrics.

Scale target: a 16,384 x 256 codebook against ~10^5 latent voxels per step. The nearest-code
search therefore never forms an N x K x D tensor (distances come from a matmul) and, for large
K, never an N x K matrix either: the codebook (and optionally the tokens) is scanned in chunks.

State that is not trained by gradients lives in the STATS collection ('vq_stats'); it changes
only when `train=True` and must be threaded by the trainer:

  (z_q, aux), updates = model.apply({'params': p, 'vq_stats': s}, z, train=True,
                                    rngs={'vq': rng}, mutable=['vq_stats'])

In 'ema' mode the codebook itself is in 'vq_stats' (Sonnet's VectorQuantizerEMA); in 'learned'
mode it is the parameter 'codebook' and 'vq_stats' only holds usage statistics plus a
restart offset (parameters cannot be overwritten from inside `apply`, so a restarted code is
stored as `codebook + codebook_offset`).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from synthmri_jax import sharding as mesh_lib

STATS = "vq_stats"
_NEVER_USED = 2 ** 30   # steps_since_used of a code never assigned (no int32 overflow on +1)


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def nearest_codes(z_flat: jax.Array, codebook: jax.Array, chunk_size: int | None = None,
                  token_chunk_size: int | None = None,
                  precision: Any = None) -> tuple[jax.Array, jax.Array]:
  """Index and squared distance of the nearest code for every row of z_flat.

  Distances are ||z||^2 - 2 z.e + ||e||^2 (one matmul per chunk). The codebook is scanned in
  chunks of `chunk_size` codes (None: one chunk) keeping a running minimum, so the largest
  intermediate is tokens x chunk_size. `token_chunk_size` additionally bounds the tokens per
  step; token chunks are strided (chunk j holds rows j, j+S, ...) so that each chunk keeps the
  batch sharding of z_flat. Ties resolve to the lowest index, like numpy's argmin.
  Not differentiable: inputs are stop-gradiented so autodiff stores no chunk residuals.

  Args:
    z_flat: (N, D) queries.
    codebook: (K, D) codes.
    chunk_size: codes per scan step; need not divide K.
    token_chunk_size: tokens per map step; need not divide N.
    precision: matmul precision (None: backend default; HIGHEST for exact fp32 on TPU).
  Returns:
    indices (N,) int32 and squared distances (N,) float32.
  """
  z_flat = jax.lax.stop_gradient(z_flat.astype(jnp.float32))
  codebook = jax.lax.stop_gradient(codebook.astype(jnp.float32))
  n, d = z_flat.shape
  k = codebook.shape[0]
  c = k if chunk_size is None else max(1, min(int(chunk_size), k))
  num_chunks = -(-k // c)
  pad = num_chunks * c - k
  e_sq = jnp.sum(codebook * codebook, axis=-1)
  if pad:   # padded codes sit at infinite distance and never win
    codebook = jnp.pad(codebook, ((0, pad), (0, 0)))
    e_sq = jnp.pad(e_sq, (0, pad), constant_values=jnp.inf)
  codebook = codebook.reshape(num_chunks, c, d)
  e_sq = e_sq.reshape(num_chunks, c)

  def search(zc):
    z_sq = jnp.sum(zc * zc, axis=-1, keepdims=True)

    def dist(e, es):
      return z_sq - 2.0 * jnp.dot(zc, e.T, precision=precision) + es[None, :]

    if num_chunks == 1:
      dd = dist(codebook[0], e_sq[0])
      return jnp.argmin(dd, axis=-1).astype(jnp.int32), jnp.min(dd, axis=-1)

    def body(carry, xs):
      best_d, best_i = carry
      j, e, es = xs
      dd = dist(e, es)
      i = jnp.argmin(dd, axis=-1).astype(jnp.int32)
      dmin = jnp.min(dd, axis=-1)
      better = dmin < best_d   # strict: an earlier chunk keeps ties
      return (jnp.where(better, dmin, best_d), jnp.where(better, i + j * c, best_i)), None

    m = zc.shape[0]
    init = (jnp.full((m,), jnp.inf, jnp.float32), jnp.zeros((m,), jnp.int32))
    (best_d, best_i), _ = jax.lax.scan(
        body, init, (jnp.arange(num_chunks, dtype=jnp.int32), codebook, e_sq))
    return best_i, best_d

  if token_chunk_size is None or token_chunk_size >= n:
    idx, dist = search(z_flat)
  else:
    s = -(-n // int(token_chunk_size))
    r = -(-n // s)
    zt = jnp.pad(z_flat, ((0, r * s - n), (0, 0))).reshape(r, s, d).swapaxes(0, 1)
    idx, dist = jax.lax.map(search, zt)
    idx = idx.swapaxes(0, 1).reshape(-1)[:n]
    dist = dist.swapaxes(0, 1).reshape(-1)[:n]
  return idx, jnp.maximum(dist, 0.0)


def lookup_codes(codebook: jax.Array, indices: jax.Array) -> jax.Array:
  """indices (...) -> embeddings (..., D): the decode path when a prior predicts codes."""
  return jnp.take(codebook, indices, axis=0)


def code_statistics(counts: jax.Array) -> dict[str, jax.Array]:
  """Perplexity and usage (fraction of codes with a non-zero count) of per-code counts.

  Accumulate `aux['counts']` over a validation split and call this for split-level numbers.
  """
  counts = counts.astype(jnp.float32)
  p = counts / jnp.maximum(jnp.sum(counts), 1e-12)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"perplexity": jnp.exp(entropy), "usage": jnp.mean((counts > 0).astype(jnp.float32))}


class VectorQuantizer(nn.Module):
  """Nearest-code quantiser over the last axis of z, with a straight-through estimator.

  Attributes:
    num_codes: K.
    code_dim: D (must equal z.shape[-1]).
    mode: 'ema' (codebook = EMA of assigned encoder outputs, no codebook loss) or 'learned'
      (codebook is a parameter trained by the codebook loss).
    beta: commitment weight; commitment_loss = beta * mean((z - sg(e))^2).
    decay: EMA decay of cluster sizes / sums (both modes track cluster sizes for restarts).
    epsilon: Laplace smoothing of cluster sizes so an empty cluster never divides by zero.
    cosine: l2-normalise z and codes; lookup is by max cosine and codes are unit-norm.
    restart_threshold: a code whose EMA cluster size (assignments per step) falls below this
      is re-initialised from a random current encoder output; 0 disables restarts. Cluster
      sizes start at 0, so the first training step restarts every unused code at encoder
      outputs (a data-dependent initialisation); a restarted code starts with pseudo-count 1,
      i.e. log(threshold)/log(decay) steps of grace before it can be restarted again.
    usage_window: codebook usage = fraction of codes assigned in the last `usage_window`
      training steps (exact, from a per-code steps-since-used counter).
    chunk_size / token_chunk_size / precision: see `nearest_codes`.
    codebook_init: initialiser of the (K, D) codebook.
  """
  num_codes: int
  code_dim: int
  mode: str = "ema"
  beta: float = 0.25
  decay: float = 0.99
  epsilon: float = 1e-5
  cosine: bool = False
  restart_threshold: float = 1e-2
  usage_window: int = 100
  chunk_size: int | None = 4096
  token_chunk_size: int | None = None
  precision: Any = None
  codebook_init: Callable[..., jax.Array] = nn.initializers.normal(stddev=1.0)

  def setup(self):
    if self.mode not in ("ema", "learned"):
      raise ValueError(f"VectorQuantizer.mode must be 'ema' or 'learned', got {self.mode!r}")
    k, d = self.num_codes, self.code_dim
    codes = ("codebook", "code_dim")

    def stat(name, init_fn, names, shape, dtype=jnp.float32):
      return self.variable(STATS, name, nn.with_logical_partitioning(init_fn, names), shape, dtype)

    if self.mode == "ema":
      self.codebook = self.variable(
          STATS, "codebook",
          nn.with_logical_partitioning(
              lambda: self.codebook_init(self.make_rng("params"), (k, d), jnp.float32), codes))
      self.ema_embed_sum = stat("ema_embed_sum", jnp.zeros, codes, (k, d))
    else:
      self.codebook = self.param(
          "codebook", nn.with_logical_partitioning(self.codebook_init, codes), (k, d), jnp.float32)
      self.codebook_offset = stat("codebook_offset", jnp.zeros, codes, (k, d))
    self.ema_cluster_size = stat("ema_cluster_size", jnp.zeros, ("codebook",), (k,))
    self.steps_since_used = stat("steps_since_used", lambda s, t: jnp.full(s, _NEVER_USED, t),
                                 ("codebook",), (k,), jnp.int32)

  def get_codebook(self) -> jax.Array:
    """The (K, D) codes that lookup uses (unit-norm in cosine mode)."""
    if self.mode == "ema":
      e = self.codebook.value
    else:
      e = self.codebook + self.codebook_offset.value
    return l2_normalize(e) if self.cosine else e

  def lookup(self, indices: jax.Array) -> jax.Array:
    """indices (...) -> code vectors (..., D) float32, e.g. for codes sampled from a prior."""
    return lookup_codes(self.get_codebook(), indices)

  def __call__(self, z: jax.Array, train: bool = False,
               rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Quantises z (..., D).

    Returns (z_q, aux): z_q has z's shape and dtype, equal in value to the selected codes,
    with gradient passed straight through to z. aux holds scalars 'loss' (= commitment_loss +
    codebook_loss, to add to the task loss), 'commitment_loss', 'codebook_loss' (0 in ema
    mode), 'perplexity' and 'batch_usage' (this batch), 'usage' (window), 'restarts' (codes
    restarted this step), and arrays 'indices' (z.shape[:-1], int32) and 'counts' (K,).
    With train=True (and not while initialising) the stats are updated and dead codes
    restarted, with `rng` or else self.make_rng('vq').
    """
    if z.shape[-1] != self.code_dim:
      raise ValueError(f"VectorQuantizer: z has {z.shape[-1]} channels, code_dim={self.code_dim}")
    k = self.num_codes
    lead = z.shape[:-1]
    z_flat = z.reshape(-1, self.code_dim).astype(jnp.float32)
    z_flat = mesh_lib.constrain(z_flat, ("batch", "act_channels"))
    if self.cosine:
      z_flat = l2_normalize(z_flat)

    e = self.get_codebook()
    if self.mode == "ema":
      e = jax.lax.stop_gradient(e)
    idx, _ = nearest_codes(z_flat, e, self.chunk_size, self.token_chunk_size, self.precision)
    q = lookup_codes(e, idx)

    commitment_loss = self.beta * jnp.mean(jnp.square(z_flat - jax.lax.stop_gradient(q)))
    if self.mode == "learned":
      codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z_flat) - q))
    else:
      codebook_loss = jnp.zeros((), jnp.float32)
    # Straight-through, written so the forward value is exactly the code (z - sg(z) == 0).
    z_q = jax.lax.stop_gradient(q) + (z_flat - jax.lax.stop_gradient(z_flat))

    counts = jnp.zeros((k,), jnp.float32).at[idx].add(1.0)
    restarts = jnp.zeros((), jnp.float32)
    if train and not self.is_initializing():
      restarts = self._update(jax.lax.stop_gradient(z_flat), idx, counts, rng)

    stats = code_statistics(counts)
    aux = {
        "loss": commitment_loss + codebook_loss,
        "commitment_loss": commitment_loss,
        "codebook_loss": codebook_loss,
        "perplexity": stats["perplexity"],
        "batch_usage": stats["usage"],
        "usage": jnp.mean((self.steps_since_used.value < self.usage_window).astype(jnp.float32)),
        "restarts": restarts,
        "indices": idx.reshape(lead),
        "counts": counts,
    }
    return z_q.reshape(z.shape).astype(z.dtype), aux

  def _update(self, z_flat, idx, counts, rng) -> jax.Array:
    """EMA / usage update and dead-code restart; returns the number of codes restarted."""
    k, decay = self.num_codes, self.decay
    used = counts > 0
    self.steps_since_used.value = jnp.where(
        used, 0, jnp.minimum(self.steps_since_used.value + 1, _NEVER_USED))
    size = decay * self.ema_cluster_size.value + (1.0 - decay) * counts

    if self.mode == "ema":
      sums = jnp.zeros((k, self.code_dim), jnp.float32).at[idx].add(z_flat)
      embed_sum = decay * self.ema_embed_sum.value + (1.0 - decay) * sums
      total = jnp.sum(size)
      smoothed = (size + self.epsilon) / (total + k * self.epsilon) * total
      # A code that has never held mass keeps its initial value instead of collapsing to 0.
      codebook = jnp.where((size > 0)[:, None], embed_sum / smoothed[:, None],
                           self.codebook.value)
    if self.restart_threshold > 0:
      if rng is None:
        rng = self.make_rng("vq")
      dead = size < self.restart_threshold
      pick = jax.random.randint(rng, (k,), 0, z_flat.shape[0])
      fresh = jnp.take(z_flat, pick, axis=0)
      size = jnp.where(dead, 1.0, size)
      if self.mode == "ema":
        codebook = jnp.where(dead[:, None], fresh, codebook)
        embed_sum = jnp.where(dead[:, None], fresh, embed_sum)
      else:
        self.codebook_offset.value = jnp.where(
            dead[:, None], fresh - jax.lax.stop_gradient(self.codebook), self.codebook_offset.value)
      restarts = jnp.sum(dead.astype(jnp.float32))
    else:
      restarts = jnp.zeros((), jnp.float32)
    self.ema_cluster_size.value = size
    if self.mode == "ema":
      self.ema_embed_sum.value = embed_sum
      self.codebook.value = codebook
    return restarts
