"""The `sample` stage: a labelled synthetic cohort from the trained LDM, written as a BIDS-style folder.

    python -m synthmri_jax.main --config configs/quickstart.py --workdir W --config.stages=sample

  W/synthetic/sub-synthNNNN/anat/sub-synthNNNN_<SEQ>.nii.gz   one per sequence of the prepared cohort,
                                  clean header, the prepared grid's affine
  W/synthetic/participants.tsv    participant_id, label, age, sex, seed (+ any further attributes)
  W/synthetic/dataset_description.json   DatasetType 'derivative'; GeneratedBy names synthmri_jax, its
                                  version, the LDM checkpoint step and the config hash;
                                  SynthmriPreparedSpace declares the volumes to be on the prepared
                                  grid and scale, so the study reads them as written (no second
                                  normalisation; see evaluation.synthetic_cohort)
  W/synthetic_state.json          resume bookkeeping (outside the cohort folder, which stays pure BIDS)

Nothing of the training data is written: subject ids are sub-synthNNNN, no path appears, headers
are built fresh (nifti.write_nifti).

Determinism and resume: labels are allocated exactly to the requested fractions and shuffled with
sample.seed; subject i's remaining attributes and its diffusion noise come from (sample.seed, i)
only. Subjects are generated in fixed batches (same composition in every run, so a resumed run is
bitwise the straight one); a subject's files are written atomically, a batch whose files all
exist is skipped, and an interrupted run regenerates only the batches with missing files.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import pandas as pd

import synthmri_jax
from synthmri_jax import workdir as workdir_lib
from synthmri_jax.data import nifti
from synthmri_jax.data.cache import PREPARED_SPACE_KEY, load_prepared
from synthmri_jax.pipeline import prepare as prepare_stage
from synthmri_jax.generation.attributes import SEX_NAMES, plan_subjects
from synthmri_jax.generation.generator import load_trained
from synthmri_jax.latents import LatentCodec
from synthmri_jax.models import unet as unet_lib
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.utils import config_files, durations
from synthmri_jax.utils import io
from synthmri_jax.utils.errors import UserInputError

OUT_DIR = "synthetic"
STATE_FILE = "synthetic_state.json"
OUTPUT_VERSION = 2   # 2: clipped to the prepared scale and declared in its space (dataset_description.json)


def retry_seed(seed: int, attempt: int) -> int:
  """The seed of a subject's `attempt`-th regeneration (reject_copies): a function of both only."""
  return int(np.random.SeedSequence([int(seed), int(attempt), 0x5EED]).generate_state(1)[0])


def _pid(i: int, n: int) -> str:
  return f"sub-synth{i + 1:0{max(4, len(str(n)))}d}"


def _files(out_dir: str, pid: str, channels: Sequence[str]) -> list[str]:
  """A subject's files, one per channel (a sequence, or "mask": the lesion mask generated with them)."""
  return [os.path.join(out_dir, pid, "anat", f"{pid}_{seq}.nii.gz") for seq in channels]


MASK_SIDECAR = {"Description": "lesion mask generated with the image: the tokenizer's decoded mask channel > 0.5",
                "Labels": {"0": "background", "1": "lesion"}}


def participants_table(plan: Mapping[str, np.ndarray], labels: Sequence[str], attributes) -> pd.DataFrame:
  n = len(plan["seed"])
  cols: dict[str, Any] = {"participant_id": [_pid(i, n) for i in range(n)],
                          "label": [labels[int(y)] for y in plan[unet_lib.LABEL]]}
  for a in attributes:
    v = plan[a.name]
    if a.kind == "continuous":
      cols[a.name] = [f"{x:.1f}" if np.isfinite(x) else "n/a" for x in v]
    elif a.name == "sex":
      cols[a.name] = [SEX_NAMES[int(x)] if 0 <= x < 2 else "n/a" for x in v]
    else:
      cols[a.name] = [str(int(x)) if x >= 0 else "n/a" for x in v]
  for k in ("age", "sex"):   # the columns every consumer expects, even when not conditioned on
    cols.setdefault(k, ["n/a"] * n)
  cols["seed"] = [int(x) for x in plan["seed"]]
  order = ["participant_id", "label", "age", "sex", "seed"]
  return pd.DataFrame(cols)[order + [c for c in cols if c not in order]]


