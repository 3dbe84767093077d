"""Tokenizers (VQ-VAE, VQGAN, dual-codebook), their losses and perceptual net (phased training and the
stage: test_tokenizer_phases.py; the GAN terms: test_tokenizer_gan.py).

Tiny 16^3 volumes; compiled steps are shared through module-scoped fixtures because compiles
dominate on a 2-core CPU.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synthmri_jax.evaluation import fidelity
from synthmri_jax.models import perceptual as perc_lib
from synthmri_jax.models import tokenizer as tok_models
from synthmri_jax.models import tokenizer_blocks
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.training import optim, trainer
from synthmri_jax.sharding import unbox
from synthmri_jax.tasks import tokenizer as T
from synthmri_jax.config_blocks.tokenizer import tokenizer_config

SIZE = 16
N = 4


def tiny_config(variant="dual"):
  c = tokenizer_config("quickstart")
  c.variant = variant
  c.model.channels = (8, 16, 32)
  c.model.num_res_blocks = (0, 1, 1)
  c.model.norm_groups = 4
  c.model.num_heads = 2
  c.clinical.num_codes = 64
  c.clinical.code_dim = 8
  c.clinical.dropout = 0.25
  c.generative.num_codes = 32
  c.generative.code_dim = 4
  c.prior.channels = 16
  c.perceptual.channels = (4, 8)
  c.gan.channels = 4
  c.gan.num_layers = 2
  c.gan.start_step = 2
  return c


def blobs(n=N, size=SIZE, seed=0):
  """Smooth volumes in [0, 1]: four Gaussian blobs each (predicting their mean gives < 15 dB)."""
  r = np.random.default_rng(seed)
  g = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
  out = np.zeros((n, size, size, size, 1), np.float32)
  for i in range(n):
    v = np.zeros((size,) * 3, np.float32)
    for _ in range(4):
      c = r.uniform(3, size - 3, 3)
      s = r.uniform(2, 4)
      v += r.uniform(0.3, 0.8) * np.exp(-np.sum((g - c) ** 2, -1) / (2 * s * s))
    out[i, ..., 0] = np.clip(v, 0, 1)
  return out


def train_cfg(**kw):
  t = dict(steps=1000, lr=3e-3, warmup_steps=10, weight_decay=0.0, clip_norm=1.0, schedule="constant")
  t.update(kw)
  return optim.train_config(t)


class Stepper:
  """The trainer's state and jitted step, without its loop (no checkpoints, no I/O)."""

  def __init__(self, task, batch, **train):
    self.cfg = train_cfg(**train)
    self.mesh = mesh_lib.mesh_from_config(None)
    self.bsh = mesh_lib.batch_sharding(self.mesh)
    rep = mesh_lib.replicated(self.mesh)
    init_fn, _, self.state_sh, tx = trainer.build_state(task, self.cfg, self.mesh, self.shard(batch))
    self.state = init_fn()
    with jax.set_mesh(self.mesh):
      self._step = jax.jit(trainer.make_train_step(task, tx, self.cfg), in_shardings=(self.state_sh, self.bsh, rep),
                           out_shardings=(self.state_sh, rep), donate_argnums=0)
    self.key = jax.random.key(0)
    self.i = 0

  def shard(self, batch):
    return trainer.shard_batch(batch, self.bsh)

  def step(self, batch):
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      self.state, m = self._step(self.state, self.shard(batch), jax.random.fold_in(self.key, self.i))
    self.i += 1
    return m


def host(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def bits_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(la, lb))


def names(path):
  return tuple(str(getattr(k, "key", k)) for k in path)


@pytest.fixture(scope="module")
def volumes():
  x = blobs()
  return {"image": x, "valid": np.ones((N,), bool)}


@pytest.fixture(scope="module")
def overfit_dual(volumes):
  """The dual tokenizer trained jointly on 4 volumes (all parts, prior and clinical dropout included)."""
  task = T.DualTask(tiny_config("dual"), 1, "joint")
  s = Stepper(task, volumes)
  for _ in range(160):
    m = s.step(volumes)
  assert float(m["skipped"]) == 0
  return task, s.state


# ------------------------------------------------------------------------------ learning


