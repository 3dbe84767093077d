"""The 'spatial' mesh axis: a tokenizer train step with each volume's activations split over 4 of 8 fake
CPU devices gives the 1-device step's loss and parameters, and each device holds a fraction of the
activations (the point of the axis: the 1 mm tokenizer on 16 GiB chips). A stage's own mesh block
(tokenizer.mesh) overrides the global one for that stage only.

Runs in a subprocess because XLA_FLAGS must be set before jax starts.
"""

import ml_collections
import numpy as np
import pytest

from synthmri_jax import sharding as mesh_lib

_CHILD = r"""
import json, sys
import flax.linen as nn
import jax, ml_collections, numpy as np
import toy_task as tt
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.config_blocks.tokenizer import tokenizer_config
from synthmri_jax.tasks.tokenizer import make_task
from synthmri_jax.training import optim, trainer

assert jax.device_count() == 8, jax.devices()
out = sys.argv[1]
t = tokenizer_config("quickstart")
t.variant = "vqvae"
t.generative.quantize = False
t.model.patch_size = 1
t.model.channels = (8, 16)
t.model.num_res_blocks = (1, 1)
t.model.attention_levels = (False, True)   # attention over tokens sharded like the voxels they come from
t.model.norm_groups = 4
t.model.num_heads = 2
t.loss.perceptual = 0.0
task = make_task(t, 1, "main")
rng = np.random.default_rng(0)
g = np.stack(np.meshgrid(*[np.linspace(-1, 1, 16)] * 3, indexing="ij"), -1)
vols = np.stack([np.exp(-np.sum((g - rng.uniform(-0.5, 0.5, 3)) ** 2, -1) / 0.2) for _ in range(2)])
batch = {"image": vols[..., None].astype(np.float32)}
cfg = tt.config()
# adam_eps 1: an update ~ lr * gradient (Adam's first step is lr * sign(g), which turns rounding in
# near-zero gradients into whole-lr differences)
cfg.train.update(dict(lr=0.1, warmup_steps=0, adam_eps=1.0))
result, arrays = {}, {}
tr = optim.train_config(cfg)
for shape in ((1, 1, 1, 1), (1, 1, 4, 1), (2, 1, 4, 1)):
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(zip(mesh_lib.MESH_AXES, shape))),
                            devices=jax.devices()[:int(np.prod(shape))])
  bsh, rep = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  sharded = trainer.shard_batch(batch, bsh)
  init_fn, abstract, state_sh, tx = trainer.build_state(task, tr, mesh, sharded)
  key = jax.eval_shape(lambda: jax.random.key(0))
  state = init_fn()   # outside set_mesh, as trainer.train does
  name = "x".join(map(str, shape))
  if name == "1x1x1x1":
    for i, x in enumerate(jax.tree.leaves(jax.device_get(state.params))):
      arrays[f"init_{i}"] = np.asarray(x)
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
    compiled = trainer.jit_train_step(task, tx, tr, state_sh, mesh).lower(
        abstract, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=bsh), sharded),
        jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep)).compile()
    state, metrics = compiled(state, sharded, jax.device_put(jax.random.key(1), rep))
  result[name] = dict(loss=float(metrics["loss"]), grad_norm=float(metrics["grad_norm"]),
                      temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes))   # per device
  for i, x in enumerate(jax.tree.leaves(jax.device_get(state.params))):
    arrays[f"{name}_{i}"] = np.asarray(x)
np.savez(out + ".npz", **arrays)
with open(out + ".json", "w") as f:
  json.dump(result, f)
"""


@pytest.mark.slow
def test_spatial_split_matches_one_device_and_splits_the_activations(tmp_path, on_fake_devices):
  r, arrays = on_fake_devices(_CHILD, str(tmp_path / "spatial"), timeout=900)
  ref = "1x1x1x1"
  n = len([k for k in arrays.files if k.startswith(ref + "_")])
  assert n == len([k for k in arrays.files if k.startswith("init_")])
  for name in ("1x1x4x1", "2x1x4x1"):
    assert abs(r[name]["loss"] - r[ref]["loss"]) <= 1e-5 * max(1.0, abs(r[ref]["loss"])), (name, r)
    assert abs(r[name]["grad_norm"] - r[ref]["grad_norm"]) <= 1e-4 * r[ref]["grad_norm"], (name, r)
    for i in range(n):
      np.testing.assert_allclose(arrays[f"{name}_{i}"], arrays[f"{ref}_{i}"], rtol=1e-4, atol=1e-6, err_msg=name)
  moved = sum(not np.allclose(arrays[f"{ref}_{i}"], arrays[f"init_{i}"]) for i in range(n))
  assert moved > n // 2, (moved, n)   # the step moved the parameters: the comparison is not of two inits
  # 4-way spatial: each device holds a part of the activations; replicated, it would hold all of
  # them. At 16^3 a depth quarter is 4 slices (2 at the second level) plus a 1-slice halo on each
  # side, so the part is about half (measured 0.52); at 1 mm (176 slices) the halos are ~2 %.
  assert r["1x1x4x1"]["temp_bytes"] < 0.6 * r[ref]["temp_bytes"], r
  assert r["2x1x4x1"]["temp_bytes"] < 0.75 * r["1x1x4x1"]["temp_bytes"], r   # and 'data' splits the batch


def test_stage_mesh_block_overrides_the_global_one():
  c = ml_collections.ConfigDict(dict(mesh=dict(data=-1, fsdp=1, tensor=1), tokenizer=dict(mesh=dict(spatial=4)),
                                     ldm=dict()))
  tok = mesh_lib.mesh_block(c, "tokenizer")
  assert (tok.data, tok.fsdp, tok.spatial, tok.tensor) == (-1, 1, 4, 1)
  ldm = mesh_lib.mesh_block(c, "ldm")
  assert (ldm.data, ldm.fsdp, ldm.spatial, ldm.tensor) == (-1, 1, 1, 1)
  assert mesh_lib.mesh_block(None).data == -1
  c.tokenizer.mesh.speed = 2
  with pytest.raises(ValueError, match="tokenizer.mesh: unknown mesh axes"):
    mesh_lib.mesh_block(c, "tokenizer")
  with pytest.raises(ValueError, match="no size for axis 'fsdp'"):
    mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, tensor=1)))
  # on one device a spatial split of 4 cannot be made, and the message names the mesh
  with pytest.raises(ValueError, match="'spatial': 4"):
    mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, spatial=4, tensor=1)))
