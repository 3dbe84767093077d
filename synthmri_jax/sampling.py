"""The `sample` stage: a labelled synthetic cohort from the trained LDM, written as a BIDS-style folder.

    python -m synthmri_jax.main --config configs/quickstart.py --workdir W --config.stages=sample

  W/synthetic/sub-synthNNNN/anat/sub-synthNNNN_<SEQ>.nii.gz   one per sequence of the prepared cohort,
                                  clean header, the prepared grid's affine
  W/synthetic/participants.tsv    participant_id, label, age, sex, seed (+ any further attributes)
  W/synthetic/dataset_description.json   DatasetType 'derivative'; GeneratedBy names synthmri_jax, its
                                  version, the LDM checkpoint step and the config hash
  W/synthetic_state.json          resume bookkeeping (outside the cohort folder, which stays pure BIDS)

Nothing of the training data is written: subject ids are sub-synthNNNN, no path appears, headers
are built fresh (nifti.write_nifti).

Attributes of the subjects (when the config does not fix them) come from a TABULAR MODEL FIT ON
THE TRAINING SPLIT, `AttributeModel`, and the image is generated conditioned on them; they are not
co-generated with the image by the diffusion model. Why:
- the cohorts this serves have tens to a few thousand subjects; an explicit density -- label
  frequencies, per-label categorical sex, per-label Gaussian KDE (or normal) for age -- matches
  the marginals exactly and with no training, where a diffusion model's handful of scalar outputs
  would be learned last and least reliably by a network sized for the image;
- the user's requests ("50 % AD", "ages 60-90", "half female") become exact operations on that
  density (allocation, truncation, replacement) instead of guidance tricks on a joint sampler;
- the image-attribute relation is not given up: p(attributes) p(image | attributes) is the same
  joint distribution, and the image model receives the attributes through the same
  cross-attention tokens (models/unet.py), so e.g. ventricle size follows the sampled age (tested);
- per-attribute null tokens still let the image model leave any attribute unspecified.
Privacy note: a KDE sample is a training subject's age plus Gaussian noise of the Scott
bandwidth; sample.age_model='gaussian' uses only each label's mean and std.

Determinism and resume: labels are allocated exactly to the requested fractions and shuffled with
sample.seed; subject i's remaining attributes and its diffusion noise come from (sample.seed, i)
only. Subjects are generated in fixed batches (same composition in every run, so a resumed run is
bitwise the straight one); a subject's files are written atomically, a batch whose files all
exist is skipped, and an interrupted run regenerates only the batches with missing files.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pandas as pd

import synthmri_jax
from synthmri_jax import workdir as workdir_lib
from synthmri_jax.data import nifti
from synthmri_jax.data.cache import load_prepared
from synthmri_jax.diffusion.samplers import cfg_model_fn, ddim_sample, ddpm_sample
from synthmri_jax.diffusion.schedules import NoiseSchedule
from synthmri_jax.models import unet as unet_lib
from synthmri_jax.training import checkpoint as ckpt_lib
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.training.tasks import ldm as ldm_lib
from synthmri_jax.utils import durations
from synthmri_jax.utils import io
from synthmri_jax.utils.errors import UserInputError

OUT_DIR = "synthetic"
STATE_FILE = "synthetic_state.json"
SEX_NAMES = ("F", "M")
AGE_MODELS = ("kde", "gaussian")
SAMPLERS = ("ddim", "ddpm")


# ------------------------------------------------------------------------------ attributes


def parse_fractions(spec: str, names: Sequence[str], what: str) -> np.ndarray | None:
  """'AD:0.5,CN:0.5' -> fractions over `names` (normalised; unnamed entries 0); '' -> None."""
  spec = str(spec or "").strip()
  if not spec:
    return None
  out = np.zeros(len(names), np.float64)
  for item in [s.strip() for s in spec.split(",") if s.strip()]:
    name, _, value = item.partition(":")
    name = name.strip()
    if name not in names:
      raise UserInputError(f"sample.{what}: unknown name {name!r}; known: {', '.join(names)}")
    try:
      out[names.index(name)] = float(value)
    except ValueError:
      raise UserInputError(f"sample.{what}: {item!r} is not NAME:FRACTION") from None
  if np.any(out < 0) or out.sum() <= 0:
    raise UserInputError(f"sample.{what}: fractions must be >= 0 and not all 0, got {spec!r}")
  return out / out.sum()


def allocate(n: int, fractions: np.ndarray) -> np.ndarray:
  """Counts summing to n closest to n * fractions (largest remainder)."""
  raw = n * np.asarray(fractions, np.float64)
  counts = np.floor(raw).astype(int)
  for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
    counts[i] += 1
  return counts


@dataclasses.dataclass
class AttributeModel:
  """p(label) p(attribute | label) for each attribute, fit on the training split (see the module docstring).

  Continuous: per-label Gaussian KDE with Scott's bandwidth ('kde') or a normal ('gaussian');
  categorical: per-label frequencies. A label with no observed value of an attribute uses the
  pooled values; an attribute never observed is left missing (its null token).
  """

  labels: list[str]
  label_probs: np.ndarray
  attributes: tuple[unet_lib.Attribute, ...]
  values: dict[str, list[np.ndarray]]        # continuous: finite values per label
  probs: dict[str, np.ndarray]               # categorical: (num_labels, num_classes); NaN rows = unobserved
  age_model: str = "kde"

  @classmethod
  def fit(cls, labels: Sequence[str], conds: Mapping[str, np.ndarray], attributes: Sequence[unet_lib.Attribute],
          age_model: str = "kde") -> AttributeModel:
    if age_model not in AGE_MODELS:
      raise UserInputError(f"sample.age_model must be one of {AGE_MODELS}, got {age_model!r}")
    y = np.asarray(conds[unet_lib.LABEL])
    k = len(labels)
    label_probs = np.bincount(y, minlength=k).astype(np.float64)
    label_probs /= label_probs.sum()
    values, probs = {}, {}
    for a in attributes:
      v = np.asarray(conds[a.name])
      if a.kind == "continuous":
        pooled = v[np.isfinite(v)].astype(np.float64)
        per = [v[(y == c) & np.isfinite(v)].astype(np.float64) for c in range(k)]
        values[a.name] = [p if p.size else pooled for p in per]
      else:
        table = np.full((k, a.num_classes), np.nan)
        pooled = np.bincount(v[v >= 0], minlength=a.num_classes).astype(np.float64)
        for c in range(k):
          counts = np.bincount(v[(y == c) & (v >= 0)], minlength=a.num_classes).astype(np.float64)
          if counts.sum() == 0:
            counts = pooled
          if counts.sum() > 0:
            table[c] = counts / counts.sum()
        probs[a.name] = table
    return cls(list(labels), label_probs, tuple(attributes), values, probs, age_model)

  def _continuous(self, name: str, label: int, rng: np.random.Generator,
                  value_range: tuple[float, float] | None) -> float:
    v = self.values[name][label]
    lo, hi = value_range if value_range else (-np.inf, np.inf)
    if v.size == 0:
      return float(rng.uniform(lo, hi)) if value_range else float("nan")
    std = float(v.std()) if v.size > 1 else 0.0
    for _ in range(1000):
      if self.age_model == "kde":
        bw = std * v.size ** (-1.0 / 5.0)
        x = float(rng.choice(v) + bw * rng.standard_normal())
      else:
        x = float(v.mean() + std * rng.standard_normal())
      if lo <= x <= hi:
        return x
    # The fitted density has (almost) no mass in the requested range: uniform over it.
    return float(rng.uniform(lo, hi))

  def sample(self, n: int, seed: int, *, label_fractions: np.ndarray | None = None,
             categorical_fractions: Mapping[str, np.ndarray] | None = None,
             ranges: Mapping[str, tuple[float, float]] | None = None) -> dict[str, np.ndarray]:
    """n subjects' label + attributes, and a per-subject noise seed ('seed', uint32)."""
    fractions = self.label_probs if label_fractions is None else np.asarray(label_fractions)
    counts = allocate(n, fractions)
    labels = np.repeat(np.arange(len(self.labels)), counts)
    labels = np.random.default_rng(np.random.SeedSequence([int(seed), 0x1abe1])).permutation(labels)
    out: dict[str, np.ndarray] = {unet_lib.LABEL: labels.astype(np.int32)}
    cont = {a.name: np.full(n, np.nan, np.float32) for a in self.attributes if a.kind == "continuous"}
    cat = {a.name: np.full(n, -1, np.int32) for a in self.attributes if a.kind == "categorical"}
    seeds = np.zeros(n, np.uint32)
    categorical_fractions = dict(categorical_fractions or {})
    ranges = dict(ranges or {})
    for i in range(n):
      ss = np.random.SeedSequence([int(seed), i])
      rng = np.random.default_rng(ss)
      seeds[i] = ss.generate_state(1, np.uint32)[0]
      y = int(labels[i])
      for a in self.attributes:
        if a.kind == "continuous":
          cont[a.name][i] = self._continuous(a.name, y, rng, ranges.get(a.name))
        else:
          p = categorical_fractions.get(a.name, self.probs[a.name][y])
          if np.all(np.isfinite(p)):
            cat[a.name][i] = rng.choice(a.num_classes, p=p)
    out.update(cont)
    out.update(cat)
    out["seed"] = seeds
    return out


