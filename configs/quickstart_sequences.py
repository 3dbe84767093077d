"""The quickstart on three sequences: T1w, T2w and FLAIR of every embedded subject, as channels.

Run:  python -m synthmri_jax.main --config configs/quickstart_sequences.py --workdir runs/quickstart_sequences

The embedded simulator draws each subject's anatomy once and images it three times
(synthmri_jax/data/mr_contrast.py: CSF dark in T1w, bright in T2w, suppressed in FLAIR), so the
sequences are co-registered like those of one real session. Every stage runs on the 3 channels:
the tokenizer encodes them together into one latent, the LDM generates that latent, the sample
stage writes sub-*/anat/sub-*_{T1w,T2w,FLAIR}.nii.gz per synthetic subject, the classifiers of
the study read all three, and the report shows slices per sequence. A user's own multi-sequence
cohort needs only data.cohort_tsv with path_<seq> columns and data.sequences naming them.
"""

from synthmri_jax.utils.config_files import sibling


def get_config():
  c = sibling(__file__, "quickstart").get_config()
  c.data.sequences = "T1w,T2w,FLAIR"
  return c
