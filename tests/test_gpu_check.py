"""tools/gpu_check.sh --dry-run: the one-shot GPU script runs end to end on CPU at tiny sizes (one
benchmark step, two steps of each train program, the sampler and decoder), so that it cannot rot
before a GPU is lent. Its merged JSON must hold every part's real numbers, and no part may fail."""

import json
import math
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_part(tmp_path):
  out = tmp_path / "gpu_check"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(["bash", os.path.join(REPO, "tools", "gpu_check.sh"), str(out), "--dry-run"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  logs = {p: (out / p).read_text()[-1500:] for p in os.listdir(out) if p.endswith(".log")} if out.exists() else {}
  assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:], logs)
  merged = json.loads((out / "gpu_check.json").read_text())
  assert merged["failed_parts"] == []
  parts = merged["parts"]
  steps = next(v for k, v in parts.items() if k.startswith("steps/"))
  names = [r["program"] for r in steps["programs"]]
  assert any(n.startswith("tokenizer") for n in names) and "ldm" in names, names
  for r in steps["programs"]:
    assert "error" not in r, r
    assert math.isfinite(r["loss"]) and r["loss"] > 0, r      # a real step ran on real arrays
    assert r["median_s"] is not None and r["median_s"] > 0, r
  sample = next(v for k, v in parts.items() if k.startswith("sample_2mm/"))
  kinds = {r["program"]: r for r in sample["programs"]}
  assert kinds and all("error" not in r and r["finite"] for r in kinds.values()), kinds
  assert all(r.get("volumes_per_s", 0) > 0 for r in kinds.values()), kinds
  bench = [v for k, v in parts.items() if k.startswith("bench")]
  assert bench, sorted(parts)
  md = (out / "gpu_check.md").read_text()
  assert "failed parts: none" in md and "| ldm |" in md