# ------------------------------------------------------------------------------ generation


@functools.partial(jax.jit, static_argnames=("model", "shape", "prediction_type", "sampler", "steps", "eta",
                                             "spacing", "guidance_scale", "guidance_null"))
def _sample(params, schedule, seeds, cond, *, model, shape, prediction_type, sampler, steps, eta, spacing,
            guidance_scale, guidance_null):
  """Module-level and keyed on static settings, so every Generator with the same model and settings
  shares one compiled sampler (a resumed or repeated run in one process does not recompile)."""
  keys = jax.vmap(jax.random.key)(seeds)
  fn = lambda x, t, c: model.apply({"params": params}, x, t, c)
  if model.conditioning is not None:
    fn = cfg_model_fn(fn, guidance_scale, lambda c: unet_lib.null_conditions(c, model.conditioning, guidance_null))
  if sampler == "ddim":
    return ddim_sample(fn, schedule, shape, keys, cond, num_inference_steps=steps, eta=eta,
                       prediction_type=prediction_type, spacing=spacing)
  return ddpm_sample(fn, schedule, shape, keys, cond, prediction_type=prediction_type)


class Generator:
  """Batched, mesh-sharded latent sampling with classifier-free guidance.

  `latents(params, seeds, cond)` returns scaled latents, one per seed; subject i's latent depends
  only on its seed and conditions (per-element keys) and on the fixed batch it falls in.
  """

  def __init__(self, model: unet_lib.DiffusionUNet, schedule: NoiseSchedule, latent_shape: Sequence[int], *,
               prediction_type: str = "epsilon", sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
               spacing: str = "trailing", guidance_scale: float = 1.0, guidance_null: str | Sequence[str] = "all",
               batch_size: int = 8, mesh: Optional[jax.sharding.Mesh] = None):
    if sampler not in SAMPLERS:
      raise UserInputError(f"sample.sampler must be one of {SAMPLERS}, got {sampler!r}")
    self.model, self.schedule = model, schedule
    self.latent_shape = tuple(int(s) for s in latent_shape)
    self.mesh = mesh if mesh is not None else mesh_lib.mesh_from_config(None)
    self.batch_size = ldm_lib.round_up(max(1, int(batch_size)), self.mesh)
    null = guidance_null
    if isinstance(null, str):
      null = "all" if null.strip() == "all" else tuple(s.strip() for s in null.split(",") if s.strip())
    else:
      null = tuple(null)
    if model.conditioning is not None and null != "all":
      unet_lib.null_conditions({}, model.conditioning, null)   # validates the names
    self._static = dict(model=model, shape=(self.batch_size,) + self.latent_shape, prediction_type=str(prediction_type),
                        sampler=sampler, steps=int(steps), eta=float(eta), spacing=str(spacing),
                        guidance_scale=float(guidance_scale), guidance_null=null)
    self._bsh = mesh_lib.batch_sharding(self.mesh)

  def _put(self, a: np.ndarray) -> jax.Array:
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, self._bsh, lambda idx: a[idx])

  def batch(self, params, seeds: np.ndarray, cond: Mapping[str, np.ndarray]) -> jax.Array:
    """One full batch (len(seeds) == batch_size) -> latents, batch-sharded on the mesh."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      return _sample(params, self.schedule, self._put(np.asarray(seeds, np.uint32)),
                     {k: self._put(v) for k, v in cond.items()}, **self._static)

  def pad(self, idx: np.ndarray, seeds: np.ndarray, cond: Mapping[str, np.ndarray]):
    """Seeds and conditions of rows `idx`, padded to a full batch by repeating the last row."""
    full = np.concatenate([idx, np.repeat(idx[-1:], self.batch_size - len(idx))])
    return seeds[full], {k: np.asarray(v)[full] for k, v in cond.items()}

  def latents(self, params, seeds: np.ndarray, cond: Mapping[str, np.ndarray]) -> np.ndarray:
    """Every row, in fixed batches of batch_size; host numpy (N, *latent_shape)."""
    n = len(seeds)
    out = []
    for start in range(0, n, self.batch_size):
      idx = np.arange(start, min(n, start + self.batch_size))
      s, c = self.pad(idx, np.asarray(seeds), cond)
      out.append(np.asarray(jax.device_get(self.batch(params, s, c)))[: len(idx)])
    return np.concatenate(out, axis=0)


# ------------------------------------------------------------------------------ the stage


def retry_seed(seed: int, attempt: int) -> int:
  """The seed of a subject's `attempt`-th regeneration (reject_copies): a function of both only."""
  return int(np.random.SeedSequence([int(seed), int(attempt), 0x5EED]).generate_state(1)[0])


