"""The `config.public` block: the public reference cohort, what a private run fits everything but
the LDM's weights on.

DP-SGD makes the LDM's weights (ε, δ)-DP, but the synthetic cohort also carries what the pipeline
fits around them: the tokenizer that decodes it, the latent standardisation, the conditioning's age
statistics and the attribute model its subjects are drawn from. Fit on the private scans, each is a
release of private data, and the cohort's ε is ∞. DP latent diffusion (Lyu et al. 2023, DP-LDM)
therefore pretrains the autoencoder on public data and spends ε only on the diffusion model.

With `config.public.enabled`, those are fit on a cohort simulated from nilearn's MNI152 template
(public anatomy) by the embedded simulator with its own seed, on the private cohort's grid and
preprocessing: no private record reaches them, so they cost no ε. The price is a codec and priors
learned on simulated, not the user's, anatomy (measured in README "Privacy–utility").

Layout: WORKDIR/public/ is a workdir of its own: data/ (the prepare stage's cache), embedded/
(the simulated NIfTI files), ldm/latents/ (its latents under the trained tokenizer).

Attach in a config file (a config without `public` gets these defaults: off):
    c.public = public_config()
    c.public.enabled = True
"""

from __future__ import annotations

import copy

import ml_collections

from synthmri_jax.utils.errors import UserInputError


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


def enabled(config) -> bool:
  return bool(block(config).enabled)


def data_config(config) -> ml_collections.ConfigDict:
  """The config the prepare stage builds the public cohort with: the private cohort's grid,
  sequences, labels and preprocessing; the embedded simulator's cohort with public.seed; a
  train / val split only (nothing of it is a test set)."""
  p = block(config)
  d = config.data
  if int(p.num_subjects) < 4:
    raise UserInputError(f"public.num_subjects must be >= 4, got {p.num_subjects}")
  if not 0.0 < float(p.val_fraction) < 1.0:
    raise UserInputError(f"public.val_fraction must be in (0, 1), got {p.val_fraction}")
  if not str(d.cohort_tsv) and int(p.seed) == int(d.embedded.seed):
    raise UserInputError(f"public.seed ({p.seed}) equals data.embedded.seed: the public cohort would be the "
                         "private (embedded) cohort itself; choose another public.seed")
  out = copy.deepcopy(config)
  with out.unlocked():
    out.data.cohort_tsv = ""
    out.data.on_bad_file = "error"
    out.data.embedded.num_subjects = int(p.num_subjects)
    out.data.embedded.seed = int(p.seed)
    out.data.embedded.vary_storage = False
    out.data.split_fractions = ml_collections.ConfigDict(
        dict(train=1.0 - float(p.val_fraction), val=float(p.val_fraction), test=0.0, holdout=0.0))
  return out


def check_labels(private_labels, public_prepared) -> None:
  """Statistics per label (latent standardisation, attribute model) need every private label in the
  public cohort."""
  counts = public_prepared.meta.get("split_labels", {}).get("train", {})
  missing = [lab for lab in private_labels if not counts.get(lab)]
  if missing:
    raise UserInputError(
        f"the public cohort in {public_prepared.root} has no training subjects labelled {', '.join(missing)} "
        f"(the simulator makes {', '.join(sorted(counts))}); per-label statistics cannot come from it. Use a "
        "global ldm.latents.standardize and set sample.label_fractions, or turn config.public off.")
