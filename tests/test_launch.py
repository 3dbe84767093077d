"""launch/ scripts: syntax (bash -n) and the commands their dry-run modes print; nothing is started."""

import os
import shlex
import subprocess

import pytest

SCRIPTS = ("tpu_pod.sh", "slurm_gpu.sbatch", "local_multiprocess.sh")
MAIN_ARGS = ["--config", "configs/quickstart.py", "--workdir", "/shared/run 1", "--config.data.batch_size=8"]


def _run(repo_root, script, args=(), **env):
  base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "DRY_RUN", "PROCS", "ZONE"))}
  base.update(env)
  return subprocess.run(["bash", os.path.join(repo_root, "launch", script), *args], env=base, capture_output=True,
                        text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax(repo_root, script):
  proc = subprocess.run(["bash", "-n", os.path.join(repo_root, "launch", script)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


def _main_args(line: str) -> list[str]:
  words = shlex.split(line)
  return words[words.index("synthmri_jax.main") + 1:]


def test_tpu_pod_dry_run(repo_root):
  proc = _run(repo_root, "tpu_pod.sh", ["--setup", "--dry-run", "--", *MAIN_ARGS], TPU_NAME="pod", ZONE="us-central2-b",
              PROJECT="proj")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 4  # mkdir, scp, pip install, run
  for line in lines:
    assert line.startswith("gcloud compute tpus tpu-vm ") and "--worker=all" in line and "--zone=us-central2-b" in line
  assert " scp --recurse " in lines[1] and "jax\\[tpu\\]" in lines[2]
  # The remote command (one argument to --command) runs the entry point with the arguments intact.
  remote = [w for w in shlex.split(lines[3]) if w.startswith("--command=")][0][len("--command="):]
  assert _main_args(remote) == MAIN_ARGS
  # Without --setup only the run command.
  proc = _run(repo_root, "tpu_pod.sh", ["--", *MAIN_ARGS], TPU_NAME="pod", ZONE="z", DRY_RUN="1")
  assert proc.returncode == 0 and len(proc.stdout.strip().splitlines()) == 1


def test_tpu_pod_needs_name_and_zone(repo_root):
  proc = _run(repo_root, "tpu_pod.sh", ["--dry-run", "--", *MAIN_ARGS])
  assert proc.returncode == 2 and "TPU_NAME" in proc.stderr


@pytest.mark.parametrize("procs,tasks,device_ids", [("gpu", "8", None), ("node", "1", "0,1,2,3,4,5,6,7")])
def test_slurm_dry_run(repo_root, procs, tasks, device_ids):
  proc = _run(repo_root, "slurm_gpu.sbatch", MAIN_ARGS, DRY_RUN="1", PROCS=procs)
  assert proc.returncode == 0, proc.stderr
  cmd = shlex.split(proc.stdout.strip().splitlines()[-1])
  assert cmd[0] == "srun" and f"--ntasks-per-node={tasks}" in cmd and "--nodes=2" in cmd
  assert _main_args(proc.stdout.strip().splitlines()[-1]) == MAIN_ARGS
  assert (f"SYNTHMRI_LOCAL_DEVICE_IDS={device_ids}" in cmd) == (device_ids is not None)


def test_slurm_refuses_outside_an_allocation_and_mismatched_layout(repo_root):
  proc = _run(repo_root, "slurm_gpu.sbatch", MAIN_ARGS)
  assert proc.returncode == 2 and "not inside a SLURM allocation" in proc.stderr
  proc = _run(repo_root, "slurm_gpu.sbatch", MAIN_ARGS, SLURM_JOB_ID="1", SLURM_NTASKS_PER_NODE="8", PROCS="node")
  assert proc.returncode == 2 and "--ntasks-per-node=1" in proc.stderr


def test_local_multiprocess_dry_run(repo_root):
  proc = _run(repo_root, "local_multiprocess.sh", ["-n", "3", "-d", "4", "--port", "4321", "--dry-run", "--", *MAIN_ARGS])
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert shlex.split(lines[0]) == ["mkdir", "-p", "/shared/run 1/logs"]
  assert len(lines) == 4
  for i, line in enumerate(lines[1:]):
    words = shlex.split(line)
    assert words[:5] == ["SYNTHMRI_COORDINATOR=localhost:4321", "SYNTHMRI_NUM_PROCESSES=3", f"SYNTHMRI_PROCESS_ID={i}",
                         "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=4"]
    assert words[-3:] == [">", f"/shared/run 1/logs/process_{i}.log", "2>&1"]
    assert _main_args(line)[:len(MAIN_ARGS)] == MAIN_ARGS


def test_local_multiprocess_needs_arguments(repo_root):
  proc = _run(repo_root, "local_multiprocess.sh", ["-n", "2", "--dry-run"])
  assert proc.returncode == 2 and "no arguments" in proc.stderr