def _pid(i: int, n: int) -> str:
  return f"sub-synth{i + 1:0{max(4, len(str(n)))}d}"


def _files(out_dir: str, pid: str, channels: Sequence[str]) -> list[str]:
  return [os.path.join(out_dir, pid, "anat", f"{pid}_{seq}.nii.gz") for seq in channels]


def plan_subjects(config, prepared, attributes, labels: Sequence[str]) -> dict[str, np.ndarray]:
  """Labels, attributes and seeds of the sample.num_subjects subjects to generate."""
  s = config.sample
  n = int(s.num_subjects)
  if n < 1:
    raise UserInputError(f"sample.num_subjects must be >= 1, got {n}")
  train = ldm_lib.split_attributes(prepared, "train", attributes)
  model = AttributeModel.fit(labels, train, attributes, str(s.age_model))
  cat_fracs, ranges = {}, {}
  names = {a.name: a for a in attributes}
  sex = parse_fractions(str(s.sex_fractions), list(SEX_NAMES), "sex_fractions")
  if sex is not None:
    if "sex" not in names:
      raise UserInputError("sample.sex_fractions is set but the LDM does not condition on 'sex'")
    cat_fracs["sex"] = sex
  age_range = tuple(float(a) for a in (s.age_range or ()))
  if age_range:
    if len(age_range) != 2 or not age_range[0] <= age_range[1]:
      raise UserInputError(f"sample.age_range must be (low, high), got {tuple(s.age_range)}")
    if "age" not in names:
      raise UserInputError("sample.age_range is set but the LDM does not condition on 'age'")
    ranges["age"] = age_range
  fractions = parse_fractions(str(s.label_fractions), list(labels), "label_fractions")
  return model.sample(n, int(s.seed), label_fractions=fractions, categorical_fractions=cat_fracs, ranges=ranges)


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


