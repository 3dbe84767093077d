"""The pipeline's stages, in order. Each reads the previous stages' outputs from the workdir
and skips work whose outputs are already complete, so an interrupted run resumes."""

from __future__ import annotations

import importlib
import os
from typing import Callable

from synthmri_jax import workdir as workdir_lib
from synthmri_jax.utils.errors import UserInputError

# name -> "module:function": each stage is synthmri_jax/pipeline/<name>.py's run(config, workdir).
# Imported lazily so that `prepare` never pays for building models.
STAGES: dict[str, str] = {name: f"synthmri_jax.pipeline.{name}:run" for name in (
    "prepare", "tokenizer", "ldm", "sample", "classify", "evaluate", "report")}

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


# The earlier stages whose outputs a stage reads. evaluate reads the sample stage's cohort only when
# evaluate.synthetic_dir is empty; classify and evaluate train what they need themselves.
NEEDS: dict[str, tuple[str, ...]] = {
    "prepare": (), "tokenizer": ("prepare",), "ldm": ("prepare", "tokenizer"),
    "sample": ("prepare", "tokenizer", "ldm"), "classify": ("prepare",), "evaluate": ("prepare", "sample"),
    "report": (),
}


def check_inputs(names: list[str], config, workdir: str) -> None:
  """Before any work: every stage's inputs are either made earlier in this run or already complete
  in workdir. Raises UserInputError naming the first missing stage and the command that makes it."""
  def needs(name: str) -> list[str]:
    out = list(NEEDS.get(name, ()))
    if name == "evaluate" and str(config.get("evaluate", {}).get("synthetic_dir", "")):
      out.remove("sample")
    return out

  def done(stage: str) -> bool:
    marker = workdir_lib.stage_output(workdir, stage)
    return bool(marker and os.path.exists(marker))

  for i, name in enumerate(names):
    missing = [n for n in needs(name) if n not in names[:i] and not done(n)]
    if not missing:
      continue
    run, todo = set(names), list(missing)
    while todo:                       # the missing stages' own missing inputs, too
      n = todo.pop()
      if n not in run:
        run.add(n)
        todo += [m for m in needs(n) if not done(m)]
    marker = workdir_lib.stage_output(workdir, missing[0])
    raise UserInputError(f"stage {name} reads the '{missing[0]}' stage's outputs, and {workdir} has none "
                         f"({os.path.relpath(marker, workdir)} is missing); run "
                         f"--config.stages={','.join(sorted(run, key=STAGE_ORDER.index))}, "
                         "or the full pipeline without --config.stages")


def get_stage(name: str) -> Callable:
  module, fn = STAGES[name].split(":")
  return getattr(importlib.import_module(module), fn)
