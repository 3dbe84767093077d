"""The report as data (sections of text, tables and images) and its two renderings, Markdown and
self-contained HTML; the figure files it embeds."""

from __future__ import annotations

import base64
import dataclasses
import glob
import html
import os
import re
from typing import Any, Sequence


from synthmri_jax.utils import io

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
FIGURES_DIR = "report_figures"
SUBJECTS_PER_CLASS = 3      # slice grids: real and synthetic subjects shown per class
NOT_RUN = "not run"


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


def not_run(title: str, what: str) -> Section:
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


def figure(w: float, h: float):
  """A pyplot-free Figure (Agg canvas): no global backend state, safe in any process."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(w, h), layout="constrained")
  FigureCanvasAgg(fig)
  return fig
