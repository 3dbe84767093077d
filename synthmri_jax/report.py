"""The `report` stage: one human-readable summary of a run, built only from the stages' outputs.

    python -m synthmri_jax.main --config configs/quickstart.py --workdir W --config.stages=report

Writes W/report.md, W/report.html (self-contained: figures embedded as base64 PNG, inline CSS, no
external URL, so it can be mailed or archived on its own) and W/report_figures/*.png. Every number
is read from the JSON / TSV files the stages wrote (config.json, timings.json, data/prepared.json,
tokenizer/tokenizer_metrics.json, ldm/ldm.json, synthetic_state.json, evaluation/*.json and the
per-run result.json files), never recomputed from scratch or typed in, so the report cannot drift
from what the pipeline measured. A stage whose outputs are missing gets a "not run" section and
a section that fails to render says so: a partial workdir still gives a report.
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import html
import math
import os
import re
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pandas as pd

from synthmri_jax import workdir as W
from synthmri_jax.utils import durations, io

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FIGURES_DIR = "report_figures"
SUBJECTS_PER_CLASS = 3      # slice grids: real and synthetic subjects shown per class
NOT_RUN = "not run"


# ------------------------------------------------------------------------------ formatting


def _num(x: Any) -> Optional[float]:
  """A finite float, or None (JSON null, NaN, missing)."""
  if x is None or isinstance(x, bool):
    return None
  try:
    v = float(x)
  except (TypeError, ValueError):
    return None
  return v if math.isfinite(v) else None


def fmt(x: Any, digits: int = 3, unit: str = "", signed: bool = False) -> str:
  v = _num(x)
  if v is None:
    return "n/a"
  s = f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
  return s + (f" {unit}" if unit else "")


def fmt_g(x: Any, digits: int = 4) -> str:
  v = _num(x)
  return "n/a" if v is None else f"{v:.{digits}g}"


def fmt_ci(point: Any, lo: Any, hi: Any, digits: int = 3, signed: bool = False) -> str:
  """'0.812 [0.731, 0.880]'; the interval is left out when it is missing."""
  s = fmt(point, digits, signed=signed)
  if _num(lo) is None or _num(hi) is None:
    return s
  return f"{s} [{fmt(lo, digits, signed=signed)}, {fmt(hi, digits, signed=signed)}]"


def fmt_ci_g(point: Any, lo: Any, hi: Any, digits: int = 4) -> str:
  s = fmt_g(point, digits)
  if _num(lo) is None or _num(hi) is None:
    return s
  return f"{s} [{fmt_g(lo, digits)}, {fmt_g(hi, digits)}]"


def fmt_mean_sd(summary: Optional[dict[str, Any]], digits: int = 3, signed: bool = False) -> str:
  """stats.summarize_seeds output as 'mean ± SD (n=k)' (the SD is undefined for one seed)."""
  if not summary:
    return "n/a"
  mean = fmt(summary.get("mean"), digits, signed=signed)
  n = summary.get("n", 0)
  if _num(summary.get("sd")) is None or (n or 0) < 2:
    return f"{mean} (n={n})"
  return f"{mean} ± {fmt(summary['sd'], digits)} (n={n})"


def fmt_pct(x: Any, digits: int = 1) -> str:
  v = _num(x)
  return "n/a" if v is None else f"{100 * v:.{digits}f} %"


def fmt_p(x: Any) -> str:
  v = _num(x)
  return "n/a" if v is None else (f"{v:.3g}" if v >= 1e-4 else "< 0.0001")


def fmt_seconds(x: Any) -> str:
  v = _num(x)
  if v is None:
    return "n/a"
  return f"{v:.1f} s ({durations.hms(v)})"


# ------------------------------------------------------------------------------ document model


@dataclasses.dataclass
class Table:
  header: list[str]
  rows: list[list[str]]
  caption: str = ""


@dataclasses.dataclass
class Image:
  path: str         # absolute path of a PNG
  caption: str


@dataclasses.dataclass
class Section:
  """A heading and its blocks: str (paragraph), list[str] (bullets), Table, Image, Section (subsection)."""
  title: str
  blocks: list[Any] = dataclasses.field(default_factory=list)
  status: str = "ok"    # "ok", NOT_RUN or "error"

  def add(self, *blocks: Any) -> "Section":
    self.blocks.extend(blocks)
    return self


def _not_run(title: str, what: str) -> Section:
  return Section(title, [f"**{NOT_RUN}**: {what}"], status=NOT_RUN)


# ------------------------------------------------------------------------------ rendering


def _inline_html(text: str) -> str:
  """Escapes text and turns **bold** and `code` (the only markup the report uses) into HTML."""
  s = html.escape(text)
  s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
  return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def _md_cell(text: str) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: Sequence[Section], workdir: str) -> str:
  out = [f"# {title}", ""]

  def emit(sec: Section, level: int) -> None:
    out.extend([f"{'#' * level} {sec.title}", ""])
    for b in sec.blocks:
      if isinstance(b, Section):
        emit(b, level + 1)
      elif isinstance(b, str):
        out.extend([b, ""])
      elif isinstance(b, list):
        out.extend([f"- {x}" for x in b] + [""])
      elif isinstance(b, Table):
        if b.caption:
          out.extend([f"*{b.caption}*", ""])
        out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
        out.append("|" + "|".join("---" for _ in b.header) + "|")
        out.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows)
        out.append("")
      elif isinstance(b, Image):
        rel = os.path.relpath(b.path, workdir).replace(os.sep, "/")
        out.extend([f"![{b.caption}]({rel})", "", f"*{b.caption}*", ""])

  for s in sections:
    emit(s, 2)
  return "\n".join(out).rstrip() + "\n"


_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #444;padding-bottom:.2em}h2{border-bottom:1px solid #bbb;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0}tr:nth-child(even) td{background:#fafafa}
caption{caption-side:top;text-align:left;font-style:italic;padding-bottom:.3em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.9em;color:#555}code{background:#f4f4f4;padding:0 .2em}
.notrun{color:#8a6d00}.error{color:#a00}
"""


def _data_uri(path: str) -> str:
  with open(path, "rb") as f:
    return "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")


