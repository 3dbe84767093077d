"""The `config.privacy` block (the privacy report of the evaluate stage) and DP-SGD presets.

Attach in a config file:
    c.privacy = privacy_config()                     # or privacy_config("gpu")
    c.ldm.train.dp = dp_config(target_epsilon=8.0)   # DP-SGD for the LDM (or classifier.train.dp, ...)
A config without `privacy` gets these defaults (`block`); unknown keys are an error.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from synthmri_jax.training import optim

PROFILES = ("quickstart", "gpu")


def dp_config(target_epsilon: float = 8.0, l2_clip: float = 1.0, delta: float = 0.0,
              noise_multiplier: float = 0.0, **overrides: Any) -> ml_collections.ConfigDict:
  """An enabled `train.dp` block (fields: optim.default_dp_config). target_epsilon > 0 calibrates
  the noise for train.steps steps (BrainG3N's anchor is eps = 8); else noise_multiplier is used."""
  d = optim.default_dp_config()
  d.enabled = True
  d.l2_clip = float(l2_clip)
  d.target_epsilon = float(target_epsilon)
  d.noise_multiplier = float(noise_multiplier)
  d.delta = float(delta)
  for k, v in overrides.items():
    if k not in d:
      raise ValueError(f"unknown train.dp field {k!r}; known: {sorted(d.keys())}")
    d[k] = v
  return d


def privacy_config(profile: str = "quickstart") -> ml_collections.ConfigDict:
  """Copy detection, DCR, membership inference and the contrastive privacy encoder."""
  if profile not in PROFILES:
    raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
  quick = profile == "quickstart"
  p = ml_collections.ConfigDict()
  p.enabled = True
  # Copies: tau = the `quantile` of real best-match similarities (Dar et al. 2024), calibrated on
  # real data only: calibration_split -> train (direction 'validation_to_train', exchangeable with
  # synthetic -> train) or Dar's 'train_to_validation'. Comma-separated splits pool their scans
  # (any real split the generator never saw): below ~40 calibration scans tau is the largest
  # score and genuine scans are flagged at 1 / (m + 1) per measure, above 1 - quantile.
  p.quantile = 0.95
  p.calibration_split = "val,holdout"
  p.direction = "validation_to_train"
  # Which measure flags a copy: 'embedding' (Pearson of encoder embeddings), 'voxel' (tiled
  # normalised L2), or 'either' (flagged by one or both; each then at 1 - (1 - quantile) / 2, so
  # genuinely new scans are still flagged at <= 1 - quantile overall).
  p.copy_rule = "either"
  p.voxel_pool = 2               # average-pool factor before the voxel measure (tolerates 1-voxel shifts)
  p.voxel_tiles = (4, 4, 4)
  p.voxel_aggregate = "mean"     # 'mean' | 'max' over tiles (privacy_stats module doc)
  p.holdout_split = "holdout"    # real scans the generator never saw: DCR reference and MIA non-members
  p.num_figures = 6              # closest synthetic/train pairs drawn to WORKDIR/evaluation/figures/
  p.n_boot = 1000                # bootstrap resamples of the MIA AUC / TPR intervals
  p.seed = 0

  e = p.encoder = ml_collections.ConfigDict()
  e.splits = "train"             # what it trains on (embedding.py: why not val)
  e.channels = (16, 32, 64) if quick else (32, 64, 128, 256)
  e.embed_dim = 128
  e.proj_dim = 64
  e.norm_groups = 4 if quick else 8
  e.pool = 2                     # input average-pooling factor
  e.dtype = "float32"
  e.conv_impl = "auto"
  e.batch_size = 16 if quick else 32   # scans per batch (2 views each); NT-Xent negatives = 2 * batch - 2
  e.temperature = 0.1
  e.max_shift = 3                # augmentation: voxels of random shift per axis
  e.intensity_jitter = 0.1       # augmentation: gain / offset amplitude
  e.noise_std = 0.05             # augmentation: max Gaussian noise std (intensities are ~[0, 1])
  e.train = ml_collections.ConfigDict(dict(
      steps=300 if quick else 3000, lr=1e-3 if quick else 3e-4, warmup_steps=20 if quick else 200,
      weight_decay=1e-4, clip_norm=1.0, log_every=50 if quick else 200, eval_every=0,
      checkpoint_every=300 if quick else 1000, keep_checkpoints=1))

  m = p.mia = ml_collections.ConfigDict()
  m.enabled = True               # needs a trained LDM in WORKDIR/ldm
  m.timesteps = (10, 50, 100, 200, 500)   # loss attack at each; the combined score averages them
  m.noise_draws = 4              # noise draws per (example, timestep), averaged
  m.pia_timestep = 200           # PIA's attack timestep (Kong et al. 2024)
  m.batch_size = 16
  m.max_members = 0              # subsample the training latents (0: all)
  m.control_split = "val"        # split-bias control: the same attacks with this non-member split as "members"
                                 # ("": off; must be a split neither the LDM nor its tokenizer trained on)
  return p


def block(config: Any) -> ml_collections.ConfigDict:
  """privacy_config() overlaid with config.privacy; unknown keys are an error (train: optim checks)."""
  from synthmri_jax.config_blocks.evaluate import block as config_block
  return config_block(config, "privacy", privacy_config)
