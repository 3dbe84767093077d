"""Quickstart: the embedded MNI152 cohort at 4 mm, everything on 2 CPU cores in minutes.

Run:  python -m synthmri_jax.main --config configs/quickstart.py --workdir runs/quickstart
Any field can be overridden on the command line, e.g. --config.data.spacing_mm=3.
"""

import ml_collections

from synthmri_jax.evaluation.config import classifier_config, evaluate_config
from synthmri_jax.evaluation.privacy_config import privacy_config
from synthmri_jax.training.tasks.ldm_config import ldm_config, sample_config
from synthmri_jax.training.tasks.tokenizer_config import tokenizer_config


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
  c.tokenizer = tokenizer_config("quickstart")   # dual-codebook VQ tokenizer (variant: dual | vqvae | vqgan)
  c.ldm = ldm_config("quickstart")               # conditional latent DDPM (train.dp: DP-SGD, privacy_config.dp_config)
  c.sample = sample_config("quickstart")         # the synthetic cohort written to WORKDIR/synthetic
  c.classifier = classifier_config()             # TSTR/TRTR classifier (and lesion segmenter when masks exist)
  c.evaluate = evaluate_config()                 # the study: arms, seeds, fidelity
  c.privacy = privacy_config("quickstart")       # copy detection, DCR, membership inference, epsilon per model

  # The 15-minute budget on 2 CPU cores (measured per stage in README "What runs today"). These
  # are demonstration budgets: every stage runs for real, but far shorter than a study needs
  # (configs/gpu_2mm.py has those); raise them freely when you have the time.
  c.tokenizer.stages = "clinical,generative"     # the joint fine-tuning stage (3rd) is off on CPU
  c.tokenizer.stage_train.clinical.steps = 50
  c.tokenizer.stage_train.generative.steps = 100
  c.ldm.train.steps = 100
  c.ldm.train.warmup_steps = 10
  c.sample.num_subjects = 48
  c.sample.steps = 25                            # DDIM steps
  # Decode with the learned null clinical features, not the prior's predicted codes: at this budget
  # the prior is barely trained (8.9 % top-1 code accuracy) and measured val PSNR was 19.5 dB with
  # predicted vs 21.3 dB with null clinical latents (22.1 dB encoded); see tokenizer_metrics.json.
  c.sample.clinical = "null"
  c.classifier.train.steps = 80
  c.privacy.encoder.train.steps = 120
  c.privacy.encoder.train.checkpoint_every = 120

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