@dataclasses.dataclass
class Trained:
  """The trained LDM of a workdir and the codec that decodes its latents: what sampling needs."""
  meta: dict
  labels: list
  attributes: list
  latent_shape: tuple
  model: Any
  schedule: NoiseSchedule
  step: int
  params: Any
  codec: ldm_lib.LatentCodec
  mesh: jax.sharding.Mesh
  ldm_dir: str

  def generator(self, s) -> Generator:
    """A Generator with the settings of a `sample` config block."""
    return Generator(self.model, self.schedule, self.latent_shape,
                     prediction_type=str(self.meta["ldm"]["diffusion"]["prediction_type"]), sampler=str(s.sampler),
                     steps=int(s.steps), eta=float(s.eta), spacing=str(s.spacing),
                     guidance_scale=float(s.guidance_scale), guidance_null=s.guidance_null,
                     batch_size=int(s.batch_size), mesh=self.mesh)

  def decoder(self) -> Callable:
    """Jitted (codec variables, normalised latents, their labels) -> volumes, replicated."""
    norm = ldm_lib.LatentNorm.from_meta(self.meta, self.ldm_dir)
    codec = self.codec
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      return jax.jit(lambda v, z, y: codec.decode(v, norm.denormalize(z, y)),
                     out_shardings=mesh_lib.replicated(self.mesh))