def render_html(title: str, sections: Sequence[Section]) -> str:
  out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
         f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style>", "</head><body>",
         f"<h1>{html.escape(title)}</h1>"]

  def emit(sec: Section, level: int) -> None:
    cls = {NOT_RUN: " class=\"notrun\"", "error": " class=\"error\""}.get(sec.status, "")
    out.append(f"<h{level}{cls}>{html.escape(sec.title)}</h{level}>")
    for b in sec.blocks:
      if isinstance(b, Section):
        emit(b, min(level + 1, 6))
      elif isinstance(b, str):
        out.append(f"<p>{_inline_html(b)}</p>")
      elif isinstance(b, list):
        out.append("<ul>" + "".join(f"<li>{_inline_html(x)}</li>" for x in b) + "</ul>")
      elif isinstance(b, Table):
        rows = ["<table>"]
        if b.caption:
          rows.append(f"<caption>{_inline_html(b.caption)}</caption>")
        rows.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in b.header) + "</tr>")
        rows += ["<tr>" + "".join(f"<td>{_inline_html(str(c))}</td>" for c in r) + "</tr>" for r in b.rows]
        rows.append("</table>")
        out.append("".join(rows))
      elif isinstance(b, Image):
        if os.path.isfile(b.path):
          out.append(f"<figure><img alt=\"{html.escape(b.caption)}\" src=\"{_data_uri(b.path)}\">"
                     f"<figcaption>{html.escape(b.caption)}</figcaption></figure>")
        else:
          out.append(f"<p class=\"error\">figure missing: {html.escape(b.caption)}</p>")

  for s in sections:
    emit(s, 2)
  out.append("</body></html>")
  return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------ figures


class Figures:
  """Writes report_figures/<name>.png atomically and remembers what this run wrote."""

  def __init__(self, workdir: str):
    self.dir = os.path.join(workdir, FIGURES_DIR)
    self.written: list[str] = []

  def save(self, fig, name: str) -> str:
    path = os.path.join(self.dir, name + ".png")
    with io.atomic_path(path, suffix=".png") as tmp:
      fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
    self.written.append(path)
    return path

  def remove_stale(self) -> None:
    """Figures of an earlier report that this one did not draw would otherwise linger beside it."""
    keep = set(self.written)
    for p in glob.glob(os.path.join(self.dir, "*.png")):
      if p not in keep:
        os.remove(p)


def _figure(w: float, h: float):
  """A pyplot-free Figure (Agg canvas): no global backend state, safe in any process."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(w, h), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


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


# ------------------------------------------------------------------------------ sections


def _answers(config, inp: Inputs, figs: Figures) -> Section:
  """The two questions a reader opens the report for, answered in one screen, with the scans beside them."""
  sec = Section("Useful? Private?")
  ev = inp.evaluation
  arms = (ev or {}).get("classification", {}).get("arms", {})
  if ev and "TRTR" in arms and "TSTR" in arms:
    trtr, tstr = arms["TRTR"]["seed_mean_scores"], arms["TSTR"]["seed_mean_scores"]
    r = ev.get("classification", {}).get("tstr_trtr_ratio", {})
    n_test = (ev.get("real") or {}).get("n_test")
    useful = (_num(tstr.get("ci_low")) or 0) > 0.5
    rows = [["TRTR (trained on real)", fmt_ci(trtr.get("auc"), trtr.get("ci_low"), trtr.get("ci_high"))],
            ["TSTR (trained on synthetic only)", fmt_ci(tstr.get("auc"), tstr.get("ci_low"), tstr.get("ci_high"))],
            ["TSTR / TRTR", fmt(r.get("value"))]]
    if "AUG" in arms or any(k.startswith("AUG") for k in arms):
      k = "AUG" if "AUG" in arms else sorted(k for k in arms if k.startswith("AUG"))[-1]
      a = arms[k]["seed_mean_scores"]
      rows.append([f"{k} (real + synthetic)", fmt_ci(a.get("auc"), a.get("ci_low"), a.get("ci_high"))])
    if "CODEC" in arms:
      c = arms["CODEC"]["seed_mean_scores"]
      rows.append(["CODEC (trained on real train scans encoded → decoded: the TSTR ceiling of this decoder)",
                   fmt_ci(c.get("auc"), c.get("ci_low"), c.get("ci_high"))])
    sec.add(f"**Useful?** {'Yes' if useful else 'Not shown'}: a classifier trained only on the synthetic scans "
            + ("separates the classes on real scans better than chance (TSTR interval above 0.5)." if useful
               else "does not separate the classes on real scans better than chance at 95 % (TSTR interval holds 0.5)."))
    sec.add(Table(["diagnosis AUC on the real test split", "AUC [95 % CI]"], rows,
                  f"Seed-mean scores{f', {n_test} test subjects' if n_test else ''}; intervals: subject bootstrap"))
  else:
    sec.add(f"**Useful?** {NOT_RUN}: the `evaluate` stage has not written TSTR and TRTR.")
  pv = inp.privacy
  if pv:
    mia = pv.get("membership_inference", {})
    la = mia.get("loss_attack") or {}
    cohort = pv.get("epsilon", {}).get("synthetic_cohort", {})
    rows = [["synthetic scans flagged as copies of training scans",
             f"{pv.get('n_copies')} of {pv.get('synthetic', {}).get('n')} ({fmt_pct(pv.get('copy_fraction'))}); "
             f"false flags expected {fmt_pct(pv.get('expected_false_copy_fraction'))}"],
            ["membership inference on the LDM (loss attack)",
             f"AUC {fmt(la.get('auc'))} (0.5 = chance)" if la else f"skipped ({mia.get('skipped', NOT_RUN)})"],
            ["ε of the synthetic cohort", str(cohort.get("statement", "n/a"))]]
    sec.add("**Private?** Copies, membership inference and the privacy budget:")
    sec.add(Table(["check", "result"], rows, "Details: the Privacy section"))
  else:
    sec.add(f"**Private?** {NOT_RUN}: no evaluation/privacy.json.")
  grid = _answer_grid(config, inp, figs)
  if grid is not None:
    sec.add(grid)
  return sec


def _answer_grid(config, inp: Inputs, figs: Figures) -> Optional[Image]:
  """One compact figure: per class, a real and a synthetic subject's axial and coronal mid slices."""
  prepared = inp.prepared()
  if prepared is None or inp.synthetic_table() is None:
    return None
  train = prepared.split("train")
  cols = []
  for label in prepared.labels:
    real = [np.asarray(prepared.load_image(r, mmap=True)[..., 0], np.float32)
            for _, r in train[train["label"] == label].head(2).iterrows()]
    syn, _ = _synthetic_volumes(config, inp, prepared, label, 2)
    cols += [(f"real {label}", v) for v in real] + [(f"synthetic {label}", v) for v in syn]
  if not cols:
    return None
  allv = np.concatenate([np.concatenate([s.ravel() for s in _mid_slices(v)[:2]]) for _, v in cols])
  lo, hi = np.percentile(allv, [1, 99])
  hi = hi if hi > lo else lo + 1.0
  fig = _figure(1.25 * len(cols) + 0.3, 3.0)
  axes = fig.subplots(2, len(cols), squeeze=False)
  for j, (name, v) in enumerate(cols):
    for i, img in enumerate(_mid_slices(v)[:2]):
      ax = axes[i, j]
      ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(name, fontsize=7, color="#1f4e9a" if name.startswith("real") else "#a33c00")
  path = figs.save(fig, "answer_grid")
  return Image(path, "Axial (top) and coronal (bottom) mid slices: real training scans and synthetic scans per "
                     "class, one grey scale")


