"""A tiny Task for the trainer tests: conv + dense regression with logical axes and a non-gradient collection.

Shared by test_trainer.py, test_resume.py and test_sharding.py (also run in subprocesses).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from synthmri_jax import sharding as mesh_lib

SPATIAL = (4, 4, 4)
CHANNELS = 2


def _flat_lecun_normal(key, shape, dtype=jnp.float32):
  """lecun_normal drawn flat then reshaped: XLA:CPU compiles threefry over a 5-D shape ~10x slower."""
  fan_in = int(np.prod(shape[:-1]))
  return (jax.random.normal(key, (int(np.prod(shape)),), dtype) / np.sqrt(fan_in)).reshape(shape)


def _kernel(names):
  return nn.with_logical_partitioning(_flat_lecun_normal, names)


class ToyNet(nn.Module):
  """Conv3D (kernel sharded on conv_in/conv_out) -> mean pool -> Dense(embed, mlp) -> Dense -> scalar."""

  @nn.compact
  def __call__(self, x):
    x = mesh_lib.constrain(x, ("batch", "act_spatial", "act_spatial", "act_spatial", "act_channels"))
    x = nn.Conv(8, (3, 3, 3), padding="SAME", dtype=x.dtype,
                kernel_init=_kernel(("conv_spatial", "conv_spatial", "conv_spatial", "conv_in", "conv_out")))(x)
    x = nn.gelu(x)
    feats = x.mean(axis=(1, 2, 3))
    # A non-gradient collection updated by the loss (like an EMA codebook).
    stats = self.variable("stats", "feature_mean", lambda: jnp.zeros((8,), jnp.float32))
    if self.is_mutable_collection("stats") and not self.is_initializing():
      stats.value = 0.9 * stats.value + 0.1 * jax.lax.stop_gradient(feats.mean(0)).astype(jnp.float32)
    h = nn.Dense(16, dtype=x.dtype, kernel_init=_kernel(("embed", "mlp")))(feats)
    h = nn.gelu(h)
    return nn.Dense(1, dtype=x.dtype, kernel_init=_kernel(("mlp", "embed")))(h)[:, 0]


@dataclasses.dataclass
class ToyTask:
  name: str = "toy"
  frozen_prefix: str = ""     # params whose first path element equals this are frozen
  poison: bool = False        # loss is NaN when batch['poison'] > 0 anywhere

  def __post_init__(self):
    self.model = ToyNet()

  def init(self, rng, batch):
    variables = self.model.init(rng, batch["x"])
    params = variables.pop("params")
    return params, dict(variables)

  def loss(self, params, model_state, batch, rng, step):
    pred, new_ms = self.model.apply({"params": params, **model_state}, batch["x"], mutable=list(model_state))
    err = pred.astype(jnp.float32) - batch["y"]
    noise = 0.0 * jax.random.normal(rng, ())  # rng is threaded (and must be a valid key)
    loss = jnp.mean(err ** 2) + noise
    if self.poison:
      loss = jnp.where(jnp.any(batch["poison"] > 0), jnp.nan, loss)
    return loss, ({"index_sum": jnp.sum(batch["index"]).astype(jnp.float32)}, dict(new_ms))

  def evaluate(self, params, model_state, batch):
    pred = self.model.apply({"params": params, **model_state}, batch["x"])
    return {"sse": jnp.sum((pred - batch["y"]) ** 2), "count": jnp.asarray(batch["y"].shape[0], jnp.float32)}

  def summaries(self, params, model_state, batch):
    x = np.asarray(jax.device_get(batch["x"]))
    return {"input_mid_axial": np.clip(x[0, :, :, SPATIAL[2] // 2, 0], 0, 1)}

  def trainable(self, path):
    return not (self.frozen_prefix and path[0] == self.frozen_prefix)


def make_data(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
  """A learnable regression: y is a fixed smooth function of the volume's channel means."""
  r = np.random.default_rng(seed)
  x = r.normal(size=(n, *SPATIAL, CHANNELS)).astype(np.float32)
  y = (np.tanh(x[..., 0].mean(axis=(1, 2, 3)) * 4.0) + 0.5 * x[..., 1].mean(axis=(1, 2, 3)) * 4.0).astype(np.float32)
  return {"x": x, "y": y, "index": np.arange(n, dtype=np.int32), "poison": np.zeros(n, np.float32)}


def make_iter(data: dict[str, np.ndarray], batch_size: int, seed: int = 0):
  """grain pipeline like the real loader: shuffled, repeated, batched, checkpointable."""
  n = len(data["y"])
  ds = (grain.MapDataset.source(list(range(n))).shuffle(seed=seed).repeat()
        .map(lambda i: {k: v[i] for k, v in data.items()}).batch(batch_size, drop_remainder=True))
  return iter(ds.to_iter_dataset())


def eval_iter_fn(data: dict[str, np.ndarray], batch_size: int):
  n = len(data["y"]) // batch_size * batch_size
  return lambda: ({k: v[i:i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size))


def config(**train) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  t = dict(steps=20, lr=3e-3, warmup_steps=2, weight_decay=1e-4, clip_norm=1.0, log_every=5,
           eval_every=0, checkpoint_every=10, keep_checkpoints=3)
  t.update(train)
  c.train = ml_collections.ConfigDict(t)
  return c


def make_stepper(task, config, batch_np, mesh=None):
  """(init() -> fresh state, step(state, batch_np, i) -> (state, metrics)), jitted as trainer.train does."""
  from synthmri_jax.training import optim, trainer
  cfg = optim.train_config(config)
  mesh = mesh or mesh_lib.make_mesh(config.mesh)
  bsh, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  init_fn, _, state_sh, tx = trainer.build_state(task, cfg, mesh, trainer.shard_batch(batch_np, bsh))
  state = init_fn()
  with jax.set_mesh(mesh):
    jitted = jax.jit(trainer.make_train_step(task, tx, cfg), in_shardings=(state_sh, bsh, rep),
                     out_shardings=(state_sh, rep), donate_argnums=0)
  run_key = jax.random.wrap_key_data(np.asarray(jax.device_get(state.rng)))

  def step(state, batch, i):
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      return jitted(state, trainer.shard_batch(batch, bsh), jax.random.fold_in(run_key, i))

  return init_fn, step

