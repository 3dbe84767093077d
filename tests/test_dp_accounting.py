"""DP-SGD accounting: the budget tool agrees with dp_accounting, calibration is safe, ε behaves."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from synthmri_jax.training import dp_accounting as dpa

N, B, EPOCHS, STEPS, DELTA = 96, 8, 50, 600, 1e-3


def reference_epsilon(noise: float, q: float, steps: int, delta: float, kind: str) -> float:
  """ε straight from dp_accounting, built independently of the module under test."""
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise)), steps)
  acc = pld.PLDAccountant() if kind == "pld" else rdp.RdpAccountant()
  return acc.compose(event).get_epsilon(delta)


def run_tool(repo_root: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
  """Runs tools/dp_budget.py from outside the repo with a clean PYTHONPATH (as from a fresh clone)."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  return subprocess.run([sys.executable, os.path.join(repo_root, "tools", "dp_budget.py"), *args],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def parse(stdout: str, key: str) -> float:
  m = re.search(rf"^{key}: ([0-9.eE+-]+)", stdout, re.MULTILINE)
  assert m, f"{key} not in output:\n{stdout}"
  return float(m.group(1))


def test_tool_epsilon_equals_dp_accounting(repo_root, tmp_path):
  out = run_tool(repo_root, tmp_path, "--dataset-size", str(N), "--batch-size", str(B),
                 "--epochs", str(EPOCHS), "--noise-multiplier", "1.0", "--delta", str(DELTA))
  assert out.returncode == 0, out.stderr
  assert re.search(r"steps:\s+600\b", out.stdout)
  assert re.search(r"sampling_probability:\s+0\.0833333\b", out.stdout)
  for kind in ("pld", "rdp"):
    assert parse(out.stdout, f"epsilon_{kind}") == pytest.approx(
        reference_epsilon(1.0, B / N, STEPS, DELTA, kind), abs=2e-6)


def test_tool_json_and_steps(repo_root, tmp_path):
  out = run_tool(repo_root, tmp_path, "--dataset-size", "1000", "--batch-size", "50",
                 "--steps", "200", "--noise-multiplier", "1.5", "--json")
  assert out.returncode == 0, out.stderr
  r = json.loads(out.stdout)
  assert r["delta"] == pytest.approx(1e-4)  # default 1/(10 n)
  assert r["steps"] == 200 and r["sampling_probability"] == pytest.approx(0.05)
  for kind in ("pld", "rdp"):
    assert r[f"epsilon_{kind}"] == pytest.approx(
        reference_epsilon(1.5, 0.05, 200, 1e-4, kind), rel=1e-12)


def test_tool_target_epsilon(repo_root, tmp_path):
  out = run_tool(repo_root, tmp_path, "--dataset-size", str(N), "--batch-size", str(B),
                 "--epochs", str(EPOCHS), "--target-epsilon", "8", "--delta", str(DELTA), "--json")
  assert out.returncode == 0, out.stderr
  r = json.loads(out.stdout)
  for kind in ("pld", "rdp"):
    eps = reference_epsilon(r[f"noise_multiplier_{kind}"], B / N, STEPS, DELTA, kind)
    assert 8.0 - 0.01 < eps <= 8.0
  assert r["noise_multiplier_pld"] < r["noise_multiplier_rdp"]  # PLD is tighter: less noise


def test_tool_rejects_batch_larger_than_dataset(repo_root, tmp_path):
  out = run_tool(repo_root, tmp_path, "--dataset-size", "10", "--batch-size", "20",
                 "--steps", "5", "--noise-multiplier", "1.0")
  assert out.returncode == 2 and "q = 2 > 1" in out.stderr


@pytest.mark.parametrize("kind,disc", [("rdp", None), ("pld", 1e-3)])
def test_calibration_round_trip(kind, disc):
  kw = {} if disc is None else {"pld_discretization": disc}
  for target in (2.0, 8.0):
    noise = dpa.calibrate_noise(target, B, N, STEPS, DELTA, kind, **kw)
    eps = dpa.epsilon(noise, B, N, STEPS, DELTA, kind, **kw)
    assert target - 1e-3 < eps <= target
    # Slightly less noise already overspends: the calibrated noise is (near) minimal.
    assert dpa.epsilon(noise * 0.99, B, N, STEPS, DELTA, kind, **kw) > target


def test_monotonicity_and_pld_tighter_than_rdp():
  for kind in ("pld", "rdp"):
    by_noise = [dpa.epsilon(s, B, N, 300, DELTA, kind, pld_discretization=1e-3)
                for s in (0.8, 1.0, 1.5, 3.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:]))
    by_steps = [dpa.epsilon(1.0, B, N, t, DELTA, kind, pld_discretization=1e-3)
                for t in (10, 100, 1000)]
    assert all(a < b for a, b in zip(by_steps, by_steps[1:]))
    by_batch = [dpa.epsilon(1.0, b, N, 100, DELTA, kind, pld_discretization=1e-3)
                for b in (4, 8, 16)]
    assert all(a < b for a, b in zip(by_batch, by_batch[1:]))
  for noise, steps in [(0.7, 100), (1.0, 600), (2.0, 1000)]:
    e_pld = dpa.epsilon(noise, B, N, steps, DELTA, "pld", pld_discretization=1e-3)
    e_rdp = dpa.epsilon(noise, B, N, steps, DELTA, "rdp")
    assert e_pld <= e_rdp * 1.001


def test_steps_and_defaults():
  assert dpa.steps_for_epochs(50, 8, 96) == 600
  assert dpa.steps_for_epochs(1.5, 8, 100) == 19  # 18.75 rounded up
  assert dpa.steps_for_epochs(0.01, 8, 96) == 1
  assert dpa.sampling_probability(8, 96) == pytest.approx(1 / 12)
  assert dpa.default_delta(200) == pytest.approx(5e-4)
  s = dpa.dp_sgd_summary(1.0, B, N, 100, DELTA)
  assert s["steps"] == 100 and s["epsilon_pld"] <= s["epsilon_rdp"]


def test_invalid_inputs():
  with pytest.raises(ValueError, match="q = 2 > 1"):
    dpa.epsilon(1.0, 20, 10, 5, 1e-3)
  with pytest.raises(ValueError, match="noise_multiplier"):
    dpa.epsilon(0.0, B, N, 5, 1e-3)
  with pytest.raises(ValueError, match="noise_multiplier"):
    dpa.epsilon(-1.0, B, N, 5, 1e-3)
  for delta in (0.0, 1.0, -1e-3):
    with pytest.raises(ValueError, match="delta"):
      dpa.epsilon(1.0, B, N, 5, delta)
  with pytest.raises(ValueError, match="steps"):
    dpa.epsilon(1.0, B, N, 0, 1e-3)
  with pytest.raises(ValueError, match="batch_size"):
    dpa.epsilon(1.0, 0, N, 5, 1e-3)
  with pytest.raises(ValueError, match="accountant"):
    dpa.epsilon(1.0, B, N, 5, 1e-3, accountant="gdp")
  with pytest.raises(ValueError, match="epochs"):
    dpa.steps_for_epochs(0, B, N)
  with pytest.raises(ValueError, match="target_epsilon"):
    dpa.calibrate_noise(0.0, B, N, 5, 1e-3)
  with pytest.warns(UserWarning, match="1/n"):
    dpa.epsilon(1.0, B, N, 5, 0.05, accountant="rdp")
