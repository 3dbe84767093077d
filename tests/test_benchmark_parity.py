"""The benchmark compares like with like: MONAI's models and ours have the same parameters and,
with MONAI's weights copied in, the same outputs (so also the same FLOPs).

Skipped without torch / monai / einops (the `baseline` extra plus torch; CI may install them).
Small volumes keep it fast; parameter counts do not depend on the volume size.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("einops")  # MONAI's attention blocks need it

import jax
import jax.numpy as jnp
from monai.networks.nets import VQVAE as MonaiVQVAE
from monai.networks.nets import DiffusionModelUNet

from synthmri_jax.models import monai_mirror
from synthmri_jax.sharding import unbox

UNET = dict(channels=(32, 64, 64), attention_levels=(False, True, True), num_res_blocks=1)
VQ = dict(channels=(32, 64), num_res_channels=(32, 64), num_res_layers=1, num_embeddings=256, embedding_dim=32)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(unbox(tree)))


def _trainable(model) -> int:
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _to_torch(x: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))


def _from_torch(t) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 4, 1).numpy()


def _jiggle(model, scale=0.05):
  """MONAI zero-initialises some output convs; random weights everywhere make the comparison meaningful."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn_like(p))


@pytest.fixture(scope="module")
def monai_vqvae():
  torch.manual_seed(0)
  return MonaiVQVAE(spatial_dims=3, in_channels=1, out_channels=1, downsample_parameters=((2, 4, 1, 1),) * 2,
                    upsample_parameters=((2, 4, 1, 1, 0),) * 2, **VQ).eval()


@pytest.fixture(scope="module")
def monai_unet():
  torch.manual_seed(1)
  m = DiffusionModelUNet(spatial_dims=3, in_channels=3, out_channels=3, num_head_channels=(0, 64, 64), **UNET).eval()
  _jiggle(m)
  return m


def test_vqvae_same_parameters_and_outputs(monai_vqvae):
  ours = monai_mirror.VQVAE(in_channels=1, out_channels=1, **VQ)
  x = np.random.default_rng(0).random((2, 16, 24, 16, 1)).astype(np.float32)
  variables = jax.eval_shape(ours.init, jax.random.key(0), jnp.asarray(x))  # shapes only: MONAI supplies values
  assert _count(variables["params"]) == _trainable(monai_vqvae) == 930_401
  assert _count(variables["vq_stats"]["quantizer"]["codebook"]) == monai_vqvae.quantizer.quantizer.embedding.weight.numel()

  variables = monai_mirror.load_monai_vqvae(variables, monai_vqvae.state_dict(), VQ["channels"], VQ["num_res_layers"])
  with torch.no_grad():
    ref_z = _from_torch(monai_vqvae.encode(_to_torch(x)))
    ref_x, ref_loss = monai_vqvae(_to_torch(x))
  forward = jax.jit(lambda v, x: (ours.apply(v, x, method=ours.encode), *ours.apply(v, x)))
  z, x_hat, loss = forward(variables, jnp.asarray(x))
  z = np.asarray(z)
  np.testing.assert_allclose(z, ref_z, atol=1e-5 * np.abs(ref_z).max())
  np.testing.assert_allclose(np.asarray(x_hat), _from_torch(ref_x), atol=1e-5 * float(ref_x.abs().max()) + 1e-7)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-4)


def test_unet_same_parameters_and_outputs(monai_unet):
  from synthmri_jax.models.unet import DiffusionUNet
  ours = DiffusionUNet(out_channels=3, num_head_channels=(0, 64, 64), norm_num_groups=32, with_conditioning=False, **UNET)
  x = np.random.default_rng(3).standard_normal((2, 8, 8, 8, 3)).astype(np.float32)
  t = np.array([10, 700], np.int32)
  variables = jax.eval_shape(ours.init, jax.random.key(0), jnp.asarray(x), jnp.asarray(t))
  assert _count(variables["params"]) == _trainable(monai_unet) == 2_974_051

  variables = monai_mirror.load_monai_unet(variables, monai_unet.state_dict(), UNET["channels"],
                                           UNET["attention_levels"], UNET["num_res_blocks"])
  with torch.no_grad():
    want = _from_torch(monai_unet(_to_torch(x), timesteps=torch.from_numpy(t).long()))
  got = np.asarray(jax.jit(ours.apply)(variables, jnp.asarray(x), jnp.asarray(t)))
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
