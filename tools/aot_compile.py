"""Compile every jitted program a config runs for a TPU topology, without the hardware.

    python3 -m pip install -e ".[tpu]"      # libtpu: compiles for TPU on any host
    python3 tools/aot_compile.py --config configs/gpu_2mm.py --topology v5e:2x2 --out runs/aot
    python3 tools/aot_compile.py --config configs/gpu_1mm.py --topology v5p:4x4x4 --find-batch
    python3 tools/aot_compile.py --config configs/quickstart.py --topology cpu   # the local devices

For each program (each tokenizer phase's train step, the LDM's, the classifier's, the segmenter's,
the privacy encoder's, the sampler's whole denoising loop for one batch, and the decoder) it builds
the program the pipeline would run, at the config's real shapes and shardings (the config's own
mesh block over the topology's chips), and compiles it with XLA for the target. It reports per
chip: argument, output, temporary and code bytes, whether that fits the chip's HBM, FLOPs, XLA's
estimated step time, and the MFU bound that time implies against the chip's peak bf16 FLOP/s.
`--find-batch` searches, per program, the largest power-of-two per-chip batch that fits.

Everything chosen by backend follows the target (utils.backend.compiling_for): the 3D
convolution's formulation, the attention kernel and DP micro-batching are the TPU ones, not the
CPU host's. Writes aot_<config>_<topology>.json and .md under --out.

Chip figures (per chip, from Google Cloud's public TPU documentation): v4 32 GiB HBM, 275 bf16
TFLOP/s, 1,228 GB/s; v5e 16 GiB, 197, 819 GB/s; v5p 95 GiB, 459, 2,765 GB/s; v6e 32 GiB, 918,
1,640 GB/s. Step time: XLA's own estimate (cost analysis 'optimal_seconds') where it gives one; it
gives none (a negative value) for programs with loops, and then the roofline bound
max(FLOPs / peak, bytes accessed / HBM bandwidth) is reported instead, marked as such. Either
way the MFU figure is an upper bound on what a step could reach, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")   # the host runs nothing; libtpu only compiles (no TPU init)
# libtpu takes /tmp/libtpu_lockfile when it loads, so that two processes cannot share one TPU. Here it
# only compiles and claims no chip, so it must not fail because another jax process (a pipeline run,
# a test worker) loaded libtpu first.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from synthmri_jax import sharding as mesh_lib  # noqa: E402
from synthmri_jax.config_blocks import evaluate as evaluate_block  # noqa: E402
from synthmri_jax.config_blocks import privacy as privacy_block  # noqa: E402
from synthmri_jax.data import loader  # noqa: E402
from synthmri_jax.evaluation import embedding  # noqa: E402
from synthmri_jax.generation.generator import Generator  # noqa: E402
from synthmri_jax.models import classifier as classifier_lib  # noqa: E402
from synthmri_jax.models import segmenter as segmenter_lib  # noqa: E402
from synthmri_jax.models import unet as unet_lib  # noqa: E402
from synthmri_jax.models.tokenizer import build_tokenizer  # noqa: E402
from synthmri_jax.pipeline import ldm as ldm_stage  # noqa: E402
from synthmri_jax.pipeline import tokenizer as tokenizer_stage  # noqa: E402
from synthmri_jax.tasks.classifier import ClassifierTask  # noqa: E402
from synthmri_jax.tasks.ldm import LATENT_KEY, LDMTask, build  # noqa: E402
from synthmri_jax.tasks.segmenter import SegmenterTask  # noqa: E402
from synthmri_jax.tasks.tokenizer import make_task  # noqa: E402
from synthmri_jax.training import dp_sgd, optim, trainer  # noqa: E402
from synthmri_jax.utils import backend, io  # noqa: E402
from synthmri_jax.utils import config_files  # noqa: E402

GiB = 1024 ** 3
CHIPS = {   # HBM bytes, peak bf16 FLOP/s, HBM bytes/s per chip (the module docstring's sources)
    "v4": (32 * GiB, 275e12, 1228e9), "v5e": (16 * GiB, 197e12, 819e9), "v5p": (95 * GiB, 459e12, 2765e9),
    "v6e": (32 * GiB, 918e12, 1640e9),
}


# ------------------------------------------------------------------------------ targets


@dataclasses.dataclass(frozen=True)
class Target:
  name: str            # "v5e:2x2" or "cpu"
  platform: str        # "tpu" | "cpu" | "gpu"
  devices: tuple
  hbm_bytes: float | None
  peak_flops: float | None
  hbm_bandwidth: float | None = None
  forms: str | None = None   # whose program forms to build (default: the platform's own)

  @property
  def chips(self) -> int:
    return len(self.devices)


def target(name: str) -> Target:
  """The devices of a TPU topology (libtpu, no TPU needed), or 'cpu' / 'local' for this host's."""
  if name in ("cpu", "local"):
    return Target(name, jax.default_backend(), tuple(jax.devices()), None, None, None)
  chip = name.split(":")[0]
  if chip not in CHIPS:
    raise SystemExit(f"FATAL: unknown chip {chip!r} in --topology {name}; known: {', '.join(CHIPS)}")
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
  except Exception as e:   # no libtpu, or a topology name libtpu does not know
    raise SystemExit(f"FATAL: cannot describe TPU topology {name!r} ({type(e).__name__}: {str(e)[:300]}); "
                     "install the extra: python3 -m pip install -e \".[tpu]\"") from None
  hbm, peak, bandwidth = CHIPS[chip]
  return Target(name, "tpu", tuple(topo.devices), hbm, peak, bandwidth)


