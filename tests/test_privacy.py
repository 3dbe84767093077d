"""Privacy report: planted copies are flagged, genuine scans at the calibrated rate, membership
inference finds a memorising denoiser, and every model is listed with its epsilon."""

import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
import pytest
import scipy.ndimage

from synthmri_jax.data import cache, loader
from synthmri_jax.diffusion.schedules import make_schedule
from synthmri_jax.evaluation import privacy
from synthmri_jax.config_blocks.privacy import block as privacy_block, dp_config, privacy_config
from synthmri_jax.evaluation.privacy import report as privacy_report
from synthmri_jax.training import optim
from synthmri_jax.training import dp_sgd
from synthmri_jax.utils import io

SHAPE = (20, 24, 20)
SPLITS = {"train": 40, "val": 40, "holdout": 20, "test": 60}   # test: the genuine "synthetic" scans


def _brain(rng, template, mask):
  """One subject: the shared template plus a smooth subject-specific field and scanner noise."""
  coarse = scipy.ndimage.gaussian_filter(rng.normal(size=SHAPE), 2.5)
  fine = scipy.ndimage.gaussian_filter(rng.normal(size=SHAPE), 1.0)
  v = template + 0.15 * coarse / coarse.std() + 0.05 * fine / fine.std() + 0.02 * rng.normal(size=SHAPE)
  return (np.clip(v, 0, None) * mask).astype(np.float32)


def _cohort(workdir):
  rng = np.random.default_rng(0)
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
  mask = ((grid ** 2).sum(0) < 0.8).astype(np.float32)
  template = 0.5 + 0.25 * scipy.ndimage.gaussian_filter(rng.normal(size=SHAPE), 2.0) / 0.05
  template = np.clip(template, 0.1, 1.0)
  root = cache.data_dir(str(workdir))
  os.makedirs(os.path.join(root, "cache"), exist_ok=True)
  rows, volumes = [], {}
  k = 0
  for split, n in SPLITS.items():
    for _ in range(n):
      pid = f"sub-{k:03d}"
      v = _brain(rng, template, mask)[..., None]
      np.save(os.path.join(root, "cache", f"{pid}.npy"), v)
      volumes.setdefault(split, []).append(v)
      rows.append(dict(participant_id=pid, session_id="", label="AD" if k % 2 else "CN", label_index=k % 2,
                       age=60 + k % 30, sex="M" if k % 3 else "F", split=split, image=f"cache/{pid}.npy", mask=""))
      k += 1
  pd.DataFrame(rows, columns=cache.TABLE_COLUMNS).to_csv(os.path.join(root, "cohort.tsv"), sep="\t", index=False)
  io.write_json_atomic(os.path.join(root, "prepared.json"), dict(
      shape=list(SHAPE), spacing_mm=4.0, affine=np.eye(4).tolist(), channels=["T1w"], labels=["CN", "AD"],
      normalization="percentile", clip_percentiles=[0.5, 99.5], splits=SPLITS, config_hash="privacy-test",
      complete=True))
  return cache.load_prepared(str(workdir)), {s: np.stack(v) for s, v in volumes.items()}


def _shift(v, dx, dy, dz):
  out = np.zeros_like(v)
  src = tuple(slice(max(0, -d), v.shape[a] - max(0, d)) for a, d in enumerate((dx, dy, dz)))
  dst = tuple(slice(max(0, d), v.shape[a] - max(0, -d)) for a, d in enumerate((dx, dy, dz)))
  out[dst] = v[src]
  return out


def _planted(train, rng):
  """Exact, noisy, shifted and rescaled+noisy copies of training scans: (volumes, source index, kind)."""
  out, src, kind = [], [], []
  picks = rng.choice(len(train), 40, replace=False)
  for n, i in enumerate(picks):
    v = train[i].copy()
    k = ("exact", "noisy", "shifted", "rescaled")[n % 4]
    if k == "noisy":
      v = v + 0.05 * rng.normal(size=v.shape).astype(np.float32)
    elif k == "shifted":
      v = _shift(v, *(rng.choice([-1, 1], 3) * (rng.random(3) < 0.6)))   # 1 voxel along some axes
    elif k == "rescaled":
      v = 0.9 * v + 0.03 + 0.03 * rng.normal(size=v.shape).astype(np.float32)
    out.append(v.astype(np.float32))
    src.append(int(i))
    kind.append(k)
  return np.stack(out), np.array(src), kind


