"""The same train step on 8 fake CPU devices, meshes (8,1,1), (2,4,1), (2,2,2), equals the 1-device step.

Runs in a subprocess because XLA_FLAGS must be set before jax starts.
"""

import numpy as np

_CHILD = r"""
import json, sys
import jax, ml_collections, numpy as np
import toy_task as tt
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.training import trainer

assert jax.device_count() == 8, jax.devices()
out = sys.argv[1]
data = tt.make_data(64)
batch = {k: v[:8] for k, v in data.items()}
cfg = tt.config(ema_decay=0.9)
norm = lambda spec: [list(a) if isinstance(a, tuple) else a for a in spec]
result, arrays = {}, {}
for shape in ((1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)):
  mc = ml_collections.ConfigDict(dict(zip(("data", "fsdp", "tensor"), shape)))
  mesh = mesh_lib.make_mesh(mc, devices=jax.devices()[:int(np.prod(shape))])
  init, step = tt.make_stepper(tt.ToyTask(), cfg, batch, mesh=mesh)
  state, metrics = step(init(), batch, 0)
  name = "x".join(map(str, shape))
  p = state.params
  mu = [v for path, v in jax.tree_util.tree_leaves_with_path(state.opt_state)
        if jax.tree_util.keystr(path).endswith("mu['Dense_0']['kernel']")][0]
  result[name] = dict(
      loss=float(metrics["loss"]),
      specs={k: norm(p[k]["kernel"].sharding.spec) for k in ("Conv_0", "Dense_0", "Dense_1")},
      dense0_shard=list(p["Dense_0"]["kernel"].addressable_shards[0].data.shape),
      mu_spec=norm(mu.sharding.spec), ema_spec=norm(state.ema_params["Dense_0"]["kernel"].sharding.spec))
  for i, x in enumerate(jax.tree.leaves(jax.device_get((state.params, state.ema_params, state.model_state)))):
    arrays[f"{name}_{i}"] = np.asarray(x)

# A checkpoint written on one mesh restores onto another (orbax reshards).
wd = out + "_run"
c = tt.config(steps=2, checkpoint_every=2, log_every=1)
m222 = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)))
trainer.train(tt.ToyTask(), c, wd, tt.make_iter(data, 8), mesh=m222)
c.train.steps = 3
m241 = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4, tensor=1)))
s = trainer.train(tt.ToyTask(), c, wd, tt.make_iter(data, 8), mesh=m241)
result["reshard"] = dict(step=int(s.step), spec=norm(s.params["Dense_0"]["kernel"].sharding.spec),
                         fsdp=s.params["Dense_0"]["kernel"].sharding.mesh.shape["fsdp"])
np.savez(out + ".npz", **arrays)
with open(out + ".json", "w") as f:
  json.dump(result, f)
"""


def test_sharded_steps_match_single_device(tmp_path, on_fake_devices):
  r, arrays = on_fake_devices(_CHILD, str(tmp_path / "sharding"))
  ref = r["1x1x1"]
  n = len([k for k in arrays.files if k.startswith("1x1x1_")])
  for name in ("8x1x1", "2x4x1", "2x2x2"):
    assert abs(r[name]["loss"] - ref["loss"]) <= 1e-6 * max(1.0, abs(ref["loss"])), name
    for i in range(n):
      np.testing.assert_allclose(arrays[f"{name}_{i}"], arrays[f"1x1x1_{i}"], rtol=1e-5, atol=1e-6, err_msg=name)

  # Placement follows mesh.LOGICAL_AXIS_RULES; an axis that does not divide a dimension is dropped
  # (conv_in = 2 channels over fsdp = 4; Dense_1's single output over fsdp).
  conv_both = [None, None, None, "fsdp", "tensor"]
  assert r["8x1x1"]["specs"] == {"Conv_0": conv_both, "Dense_0": ["fsdp", "tensor"], "Dense_1": ["tensor", "fsdp"]}
  assert r["2x4x1"]["specs"] == {"Conv_0": [None, None, None, None, "tensor"], "Dense_0": ["fsdp", "tensor"],
                                 "Dense_1": ["tensor"]}
  assert r["2x2x2"]["specs"] == {"Conv_0": conv_both, "Dense_0": ["fsdp", "tensor"], "Dense_1": ["tensor"]}
  assert r["2x4x1"]["dense0_shard"] == [2, 16] and r["2x2x2"]["dense0_shard"] == [4, 8]
  for name in ("8x1x1", "2x4x1", "2x2x2"):  # Adam moments and the EMA live where their parameter lives
    assert r[name]["mu_spec"] == r[name]["specs"]["Dense_0"] == r[name]["ema_spec"]
  assert r["reshard"] == {"step": 3, "spec": ["fsdp", "tensor"], "fsdp": 4}