def _clear_outputs(out_dir: str) -> None:
  """Removes a previous run's cohort (only what this stage writes)."""
  if not os.path.isdir(out_dir):
    return
  for name in os.listdir(out_dir):
    path = os.path.join(out_dir, name)
    if name.startswith("sub-synth") and os.path.isdir(path):
      shutil.rmtree(path)
    elif name in ("participants.tsv", "dataset_description.json"):
      os.remove(path)


def _timing(t_sample: list[float], t_decode: list[float]) -> dict[str, Any]:
  """Median per-volume sampling / decoding seconds over the batches after the first (which compiles)."""
  steady_s = t_sample[1:] if len(t_sample) > 1 else t_sample
  steady_d = t_decode[1:] if len(t_decode) > 1 else t_decode
  return {"sampling_s_per_volume": float(np.median(steady_s)) if steady_s else None,
          "decoding_s_per_volume": float(np.median(steady_d)) if steady_d else None,
          "first_batch_s_per_volume": t_sample[0] + t_decode[0] if t_sample else None}


def _dataset_description(config, what: str, codec_description: str, step: int,
                         space: dict[str, Any]) -> dict[str, Any]:
  """The cohort's BIDS dataset_description.json: a derivative, with what generated it, declaring
  its volumes to be in the prepared cohort's space (the study then reads them as they are)."""
  return {
      "Name": "synthmri_jax synthetic cohort",
      "BIDSVersion": "1.9.0",
      "DatasetType": "derivative",
      "GeneratedBy": [{
          "Name": "synthmri_jax",
          "Version": synthmri_jax.__version__,
          "Description": (f"conditional 3D latent DDPM, {what}, classifier-free guidance "
                          f"{float(config.sample.guidance_scale):g}; decoded by the {codec_description}"),
          "CheckpointStep": int(step),
          "ConfigHash": workdir_lib.config_hash(config),
      }],
      PREPARED_SPACE_KEY: space,
  }