def _summary(inp: Inputs) -> Section:
  sec = Section("Summary")
  items = []
  ev = inp.evaluation
  if ev:
    arms = ev.get("classification", {}).get("arms", {})
    for name in ("TRTR", "TSTR"):
      if name in arms:
        e = arms[name]["seed_mean_scores"]
        items.append(f"**{name} AUC** (seed-mean scores, real test set): "
                     f"{fmt_ci(e.get('auc'), e.get('ci_low'), e.get('ci_high'))}; over seeds "
                     f"{fmt_mean_sd(arms[name].get('auc_over_seeds'))}")
    r = ev.get("classification", {}).get("tstr_trtr_ratio", {})
    if "value" in r:
      items.append(f"**TSTR / TRTR AUC ratio**: {fmt(r['value'])}")
  else:
    items.append(f"**Classification (TSTR / TRTR)**: {NOT_RUN}")
  an = inp.anatomy
  if an and isinstance(an.get("codec"), dict) and "measures" in an["codec"]:
    v = an["codec"]["measures"]["ventricle_ml"]
    items.append(f"**Codec check**: the {an['case']} − {an['control']} ventricle effect kept through the sampler's "
                 f"decoding path: {fmt_ci(v.get('ratio'), v.get('ci_low'), v.get('ci_high'), 2)} of the original "
                 f"({'within' if v.get('preserved') else 'outside'} ±{fmt_pct(an['codec'].get('tolerance'), 0)})")
  if inp.tokenizer:
    items.append(f"**Tokenizer** ({inp.tokenizer.get('variant')}): val PSNR {fmt(inp.tokenizer.get('psnr'), 2, 'dB')}, "
                 f"SSIM {fmt(inp.tokenizer.get('ssim'), 4)}")
  return sec.add(items)


def _anatomy_section(inp: Inputs) -> Section:
  """Ventricles and hippocampi by label: real vs synthetic, through the codec, and under the label alone."""
  title = "Anatomy by label"
  an = inp.anatomy
  if not an:
    return _not_run(title, "no evaluation/anatomy.json; the `evaluate` stage has not run (evaluate.anatomy.enabled)")
  sec = Section(title)
  case, control = an["case"], an["control"]
  names = {"ventricle_ml": "lateral-ventricle CSF", "hippocampus_intensity": "hippocampal signal"}
  sec.add(f"Region-of-interest measures the disease changes, from an atlas placed by the brain's moments: "
          f"{names['ventricle_ml']} volume (mL) and {names['hippocampus_intensity']} (grey-matter intensity "
          f"relative to deep white matter). Effects are {case} − {control} differences of group means; "
          f"95 % intervals from a bootstrap over subjects within each label.")
  rows = []
  for m, e in (an.get("by_label") or {}).items():
    for who in ("real", "synthetic"):
      g = e[who]
      rows.append([names.get(m, m), f"{who} ({g['n_case']} {case} / {g['n_control']} {control})",
                   fmt(g.get("mean_control"), 3), fmt(g.get("mean_case"), 3),
                   fmt_ci(g.get("effect"), g.get("ci_low"), g.get("ci_high"), 3, signed=True),
                   fmt(e.get("effect_ratio"), 2) if who == "synthetic" else ""])
  sec.add(Table(["measure", "cohort (subjects)", f"{control} mean", f"{case} mean", f"{case} − {control} [CI]",
                 "synthetic / real effect"], rows,
                f"Real `{an.get('by_label_split')}` split vs the synthetic cohort; units: mL (ventricles), relative "
                "to white matter (hippocampus)"))
  codec = an.get("codec") or {}
  if "measures" in codec:
    rows = []
    for m, r in codec["measures"].items():
      rows.append([names.get(m, m), fmt(r["before"].get("effect"), 3, signed=True),
                   fmt(r["after"].get("effect"), 3, signed=True), fmt_ci(r.get("ratio"), r.get("ci_low"), r.get("ci_high"), 2),
                   "yes" if r.get("preserved") else "no"])
    sec.add(Table(["measure", "effect in real scans", "after encode → decode", "kept [CI]",
                   f"within ±{fmt_pct(codec.get('tolerance'), 0)}"], rows,
                  f"Codec check: {codec.get('n_scans')} real `{'+'.join(codec.get('splits', []))}` scans through the "
                  f"sampler's decoding path ({codec.get('codec')}); round-trip PSNR {fmt(codec.get('psnr_db'), 2, 'dB')}. "
                  "What the decoder cannot draw, no generator can produce."))
  else:
    sec.add(f"Codec check: skipped ({codec.get('skipped', NOT_RUN)}).")
  paired = an.get("paired") or {}
  if "measures" in paired:
    rows = []
    for m, r in paired["measures"].items():
      rows.append([names.get(m, m), fmt_ci(r.get("mean_difference"), r.get("ci_low"), r.get("ci_high"), 3, signed=True),
                   fmt(r.get("real_effect"), 3, signed=True), fmt(r.get("ratio_to_real"), 2),
                   {True: "yes", False: "no", None: "n/a"}[r.get("same_direction")]])
    sec.add(Table(["measure", f"paired {case} − {control} [CI]", "real effect", "ratio", "same direction"], rows,
                  f"Conditioning check: {paired.get('n_pairs')} synthetic subjects, each sampled from the same noise "
                  f"and attributes once as {case} and once as {control}; the difference is the label's alone."))
  else:
    sec.add(f"Paired conditioning check: skipped ({paired.get('skipped', NOT_RUN)}).")
  return sec


