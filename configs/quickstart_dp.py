"""The quickstart with a finite ε for the released cohort: public tokenizer and statistics, DP-SGD LDM.

Run:  python -m synthmri_jax.main --config configs/quickstart_dp.py --workdir runs/quickstart_dp
      (--config.ldm.train.dp.target_epsilon=1 for ε = 1)

Everything the synthetic cohort is made of is either DP or public (synthmri_jax.data.public):
- the tokenizer, the latent standardisation, the conditioning's age statistics and the attribute
  model are fit on a cohort simulated from the public MNI152 template with its own seed;
- the LDM is trained on the private cohort's latents with DP-SGD, its noise calibrated so that its
  steps spend `target_epsilon` (δ = 1 / (10 n)), its sampling and noise keys drawn from the OS;
- sample.reject_copies stays off (it would filter the release against the private scans).
evaluate/privacy.json and the report give the cohort's (ε, δ), the privacy unit and every release.
The same switches work on any config: --config.public.enabled=true --config.ldm.train.dp.enabled=true.
"""

from synthmri_jax.config_blocks.privacy import dp_config
from synthmri_jax.utils.config_files import sibling


def get_config():
  c = sibling(__file__, "quickstart").get_config()
  c.public.enabled = True
  c.ldm.train.dp = dp_config(target_epsilon=8.0, l2_clip=1.0)
  # DP-SGD computes one gradient per row of the padded Poisson batch (expected 16, padded to ~48 so that
  # an overflow is a 1e-15 event): 100 steps cost what ~600 plain steps at batch 8 do on the CPU.
  c.ldm.batch_size = 16
  c.ldm.train.steps = 100
  c.sample.reject_copies = False
  return c