def _config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  p = privacy_config("quickstart")
  p.encoder.channels = (8, 16)
  p.encoder.embed_dim = 64
  p.encoder.batch_size = 16
  p.encoder.max_shift = 2
  p.encoder.train.steps = 300
  p.encoder.train.lr = 2e-3
  p.encoder.train.log_every = 100
  p.encoder.train.checkpoint_every = 300
  p.voxel_tiles = (2, 2, 2)
  p.num_figures = 3
  p.n_boot = 200
  c.privacy = p
  return c


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("privacy")
  prepared, vols = _cohort(workdir)
  # An LDM trained with DP (its dp.json as the trainer writes it) and a tokenizer without.
  os.makedirs(workdir / "ldm" / "checkpoints")
  os.makedirs(workdir / "tokenizer" / "clinical" / "checkpoints")
  sampling = loader.PoissonSampling(40, 8, loader.poisson_max_batch_size(40, 8), 0)
  cfg = optim.train_config(ml_collections.ConfigDict(dict(steps=50, dp=dp_config(noise_multiplier=1.1,
                                                                                   target_epsilon=0.0))))
  _, rec = dp_sgd.resolve_dp(cfg, sampling, "ldm")
  ldm_dp = dp_sgd.dp_record_for_steps(rec, sampling, 50)
  dp_sgd.write_dp_record(str(workdir / "ldm"), dict(ldm_dp, complete=True))

  rng = np.random.default_rng(1)
  copies, src, kind = _planted(vols["train"], rng)
  genuine = vols["test"]
  synthetic = np.concatenate([genuine, copies])
  ids = [f"gen-{i:02d}" for i in range(len(genuine))] + [f"copy-{i:02d}-{k}" for i, k in enumerate(kind)]
  report = privacy.run_privacy(_config(), str(workdir), synthetic, ids)
  return dict(workdir=workdir, prepared=prepared, vols=vols, report=report, ids=ids, src=src, kind=kind,
              n_genuine=len(genuine), ldm_dp=ldm_dp, synthetic=synthetic)


@pytest.mark.slow
def test_planted_copies_flagged_genuine_at_calibrated_rate(study):
  r = study["report"]
  flagged = {c["participant_id"]: c for c in r["copies"]}
  planted = [i for i in study["ids"] if i.startswith("copy")]
  hit = [i for i in planted if i in flagged]
  assert len(hit) >= 0.95 * len(planted), (len(hit), [i for i in planted if i not in flagged])
  train_ids = study["prepared"].split("train")["participant_id"].tolist()
  for n, pid in enumerate(planted):   # and each points at the scan it was copied from
    if pid in flagged:
      assert flagged[pid]["nearest_train_participant_id"] == train_ids[study["src"][n]], flagged[pid]
  false = [i for i in study["ids"] if i.startswith("gen") and i in flagged]
  # Calibrated at 5 % (2.5 % per measure, union); 60 genuine scans: expect ~3, allow sampling noise.
  assert len(false) <= 8, false
  assert r["expected_false_copy_fraction"] <= 0.05 + 1e-9
  # Memorised training scans are the planted sources; the report names them.
  sources = {train_ids[study["src"][n]] for n, pid in enumerate(planted) if pid in flagged}
  assert {m["train_participant_id"] for m in r["memorized"]} >= sources and r["n_memorized"] >= len(sources)


