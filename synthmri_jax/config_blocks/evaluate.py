"""The `config.classifier` and `config.evaluate` blocks, with quickstart-sized defaults.

Attach them in a config file:
    c.classifier = classifier_config()
    c.evaluate = evaluate_config()
The defaults are sized so that the whole study (7 arms x 2 seeds on the 40x48x40 quickstart
grid) runs in minutes on 2 CPU cores; for real cohorts raise `classifier.train.steps`,
`classifier.model.channels` and `evaluate.seeds`. A config without these blocks gets these
defaults (`block` below); unknown keys in a given block are an error.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections


def _train(**overrides) -> ml_collections.ConfigDict:
  t = dict(steps=200, lr=2e-3, warmup_steps=20, schedule="cosine", end_lr_fraction=0.0, weight_decay=1e-4,
           clip_norm=1.0, ema_decay=0.0, compute_dtype="float32", log_every=50, eval_every=0,
           checkpoint_every=100, keep_checkpoints=1)
  t.update(overrides)
  return ml_collections.ConfigDict(t)


def classifier_config() -> ml_collections.ConfigDict:
  """Architecture and training of the diagnosis classifier and of the lesion segmenter."""
  c = ml_collections.ConfigDict()
  m = c.model = ml_collections.ConfigDict()
  m.channels = (8, 16, 32)       # width per stage; each stage after the first halves the grid
  m.blocks = 1                   # residual blocks per stage (int or one per stage)
  m.stem_stride = 2              # 2: strided stem, no block at the full grid (~8x cheaper); 1 for fine detail
  m.input_pool = 1               # average-pool the input by this factor per axis before the stem
  m.norm_groups = 4
  m.dropout = 0.3                # in the residual branches and before the head: 96 scans overfit in ~100 steps
  m.dtype = "float32"            # activation dtype ("bfloat16" on accelerators)
  m.conv_impl = "auto"           # synthmri_jax.models.conv formulation ('auto': fastest for the backend)
  c.batch_size = 8               # global batch
  c.label_smoothing = 0.0
  c.intensity_jitter = 0.05      # augmentation (synthmri_jax.data.augment.Augment)
  c.shift_voxels = 0             # augmentation: random integer translation up to this many voxels per axis
  c.flip_axes = ""               # e.g. "0" for left-right flips; brains are not symmetric
  # Optimizer / schedule: every field of synthmri_jax.training.optim.default_train_config may be set.
  # The same number of steps for every arm, so arms differ in data, not in compute.
  c.train = _train(steps=150, weight_decay=1e-2)

  s = c.segmenter = ml_collections.ConfigDict()
  s.enabled = True               # train it whenever the real cohort (and, for the synthetic arm, the synthetic one) has masks
  s.num_classes = 2              # background + lesion labels 1..num_classes-1 (larger labels are clipped)
  sm = s.model = ml_collections.ConfigDict()
  sm.channels = (8, 16, 32)
  sm.blocks = 1
  sm.norm_groups = 4
  sm.dtype = "float32"
  sm.conv_impl = "auto"
  s.batch_size = 4
  s.dice_weight = 1.0
  s.intensity_jitter = 0.05
  s.train = _train(steps=200, lr=2e-3)
  return c


def evaluate_config() -> ml_collections.ConfigDict:
  """The TSTR / TRTR study and the fidelity metrics."""
  e = ml_collections.ConfigDict()
  e.synthetic_dir = ""           # synthetic cohort folder (participants.tsv + NIfTI); "": WORKDIR/synthetic
  e.on_bad_file = "error"        # bad synthetic rows: "error" lists them all and stops; "skip" drops them
  e.num_workers = 2              # processes that preprocess the synthetic NIfTI files
  e.seeds = 2                    # training seeds per arm (run seed = config.seed + k)
  e.arms = "TRTR,TSTR,AUG"       # AUG: real + synthetic at each real fraction; CODEC: real train scans
                                 # encoded -> decoded (the TSTR a perfect LDM could reach through this decoder)
  e.real_fractions = (0.01, 0.1, 1.0)   # of the real train split's subjects (stratified, >= 1 per class)
  e.real_only_baselines = True   # also train REAL_<f> (real subset alone) for each fraction < 1
  e.n_boot = 2000                # bootstrap resamples of the AUC / ΔAUC / Dice intervals
  e.alpha = 0.05                 # 1 - confidence level
  e.ci_method = "bca"            # "bca" or "percentile" (BCa falls back to percentile where undefined)
  e.batch_size = 8               # prediction / feature-extraction batch
  e.compilation_cache = True     # JAX persistent compilation cache in WORKDIR/evaluation/compile_cache (unless
                                 # one is set already): the runs share programs, so later runs skip compiling
  # Fidelity: FD / KID on penultimate features of the TRTR classifier (seed 0), named FD_trtr_classifier;
  # feature_weights: a local file or checkpoint directory with weights of a synthmri_jax ResNet3D
  # (architecture: feature_model, or classifier.model if empty) for an extra FD_<feature_name>.
  e.feature_weights = ""
  e.feature_name = ""            # "": the weights file's name
  e.feature_model = ml_collections.ConfigDict()
  e.fidelity_boot = 200          # bootstrap resamples of the FD / KID intervals
  e.kid_subsets = 100
  e.kid_subset_size = 1000
  e.diversity_pairs = 50         # MS-SSIM pairs per set (synthetic, and real train for reference)
  # Clinically readable fidelity (evaluation.clinical -> WORKDIR/evaluation/anatomy.json): ROI anatomy
  # by label (real vs synthetic), the codec check, and the paired conditioning check.
  a = e.anatomy = ml_collections.ConfigDict()
  a.enabled = True
  a.case, a.control = "", ""     # "": the last and the first of config.data.labels (AD, CN)
  a.real_split = "test"          # the real scans the synthetic ones are compared with
  a.codec_check = True           # encode -> decode real scans through the sampler's decoding path
  a.codec_splits = "val,test"    # scans the tokenizer never trained on
  a.tolerance = 0.25             # the codec keeps the effect when |kept / original - 1| <= this
  a.paired_subjects = 16         # same noise + attributes, sampled as case and as control (0: off)
  a.n_boot = 2000
  a.alpha = 0.05
  a.seed = 0
  return e


def block(config: Any, name: str, defaults: Callable[[], ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
  """defaults() overlaid with config.<name> (if present); unknown keys are an error.

  `train` sub-blocks are passed through: optim.train_config checks them against the trainer's
  fields. `evaluate.feature_model` is free-form (a classifier.model block).
  """
  out = defaults().to_dict()
  given = config.get(name, None) if config is not None else None
  if given is not None:
    overlay(out, given.to_dict() if hasattr(given, "to_dict") else dict(given), name)
  return ml_collections.ConfigDict(out, type_safe=False)


_OPEN = ("classifier.train", "classifier.segmenter.train", "evaluate.feature_model", "privacy.encoder.train")


def overlay(out: dict, given: dict, where: str, open_blocks: tuple[str, ...] = _OPEN) -> None:
  """Recursively writes `given` into the defaults `out`; a key the defaults lack is an error
  naming its full path, except inside `open_blocks` (checked elsewhere, e.g. by optim)."""
  for k, v in given.items():
    path = f"{where}.{k}"
    if where in open_blocks:
      out[k] = v
    elif k not in out:
      raise ValueError(f"unknown config field {path}; known in {where}: {sorted(out)}")
    elif isinstance(out[k], dict) and isinstance(v, dict):
      overlay(out[k], v, path, open_blocks)
    else:
      out[k] = v
