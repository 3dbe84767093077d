"""Exact continuation: 2N steps straight == N steps, new process, restore, N more steps.

Covers params, optimizer state (with gradient accumulation), EMA, rng and the grain iterator
position (each step logs the sum of its batch's example indices), and an async save taken
while the straight run kept training.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np

import toy_task as tt
from synthmri_jax.training import trainer

N = 6
TRAIN = dict(steps=2 * N, grad_accum=2, ema_decay=0.9, warmup_steps=2, checkpoint_every=N, log_every=1)

_CHILD = r"""
import json, shutil, sys
import jax, numpy as np
import toy_task as tt
from synthmri_jax.training import trainer

straight, half, copy, out = sys.argv[1:5]
train = json.loads(sys.argv[5])
data = tt.make_data(64)
result = {}
for name, workdir in (("half", half), ("copy", copy)):
  if name == "copy":  # the straight run's async save at step N, taken while it kept training
    shutil.copytree(straight, copy)
    shutil.rmtree(f"{copy}/checkpoints/{train['steps']}")
  logs = []
  state = trainer.train(tt.ToyTask(), tt.config(**train), workdir, tt.make_iter(data, 8),
                        on_log=lambda s, m: logs.append([s, m["loss"], m["index_sum"]]))
  result[name] = logs
  np.savez(f"{out}_{name}.npz", *[np.asarray(x) for x in jax.tree.leaves(jax.device_get((state.params, state.ema_params)))])
with open(out + ".json", "w") as f:
  json.dump(result, f)
"""


def test_resume_in_new_process_is_exact(tmp_path, repo_root):
  data = tt.make_data(64)
  straight, half = str(tmp_path / "straight"), str(tmp_path / "half")
  logs_a, logs_b = [], []
  state_a = trainer.train(tt.ToyTask(), tt.config(**TRAIN), straight, tt.make_iter(data, 8),
                          on_log=lambda s, m: logs_a.append([s, m["loss"], m["index_sum"]]))
  trainer.train(tt.ToyTask(), tt.config(**{**TRAIN, "steps": N}), half, tt.make_iter(data, 8),
                on_log=lambda s, m: logs_b.append([s, m["loss"], m["index_sum"]]))
  assert [r[0] for r in logs_a] == list(range(1, 2 * N + 1))
  assert logs_b == logs_a[:N]  # same seed, same data: the first half is identical
  assert sorted(os.listdir(os.path.join(straight, "checkpoints")), key=int) == [str(N), str(2 * N)]

  out = str(tmp_path / "child")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo_root, os.path.join(repo_root, "tests")]))
  proc = subprocess.run([sys.executable, "-c", _CHILD, straight, half, str(tmp_path / "copy"), out, json.dumps(TRAIN)],
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "resumed from" in proc.stdout and f"step {N}" in proc.stdout, proc.stdout
  with open(out + ".json") as f:
    child = json.load(f)
  final_a = [np.asarray(x) for x in jax.tree.leaves(jax.device_get((state_a.params, state_a.ema_params)))]
  for name in ("half", "copy"):
    # Bitwise: same losses, same batches (index sums), same final params and EMA.
    assert child[name] == logs_a[N:], (name, child[name], logs_a[N:])
    with np.load(f"{out}_{name}.npz") as z:
      got = [z[f"arr_{i}"] for i in range(len(z.files))]
    assert len(got) == len(final_a)
    for a, b in zip(final_a, got):
      assert a.tobytes() == b.tobytes(), name
