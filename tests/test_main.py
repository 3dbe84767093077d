"""The entry point: bad config keys and stages are one clear error before any work starts."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "synthmri_jax.main", "--config", "configs/quickstart.py", *args],
                        cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override,needle", [
    ("--config.data.nope=1", "unknown config key"),
    ("--config.nope=1", "unknown config key"),
])
def test_unknown_config_key_is_one_line_before_any_work(tmp_path, override, needle):
  workdir = tmp_path / "run"
  r = _main("--workdir", str(workdir), override)
  assert r.returncode != 0
  assert needle in r.stderr and override.split("=")[0] in r.stderr
  assert "Traceback" not in r.stderr
  assert not workdir.exists()


def test_unknown_or_unavailable_stage_is_an_error_before_any_work(tmp_path):
  workdir = tmp_path / "run"
  r = _main("--workdir", str(workdir), "--config.stages=prepare,bogus")
  assert r.returncode != 0 and "unknown stage(s) ['bogus']" in r.stderr
  assert not workdir.exists()


def test_bad_value_type_is_a_flag_error(tmp_path):
  r = _main("--workdir", str(tmp_path / "run"), "--config.data.spacing_mm=abc")
  assert r.returncode != 0 and "could not convert string to float" in r.stderr


def test_bad_cohort_lists_every_problem_without_traceback(tmp_path):
  table = tmp_path / "cohort.tsv"
  (tmp_path / "x.nii.gz").write_text("not a nifti")
  table.write_text("participant_id\tpath\tlabel\tage\tsex\n"
                   "s1\tmissing.nii.gz\tCN\t70\tM\n"
                   "s2\tx.nii.gz\tXX\t70\tF\n")
  workdir = tmp_path / "run"
  r = _main("--workdir", str(workdir), f"--config.data.cohort_tsv={table}")
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert "FATAL stage prepare" in r.stderr
  assert "missing.nii.gz: file not found" in r.stderr
  assert "unknown label 'XX'" in r.stderr and "corrupt" in r.stderr
  # The run's bookkeeping was written, nothing was cached.
  assert json.load(open(workdir / "config.json"))["config"]["data"]["cohort_tsv"] == str(table)
  assert not (workdir / "data" / "prepared.json").exists() or not json.load(
      open(workdir / "data" / "prepared.json")).get("complete")