@pytest.mark.slow
def test_privacy_json_copies_key_and_figures(study):
  path = os.path.join(study["workdir"], "evaluation", privacy.PRIVACY_FILE)
  saved = json.load(open(path))
  assert saved["n_copies"] == len(saved["copies"]) == study["report"]["n_copies"]
  for c in saved["copies"]:
    assert set(c) >= {"participant_id", "nearest_train_participant_id", "score"}
    assert c["score"] > saved["tau"][c["measure"]]
  for p in saved["closest_pairs"]:
    assert os.path.getsize(os.path.join(study["workdir"], p["figure"])) > 1000
  dcr = saved["dcr"]["embedding"]
  assert dcr["n_synthetic"] == len(study["ids"]) and dcr["closer_to_train_share"] > dcr["expected_share"]
  # 40 % copies: detectably closer to train in the embedding (the permutation test's floor is 1/2001);
  # the voxel measure's nearest neighbours pile onto a few hub scans, so it sees the excess, less surely.
  assert dcr["share_p_value"] < 0.01
  assert saved["dcr"]["voxel"]["closer_to_train_share"] > saved["dcr"]["voxel"]["expected_share"]
  assert "skipped" in saved["membership_inference"]           # no trained LDM here
  enc = saved["encoder"]
  assert enc["splits"] == ["train"] and enc["reidentification"]["seen"]["top1"] > 0.8


@pytest.mark.slow
def test_epsilon_per_model(study):
  eps = study["report"]["epsilon"]
  by = {m["model"]: m for m in eps["models"]}
  assert by["tokenizer"]["statement"] == "non-private (ε = ∞)" and not by["tokenizer"]["private"]
  ldm = by["ldm"]
  assert ldm["private"] and ldm["epsilon_pld"] == pytest.approx(study["ldm_dp"]["epsilon_pld"])
  assert ldm["epsilon_rdp"] == pytest.approx(study["ldm_dp"]["epsilon_rdp"]) and "DP-SGD" in ldm["statement"]
  assert not by["privacy_encoder"]["private"] and "never exported" in by["privacy_encoder"]["statement"]
  cohort = eps["synthetic_cohort"]
  assert cohort["epsilon"] is None                                           # the tokenizer saw private scans
  assert "tokenizer weights (the decoder of every synthetic scan): private data, no mechanism" in cohort["statement"]
  assert {r["release"]: r["private"] for r in cohort["releases"]}["LDM weights"]


@pytest.mark.slow
def test_flag_generated_matches_report(study):
  syn = study["synthetic"]
  out = privacy.flag_generated(_config(), str(study["workdir"]), syn[-8:])
  flagged = {c["participant_id"] for c in study["report"]["copies"]}
  assert list(out["is_copy"]) == [i in flagged for i in study["ids"][-8:]]
  assert out["tau"] == study["report"]["tau"] and len(out["train_participant_id"]) == 8


