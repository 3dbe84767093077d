"""Train-step throughput of synthmri_jax against the PyTorch baseline (MONAI), same architecture, same device.

    pip install -e '.[baseline]' torch==2.13.0 einops   # torch's CPU or CUDA wheel, installed separately
    python tools/benchmark_throughput.py                 # both models, fp32 and bf16, JSON + markdown in bench_out/
    python tools/benchmark_throughput.py --models unet --dtypes fp32 --steps 6 --rounds 3

What is compared (issue 7's configurations, batch 2):
  unet   MONAI DiffusionModelUNet(spatial_dims=3, 3->3 channels, channels 32/64/64, 1 res block,
         attention at levels 2-3, 64 head channels) on a 3x24x28x24 latent, epsilon-prediction
         DDPM loss; vs synthmri_jax.models.unet.DiffusionUNet with the same settings.
  vqvae  MONAI VQVAE(spatial_dims=3, channels 32/64, 1 res layer, 256x32 EMA codebook) on a
         1x48x56x48 volume, L1 + commitment loss; vs synthmri_jax.models.monai_mirror.VQVAE.
The parameter counts must agree within 5 % (they agree exactly), else the run stops.

A train step is forward + backward + AdamW: PyTorch's torch.optim.AdamW in a plain loop (with
torch.autocast for bf16 = AMP), ours the shared trainer's jitted step (synthmri_jax.training.trainer;
compute_dtype bfloat16 keeps fp32 master weights). After warm-up (compilation, first steps), rounds
alternate A B A B ... so background load hits both sides alike; each step is timed on its own
(device synchronised) and the median over all rounds is reported, with the spread.

Reported per model, precision and framework: median ms/step, samples/s, peak memory (CPU: the
process's peak RSS while that framework's steps ran and its growth above the RSS before them, from
a 2 ms sampler; GPU: the allocator's peak), model FLOPs per step (torch.utils.flop_counter on the
MONAI model, forward + backward: the same architecture, so one count for both), XLA's own count
(compiled cost_analysis), achieved TFLOP/s and, on GPU, MFU against --peak-tflops (default from the
device: H100 798, H200 790 bf16 TFLOP/s measured on this workplace's GPUs). For the U-Net also DDIM
sampling steps/s (batch 2, 10 steps, inference only).

CPU notes: before jax is imported this sets XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=... (see
BENCHMARKS.md; --no-xla-cpu-flags to measure without) and, with --hugetlb, re-executes itself with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (applies to both frameworks).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution,eltwise"
HUGETLB = "glibc.malloc.hugetlb=1"
# Peak bf16 TFLOP/s that MFU divides by: an 8192^3 bf16 matmul timed on each chip before this
# repository had a GPU check (not re-measured here: no GPU lent yet); replace it with a matmul
# timed on the lent chip once one is lent.
PEAK_BF16_TFLOPS = {"H100": 798.0, "H200": 790.0}
MODELS = ("unet", "vqvae")
DTYPES = ("fp32", "bf16")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=",".join(MODELS), help="comma-separated: unet, vqvae")
  p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated: fp32, bf16 (AMP on the PyTorch side)")
  p.add_argument("--frameworks", default="monai,jax", help="comma-separated: monai, jax")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per framework after compilation")
  p.add_argument("--steps", type=int, default=5, help="timed steps per framework per round")
  p.add_argument("--rounds", type=int, default=3, help="A/B rounds")
  p.add_argument("--ddim-steps", type=int, default=10, help="DDIM steps to time for the U-Net (0: skip)")
  p.add_argument("--conv-impl", default="auto", help="synthmri_jax Conv3D formulation (auto: chosen by backend)")
  p.add_argument("--monai-flash-attention", action="store_true",
                 help="MONAI U-Net with use_flash_attention=True (torch SDPA) instead of its default einsum attention")
  p.add_argument("--device", default="auto", help="auto (GPU when both frameworks see one), cpu or gpu")
  p.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak for MFU; 0: from the device name")
  p.add_argument("--no-xla-cpu-flags", action="store_true", help="do not add the YNN fusion flag on CPU")
  p.add_argument("--hugetlb", action="store_true", help=f"re-run with GLIBC_TUNABLES={HUGETLB}")
  p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                 help="after timing, trace this many of our steps with jax.profiler (OUT/profile_<model>_<precision>/) "
                      "and add a per-op-kind table (tools/xla_profile.py)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="bench_out", help="directory for benchmark.json and benchmark.md")
  p.add_argument("--tag", default="", help="suffix for the output file names (e.g. a variant name)")
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(",") if m]
  args.dtypes = [d for d in args.dtypes.split(",") if d]
  args.frameworks = [f for f in args.frameworks.split(",") if f]
  for name, values, allowed in (("models", args.models, MODELS), ("dtypes", args.dtypes, DTYPES),
                                ("frameworks", args.frameworks, ("monai", "jax"))):
    bad = [v for v in values if v not in allowed]
    if bad or not values:
      p.error(f"--{name}: {bad or 'empty'} not in {allowed}")
  return args


def prepare_environment(args: argparse.Namespace) -> None:
  """Process-level settings that must precede the jax import (XLA flags) or the process (malloc)."""
  if args.hugetlb and HUGETLB not in os.environ.get("GLIBC_TUNABLES", ""):
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(x for x in (env.get("GLIBC_TUNABLES", ""), HUGETLB) if x)
    os.execve(sys.executable, [sys.executable] + sys.argv, env)
  # JAX would otherwise take 75 % of GPU memory up front and leave PyTorch too little.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args.device != "gpu" and not args.no_xla_cpu_flags and "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + YNN_FLAG).strip()
  if args.device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"


# ------------------------------------------------------------------------------ measurement helpers


class RssSampler:
  """Peak resident set size of this process while a block runs (CPU memory of one framework's steps)."""

  def __init__(self, interval: float = 0.002):
    self.interval = interval
    self._page = os.sysconf("SC_PAGE_SIZE")
    self._stop = threading.Event()
    self.peak = 0
    self.start_rss = 0

  def rss(self) -> int:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * self._page

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self.rss())
      time.sleep(self.interval)

  def __enter__(self):
    self.start_rss = self.peak = self.rss()
    self._stop.clear()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self.rss())