# ------------------------------------------------------------------------------ abstract inputs


def _spec(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype), sharding=sharding)


def cohort_batch(config, batch: int, mesh, with_mask: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """What loader.CohortSource + the train pipeline hand the trainer, as abstract global arrays."""
  bsh = mesh_lib.batch_sharding(mesh)
  shape = tuple(config.data.shape)
  channels = len([s for s in str(config.data.sequences).split(",") if s.strip()])
  out = {"image": _spec((batch,) + shape + (channels,), jnp.float32, bsh),
         "label": _spec((batch,), jnp.int32, bsh), "age": _spec((batch,), jnp.float32, bsh),
         "sex": _spec((batch,), jnp.int32, bsh), "index": _spec((batch,), jnp.int32, bsh),
         "valid": _spec((batch,), jnp.bool_, bsh)}
  if with_mask:
    out["mask"] = _spec((batch,) + shape, jnp.uint8, bsh)
  return out


def _key_spec(mesh) -> jax.ShapeDtypeStruct:
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=mesh_lib.replicated(mesh))


# ------------------------------------------------------------------------------ programs


@dataclasses.dataclass
class Program:
  """One jitted program: `lower(global_batch)` lowers it for the target mesh; `execute(global_batch,
  steps)` runs it there on random inputs of the same shapes (a local mesh only; tools/real_size_steps.py)."""
  name: str
  kind: str                       # "train step" | "sampler" | "decoder"
  batch: int                      # the config's global batch
  lower: Callable[[int], Any]
  params: int = 0
  execute: Callable[[int, int], dict] | None = None
  mesh: Any = None                # its stage's own mesh (mesh_lib.mesh_block), where that differs


def random_inputs(specs: Any, seed: int = 0) -> Any:
  """Concrete arrays for abstract batch specs, in their shardings: images and other floats in [0, 1),
  labels / sex / masks in {0, 1}, index = the row number, valid = True."""
  rng = np.random.default_rng(seed)

  def one(path, spec):
    name = str(getattr(path[-1], "key", path[-1])) if path else ""
    shape, dtype = spec.shape, np.dtype(spec.dtype)
    if name == "index":
      host = np.arange(shape[0], dtype=dtype)
    elif dtype == np.bool_:
      host = np.ones(shape, dtype)
    elif np.issubdtype(dtype, np.integer):
      host = rng.integers(0, 2, size=shape).astype(dtype)
    else:
      host = rng.random(shape, dtype=np.float32).astype(dtype)
    return jax.device_put(host, spec.sharding) if spec.sharding is not None else jnp.asarray(host)

  return jax.tree_util.tree_map_with_path(one, specs)