def test_membership_inference_on_a_memorising_denoiser():
  rng = np.random.default_rng(0)
  schedule = make_schedule("scaled_linear", 1000, 0.0015, 0.0195)
  members = rng.normal(size=(24, 4, 4, 4, 2)).astype(np.float32)
  others = rng.normal(size=(24, 4, 4, 4, 2)).astype(np.float32)

  def oracle(params, x_t, t, cond):
    """Predicts the noise as if x_t came from the nearest memorised latent."""
    sa, sb = schedule.sqrt_abar(t, x_t.ndim), schedule.sqrt_one_minus_abar(t, x_t.ndim)
    d = jnp.sum((x_t[:, None] - sa[:, None] * params[None]) ** 2, axis=(2, 3, 4, 5))
    x0 = params[jnp.argmin(d, axis=1)]
    return (x_t - sa * x0) / sb

  kw = dict(timesteps=(50, 200), noise_draws=2, pia_timestep=200, batch_size=8)
  sm = privacy.diffusion_attack_scores(oracle, schedule, jnp.asarray(members), members, {}, seed=0, **kw)
  sh = privacy.diffusion_attack_scores(oracle, schedule, jnp.asarray(members), others, {}, seed=1, **kw)
  assert sm["losses"].shape == (24, 2) and sm["pia"].shape == (24,)
  r = privacy.membership_inference(sm, sh, kw["timesteps"], n_boot=200)
  assert r["loss_attack"]["auc"] > 0.95
  # 24 non-members cannot resolve a 1 % FPR: no number there, the TPR at FPR 1/24 instead.
  la = r["loss_attack"]
  assert la["tpr_at_1pct_fpr"] is None and la["tpr_at_1pct_fpr_resolvable"] is False
  assert la["smallest_resolvable_fpr"] == pytest.approx(1 / 24) and la["tpr_at_smallest_fpr"] > 0.5
  assert r["pia"]["auc"] > 0.95
  assert [row["timestep"] for row in r["loss_attack"]["per_timestep"]] == [50, 200]
  # Split-bias control: the same attacks with a second non-member set in the members' place. The
  # memorising model's real attack is near 1; between two non-member sets it finds nothing.
  more = rng.normal(size=(24, 4, 4, 4, 2)).astype(np.float32)
  sc = privacy.diffusion_attack_scores(oracle, schedule, jnp.asarray(members), more, {}, seed=2, **kw)
  ctrl = privacy.split_bias_control(sc, sh, "val", "holdout", kw["timesteps"], n_boot=200)
  assert ctrl["n_control"] == 24 and ctrl["n_nonmembers"] == 24 and ctrl["control_split"] == "val"
  for attack in ("loss_attack", "pia"):
    assert 0.3 < ctrl[attack]["auc"] < 0.7 and ctrl[attack]["auc_ci"][0] < 0.5 < ctrl[attack]["auc_ci"][1]
  # A set that differs from the non-members by construction (smaller latents: lower loss at every t),
  # though the model never saw it, shows as a split bias: the control catches what the attack would
  # otherwise report as membership.
  biased = 0.5 * more
  sb = privacy.diffusion_attack_scores(oracle, schedule, jnp.asarray(members), biased, {}, seed=2, **kw)
  assert privacy.split_bias_control(sb, sh, "val", "holdout", kw["timesteps"], n_boot=200)["loss_attack"]["auc"] > 0.8
  # A model that memorised nothing (predicts zero noise for everyone) leaks nothing.
  blind = lambda p, x_t, t, c: jnp.zeros_like(x_t)
  bm = privacy.diffusion_attack_scores(blind, schedule, None, members, {}, seed=0, **kw)
  bh = privacy.diffusion_attack_scores(blind, schedule, None, others, {}, seed=1, **kw)
  assert 0.25 < privacy.membership_inference(bm, bh, kw["timesteps"], n_boot=200)["loss_attack"]["auc"] < 0.75


@pytest.mark.slow
def test_rerun_reuses_finished_report_and_any_change_recomputes(study, monkeypatch):
  """privacy.json is keyed like the TSTR runs: same inputs -> the saved report, no encoder work;
  one changed synthetic voxel or config value -> recomputed."""
  workdir, synthetic, ids = str(study["workdir"]), study["synthetic"], study["ids"]
  calls = []
  real_checker = privacy.copy_checker
  monkeypatch.setattr(privacy_report, "copy_checker", lambda *a, **k: calls.append(1) or real_checker(*a, **k))
  again = privacy.run_privacy(_config(), workdir, synthetic, ids)
  assert not calls and again["key"] == study["report"]["key"]
  assert again["n_copies"] == study["report"]["n_copies"] and again["tau"] == study["report"]["tau"]
  keys = {again["key"]}
  changed = synthetic.copy()
  changed[0, 0, 0, 0] += 1e-3
  keys.add(privacy.result_key(privacy_block(_config()), workdir, changed, ids))
  cfg = _config()
  cfg.privacy.num_figures = 2
  keys.add(privacy.result_key(privacy_block(cfg), workdir, synthetic, ids))
  keys.add(privacy.result_key(privacy_block(_config()), workdir, synthetic, ids[::-1]))
  assert len(keys) == 4
  redo = privacy.run_privacy(cfg, workdir, synthetic, ids)        # a changed key does recompute
  assert calls and redo["key"] != again["key"] and len(redo["closest_pairs"]) == 2
  assert json.load(open(os.path.join(workdir, "evaluation", privacy.PRIVACY_FILE)))["key"] == redo["key"]