def load_trained(config, workdir: str, codec: Optional[ldm_lib.LatentCodec] = None) -> Trained:
  """The workdir's trained LDM (EMA params when kept) with its codec (default: the tokenizer,
  decoding through config.sample.clinical)."""
  meta = io.read_json(os.path.join(ldm_lib.ldm_dir(workdir), ldm_lib.META_FILE))
  if not meta or not meta.get("complete"):
    raise UserInputError(f"{ldm_lib.ldm_dir(workdir)}: no trained LDM (ldm.json missing); run the 'ldm' stage first")
  labels = list(meta["labels"])
  attributes = ldm_lib.attributes_from_meta(meta)
  latent_shape = tuple(meta["latent_shape"])
  model, schedule = ldm_lib.build(meta["ldm"], latent_shape[-1], len(labels), attributes)
  step, loaded = ckpt_lib.load_variables(os.path.join(ldm_lib.ldm_dir(workdir), "checkpoints"))
  params = ckpt_lib.eval_params(loaded)
  codec = codec if codec is not None else ldm_lib.tokenizer_codec(config, workdir, clinical=str(config.sample.clinical))
  return Trained(meta, labels, attributes, latent_shape, model, schedule, int(step), params, codec,
                 ldm_lib.make_mesh(config), ldm_lib.ldm_dir(workdir))


def paired_samples(config, workdir: str, num_pairs: int, case: str, control: str, *,
                   codec: Optional[ldm_lib.LatentCodec] = None) -> dict[str, np.ndarray]:
  """The conditioning check's volumes: `num_pairs` subjects drawn as the sample stage draws them
  (same attribute model, sample.seed), each generated twice from the same initial noise and the
  same attributes, once labelled `case` and once `control`. Any difference between the two is
  what the label alone changes. Returns {"case": (n, X, Y, Z, C), "control": same, "seed": (n,)}.
  """
  workdir = os.path.abspath(workdir)
  g = load_trained(config, workdir, codec)
  for name in (case, control):
    if name not in g.labels:
      raise UserInputError(f"paired check: label {name!r} is not one of the LDM's labels {g.labels}")
  prepared = load_prepared(workdir)
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.sample.num_subjects = int(num_pairs)
  plan = plan_subjects(sub, prepared, g.attributes, g.labels)
  gen, decode = g.generator(config.sample), g.decoder()
  out = {}
  for key, name in (("case", case), ("control", control)):
    cond = {k: np.asarray(plan[k]) for k in g.model.conditioning.names}
    cond[unet_lib.LABEL] = np.full(len(plan["seed"]), g.labels.index(name), np.int32)
    z = gen.latents(g.params, plan["seed"], cond)
    vols = []
    for start in range(0, len(z), gen.batch_size):
      chunk = z[start:start + gen.batch_size]
      pad = np.concatenate([chunk, np.repeat(chunk[-1:], gen.batch_size - len(chunk), axis=0)])
      y = np.full(len(pad), g.labels.index(name), np.int32)
      with jax.set_mesh(g.mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
        vols.append(np.asarray(jax.device_get(decode(g.codec.variables, pad, y)), np.float32)[: len(chunk)])
    out[key] = np.concatenate(vols)
  out["seed"] = np.asarray(plan["seed"])
  return out


def _timing(t_sample: list[float], t_decode: list[float]) -> dict[str, Any]:
  """Median per-volume sampling / decoding seconds over the batches after the first (which compiles)."""
  steady_s = t_sample[1:] if len(t_sample) > 1 else t_sample
  steady_d = t_decode[1:] if len(t_decode) > 1 else t_decode
  return {"sampling_s_per_volume": float(np.median(steady_s)) if steady_s else None,
          "decoding_s_per_volume": float(np.median(steady_d)) if steady_d else None,
          "first_batch_s_per_volume": t_sample[0] + t_decode[0] if t_sample else None}


def _dataset_description(config, what: str, codec_description: str, step: int) -> dict[str, Any]:
  """The cohort's BIDS dataset_description.json: a derivative, with what generated it."""
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
  }


