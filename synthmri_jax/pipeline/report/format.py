"""How the report spells numbers: intervals, signs, percentages, p-values, durations ("n/a" when missing)."""

from __future__ import annotations

import math
from typing import Any, Optional


from synthmri_jax.utils import durations


# ------------------------------------------------------------------------------ formatting


def num(x: Any) -> Optional[float]:
  """A finite float, or None (JSON null, NaN, missing)."""
  if x is None or isinstance(x, bool):
    return None
  try:
    v = float(x)
  except (TypeError, ValueError):
    return None
  return v if math.isfinite(v) else None


def fmt(x: Any, digits: int = 3, unit: str = "", signed: bool = False) -> str:
  v = num(x)
  if v is None:
    return "n/a"
  s = f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"
  return s + (f" {unit}" if unit else "")


def fmt_g(x: Any, digits: int = 4) -> str:
  v = num(x)
  return "n/a" if v is None else f"{v:.{digits}g}"


def fmt_ci(point: Any, lo: Any, hi: Any, digits: int = 3, signed: bool = False) -> str:
  """'0.812 [0.731, 0.880]'; the interval is left out when it is missing."""
  s = fmt(point, digits, signed=signed)
  if num(lo) is None or num(hi) is None:
    return s
  return f"{s} [{fmt(lo, digits, signed=signed)}, {fmt(hi, digits, signed=signed)}]"


def fmt_ci_g(point: Any, lo: Any, hi: Any, digits: int = 4) -> str:
  s = fmt_g(point, digits)
  if num(lo) is None or num(hi) is None:
    return s
  return f"{s} [{fmt_g(lo, digits)}, {fmt_g(hi, digits)}]"


def fmt_mean_sd(summary: Optional[dict[str, Any]], digits: int = 3, signed: bool = False) -> str:
  """stats.summarize_seeds output as 'mean ± SD (n=k)' (the SD is undefined for one seed)."""
  if not summary:
    return "n/a"
  mean = fmt(summary.get("mean"), digits, signed=signed)
  n = summary.get("n", 0)
  if num(summary.get("sd")) is None or (n or 0) < 2:
    return f"{mean} (n={n})"
  return f"{mean} ± {fmt(summary['sd'], digits)} (n={n})"


def fmt_pct(x: Any, digits: int = 1) -> str:
  v = num(x)
  return "n/a" if v is None else f"{100 * v:.{digits}f} %"


def fmt_p(x: Any) -> str:
  v = num(x)
  return "n/a" if v is None else (f"{v:.3g}" if v >= 1e-4 else "< 0.0001")


def fmt_seconds(x: Any) -> str:
  v = num(x)
  if v is None:
    return "n/a"
  return f"{v:.1f} s ({durations.hms(v)})"