def _timed(fn: Callable[[], Any], steps: int) -> dict[str, Any]:
  """The first call (compile + run) and the median of `steps - 1` more, each synchronised."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(max(0, steps - 1)):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return {"first_call_s": round(first, 3), "steps": steps,
          "median_s": round(float(np.median(times)), 4) if times else None, "last": out}


def train_program(name: str, task, train_block, mesh, make_batch: Callable[[int], dict], batch: int) -> Program:
  """The trainer's own step (trainer.build_state + trainer.jit_train_step) for `task`."""
  cfg = optim.train_config(train_block)
  dp = None
  if cfg.dp.enabled:   # the DP step's program: per-example clipped gradients on the padded batch
    dp = dp_sgd.DPStep(l2_clip=float(cfg.dp.l2_clip), noise_multiplier=float(cfg.dp.noise_multiplier) or 1.0,
                       expected_batch_size=batch, microbatch=int(cfg.dp.microbatch))
  prog = Program(name, "train step" + (" (DP-SGD)" if dp else ""), batch, None)

  def lower(b: int):
    batch_spec = make_batch(b)
    _, abstract_state, state_sh, tx = trainer.build_state(task, cfg, mesh, batch_spec)
    prog.params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_state.params)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      step = trainer.jit_train_step(task, tx, cfg, state_sh, mesh, dp)
      return step.lower(abstract_state, batch_spec, _key_spec(mesh))

  def execute(b: int, steps: int) -> dict[str, Any]:
    batch = random_inputs(make_batch(b))
    init_fn, _, state_sh, tx = trainer.build_state(task, cfg, mesh, batch)
    state = [init_fn()]
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      step = trainer.jit_train_step(task, tx, cfg, state_sh, mesh, dp)
      key = jax.random.key(0)

      def once():
        state[0], metrics = step(state[0], batch, jax.random.fold_in(key, int(jax.device_get(state[0].step))))
        return metrics

      out = _timed(once, steps)
    metrics = jax.device_get(out.pop("last"))
    return dict(out, loss=float(metrics["loss"]), skipped=int(metrics["total_skips"]))

  prog.lower, prog.execute = lower, execute
  return prog


def _initialised(specs: Any, init: Callable[[], Any]) -> Any:
  """The model's own initial values (not random numbers: a network at random weights can overflow),
  placed in the shardings of `specs`."""
  values = mesh_lib.unbox(init())
  return jax.tree.map(lambda v, sp: jax.device_put(v, sp.sharding), values, specs)


def _params_spec(init: Callable[[], Any], mesh) -> Any:
  """Abstract params, each in its logical sharding (what a loaded checkpoint is placed as)."""
  boxed = jax.eval_shape(init)
  shardings = mesh_lib.tree_shardings(boxed, mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      mesh_lib.unbox(boxed), shardings)


