"""What the report reads: one workdir's stage outputs, each None when that stage has not written it."""

from __future__ import annotations

import glob
import os
from typing import Any, Optional

import pandas as pd

from synthmri_jax import workdir as W
from synthmri_jax.utils import io


# ------------------------------------------------------------------------------ inputs


class Inputs:
  """The stage outputs of one workdir, each None when that stage has not written it."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    j = lambda *p: self._json(os.path.join(workdir, *p))
    self.config = j(W.CONFIG_FILE)
    self.timings = j(W.TIMINGS_FILE)
    self.prepared_meta = j("data", W.PREPARED_META_FILE)
    self.tokenizer = j("tokenizer", W.TOKENIZER_METRICS_FILE)
    self.ldm = j("ldm", W.LDM_META_FILE)
    self.sample_state = j(W.SYNTHETIC_STATE_FILE)
    self.evaluation = j("evaluation", W.EVALUATION_FILE)
    self.classify = j("evaluation", W.CLASSIFY_FILE)
    self.privacy = j("evaluation", W.PRIVACY_FILE)
    self.anatomy = j("evaluation", W.ANATOMY_FILE)

  @staticmethod
  def _json(path: str) -> Any:
    try:
      return io.read_json(path)
    except (OSError, ValueError):   # unreadable / half-copied file: that stage reads as not run
      return None

  def resolved_config(self) -> dict[str, Any]:
    return (self.config or {}).get("config") or {}

  def prepared(self):
    """PreparedCohort, or None when `prepare` has not completed."""
    if not (self.prepared_meta or {}).get("complete"):
      return None
    from synthmri_jax.data.cache import load_prepared
    try:
      return load_prepared(self.workdir)
    except (OSError, ValueError):
      return None

  def synthetic_table(self) -> Optional[pd.DataFrame]:
    path = os.path.join(self.workdir, "synthetic", "participants.tsv")
    if not os.path.isfile(path):
      return None
    return pd.read_csv(path, sep="\t", dtype={"participant_id": str}, keep_default_na=False)

  def run_results(self) -> dict[str, list[dict[str, Any]]]:
    """arm -> the classifier result.json of each seed (evaluation/runs/<arm>/seed<k>/)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(glob.glob(os.path.join(self.workdir, "evaluation", "runs", "*", "seed*", "result.json"))):
      r = self._json(path)
      if r and r.get("kind") == "classifier" and r.get("test", {}).get("probs"):
        out.setdefault(r.get("arm") or os.path.basename(os.path.dirname(os.path.dirname(path))), []).append(r)
    return out
