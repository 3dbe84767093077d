"""MR contrast of the embedded cohort's sequences: how T1w, T2w and FLAIR see the same tissue.

Why one mapping from T1: the simulator changes anatomy once, in the template's T1 intensity (a
tissue mix: CSF_LEVEL, GM_LEVEL, white matter 1). Mapping that intensity piecewise-linearly through
each sequence's tissue levels gives every sequence the same geometry, ventricles, cortical and
hippocampal loss, so the sequences differ only in contrast and noise, as co-registered real
sequences of one session do. Lesions are not normal tissue; each sequence has its own lesion levels.
"""

from __future__ import annotations

import numpy as np

from synthmri_jax.data.mni_template import CSF_LEVEL, GM_LEVEL

# Normal-tissue levels of each sequence at background / CSF / GM / WM, brightest normal tissue 1;
# T1w is the template's own scale (CSF_LEVEL, GM_LEVEL, WM 1), which the others are mapped from.
SEQUENCE_CONTRAST = {
    "T1w": (0.0, CSF_LEVEL, GM_LEVEL, 1.0),
    "T2w": (0.0, 1.0, 0.55, 0.42),
    "FLAIR": (0.0, 0.12, 1.0, 0.78),
}
# Lesion levels per sequence: (oedema weight on the tissue below, oedema level, rim, necrotic core).
# T1w: a contrast-enhanced T1 (bright rim, dark core); T2w: fluid core and oedema bright; FLAIR:
# oedema brightest, the fluid core partly suppressed.
LESION_CONTRAST = {
    "T1w": (0.6, 0.45 * 1.15, 1.45, 0.35),
    "T2w": (0.3, 0.62, 0.75, 0.95),
    "FLAIR": (0.3, 1.05, 1.25, 0.45),
}


def sequence_contrast(t1: np.ndarray, sequence: str) -> np.ndarray:
  """A sequence's normal-tissue intensity from the T1 one (a copy): piecewise linear through the
  background / CSF / GM / WM levels of SEQUENCE_CONTRAST, the GM-WM segment extended above WM
  (the template's brightest white matter), never below 0. Partial-volume mixes of two adjacent
  tissues map to the same mix in every sequence."""
  if sequence == "T1w":
    return np.array(t1, np.float32)
  ref, levels = SEQUENCE_CONTRAST["T1w"], SEQUENCE_CONTRAST[sequence]
  out = np.interp(t1, ref, levels)
  slope = (levels[3] - levels[2]) / (ref[3] - ref[2])
  above = t1 > ref[3]
  out[above] = levels[3] + slope * (t1[above] - ref[3])
  return np.maximum(out, 0.0).astype(np.float32)
