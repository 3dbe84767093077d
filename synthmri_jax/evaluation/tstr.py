"""The utility study: TRTR / TSTR / augmentation arms, AUC with intervals, paired ΔAUC, Dice, fidelity.

Arms (every one tested on the SAME real test split, which no generator or classifier saw):
TRTR, TSTR, CODEC, AUG_<f>, REAL_<f> (evaluation/arms.py says what each trains on).
Each arm is trained with `evaluate.seeds` seeds (seed k: init, data order, augmentation and the
real subsample), with the same classifier and the same number of steps, so arms differ in their
training data only. Per arm and seed: ROC-AUC with a class-stratified bootstrap interval
(evaluation.stats); per arm: mean ± SD over seeds, and the AUC of the seed-averaged scores with
its interval. Comparisons (TSTR − TRTR, CODEC − TRTR, AUG_f − REAL_f, AUG_1 − TRTR) are paired on the test
subjects (stats.paired_delta_auc): per seed, and on the seed-averaged scores.

With masks in the real cohort (and in the synthetic one), the segmentation U-Net is trained on
real (SEG_real) and on synthetic (SEG_synthetic) scans and scored by per-subject Dice on the
real test split, with bootstrap intervals and a paired ΔDice.

Fidelity: FD / KID between real-test and synthetic features of the TRTR classifier (seed 0)
penultimate layer, named FD_trtr_classifier (values from different extractors are not
comparable), beside the same statistics between two real samples (val vs test) as a floor; an
optional extractor from user weights (evaluate.feature_weights, a local file, never
downloaded); MS-SSIM diversity of synthetic pairs beside real-train pairs.

Resumable: each run trains through the shared trainer into
WORKDIR/evaluation/runs/<arm>/seed<k>/ and ends by writing result.json (test labels and
per-subject scores included); a run whose result.json carries the same key (arm, seed,
classifier config, prepared cohort, synthetic content hash) is not redone, a run with another
key is wiped and retrained. Outputs: WORKDIR/evaluation/evaluation.json (atomic) and a table
in the log.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from synthmri_jax.data import loader
from synthmri_jax.data.cache import PreparedCohort, load_prepared
from synthmri_jax.config_blocks import evaluate as config_lib
from synthmri_jax.evaluation import feature_weights, fidelity, fidelity_report, stats, study_table
from synthmri_jax.evaluation.arms import Arm, Concat, Subset, fraction_name, plan_arms, subsample_real
from synthmri_jax.evaluation.synthetic_cohort import SyntheticCohort
from synthmri_jax.models import classifier as classifier_lib
from synthmri_jax.models import segmenter as segmenter_lib
from synthmri_jax import sharding as mesh_lib
from synthmri_jax.training import trainer
from synthmri_jax.tasks.classifier import ClassifierTask, predict_source
from synthmri_jax.tasks.segmenter import SegmenterTask
from synthmri_jax import workdir as workdir_lib
from synthmri_jax import xla_flags
from synthmri_jax.utils import io
from synthmri_jax.utils.errors import UserInputError

SCHEMA = "synthmri_jax.evaluation/1"
RUN_VERSION = 2   # 2: the classifier pools linear + SiLU features (a run made before is retrained)
EXTRACTOR = "trtr_classifier"




# ------------------------------------------------------------------------------ data

def _split_source(prepared: PreparedCohort, split: str) -> loader.CohortSource | None:
  return loader.CohortSource(prepared, split) if len(prepared.split(split)) else None


# ------------------------------------------------------------------------------ helpers


def _host(tree: Any) -> Any:
  """Device arrays (possibly sharded over several hosts) -> numpy on this host."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    tree = multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _digest(obj: Any) -> str:
  return workdir_lib.fingerprint(obj, 16)


def _train_block(train_cfg, mesh_cfg, seed: int) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  t = dict(train_cfg.to_dict() if hasattr(train_cfg, "to_dict") else train_cfg)
  t["seed"] = int(seed)
  c.train = ml_collections.ConfigDict(t)
  if mesh_cfg is not None:
    c.mesh = mesh_cfg
  return c