def programs(config, mesh, tokenizer_mesh=None) -> list[Program]:
  """Every jitted program of the pipeline for `config` on `mesh` (the tokenizer's train steps on
  `tokenizer_mesh`, its stage's own mesh, if given), in pipeline order."""
  out: list[Program] = []
  shards = mesh_lib.batch_shards(mesh)
  channels = len([s for s in str(config.data.sequences).split(",") if s.strip()])
  labels = [s.strip() for s in str(config.data.labels).split(",") if s.strip()]
  with_masks = bool(config.data.get("embedded", {}).get("lesions", False))

  # tokenizer: one train step per phase
  tcfg = config.tokenizer
  tmesh = mesh if tokenizer_mesh is None else tokenizer_mesh
  tok_batch = loader.round_up(tokenizer_stage.batch_size(config), tmesh)
  for phase in tokenizer_stage.phase_names(tcfg):
    task = make_task(tcfg, channels, phase if str(tcfg.variant) == "dual" else "main")
    out.append(train_program(f"tokenizer {phase}", task, tokenizer_stage.train_config(config, phase), tmesh,
                             lambda b: cohort_batch(config, b, tmesh, with_masks), tok_batch))
    out[-1].mesh = tmesh

  # the latent the LDM models (the tokenizer's generative latent at these shapes)
  model = build_tokenizer(tcfg, channels)
  x = jax.ShapeDtypeStruct((1,) + tuple(config.data.shape) + (channels,), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))
  latent = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(x.shape, x.dtype), quantize=bool(config.ldm.latents.quantized),
                                                method=model.encode_generative), variables).shape[1:]

  # ldm
  attributes = unet_lib.parse_attributes(config.ldm.cond.attributes)
  unet, schedule = build(config.ldm, latent[-1], len(labels), attributes)
  ldm_task = LDMTask(unet, schedule, str(config.ldm.diffusion.prediction_type),
                     float(config.ldm.cond.dropout_each), float(config.ldm.cond.dropout_all))

  def ldm_batch(b: int) -> dict:
    bsh = mesh_lib.batch_sharding(mesh)
    spec = {LATENT_KEY: _spec((b,) + tuple(latent), jnp.float32, bsh), unet_lib.LABEL: _spec((b,), jnp.int32, bsh),
            "index": _spec((b,), jnp.int32, bsh), "valid": _spec((b,), jnp.bool_, bsh)}
    for a in attributes:
      spec[a.name] = _spec((b,), jnp.float32 if a.kind == "continuous" else jnp.int32, bsh)
    return spec

  out.append(train_program("ldm", ldm_task, ldm_stage.train_config(config), mesh, ldm_batch,
                           loader.round_up(ldm_stage.batch_size(config), mesh)))

  # classifier and segmenter (the study's real-data runs)
  cls = evaluate_block.block(config, "classifier", evaluate_block.classifier_config)
  ctask = ClassifierTask(model=classifier_lib.from_config(cls.model, len(labels)), name="classifier",
                         label_smoothing=float(cls.label_smoothing))
  out.append(train_program("classifier", ctask, _train(cls.train, config), mesh,
                           lambda b: cohort_batch(config, b, mesh), loader.round_up(int(cls.batch_size), mesh)))
  seg = cls.segmenter
  stask = SegmenterTask(model=segmenter_lib.from_config(seg.model, int(seg.num_classes)), name="segmenter",
                        dice_weight=float(seg.dice_weight))
  out.append(train_program("segmenter", stask, _train(seg.train, config), mesh,
                           lambda b: cohort_batch(config, b, mesh, with_mask=True),
                           loader.round_up(int(seg.batch_size), mesh)))

  # privacy encoder (contrastive)
  enc = privacy_block.block(config).encoder
  etask = embedding.ContrastiveTask(embedding.build_model(enc), float(enc.temperature))

  def enc_batch(b: int) -> dict:
    bsh = mesh_lib.batch_sharding(mesh)
    v = _spec((b,) + tuple(config.data.shape) + (channels,), jnp.float32, bsh)
    return {"view_a": v, "view_b": v}

  out.append(train_program("privacy encoder", etask, _train(enc.train, config), mesh, enc_batch,
                           max(shards, int(enc.batch_size) // shards * shards)))

  # the sampler: one batch's whole DDIM / DDPM loop
  s = config.sample
  cond_names = unet.conditioning.names if unet.conditioning is not None else ()

  def sampler(b: int):
    gen = Generator(unet, schedule, latent, prediction_type=str(config.ldm.diffusion.prediction_type),
                    sampler=str(s.sampler), steps=int(s.steps), eta=float(s.eta), spacing=str(s.spacing),
                    guidance_scale=float(s.guidance_scale), guidance_null=s.guidance_null, batch_size=b, mesh=mesh)
    bsh = mesh_lib.batch_sharding(mesh)
    params = _params_spec(lambda: unet.init(jax.random.key(0), jnp.zeros((1,) + tuple(latent)),
                                            jnp.zeros((1,), jnp.int32),
                                            {k: jnp.zeros((1,), jnp.int32) for k in cond_names})["params"], mesh)
    dtypes = {a.name: jnp.float32 if a.kind == "continuous" else jnp.int32 for a in attributes}
    cond = {k: _spec((gen.batch_size,), dtypes.get(k, jnp.int32), bsh) for k in cond_names}
    return gen, params, _spec((gen.batch_size,), jnp.uint32, bsh), cond

  def sampler_lower(b: int):
    gen, params, seeds, cond = sampler(b)
    return gen.lower(params, seeds, cond)

  def sampler_execute(b: int, steps: int) -> dict[str, Any]:
    gen, params, seeds, cond = sampler(b)
    params = _initialised(params, lambda: unet.init(jax.random.key(0), jnp.zeros((1,) + tuple(latent)),
                                                    jnp.zeros((1,), jnp.int32),
                                                    {k: jnp.zeros((1,), jnp.int32) for k in cond_names})["params"])
    seeds_np = np.arange(gen.batch_size, dtype=np.uint32)
    cond_np = {k: np.zeros((gen.batch_size,), v.dtype) for k, v in cond.items()}
    out = _timed(lambda: gen.batch(params, seeds_np, cond_np), steps)
    z = np.asarray(jax.device_get(out.pop("last")))
    return dict(out, finite=bool(np.isfinite(z).all()), volumes_per_s=None if not out["median_s"] else
                round(gen.batch_size / out["median_s"], 3))

  out.append(Program(f"sampler ({s.sampler}, {int(s.steps)} steps)", "sampler",
                     loader.round_up(int(s.batch_size), mesh), sampler_lower, execute=sampler_execute))

  # the decoder the sample stage runs on each batch of latents
  clinical = str(s.clinical)

  def decoder(b: int):
    rep = mesh_lib.replicated(mesh)
    v = _params_spec(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)), mesh)
    z = _spec((b,) + tuple(latent), jnp.float32, mesh_lib.batch_sharding(mesh))
    fn = jax.jit(lambda v, z: model.apply(v, z, clinical=clinical, method=model.decode_from_generative),
                 out_shardings=rep)
    return fn, v, z

  def decoder_lower(b: int):
    fn, v, z = decoder(b)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      return fn.lower(v, z)

  def decoder_execute(b: int, steps: int) -> dict[str, Any]:
    fn, v, z = decoder(b)
    v = _initialised(v, lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))
    z = random_inputs(z)
    with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES):
      out = _timed(lambda: fn(v, z), steps)
    vol = np.asarray(jax.device_get(out.pop("last")))
    return dict(out, finite=bool(np.isfinite(vol).all()), volumes_per_s=None if not out["median_s"] else
                round(b / out["median_s"], 3))

  out.append(Program(f"decoder (clinical={clinical})", "decoder", loader.round_up(int(s.batch_size), mesh),
                     decoder_lower, execute=decoder_execute))
  return out


