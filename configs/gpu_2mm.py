"""GPU / TPU: the embedded MNI152 cohort at 2 mm (96x112x96), the article-sized models, bf16.

Run:  python -m synthmri_jax.main --config configs/gpu_2mm.py --workdir runs/gpu_2mm
On a pod or cluster see docs/SCALING.md and launch/. Every field of configs/quickstart.py
exists here too (this file starts from it and changes sizes, steps and precision).
"""

from synthmri_jax.config_blocks.evaluate import classifier_config, evaluate_config
from synthmri_jax.config_blocks.privacy import privacy_config
from synthmri_jax.config_blocks.ldm import ldm_config, sample_config
from synthmri_jax.config_blocks.tokenizer import tokenizer_config
from synthmri_jax.utils.config_files import sibling


def get_config(spacing_mm: float = 2.0, shape=(96, 112, 96)):
  c = sibling(__file__, "quickstart").get_config()
  d = c.data
  d.spacing_mm = spacing_mm    # 96x112x96 at 2 mm = 192x224x192 mm: the largest simulated heads fit
  d.shape = shape              # divisible by 8 (the 4-level tokenizer downsamples 3 times)
  d.batch_size = 8
  d.num_workers = 8
  d.embedded.num_subjects = 1000   # a cohort the GPU models can learn from (built once, ~15 min on 8 cores)
  d.embedded.spacing_mm = min(2.0, spacing_mm)

  c.tokenizer = tokenizer_config("gpu")      # 16,384 x 256 clinical, 4,096 x 128 generative codebooks
  c.tokenizer.model.dtype = "bfloat16"       # bf16 activations, fp32 master params
  c.ldm = ldm_config("gpu")
  c.ldm.model.dtype = "bfloat16"
  c.sample = sample_config("gpu")
  c.classifier = classifier_config()
  c.classifier.model.channels = (32, 64, 128, 256)
  c.classifier.model.dtype = "bfloat16"
  c.classifier.train.steps = 3000
  c.classifier.segmenter.train.steps = 3000
  c.classifier.segmenter.model.dtype = "bfloat16"   # fp32 needs 15.9 GiB per chip at 1 mm: over a v5e's 16 GiB
  c.evaluate = evaluate_config()
  c.evaluate.seeds = 5
  c.privacy = privacy_config("gpu")
  return c