def _run_section(inp: Inputs) -> Section:
  sec = Section("Run")
  if not inp.config and not inp.timings:
    return _not_run("Run", "no config.json / timings.json in the workdir")
  cfg = inp.resolved_config()
  items = [f"Workdir: `{inp.workdir}`",
           f"Config hash: `{(inp.config or {}).get('config_hash', 'not recorded')}`"]
  if cfg.get("stages"):
    items.append(f"Stages requested: {cfg['stages']}")
  items.append(f"Report written: {time.strftime('%Y-%m-%d %H:%M:%S %z')}")
  sec.add(items)
  if inp.timings:
    from synthmri_jax.stages import STAGE_ORDER
    order = lambda name: STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER)
    rows = [[name, fmt_seconds(inp.timings[name])] for name in sorted(inp.timings, key=order)]
    total = sum(v for v in (_num(x) for x in inp.timings.values()) if v is not None)
    rows.append(["**total**", fmt_seconds(total)])
    sec.add(Table(["stage", "wall time (s, h:mm:ss)"], rows, "Stage wall times (timings.json)"))
  else:
    sec.add("Stage wall times: not recorded (timings.json missing).")
  return sec


def _data_section(inp: Inputs) -> Section:
  meta = inp.prepared_meta
  if not meta or not meta.get("complete"):
    return _not_run("Data", "no complete prepared cohort (data/prepared.json); the `prepare` stage has not run")
  sec = Section("Data")
  shape = meta.get("shape") or []
  sp = _num(meta.get("spacing_mm"))
  fov = " × ".join(fmt(s * sp, 0) for s in shape) + " mm" if sp and shape else "n/a"
  sec.add([f"Cohort table: `{meta.get('cohort_tsv', 'n/a')}`",
           f"Grid: {' × '.join(str(s) for s in shape)} voxels at {fmt(sp, 2, 'mm')} isotropic (field of view {fov}), "
           f"RAS+ orientation",
           f"Channels (sequences): {', '.join(meta.get('channels', []))}",
           f"Labels: {', '.join(meta.get('labels', []))}",
           f"Intensity normalisation: {meta.get('normalization', 'n/a')}",
           f"Participants: {meta.get('n_participants', 'n/a')}; prepared in {fmt_seconds(meta.get('prepare_seconds'))}"])
  table_path = os.path.join(inp.workdir, "data", "cohort.tsv")
  if os.path.isfile(table_path):
    t = pd.read_csv(table_path, sep="\t", keep_default_na=False, dtype={"participant_id": str})
    labels = list(meta.get("labels", [])) or sorted(t["label"].unique())
    splits = [s for s in ("train", "val", "test", "holdout") if (t["split"] == s).any()]
    rows = []
    for s in splits:
      ts = t[t["split"] == s]
      rows.append([s] + [str(int((ts["label"] == lab).sum())) for lab in labels]
                  + [str(len(ts)), str(ts["participant_id"].nunique())])
    rows.append(["**all**"] + [str(int((t["label"] == lab).sum())) for lab in labels]
                + [str(len(t)), str(t["participant_id"].nunique())])
    sec.add(Table(["split"] + [f"{lab} (scans)" for lab in labels] + ["scans", "participants"], rows,
                  "Scans per split and label (data/cohort.tsv)"))
  else:
    counts = meta.get("splits", {})
    sec.add(Table(["split", "scans"], [[k, str(v)] for k, v in counts.items()], "Scans per split (prepared.json)"))
  return sec


def _tokenizer_section(inp: Inputs) -> Section:
  m = inp.tokenizer
  if not m:
    return _not_run("Tokenizer", "no tokenizer/tokenizer_metrics.json; the `tokenizer` stage has not run")
  sec = Section("Tokenizer")
  sec.add(f"Variant **{m.get('variant')}**, {m.get('tokenizer_params', 'n/a'):,} parameters, evaluated on "
          f"{m.get('num_volumes')} volume(s) of the `{m.get('split')}` split "
          f"(intensities in [0, {fmt_g(m.get('data_range'))}]); trained in {fmt_seconds(m.get('seconds'))}."
          if isinstance(m.get("tokenizer_params"), int) else
          f"Variant **{m.get('variant')}**, evaluated on the `{m.get('split')}` split.")
  rows = [["main reconstruction", fmt(m.get("psnr"), 2), fmt(m.get("ssim"), 4), fmt(m.get("l1"), 4),
           fmt(m.get("boundary_band_l1"), 4)]]
  modes = m.get("clinical_modes") or {}
  for mode in ("encoded", "predicted", "null"):
    if mode in modes:
      d = modes[mode]
      rows.append([f"clinical latent {mode}", fmt(d.get("psnr"), 2), fmt(d.get("ssim"), 4), "",
                   fmt(d.get("boundary_band_l1"), 4)])
  sec.add(Table(["reconstruction", "PSNR (dB)", "SSIM (3D)", "L1", "boundary-band L1"], rows,
                "Validation reconstruction quality (higher PSNR / SSIM, lower L1 = better)"))
  notes = []
  if "prior_top1_accuracy" in modes:
    notes.append(f"Clinical prior top-1 code accuracy: {fmt_pct(modes['prior_top1_accuracy'])}")
  if "psnr_clinical_head" in m:
    notes.append(f"Clinical head alone: PSNR {fmt(m['psnr_clinical_head'], 2, 'dB')}")
  if m.get("boundary_band"):
    notes.append(f"Boundary band: {m['boundary_band']}")
  if m.get("perceptual"):
    notes.append(f"Perceptual loss network: {m['perceptual']}")
  for name, shape in (m.get("latents") or {}).items():
    notes.append(f"{name} latent: {' × '.join(str(s) for s in shape)} (spatial × code dim)")
  if notes:
    sec.add(notes)
  cbs = m.get("codebooks") or {}
  if cbs:
    sec.add(Table(["codebook", "codes used / size", "usage", "perplexity"],
                  [[n, f"{c.get('codes_used')} / {c.get('num_codes')}", fmt_pct(c.get("usage")),
                    fmt(c.get("perplexity"), 1)] for n, c in cbs.items()],
                  "Codebook usage over the validation split (perplexity: effective number of codes)"))
  stages = m.get("stages") or {}
  if stages:
    sec.add(Table(["training stage", "steps", "learning rate", "steps/s", "wall time", "trainable params"],
                  [[n, str(s.get("steps")), fmt_g(s.get("lr"), 3), fmt(s.get("steps_per_s"), 2),
                    fmt_seconds(s.get("seconds")), f"{s['trainable_params']:,}" if isinstance(
                        s.get("trainable_params"), int) else "n/a"] for n, s in stages.items()],
                  "Tokenizer training stages"))
  return sec


