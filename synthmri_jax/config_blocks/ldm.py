"""The `config.ldm` and `config.sample` blocks: the conditional latent DDPM and the synthetic cohort.

Attach them in a config file as

    c.ldm = ldm_config("quickstart")        # or "gpu"
    c.sample = sample_config("quickstart")  # or "gpu"

Train settings of the LDM: `config.train` (if the config has one; else the trainer's defaults)
overlaid with `ldm.train`, the same layering as the tokenizer's.
"""

from __future__ import annotations

import ml_collections

from synthmri_jax.training import optim

PROFILES = ("quickstart", "gpu")


def _check(profile: str) -> bool:
  if profile not in PROFILES:
    raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
  return profile == "quickstart"


def ldm_config(profile: str = "gpu") -> ml_collections.ConfigDict:
  """Defaults per profile: 'quickstart' trains a ~1 M-parameter U-Net on the 10x12x10x8 latent of
  the quickstart tokenizer in a few CPU minutes; 'gpu' is a 3-level model for 1-2 mm latents."""
  quick = _check(profile)
  c = ml_collections.ConfigDict()
  c.batch_size = 16 if quick else 32   # global batch of latents (latents are small: bigger than the tokenizer's)

  # ------------------------------------------------------------ latents
  la = c.latents = ml_collections.ConfigDict()
  la.quantized = False               # False: the generative encoder's output before quantisation (a smooth
                                     # space, as in Rombach et al.'s VQ-regularised LDM); decoding snaps to codes
  la.encode_batch_size = 0           # volumes per encoding batch; 0: config.data.batch_size
  la.splits = "train,val"            # encoded once and cached; val only feeds the eval loss
  la.standardize = "per_label_element" if quick else "global"   # global | per_channel | per_element | per_label_element (ldm.LatentNorm)
  la.std_floor = 0.1                 # per_element: each element's std floored at this x its channel's median element std

  # ------------------------------------------------------------ diffusion
  d = c.diffusion = ml_collections.ConfigDict()
  d.schedule = "scaled_linear"       # 'linear' | 'scaled_linear' (MONAI names accepted) | 'squaredcos_cap_v2'
                                     # (diffusers' cosine; MONAI's 'cosine' differs and is refused)
  d.num_train_timesteps = 1000
  d.beta_start = 0.0015              # MONAI's latent-diffusion tutorial values
  d.beta_end = 0.0195
  d.prediction_type = "v_prediction"  # 'v_prediction' | 'epsilon': v stays well-conditioned at high noise,
                                      # where an eps error is amplified by sqrt(1-abar)/sqrt(abar) in x0 (a short
                                      # CPU run with eps drifted per-sample means; v did not)

  # ------------------------------------------------------------ conditioning
  co = c.cond = ml_collections.ConfigDict()
  # Tabular attributes besides the class label, each one cross-attention token:
  # "name:continuous" or "name:categorical:<num_classes>", columns of the prepared cohort table.
  co.attributes = "age:continuous,sex:categorical:2"
  co.dropout_each = 0.1              # P(one attribute -> its null token), independently per attribute
  co.dropout_all = 0.1               # P(every attribute and the label -> null together): the CFG unconditional
  co.token_dim = 64 if quick else 256   # cross_attention_dim
  co.fourier_features = 8            # frequencies of a continuous attribute's embedding
  co.in_temb = True                  # also add the pooled tokens to the timestep embedding (reaches every ResBlock)

  # ------------------------------------------------------------ U-Net
  m = c.model = ml_collections.ConfigDict()
  m.channels = (32, 64) if quick else (64, 128, 256)
  m.num_res_blocks = 1 if quick else 2
  m.attention_levels = (False, True) if quick else (False, True, True)
  m.num_head_channels = 16 if quick else 32
  m.norm_num_groups = 8 if quick else 32
  m.transformer_num_layers = 1
  m.remat = False                    # nn.remat every block: less activation memory, ~30 % more compute
  m.dtype = "float32"                # activation dtype ("bfloat16" on accelerators)
  m.conv_impl = "auto"               # synthmri_jax.models.conv formulation

  c.train = ml_collections.ConfigDict(dict(
      steps=600 if quick else 100000, lr=1e-3 if quick else 1e-4, warmup_steps=50 if quick else 1000,
      weight_decay=0.0, clip_norm=1.0, ema_decay=0.99 if quick else 0.9999,
      log_every=50 if quick else 200, eval_every=0 if quick else 5000,
      checkpoint_every=200 if quick else 5000))
  # DP-SGD for the LDM (off): e.g. --config.ldm.train.dp.enabled=true --config.ldm.train.dp.target_epsilon=8
  c.train.dp = optim.default_dp_config()
  return c


def sample_config(profile: str = "gpu") -> ml_collections.ConfigDict:
  """The `sample` stage: how many subjects, with which labels / attributes, and how they are sampled."""
  quick = _check(profile)
  c = ml_collections.ConfigDict()
  c.num_subjects = 24 if quick else 1000
  c.batch_size = 8 if quick else 32  # global; rounded up to a multiple of the mesh's data*fsdp size
  c.seed = 0                         # subject i's noise and attributes derive from (seed, i) only

  c.sampler = "ddim"                 # 'ddim' | 'ddpm' (all num_train_timesteps steps)
  c.steps = 50                       # DDIM steps
  c.eta = 0.0                        # DDIM eta (0: deterministic given the initial noise)
  c.spacing = "trailing"             # DDIM timestep spacing: 'trailing' (better with few steps) | 'leading' (MONAI)
  c.guidance_scale = 2.0             # classifier-free guidance; 1: plain conditional, 0: unconditional
  c.guidance_null = "all"            # what the unconditional branch drops: 'all' or names, e.g. 'label'

  # Attributes of the generated subjects; empty: follow the training split.
  c.label_fractions = ""             # e.g. "AD:0.5,CN:0.5" (labels of config.data.labels)
  c.sex_fractions = ""               # e.g. "F:0.5,M:0.5"
  c.age_range = ()                   # e.g. (60.0, 90.0): the training age model truncated to this range
  c.age_model = "kde"                # 'kde' (per-label Gaussian KDE) | 'gaussian' (per-label normal)

  # Privacy: check each generated subject against the training split as it is made (the privacy
  # report's encoder, measures and tau) and regenerate flagged ones with a new seed, so the exported
  # cohort holds no detected copy; the rejections are counted in WORKDIR/synthetic_state.json.
  c.reject_copies = False
  c.reject_max_attempts = 5
  c.clinical = "predicted"           # dual tokenizer's clinical path when decoding: 'predicted' | 'null'
  return c
