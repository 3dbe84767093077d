"""The `config.public` block: the public reference cohort of a private run (synthmri_jax.data.public).

Attach in a config file:
    c.public = public_config()
    c.public.enabled = True
A config without `public` gets these defaults (off: everything is fit on the cohort, as before).
"""

from __future__ import annotations

import ml_collections


def public_config() -> ml_collections.ConfigDict:
  """Simulated from nilearn's MNI152 template (public anatomy) by the embedded-cohort simulator,
  on the private cohort's grid and preprocessing, with its own seed: no private record enters it."""
  p = ml_collections.ConfigDict()
  p.enabled = False
  p.num_subjects = 200          # simulated subjects; all but `val_fraction` train the tokenizer
  p.val_fraction = 0.1          # the tokenizer's (public) validation split
  p.seed = 1_000_003            # must differ from data.embedded.seed when the private cohort is embedded too
  return p


def block(config) -> ml_collections.ConfigDict:
  """public_config() overlaid with config.public; unknown keys are an error."""
  from synthmri_jax.config_blocks.evaluate import block as config_block
  return config_block(config, "public", public_config)
