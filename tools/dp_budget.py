"""DP-SGD privacy budget, to run *before* training: ε for a noise multiplier, or the noise for a target ε.

  python tools/dp_budget.py --dataset-size 96 --batch-size 8 --epochs 50 \\
      --noise-multiplier 1.0 --delta 1e-3
  python tools/dp_budget.py --dataset-size 96 --batch-size 8 --epochs 50 \\
      --target-epsilon 8 --delta 1e-3

Accounts T steps of Poisson-subsampled Gaussian DP-SGD (q = batch / dataset size,
add-or-remove-one adjacency) with both of dp_accounting's accountants: PLD (tight; the
number to report) and RDP (a looser upper bound, for comparison with RDP-based papers).
Without --delta, δ = 1/(10 n): well below 1/n, since δ ≥ 1/n is met by a mechanism that
publishes one random record in full. Runs from a fresh clone, without installing the package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from synthmri_jax.training import dp_accounting as dpa  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split("\n", 1)[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--dataset-size", type=int, required=True,
                 help="number of private training examples n")
  p.add_argument("--batch-size", type=int, required=True,
                 help="expected (Poisson) batch size B; q = B / n")
  length = p.add_mutually_exclusive_group(required=True)
  length.add_argument("--epochs", type=float, help="training length in epochs (steps = ceil(E n / B))")
  length.add_argument("--steps", type=int, help="training length in steps")
  goal = p.add_mutually_exclusive_group(required=True)
  goal.add_argument("--noise-multiplier", type=float,
                    help="noise std / clipping norm; prints the ε it gives")
  goal.add_argument("--target-epsilon", type=float,
                    help="prints the smallest noise multiplier with ε ≤ this")
  p.add_argument("--delta", type=float, default=None, help="target δ (default: 1/(10 n))")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  return p.parse_args(argv)


def budget(args: argparse.Namespace) -> dict[str, float | int | None]:
  """The settings and, per accountant, ε (given noise) or the calibrated noise (given target ε)."""
  n, b = args.dataset_size, args.batch_size
  q = dpa.sampling_probability(b, n)
  steps = args.steps if args.steps is not None else dpa.steps_for_epochs(args.epochs, b, n)
  delta = dpa.default_delta(n) if args.delta is None else args.delta
  out: dict[str, float | int | None] = {
      "dataset_size": n, "batch_size": b, "sampling_probability": q, "steps": steps,
      "epochs": steps * q, "delta": delta,
      "noise_multiplier": args.noise_multiplier, "target_epsilon": args.target_epsilon,
  }
  for acc in dpa.ACCOUNTANTS:
    if args.target_epsilon is None:
      out[f"epsilon_{acc}"] = dpa.epsilon(args.noise_multiplier, b, n, steps, delta, acc)
    else:
      noise = dpa.calibrate_noise(args.target_epsilon, b, n, steps, delta, acc)
      out[f"noise_multiplier_{acc}"] = noise
      out[f"epsilon_{acc}"] = dpa.epsilon(noise, b, n, steps, delta, acc)
  return out


def format_text(r: dict[str, float | int | None]) -> str:
  lines = [
      "DP-SGD budget: Poisson-subsampled Gaussian, add-or-remove-one adjacency",
      f"  dataset_size:          {r['dataset_size']}",
      f"  batch_size:            {r['batch_size']} (expected)",
      f"  sampling_probability:  {r['sampling_probability']:.6g}",
      f"  steps:                 {r['steps']}",
      f"  epochs:                {r['epochs']:.6g}",
      f"  delta:                 {r['delta']:.6g}",
  ]
  if r["target_epsilon"] is None:
    lines.append(f"  noise_multiplier:      {r['noise_multiplier']:.6g}")
    lines += [f"epsilon_{a}: {r[f'epsilon_{a}']:.6f}" for a in dpa.ACCOUNTANTS]
  else:
    lines.append(f"  target_epsilon:        {r['target_epsilon']:.6g}")
    for a in dpa.ACCOUNTANTS:
      lines.append(f"noise_multiplier_{a}: {r[f'noise_multiplier_{a}']:.6f}"
                   f"  (epsilon_{a} = {r[f'epsilon_{a}']:.6f})")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  warnings.formatwarning = lambda message, *_args, **_kw: f"dp_budget: warning: {message}\n"
  try:
    r = budget(args)
  except ValueError as e:
    print(f"dp_budget: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(r, indent=2) if args.json else format_text(r))
  return 0


if __name__ == "__main__":
  sys.exit(main())
