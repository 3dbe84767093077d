"""What usefulness costs: TSTR / TRTR, fidelity and copies as the LDM trains longer.

    python tools/learning_curve.py --config configs/quickstart.py --workdir runs/curve --ldm_steps 100,200,400,800

Runs the pipeline once up to the tokenizer (or reuses WORKDIR's), then, for each LDM budget in
increasing order: trains the LDM on to that many steps (the trainer resumes the previous point's
checkpoint, so the points share their training; the learning-rate schedule is re-planned for the
new total, as a user who raises `ldm.train.steps` and reruns gets), samples the synthetic cohort,
and evaluates it (the TRTR runs are trained once and reused). Each point records:
  - TSTR and TRTR AUC with their 95 % intervals and the ratio,
  - FD / KID on the TRTR classifier's features, MS-SSIM diversity,
  - the copy fraction (privacy report) and the LDM's membership-inference AUC,
  - the codec check and the paired conditioning check (evaluation/anatomy.json),
  - the cumulative wall time of the whole curve so far (prepare + tokenizer included).
Writes WORKDIR/learning_curve/curve.{json,md,png} after every point (a killed run keeps what it
measured; rerunning resumes). --tokenizer_steps 200,400 adds the tokenizer budget as an outer
axis (each tokenizer budget gets its own sub-workdir sharing the prepared cohort).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from synthmri_jax.xla_flags import configure_cpu_flags  # noqa: E402

configure_cpu_flags()


from synthmri_jax import stages as stages_lib  # noqa: E402
from synthmri_jax.utils import config_files, io  # noqa: E402

OUT = "learning_curve"


def _stage(config, workdir: str, name: str) -> float:
  t0 = time.time()
  stages_lib.get_stage(name)(config, workdir)
  return time.time() - t0


def _get(d, *keys):
  for k in keys:
    if not isinstance(d, dict):
      return None
    d = d.get(k)
  return d


def point_row(workdir: str) -> dict:
  """The numbers of one curve point, read from the stage outputs in `workdir`."""
  ev = io.read_json(os.path.join(workdir, "evaluation", "evaluation.json")) or {}
  pv = io.read_json(os.path.join(workdir, "evaluation", "privacy.json")) or {}
  an = io.read_json(os.path.join(workdir, "evaluation", "anatomy.json")) or {}
  ldm = io.read_json(os.path.join(workdir, "ldm", "ldm.json")) or {}
  arms = _get(ev, "classification", "arms") or {}
  row = {"ldm_step": ldm.get("step"), "ldm_final_loss": ldm.get("final_loss")}
  for arm in ("TRTR", "TSTR"):
    s = _get(arms, arm, "seed_mean_scores") or {}
    row[arm] = {"auc": s.get("auc"), "ci_low": s.get("ci_low"), "ci_high": s.get("ci_high")}
  row["tstr_trtr_ratio"] = _get(ev, "classification", "tstr_trtr_ratio", "value")
  fid = ev.get("fidelity") or {}
  fd = fid.get("FD_trtr_classifier") or {}
  row["fd"] = {k: v for k, v in fd.items() if "reference" not in k}
  row["fd_reference"] = {k: v for k, v in fd.items() if "reference" in k}
  div = _get(fid, "ms_ssim_diversity", "channels") or {}
  first = next(iter(div.values()), {})
  row["ms_ssim"] = {k: v.get("mean") for k, v in first.items()}
  row["copy_fraction"] = pv.get("copy_fraction")
  row["mia_auc"] = _get(pv, "membership_inference", "loss_attack", "auc")
  row["codec_ventricle_kept"] = _get(an, "codec", "measures", "ventricle_ml", "ratio")
  row["paired_ventricle_ratio"] = _get(an, "paired", "measures", "ventricle_ml", "ratio_to_real")
  row["synthetic_ventricle_effect_ratio"] = _get(an, "by_label", "ventricle_ml", "effect_ratio")
  return row


def _fmt(x, d=3):
  return "n/a" if x is None else f"{x:.{d}f}"


def _tokenizer_steps(config) -> int:
  t = config.tokenizer
  if str(t.variant) == "dual":
    return sum(int(t.phase_train[s].steps) for s in str(t.phases).split(",") if s.strip())
  return int(t.phase_train.main.steps)


def _pct(x):
  return "n/a" if x is None else f"{100 * x:.1f} %"


def _fd_value(row):
  fd = row.get("fd") or {}
  v = next(iter(fd.values()), None)
  return v.get("value") if isinstance(v, dict) else None


def markdown(rows: list[dict], machine: str) -> str:
  out = [f"Learning curve ({machine}); AUCs on the real test split with 95 % subject-bootstrap intervals.", "",
         "| tokenizer steps | LDM steps | wall (min) | TRTR AUC [CI] | TSTR AUC [CI] | TSTR/TRTR | FD | MS-SSIM syn | "
         "copies | MIA AUC | codec kept | paired/real |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    t, s = r["TRTR"], r["TSTR"]
    ms = r.get("ms_ssim") or {}
    syn = next((v for k, v in ms.items() if "synthetic" in k), None)
    out.append(f"| {r.get('tokenizer_trained_steps', r.get('tokenizer_steps'))} | {r['ldm_step']} | {_fmt(r['wall_s'] / 60, 1)} | "
               f"{_fmt(t['auc'])} [{_fmt(t['ci_low'])}, {_fmt(t['ci_high'])}] | "
               f"{_fmt(s['auc'])} [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}] | {_fmt(r['tstr_trtr_ratio'])} | "
               f"{_fmt(_fd_value(r), 2)} | {_fmt(syn)} | "
               f"{_pct(r['copy_fraction'])} | "
               f"{_fmt(r['mia_auc'])} | {_fmt(r['codec_ventricle_kept'], 2)} | {_fmt(r['paired_ventricle_ratio'], 2)} |")
  return "\n".join(out) + "\n"


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.0, 3.6))
  for tok in sorted({r.get("tokenizer_steps") for r in rows}, key=lambda x: (x is None, x)):
    rs = [r for r in rows if r.get("tokenizer_steps") == tok]
    x = [r["wall_s"] / 60 for r in rs]
    for arm, color in (("TSTR", "#a33c00"), ("TRTR", "#1f4e9a")):
      y = [r[arm]["auc"] for r in rs]
      lo = [r[arm]["auc"] - r[arm]["ci_low"] if r[arm]["ci_low"] is not None else 0 for r in rs]
      hi = [r[arm]["ci_high"] - r[arm]["auc"] if r[arm]["ci_high"] is not None else 0 for r in rs]
      ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, color=color,
                  label=f"{arm} (tokenizer {tok} steps)" if len({r.get('tokenizer_steps') for r in rows}) > 1 else arm)
      for xi, yi, r in zip(x, y, rs):
        if arm == "TSTR":
          ax.annotate(str(r["ldm_step"]), (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7)
  ax.axhline(0.5, color="grey", lw=0.8, ls="--")
  ax.set_xlabel("cumulative wall time (min)")
  ax.set_ylabel("AUC on the real test split")
  ax.set_title("TSTR vs TRTR as the LDM trains (labels: LDM steps)", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  with io.atomic_path(path, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=120, format="png")
  plt.close(fig)


def run_curve(config, workdir: str, ldm_steps: list[int], tokenizer_steps: list[int] | None, machine: str,
              log=print) -> list[dict]:
  workdir = os.path.abspath(workdir)
  out_dir = os.path.join(workdir, OUT)
  os.makedirs(out_dir, exist_ok=True)
  state_path = os.path.join(out_dir, "curve.json")
  state = io.read_json(state_path) or {}
  rows = state.get("rows", []) if state.get("ldm_steps") == ldm_steps and state.get("tokenizer_steps") == tokenizer_steps \
      else []
  wall = float(state.get("wall_s", 0.0)) if rows else 0.0
  t_start = time.time() - wall
  base = copy.deepcopy(config)
  _stage(base, workdir, "prepare")   # skips when the cache is complete
  for tok in (tokenizer_steps or [None]):
    wd = workdir if tok is None else os.path.join(workdir, f"tokenizer_{tok}")
    cfg = copy.deepcopy(base)
    if tok is not None:
      os.makedirs(wd, exist_ok=True)
      if not os.path.exists(os.path.join(wd, "data")):
        os.symlink(os.path.join(workdir, "data"), os.path.join(wd, "data"))
      with cfg.unlocked():
        if str(cfg.tokenizer.variant) == "dual":
          cfg.tokenizer.phase_train.generative.steps = int(tok)
        else:
          cfg.tokenizer.phase_train.main.steps = int(tok)
    _stage(cfg, wd, "tokenizer")
    for steps in ldm_steps:
      if any(r.get("tokenizer_steps") == tok and r["ldm_step"] == steps for r in rows):
        continue
      c = copy.deepcopy(cfg)
      with c.unlocked():
        c.ldm.train.steps = int(steps)
        c.ldm.train.checkpoint_every = int(steps)
      for name in ("ldm", "sample", "classify", "evaluate"):
        log(f"learning curve: tokenizer {tok}, LDM {steps} steps: stage {name}")
        _stage(c, wd, name)
      row = point_row(wd)
      row.update(tokenizer_steps=tok, tokenizer_trained_steps=_tokenizer_steps(c),
                 wall_s=round(time.time() - t_start, 1))
      rows.append(row)
      io.write_json_atomic(state_path, {"ldm_steps": ldm_steps, "tokenizer_steps": tokenizer_steps, "rows": rows,
                                        "wall_s": row["wall_s"], "machine": machine})
      io.write_text_atomic(os.path.join(out_dir, "curve.md"), markdown(rows, machine))
      plot(rows, os.path.join(out_dir, "curve.png"))
      log(markdown(rows, machine))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--ldm_steps", default="100,200,400,800", help="comma-separated, increasing")
  p.add_argument("--tokenizer_steps", default="", help="comma-separated; empty: the config's")
  p.add_argument("--machine", default=f"{os.cpu_count()} CPU cores", help="written beside the numbers")
  args, overrides = p.parse_known_args(argv)
  ldm_steps = [int(s) for s in args.ldm_steps.split(",") if s.strip()]
  if ldm_steps != sorted(set(ldm_steps)) or not ldm_steps or ldm_steps[0] < 1:
    p.error(f"--ldm_steps must be positive and increasing, got {args.ldm_steps!r}")
  tok = [int(s) for s in args.tokenizer_steps.split(",") if s.strip()] or None
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    p.error(f"unknown arguments {bad}")
  config = config_files.load(args.config, overrides)
  run_curve(config, args.workdir, ldm_steps, tok, args.machine)


if __name__ == "__main__":
  main()
