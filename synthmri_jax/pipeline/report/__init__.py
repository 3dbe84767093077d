"""The `report` stage: one human-readable summary of a run, built only from the stages' outputs.

    python -m synthmri_jax.main --config configs/quickstart.py --workdir W --config.stages=report

Writes W/report.md, W/report.html (self-contained: figures embedded as base64 PNG, inline CSS, no
external URL, so it can be mailed or archived on its own) and W/report_figures/*.png. Every number
is read from the JSON / TSV files the stages wrote (config.json, timings.json, data/prepared.json,
tokenizer/tokenizer_metrics.json, ldm/ldm.json, synthetic_state.json, evaluation/*.json and the
per-run result.json files), never recomputed from scratch or typed in, so the report cannot drift
from what the pipeline measured. A stage whose outputs are missing gets a "not run" section and
a section that fails to render says so: a partial workdir still gives a report.

Layout: format (numbers), document (model + rendering), inputs (the files read), sections /
scans / study (one function per report section), and this module (the stage).
"""

from __future__ import annotations

import os
from typing import Any, Callable


from synthmri_jax.utils import io
from synthmri_jax.pipeline.report.document import REPORT_HTML, REPORT_MD, Figures, Section, render_html, render_markdown
from synthmri_jax.pipeline.report.inputs import Inputs
from synthmri_jax.pipeline.report.scans import slices_section
from synthmri_jax.pipeline.report.sections import (anatomy_section, answers_section, data_section, ldm_section, run_section, summary_section, tokenizer_section)
from synthmri_jax.pipeline.report.study import classification_section, fidelity_section, privacy_section


# ------------------------------------------------------------------------------ the stage


def _safe(title: str, fn: Callable[[], Section]) -> Section:
  """A section that raises is reported as such; the rest of the report still renders."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001
    print(f"report: section {title!r} failed: {type(e).__name__}: {e}", flush=True)
    return Section(title, [f"This section could not be rendered ({type(e).__name__}: {e})."], status="error")


def build(config, workdir: str) -> tuple[list[Section], Figures]:
  workdir = os.path.abspath(workdir)
  inp = Inputs(workdir)
  figs = Figures(workdir)
  sections = [
      _safe("Useful? Private?", lambda: answers_section(config, inp, figs)),
      _safe("Summary", lambda: summary_section(inp)),
      _safe("Run", lambda: run_section(inp)),
      _safe("Data", lambda: data_section(inp)),
      _safe("Tokenizer", lambda: tokenizer_section(inp)),
      _safe("Latent diffusion model", lambda: ldm_section(inp)),
      _safe("Real vs synthetic scans", lambda: slices_section(config, inp, figs)),
      _safe("Downstream classification (TSTR / TRTR)", lambda: classification_section(inp, figs)),
      _safe("Anatomy by label", lambda: anatomy_section(inp)),
      _safe("Fidelity and diversity", lambda: fidelity_section(inp)),
      _safe("Privacy", lambda: privacy_section(inp)),
  ]
  return sections, figs


def run(config, workdir: str) -> dict[str, Any]:
  """The pipeline stage: writes WORKDIR/report.md, report.html and report_figures/; returns what it wrote."""
  workdir = os.path.abspath(workdir)
  sections, figs = build(config, workdir)
  cfg_hash = (io.read_json(os.path.join(workdir, "config.json"), default={}) or {}).get("config_hash")
  title = "synthmri_jax run report" + (f" (config {cfg_hash})" if cfg_hash else "")
  md_path, html_path = os.path.join(workdir, REPORT_MD), os.path.join(workdir, REPORT_HTML)
  io.write_text_atomic(md_path, render_markdown(title, sections, workdir))
  io.write_text_atomic(html_path, render_html(title, sections))
  figs.remove_stale()
  status = {s.title: s.status for s in sections}
  print(f"report: wrote {md_path} and {html_path} ({len(figs.written)} figure(s)); sections "
        + ", ".join(f"{k}: {v}" for k, v in status.items()), flush=True)
  return {"markdown": md_path, "html": html_path, "figures": list(figs.written), "sections": status}
