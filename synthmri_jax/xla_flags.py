"""XLA flags that must be in XLA_FLAGS before jax initialises its backend.

Import and call `configure_cpu_flags()` at the very top of an entry point, before anything
imports jax. It imports nothing heavy itself.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings

# XLA:CPU's default YNNPACK fusions turn the attention softmax backward (2 x 2016 x 2016)
# into a 75-320 ms op per attention layer; limiting YNNPACK to single dots / convolutions /
# elementwise ops removes that and gave the LDM U-Net train step 1.1-1.25 -> 1.7 samples/s
# on the 2-core CPU (BENCHMARKS.md, optimisations table). tools/bench_conv.py --compare-flags
# measures its effect on the conv formulations of synthmri_jax.models.conv.
YNN_FLAG_NAME = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FLAG = YNN_FLAG_NAME + "=individual_dot,individual_convolution,eltwise"
OPT_OUT_ENV = "SYNTHMRI_NO_XLA_CPU_FLAGS"

_ACCELERATOR_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin",
                        "jax_rocm60_plugin", "libtpu")


def cpu_backend_expected(env=None) -> bool:
  """Whether jax will run on CPU: JAX_PLATFORMS asks for cpu, or no accelerator plugin is installed.

  Decided without importing jax, which would fix XLA_FLAGS too early.
  """
  env = os.environ if env is None else env
  platforms = env.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0] == "cpu"
  return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def configure_cpu_flags(env=None) -> bool:
  """Appends YNN_FLAG to XLA_FLAGS when jax will run on CPU; returns whether it did.

  Leaves XLA_FLAGS alone if the user already chose a YNN fusion type, if
  SYNTHMRI_NO_XLA_CPU_FLAGS=1, or if an accelerator backend is expected. Warns (and does
  nothing) if jax's backends are already initialised: the flag would have no effect.
  """
  env = os.environ if env is None else env
  if env.get(OPT_OUT_ENV, "") not in ("", "0"):
    return False
  flags = env.get("XLA_FLAGS", "")
  if YNN_FLAG_NAME in flags or not cpu_backend_expected(env):
    return False
  bridge = sys.modules.get("jax._src.xla_bridge")
  if env is os.environ and bridge is not None and getattr(bridge, "_backends", None):
    warnings.warn("configure_cpu_flags() ran after jax initialised its backend; XLA_FLAGS unchanged. "
                  "Call it at the very top of the entry point.", stacklevel=2)
    return False
  env["XLA_FLAGS"] = (flags + " " + YNN_FLAG).strip()
  return True


def enable_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache in `directory`, unless the process already has one.

  Every run of the study compiles the same train / eval / predict programs (same shapes, same
  config; only the data and the seed, which is state, differ), and on CPU compiling is most of
  a small run's time (measured: 61 s per 60-step toy run without the cache, 7 s with it). The
  cache is keyed by the program, so a hit is exactly what a fresh compile would produce.
  JAX reads the setting at its first compile that has a directory set, so this works even after
  earlier compiles without one; a directory already set (by the user or the entry point) wins.
  """
  import jax   # this module is imported before jax is configured; only this function needs it

  if jax.config.jax_compilation_cache_dir:
    return
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
