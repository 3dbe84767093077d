"""The privacy ledger of the released cohort: finite only when every input is DP or public, composed
by summing, with the subject-level (group privacy) guarantee when subjects have several scans."""

import math
import os

import ml_collections
import pytest

from synthmri_jax import workdir as workdir_lib
from synthmri_jax.config_blocks.privacy import dp_config
from synthmri_jax.config_blocks import public
from synthmri_jax.data import loader
from synthmri_jax.evaluation.privacy import epsilon as ledger
from synthmri_jax.training import dp_sgd, optim
from synthmri_jax.utils import io
from synthmri_jax.utils.errors import UserInputError


def _workdir(root, *, tokenizer_public=True, norm_public=True, attributes_public=True, reject=False,
             sessions=(1, 1, 1, 1)):
  """A WORKDIR as the stages leave it: a DP LDM (noise 1.1, 50 steps), a tokenizer, the stage records."""
  w = str(root)
  os.makedirs(os.path.join(w, "ldm", "checkpoints"))
  os.makedirs(os.path.join(w, "tokenizer", "vqvae", "checkpoints"))
  sampling = loader.PoissonSampling(40, 8, loader.poisson_max_batch_size(40, 8), 0)
  cfg = optim.train_config(ml_collections.ConfigDict(dict(steps=50, dp=dp_config(noise_multiplier=1.1,
                                                                                   target_epsilon=0.0))))
  _, rec = dp_sgd.resolve_dp(cfg, sampling, "ldm")
  dp = dp_sgd.dp_record_for_steps(rec, sampling, 50)
  dp_sgd.write_dp_record(os.path.join(w, "ldm"), dict(dp, complete=True))
  io.write_json_atomic(os.path.join(w, "tokenizer", workdir_lib.TOKENIZER_METRICS_FILE),
                       {"fit_on": "public" if tokenizer_public else "cohort"})
  io.write_json_atomic(os.path.join(w, "ldm", workdir_lib.LDM_META_FILE), {"fit_on": "public" if norm_public else "cohort"})
  io.write_json_atomic(os.path.join(w, workdir_lib.SYNTHETIC_STATE_FILE),
                       {"attributes_fit_on": "public" if attributes_public else "cohort", "reject_copies": reject})
  rows = ["participant_id\tsession_id\tsplit"] + [f"sub-{i}\tses-{j}\ttrain" for i, k in enumerate(sessions)
                                                  for j in range(k)] + ["sub-x\tses-0\ttest", "sub-x\tses-1\ttest"]
  os.makedirs(workdir_lib.data_dir(w))
  with open(os.path.join(workdir_lib.data_dir(w), "cohort.tsv"), "w") as f:
    f.write("\n".join(rows) + "\n")
  return w, dp


def test_public_fits_and_dp_ldm_give_the_ldm_epsilon(tmp_path):
  w, dp = _workdir(tmp_path)
  c = ledger.models_epsilon(w)["synthetic_cohort"]
  eps, delta = float(dp["epsilon_pld"]), float(dp.get("delta_total") or dp["delta"])
  assert 0 < eps < 100
  assert c["epsilon"] == pytest.approx(eps) and c["delta"] == pytest.approx(delta)   # public inputs cost 0
  assert c["non_private_releases"] == []
  assert {r["release"].split(" (")[0] for r in c["releases"]} == {
      "tokenizer weights", "LDM weights", "latent standardisation", "conditioning statistics", "attribute model"}
  assert c["privacy_unit"]["max_train_scans_per_subject"] == 1        # the test subject's 2 sessions do not count
  assert c["privacy_unit"]["subject_epsilon"] == pytest.approx(eps)
  assert "per subject" in c["privacy_unit"]["statement"]


@pytest.mark.parametrize("leak,needle,count", [
    (dict(tokenizer_public=False), "tokenizer weights", 1),
    (dict(norm_public=False), "latent standardisation", 2),    # and the conditioning statistics: both from ldm.json
    (dict(attributes_public=False), "attribute model", 1),
    (dict(reject=True), "copy rejection", 1),
])
def test_any_private_input_makes_the_cohort_non_private(tmp_path, leak, needle, count):
  c = ledger.models_epsilon(_workdir(tmp_path, **leak)[0])["synthetic_cohort"]
  assert c["epsilon"] is None and "privacy_unit" not in c
  assert len(c["non_private_releases"]) == count and c["non_private_releases"][0].startswith(needle)
  assert c["statement"].startswith("non-private (ε = ∞)") and needle in c["statement"]


def test_subjects_with_several_scans_get_the_group_privacy_bound(tmp_path):
  w, dp = _workdir(tmp_path, sessions=(1, 3, 2))
  c = ledger.models_epsilon(w)["synthetic_cohort"]
  eps, delta = c["epsilon"], c["delta"]
  u = c["privacy_unit"]
  assert u["max_train_scans_per_subject"] == 3
  assert u["subject_epsilon"] == pytest.approx(3 * eps)
  assert u["subject_delta"] == pytest.approx(3 * math.exp(2 * eps) * delta)
  assert ledger.group_privacy(0.5, 1e-6, 1) == (0.5, 1e-6)


def test_public_cohort_is_the_simulator_with_its_own_seed():
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(cohort_tsv="", on_bad_file="skip", split_fractions=dict(train=0.6, test=0.4),
                                          embedded=dict(num_subjects=400, seed=0, vary_storage=True)))
  c.public = ml_collections.ConfigDict(dict(enabled=True, seed=7, num_subjects=50, val_fraction=0.2))
  d = public.data_config(c)
  assert (d.data.embedded.seed, d.data.embedded.num_subjects, d.data.embedded.vary_storage) == (7, 50, False)
  assert dict(d.data.split_fractions) == dict(train=0.8, val=0.2, test=0.0, holdout=0.0)
  assert c.data.embedded.seed == 0 and c.data.on_bad_file == "skip"        # the run's own config is untouched
  assert public.enabled(c)
  c.public.seed = 0
  with pytest.raises(UserInputError, match="equals data.embedded.seed"):
    public.data_config(c)
  c.public.enabled = False
  assert not public.enabled(c)
  with pytest.raises(ValueError, match="unknown config field public.sed"):
    public.enabled(ml_collections.ConfigDict(dict(public=dict(sed=1))))