@pytest.mark.slow
def test_dual_overfits_and_reports_clinical_modes(overfit_dual, volumes):
  x = volumes["image"]
  mean_psnr = 10 * np.log10(1.0 / np.mean((x - x.mean()) ** 2))
  assert mean_psnr < 15.0
  task, state = overfit_dual
  ev = jax.device_get(jax.jit(task.eval_outputs)(state.params, state.model_state, volumes))
  enc, pred, null = (float(np.mean(ev[f"psnr_{m}"])) for m in ("encoded", "predicted", "null"))
  print(f"\n[dual overfit] PSNR encoded {enc:.2f} dB, predicted {pred:.2f} dB, null {null:.2f} dB, "
        f"clinical head {float(np.mean(ev['psnr_clinical_head'])):.2f} dB, "
        f"prior top-1 {float(np.mean(ev['prior_accuracy'])):.3f}, mean predictor {mean_psnr:.2f} dB")
  assert enc > 25.0, enc
  assert float(np.mean(ev["ssim"])) > 0.8
  # Without a scan to encode, both fallbacks still decode a volume far better than its mean.
  assert pred > mean_psnr + 5 and null > mean_psnr + 5, (pred, null)
  assert float(np.mean(ev["prior_accuracy"])) > 1.0 / 64
  # The DDPM's interface: decode a perturbed (sampled-like) generative latent with a predicted clinical path.
  model = task.model
  v = {"params": state.params["tokenizer"], "vq_stats": state.model_state["vq_stats"]}
  z = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_generative))(v, x)
  out = jax.jit(lambda v, z: model.apply(v, z, method=model.decode_from_generative))(v, z)
  assert out.shape == x.shape and fidelity.psnr(np.asarray(out), x, data_range=1.0) == pytest.approx(pred, abs=0.5)


def test_dual_encode_decode_shapes(volumes):
  """Shapes only (abstract evaluation, no compile); the numbers are checked by the over-fit test."""
  task = T.DualTask(tiny_config("dual"), 1, "joint")
  model = task.model
  params, ms = jax.eval_shape(task.init, jax.random.key(0), volumes)
  v = {"params": unbox(params)["tokenizer"], "vq_stats": unbox(ms)["vq_stats"]}
  x = jax.ShapeDtypeStruct(volumes["image"].shape, jnp.float32)
  z = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode_generative), v, x)
  assert z.shape == (N, 4, 4, 4, 4)
  zc = jax.eval_shape(lambda v, x: model.apply(v, x, method=lambda m, x: m.encode_clinical(x)[0]), v, x)
  assert zc.shape == (N, 8, 8, 8, 8)
  for mode in ("predicted", "null"):
    out = jax.eval_shape(lambda v, z: model.apply(v, z, clinical=mode, method=model.decode_from_generative), v, z)
    assert out.shape == x.shape
  with pytest.raises(ValueError, match="predicted"):
    jax.eval_shape(lambda v, z: model.apply(v, z, clinical="encoded", method=model.decode_from_generative), v, z)


def test_vqvae_shapes_and_grid_check():
  task = T.VQVAETask(tiny_config("vqvae"), 2)
  x = jnp.zeros((1, SIZE, SIZE, SIZE, 2))
  v = jax.eval_shape(lambda: task.model.init({"params": jax.random.key(0)}, x))
  z = jax.eval_shape(lambda v, x: task.model.apply(v, x, method=task.model.encode_generative), v, x)
  assert z.shape == (1, 4, 4, 4, 4)
  out = jax.eval_shape(lambda v, z: task.model.apply(v, z, method=task.model.decode_from_generative), v, z)
  assert out.shape == x.shape
  with pytest.raises(ValueError, match="divisible"):
    jax.eval_shape(lambda v: task.model.apply(v, jnp.zeros((1, 18, 16, 16, 2)), method=task.model.encode_generative),
                   v)


def test_space_to_depth_round_trips_and_groups_cubes():
  from synthmri_jax.models.tokenizer_blocks import depth_to_space, space_to_depth
  x = np.random.default_rng(0).normal(size=(2, 4, 6, 8, 3)).astype(np.float32)
  y = space_to_depth(jnp.asarray(x), 2)
  assert y.shape == (2, 2, 3, 4, 24)
  # Output voxel (i, j, k) holds exactly the input's 2x2x2 cube at (2i, 2j, 2k), all channels.
  np.testing.assert_array_equal(np.sort(np.asarray(y[1, 1, 2, 3])), np.sort(x[1, 2:4, 4:6, 6:8].ravel()))
  np.testing.assert_array_equal(np.asarray(depth_to_space(y, 2)), x)


