"""The pipeline's stages, in order. Each reads the previous stages' outputs from the workdir
and skips work whose outputs are already complete, so an interrupted run resumes."""

from __future__ import annotations

import importlib
from typing import Callable

# name -> "module:function"; the function is called as fn(config, workdir).
# Imported lazily so that `prepare` never pays for building models.
STAGES: dict[str, str] = {
    "prepare": "synthmri_jax.data.prepare:run",
    "tokenizer": "synthmri_jax.training.tasks.tokenizer_stage:run",
    "ldm": "synthmri_jax.training.tasks.ldm:run_ldm",
    "sample": "synthmri_jax.sampling:run_sample",
    "classify": "synthmri_jax.evaluation.stage:run_classify",
    "evaluate": "synthmri_jax.evaluation.stage:run_evaluate",
    "report": "synthmri_jax.report:run",
}

# The order a full run takes; a stage listed here but not in STAGES is not built yet.
STAGE_ORDER = ("prepare", "tokenizer", "ldm", "sample", "classify", "evaluate", "report")


def parse_stages(spec: str) -> list[str]:
  """Parses `config.stages`; raises ValueError naming any unknown or unavailable stage."""
  names = [s.strip() for s in spec.split(",") if s.strip()]
  if not names:
    raise ValueError("config.stages is empty; choose from: " + ", ".join(STAGE_ORDER))
  unknown = [n for n in names if n not in STAGE_ORDER]
  if unknown:
    raise ValueError(f"unknown stage(s) {unknown} in config.stages; known: {', '.join(STAGE_ORDER)}")
  missing = [n for n in names if n not in STAGES]
  if missing:
    raise ValueError(f"stage(s) {missing} are not available in this version; available: {', '.join(STAGES)}")
  # Run in pipeline order whatever order the user wrote them in.
  return sorted(dict.fromkeys(names), key=STAGE_ORDER.index)


def get_stage(name: str) -> Callable:
  module, fn = STAGES[name].split(":")
  return getattr(importlib.import_module(module), fn)