def machine_info() -> dict:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
          "loadavg_start": list(os.getloadavg())}


def summarize(times_s: list[float], batch: int) -> dict:
  ms = sorted(t * 1e3 for t in times_s)
  med = statistics.median(ms)
  q = lambda f: ms[min(len(ms) - 1, int(round(f * (len(ms) - 1))))]
  return {"median_ms": med, "p10_ms": q(0.1), "p90_ms": q(0.9), "n": len(ms), "samples_per_s": batch * 1e3 / med}


# ------------------------------------------------------------------------------ PyTorch / MONAI side


class TorchRunner:
  """One MONAI model, its AdamW and a fixed batch; step() is one timed train step."""

  def __init__(self, model_name: str, dtype: str, batch: int, device: str, seed: int, flash: bool = False):
    import torch
    from monai.networks.nets import VQVAE, DiffusionModelUNet
    self.torch = torch
    torch.manual_seed(seed)
    self.device = torch.device("cuda" if device == "gpu" else "cpu")
    self.amp = dtype == "bf16"
    self.name = model_name
    if model_name == "unet":
      self.model = DiffusionModelUNet(spatial_dims=3, in_channels=3, out_channels=3, channels=(32, 64, 64),
                                      attention_levels=(False, True, True), num_res_blocks=1,
                                      num_head_channels=(0, 64, 64), use_flash_attention=flash)
      self.x = torch.randn(batch, 3, 24, 28, 24)
      self.noise = torch.randn_like(self.x)
      self.t = torch.randint(0, 1000, (batch,))
      betas = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
      self.abar = torch.cumprod(1 - betas, 0).float()
    else:
      self.model = VQVAE(spatial_dims=3, in_channels=1, out_channels=1, channels=(32, 64), num_res_channels=(32, 64),
                         num_res_layers=1, downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
                         upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)), num_embeddings=256, embedding_dim=32)
      self.x = torch.rand(batch, 1, 48, 56, 48)
    self.model.to(self.device).train()
    for name in ("x", "noise", "t", "abar"):
      if hasattr(self, name):
        setattr(self, name, getattr(self, name).to(self.device))
    self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)

  def num_params(self) -> int:
    return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

  def _loss(self):
    torch = self.torch
    with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
      if self.name == "unet":
        a = self.abar[self.t].view(-1, 1, 1, 1, 1)
        x_t = a.sqrt() * self.x + (1 - a).sqrt() * self.noise
        pred = self.model(x_t, timesteps=self.t)
        return torch.nn.functional.mse_loss(pred.float(), self.noise)
      recon, q_loss = self.model(self.x)
      return torch.nn.functional.l1_loss(recon.float(), self.x) + q_loss

  def sync(self):
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()

  def step(self) -> float:
    self.opt.zero_grad(set_to_none=True)
    loss = self._loss()
    loss.backward()
    self.opt.step()
    self.sync()
    return float(loss.detach())

  def flops(self) -> float:
    """Forward + backward FLOPs of one step (optimizer excluded), counted by PyTorch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
      self._loss().backward()
    self.opt.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())

  def reset_memory(self):
    if self.device.type == "cuda":
      self.torch.cuda.reset_peak_memory_stats()

  def device_peak_bytes(self) -> int | None:
    return int(self.torch.cuda.max_memory_allocated()) if self.device.type == "cuda" else None

  def ddim(self, steps: int) -> Callable[[], None]:
    """A function that runs `steps` DDIM steps from noise (the MONAI scheduler), inference only."""
    torch = self.torch
    from monai.networks.schedulers import DDIMScheduler
    sched = DDIMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=False)
    sched.set_timesteps(num_inference_steps=steps)
    model = self.model

    def run():
      model.eval()
      with torch.inference_mode(), torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                                                  enabled=self.amp):
        x = torch.randn_like(self.x)
        for t in sched.timesteps:
          eps = model(x, timesteps=torch.full((x.shape[0],), int(t), device=self.device))
          x, _ = sched.step(eps.float(), int(t), x)
      self.sync()
      model.train()

    return run


# ------------------------------------------------------------------------------ JAX side


def jax_model(model_name: str, dtype: str, conv_impl: str):
  import jax.numpy as jnp
  dt = jnp.bfloat16 if dtype == "bf16" else jnp.float32
  if model_name == "unet":
    from synthmri_jax.models.unet import DiffusionUNet
    return DiffusionUNet(out_channels=3, channels=(32, 64, 64), num_res_blocks=1, attention_levels=(False, True, True),
                         num_head_channels=(0, 64, 64), norm_num_groups=32, with_conditioning=False, conditioning=None,
                         dtype=dt, conv_impl=conv_impl)
  from synthmri_jax.models.monai_mirror import VQVAE
  return VQVAE(in_channels=1, out_channels=1, channels=(32, 64), num_res_channels=(32, 64), num_res_layers=1,
               num_embeddings=256, embedding_dim=32, dtype=dt, conv_impl=conv_impl)


class UNetBenchTask:
  """Epsilon-prediction DDPM loss on a fixed batch (x0, noise, t): the same arithmetic as TorchRunner."""

  name = "bench_unet"

  def __init__(self, model):
    import jax.numpy as jnp
    import numpy as np
    self.model = model
    betas = np.linspace(1e-4, 2e-2, 1000, dtype=np.float64)
    self.abar = jnp.asarray(np.cumprod(1 - betas), jnp.float32)

  def init(self, rng, batch):
    variables = self.model.init(rng, batch["x"], batch["t"])
    return variables["params"], {}

  def loss(self, params, model_state, batch, rng, step):
    import jax.numpy as jnp
    a = self.abar[batch["t"]].astype(batch["x"].dtype)[:, None, None, None, None]
    x_t = jnp.sqrt(a) * batch["x"] + jnp.sqrt(1 - a) * batch["noise"]
    pred = self.model.apply({"params": params}, x_t, batch["t"])
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - batch["noise"].astype(jnp.float32))), ({}, model_state)


class VQVAEBenchTask:
  """L1 reconstruction + commitment loss, EMA codebook update in 'vq_stats' (as MONAI's train mode)."""

  name = "bench_vqvae"

  def __init__(self, model):
    self.model = model

  def init(self, rng, batch):
    variables = dict(self.model.init(rng, batch["x"]))
    params = variables.pop("params")
    return params, variables

  def loss(self, params, model_state, batch, rng, step):
    import jax.numpy as jnp
    (recon, q_loss), new_ms = self.model.apply({"params": params, **model_state}, batch["x"], train=True,
                                               mutable=list(model_state))
    l1 = jnp.mean(jnp.abs(recon.astype(jnp.float32) - batch["x"].astype(jnp.float32)))
    return l1 + q_loss, ({}, dict(new_ms))


class JaxRunner:
  """The shared trainer's jitted step for the mirror model on one device, fixed batch."""

  def __init__(self, model_name: str, dtype: str, batch: int, conv_impl: str, seed: int):
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    from synthmri_jax import sharding as mesh_lib
    from synthmri_jax.training import optim, trainer
    self.jax = jax
    r = np.random.default_rng(seed)
    model = jax_model(model_name, dtype, conv_impl)
    self.model = model
    if model_name == "unet":
      host = {"x": r.standard_normal((batch, 24, 28, 24, 3), np.float32),
              "noise": r.standard_normal((batch, 24, 28, 24, 3), np.float32),
              "t": r.integers(0, 1000, (batch,)).astype(np.int32)}
      self.task = UNetBenchTask(model)
    else:
      host = {"x": r.random((batch, 48, 56, 48, 1), np.float32)}
      self.task = VQVAEBenchTask(model)
    cfg = optim.train_config(ml_collections.ConfigDict(dict(
        steps=1_000_000, lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=1e-4, clip_norm=0.0,
        compute_dtype="bfloat16" if dtype == "bf16" else "float32", seed=seed)))
    self.mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), devices=jax.devices()[:1])
    bsh, rep = mesh_lib.batch_sharding(self.mesh), mesh_lib.replicated(self.mesh)
    self.batch = trainer.shard_batch(host, bsh)
    init_fn, abstract, state_sh, tx = trainer.build_state(self.task, cfg, self.mesh, self.batch)
    self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    self.state = init_fn()
    self.key = jax.random.key(seed)
    import flax.linen as nn
    self._ctx = lambda: _Both(jax.set_mesh(self.mesh), nn.logical_axis_rules(mesh_lib.LOGICAL_AXIS_RULES))
    with self._ctx():
      self.p_step = jax.jit(trainer.make_train_step(self.task, tx, cfg), in_shardings=(state_sh, bsh, rep),
                            out_shardings=(state_sh, rep), donate_argnums=0)
      t0 = time.perf_counter()
      self.compiled = self.p_step.lower(self.state, self.batch, self.key).compile()
      self.compile_s = time.perf_counter() - t0
    self.i = 0
    self.dtype = jnp.bfloat16 if dtype == "bf16" else jnp.float32

  def num_params(self) -> int:
    return self.n_params

  def step(self) -> float:
    self.state, metrics = self.compiled(self.state, self.batch, self.jax.random.fold_in(self.key, self.i))
    self.i += 1
    self.jax.block_until_ready((self.state, metrics))
    return float(metrics["loss"])

  def xla_flops(self) -> float | None:
    try:
      cost = self.compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      return float(cost.get("flops")) if cost and cost.get("flops") is not None else None
    except Exception:
      return None

  def xla_temp_bytes(self) -> int | None:
    """Scratch memory XLA planned for one step (activations, gradients, temporaries): its working set."""
    try:
      return int(self.compiled.memory_analysis().temp_size_in_bytes)
    except Exception:
      return None

  def device_peak_bytes(self) -> int | None:
    dev = self.jax.devices()[0]
    if dev.platform == "cpu":
      return None
    stats = dev.memory_stats() or {}
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None

  def ddim(self, steps: int) -> Callable[[], None]:
    """Jitted DDIM loop (synthmri_jax.diffusion.samplers) of `steps` steps; params stay traced arguments."""
    jax = self.jax
    from synthmri_jax.diffusion.samplers import ddim_sample
    from synthmri_jax.diffusion.schedules import make_schedule
    schedule = make_schedule("linear", 1000)
    shape = tuple(self.batch["x"].shape)
    model, dtype = self.model, self.dtype

    @jax.jit
    def sample(params, rng):
      params = jax.tree.map(lambda p: p.astype(dtype), params)
      fn = lambda x, t, c: model.apply({"params": params}, x.astype(dtype), t)
      return ddim_sample(fn, schedule, shape, rng, num_inference_steps=steps)

    key = jax.random.key(1)
    with self._ctx():
      compiled = sample.lower(self.state.params, key).compile()

    def run():
      jax.block_until_ready(compiled(self.state.params, key))

    return run


