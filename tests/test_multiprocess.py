"""Multi-host training on one machine: 2 CPU processes x 2 fake devices == 1 process x 4 devices.

Each process joins through synthmri_jax.training.distributed.initialize (explicit coordinator on
localhost, read from the SYNTHMRI_* environment as a launcher would set it), reads its own grain
shard (loader.train_iterator with process_index / process_count) and runs the shared trainer on a
('data'=4) mesh spanning both processes. The first pair trains N steps and saves an orbax
checkpoint (train state + one iterator state per process); a second pair resumes it and trains N
more. Every logged loss must equal the single-process run's within 1e-6, the per-step batches
must be the same examples (index sums), and the final parameters must agree.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import fake_devices_flags

N = 3  # steps per phase
TIMEOUT = 240

_CHILD = r"""
import json, sys
from synthmri_jax.training import distributed
info = distributed.initialize()          # before any other jax use, as main.py does
import jax, numpy as np
import toy_task as tt
from synthmri_jax.data import loader
from synthmri_jax.training import trainer

workdir, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
data = tt.make_data(64)
it = loader.train_iterator(loader.ArraySource(data), 8, seed=0,
                           process_index=jax.process_index(), process_count=jax.process_count())
logs = []
# constant lr after warmup: the first pair stops at N of the 2N steps, and a cosine would depend on its total
cfg = tt.config(steps=steps, checkpoint_every=%(n)d, log_every=1, warmup_steps=1, schedule="constant", ema_decay=0.5)
state = trainer.train(tt.ToyTask(), cfg, workdir, it, on_log=lambda s, m: logs.append([s, m["loss"], m["index_sum"]]))
leaves = [np.asarray(x) for x in jax.tree.leaves(jax.device_get((state.params, state.ema_params, state.model_state)))]
if jax.process_index() == 0:
  np.savez(out + ".npz", *leaves)
  with open(out + ".json", "w") as f:
    json.dump({"logs": logs, "info": [info.method, info.process_count, info.local_devices, info.global_devices]}, f)
