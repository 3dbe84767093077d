"""Per-convolution timings: XLA's native 3D conv vs synthmri_jax's CPU formulation.

  python tools/bench_conv.py                   # table, fp32, batch 2, the default cases (benchmark model convs)
  python tools/bench_conv.py --cases s1_32,tr_64 --rounds 5 --dtype bfloat16
  python tools/bench_conv.py --compare-flags   # cpu impl with / without the YNN flag, A-B interleaved

Forward and forward+backward (<y, g> and its gradients w.r.t. input and kernel) of one jitted
conv, the impls interleaved round by round; median (and min) wall ms over all runs after
warm-up. The machine is shared and noisy: compare rows from one run only.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if "--no-ynn-flag" not in sys.argv:  # before jax is imported (see synthmri_jax/xla_flags.py)
  from synthmri_jax.xla_flags import configure_cpu_flags
  configure_cpu_flags()

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from synthmri_jax.models import conv as C  # noqa: E402

# name: (description, op, (D, H, W), cin, cout, kernel, stride); op in conv / transpose / upsample.
CASES = {
    "s1_32": ("3x3x3 24x28x24 32->32", "conv", (24, 28, 24), 32, 32, 3, 1),
    "s1_64": ("3x3x3 24x28x24 64->64", "conv", (24, 28, 24), 64, 64, 3, 1),
    "s1_64_small": ("3x3x3 12x14x12 64->64", "conv", (12, 14, 12), 64, 64, 3, 1),
    "s1_in3": ("3x3x3 24x28x24 3->32", "conv", (24, 28, 24), 3, 32, 3, 1),
    "s2_k3": ("3x3x3 s2 24x28x24 32->32", "conv", (24, 28, 24), 32, 32, 3, 2),
    "s2_k4_in1": ("4x4x4 s2 48x56x48 1->32", "conv", (48, 56, 48), 1, 32, 4, 2),
    "s2_k4": ("4x4x4 s2 24x28x24 32->64", "conv", (24, 28, 24), 32, 64, 4, 2),
    "tr_64": ("T 4x4x4 s2 12x14x12 64->32", "transpose", (12, 14, 12), 64, 32, 4, 2),
    "tr_out1": ("T 4x4x4 s2 24x28x24 32->1", "transpose", (24, 28, 24), 32, 1, 4, 2),
    "up_64": ("up2+3x3x3 12x14x12 64->64", "upsample", (12, 14, 12), 64, 64, 3, 2),
    "c1x1": ("1x1x1 24x28x24 96->32", "conv", (24, 28, 24), 96, 32, 1, 1),
}


def make_fn(op: str, k: int, s: int, impl: str):
  pad = (k - 1) // 2 if op == "conv" else 1
  if op == "conv":
    return lambda x, w: C.conv3d(x, w, s, pad if s > 1 else "SAME", impl=impl)
  if op == "transpose":
    return lambda x, w: C.conv_transpose3d(x, w, s, pad, impl=impl)
  return lambda x, w: C.upsample_conv3d(x, w, s, "SAME", impl=impl)


def time_interleaved(fns: dict, args, rounds: int, budget_s: float) -> dict:
  """name -> list of seconds; round-robin so that load changes hit every candidate alike.

  A candidate slower than `budget_s` per call (XLA's native strided / transposed convs take
  seconds to minutes) is timed once, in the first round.
  """
  reps = {}
  for name, f in fns.items():
    jax.block_until_ready(f(*args))  # compile
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    dt = time.perf_counter() - t
    reps[name] = 0 if dt > budget_s else max(1, min(5, int(budget_s / max(dt, 1e-6) / rounds)))
  times = {name: [] for name in fns}
  for i in range(rounds):
    for name, f in fns.items():
      for _ in range(reps[name] or (1 if i == 0 else 0)):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times[name].append(time.perf_counter() - t)
  return times


def bench_case(name: str, impls: list[str], dtype, rounds: int, budget_s: float) -> dict:
  _, op, spatial, cin, cout, k, s = CASES[name]
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, *spatial, cin), dtype)
  w = (jax.random.normal(kw, (k, k, k, cin, cout)) / np.sqrt(k ** 3 * cin)).astype(dtype)
  fns = {impl: make_fn(op, k, s, impl) for impl in impls}
  ref = jax.jit(fns[impls[0]])(x, w)
  g = jax.random.normal(kg, ref.shape, dtype)
  err = {impl: float(jnp.max(jnp.abs(jax.jit(f)(x, w).astype(jnp.float32) - ref.astype(jnp.float32)))
                     / jnp.max(jnp.abs(ref.astype(jnp.float32)))) for impl, f in fns.items()}
  fwd = {impl: jax.jit(f) for impl, f in fns.items()}
  # value_and_grad: a conv is linear, so plain grad would let XLA drop the forward conv.
  fb = {impl: jax.jit(jax.value_and_grad(lambda x, w, g, f=f: jnp.sum(f(x, w).astype(jnp.float32) * g), (0, 1)))
        for impl, f in fns.items()}
  out = {"case": name, "err_vs_first": err}
  for label, group, args in (("fwd", fwd, (x, w)), ("fwd_bwd", fb, (x, w, g))):
    times = time_interleaved(group, args, rounds, budget_s)
    for impl, ts in times.items():
      out[f"{impl}_{label}_ms"] = 1e3 * float(np.median(ts))
      out[f"{impl}_{label}_min_ms"] = 1e3 * float(np.min(ts))
  return out


def print_table(rows: list[dict], impls: list[str], title: str) -> None:
  print(f"\n{title}")
  head = "| conv | " + " | ".join(f"{i} fwd / fwd+bwd ms" for i in impls)
  if len(impls) == 2:
    head += f" | speed-up {impls[0]}/{impls[1]} fwd, fwd+bwd"
  print(head + " |")
  print("|---" * (len(impls) + 1 + (len(impls) == 2)) + "|")
  for r in rows:
    cells = [f"{r[f'{i}_fwd_ms']:.1f} / {r[f'{i}_fwd_bwd_ms']:.1f}" for i in impls]
    if len(impls) == 2:
      a, b = impls
      cells.append(f"{r[f'{a}_fwd_ms'] / r[f'{b}_fwd_ms']:.1f}x, {r[f'{a}_fwd_bwd_ms'] / r[f'{b}_fwd_bwd_ms']:.1f}x")
    print(f"| {CASES[r['case']][0]} | " + " | ".join(cells) + " |")


def compare_flags(args) -> None:
  """Runs the cpu impl in fresh processes with and without the YNN flag, alternating, `--flag-rounds` times."""
  cmd = [sys.executable, os.path.abspath(__file__), "--impls", "cpu", "--cases", args.cases,
         "--rounds", str(args.rounds), "--dtype", args.dtype, "--budget-s", str(args.budget_s)]
  runs = {"ynn": [], "default": []}
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.flag_rounds):
      for variant in ("ynn", "default"):
        env = dict(os.environ)
        env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_cpu_experimental_ynn"))
        path = os.path.join(tmp, f"{variant}{i}.json")
        extra = [] if variant == "ynn" else ["--no-ynn-flag"]
        subprocess.run(cmd + extra + ["--json", path], env=env, check=True, stdout=subprocess.DEVNULL)
        with open(path) as f:
          runs[variant].append(json.load(f)["rows"])
  rows = []
  for j, name in enumerate(args.cases.split(",")):
    row = {"case": name}
    for variant in runs:
      for label in ("fwd", "fwd_bwd"):
        row[f"{variant}_{label}_ms"] = float(np.median([r[j][f"cpu_{label}_ms"] for r in runs[variant]]))
    rows.append(row)
  print_table(rows, ["default", "ynn"], f"impl=cpu, default XLA flags vs +{'YNN flag'} ({args.flag_rounds} A-B process pairs, {args.dtype})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "runs": runs}, f, indent=1)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ",".join(CASES))
  p.add_argument("--impls", default="native,cpu")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement")
  p.add_argument("--budget-s", type=float, default=4.0, help="rough seconds per impl and measurement")
  p.add_argument("--json", default=None, help="also write the rows here")
  p.add_argument("--no-ynn-flag", action="store_true", help="do not add the YNN flag (synthmri_jax/xla_flags.py)")
  p.add_argument("--compare-flags", action="store_true", help="cpu impl with vs without the YNN flag")
  p.add_argument("--flag-rounds", type=int, default=2)
  args = p.parse_args()
  for name in args.cases.split(","):
    if name not in CASES:
      p.error(f"unknown case {name!r}; known: {', '.join(CASES)}")
  if args.compare_flags:
    compare_flags(args)
    return
  impls = args.impls.split(",")
  dtype = jnp.dtype(args.dtype)
  rows = []
  for name in args.cases.split(","):
    rows.append(bench_case(name, impls, dtype, args.rounds, args.budget_s))
    print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rows[-1].items()}), flush=True)
  flags = os.environ.get("XLA_FLAGS", "") or "(none)"
  print_table(rows, impls, f"batch 2, {args.dtype}, {jax.devices()[0].device_kind}, XLA_FLAGS={flags}, "
                           f"median of interleaved runs")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "xla_flags": flags, "dtype": args.dtype}, f, indent=1)


if __name__ == "__main__":
  main()