def _ldm_section(inp: Inputs) -> Section:
  m = inp.ldm
  if not m or not m.get("complete"):
    return _not_run("Latent diffusion model", "no complete ldm/ldm.json; the `ldm` stage has not run")
  sec = Section("Latent diffusion model")
  diff = (m.get("ldm") or {}).get("diffusion") or {}
  rows = [["training steps", str(m.get("step"))],
          ["throughput", fmt(m.get("steps_per_s"), 2, "steps/s")],
          ["wall time", fmt_seconds(m.get("seconds"))],
          ["final training loss", fmt_g(m.get("final_loss"))],
          ["parameters", f"{m['params']:,}" if isinstance(m.get("params"), int) else "n/a"],
          ["batch size", str(m.get("batch_size"))],
          ["training latents", str(m.get("num_train_latents"))],
          ["latent shape", " × ".join(str(s) for s in m.get("latent_shape", []))],
          ["latent scale factor", fmt_g(m.get("scale_factor"))]]
  if diff:
    rows.append(["prediction type", str(diff.get("prediction_type", "n/a"))])
  attrs = [a.get("name") for a in m.get("attributes", []) if isinstance(a, dict)]
  rows.append(["conditioning", ", ".join(["label"] + [a for a in attrs if a and a != "label"])])
  if m.get("codec"):
    rows.append(["decoder (tokenizer)", str(m["codec"])])
  sec.add(Table(["quantity", "value"], rows, "LDM training (ldm/ldm.json)"))
  st = inp.sample_state
  if st and st.get("complete"):
    scfg = inp.resolved_config().get("sample") or {}
    srows = [["subjects generated", str(st.get("num_subjects"))],
             ["sampler", f"{str(st.get('sampler', 'n/a')).upper()}, {st.get('steps')} steps"
              + (f", eta {fmt_g(scfg['eta'])}" if st.get("sampler") == "ddim" and "eta" in scfg else "")],
             ["LDM checkpoint step", str(st.get("checkpoint_step"))],
             ["sampling time", fmt(st.get("sampling_s_per_volume"), 3, "s/volume")],
             ["decoding time", fmt(st.get("decoding_s_per_volume"), 3, "s/volume")],
             ["sample stage wall time", fmt_seconds(st.get("seconds"))]]
    if "guidance_scale" in scfg:
      srows.insert(2, ["classifier-free guidance scale", fmt_g(scfg["guidance_scale"])])
    sec.add(Table(["quantity", "value"], srows, "Sampling (synthetic_state.json)"))
    t = inp.synthetic_table()
    if t is not None and "label" in t:
      counts = t["label"].value_counts()
      sec.add(Table(["label", "synthetic subjects"], [[str(k), str(int(v))] for k, v in counts.sort_index().items()],
                    "Synthetic cohort (synthetic/participants.tsv)"))
  else:
    sec.add(f"Sampling: **{NOT_RUN}** (no complete synthetic_state.json).")
  return sec


# ---------------------------------------------------------------- slice grids


def _mid_slices(v: np.ndarray) -> list[np.ndarray]:
  """Axial, coronal, sagittal mid slices (origin='lower'), as in the privacy figures."""
  from synthmri_jax.evaluation.privacy import mid_slices
  return mid_slices(v)


def _synthetic_volumes(config, inp: Inputs, prepared, label: str, n: int) -> tuple[list[np.ndarray], str]:
  """Up to n synthetic volumes (channel 0) of one label, and where they came from.

  The evaluate stage's ingested cache (on the prepared grid and intensity scale) when it exists;
  otherwise the sample stage's NIfTI files, which it writes on the prepared grid already."""
  cache = W.synthetic_cache_dir(inp.workdir)
  if config is not None and os.path.isdir(cache):
    try:
      from synthmri_jax.evaluation.stage import load_synthetic
      syn = load_synthetic(config, inp.workdir)
      rows = syn.table[syn.table["label"] == label].head(n)
      return ([np.asarray(syn.prepared.load_image(r, mmap=True)[..., 0], np.float32) for _, r in rows.iterrows()],
              "evaluate stage's ingested synthetic cache")
    except Exception as e:  # noqa: BLE001  (fall back to the raw files)
      print(f"report: synthetic cache unreadable ({type(e).__name__}: {e}); reading the NIfTI files", flush=True)
  t = inp.synthetic_table()
  if t is None:
    return [], ""
  from synthmri_jax.data import nifti
  seq = prepared.channels[0]
  out = []
  for pid in t[t["label"] == label]["participant_id"].head(n):
    path = os.path.join(W.synthetic_dir(inp.workdir), pid, "anat", f"{pid}_{seq}.nii.gz")
    if os.path.isfile(path):
      out.append(np.asarray(nifti.load_canonical(path)[0], np.float32))
  return out, "synthetic/ NIfTI files"


