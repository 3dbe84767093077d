"""Where a run's outputs live: every stage's folder and the file names other stages read.

A stage writes its own outputs; another stage, the report or a tool that reads them names them
through this module, so a rename happens in one place. Paths are absolute.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

CONFIG_FILE = "config.json"
TIMINGS_FILE = "timings.json"
PREPARED_META_FILE = "prepared.json"     # under data/
TOKENIZER_METRICS_FILE = "tokenizer_metrics.json"
LDM_META_FILE = "ldm.json"
SYNTHETIC_DIR = "synthetic"
SYNTHETIC_STATE_FILE = "synthetic_state.json"
EVALUATION_FILE = "evaluation.json"
CLASSIFY_FILE = "classify.json"
PRIVACY_FILE = "privacy.json"
ANATOMY_FILE = "anatomy.json"
CODEC_COHORT_DIR = "codec_round_trip"   # under evaluation/: the CODEC arm's encode -> decode real train scans
SYNTHETIC_CACHE_DIR = "synthetic_cache"


def fingerprint(obj: Any, length: int = 12) -> str:
  """The one content hash of the project: sha256 of obj's sorted-key JSON (a str is hashed as it is),
  cut to `length` hex digits. Cache keys, run keys and config hashes are all this."""
  blob = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:length]


def config_hash(config) -> str:
  """The hash a run records in WORKDIR/config.json for a ConfigDict."""
  return fingerprint(config.to_json(sort_keys=True))


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _abs(workdir: str, *parts: str) -> str:
  return os.path.join(os.path.abspath(workdir), *parts)


def data_dir(workdir: str) -> str:
  return _abs(workdir, "data")


def stage_output(workdir: str, stage: str) -> str | None:
  """The file that shows `stage` has completed in workdir (None: a stage nothing later reads)."""
  return {"prepare": os.path.join(data_dir(workdir), PREPARED_META_FILE),
          "tokenizer": os.path.join(tokenizer_dir(workdir), TOKENIZER_METRICS_FILE),
          "ldm": os.path.join(ldm_dir(workdir), LDM_META_FILE),
          "sample": _abs(workdir, SYNTHETIC_STATE_FILE)}.get(stage)


def public_dir(workdir: str) -> str:
  """The public reference cohort's own workdir (config_blocks/public.py): data/, embedded/, ldm/latents/."""
  return _abs(workdir, "public")


def tokenizer_dir(workdir: str) -> str:
  return _abs(workdir, "tokenizer")


def ldm_dir(workdir: str) -> str:
  return _abs(workdir, "ldm")


def latents_dir(workdir: str) -> str:
  """The LDM's latent cache of the training splits (synthmri_jax.latents)."""
  return os.path.join(ldm_dir(workdir), "latents")


def synthetic_dir(workdir: str) -> str:
  return _abs(workdir, SYNTHETIC_DIR)


def evaluation_dir(workdir: str) -> str:
  return _abs(workdir, "evaluation")


def codec_cohort_dir(workdir: str) -> str:
  return _abs(workdir, "evaluation", CODEC_COHORT_DIR)


def synthetic_cache_dir(workdir: str) -> str:
  return _abs(workdir, "evaluation", SYNTHETIC_CACHE_DIR)
