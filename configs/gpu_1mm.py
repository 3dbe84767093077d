"""GPU / TPU: the embedded cohort at 1 mm (176x208x176), the 2 mm config's models with remat.

Run:  python -m synthmri_jax.main --config configs/gpu_1mm.py --workdir runs/gpu_1mm
At 1 mm a 4-level tokenizer's generative latent is 22x26x22; the tokenizer and the U-Net
rematerialise their blocks to fit a batch per device. Scale out with mesh.fsdp (docs/SCALING.md).
"""

from synthmri_jax.utils.config_files import sibling


def get_config():
  c = sibling(__file__, "gpu_2mm").get_config(spacing_mm=1.0, shape=(176, 208, 176))
  c.data.batch_size = 4
  c.tokenizer.batch_size = 4
  c.tokenizer.model.remat = True   # without it each phase's step needs 30-57 GiB of temporaries per chip (docs/SCALING.md)
  c.ldm.model.remat = True
  c.ldm.batch_size = 16
  c.sample.batch_size = 4   # the decoder at 1 mm: 13.9 GiB per chip at 1 volume per chip, 124 GiB at 8 (docs/SCALING.md)
  return c