def _reject_copies(config, workdir: str, rows: np.ndarray, x: np.ndarray, generate: Callable[[np.ndarray], np.ndarray],
                   seeds: np.ndarray, pids: Sequence[str], reseeded: dict[int, int], rejections: dict[str, Any],
                   log: Callable[[str], None], images: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> np.ndarray:
  """Regenerates (new seed, same attributes) every subject the privacy copy check flags, until
  none is flagged or sample.reject_max_attempts is spent (then a UserInputError). Updates seeds,
  reseeded and rejections in place (the sample state records them for an exact resume). `images`
  takes a generated volume's image channels (the copy check sees no mask channel)."""
  from synthmri_jax.evaluation import privacy   # builds the privacy encoder on first use
  max_attempts = int(config.sample.reject_max_attempts)
  x = x.copy()
  todo = np.arange(len(rows))
  for attempt in range(1, max_attempts + 1):
    flags = privacy.flag_generated(config, workdir, images(x[todo]), log=log)
    hit = todo[np.asarray(flags["is_copy"], bool)]
    for j in hit:
      k = list(todo).index(j)
      rejections["count"] += 1
      rejections["subjects"].append({"participant_id": pids[rows[j]], "attempt": attempt,
                                     "score": float(flags["score"][k]), "measure": str(flags["measure"][k])})
      seeds[rows[j]] = retry_seed(int(seeds[rows[j]]), attempt)
      reseeded[int(rows[j])] = int(seeds[rows[j]])
    if not len(hit):
      return x
    log(f"sample: {len(hit)} generated subject(s) flagged as copies of training scans, regenerating "
        f"(attempt {attempt})")
    x[hit] = generate(rows[hit])
    todo = hit
  flags = privacy.flag_generated(config, workdir, images(x[todo]), log=log)
  if np.any(flags["is_copy"]):
    bad = [pids[rows[j]] for j in todo[np.asarray(flags["is_copy"], bool)]]
    raise UserInputError(f"sample.reject_copies: {bad} still flagged as copies after {max_attempts} "
                         "regenerations; the LDM memorises these subjects (train with DP, train.dp, or fewer steps)")
  return x


def run(config, workdir: str, *, codec: Optional[LatentCodec] = None,
        on_progress: Optional[Callable[[int, int], None]] = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """The pipeline stage (see the module docstring). Skips when the cohort is complete for this config.

  on_progress(done, total) is called after every batch's files are written.
  """
  if "sample" not in config:
    raise ValueError("config has no `sample` block; attach synthmri_jax.config_blocks.ldm.sample_config(...) "
                     "as config.sample")
  workdir = os.path.abspath(workdir)
  s = config.sample
  prepared = load_prepared(workdir)
  g = load_trained(config, workdir, codec)
  out_dir = os.path.join(workdir, OUT_DIR)
  state_path = os.path.join(workdir, STATE_FILE)
  key = workdir_lib.fingerprint({"version": OUTPUT_VERSION, "sample": config_files.plain(s), "ldm": g.meta["key"],
                                 "step": g.step, "codec": g.codec.key, "channels": prepared.channels,
                                 **({"mask_channel": True} if g.codec.mask_channel else {}),
                                 "affine": prepared.meta["affine"]})
  state = io.read_json(state_path) or {}
  is_main = jax.process_index() == 0
  if state.get("key") == key and state.get("complete"):
    log(f"sample: {out_dir} is complete for this config, skipping")
    return state
  if state.get("key") != key and is_main:
    _clear_outputs(out_dir)
    state = {"key": key, "complete": False}
    io.write_json_atomic(state_path, state)

  # the attribute model: fit on the public reference cohort when config.public is on (config_blocks/public.py)
  plan = plan_subjects(config, prepare_stage.fit_cohort(config, workdir, prepared), g.attributes, g.labels)
  n = len(plan["seed"])
  channels = prepared.channels + (["mask"] if g.codec.mask_channel else [])
  pids = [_pid(i, n) for i in range(n)]
  done = sum(all(os.path.exists(f) for f in _files(out_dir, p, channels)) for p in pids)
  what = (f"DDIM {int(s.steps)} steps, eta {float(s.eta):g}" if s.sampler == "ddim"
          else f"DDPM {g.schedule.num_train_timesteps} steps")
  gen = _Batches(g, s, plan, normalization=prepared.meta["normalization"])
  log(f"sample: {n} subjects ({done} already written) with {what}, guidance {float(s.guidance_scale):g}, "
      f"batch {gen.batch_size}, LDM step {g.step}")
  reseeded = {int(k): int(v) for k, v in state.get("reseeded", {}).items()}
  for i, seed in reseeded.items():   # subjects regenerated by reject_copies in an interrupted run
    plan["seed"][i] = seed
  rejections = dict(state.get("rejections", {"count": 0, "subjects": []}))
  reject = bool(s.get("reject_copies", False))

  t_sample, t_decode, per_batch = [], [], []
  t_start = time.time()
  generated = 0
  for start in range(0, n, gen.batch_size):
    idx = np.arange(start, min(n, start + gen.batch_size))
    missing = [i for i in idx if not all(os.path.exists(f) for f in _files(out_dir, pids[i], channels))]
    if not missing:
      continue
    t0 = time.time()
    gen.clock.update(sample=0.0, decode=0.0)
    x = gen(idx)
    if reject:
      # regenerations count in the batch's sampling / decoding time
      x = _reject_copies(config, workdir, idx, x, gen, plan["seed"], pids, reseeded, rejections, log,
                         images=g.codec.images)
    if is_main:
      images, masks = g.codec.images(x), g.codec.masks(x)
      for j, i in enumerate(idx):
        if i in missing:
          files = _files(out_dir, pids[i], channels)
          if masks is not None:     # the mask first: the images mark the subject as written
            io.write_json_atomic(files[-1].replace(".nii.gz", ".json"), MASK_SIDECAR)
            nifti.write_nifti(files.pop(), masks[j], prepared.affine)
          for f, ch in zip(files, range(images.shape[-1])):
            nifti.write_nifti(f, images[j, ..., ch], prepared.affine)
    t_sample.append(gen.clock["sample"] / len(idx))
    t_decode.append(gen.clock["decode"] / len(idx))
    per_batch.append((time.time() - t0) / len(idx))
    generated += len(missing)
    done += len(missing)
    if reject and is_main:
      state.update(reseeded={str(k): v for k, v in reseeded.items()}, rejections=rejections)
      io.write_json_atomic(state_path, state)
    steady = per_batch[1:] if len(per_batch) > 1 else per_batch
    log(f"sample: {done}/{n} subjects | {per_batch[-1]:.2f} s/volume | "
        f"ETA {durations.short((n - done) * float(np.mean(steady)))}")
    if on_progress is not None:
      on_progress(done, n)

  timing = _timing(t_sample, t_decode)
  state = {"key": key, "complete": True, "num_subjects": n, "checkpoint_step": int(g.step),
           "sampler": str(s.sampler), "steps": int(s.steps) if s.sampler == "ddim" else g.schedule.num_train_timesteps,
           "generated_this_run": generated, "seconds": round(time.time() - t_start, 1), **timing,
           "reject_copies": reject, "rejections": rejections, "reseeded": {str(k): v for k, v in reseeded.items()},
           "attributes_fit_on": prepare_stage.fit_on(config)}
  table = participants_table(plan, g.labels, g.attributes)
  if g.codec.mask_channel:
    table["mask_path"] = [f"{p}/anat/{p}_mask.nii.gz" for p in table["participant_id"]]
  _finish(out_dir, state_path, state, table,
          _dataset_description(config, what, g.codec.description, g.step, prepared.space()), is_main, log)
  return state


class _Batches:
  """rows -> their volumes (B, X, Y, Z, C) on the prepared scale: sampling then decoding, timed."""

  def __init__(self, g, s, plan: Mapping[str, np.ndarray], normalization: str):
    self.g, self.plan, self.normalization = g, plan, normalization
    self.cond = {k: plan[k] for k in g.model.conditioning.names}
    self.gen, self.decode = g.generator(s), g.decoder()
    self.batch_size = self.gen.batch_size
    self.clock = {"sample": 0.0, "decode": 0.0}

  def __call__(self, rows: np.ndarray) -> np.ndarray:
    t = time.time()
    seeds, c = self.gen.pad(rows, self.plan["seed"], self.cond)
    z = jax.block_until_ready(self.gen.batch(self.g.params, seeds, c))
    self.clock["sample"] += time.time() - t
    t = time.time()
    with jax.set_mesh(self.g.mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      x = np.asarray(jax.device_get(self.decode(self.g.codec.variables, z, np.asarray(c[unet_lib.LABEL], np.int32))),
                     np.float32)[: len(rows)]
    x = nifti.on_scale(x, self.normalization)   # the prepared scans' range
    self.clock["decode"] += time.time() - t
    return x


def _finish(out_dir: str, state_path: str, state: dict[str, Any], table: pd.DataFrame,
            description: dict[str, Any], is_main: bool, log: Callable[[str], None]) -> None:
  """Writes the cohort's table and description, then the complete state (last: it marks the end)."""
  if is_main:
    io.write_text_atomic(os.path.join(out_dir, "participants.tsv"), table.to_csv(sep="\t", index=False))
    io.write_json_atomic(os.path.join(out_dir, "dataset_description.json"), description)
    io.write_json_atomic(state_path, state)
  counts = table["label"].value_counts().to_dict()
  if state["sampling_s_per_volume"] is not None:
    log(f"sample: wrote {state['num_subjects']} subjects to {out_dir} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); "
        f"{state['sampling_s_per_volume']:.3f} s/volume sampling + {state['decoding_s_per_volume']:.3f} s/volume decoding")
  else:
    log(f"sample: {out_dir} complete ({state['num_subjects']} subjects)")