def _variables_from_run(run_dir: str) -> dict[str, Any]:
  return feature_weights.variables_from_checkpoint(os.path.join(run_dir, "checkpoints"))


# ------------------------------------------------------------------------------ the study


class Study:
  """Runs and summarises the study for one workdir (and one synthetic cohort, if given)."""

  def __init__(self, config, workdir: str, synthetic: SyntheticCohort | None = None,
               log: Callable[[str], None] | None = None, codec_cohort: SyntheticCohort | None = None):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.cls = config_lib.block(config, "classifier", config_lib.classifier_config)
    self.ev = config_lib.block(config, "evaluate", config_lib.evaluate_config)
    self.real = load_prepared(self.workdir)
    self.synthetic = synthetic
    self.codec_cohort = codec_cohort   # decode(encode(real train)): the CODEC arm's training set
    self.log = log or (lambda msg: print(msg, flush=True))
    self.labels = self.real.labels
    if bool(self.ev.compilation_cache):
      xla_flags.enable_compilation_cache(os.path.join(workdir_lib.evaluation_dir(self.workdir), "compile_cache"))
    self.mesh_cfg = config.get("mesh", None) if config is not None else None
    self.mesh = mesh_lib.make_mesh(self.mesh_cfg) if self.mesh_cfg is not None else None   # None: trainer's default
    self.base_seed = int(config.get("seed", 0)) if config is not None else 0
    self.train_source = loader.CohortSource(self.real, "train")
    self.test_source = loader.CohortSource(self.real, "test")
    self.val_source = _split_source(self.real, "val")
    self.train_table = self.real.split("train")
    self.test_table = self.real.split("test")
    self.y_test = self.test_table["label_index"].to_numpy(np.int64)
    self.test_subjects = self.test_table["participant_id"].astype(str).to_numpy()   # the bootstrap's unit
    missing = [self.labels[k] for k in range(len(self.labels)) if (self.y_test == k).sum() < 2]
    if missing:
      raise UserInputError(f"{self.real.root}: the real test split needs at least 2 subjects of every class for "
                           f"an AUC interval; too few of {missing} (a larger cohort or data.split_fractions.test)")
    if synthetic is not None:
      absent = [lab for k, lab in enumerate(self.labels) if not (synthetic.labels == k).any()]
      if absent:
        self.log(f"[evaluate] WARNING: the synthetic cohort has no scan of class(es) {absent}; TSTR cannot "
                 "learn them")

  # ---------------------------------------------------------------- runs

  def runs_dir(self) -> str:
    return os.path.join(workdir_lib.evaluation_dir(self.workdir), "runs")

  def seeds(self) -> list[int]:
    return list(range(int(self.ev.seeds)))

  def _run_key(self, arm: Arm, k: int, kind: str) -> str:
    block = self.cls.segmenter.to_dict() if kind == "segmenter" else {
        k_: v for k_, v in self.cls.to_dict().items() if k_ != "segmenter"}
    return _digest({"version": RUN_VERSION, "kind": kind, "arm": dataclasses.asdict(arm), "seed_index": k,
                    "seed": self.base_seed + k, "model": block, "real": self.real.meta.get("config_hash"),
                    "synthetic": self.synthetic.key if arm.synthetic and self.synthetic else None,
                    **({"codec": self.codec_cohort.key if self.codec_cohort else None} if arm.codec else {})})

  def _claim(self, run_dir: str, key: str) -> None:
    """Makes run_dir this key's: a directory left by another config is wiped (its checkpoints would resume)."""
    marker = io.read_json(os.path.join(run_dir, "run.json"))
    if os.path.isdir(run_dir) and (marker or {}).get("key") != key and os.listdir(run_dir):
      self.log(f"{run_dir}: made with another config or cohort; retraining")
      shutil.rmtree(run_dir)
    io.write_json_atomic(os.path.join(run_dir, "run.json"), {"key": key})

  def arm_source(self, arm: Arm, k: int, keys: Sequence[str]) -> tuple[loader.Source, dict[str, Any]]:
    """Training source of an arm for seed index k, and what it holds."""
    parts, comp = [], {"n_real": 0, "n_synthetic": 0, "real_participants": []}
    if arm.real_fraction > 0:
      idx = subsample_real(self.train_table, arm.real_fraction, self.base_seed + k)
      parts.append(Subset(self.train_source, idx, keys))
      comp["n_real"] = int(len(idx))
      if arm.real_fraction < 1.0:
        comp["real_participants"] = sorted(set(self.train_table["participant_id"].iloc[idx]))
    for wanted, cohort, count, what in ((arm.synthetic, self.synthetic, "n_synthetic", "a synthetic cohort"),
                                        (arm.codec, self.codec_cohort, "n_codec",
                                         "the codec round trips of the real train split")):
      if not wanted:
        continue
      if cohort is None:
        raise ValueError(f"arm {arm.name} needs {what}")
      src = cohort.source()
      parts.append(Subset(src, np.arange(len(src)), keys))
      comp[count] = len(src)
    return Concat(parts), comp

  def classifier_task(self, arm: str = "", k: int = 0) -> ClassifierTask:
    model = classifier_lib.from_config(self.cls.model, len(self.labels))
    name = f"classifier {arm} seed{k}" if arm else "classifier"
    return ClassifierTask(model=model, name=name, label_smoothing=float(self.cls.label_smoothing))

  def _open_run(self, arm: Arm, k: int, kind: str) -> tuple[str, str, str, dict[str, Any] | None]:
    """(run_dir, key, result.json path, the finished result or None). A run whose result carries
    this key is done; otherwise the folder is claimed for this key (another key's run is wiped)."""
    run_dir = os.path.join(self.runs_dir(), arm.name, f"seed{k}")
    key = self._run_key(arm, k, kind)
    result_path = os.path.join(run_dir, "result.json")
    done = io.read_json(result_path)
    if done and done.get("key") == key:
      return run_dir, key, result_path, done
    self._claim(run_dir, key)
    return run_dir, key, result_path, None

  def run_classifier(self, arm: Arm, k: int) -> dict[str, Any]:
    """Trains (or resumes, or skips) one classifier run and scores it on the real test split."""
    run_dir, key, result_path, done = self._open_run(arm, k, "classifier")
    if done:
      return done
    t0 = time.time()
    seed = self.base_seed + k
    source, comp = self.arm_source(arm, k, ("image", "label"))
    task = self.classifier_task(arm.name, k)
    bs = int(self.cls.batch_size)
    augment = loader.Augment.from_config(self.cls)
    decoded = f" + {comp['n_codec']} real encoded -> decoded" if "n_codec" in comp else ""
    self.log(f"[evaluate] {arm.name} seed{k}: training on {comp['n_real']} real + {comp['n_synthetic']} "
             f"synthetic{decoded} scans into {run_dir}")
    train_cfg = _train_block(self.cls.train, self.mesh_cfg, seed)
    # Poisson-sampled batches when classifier.train.dp is enabled (DP-SGD on the real arms).
    it = trainer.train_iterator(train_cfg, source, bs, seed, augment=augment, mesh=self.mesh, workdir=run_dir)
    val_fn = None
    if self.val_source is not None:
      val = Subset(self.val_source, np.arange(len(self.val_source)), ("image", "label"))
      val_fn = lambda: loader.eval_iterator(val, bs)
    state = trainer.train(task, train_cfg, run_dir, it, val_fn, mesh=self.mesh)
    variables = _host({"params": state.eval_params, **state.model_state})
    del state
    pred = predict_source(task.predict, variables, self.test_source, int(self.ev.batch_size))
    probs = pred["probs"].astype(np.float64)
    auc = self._auc(probs)
    result = {"key": key, "kind": "classifier", "arm": arm.name, "seed_index": k, "seed": seed,
              "train": comp, "steps": int(self.cls.train.steps), "seconds": round(time.time() - t0, 1),
              "auc": auc,
              "test": {"participant_id": self.test_table["participant_id"].tolist(),
                       "label": self.y_test.tolist(), "probs": probs.tolist()}}
    io.write_json_atomic(result_path, result)
    self.log(f"[evaluate] {arm.name} seed{k}: AUC {auc['auc']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}] "
             f"({result['seconds']:.0f} s)")
    return result

  def segmentation_possible(self) -> tuple[bool, str]:
    if not bool(self.cls.segmenter.enabled):
      return False, "classifier.segmenter.enabled is False"
    if not self.real.has_masks:
      return False, "the real cohort has no masks"
    return True, ""

  def run_segmenter(self, arm: Arm, k: int) -> dict[str, Any]:
    """Trains (or skips) one segmentation run; per-subject Dice on the real test split."""
    seg = self.cls.segmenter
    run_dir, key, result_path, done = self._open_run(arm, k, "segmenter")
    if done:
      return done
    t0 = time.time()
    seed = self.base_seed + k
    source, comp = self.arm_source(arm, k, ("image", "mask"))
    model = segmenter_lib.from_config(seg.model, int(seg.num_classes))
    task = SegmenterTask(model=model, name=f"segmenter {arm.name} seed{k}", dice_weight=float(seg.dice_weight))
    bs = int(seg.batch_size)
    self.log(f"[evaluate] {arm.name} seed{k}: training the segmenter on {comp['n_real']} real + "
             f"{comp['n_synthetic']} synthetic scans into {run_dir}")
    it = loader.train_iterator(source, bs, seed, augment=loader.Augment(float(seg.intensity_jitter)))
    state = trainer.train(task, _train_block(seg.train, self.mesh_cfg, seed), run_dir, it, None, mesh=self.mesh)
    variables = _host({"params": state.eval_params, **state.model_state})
    del state
    pred = predict_source(task.predict, variables, self.test_source, int(self.ev.batch_size))["labels"]
    dices, lesion, found = [], [], []
    for i in range(len(self.test_source)):
      target = self.test_source[i]["mask"]
      dices.append(fidelity.dice_binary(pred[i] > 0, target > 0, empty=1.0))
      lesion.append(bool((target > 0).any()))
      found.append(fidelity.lesion_detection(pred[i] > 0, target > 0))
    result = {"key": key, "kind": "segmenter", "arm": arm.name, "seed_index": k, "seed": seed, "train": comp,
              "steps": int(seg.train.steps), "seconds": round(time.time() - t0, 1),
              "test": {"participant_id": self.test_table["participant_id"].tolist(), "dice": dices,
                       "has_lesion": lesion, "detection": found}}
    result["dice"] = self._dice_summary(result)
    io.write_json_atomic(result_path, result)
    self.log(f"[evaluate] {arm.name} seed{k}: Dice {result['dice']['all']['mean']:.3f} "
             f"[{result['dice']['all']['ci_low']:.3f}, {result['dice']['all']['ci_high']:.3f}]")
    return result

  def _dice_summary(self, result: dict[str, Any]) -> dict[str, Any]:
    d = np.asarray(result["test"]["dice"])
    has = np.asarray(result["test"]["has_lesion"], bool)
    subj = np.asarray(result["test"]["participant_id"]).astype(str)
    out = {"all": self._subject_mean(d, subj), "with_lesion": self._subject_mean(d[has], subj[has])}
    found = result["test"].get("detection")
    if found:   # lesion-wise: the share of a scan's lesions detected, and false-positive lesions per scan
      n = np.asarray([f["lesions"] for f in found], float)
      share = np.asarray([f["detected"] for f in found], float)[n > 0] / n[n > 0]
      out["lesions_detected"] = self._subject_mean(share, subj[n > 0])
      out["false_positives_per_scan"] = self._subject_mean(
          np.asarray([f["false_positives"] for f in found], float), subj)
    return out

  def _subject_mean(self, values: np.ndarray, subjects: np.ndarray) -> dict[str, Any]:
    return stats.bootstrap_mean(values, int(self.ev.n_boot), float(self.ev.alpha), str(self.ev.ci_method),
                                subjects=subjects)

  # ---------------------------------------------------------------- stages

  def train_real(self) -> dict[str, Any]:
    """The `classify` stage: TRTR classifiers (every seed) and, with masks, the real segmenters."""
    trtr = Arm("TRTR", 1.0, False)
    results = [self.run_classifier(trtr, k) for k in self.seeds()]
    out = {"schema": SCHEMA, "labels": self.labels, "classification": {"TRTR": self._arm_summary(trtr, results)}}
    ok, why = self.segmentation_possible()
    if ok:
      seg_arm = Arm("SEG_real", 1.0, False)
      seg = [self.run_segmenter(seg_arm, k) for k in self.seeds()]
      out["segmentation"] = {"SEG_real": self._seg_summary(seg)}
    else:
      out["segmentation"] = {"skipped": why}
    io.write_json_atomic(os.path.join(workdir_lib.evaluation_dir(self.workdir), workdir_lib.CLASSIFY_FILE), io.json_safe(out))
    return out

  def run(self) -> dict[str, Any]:
    """The `evaluate` stage: every arm, comparisons, Dice, fidelity -> evaluation.json."""
    if self.synthetic is None:
      raise ValueError("the study needs a synthetic cohort")
    t0 = time.time()
    arms = plan_arms(self.ev)
    results = {a.name: [self.run_classifier(a, k) for k in self.seeds()] for a in arms}
    by_name = {a.name: a for a in arms}
    classification = {"arms": {n: self._arm_summary(by_name[n], r) for n, r in results.items()},
                      "comparisons": self._comparisons(arms, results)}
    classification["tstr_trtr_ratio"] = self._ratio(classification)
    if "CODEC" in classification["arms"]:
      classification["codec_trtr_ratio"] = self._ratio(classification, "CODEC")
    out = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "real": self._real_summary(),
        "synthetic": self.synthetic.summary(),
        "protocol": self._protocol(arms),
        "classification": classification,
        "segmentation": self._segmentation(),
        "fidelity": self._fidelity(),
    }
    out["seconds"] = round(time.time() - t0, 1)
    out = io.json_safe(out)
    path = os.path.join(workdir_lib.evaluation_dir(self.workdir), workdir_lib.EVALUATION_FILE)
    io.write_json_atomic(path, out)
    self.log(study_table.format_table(out))
    self.log(f"[evaluate] wrote {path}")
    return out

  # ---------------------------------------------------------------- summaries

  def _real_summary(self) -> dict[str, Any]:
    counts = lambda t: {lab: int((t["label_index"] == i).sum()) for i, lab in enumerate(self.labels)}
    return {"workdir": self.workdir, "config_hash": self.real.meta.get("config_hash"), "labels": self.labels,
            "shape": list(self.real.shape), "spacing_mm": self.real.meta.get("spacing_mm"),
            "n_train": int(len(self.train_table)), "n_test": int(len(self.test_table)),
            "train_per_class": counts(self.train_table), "test_per_class": counts(self.test_table)}

  def _protocol(self, arms: list[Arm]) -> dict[str, Any]:
    return {"arms": [dataclasses.asdict(a) for a in arms], "seeds": self.seeds(), "base_seed": self.base_seed,
            "steps_per_run": int(self.cls.train.steps), "batch_size": int(self.cls.batch_size),
            "classifier": self.cls.model.to_dict(), "ci": {"n_boot": int(self.ev.n_boot),
                                                          "alpha": float(self.ev.alpha),
                                                          "method": str(self.ev.ci_method),
                                                          "kind": "class-stratified bootstrap of test subjects "
                                                                  "(a subject's sessions resampled together)",
                                                          "n_subjects": int(len(set(self.test_subjects)))},
            "test_split": "real 'test' split of the prepared cohort (never used by a generator or classifier)",
            "subsample": "subject-level, stratified by label, >= 1 subject per class, redrawn per seed"}

  def _mean_probs(self, results: list[dict[str, Any]]) -> np.ndarray:
    return np.mean([np.asarray(r["test"]["probs"]) for r in results], axis=0)

  def _auc(self, probs: np.ndarray) -> dict[str, Any]:
    return stats.auc_with_ci(self.y_test, probs, n_boot=int(self.ev.n_boot), alpha=float(self.ev.alpha),
                             method=str(self.ev.ci_method), subjects=self.test_subjects)

  def _arm_summary(self, arm: Arm, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Intervals are recomputed from the stored scores, so evaluate.n_boot / alpha / ci_method
    apply to finished runs without retraining them."""
    per_seed = []
    for r in results:
      auc = self._auc(np.asarray(r["test"]["probs"]))
      per_seed.append(dict(seed=r["seed"], n_train_real=r["train"]["n_real"],
                           n_train_synthetic=r["train"]["n_synthetic"],
                           **({"n_train_codec": r["train"]["n_codec"]} if "n_codec" in r["train"] else {}),
                           **{k: auc[k] for k in ("auc", "ci_low", "ci_high", "se", "method", "n", "unit", "n_units")}))
    ens = self._auc(self._mean_probs(results))
    return {"real_fraction": arm.real_fraction, "synthetic": arm.synthetic, "per_seed": per_seed,
            "auc_over_seeds": stats.summarize_seeds([p["auc"] for p in per_seed]),
            "seed_mean_scores": dict(ens, n_seeds=len(results)), "n_seeds": len(results)}

  def _paired(self, a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    kw = dict(n_boot=int(self.ev.n_boot), alpha=float(self.ev.alpha), method=str(self.ev.ci_method),
              subjects=self.test_subjects)
    b_by_seed = {r["seed"]: r for r in b}
    per_seed = []
    for r in a:
      if r["seed"] in b_by_seed:
        d = stats.paired_delta_auc(self.y_test, np.asarray(r["test"]["probs"]),
                                   np.asarray(b_by_seed[r["seed"]]["test"]["probs"]), **kw)
        per_seed.append(dict(seed=r["seed"], **d))
    ens = stats.paired_delta_auc(self.y_test, self._mean_probs(a), self._mean_probs(b), **kw)
    return {"per_seed": per_seed, "delta_over_seeds": stats.summarize_seeds([p["delta"] for p in per_seed]),
            "seed_mean_scores": dict(ens, n_seeds=min(len(a), len(b))), "n_seeds": len(per_seed)}

  def _comparisons(self, arms: list[Arm], results: dict[str, list]) -> dict[str, Any]:
    names = {a.name for a in arms}
    pairs = []
    pairs += [(a, "TRTR") for a in ("TSTR", "CODEC") if a in names]
    for a in arms:
      if a.name.startswith("AUG_"):
        base = f"REAL_{fraction_name(a.real_fraction)}"
        pairs.append((a.name, base if base in names else "TRTR"))
        if base in names:
          pairs.append((a.name, "TRTR"))
    out = {}
    for a, b in pairs:
      out[f"{a}-{b}"] = dict(self._paired(results[a], results[b]), a=a, b=b)
    return out

  def _ratio(self, classification: dict[str, Any], arm: str = "TSTR") -> dict[str, Any]:
    arms = classification["arms"]
    if arm not in arms:
      return {"skipped": f"no {arm} arm"}
    t, r = arms[arm]["auc_over_seeds"], arms["TRTR"]["auc_over_seeds"]
    ens = classification["comparisons"][f"{arm}-TRTR"]["seed_mean_scores"]
    base = ens["auc_b"]
    return {"value": t["mean"] / r["mean"], "n_seeds": min(t["n"], r["n"]),
            "seed_mean_scores": {"value": ens["auc_a"] / base, "ci_low": 1 + ens["ci_low"] / base,
                                 "ci_high": 1 + ens["ci_high"] / base,
                                 "method": "1 + ΔAUC interval / AUC_TRTR (TRTR AUC held fixed)"}}

  def _seg_summary(self, results: list[dict[str, Any]]) -> dict[str, Any]:
    per_seed = []
    for r in results:
      d = self._dice_summary(r)
      per_seed.append(dict(seed=r["seed"], n_train_real=r["train"]["n_real"],
                           n_train_synthetic=r["train"]["n_synthetic"], dice=d["all"], dice_with_lesion=d["with_lesion"],
                           lesions_detected=d.get("lesions_detected"),
                           false_positives_per_scan=d.get("false_positives_per_scan")))
    return {"per_seed": per_seed, "dice_over_seeds": stats.summarize_seeds([p["dice"]["mean"] for p in per_seed]),
            "n_seeds": len(results)}

  def _segmentation(self) -> dict[str, Any]:
    ok, why = self.segmentation_possible()
    if ok and not self.synthetic.has_masks:
      ok, why = False, "the synthetic cohort has no masks"
    if not ok:
      return {"skipped": why}
    real_arm, syn_arm = Arm("SEG_real", 1.0, False), Arm("SEG_synthetic", 0.0, True)
    real = [self.run_segmenter(real_arm, k) for k in self.seeds()]
    syn = [self.run_segmenter(syn_arm, k) for k in self.seeds()]
    deltas = []
    by_seed = {r["seed"]: r for r in real}
    for r in syn:
      if r["seed"] in by_seed:
        d = np.asarray(r["test"]["dice"]) - np.asarray(by_seed[r["seed"]]["test"]["dice"])
        deltas.append(dict(seed=r["seed"], **self._subject_mean(d, np.asarray(r["test"]["participant_id"]).astype(str))))
    return {"SEG_real": self._seg_summary(real), "SEG_synthetic": self._seg_summary(syn),
            "delta_synthetic_minus_real": {"per_seed": deltas, "over_seeds": stats.summarize_seeds(
                [d["mean"] for d in deltas]), "n_seeds": len(deltas),
                "method": "paired Dice differences averaged per subject, bootstrap of their mean over subjects"}}

  # ---------------------------------------------------------------- fidelity

  def _features(self, predict, variables, sources: dict[str, loader.Source]) -> dict[str, np.ndarray]:
    bs = int(self.ev.batch_size)
    return {name: predict_source(predict, variables, src, bs)["features"].astype(np.float64)
            for name, src in sources.items() if src is not None}

  def _fidelity(self) -> dict[str, Any]:
    trtr_dir = os.path.join(self.runs_dir(), "TRTR", "seed0")
    task = self.classifier_task()
    syn = self.synthetic.source()
    sources = {"test": self.test_source, "synthetic": syn, "val": self.val_source}
    out = {"extractors": {EXTRACTOR: f"penultimate features of the TRTR classifier (seed {self.base_seed}), "
                                     f"{trtr_dir}"}}
    out.update(fidelity_report.fd_kid(EXTRACTOR, self._features(task.predict, _variables_from_run(trtr_dir), sources), 1, self.ev))
    if str(self.ev.feature_weights):
      name, user_task, variables = self._user_extractor()
      out["extractors"][name] = f"user-supplied weights {os.path.abspath(str(self.ev.feature_weights))}"
      out.update(fidelity_report.fd_kid(name, self._features(user_task.predict, variables, sources), 1, self.ev))
    out["ms_ssim_diversity"] = fidelity_report.diversity(syn, self.train_source, self.real.channels,
                                                         str(self.real.meta.get("normalization")), self.ev)
    return out

  def _user_extractor(self):
    path = os.path.abspath(os.path.expanduser(str(self.ev.feature_weights)))
    name = str(self.ev.feature_name) or os.path.basename(path.rstrip("/")).split(".")[0]
    variables = feature_weights.load(path)
    head = variables["params"].get("head", {}).get("kernel")
    num_classes = int(np.shape(head)[-1]) if head is not None else len(self.labels)
    model_cfg = self.cls.model.to_dict()
    model_cfg.update(self.ev.feature_model.to_dict())
    model = classifier_lib.from_config(ml_collections.ConfigDict(model_cfg), num_classes)
    task = ClassifierTask(model=model, name=f"extractor {name}")
    feature_weights.check(path, task, variables, self.real.shape + (len(self.real.channels),))
    return name, task, variables


# ------------------------------------------------------------------------------ the table

