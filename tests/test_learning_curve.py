"""tools/learning_curve.py: points in order, each stage run with that point's LDM budget, numbers
read from the stage outputs, a killed curve resumes without redoing finished points."""

import importlib.util
import os

import ml_collections
import pytest

from synthmri_jax import stages as stages_lib
from synthmri_jax.utils import io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("learning_curve", os.path.join(REPO, "tools", "learning_curve.py"))
lc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lc)


def _config():
  c = ml_collections.ConfigDict()
  c.tokenizer = ml_collections.ConfigDict(dict(variant="vqvae", phases="", phase_train=dict(main=dict(steps=7))))
  c.ldm = ml_collections.ConfigDict(dict(train=dict(steps=1, checkpoint_every=1)))
  return c


class FakeStages:
  """Stage functions that record their calls and write the files the real stages write, with
  numbers that depend on the LDM budget (TSTR rises with steps)."""

  def __init__(self, fail_at=None):
    self.calls, self.fail_at = [], fail_at

  def get(self, name):
    def run(config, workdir):
      steps = int(config.ldm.train.steps)
      self.calls.append((name, steps))
      if name == "evaluate" and steps == self.fail_at:
        raise KeyboardInterrupt
      j = lambda *p: os.path.join(workdir, *p)
      if name == "ldm":
        io.write_json_atomic(j("ldm", "ldm.json"), {"step": steps, "final_loss": 1.0 / steps})
      if name == "evaluate":
        tstr = 0.5 + steps / 1000
        arm = lambda a: {"seed_mean_scores": {"auc": a, "ci_low": a - 0.1, "ci_high": a + 0.05}}
        io.write_json_atomic(j("evaluation", "evaluation.json"), {
            "classification": {"arms": {"TRTR": arm(0.92), "TSTR": arm(tstr)}, "tstr_trtr_ratio": {"value": tstr / 0.92}},
            "fidelity": {"FD_trtr_classifier": {"real_test_vs_synthetic": {"value": 100.0 / steps}},
                         "ms_ssim_diversity": {"channels": {"T1w": {"synthetic": {"mean": 0.8}}}}}})
        io.write_json_atomic(j("evaluation", "privacy.json"), {"copy_fraction": 0.0,
                                                                "membership_inference": {"loss_attack": {"auc": 0.55}}})
        io.write_json_atomic(j("evaluation", "anatomy.json"), {"codec": {"measures": {"ventricle_ml": {"ratio": 0.87}}}})
    return run


def test_curve_runs_points_in_order_and_resumes(tmp_path, monkeypatch):
  fake = FakeStages(fail_at=300)
  monkeypatch.setattr(stages_lib, "get_stage", fake.get)
  work = str(tmp_path / "w")
  with pytest.raises(KeyboardInterrupt):
    lc.run_curve(_config(), work, [100, 300], None, "test machine", log=lambda m: None)
  state = io.read_json(os.path.join(work, lc.OUT, "curve.json"))
  assert [r["ldm_step"] for r in state["rows"]] == [100]          # the finished point was kept
  per_point = ["ldm", "sample", "classify", "evaluate"]
  assert fake.calls == [("prepare", 1), ("tokenizer", 1)] + [(s, 100) for s in per_point] + [(s, 300) for s in per_point]

  fake2 = FakeStages()
  monkeypatch.setattr(stages_lib, "get_stage", fake2.get)
  rows = lc.run_curve(_config(), work, [100, 300], None, "test machine", log=lambda m: None)
  assert fake2.calls == [("prepare", 1), ("tokenizer", 1)] + [(s, 300) for s in per_point]   # 100 not redone
  assert [r["ldm_step"] for r in rows] == [100, 300]
  r = rows[1]
  assert r["TSTR"]["auc"] == pytest.approx(0.8) and r["TSTR"]["ci_low"] == pytest.approx(0.7)
  assert r["tstr_trtr_ratio"] == pytest.approx(0.8 / 0.92) and r["copy_fraction"] == 0.0
  assert r["codec_ventricle_kept"] == 0.87 and r["tokenizer_trained_steps"] == 7
  assert rows[0]["wall_s"] <= rows[1]["wall_s"]
  md = open(os.path.join(work, lc.OUT, "curve.md")).read()
  assert "| 7 | 300 |" in md and "0.800 [0.700, 0.850]" in md and "0.920 [0.820, 0.970]" in md and "0.0 %" in md
  assert os.path.getsize(os.path.join(work, lc.OUT, "curve.png")) > 1000


def test_bad_budgets_are_rejected():
  with pytest.raises(SystemExit):
    lc.main(["--config", "x.py", "--workdir", "w", "--ldm_steps", "300,100"])
