"""TPU v5e (16 GiB per chip): the 1 mm run of configs/gpu_1mm.py with the tokenizer split spatially.

Run:  python -m synthmri_jax.main --config configs/v5e_1mm.py --workdir runs/v5e_1mm   (on 4 chips or more)
At 1 mm one volume's tokenizer activations outgrow a v5e chip even with remat (24-40 GiB of
temporaries per phase, docs/SCALING.md), and data parallelism cannot split one volume. Here each
volume's activations are split by depth over 4 chips (tokenizer.mesh.spatial = 4), one volume per
group of 4 chips; every other stage keeps config.mesh (its arrays fit a chip).
"""

from synthmri_jax.utils.config_files import sibling


def get_config():
  c = sibling(__file__, "gpu_1mm").get_config()
  c.tokenizer.mesh.spatial = 4
  c.tokenizer.batch_size = 1   # global; rounded up to one volume per data shard (64 on 256 chips)
  return c