def _train(train_block, config) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train = ml_collections.ConfigDict(train_block.to_dict() if hasattr(train_block, "to_dict") else dict(train_block))
  if "seed" not in c.train:
    c.train.seed = int(config.get("seed", 0))
  if config.get("mesh", None) is not None:
    c.mesh = config.mesh
  return c


# ------------------------------------------------------------------------------ compile and measure


def _cost(program) -> dict[str, float]:
  """XLA's cost analysis of a Lowered or Compiled program, as one dict."""
  cost = program.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _refused_bytes(message: str) -> float | None:
  """The bytes XLA says a program needs when it refuses it for lack of HBM (else None)."""
  m = re.search(r"RESOURCE_EXHAUSTED: .*?memory required for [^(]*\(([\d.]+)([KMGT])\)", message)
  return None if not m else float(m.group(1)) * 1024 ** " KMGT".index(m.group(2))


@contextlib.contextmanager
def optimization_effort(effort: float | None):
  """XLA's exec-time optimisation effort in [-1, 1] while compiling (None: XLA's default, 0).

  -1 skips most of XLA:TPU's autotuning: the quickstart's steps compile 3x faster (tokenizer 112 -> 34 s,
  LDM 134 -> 40 s on 2 cores) with FLOPs within 1 % and per-chip bytes within 35 % of the default
  (measured 2026-12-07). For CI's fit checks, not for the tables in docs/SCALING.md."""
  if effort is None:
    yield
    return
  saved = jax.config.jax_exec_time_optimization_effort
  jax.config.update("jax_exec_time_optimization_effort", float(effort))
  try:
    yield
  finally:
    jax.config.update("jax_exec_time_optimization_effort", saved)