def _slices_section(config, inp: Inputs, figs: Figures) -> Section:
  title = "Real vs synthetic scans"
  prepared = inp.prepared()
  if prepared is None:
    return _not_run(title, "slice grids not available: no prepared cohort cache (data/)")
  if inp.synthetic_table() is None:
    return _not_run(title, "slice grids not available: no synthetic cohort (synthetic/participants.tsv); "
                           "the `sample` stage has not run")
  sec = Section(title)
  train = prepared.split("train")
  channel = prepared.channels[0]
  source = ""
  for label in prepared.labels:
    real = [np.asarray(prepared.load_image(r, mmap=True)[..., 0], np.float32)
            for _, r in train[train["label"] == label].head(SUBJECTS_PER_CLASS).iterrows()]
    syn, source = _synthetic_volumes(config, inp, prepared, label, SUBJECTS_PER_CLASS)
    if not real and not syn:
      continue
    rows = [("real", v) for v in real] + [("synthetic", v) for v in syn]
    # One grey scale for both cohorts (1st-99th percentile of everything shown), so brightness
    # and contrast differences are the generator's, not the display's.
    allv = np.concatenate([np.concatenate([s.ravel() for s in _mid_slices(v)]) for _, v in rows])
    lo, hi = np.percentile(allv, [1, 99])
    hi = hi if hi > lo else lo + 1.0
    fig = _figure(6.6, 2.1 * len(rows) + 0.4)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for i, (kind, v) in enumerate(rows):
      for j, (img, view) in enumerate(zip(_mid_slices(v), ("axial", "coronal", "sagittal"))):
        ax = axes[i, j]
        ax.imshow(img, cmap="gray", origin="lower", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
          ax.set_title(view, fontsize=9)
        if j == 0:
          ax.set_ylabel(kind, fontsize=9, color="#1f4e9a" if kind == "real" else "#a33c00")
    fig.suptitle(f"{label}: {len(real)} real (train split) vs {len(syn)} synthetic, {channel}, same grey scale",
                 fontsize=9)
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", str(label))
    path = figs.save(fig, f"slices_{safe}")
    sec.add(Image(path, f"{label}: mid slices, real (top rows) vs synthetic (bottom rows), {channel}, "
                        f"grey scale {fmt_g(lo, 3)} to {fmt_g(hi, 3)}"))
  if source:
    sec.add(f"Synthetic volumes read from the {source}. Real scans: first {SUBJECTS_PER_CLASS} of each class in the "
            "training split.")
  return sec


# ---------------------------------------------------------------- classification


def _roc_points(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Binary: ROC of the second class's probability; K > 2: macro-average of one-vs-rest curves."""
  from sklearn.metrics import roc_curve
  probs = np.asarray(probs, np.float64)
  if probs.ndim == 1:
    return roc_curve(y, probs)[:2]
  if probs.shape[1] == 2:
    return roc_curve(y == 1, probs[:, 1])[:2]
  grid = np.linspace(0, 1, 201)
  tprs = []
  for k in range(probs.shape[1]):
    if 0 < (y == k).sum() < len(y):
      fpr, tpr, _ = roc_curve(y == k, probs[:, k])
      tprs.append(np.interp(grid, fpr, tpr))
  return grid, np.mean(tprs, axis=0) if tprs else grid


def _roc_figure(inp: Inputs, figs: Figures, arms: dict[str, Any]) -> Optional[Image]:
  results = inp.run_results()
  if not results:
    return None
  panels = [("TSTR vs TRTR", [a for a in ("TRTR", "TSTR") if a in results]),
            ("augmentation arms", ["TRTR"] * ("TRTR" in results) + sorted(
                a for a in results if a.startswith(("AUG_", "REAL_"))))]
  panels = [(t, names) for t, names in panels if names and (t == "TSTR vs TRTR" or len(names) > 1)]
  fig = _figure(5.2 * len(panels), 4.8)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (title, names) in zip(axes, panels):
    for name in names:
      rs = results[name]
      y = np.asarray(rs[0]["test"]["label"])
      probs = np.mean([np.asarray(r["test"]["probs"], np.float64) for r in rs], axis=0)
      fpr, tpr = _roc_points(y, probs)
      e = (arms.get(name) or {}).get("seed_mean_scores") or {}
      label = f"{name} (n seeds {len(rs)}): AUC {fmt_ci(e.get('auc'), e.get('ci_low'), e.get('ci_high'))}" if e \
          else f"{name} (n seeds {len(rs)})"
      ax.plot(fpr, tpr, lw=2 if name in ("TRTR", "TSTR") else 1.4,
              ls="--" if name.startswith("REAL_") else "-", label=label)
    ax.plot([0, 1], [0, 1], color="#999", lw=0.8, ls=":")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate (1 − specificity)",
           ylabel="true positive rate (sensitivity)", title=title)
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=7)
  path = figs.save(fig, "roc")
  return Image(path, "ROC curves on the real test split, scores averaged over seeds (result.json); legend: AUC of "
                     "the seed-mean scores with its bootstrap interval (evaluation.json)")


def _arm_order(names, ev: dict[str, Any]) -> list[str]:
  """The study's own arm order (protocol.arms: TRTR, TSTR, AUG_f, REAL_f); the JSON's keys are sorted."""
  planned = [a.get("name") for a in (ev.get("protocol") or {}).get("arms", []) if isinstance(a, dict)]
  kind = lambda n: next((i for i, k in enumerate(("TRTR", "TSTR", "AUG_", "REAL_")) if n.startswith(k)), 4)
  return sorted(names, key=lambda n: (planned.index(n) if n in planned else len(planned), kind(n), n))


