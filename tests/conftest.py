"""Shared test set-up. Tests run on one CPU device; tests that need several fake devices or
several processes start a subprocess with XLA_FLAGS set before jax is imported."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# The suite compiles hundreds of small XLA:CPU programs and runs each for a few steps, so LLVM's
# optimisation of their machine code is much of its time. At backend level 2 instead of XLA:CPU's
# default one dual-tokenizer test took 24 s instead of 46 (2-core CPU, 2026-12-08); level 0 took 19 s
# but ran the samplers' loops 37x slower. XLA's own HLO passes (fusion, SPMD partitioning) still
# run, so the programs under test are the pipeline's. Set before any test imports jax; a level the
# user set wins.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=2"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()


def fake_devices_flags(devices: int) -> str:
  """XLA_FLAGS for a test subprocess on `devices` fake CPU devices (with the suite's own flags)."""
  return f"--xla_force_host_platform_device_count={devices} {os.environ['XLA_FLAGS']}"


@pytest.fixture
def repo_root() -> str:
  return REPO


@pytest.fixture
def on_fake_devices():
  """run(child, out, timeout) -> (OUT.json, OUT.npz): `child` (Python source) runs in a subprocess on 8
  fake CPU devices with the repository and tests/ importable; it writes OUT.json and OUT.npz."""

  def run(child: str, out: str, timeout: int = 600):
    env = dict(os.environ, XLA_FLAGS=fake_devices_flags(8),
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    proc = subprocess.run([sys.executable, "-c", child, out], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out + ".json") as f:
      return json.load(f), np.load(out + ".npz")

  return run


# The files with the longest compiles, longest first (measured: tokenizer ~6 min, ldm ~4,
# privacy_ldm ~3, tstr ~2, unet ~2 on 2 cores). pytest-xdist (--dist loadfile, pyproject)
# hands whole files to its two workers in collection order; starting these first keeps one
# long file from running alone at the end.
_LONGEST_FIRST = ("test_tokenizer.py", "test_ldm.py", "test_privacy_ldm.py", "test_tstr.py", "test_unet.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