def lowered_flops(prog: Program, tgt: Target, batch: int) -> float:
  """FLOPs of `prog`'s HLO as lowered for `tgt`, before any backend optimisation: XLA's cost analysis
  of the program itself, in seconds rather than a compile's minutes."""
  with backend.compiling_for(tgt.forms or tgt.platform):
    return float(_cost(prog.lower(batch)).get("flops", float("nan")))


def measure(prog: Program, tgt: Target, batch: int, shards: int, effort: float | None = None) -> dict[str, Any]:
  """Lowers and compiles `prog` at global batch `batch`; per-chip bytes, FLOPs and XLA's time."""
  t0 = time.time()
  with backend.compiling_for(tgt.forms or tgt.platform), optimization_effort(effort):
    lowered = prog.lower(batch)
    try:
      compiled = lowered.compile()
    except Exception as e:   # XLA:TPU refuses a program that cannot fit: that is a measurement, not a failure
      need = _refused_bytes(str(e))
      if need is None:
        raise
      return {"program": prog.name, "kind": prog.kind, "global_batch": batch, "per_chip_batch": batch / shards,
              "params": prog.params or None, "fits": False, "temp_bytes": need, "total_bytes": need,
              "refused": str(e).split("\n")[0][:300], "compile_seconds": round(time.time() - t0, 1)}
  mem = compiled.memory_analysis()
  cost = _cost(compiled)
  arg, out, alias = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes
  temp, code = mem.temp_size_in_bytes, mem.generated_code_size_in_bytes
  total = arg + out - alias + temp + code
  flops = float(cost.get("flops", float("nan")))
  accessed = float(cost.get("bytes accessed", float("nan")))
  seconds = cost.get("optimal_seconds")
  source = "XLA"
  if seconds is None or float(seconds) <= 0:   # XLA's "no estimate" (programs with loops)
    seconds, source = None, None
    if tgt.peak_flops and tgt.hbm_bandwidth and math.isfinite(flops) and math.isfinite(accessed):
      seconds, source = max(flops / tgt.peak_flops, accessed / tgt.hbm_bandwidth), "roofline"
  row = {"program": prog.name, "kind": prog.kind, "global_batch": batch, "per_chip_batch": batch / shards,
         "params": prog.params or None, "argument_bytes": arg, "output_bytes": out, "alias_bytes": alias,
         "temp_bytes": temp, "code_bytes": code, "total_bytes": total, "flops_per_chip": flops,
         "bytes_accessed_per_chip": accessed, "estimated_seconds": float(seconds) if seconds is not None else None,
         "estimate": source,
         "compile_seconds": round(time.time() - t0, 1)}
  if tgt.hbm_bytes:
    row["fits"] = bool(total <= tgt.hbm_bytes)
    row["hbm_fraction"] = total / tgt.hbm_bytes
  if tgt.peak_flops and seconds:
    row["mfu_bound"] = flops / float(seconds) / tgt.peak_flops
  return row



