"""The `classify` stage: trains the TRTR classifiers (evaluate.seeds of them) on the real train
split and, when the cohort has masks, the real-data segmenters; writes
WORKDIR/evaluation/classify.json. The evaluate stage reuses these runs; finished runs are skipped,
interrupted ones continue from their checkpoints."""

from __future__ import annotations

from typing import Any

from synthmri_jax.evaluation import tstr


def run(config, workdir: str) -> dict[str, Any]:
  return tstr.Study(config, workdir).train_real()
