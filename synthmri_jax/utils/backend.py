"""The platform the programs being built are for: jax's default backend, unless a tool compiling
ahead of time for another platform (tools/aot_compile.py) says otherwise with `compiling_for`.

Every choice made by backend (the 3D convolution's formulation, the fused attention kernel, DP-SGD's
micro-batching) reads `target()`, so a TPU program built on a CPU host is the program a TPU run
would build, not the CPU one."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("synthmri_target_platform", default=None)


def target() -> str:
  """'cpu', 'gpu' or 'tpu': the platform set by `compiling_for`, else jax.default_backend()."""
  t = _TARGET.get()
  return t if t is not None else jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
  """Within the block, models and steps are traced as for `platform` ('cuda' / 'rocm' count as 'gpu')."""
  p = {"cuda": "gpu", "rocm": "gpu"}.get(str(platform).lower(), str(platform).lower())
  if p not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; choose from {PLATFORMS}")
  token = _TARGET.set(p)
  try:
    yield
  finally:
    _TARGET.reset(token)