def _reject_copies(config, workdir: str, rows: np.ndarray, x: np.ndarray, generate: Callable[[np.ndarray], np.ndarray],
                   seeds: np.ndarray, pids: Sequence[str], reseeded: dict[int, int], rejections: dict[str, Any],
                   log: Callable[[str], None]) -> np.ndarray:
  """Regenerates (new seed, same attributes) every subject the privacy copy check flags, until
  none is flagged or sample.reject_max_attempts is spent (then a UserInputError). Updates seeds,
  reseeded and rejections in place (the sample state records them for an exact resume)."""
  from synthmri_jax.evaluation import privacy   # builds the privacy encoder on first use
  max_attempts = int(config.sample.reject_max_attempts)
  x = x.copy()
  todo = np.arange(len(rows))
  for attempt in range(1, max_attempts + 1):
    flags = privacy.flag_generated(config, workdir, x[todo], log=log)
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
  flags = privacy.flag_generated(config, workdir, x[todo], log=log)
  if np.any(flags["is_copy"]):
    bad = [pids[rows[j]] for j in todo[np.asarray(flags["is_copy"], bool)]]
    raise UserInputError(f"sample.reject_copies: {bad} still flagged as copies after {max_attempts} "
                         "regenerations; the LDM memorises these subjects (train with DP, train.dp, or fewer steps)")
  return x


