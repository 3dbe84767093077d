"""The codec check: does the path the sampler decodes through keep the disease effect?

A latent diffusion model can only generate what its decoder can draw. If real scans, encoded and
decoded through the very path the sample stage uses, lose the AD - CN difference, no amount of LDM
training brings it back, and a TSTR at chance would be blamed on the wrong model. So: encode real
scans the generator never trained on, decode them exactly as the sampler does (the same
LatentCodec, and a generated latent is snapped to its codes in the same way), measure the ROI
anatomy before and after (evaluation.anatomy) and report, per measure, the label effect in both
and the share that survives (ratio after / before, with a paired subject bootstrap interval).
The effect counts as preserved when the ratio is within `tolerance` (25 %) of 1.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from synthmri_jax.data import loader
from synthmri_jax.data.cache import PreparedCohort
from synthmri_jax.evaluation import anatomy, fidelity, stats
from synthmri_jax.evaluation import synthetic_cohort

FILE = "codec_check.json"


def round_trip(codec, prepared: PreparedCohort, splits: Sequence[str], batch_size: int = 8,
               log: Callable[[str], None] = print) -> dict[str, np.ndarray]:
  """Real scans of `splits` and their encode -> decode reconstructions, in split-table order.

  Returns {"before": (n, X, Y, Z, C), "after": same, "labels": (n,) label indices, "subjects": (n,)},
  and with a mask-channel codec "mask_before" / "mask_after" (n, X, Y, Z) uint8 (the image channels
  are "before" / "after").
  """
  step = jax.jit(lambda v, x: codec.decode(v, codec.encode(v, x)))
  before, after, labels, subjects, masks = [], [], [], [], ([], [])
  for split in splits:
    rows = prepared.split(split)
    if not len(rows):
      continue
    src = codec.source(prepared, split)
    for batch in loader.eval_iterator(src, batch_size):
      keep = np.asarray(batch["valid"], bool)
      image = np.asarray(batch["image"], np.float32)
      out = np.asarray(jax.device_get(step(codec.variables, image)))
      before.append(codec.images(image)[keep])
      after.append(codec.images(out)[keep])
      if codec.mask_channel:
        masks[0].append(codec.masks(image)[keep])
        masks[1].append(codec.masks(out)[keep])
      labels.append(np.asarray(batch["label"])[keep])
    subjects.extend(rows["participant_id"].astype(str))
  if not before:
    raise ValueError(f"splits {list(splits)} hold no scans to run the codec check on")
  out = {"before": np.concatenate(before), "after": np.concatenate(after), "labels": np.concatenate(labels),
         "subjects": np.asarray(subjects)}
  if masks[0]:
    out.update(mask_before=np.concatenate(masks[0]), mask_after=np.concatenate(masks[1]))
  return out


def round_trip_cohort(codec, prepared: PreparedCohort, split: str, folder: str, cache_root: str, *,
                      batch_size: int = 8, log: Callable[[str], None] = print) -> synthetic_cohort.SyntheticCohort:
  """The `split` scans after encode -> decode, written as a cohort folder and ingested like a synthetic one.

  The CODEC study arm trains on these: the same subjects and labels as TRTR, seen only through the
  decoder, so its AUC is what TSTR could reach with a perfect LDM. The folder holds private
  (reconstructed) scans: it stays in the workdir beside the prepared cache and is never released.
  """
  r = round_trip(codec, prepared, [split], batch_size, log)
  rows = prepared.split(split)
  tmp = folder + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  synthetic_cohort.write_cohort_folder(
      tmp, list(r["after"]), [prepared.labels[int(k)] for k in r["labels"]], prepared.affine,
      ages=rows["age"].to_numpy(float), sexes=rows["sex"].astype(str).tolist(), prefix="sub-codec",
      space=prepared.space())
  shutil.rmtree(folder, ignore_errors=True)
  os.replace(tmp, folder)
  log(f"[evaluate] CODEC arm: {len(rows)} real '{split}' scans encoded -> decoded into {folder}")
  return synthetic_cohort.load_synthetic_cohort(folder, prepared, cache_root)


def check(before: np.ndarray, after: np.ndarray, labels: np.ndarray, affine: np.ndarray, label_names: Sequence[str],
          case: str, control: str, *, tolerance: float = 0.25, n_boot: int = 2000, alpha: float = 0.05,
          seed: int = 0, channel: int = 0) -> dict[str, Any]:
  """Per ROI measure of channel `channel`: the paired label effect before and after the round trip
  (anatomy.paired_effect), plus the round trip's PSNR (dB, data range 1) over all scans and channels."""
  names = np.asarray([label_names[int(i)] for i in labels])
  mb, ma = anatomy.measure_volumes(before, affine, channel), anatomy.measure_volumes(after, affine, channel)
  mse = np.mean((np.asarray(after, np.float64) - np.asarray(before, np.float64)) ** 2, axis=tuple(range(1, before.ndim)))
  out: dict[str, Any] = {"n_scans": int(len(labels)), "case": case, "control": control, "tolerance": float(tolerance),
                         "psnr_db": float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12)))), "measures": {}}
  for m in anatomy.MEASURES:
    r = anatomy.paired_effect(mb[m], ma[m], names, case, control, tolerance=tolerance, n_boot=n_boot, alpha=alpha,
                              seed=seed)
    r["unit"] = anatomy.UNITS[m]
    out["measures"][m] = r
  return out


def run(codec, prepared: PreparedCohort, splits: Sequence[str], case: str, control: str, *,
        batch_size: int = 8, tolerance: float = 0.25, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
        channel: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
  """round_trip + check, with the codec's description and the wall time."""
  t0 = time.time()
  rt = round_trip(codec, prepared, splits, batch_size, log)
  out = check(rt["before"], rt["after"], rt["labels"], prepared.affine, prepared.labels, case, control,
              tolerance=tolerance, n_boot=n_boot, alpha=alpha, seed=seed, channel=channel)
  if "mask_before" in rt:   # the mask channel through the same round trip: what SEG_synthetic can learn from
    out["mask_dice"] = mask_dice(rt, n_boot=n_boot, alpha=alpha, seed=seed)
    log(f"codec check: mask channel Dice after encode -> decode {out['mask_dice']['mean']:.3f}")
  out.update(splits=list(splits), codec=codec.description, seconds=round(time.time() - t0, 1))
  v = out["measures"]["ventricle_ml"]
  log(f"codec check on {out['n_scans']} {'+'.join(splits)} scans: PSNR {out['psnr_db']:.2f} dB, "
      f"{case} - {control} ventricle effect kept {_fmt(v['ratio'])} [{_fmt(v['ci_low'])}, {_fmt(v['ci_high'])}]")
  return out


def mask_dice(rt: dict[str, np.ndarray], *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
  """Dice of each scan's decoded mask channel against its own mask (both empty: 1), subject mean
  with a bootstrap interval over subjects; `rt` is a mask-channel codec's round_trip."""
  dice = [fidelity.dice_binary(a, b, empty=1.0) for a, b in zip(rt["mask_after"], rt["mask_before"])]
  return stats.bootstrap_mean(np.asarray(dice), n_boot, alpha, "percentile", seed=seed, subjects=rt["subjects"])


def _fmt(x) -> str:
  return "n/a" if x is None else f"{x:.2f}"
