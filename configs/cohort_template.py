"""Template for your own cohort (ADNI-style): copy this file, set data.cohort_tsv, run.

  python -m synthmri_jax.main --config configs/cohort_template.py --workdir runs/mycohort \
      --config.data.cohort_tsv=/data/adni/participants.tsv

The table (TSV or CSV) has one row per scan:
  participant_id   required; splits are made per participant (no subject in two splits)
  session_id       optional (several sessions per participant are fine)
  path             the NIfTI (.nii / .nii.gz / .mgz), absolute or relative to the table;
                   with several sequences one column each: path_T1w, path_FLAIR (data.sequences)
  label            one of data.labels (e.g. CN / AD)
  age, sex         the tabular attributes the LDM is conditioned on (ldm.cond.attributes)
  mask_path        optional lesion / tissue mask (segmentation study, boundary-aware loss)
  split            optional: train / val / test / holdout; otherwise seeded, label-stratified
Bad rows are listed all at once; data.on_bad_file="skip" drops them into WORKDIR/data/bad_files.tsv.
Scans are reoriented to RAS+, resampled to data.spacing_mm, cropped/padded to data.shape around
the brain and normalised (data.normalization). Skull-strip beforehand if your scans are not.

Models and budgets are the 2 mm GPU config's; on a CPU start from configs/quickstart.py instead.
"""

import importlib.util
import os


def get_config():
  spec = importlib.util.spec_from_file_location(
      "gpu_2mm", os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_2mm.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  d = c.data
  d.cohort_tsv = "participants.tsv"   # <- your table; relative paths resolve from the working directory
  d.sequences = "T1w"                  # e.g. "T1w,FLAIR" with columns path_T1w, path_FLAIR
  d.labels = "CN,AD"                   # class-index order; e.g. "CN,MCI,AD" for three classes
  d.normalization = "percentile"
  d.on_bad_file = "error"
  d.split_fractions.update(dict(train=0.6, val=0.1, test=0.15, holdout=0.15))
  # The test split is never seen by a generator or classifier; holdout is the privacy reference
  # (DCR, membership inference). Keep both >= 30 scans for meaningful intervals.
  c.ldm.cond.attributes = "age:continuous,sex:categorical:2"   # add columns of your table here
  return c
