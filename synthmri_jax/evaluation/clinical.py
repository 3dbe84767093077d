"""The clinically readable part of the evaluate stage: WORKDIR/evaluation/anatomy.json.

Three checks, each on the ROI anatomy the disease changes (evaluation.anatomy: ventricle volume,
hippocampal signal), each with subject-level bootstrap intervals:

  codec      real scans the generator never trained on (evaluate.anatomy.codec_splits), encoded and
             decoded through the path the sampler decodes through: how much of the case - control
             effect survives (codec_check). Needs this workdir's tokenizer.
  by_label   the real split (evaluate.anatomy.real_split) against the synthetic cohort: each group's
             means and the case - control effect in each.
  paired     the conditioning alone: the same initial noise and attributes sampled once as case and
             once as control (generator.paired_samples); the mean paired difference should have the
             direction and about the size of the real effect. Needs this workdir's LDM.

Case and control default to the last and first of config.data.labels (AD and CN). A check whose
inputs are missing (a user-supplied synthetic cohort, no tokenizer) is recorded as skipped, with why.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np

from synthmri_jax.data import loader
from synthmri_jax.data.cache import load_prepared
from synthmri_jax.evaluation import anatomy, codec_check
from synthmri_jax.config_blocks import evaluate as config_lib
from synthmri_jax.utils import io
from synthmri_jax import workdir as workdir_lib

FILE = workdir_lib.ANATOMY_FILE


def case_control(config, labels) -> tuple[str, str]:
  a = config_lib.block(config, "evaluate", config_lib.evaluate_config).anatomy
  case = str(a.case) or labels[-1]
  control = str(a.control) or labels[0]
  for name in (case, control):
    if name not in labels:
      raise ValueError(f"evaluate.anatomy: label {name!r} is not one of {labels}")
  return case, control


def _volumes(source) -> np.ndarray:
  return np.stack([source[i]["image"] for i in range(len(source))])


def _paired(config, workdir, n, case, control, real_effects, a, channel) -> dict[str, Any]:
  from synthmri_jax.generation import generator   # the LDM's modules only when there is one

  t0 = time.time()
  pairs = generator.paired_samples(config, workdir, n, case, control)
  prepared = load_prepared(workdir)
  mc = anatomy.measure_volumes(pairs["case"], prepared.affine, channel)
  mk = anatomy.measure_volumes(pairs["control"], prepared.affine, channel)
  out: dict[str, Any] = {"n_pairs": int(n), "seconds": None, "measures": {}}
  rng = np.random.default_rng(int(a.seed))
  for m in anatomy.MEASURES:
    d = mc[m] - mk[m]
    d = d[np.isfinite(d)]
    boots = d[rng.integers(0, len(d), size=(int(a.n_boot), len(d)))].mean(axis=1) if len(d) > 1 else np.array([])
    lo, hi = (np.quantile(boots, [float(a.alpha) / 2, 1 - float(a.alpha) / 2]) if len(boots) else (np.nan, np.nan))
    real = real_effects.get(m)
    mean = float(d.mean()) if len(d) else None
    out["measures"][m] = {
        "unit": anatomy.UNITS[m], "mean_difference": mean, "ci_low": float(lo) if len(boots) else None,
        "ci_high": float(hi) if len(boots) else None, "real_effect": real,
        "ratio_to_real": mean / real if mean is not None and real else None,
        "same_direction": bool(np.sign(mean) == np.sign(real)) if mean is not None and real else None}
  out["seconds"] = round(time.time() - t0, 1)
  return out


def run(config, workdir: str, synthetic, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes and returns WORKDIR/evaluation/anatomy.json (see the module docstring)."""
  workdir = os.path.abspath(workdir)
  a = config_lib.block(config, "evaluate", config_lib.evaluate_config).anatomy
  prepared = load_prepared(workdir)
  case, control = case_control(config, prepared.labels)
  kw = dict(n_boot=int(a.n_boot), alpha=float(a.alpha), seed=int(a.seed))
  out: dict[str, Any] = {"case": case, "control": control, "measures": list(anatomy.MEASURES),
                         "units": dict(anatomy.UNITS), "bootstrap_unit": "subject", **kw}
  channel = anatomy.measured_channel(prepared.channels)
  path = os.path.join(workdir_lib.evaluation_dir(workdir), FILE)
  if channel is None:
    out["skipped"] = (f"the ROI measures read {anatomy.SEQUENCE} contrast and the cohort's sequences are "
                      f"{list(prepared.channels)}")
    io.write_json_atomic(path, out)
    log(f"anatomy: skipped ({out['skipped']})")
    return out
  out["sequence"] = anatomy.SEQUENCE

  # by label: the real split and the synthetic cohort
  real_src = loader.CohortSource(prepared, str(a.real_split))
  names = np.asarray(prepared.labels)
  real_m = anatomy.measure_volumes(_volumes(real_src), prepared.affine, channel)
  real_rows = prepared.split(str(a.real_split))
  syn_m = anatomy.measure_volumes(_volumes(synthetic.source()), prepared.affine, channel)
  out["by_label"] = anatomy.by_label(real_m, names[real_src.labels], syn_m, names[synthetic.labels], case, control,
                                     real_subjects=real_rows["participant_id"].astype(str).to_numpy(), **kw)
  out["by_label_split"] = str(a.real_split)
  out["n_synthetic"] = int(len(synthetic))
  real_effects = {m: out["by_label"][m]["real"]["effect"] for m in anatomy.MEASURES}

  ours = os.path.realpath(synthetic.folder) == os.path.realpath(workdir_lib.synthetic_dir(workdir))
  # codec: this workdir's tokenizer, through the sampler's decoding path
  has_tokenizer = os.path.exists(os.path.join(workdir_lib.tokenizer_dir(workdir), workdir_lib.TOKENIZER_METRICS_FILE))
  if not bool(a.codec_check):
    out["codec"] = {"skipped": "evaluate.anatomy.codec_check is off"}
  elif not has_tokenizer:
    out["codec"] = {"skipped": f"no trained tokenizer in {workdir}/tokenizer"}
  else:
    from synthmri_jax.pipeline import tokenizer

    splits = [s.strip() for s in str(a.codec_splits).split(",") if s.strip()]
    codec = tokenizer.tokenizer_codec(config, workdir, clinical=str(config.sample.clinical) if "sample" in config
                                      else None)
    out["codec"] = codec_check.run(codec, prepared, splits, case, control, tolerance=float(a.tolerance),
                                   batch_size=int(config_lib.block(config, "evaluate", config_lib.evaluate_config)
                                                  .batch_size), channel=channel, log=log, **kw)
  # paired: this workdir's LDM (only meaningful for a cohort it generated)
  has_ldm = os.path.exists(os.path.join(workdir_lib.ldm_dir(workdir), workdir_lib.LDM_META_FILE))
  if int(a.paired_subjects) <= 0:
    out["paired"] = {"skipped": "evaluate.anatomy.paired_subjects is 0"}
  elif not (has_ldm and ours):
    out["paired"] = {"skipped": "the synthetic cohort was not generated by this workdir's LDM" if has_ldm
                     else f"no trained LDM in {workdir}/ldm"}
  else:
    out["paired"] = _paired(config, workdir, int(a.paired_subjects), case, control, real_effects, a, channel)
    p = out["paired"]["measures"]["ventricle_ml"]
    log(f"paired conditioning check ({a.paired_subjects} pairs): {case} - {control} ventricle difference "
        f"{p['mean_difference']:.2f} mL [{p['ci_low']:.2f}, {p['ci_high']:.2f}], real effect "
        f"{real_effects['ventricle_ml']:.2f} mL")
  io.write_json_atomic(path, out)
  log(f"anatomy: wrote {path}")
  return out
