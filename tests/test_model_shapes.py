"""A table of model configurations and the shapes they must produce, MONAI style: each row is one
constructor call and one input, checked with jax.eval_shape (traced, never compiled or run, so the
whole table costs seconds). The compiled, numerical tests live beside each model's own tests."""

import jax
import jax.numpy as jnp
import pytest

from synthmri_jax.models.classifier import ResNet3D
from synthmri_jax.models.discriminator import PatchDiscriminator
from synthmri_jax.models.perceptual import FeatureNet3D
from synthmri_jax.models.segmenter import UNet3D
from synthmri_jax.models.tokenizer import VQVAE, DualTokenizer
from synthmri_jax.models.unet import DiffusionUNet

S = jax.ShapeDtypeStruct


def _apply_shape(model, *args, method=None, **kwargs):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, method=method, **kwargs))
  return jax.eval_shape(lambda v: model.apply(v, *args, method=method, **kwargs), variables)


def _x(*shape):
  return jnp.zeros(shape, jnp.float32)


CLASSIFIER_CASES = [
    # (kwargs, input shape, logits shape)
    (dict(num_classes=2, channels=(4, 8)), (2, 16, 16, 16, 1), (2, 2)),
    (dict(num_classes=3, channels=(4, 8, 8), blocks=(1, 2, 1), stem_stride=2), (1, 20, 24, 20, 2), (1, 3)),
    (dict(num_classes=2, channels=(4,), blocks=0), (3, 9, 9, 9, 1), (3, 2)),
]


@pytest.mark.parametrize("kwargs,shape,expected", CLASSIFIER_CASES)
def test_classifier_logits_shape(kwargs, shape, expected):
  assert _apply_shape(ResNet3D(**kwargs), _x(*shape)).shape == expected


SEGMENTER_CASES = [
    # odd and unequal sides: padded to a multiple of 2^(levels-1) inside, cropped back at the output
    (dict(num_classes=2, channels=(4, 8)), (1, 15, 16, 17, 1), (1, 15, 16, 17, 2)),
    (dict(num_classes=4, channels=(4, 8, 8), blocks=(1, 1, 2)), (2, 20, 24, 20, 2), (2, 20, 24, 20, 4)),
]


@pytest.mark.parametrize("kwargs,shape,expected", SEGMENTER_CASES)
def test_segmenter_keeps_the_grid(kwargs, shape, expected):
  assert _apply_shape(UNet3D(**kwargs), _x(*shape)).shape == expected


TOKENIZER_CASES = [
    # (model, input, generative latent shape): the latent sits at 1 / (patch * 2^(L-1)) of the grid
    (VQVAE(channels=(8, 16), attention_levels=(False, True), code_dim=4, num_codes=16, norm_groups=4, num_heads=2),
     (1, 16, 16, 16, 1), (1, 8, 8, 8, 4)),
    (VQVAE(channels=(8, 16, 16), code_dim=3, num_codes=16, norm_groups=4, num_heads=2, patch_size=2, quantize=False),
     (2, 16, 24, 16, 1), (2, 2, 3, 2, 3)),
    (DualTokenizer(channels=(8, 16, 16), norm_groups=4, num_heads=2, clinical_codes=32, clinical_dim=4,
                   generative_codes=16, generative_dim=4, prior_channels=8, prior_logit_chunk=16),
     (1, 16, 16, 16, 1), (1, 4, 4, 4, 4)),
]


@pytest.mark.parametrize("model,shape,latent", TOKENIZER_CASES)
def test_tokenizer_latent_and_reconstruction_shapes(model, shape, latent):
  x = _x(*shape)
  assert _apply_shape(model, x, method=model.encode_generative).shape == latent
  z = _x(*latent)
  assert _apply_shape(model, z, method=model.decode_from_generative).shape == shape
  assert _apply_shape(model, x)["x_hat"].shape == shape


@pytest.mark.parametrize("model,shape", [
    (VQVAE(channels=(8, 16, 16), norm_groups=4, num_heads=2), (1, 18, 16, 16, 1)),    # 18 is not a multiple of 4
    (VQVAE(channels=(8, 16), attention_levels=False, norm_groups=4, num_heads=2, patch_size=2),
     (1, 16, 16, 14, 1)),   # 14 is not a multiple of 2 * 2
])
def test_tokenizer_refuses_a_grid_it_cannot_tile(model, shape):
  with pytest.raises(ValueError, match="must be divisible by patch_size"):
    _apply_shape(model, _x(*shape))


UNET_CASES = [
    (dict(out_channels=4, channels=(8, 16), attention_levels=(False, True), num_head_channels=4, norm_num_groups=4,
          with_conditioning=False), (2, 8, 8, 8, 4)),
    (dict(out_channels=3, channels=(8, 8, 16), num_res_blocks=(1, 2, 1), attention_levels=(False, False, True),
          num_head_channels=8, norm_num_groups=4, with_conditioning=False), (1, 8, 12, 8, 3)),
]


@pytest.mark.parametrize("kwargs,shape", UNET_CASES)
def test_diffusion_unet_predicts_the_latents_shape(kwargs, shape):
  out = _apply_shape(DiffusionUNet(**kwargs), _x(*shape), jnp.zeros((shape[0],), jnp.int32))
  assert out.shape == shape[:-1] + (kwargs["out_channels"],)


@pytest.mark.parametrize("num_layers,shape,expected", [
    (2, (1, 16, 16, 16, 1), (1, 4, 4, 4, 1)),       # strides 2, 2, then 1, 1: 16 / 2^2
    (3, (2, 20, 24, 20, 1), (2, 3, 3, 3, 1)),       # ceil(20 / 8), ceil(24 / 8)
])
def test_patch_discriminator_logit_grid(num_layers, shape, expected):
  assert _apply_shape(PatchDiscriminator(channels=4, num_layers=num_layers, norm_groups=2), _x(*shape)).shape == expected


def test_feature_net_halves_the_grid_per_stage():
  feats = _apply_shape(FeatureNet3D(channels=(4, 8, 8)), _x(1, 16, 16, 16, 1))
  assert [f.shape for f in feats] == [(1, 16, 16, 16, 4), (1, 8, 8, 8, 8), (1, 4, 4, 4, 8)]