def _classification_section(inp: Inputs, figs: Figures) -> Section:
  title = "Downstream classification (TSTR / TRTR)"
  ev = inp.evaluation
  if not ev:
    msg = "no evaluation/evaluation.json; the `evaluate` stage has not run"
    sec = _not_run(title, msg)
    tr = ((inp.classify or {}).get("classification") or {}).get("TRTR")
    if tr:
      e = tr.get("seed_mean_scores", {})
      sec.add(f"The `classify` stage has run: TRTR AUC {fmt_ci(e.get('auc'), e.get('ci_low'), e.get('ci_high'))} "
              f"(seed-mean scores), {fmt_mean_sd(tr.get('auc_over_seeds'))} over seeds (classify.json).")
    return sec
  sec = Section(title)
  cls = ev.get("classification", {})
  arms = cls.get("arms", {})
  real, proto = ev.get("real", {}), ev.get("protocol", {})
  syn = ev.get("synthetic", {})
  ci = proto.get("ci", {})
  level = f"{fmt_g(100 * (1 - _num(ci.get('alpha'))), 3)} %" if _num(ci.get("alpha")) is not None else "95 %"
  sec.add(f"Every arm is tested on the same real test split ({real.get('n_test')} scans: "
          + ", ".join(f"{k} {v}" for k, v in (real.get("test_per_class") or {}).items())
          + f"), never seen by a generator or classifier. Synthetic cohort: {syn.get('n')} scans ("
          + ", ".join(f"{k} {v}" for k, v in (syn.get("per_class") or {}).items()) + f"). Each arm: "
          f"{len(proto.get('seeds', []))} seed(s), {proto.get('steps_per_run')} steps, batch {proto.get('batch_size')}; "
          f"intervals: {level} {ci.get('kind', 'bootstrap')} ({ci.get('method', '')}, {ci.get('n_boot')} resamples).")
  img = _roc_figure(inp, figs, arms)
  if img:
    sec.add(img)
  else:
    sec.add("ROC curves: not available (no evaluation/runs/*/seed*/result.json).")
  rows = []
  for name in _arm_order(arms, ev):
    a = arms[name]
    ps = (a.get("per_seed") or [{}])[0]
    e = a.get("seed_mean_scores", {})
    n_syn = f"{ps['n_train_codec']} real, encoded → decoded" if "n_train_codec" in ps else str(ps.get("n_train_synthetic", "n/a"))
    rows.append([name, str(ps.get("n_train_real", "n/a")), n_syn, str(a.get("n_seeds")),
                 fmt_mean_sd(a.get("auc_over_seeds")), fmt_ci(e.get("auc"), e.get("ci_low"), e.get("ci_high"))])
  sec.add(Table(["arm", "train: real scans", "train: synthetic scans", "seeds", "AUC mean ± SD over seeds",
                 f"AUC of seed-mean scores [{level} CI]"], rows, "ROC-AUC per training arm (real test split)"))
  comps = cls.get("comparisons", {})
  if comps:
    rows = []
    for name, c in comps.items():
      e = c.get("seed_mean_scores", {})
      rows.append([f"{c.get('a', name)} − {c.get('b', '')}", fmt_mean_sd(c.get("delta_over_seeds"), signed=True),
                   fmt_ci(e.get("delta"), e.get("ci_low"), e.get("ci_high"), signed=True), fmt_p(e.get("p_value"))])
    sec.add(Table(["comparison", "ΔAUC per seed (mean ± SD)", f"ΔAUC seed-mean scores [{level} CI]", "p (paired)"],
                  rows, "Paired ΔAUC on the same test subjects (negative: the first arm is worse)"))
  r = cls.get("tstr_trtr_ratio", {})
  if "value" in r:
    rows = []
    for arm, what in (("tstr", "TSTR"), ("codec", "CODEC")):
      q = cls.get(f"{arm}_trtr_ratio", {})
      if "value" in q:
        e = q.get("seed_mean_scores", {})
        rows += [[f"{what} / TRTR AUC ratio (means over seeds)", fmt(q["value"])],
                 [f"{what} / TRTR AUC ratio (seed-mean scores)", fmt_ci(e.get("value"), e.get("ci_low"), e.get("ci_high"))]]
    sec.add(Table(["quantity", "this run"], rows,
                  "How much of the real-data AUC a classifier trained on synthetic data alone keeps (1 = all)"
                  + ("; CODEC: trained on the real train scans after encode → decode, the TSTR a perfect LDM "
                     "could reach through this decoder" if "codec_trtr_ratio" in cls else "")))
  elif r.get("skipped"):
    sec.add(f"TSTR / TRTR ratio: skipped ({r['skipped']}).")
  seg = ev.get("segmentation", {})
  if "skipped" in seg:
    sec.add(f"Segmentation (Dice): skipped ({seg['skipped']}).")
  elif seg:
    rows = []
    for name in ("SEG_real", "SEG_synthetic"):
      s = seg.get(name)
      if s:
        d = (s.get("per_seed") or [{}])[0].get("dice", {})
        rows.append([name, fmt_mean_sd(s.get("dice_over_seeds")), fmt_ci(d.get("mean"), d.get("ci_low"), d.get("ci_high"))])
    dl = seg.get("delta_synthetic_minus_real", {})
    if dl:
      rows.append(["synthetic − real (paired)", fmt_mean_sd(dl.get("over_seeds"), signed=True), ""])
    sec.add(Table(["segmenter", "Dice mean ± SD over seeds", "Dice seed 0 [CI]"], rows,
                  "Lesion segmentation on the real test split (Dice, 1 = perfect overlap)"))
  return sec


def _fidelity_section(inp: Inputs) -> Section:
  title = "Fidelity and diversity"
  ev = inp.evaluation
  if not ev or not ev.get("fidelity"):
    return _not_run(title, "no fidelity block in evaluation/evaluation.json; the `evaluate` stage has not run")
  sec = Section(title)
  fid = ev["fidelity"]
  for name, desc in (fid.get("extractors") or {}).items():
    sec.add(f"Features `{name}`: {desc}.")
  rows = []
  for key, entry in fid.items():
    if key.startswith(("FD_", "KID_")) and isinstance(entry, dict):
      for label, v in entry.items():
        ref = "reference" in label
        rows.append([key.split("_", 1)[0], key.split("_", 1)[1],
                     "real val vs real test (floor)" if ref else label.replace("_", " "),
                     fmt_ci_g(v.get("value"), v.get("ci_low"), v.get("ci_high")), f"{v.get('n_a')} vs {v.get('n_b')}"])
  if rows:
    sec.add(Table(["metric", "features", "comparison", "value [CI]", "n"], rows,
                  "Fréchet distance (FD) and kernel distance (KID), lower = closer to real; compare against the "
                  "real-vs-real floor (unitless, only comparable within one feature extractor)"))
  div = fid.get("ms_ssim_diversity") or {}
  rows = []
  for channel, d in (div.get("channels") or {}).items():
    for who, v in d.items():
      rows.append([channel, who.replace("_", " "),
                   fmt_ci(v.get("mean"), v.get("ci_low"), v.get("ci_high")) if "mean" in v else f"skipped ({v.get('skipped')})",
                   str(v.get("n_pairs", "")), str(v.get("n_volumes", ""))])
  if rows:
    sec.add(Table(["channel", "cohort", "MS-SSIM [CI]", "pairs", "volumes"], rows,
                  "MS-SSIM between random pairs of one cohort: lower = more diverse; synthetic should not be far "
                  "above real"))
  return sec