def run_sample(config, workdir: str, *, codec: Optional[ldm_lib.LatentCodec] = None,
               on_progress: Optional[Callable[[int, int], None]] = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
  """The pipeline stage (see the module docstring). Skips when the cohort is complete for this config.

  on_progress(done, total) is called after every batch's files are written.
  """
  if "sample" not in config:
    raise ValueError("config has no `sample` block; attach synthmri_jax.training.tasks.ldm_config.sample_config(...) "
                     "as config.sample")
  workdir = os.path.abspath(workdir)
  s = config.sample
  prepared = load_prepared(workdir)
  g = load_trained(config, workdir, codec)
  meta, labels, attributes = g.meta, g.labels, g.attributes
  model, schedule, step, params, codec, mesh = g.model, g.schedule, g.step, g.params, g.codec, g.mesh

  out_dir = os.path.join(workdir, OUT_DIR)
  state_path = os.path.join(workdir, STATE_FILE)
  key = workdir_lib.fingerprint({"sample": ldm_lib.plain_block(s), "ldm": meta["key"], "step": step, "codec": codec.key,
                       "channels": prepared.channels, "affine": prepared.meta["affine"]})
  state = io.read_json(state_path) or {}
  is_main = jax.process_index() == 0
  if state.get("key") == key and state.get("complete"):
    log(f"sample: {out_dir} is complete for this config, skipping")
    return state
  if state.get("key") != key and is_main:
    _clear_outputs(out_dir)
    state = {"key": key, "complete": False}
    io.write_json_atomic(state_path, state)

  plan = plan_subjects(config, prepared, attributes, labels)
  n = len(plan["seed"])
  cond = {k: plan[k] for k in model.conditioning.names}
  gen, decode = g.generator(s), g.decoder()
  affine = prepared.affine
  channels = prepared.channels
  pids = [_pid(i, n) for i in range(n)]
  done = sum(all(os.path.exists(f) for f in _files(out_dir, p, channels)) for p in pids)
  what = (f"DDIM {int(s.steps)} steps, eta {float(s.eta):g}" if s.sampler == "ddim"
          else f"DDPM {schedule.num_train_timesteps} steps")
  log(f"sample: {n} subjects ({done} already written) with {what}, guidance {float(s.guidance_scale):g}, "
      f"batch {gen.batch_size}, LDM step {step}")
  reseeded = {int(k): int(v) for k, v in state.get("reseeded", {}).items()}
  for i, seed in reseeded.items():   # subjects regenerated by reject_copies in an interrupted run
    plan["seed"][i] = seed
  rejections = dict(state.get("rejections", {"count": 0, "subjects": []}))
  reject = bool(s.get("reject_copies", False))

  clock = {"sample": 0.0, "decode": 0.0}

  def generate(rows: np.ndarray) -> np.ndarray:
    t = time.time()
    seeds, c = gen.pad(rows, plan["seed"], cond)
    z = jax.block_until_ready(gen.batch(params, seeds, c))
    clock["sample"] += time.time() - t
    t = time.time()
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      x = np.asarray(jax.device_get(decode(codec.variables, z, np.asarray(c[unet_lib.LABEL], np.int32))),
                     np.float32)[: len(rows)]
    clock["decode"] += time.time() - t
    return x

  t_sample, t_decode, per_batch = [], [], []
  t_start = time.time()
  generated = 0
  for start in range(0, n, gen.batch_size):
    idx = np.arange(start, min(n, start + gen.batch_size))
    missing = [i for i in idx if not all(os.path.exists(f) for f in _files(out_dir, pids[i], channels))]
    if not missing:
      continue
    t0 = time.time()
    clock.update(sample=0.0, decode=0.0)
    x = generate(idx)
    if reject:
      # regenerations count in the batch's sampling / decoding time
      x = _reject_copies(config, workdir, idx, x, generate, plan["seed"], pids, reseeded, rejections, log)
    if is_main:
      for j, i in enumerate(idx):
        if i in missing:
          for f, ch in zip(_files(out_dir, pids[i], channels), range(x.shape[-1])):
            nifti.write_nifti(f, x[j, ..., ch], affine)
    t_sample.append(clock["sample"] / len(idx))
    t_decode.append(clock["decode"] / len(idx))
    per_batch.append((time.time() - t0) / len(idx))
    generated += len(missing)
    done += len(missing)
    if reject and is_main:
      state.update(reseeded={str(k): v for k, v in reseeded.items()}, rejections=rejections)
      io.write_json_atomic(state_path, state)
    steady = per_batch[1:] if len(per_batch) > 1 else per_batch
    eta = (n - done) * float(np.mean(steady))
    log(f"sample: {done}/{n} subjects | {per_batch[-1]:.2f} s/volume | ETA {durations.short(eta)}")
    if on_progress is not None:
      on_progress(done, n)

  table = participants_table(plan, labels, attributes)
  timing = _timing(t_sample, t_decode)
  if is_main:
    io.write_text_atomic(os.path.join(out_dir, "participants.tsv"), table.to_csv(sep="\t", index=False))
    io.write_json_atomic(os.path.join(out_dir, "dataset_description.json"),
                         _dataset_description(config, what, codec.description, step))
    state = {"key": key, "complete": True, "num_subjects": n, "checkpoint_step": int(step),
             "sampler": str(s.sampler), "steps": int(s.steps) if s.sampler == "ddim" else schedule.num_train_timesteps,
             "generated_this_run": generated, "seconds": round(time.time() - t_start, 1), **timing,
             "reject_copies": reject, "rejections": rejections, "reseeded": {str(k): v for k, v in reseeded.items()}}
    io.write_json_atomic(state_path, state)
  counts = table["label"].value_counts().to_dict()
  if timing["sampling_s_per_volume"] is not None:
    log(f"sample: wrote {n} subjects to {out_dir} ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); "
        f"{timing['sampling_s_per_volume']:.3f} s/volume sampling ({what}) + "
        f"{timing['decoding_s_per_volume']:.3f} s/volume decoding")
  else:
    log(f"sample: {out_dir} complete ({n} subjects)")
  return state