def test_continuous_patch_autoencoder_learns_and_has_no_codebook(volumes):
  """patch_size=2 + quantize=False: the latent is the encoder output at 1/(2 * 2^(L-1)), decoding
  uses it as it comes (no snapping), and training lowers the loss on the blobs."""
  c = tiny_config("vqvae")
  c.model.patch_size = 2
  c.model.channels = (16, 32)
  c.model.num_res_blocks = (1, 1)
  c.model.attention_levels = (False,) * len(c.model.channels)
  c.generative.quantize = False
  c.loss.perceptual = 0.0
  task = T.VQVAETask(c, 1)
  batch = volumes
  st = Stepper(task, batch, steps=60)
  first = float(st.step(batch)["loss"])
  for _ in range(59):
    m = st.step(batch)
  assert float(m["loss"]) < 0.6 * first and "vq_perplexity" not in m and float(m["latent_rms"]) > 0
  variables = {"params": st.state.params["tokenizer"], "vq_stats": st.state.model_state["vq_stats"]}
  assert not jax.tree.leaves(variables["vq_stats"])
  z = task.model.apply(variables, jnp.asarray(volumes["image"]), method=task.model.encode_generative)
  assert z.shape == (N, SIZE // 4, SIZE // 4, SIZE // 4, 4)
  # quantize=True is ignored without a codebook: the decode of z is the model's reconstruction.
  x_hat = task.model.apply(variables, z, quantize=True, method=task.model.decode_from_generative)
  np.testing.assert_allclose(np.asarray(x_hat), np.asarray(task.reconstruct(st.state.params, st.state.model_state,
                                                                              batch)), atol=1e-5)
  with pytest.raises(ValueError, match="patch_size"):
    task.model.apply(variables, jnp.zeros((1, 18, 16, 16, 1)), method=task.model.encode_generative)


# ------------------------------------------------------------------------------ losses and metrics


def test_boundary_band_weights_up_weight_the_band():
  mask = np.zeros((1, SIZE, SIZE, SIZE), np.uint8)
  mask[0, 4:12, 4:12, 4:12] = 1
  image = np.zeros((1, SIZE, SIZE, SIZE, 1), np.float32)
  band = np.asarray(T.boundary_band(jnp.asarray(image), jnp.asarray(mask), 1, 0.15))
  inner = np.zeros_like(mask, bool)
  inner[0, 6:10, 6:10, 6:10] = True
  assert band[0, 3, 8, 8] == 1 and band[0, 4, 8, 8] == 1   # both sides of the face, one voxel each
  assert band[0, 2, 8, 8] == 0 and band[0, 5, 8, 8] == 0
  wide = np.asarray(T.boundary_band(jnp.asarray(image), jnp.asarray(mask), 2, 0.15))
  assert wide[0, 2, 8, 8] == 1 and wide[0, 5, 8, 8] == 1 and wide[0, 1, 8, 8] == 0
  assert band[inner].sum() == 0 and band[0, 0, 0, 0] == 0
  w = np.asarray(T.voxel_weights(jnp.asarray(band), 1.0, 1.0))
  assert w[band > 0].min() > 5 * w[band == 0].max()
  # Without a mask boundary: the image's own edges (a bright cube) define the band.
  image[0, 4:12, 4:12, 4:12, 0] = 1.0
  eb = np.asarray(T.boundary_band(jnp.asarray(image), jnp.zeros_like(jnp.asarray(mask)), 1, 0.15))
  assert eb[0, 4, 8, 8] == 1 and eb[0, 8, 8, 8] == 0 and eb[0, 0, 0, 0] == 0


def test_rec_loss_penalises_band_errors_more():
  task = T.VQVAETask(tiny_config("vqvae"), 1)
  band = np.zeros((1, SIZE, SIZE, SIZE), np.float32)
  band[0, :, :, 7:9] = 1
  x = jnp.zeros((1, SIZE, SIZE, SIZE, 1))
  pparams = task.perceptual.init_params(1)
  e_in, e_out = np.zeros(x.shape, np.float32), np.zeros(x.shape, np.float32)
  e_in[0, 3, 3, 8] = 1.0
  e_out[0, 3, 3, 2] = 1.0
  rec = jax.jit(lambda x_hat: task.rec_loss(pparams, x_hat, x, jnp.asarray(band)))
  (total_in, parts_in), (total_out, parts_out) = rec(x + e_in), rec(x + e_out)
  assert float(parts_in["band_l1"]) > 0 and float(parts_out["band_l1"]) == 0
  assert float(parts_in["l1"]) == pytest.approx(float(parts_out["l1"]))
  assert float(total_in) > float(total_out)


def test_ssim3d_matches_fidelity():
  r = np.random.default_rng(0)
  x = blobs(2, seed=1)
  y = np.clip(x + 0.05 * r.normal(size=x.shape).astype(np.float32), 0, 1)
  got = np.asarray(T.ssim3d(jnp.asarray(x), jnp.asarray(y)))
  want = [fidelity.ssim(x[i, ..., 0], y[i, ..., 0], data_range=1.0) for i in range(2)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(T.psnr(jnp.asarray(x), jnp.asarray(y))),
                             [fidelity.psnr(x[i], y[i], data_range=1.0) for i in range(2)], rtol=1e-4)


# ------------------------------------------------------------------------------ perceptual net


@pytest.mark.parametrize("ext", ["npz", "msgpack"])
def test_perceptual_loads_user_weights(tmp_path, ext):
  default = perc_lib.Perceptual(channels=(4, 8), seed=3)
  params = jax.tree.map(lambda a: a * 0.5 + 0.01, default.init_params(2))
  path = str(tmp_path / f"w.{ext}")
  perc_lib.save_params(path, params)
  user = perc_lib.Perceptual(channels=(4, 8), weights=path)
  loaded = user.init_params(2)
  assert bits_equal(jax.tree.map(np.float32, params), loaded)
  assert "user weights" in user.description and "random" in default.description
  x = jnp.asarray(np.random.default_rng(0).random((1, 8, 8, 8, 2), np.float32))
  d = jax.jit(user.distance)(loaded, jnp.concatenate([x, x]), jnp.concatenate([x, x[:, ::-1]]))
  assert float(d[0]) == pytest.approx(0.0, abs=1e-6) and float(d[1]) > 0


def test_perceptual_rejects_bad_files(tmp_path):
  net = perc_lib.Perceptual(channels=(4, 8), seed=0)
  params = net.init_params(1)
  bad = str(tmp_path / "wrong.npz")
  perc_lib.save_params(bad, perc_lib.Perceptual(channels=(4, 16)).init_params(1))
  with pytest.raises(ValueError, match="wrong.npz.*shape mismatches.*stage1_conv"):
    perc_lib.Perceptual(channels=(4, 8), weights=bad).init_params(1)
  partial = str(tmp_path / "partial.npz")
  flat = perc_lib._flatten(params)
  np.savez(partial, **{k: flat[k] for k in sorted(flat)[:1]})
  with pytest.raises(ValueError, match="partial.npz.*missing"):
    perc_lib.Perceptual(channels=(4, 8), weights=partial).init_params(1)
  junk = tmp_path / "junk.msgpack"
  junk.write_bytes(b"not msgpack at all")
  with pytest.raises(ValueError, match="junk.msgpack"):
    perc_lib.Perceptual(channels=(4, 8), weights=str(junk)).init_params(1)
  with pytest.raises(FileNotFoundError, match="absent.npz"):
    perc_lib.Perceptual(weights=str(tmp_path / "absent.npz")).init_params(1)


def test_attention_levels_are_one_bool_per_level_as_in_the_unet():
  """The same convention as DiffusionUNet / MONAI: attention exactly where the mask says; level indices
  (the old spelling) are refused rather than misread as a mask."""
  assert tokenizer_blocks.attention_mask(True, 3) == (True, True, True)
  with pytest.raises(ValueError, match="level indices are not accepted"):
    tokenizer_blocks.attention_mask((0, 2, 1), 3)
  with pytest.raises(ValueError, match="one entry per level"):
    tokenizer_blocks.attention_mask((2,), 3)

  def attention_modules(mask):
    m = tok_models.VQVAE(channels=(8, 16, 32), num_res_blocks=1, attention_levels=mask, norm_groups=4, num_heads=2,
                code_dim=4, num_codes=8, quantize=False)
    params = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 16, 16, 16, 1)))["params"]
    return sorted(f"{part}/{k}" for part in ("encoder", "decoder") for k in params[part] if "attn" in k)

  assert attention_modules((False, True, False)) == ["decoder/level1_attn", "encoder/level1_attn"]
  assert attention_modules((False, False, True)) == ["decoder/mid_attn", "encoder/level2_attn"]


def test_remat_keeps_params_outputs_and_gradients():
  """tokenizer.model.remat only trades memory for compute: the same parameter tree (a checkpoint
  loads either way), the same loss and the same gradients."""
  kw = dict(channels=(8, 16), num_res_blocks=1, attention_levels=(False, True), num_heads=2, norm_groups=4,
            num_codes=16, code_dim=4, quantize=False)
  plain, remat = tok_models.VQVAE(**kw), tok_models.VQVAE(remat=True, **kw)
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 8, 1))
  params = unbox(plain.init(jax.random.key(1), x)["params"])
  p2 = unbox(remat.init(jax.random.key(1), x)["params"])
  assert jax.tree.structure(params) == jax.tree.structure(p2)

  def loss(model):
    def f(p):
      x_hat = model.apply({"params": p}, x)["x_hat"]
      return jnp.mean(jnp.abs(x_hat - x))
    return jax.jit(jax.value_and_grad(f))

  (l1, g1), (l2, g2) = loss(plain)(params), loss(remat)(params)
  np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g1)) > 0
