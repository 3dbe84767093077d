"""Durations as progress lines and reports print them (one spelling everywhere)."""

from __future__ import annotations

import math


def short(seconds: float) -> str:
  """'3m05s', or '1h02m' from an hour on; '?' when unknown (an ETA before the first rate)."""
  if seconds is None or not math.isfinite(seconds):
    return "?"
  s = int(max(0.0, seconds))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def hms(seconds: float) -> str:
  """'1:02:03' (rounded to the second)."""
  h, rest = divmod(int(round(seconds)), 3600)
  m, s = divmod(rest, 60)
  return f"{h:d}:{m:02d}:{s:02d}"