class _Both:
  def __init__(self, *cms):
    self.cms = cms

  def __enter__(self):
    for cm in self.cms:
      cm.__enter__()

  def __exit__(self, *exc):
    for cm in reversed(self.cms):
      cm.__exit__(*exc)


# ------------------------------------------------------------------------------ the run


def peak_tflops(args, device_kind: str) -> float | None:
  if args.peak_tflops > 0:
    return args.peak_tflops
  for name, peak in PEAK_BF16_TFLOPS.items():
    if name in device_kind:
      return peak
  return None


def bench_pair(args, model_name: str, dtype: str, gpu: bool, log) -> dict:
  """Builds both sides, checks the parameter counts, alternates timed rounds; one result dict."""
  runners: dict[str, Any] = {}
  if "monai" in args.frameworks:
    runners["monai"] = TorchRunner(model_name, dtype, args.batch, "gpu" if gpu else "cpu", args.seed,
                                   args.monai_flash_attention)
  if "jax" in args.frameworks:
    runners["jax"] = JaxRunner(model_name, dtype, args.batch, args.conv_impl, args.seed)
  params = {k: r.num_params() for k, r in runners.items()}
  log(f"[{model_name} {dtype}] trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()))
  if len(params) == 2:
    ratio = params["jax"] / params["monai"]
    if abs(ratio - 1) > 0.05:
      raise SystemExit(f"parameter counts differ by {100 * (ratio - 1):+.1f} % (> 5 %): not the same architecture")
  result = {"model": model_name, "dtype": dtype, "batch": args.batch, "params": params, "frameworks": {}}
  flops = None
  if "monai" in runners:
    flops = runners["monai"].flops()
  result["model_flops_per_step"] = flops
  if "jax" in runners:
    result["jax_compile_s"] = runners["jax"].compile_s
    result["xla_flops_per_step"] = runners["jax"].xla_flops()
    result["xla_temp_bytes"] = runners["jax"].xla_temp_bytes()

  for name, r in runners.items():
    t0 = time.perf_counter()
    losses = [r.step() for _ in range(max(1, args.warmup))]
    log(f"[{model_name} {dtype}] {name} warm-up {time.perf_counter() - t0:.1f}s, loss {losses[-1]:.4g}")
  times = {k: [] for k in runners}
  mem = {k: {"peak_rss_bytes": 0, "rss_growth_bytes": 0} for k in runners}
  order = list(runners)
  for rnd in range(args.rounds):
    for name in (order if rnd % 2 == 0 else order[::-1]):
      r = runners[name]
      if name == "monai":
        r.reset_memory()
      with RssSampler() as s:
        for _ in range(args.steps):
          t0 = time.perf_counter()
          r.step()
          times[name].append(time.perf_counter() - t0)
      mem[name]["peak_rss_bytes"] = max(mem[name]["peak_rss_bytes"], s.peak)
      mem[name]["rss_growth_bytes"] = max(mem[name]["rss_growth_bytes"], s.peak - s.start_rss)
    log(f"[{model_name} {dtype}] round {rnd + 1}/{args.rounds}: " + ", ".join(
        f"{k} {1e3 * statistics.median(v[-args.steps:]):.0f} ms" for k, v in times.items()))

  for name, r in runners.items():
    out = summarize(times[name], args.batch)
    out.update(mem[name])
    out["device_peak_bytes"] = r.device_peak_bytes()
    if flops:
      out["tflops"] = flops / (out["median_ms"] * 1e-3) / 1e12
    result["frameworks"][name] = out

  if model_name == "unet" and args.ddim_steps > 0:
    for name, r in runners.items():
      run = r.ddim(args.ddim_steps)
      run()  # warm-up (and compilation for jax)
      ts = []
      for _ in range(max(2, args.rounds)):
        t0 = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t0)
      result["frameworks"][name]["ddim_steps_per_s"] = args.ddim_steps / statistics.median(ts)
    log(f"[{model_name} {dtype}] DDIM steps/s: " + ", ".join(
        f"{k} {v['ddim_steps_per_s']:.2f}" for k, v in result["frameworks"].items()))
  if args.profile > 0 and "jax" in runners:
    import xla_profile  # tools/, next to this script
    r = runners["jax"]
    rows, info = xla_profile.profile_steps(r.step, r.compiled.as_text(), args.profile,
                                           os.path.join(args.out, f"profile_{model_name}_{dtype}"))
    result["jax_profile"] = {"rows": rows, **info}
    log(f"[{model_name} {dtype}] jax profile:\n" + xla_profile.markdown(rows, info))
  if len(runners) == 2:
    result["jax_over_monai"] = (result["frameworks"]["jax"]["samples_per_s"]
                                / result["frameworks"]["monai"]["samples_per_s"])
  return result


