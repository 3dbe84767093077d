"""Quickstart: the embedded MNI152 cohort at 4.5 mm, everything on 2 CPU cores in minutes.

Run:  python -m synthmri_jax.main --config configs/quickstart.py --workdir runs/quickstart
Any field can be overridden on the command line, e.g. --config.data.spacing_mm=3.
"""

import ml_collections

from synthmri_jax.config_blocks.evaluate import classifier_config, evaluate_config
from synthmri_jax.config_blocks.privacy import privacy_config
from synthmri_jax.config_blocks.public import public_config
from synthmri_jax.config_blocks.ldm import ldm_config, sample_config
from synthmri_jax.config_blocks.tokenizer import tokenizer_config


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Comma-separated, run in this order. Known stages: see synthmri_jax.stages.STAGE_ORDER.
  c.stages = "prepare,tokenizer,ldm,sample,classify,evaluate,report"

  # ---------------------------------------------------------------- data
  d = c.data = ml_collections.ConfigDict()
  # A participants-style TSV/CSV (participant_id, [session_id], path or path_<seq>, label,
  # age, sex, [mask_path], [split]). Empty: build the embedded MNI152 cohort in WORKDIR.
  d.cohort_tsv = ""
  d.sequences = "T1w"          # channels, in order; one path column each (path_<seq>, or path)
  d.labels = "CN,AD"           # allowed labels, in class-index order
  d.spacing_mm = 4.5           # isotropic target voxel size (40x48x40 at 4.5 mm = 180x216x180 mm holds the largest simulated brains)
  d.shape = (40, 48, 40)       # target grid (RAS+ voxels), cropped/padded around the brain
  d.normalization = "percentile"  # "percentile": clip to [p_low, p_high] in the brain, map to [0, 1]; "zscore"
  d.clip_percentiles = (0.5, 99.5)
  d.on_bad_file = "error"      # "error": list every bad row and stop; "skip": drop them, list in WORKDIR/data/bad_files.tsv
  d.split_seed = 0
  d.split_fractions = ml_collections.ConfigDict(
      dict(train=0.6, val=0.1, test=0.15, holdout=0.15))
  d.batch_size = 4             # global batch size
  d.flip_axes = ""             # augmentation: e.g. "0" flips left-right; empty: no flips (brains are not symmetric)
  d.intensity_jitter = 0.05    # augmentation: random gain/offset amplitude
  d.shuffle_seed = 0
  d.num_workers = 2            # processes for `prepare` (reading, resampling, writing the cache)

  # The simulated cohort built from nilearn's MNI152 template (used when cohort_tsv is empty).
  e = d.embedded = ml_collections.ConfigDict()
  e.num_subjects = 160
  e.spacing_mm = 2.0           # resolution the simulated NIfTI files are written at
  e.ad_fraction = 0.5
  e.ad_effect = 1.0            # scales the AD-specific atrophy (1.0: tuned to AUC ~0.8-0.9)
  e.age_range = (55.0, 90.0)
  e.lesions = False            # tumour-like lesions with masks (segmentation task)
  e.lesion_fraction = 1.0      # share of subjects with a lesion when lesions=True (the rest get empty masks)
  e.vary_storage = True        # store ~30 % of files LAS/LPI and ~half int16+scl_slope, to exercise ingest
  e.seed = 0

  # ---------------------------------------------------------------- models and study
  # Each block's defaults and every field's meaning: the module named in the import above.
  c.tokenizer = tokenizer_config("quickstart")   # tokenizer (variant: dual | vqvae | vqgan); set below
  c.ldm = ldm_config("quickstart")               # conditional latent DDPM (train.dp: DP-SGD, privacy_config.dp_config)
  c.sample = sample_config("quickstart")         # the synthetic cohort written to WORKDIR/synthetic
  c.classifier = classifier_config()             # TSTR/TRTR classifier (and lesion segmenter when masks exist)
  c.evaluate = evaluate_config()                 # the study: arms, seeds, fidelity
  c.privacy = privacy_config("quickstart")       # copy detection, DCR, membership inference, epsilon per model
  c.public = public_config()                     # off; on: tokenizer and statistics fit on a public cohort (configs/quickstart_dp.py)

  # The 15-minute budget on 2 CPU cores (measured per stage in README "What runs today"). These
  # are demonstration budgets: every stage runs for real, but far shorter than a study needs
  # (configs/cpu_study.py and configs/gpu_2mm.py have those); raise them freely when you have the time.
  e.num_subjects = 400                           # test split 60 subjects: AUC intervals about +-0.1
  # Tokenizer: a continuous autoencoder sized for the 40x48x40 grid. Measured on the same cohort and
  # budget (BENCHMARKS.md "Quickstart levers"): the dual tokenizer's null path kept 0.79 of the AD-CN
  # ventricle effect and decoded blobs; a VQ-VAE with these layers 0.67; this one 0.87 at 200 steps,
  # 0.80 [0.69, 0.91] at the 160 used here (README).
  t = c.tokenizer
  t.variant = "vqvae"
  t.generative.quantize = False                  # no codebook: the VQ bottleneck blurred the ventricles
  t.model.patch_size = 2                         # 2x2x2 voxels -> channels first: ~3x cheaper per step on CPU
  t.model.channels = (32, 64)
  t.model.num_res_blocks = (1, 1)
  t.model.attention_levels = (False, False)
  t.loss.perceptual = 0.0
  t.batch_size = 8
  t.phase_train.main.steps = 160
  # LDM: 300 steps at batch 8 cost what 150 at batch 16 did and reach val MSE 0.749 instead of 0.792
  # (BENCHMARKS.md "The LDM's EMA, learning rate and batch").
  c.ldm.batch_size = 8
  c.ldm.train.steps = 300
  c.ldm.train.warmup_steps = 10
  c.sample.num_subjects = 64
  c.sample.steps = 25                            # DDIM steps
  c.classifier.batch_size = 16
  c.classifier.train.steps = 240                 # 80 steps at batch 8 gave TRTR 0.56-0.66; 300 at 16 gave 0.92
  c.evaluate.seeds = 1
  c.evaluate.real_fractions = (1.0,)             # AUG = all real + synthetic; TRTR, TSTR, AUG stay
  c.evaluate.real_only_baselines = False
  c.evaluate.anatomy.paired_subjects = 8
  c.privacy.encoder.train.steps = 80
  c.privacy.encoder.train.checkpoint_every = 80
  # Membership inference: 120 of the 240 members against the 60 holdout scans (the holdout bounds the
  # AUC's interval either way), 2 noise draws: ~1 min less than all members with 4 draws.
  c.privacy.mia.max_members = 120
  c.privacy.mia.noise_draws = 2

  # ---------------------------------------------------------------- mesh
  m = c.mesh = ml_collections.ConfigDict()
  m.data = -1                  # -1: all remaining devices
  m.fsdp = 1
  m.tensor = 1

  # ---------------------------------------------------------------- multi-host (see docs/SCALING.md)
  dist = c.distributed = ml_collections.ConfigDict()
  dist.mode = "auto"                  # "off" forces one process
  dist.coordinator = ""               # "host:port"; "": env SYNTHMRI_COORDINATOR or cluster auto-detection
  dist.num_processes = 0              # 0: env / cluster
  dist.process_id = -1                # -1: env SYNTHMRI_PROCESS_ID / cluster
  dist.local_device_ids = ""          # e.g. "0,1"
  dist.cluster_detection_method = ""  # e.g. "mpi4py", "k8s"
  dist.initialization_timeout = 300
  return c