def find_batch(prog: Program, tgt: Target, shards: int, cap: int = 64, effort: float | None = None,
               spatial: int = 1) -> dict[str, Any]:
  """The largest power-of-two batch per batch shard (<= cap) whose program fits the chip's HBM; with
  a `spatial` split that shard's volumes are spread over `spatial` chips (per chip: b / spatial)."""
  best, tried = None, []
  b = 1
  while b <= cap:
    try:
      row = measure(prog, tgt, b * shards, shards * spatial, effort)
    except Exception as e:   # e.g. XLA's own out-of-memory refusal at compile time
      tried.append({"per_chip_batch": b / spatial, "error": f"{type(e).__name__}: {str(e)[:200]}"})
      break
    tried.append({"per_chip_batch": b / spatial, "total_bytes": row["total_bytes"], "fits": row.get("fits")})
    if not row.get("fits", True):
      break
    best = row
    b *= 2
  return {"program": prog.name, "largest_fitting_per_chip_batch": None if best is None else best["per_chip_batch"],
          "at_that_batch": best, "tried": tried}


# ------------------------------------------------------------------------------ reporting


def _gib(n) -> str:
  return "n/a" if n is None else f"{n / GiB:.2f}"


def markdown(result: dict[str, Any]) -> str:
  t = result["target"]
  tgt_hbm = t.get("hbm_bytes")
  lines = [f"### {result['config']} on {t['name']} ({t['chips']} chips, mesh {result['mesh']})", ""]
  lines.append("| program | global batch (per chip) | params | args GiB | temp GiB | code GiB | total GiB / chip | fits "
               "| TFLOP / chip / step | est. ms / step | MFU bound |")
  lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in result["programs"]:
    if r.get("mesh") and r["mesh"] != result["mesh"]:
      own = ", ".join(f"{k} {v}" for k, v in r["mesh"].items() if v != 1)
      r = dict(r, program=f"{r['program']} (mesh {own})")
    if "error" in r:
      lines.append(f"| {r['program']} | {r.get('global_batch')} | | | | | | compile failed: {r['error'][:120]} | | | |")
      continue
    if "refused" in r:   # XLA:TPU would not build it: its temporaries alone exceed the chip
      params = f"{r['params']:,}" if r.get("params") else ""
      lines.append(f"| {r['program']} | {r['global_batch']} ({r['per_chip_batch']:g}) | {params} | | "
                   f"{_gib(r['temp_bytes'])} (XLA refused) | | > {_gib(tgt_hbm)} | **no** | | | |")
      continue
    est = "n/a" if r.get("estimated_seconds") is None else \
        f"{1e3 * r['estimated_seconds']:.1f}" + (" (roofline)" if r.get("estimate") == "roofline" else "")
    mfu = "n/a" if r.get("mfu_bound") is None else f"{100 * r['mfu_bound']:.0f} %"
    fits = {True: "yes", False: "**no**", None: "n/a"}[r.get("fits")]
    per_chip = r["per_chip_batch"]
    params = f"{r['params']:,}" if r.get("params") else ""
    lines.append(f"| {r['program']} | {r['global_batch']} ({per_chip:g}) | {params} | {_gib(r['argument_bytes'])} "
                 f"| {_gib(r['temp_bytes'])} | {_gib(r['code_bytes'])} | {_gib(r['total_bytes'])} | {fits} "
                 f"| {r['flops_per_chip'] / 1e12:.3f} | {est} | {mfu} |")
  if result.get("find_batch"):
    lines += ["", "| program | largest fitting per-chip batch (power of two) | GiB / chip there |", "|---|---|---|"]
    for r in result["find_batch"]:
      at = r.get("at_that_batch") or {}
      lines.append(f"| {r['program']} | {r['largest_fitting_per_chip_batch'] or 'none fits at 1'} | "
                   f"{_gib(at.get('total_bytes'))} |")
  return "\n".join(lines) + "\n"


