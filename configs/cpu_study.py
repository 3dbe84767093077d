"""CPU study: the quickstart's models with study-sized budgets, about an hour on 2 CPU cores.

Run:  python -m synthmri_jax.main --config configs/cpu_study.py --workdir runs/cpu_study

Same cohort (400 embedded subjects at 4.5 mm, test split 60), tokenizer and LDM architecture as
configs/quickstart.py; what changes is where the hour goes: the LDM is the stage that limits
usefulness (tools/learning_curve.py, BENCHMARKS.md "Learning curve"), so it gets most of it.
Measured numbers: README "CPU study".
"""

import ml_collections

from synthmri_jax.utils.config_files import sibling


def get_config() -> ml_collections.ConfigDict:
  c = sibling(__file__, "quickstart").get_config()
  c.tokenizer.phase_train.main.steps = 400
  c.ldm.batch_size = 16                    # the batch its README numbers were measured with
  c.ldm.train.steps = 2000
  c.ldm.train.warmup_steps = 50
  c.ldm.train.checkpoint_every = 500
  c.sample.num_subjects = 192
  c.classifier.train.steps = 400
  c.evaluate.seeds = 2
  c.evaluate.arms = "TRTR,TSTR,AUG,CODEC"   # CODEC: the TSTR this decoder allows (real train scans, encoded -> decoded)
  c.privacy.mia.max_members = 0             # every member, 4 noise draws: the attack at full strength
  c.privacy.mia.noise_draws = 4
  return c
