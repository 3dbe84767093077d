"""The entry point: every misuse (flags, config keys and values, config files, stage order) is one
clear error before any work starts, never a traceback."""

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
  assert "Traceback" not in r.stderr and "usage:" in r.stderr


def test_no_arguments_and_bad_config_files_print_the_usage(tmp_path):
  bare = subprocess.run([sys.executable, "-m", "synthmri_jax.main"], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n")
  broken = subprocess.run([sys.executable, "-m", "synthmri_jax.main", "--config", str(bad), "--workdir",
                           str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=300)
  absent = subprocess.run([sys.executable, "-m", "synthmri_jax.main", f"--config={tmp_path}/none.py", "--workdir",
                           str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=300)
  for r, needle in ((bare, "--config must have a value"), (broken, f"{bad} line 1"), (absent, "no such config file")):
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert needle in r.stderr and "usage: python -m synthmri_jax.main" in r.stderr, r.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stages,extra,missing,command", [
    ("evaluate", (), "prepare", "prepare,tokenizer,ldm,sample,evaluate"),
    ("sample,report", (), "prepare", "prepare,tokenizer,ldm,sample,report"),
    ("evaluate", ("--config.evaluate.synthetic_dir=/elsewhere",), "prepare", "prepare,evaluate"),
])
def test_a_stage_without_its_inputs_names_the_stage_to_run(tmp_path, stages, extra, missing, command):
  r = _main("--workdir", str(tmp_path / "run"), f"--config.stages={stages}", *extra)
  assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
  assert f"reads the '{missing}' stage's outputs" in r.stderr and f"--config.stages={command}" in r.stderr, r.stderr


def test_check_inputs_accepts_completed_stages(tmp_path):
  from synthmri_jax import stages, workdir as W
  from synthmri_jax.utils.errors import UserInputError
  import ml_collections
  config = ml_collections.ConfigDict({"evaluate": {"synthetic_dir": ""}})
  with pytest.raises(UserInputError, match="'tokenizer' stage"):
    stages.check_inputs(["prepare", "ldm"], config, str(tmp_path))
  stages.check_inputs(["prepare", "tokenizer", "ldm"], config, str(tmp_path))     # made in this run
  for stage in ("prepare", "tokenizer", "ldm", "sample"):
    os.makedirs(os.path.dirname(W.stage_output(str(tmp_path), stage)), exist_ok=True)
    open(W.stage_output(str(tmp_path), stage), "w").close()
  stages.check_inputs(["evaluate", "report"], config, str(tmp_path))               # made by an earlier run


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