def run(config_path: str, topology: str, overrides: list[str], find: bool, only: str = "",
        chips: int = 0, forms: str = "", effort: float | None = None, lowered_only: bool = False) -> dict[str, Any]:
  """Compiles (and measures) the config's programs for `topology`, on its first `chips` chips if > 0.

  `forms` builds another platform's programs (e.g. the TPU's convolutions compiled for this CPU), to
  compare cost counts of one program across compilers. `effort`: see optimization_effort.
  `lowered_only`: no compile; each row holds only the lowered program's FLOPs (lowered_flops)."""
  config = config_files.load(config_path, overrides)
  tgt = target(topology)
  if forms:
    tgt = dataclasses.replace(tgt, forms=forms)
  if chips:
    if not 0 < chips <= tgt.chips:
      raise SystemExit(f"FATAL: --chips {chips}: {topology} has {tgt.chips} chips")
    tgt = dataclasses.replace(tgt, devices=tgt.devices[:chips])
  mesh = mesh_lib.mesh_from_config(config, devices=list(tgt.devices))
  tok_mesh = mesh_lib.mesh_from_config(config, devices=list(tgt.devices), stage="tokenizer")
  progs = [p for p in programs(config, mesh, tok_mesh)
           if not only or any(o.strip() in p.name for o in only.split(","))]
  rows, searches = [], []
  for p in progs:
    m = p.mesh if p.mesh is not None else mesh
    shards, spatial = mesh_lib.batch_shards(m), int(m.shape["spatial"])   # a volume split over `spatial` chips
    try:
      row = ({"program": p.name, "kind": p.kind, "global_batch": p.batch, "lowered_flops": lowered_flops(p, tgt, p.batch)}
             if lowered_only else measure(p, tgt, p.batch, shards * spatial, effort))
    except Exception as e:
      row = {"program": p.name, "global_batch": p.batch, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    row["mesh"] = dict(m.shape)
    print(json.dumps(row), flush=True)
    rows.append(row)
    if find and p.kind.startswith("train step"):
      searches.append(find_batch(p, tgt, shards, effort=effort, spatial=spatial))
      print(json.dumps({k: v for k, v in searches[-1].items() if k != "at_that_batch"}), flush=True)
  return {"config": os.path.relpath(os.path.abspath(config_path), REPO), "overrides": overrides,
          "target": {"name": tgt.name, "platform": tgt.platform, "forms": tgt.forms or tgt.platform, "chips": tgt.chips,
                     "device_kind": str(getattr(tgt.devices[0], "device_kind", "")),
                     "hbm_bytes": tgt.hbm_bytes, "peak_bf16_flops": tgt.peak_flops},
          "mesh": dict(mesh.shape), "jax": jax.__version__, "effort": effort, "programs": rows, "find_batch": searches}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", required=True)
  ap.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5e:16x16, v5p:4x4x4; or cpu")
  ap.add_argument("--find-batch", action="store_true")
  ap.add_argument("--only", default="", help="comma-separated substrings of program names")
  ap.add_argument("--chips", type=int, default=0, help="use only the topology's first N chips (e.g. 1: one chip)")
  ap.add_argument("--forms", default="", help="build this platform's program forms instead of the target's "
                  "(e.g. --topology cpu --forms tpu: the TPU program's cost, counted by the CPU compiler)")
  ap.add_argument("--effort", type=float, default=None,
                  help="XLA exec-time optimisation effort in [-1, 1] (default: XLA's); -1 compiles ~3x faster "
                  "with per-chip bytes within ~35 %%: for quick fit checks, not for the tables")
  ap.add_argument("--out", default="runs/aot")
  args, overrides = ap.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    ap.error(f"unknown arguments {bad} (config overrides are --config.FIELD=VALUE)")
  result = run(args.config, args.topology, overrides, args.find_batch, args.only, args.chips, args.forms, args.effort)
  os.makedirs(args.out, exist_ok=True)
  stem = f"aot_{os.path.splitext(os.path.basename(args.config))[0]}_{args.topology.replace(':', '_')}"
  stem += (f"_{args.chips}chips" if args.chips else "") + (f"_{args.forms}forms" if args.forms else "")
  io.write_json_atomic(os.path.join(args.out, stem + ".json"), result)
  io.write_text_atomic(os.path.join(args.out, stem + ".md"), markdown(result))
  print(markdown(result))
  print(f"wrote {os.path.join(args.out, stem)}.json and .md")
  return 0 if all("error" not in r for r in result["programs"]) else 1


if __name__ == "__main__":
  sys.exit(main())
