"""The `evaluate` stage: ingests the synthetic cohort (evaluate.synthetic_dir, default
WORKDIR/synthetic) onto the prepared grid once, runs the whole study (synthmri_jax.evaluation.tstr;
writes WORKDIR/evaluation/evaluation.json; runs that `classify` trained are reused), then, with
privacy.enabled, the privacy report on the same cohort (synthmri_jax.evaluation.privacy;
WORKDIR/evaluation/privacy.json), and the clinically readable checks (synthmri_jax.evaluation.clinical;
evaluation/anatomy.json). Resumes: finished runs are skipped, interrupted ones continue from their
checkpoints.
"""

from __future__ import annotations

import os
from typing import Any

from synthmri_jax.data.cache import load_prepared
from synthmri_jax.evaluation import arms, clinical
from synthmri_jax.evaluation import codec_check
from synthmri_jax.config_blocks import evaluate as config_lib
from synthmri_jax.config_blocks import privacy as privacy_config
from synthmri_jax.evaluation import privacy
from synthmri_jax.evaluation import tstr
from synthmri_jax.evaluation.synthetic_cohort import load_synthetic
from synthmri_jax import workdir as workdir_lib


def codec_cohort(config, workdir: str):
  """The CODEC arm's training set (real train scans through the sampler's decoding path), or None
  when evaluate.arms has no CODEC."""
  ev = config_lib.block(config, "evaluate", config_lib.evaluate_config)
  if not any(a.name == "CODEC" for a in arms.plan_arms(ev)):
    return None
  from synthmri_jax.pipeline import tokenizer   # heavy; only with a CODEC arm

  codec = tokenizer.tokenizer_codec(config, workdir)
  return codec_check.round_trip_cohort(codec, load_prepared(workdir), "train", workdir_lib.codec_cohort_dir(workdir),
                                       workdir_lib.synthetic_cache_dir(workdir), batch_size=int(ev.batch_size))


def run(config, workdir: str) -> dict[str, Any]:
  workdir = os.path.abspath(workdir)
  synthetic = load_synthetic(config, workdir)
  result = tstr.Study(config, workdir, synthetic, codec_cohort=codec_cohort(config, workdir)).run()
  if bool(config_lib.block(config, "evaluate", config_lib.evaluate_config).anatomy.enabled):
    result = dict(result, anatomy=clinical.run(config, workdir, synthetic))
  if bool(privacy_config.block(config).enabled):
    result = dict(result, privacy=privacy.run_privacy_on(config, workdir, synthetic))
  return result