def _privacy_section(inp: Inputs) -> Section:
  title = "Privacy"
  pv = inp.privacy
  if not pv:
    return _not_run(title, "no evaluation/privacy.json; the privacy report has not run (privacy.enabled in the "
                           "`evaluate` stage)")
  sec = Section(title)
  real = pv.get("real", {})
  n = pv.get("synthetic", {}).get("n")
  sec.add(f"Copy detection compares each of the {n} synthetic scans with the {real.get('n_train')} training scans. "
          f"The threshold τ of each measure is calibrated on real data only ({real.get('n_calibration')} "
          f"`{real.get('calibration_split')}` scans vs train, quantile {fmt_g(pv.get('quantile'))}); rule "
          f"`{pv.get('copy_rule')}`.")
  sec.add(Table(["measure", "τ (similarity above = copy)", "quantile used"],
                [[m, fmt(t, 4), fmt_g((pv.get("measure_quantiles") or {}).get(m))] for m, t in (pv.get("tau") or {}).items()],
                "Copy thresholds"))
  sec.add([f"**Copies**: {pv.get('n_copies')} of {n} ({fmt_pct(pv.get('copy_fraction'))}); expected from the "
           f"calibration alone (false flags): {fmt_pct(pv.get('expected_false_copy_fraction'))}",
           f"**Memorised training scans** (nearest neighbour of at least one copy): {pv.get('n_memorized')}"])
  copies = pv.get("copies") or []
  if copies:
    sec.add(Table(["synthetic scan", "nearest training scan", "measure", "score", "τ", "flagged by"],
                  [[c.get("participant_id"), c.get("nearest_train_participant_id"), c.get("measure"),
                    fmt(c.get("score"), 4), fmt(c.get("tau"), 4), ", ".join(c.get("flagged_by", []))] for c in copies],
                  "Flagged copies (remove these before sharing the cohort)"))
  mem = pv.get("memorized") or []
  if mem:
    sec.add(Table(["training scan", "copies", "highest score", "synthetic scans"],
                  [[e.get("train_participant_id"), str(e.get("n_copies")), fmt(e.get("max_score"), 4),
                    ", ".join(e.get("copies", []))] for e in mem], "Memorised training scans"))
  dcr = pv.get("dcr") or {}
  if "skipped" in dcr:
    sec.add(f"Distance to closest record: skipped ({dcr['skipped']}).")
  elif dcr:
    rows = [[m, f"{fmt_pct(d.get('closer_to_train_share'))} ({d.get('n_closer_to_train')}/{d.get('n_synthetic')})",
             fmt_pct(d.get("expected_share")), fmt_p(d.get("share_p_value")), fmt(d.get("prob_synthetic_closer"), 3),
             fmt_p(d.get("mann_whitney_p"))] for m, d in dcr.items() if isinstance(d, dict)]
    sec.add(Table(["measure", "synthetic closer to train than holdout", "expected", "p (binomial)",
                   "P(DCR syn < DCR holdout)", "p (Mann-Whitney)"], rows,
                  f"Distance to closest record vs the {real.get('n_holdout')} `{real.get('holdout_split')}` scans "
                  "(a share near the expected value and P near 0.5 are healthy)"))
  mia = pv.get("membership_inference") or {}
  if "skipped" in mia:
    sec.add(f"Membership inference: skipped ({mia['skipped']}).")
  elif mia:
    rows = []
    for name, key in (("loss attack (mean over timesteps)", "loss_attack"), ("PIA", "pia")):
      a = mia.get(key)
      if a:
        ci = a.get("auc_ci") or [None, None]
        if a.get("tpr_at_1pct_fpr_resolvable") is False:   # fewer than 100 non-members: say so, no number
          tpr = (f"not resolvable with {mia.get('n_nonmembers')} non-members; at FPR "
                 f"{fmt_pct(a.get('smallest_resolvable_fpr'))}: {fmt(a.get('tpr_at_smallest_fpr'), 3)}")
        else:
          tpr = fmt(a.get("tpr_at_1pct_fpr"), 3)
        rows.append([name, fmt_ci(a.get("auc"), ci[0], ci[1]), tpr, fmt(a.get("advantage"), 3)])
    sec.add(Table(["attack", "AUC [CI]", "TPR at 1 % FPR", "advantage (max TPR − FPR)"], rows,
                  f"Membership inference on the LDM: {mia.get('n_members')} members (training latents) vs "
                  f"{mia.get('n_nonmembers')} non-members (`{mia.get('nonmember_split')}`); AUC 0.5 = no leakage"))
  eps = pv.get("epsilon") or {}
  models = eps.get("models") or []
  if models:
    sec.add(Table(["model", "saw private data", "ε", "statement"],
                  [[m.get("model"), "yes" if m.get("saw_private_data") else "no",
                    fmt_g(m.get("epsilon"), 3) if m.get("private") else "∞", m.get("statement", "")] for m in models],
                  "Differential privacy per trained model"))
  cohort = eps.get("synthetic_cohort") or {}
  if cohort:
    sec.add(f"**Synthetic cohort**: {cohort.get('statement', 'n/a')}")
    if cohort.get("non_private_releases"):
      sec.add(["Non-private releases: " + r for r in cohort["non_private_releases"]])
  pairs = pv.get("closest_pairs") or []
  shown = set()
  for p in pairs:
    path = os.path.join(inp.workdir, p.get("figure", ""))
    if p.get("figure") and os.path.isfile(path):
      shown.add(os.path.abspath(path))
      sec.add(Image(path, f"{p.get('participant_id')} vs nearest training scan {p.get('train_participant_id')}: "
                          f"embedding r = {fmt(p.get('embedding_score'), 3)}, voxel s = {fmt(p.get('voxel_score'), 3)}"
                          + (" (COPY)" if p.get("is_copy") else "")))
  for path in sorted(glob.glob(os.path.join(inp.workdir, "evaluation", "figures", "privacy_pair_*.png"))):
    if os.path.abspath(path) not in shown and not pairs:
      sec.add(Image(path, f"closest pair {os.path.basename(path)}"))
  return sec


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
      _safe("Useful? Private?", lambda: _answers(config, inp, figs)),
      _safe("Summary", lambda: _summary(inp)),
      _safe("Run", lambda: _run_section(inp)),
      _safe("Data", lambda: _data_section(inp)),
      _safe("Tokenizer", lambda: _tokenizer_section(inp)),
      _safe("Latent diffusion model", lambda: _ldm_section(inp)),
      _safe("Real vs synthetic scans", lambda: _slices_section(config, inp, figs)),
      _safe("Downstream classification (TSTR / TRTR)", lambda: _classification_section(inp, figs)),
      _safe("Anatomy by label", lambda: _anatomy_section(inp)),
      _safe("Fidelity and diversity", lambda: _fidelity_section(inp)),
      _safe("Privacy", lambda: _privacy_section(inp)),
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