""" % {"n": N}


def free_port() -> int:
  """A localhost port nobody listens on (portpicker when installed; else the kernel's pick for port 0)."""
  try:
    import portpicker
    return int(portpicker.pick_unused_port())
  except ImportError:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      s.bind(("127.0.0.1", 0))
      return int(s.getsockname()[1])


def _env(repo_root: str, devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNTHMRI_", "SLURM_", "OMPI_"))}
  env.update(XLA_FLAGS=fake_devices_flags(devices), JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([repo_root, os.path.join(repo_root, "tests")]), **extra)
  return env


def _start(repo_root, workdir, steps, out, devices, **extra):
  return subprocess.Popen([sys.executable, "-c", _CHILD, workdir, str(steps), out], env=_env(repo_root, devices, **extra),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(procs):
  outs = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=TIMEOUT)
      outs.append((p.returncode, stdout, stderr))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (rc, stdout, stderr) in enumerate(outs):
    assert rc == 0, f"process {i} exited {rc}\n{stdout[-2000:]}\n{stderr[-4000:]}"
  return outs


def _pair(repo_root, workdir, steps, out):
  port = free_port()
  procs = [_start(repo_root, workdir, steps, out, 2, SYNTHMRI_COORDINATOR=f"localhost:{port}",
                  SYNTHMRI_NUM_PROCESSES="2", SYNTHMRI_PROCESS_ID=str(i)) for i in range(2)]
  return procs


def _load(out):
  with open(out + ".json") as f:
    r = json.load(f)
  with np.load(out + ".npz") as z:
    leaves = [z[f"arr_{i}"] for i in range(len(z.files))]
  return r, leaves


@pytest.mark.slow
def test_two_processes_match_one_process_through_save_and_restore(tmp_path, repo_root):
  ref_out, out1, out2 = (str(tmp_path / n) for n in ("ref", "pair1", "pair2"))
  multi_dir = str(tmp_path / "multi")
  # The reference (one process, 4 fake devices, 2N steps straight) runs beside the first pair.
  ref = _start(repo_root, str(tmp_path / "single"), 2 * N, ref_out, 4)
  first = _pair(repo_root, multi_dir, N, out1)
  outs = _wait(first + [ref])
  assert "resumed" not in outs[0][1]
  outs = _wait(_pair(repo_root, multi_dir, 2 * N, out2))  # new processes: restore step N, continue to 2N
  assert "resumed from" in outs[0][1] and f"step {N}" in outs[0][1], outs[0][1]

  ref_r, ref_leaves = _load(ref_out)
  r1, _ = _load(out1)
  r2, leaves2 = _load(out2)
  assert ref_r["info"] == ["single", 1, 4, 4]
  assert r1["info"] == r2["info"] == ["explicit", 2, 2, 4]
  # The checkpoint holds one grain iterator state per process.
  data_dir = tmp_path / "multi" / "checkpoints" / str(N) / "data"
  assert len([f for f in os.listdir(data_dir) if "process" in f]) == 2, os.listdir(data_dir)

  multi = r1["logs"] + r2["logs"]
  assert [row[0] for row in multi] == [row[0] for row in ref_r["logs"]] == list(range(1, 2 * N + 1))
  for (step, loss, idx), (_, ref_loss, ref_idx) in zip(multi, ref_r["logs"]):
    assert idx == ref_idx, step                            # the same examples made up each global batch
    assert abs(loss - ref_loss) <= 1e-6 * max(1.0, abs(ref_loss)), (step, loss, ref_loss)
  assert len(leaves2) == len(ref_leaves)
  for a, b in zip(leaves2, ref_leaves):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ distributed.plan (fast, no processes)

def test_plan_single_process_by_default_and_explicit_from_env():
  import ml_collections
  from synthmri_jax.training import distributed as d
  assert d.plan(None, {}).method == "single"
  p = d.plan(None, {"SYNTHMRI_COORDINATOR": "10.0.0.1:1234", "SYNTHMRI_NUM_PROCESSES": "4", "SYNTHMRI_PROCESS_ID": "3"})
  assert p.method == "explicit" and p.kwargs["coordinator_address"] == "10.0.0.1:1234"
  assert (p.kwargs["num_processes"], p.kwargs["process_id"]) == (4, 3)
  # Config wins where set; the per-host process id still comes from the environment.
  cfg = ml_collections.ConfigDict({"distributed": {"coordinator": "host0:99", "num_processes": 2,
                                                   "local_device_ids": "0,1"}})
  p = d.plan(cfg, {"SYNTHMRI_COORDINATOR": "ignored:1", "SYNTHMRI_PROCESS_ID": "1"})
  assert p.kwargs["coordinator_address"] == "host0:99" and p.kwargs["process_id"] == 1
  assert p.kwargs["local_device_ids"] == [0, 1]
  assert d.plan(cfg, {"SYNTHMRI_PROCESS_ID": "0", "SYNTHMRI_DISTRIBUTED": "0"}).method == "single"
  assert d.plan(None, {"SYNTHMRI_COORDINATOR": "h:1", "SYNTHMRI_NUM_PROCESSES": "1"}).method == "single"


def test_plan_detects_clusters_and_rejects_incomplete_settings():
  import ml_collections
  from synthmri_jax.training import distributed as d
  slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="n[1-2]", SLURM_NTASKS="16", SLURM_PROCID="5", SLURM_LOCALID="5")
  assert d.plan(None, slurm).method == "slurm"
  assert d.plan(None, dict(slurm, SLURM_NTASKS="1")).method == "single"     # one task: nothing to join
  assert d.plan(None, {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}).method == "ompi"
  forced = ml_collections.ConfigDict({"distributed": {"cluster_detection_method": "mpi4py"}})
  assert d.plan(forced, {}).kwargs["cluster_detection_method"] == "mpi4py"
  with pytest.raises(ValueError, match="number of processes"):
    d.plan(None, {"SYNTHMRI_COORDINATOR": "h:1"})
  with pytest.raises(ValueError, match="process id"):
    d.plan(None, {"SYNTHMRI_COORDINATOR": "h:1", "SYNTHMRI_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match="host:port"):
    d.plan(None, {"SYNTHMRI_COORDINATOR": "h", "SYNTHMRI_NUM_PROCESSES": "2", "SYNTHMRI_PROCESS_ID": "0"})
  with pytest.raises(ValueError, match="unknown config.distributed"):
    d.plan(ml_collections.ConfigDict({"distributed": {"coordinater": "h:1"}}), {})
  # A single process needs no coordinator: initialize is a no-op that reports who we are.
  info = d.initialize(None, {})
  assert (info.method, info.process_index, info.process_count) == ("single", 0, 1)
