"""The 3D classifier and segmenter trained by the shared trainer on toy volumes with a planted signal."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from synthmri_jax.data import loader
from synthmri_jax.models.classifier import ResNet3D
from synthmri_jax.models.segmenter import UNet3D
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.training import trainer
from synthmri_jax.tasks.classifier import ClassifierTask, predict_source
from synthmri_jax.sharding import unbox
from synthmri_jax.tasks.segmenter import SegmenterTask

SHAPE = (16, 16, 16)


@pytest.fixture(scope="module", autouse=True)
def _fast_init_compile():
  """jax's default partitionable threefry compiles each random-init op in ~5 s on this CPU
  (0.8 s without); the models and their numerics are otherwise the same."""
  with jax.threefry_partitionable(False):
    yield


def _config(steps: int, lr: float = 3e-3) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train = ml_collections.ConfigDict(dict(steps=steps, lr=lr, warmup_steps=5, log_every=steps, eval_every=0,
                                           checkpoint_every=steps, keep_checkpoints=1))
  return c


def _toy_classes(n: int, seed: int) -> dict[str, np.ndarray]:
  """Noise volumes; class 1 carries a brighter 4-voxel cube at a jittered position."""
  r = np.random.default_rng(seed)
  labels = np.arange(n) % 2
  images = r.normal(0.5, 0.15, size=(n, *SHAPE, 1)).astype(np.float32)
  for i in np.flatnonzero(labels):
    x, y, z = r.integers(4, 8, size=3)
    images[i, x:x + 4, y:y + 4, z:z + 4] += 0.5
  return {"image": images, "label": labels.astype(np.int32)}


def _toy_blobs(n: int, seed: int) -> dict[str, np.ndarray]:
  """Noise volumes with one bright sphere (radius 2.5-4) at a random place; mask = the sphere."""
  r = np.random.default_rng(seed)
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1)
  images = r.normal(0.3, 0.1, size=(n, *SHAPE, 1)).astype(np.float32)
  masks = np.zeros((n, *SHAPE), np.uint8)
  for i in range(n):
    c, rad = r.uniform(4, 12, size=3), r.uniform(2.5, 4.0)
    m = ((grid - c) ** 2).sum(-1) <= rad ** 2
    masks[i] = m
    images[i, m, 0] += 0.6
  return {"image": images, "mask": masks}


@pytest.fixture(scope="module")
def trained_classifier(tmp_path_factory):
  train, test = _toy_classes(64, 0), _toy_classes(40, 1)
  task = ClassifierTask(ResNet3D(num_classes=2, channels=(4, 8), blocks=1, norm_groups=2))
  it = loader.train_iterator(loader.ArraySource(train), 8, seed=0)
  state = trainer.train(task, _config(80), str(tmp_path_factory.mktemp("cls")), it)
  variables = jax.device_get({"params": state.eval_params, **state.model_state})
  return task, variables, test


def test_classifier_learns_separable_toy(trained_classifier):
  task, variables, test = trained_classifier
  pred = predict_source(task.predict, variables, loader.ArraySource(test), batch_size=8)
  assert pred["probs"].shape == (40, 2) and pred["features"].shape == (40, 16)
  np.testing.assert_allclose(pred["probs"].sum(1), 1.0, atol=1e-5)
  assert roc_auc_score(test["label"], pred["probs"][:, 1]) > 0.9


def test_features_method_matches_predict_and_order(trained_classifier):
  task, variables, test = trained_classifier
  src = loader.ArraySource({k: v[:11] for k, v in test.items()})   # 11: the last eval batch is padded
  pred = predict_source(task.predict, variables, src, batch_size=8)
  direct = task.model.apply(variables, jnp.asarray(test["image"][:11]), method=ResNet3D.features)
  np.testing.assert_allclose(pred["features"], np.asarray(direct), rtol=1e-4, atol=1e-5)


def test_linear_half_of_the_features_keeps_a_gradient_when_the_silu_half_dies():
  """The dead run the pooling guards against: a main path negative everywhere (the last block's
  bias at -20) leaves silu(x) ~ 0 with no gradient; the linear half still trains the network."""
  model = ResNet3D(num_classes=2, channels=(4, 8), blocks=1, norm_groups=2, conv_impl="native")
  x = jnp.asarray(_toy_classes(4, 0)["image"])
  params = unbox(model.init(jax.random.key(0), x))["params"]
  bias = params["stage1_block0"]["conv_1"]
  params["stage1_block0"]["conv_1"] = {**bias, "bias": jnp.full_like(bias["bias"], -20.0)}
  feats = model.apply({"params": params}, x, method=ResNet3D.features)
  lin, act = np.asarray(feats[:, :8]), np.asarray(feats[:, 8:])
  assert lin.max() < -10 and np.abs(act).max() < 1e-5        # the SiLU half is dead

  def stem_grad(half):
    g = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, method=ResNet3D.features)[:, half]))(params)
    return float(jnp.linalg.norm(g["stem"]["kernel"]))

  assert stem_grad(slice(8, 16)) < 1e-4 and stem_grad(slice(0, 8)) > 1e-1


def test_input_pool_is_a_block_mean_before_the_stem():
  x = jnp.asarray(_toy_classes(2, 0)["image"])                       # (2, 16, 16, 16, 1)
  pooled = x.reshape(2, 8, 2, 8, 2, 8, 2, 1).mean((2, 4, 6))
  kw = dict(num_classes=2, channels=(4, 8), blocks=1, norm_groups=2, conv_impl="native")
  model = ResNet3D(input_pool=2, **kw)
  params = unbox(model.init(jax.random.key(0), x))["params"]
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, x)),
                             np.asarray(ResNet3D(**kw).apply({"params": params}, pooled)), rtol=1e-5, atol=1e-6)


def test_multiclass_and_logical_annotations():
  model = ResNet3D(num_classes=3, channels=(4, 8), blocks=(1, 2), stem_stride=2, norm_groups=2, conv_impl="native")
  x = jnp.zeros((2, 12, 10, 8, 2))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(b, nn.LogicallyPartitioned) for b in leaves)
  mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  mesh_lib.tree_shardings(boxed, mesh)   # every name has a rule
  task = ClassifierTask(model)
  params, ms = jax.jit(task.init)(jax.random.key(0), {"image": x, "label": jnp.zeros((2,), jnp.int32)})
  params = unbox(params)
  batch = {"image": x + 1.0, "label": jnp.array([0, 2])}
  out, (loss, _) = jax.jit(lambda p: (task.predict(p, ms, batch), task.loss(p, ms, batch, jax.random.key(1), 0)))(params)
  assert out["probs"].shape == (2, 3) and out["features"].shape == (2, 16) and np.isfinite(float(loss))
  with pytest.raises(ValueError, match="num_classes"):
    jax.eval_shape(lambda: ResNet3D(num_classes=1).init(jax.random.key(0), x))


def test_segmenter_odd_grid_shape():
  model = UNet3D(num_classes=3, channels=(4, 8, 8), norm_groups=2)
  x = jnp.zeros((1, 13, 10, 7, 1))
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  assert jax.eval_shape(model.apply, v, x).shape == (1, 13, 10, 7, 3)


@pytest.mark.slow
def test_segmenter_dice_on_toy_blobs(tmp_path):
  train, test = _toy_blobs(48, 0), _toy_blobs(16, 1)
  task = SegmenterTask(UNet3D(num_classes=2, channels=(4, 8), norm_groups=2))
  it = loader.train_iterator(loader.ArraySource(train), 4, seed=0)
  state = trainer.train(task, _config(100, lr=1e-2), str(tmp_path), it)
  variables = jax.device_get({"params": state.eval_params, **state.model_state})
  pred = predict_source(task.predict, variables, loader.ArraySource(test), batch_size=4)["labels"]
  from synthmri_jax.evaluation.fidelity import dice_binary
  dice = np.mean([dice_binary(p > 0, t > 0) for p, t in zip(pred, test["mask"])])
  assert dice > 0.8, dice