def markdown(report: dict) -> str:
  dev = report["device"]
  gpu = dev["gpu"]
  lines = [f"Device: {dev['description']}. Load average at start / end: "
           f"{report['machine']['loadavg_start'][0]:.1f} / {report['machine']['loadavg_end'][0]:.1f}.",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ".",
           f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, "
           f"conv_impl={report['args']['conv_impl']}, batch {report['args']['batch']}, "
           f"{report['args']['rounds']} rounds x {report['args']['steps']} steps per framework.", "",
           "| model | precision | framework | params | ms/step (median) | p10-p90 ms | samples/s | JAX/MONAI | "
           "peak RSS MiB (growth) | device peak MiB | TFLOP/s | MFU | DDIM steps/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  mib = lambda b: "" if b is None else f"{b / 2**20:.0f}"
  for r in report["results"]:
    for name, f in r["frameworks"].items():
      ratio = f"{r['jax_over_monai']:.2f}x" if name == "jax" and "jax_over_monai" in r else ""
      mfu = f"{100 * f['mfu']:.1f} %" if f.get("mfu") is not None else "n/a"
      tfl = f"{f['tflops']:.3f}" if f.get("tflops") is not None else ""
      ddim = f"{f['ddim_steps_per_s']:.2f}" if "ddim_steps_per_s" in f else ""
      lines.append(f"| {r['model']} | {r['dtype']} | {name} | {r['params'][name]:,} | {f['median_ms']:.0f} | "
                   f"{f['p10_ms']:.0f}-{f['p90_ms']:.0f} | {f['samples_per_s']:.2f} | {ratio} | "
                   f"{mib(f['peak_rss_bytes'])} ({mib(f['rss_growth_bytes'])}) | {mib(f['device_peak_bytes'])} | "
                   f"{tfl} | {mfu} | {ddim} |")
  lines.append("")
  for r in report["results"]:
    mf, xf, tb = r.get("model_flops_per_step"), r.get("xla_flops_per_step"), r.get("xla_temp_bytes")
    lines.append(f"- {r['model']} {r['dtype']}: model FLOPs/step (torch flop counter, fwd+bwd) "
                 f"{'' if mf is None else f'{mf / 1e9:.1f} G'}; XLA cost analysis of our step "
                 f"{'' if xf is None else f'{xf / 1e9:.1f} G'}; XLA's planned scratch memory per step "
                 f"{'' if tb is None else f'{tb / 2**20:.0f} MiB'}; JAX compile {r.get('jax_compile_s', 0):.1f} s.")
  for r in report["results"]:
    if "jax_profile" in r:
      import xla_profile
      prof = r["jax_profile"]
      lines += ["", f"Profile of our {r['model']} {r['dtype']} step (jax.profiler, {prof['steps']} steps):", "",
                xla_profile.markdown(prof["rows"], prof)]
  if not gpu:
    lines.append("- CPU run: MFU is not defined (no peak); TFLOP/s is the achieved model FLOP rate.")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  args = parse_args(argv)
  prepare_environment(args)
  import jax
  versions = {"jax": jax.__version__}
  import flax
  versions["flax"] = flax.__version__
  torch_ok = True
  try:
    import monai
    import torch
    versions.update(torch=torch.__version__, monai=monai.__version__)
  except ImportError as e:
    torch_ok = False
    if "monai" in args.frameworks:
      raise SystemExit(f"the PyTorch baseline needs torch and monai ({e}): pip install -e '.[baseline]' torch==2.13.0 einops "
                       "(or --frameworks jax)")
  jax_gpu = jax.devices()[0].platform == "gpu"
  torch_gpu = torch_ok and torch.cuda.is_available()
  gpu = jax_gpu if args.device == "auto" else args.device == "gpu"
  if gpu and not jax_gpu:
    raise SystemExit("--device gpu: jax sees no GPU (install jax[cuda12] or jax[cuda13])")
  if gpu and "monai" in args.frameworks and not torch_gpu:
    raise SystemExit("jax runs on the GPU but torch sees none: install a CUDA build of torch, or pass --device cpu "
                     "to compare both on the CPU")
  info = machine_info()
  if gpu:
    kind = jax.devices()[0].device_kind
    desc = f"{kind} (jax) / {torch.cuda.get_device_name(0) if torch_gpu else '-'} (torch)"
  else:
    kind = "cpu"
    desc = f"CPU {info['cpu']}, {info['cores']} cores, no GPU"
  peak = peak_tflops(args, kind) if gpu else None
  log = lambda msg: print(msg, flush=True)
  log(f"device: {desc}; load average {info['loadavg_start'][0]:.1f}")

  results = []
  for model_name in args.models:
    for dtype in args.dtypes:
      r = bench_pair(args, model_name, dtype, gpu, log)
      for f in r["frameworks"].values():
        f["mfu"] = (f["tflops"] / peak) if (peak and dtype == "bf16" and f.get("tflops")) else None
      results.append(r)
  info["loadavg_end"] = list(os.getloadavg())
  report = {"args": vars(args), "machine": info, "versions": versions,
            "device": {"gpu": gpu, "kind": kind, "description": desc, "peak_bf16_tflops": peak},
            "env": {k: os.environ.get(k, "") for k in ("XLA_FLAGS", "GLIBC_TUNABLES", "JAX_PLATFORMS")},
            "results": results}
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, "benchmark" + (f"_{args.tag}" if args.tag else ""))
  from synthmri_jax.utils.io import write_json_atomic, write_text_atomic
  write_json_atomic(stem + ".json", report)
  md = markdown(report)
  write_text_atomic(stem + ".md", md)
  print("\n" + md)
  print(f"wrote {stem}.json and {stem}.md")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
