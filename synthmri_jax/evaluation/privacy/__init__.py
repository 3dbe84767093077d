"""The privacy report of a synthetic cohort: copies, distance to closest record, membership
inference on the LDM, and epsilon of every model that saw private data.

    report = run_privacy(config, workdir, synthetic_volumes, synthetic_ids)   # -> WORKDIR/evaluation/privacy.json
    report = run_privacy_on(config, workdir, synthetic)   # on an ingested cohort (evaluation.synthetic_cohort.load_synthetic)
    flags = flag_generated(config, workdir, volumes)  # sample.reject_copies: is each new volume a copy?

Copies (Dar et al. 2024) use two similarities to the training scans, each with its threshold τ
calibrated on real data only (calibration split vs train, privacy_stats.calibrate_threshold):
- 'embedding': Pearson correlation of the contrastive privacy encoder's embeddings
  (evaluation.embedding), invariant to small shifts, intensity changes and noise by training;
- 'voxel': 3D-tiled normalised L2 on `voxel_pool`-averaged volumes (privacy_stats), which needs
  no training and catches near-verbatim copies whatever the encoder learned.
privacy.copy_rule picks the flagging rule; 'either' flags a scan when one measure exceeds its τ
and calibrates each at 1 - (1 - quantile) / 2 (Bonferroni), so that genuinely new scans are still
flagged at most at 1 - quantile overall. `copies` in privacy.json lists every flagged synthetic
scan with its nearest training participant and score, so a user can remove it.

DCR / NNDR (privacy_stats.dcr_report): synthetic -> train beside holdout -> train, under both
measures. Membership inference: members are the LDM's training latents, non-members the holdout
split encoded by the same tokenizer; loss attack (Matsumoto et al. 2023) per timestep and
averaged, and PIA (Kong et al. 2024); ROC-AUC and TPR at 1 % FPR with bootstrap intervals, beside
the split-bias control: the same attacks between two non-member splits (val vs holdout), whose AUC
is what the attack finds without any membership.

privacy.json carries a key over its inputs (privacy block, the synthetic scans' bytes and ids, the
prepared cohort, ldm.json, the generative models' DP records); a rerun with the same key returns
the saved report without touching the encoder.

Epsilon: each model's WORKDIR/.../dp.json (written by the trainer's DP-SGD mode) or
'non-private (ε = ∞)'. The synthetic cohort inherits the guarantee of everything that shaped it
(tokenizer, LDM, and the non-DP statistics listed under `non_private_releases`).
"""

from synthmri_jax.evaluation.privacy.copies import (COPY_RULES, MEASURES, CopyChecker, copy_checker, flag_generated,
                                                   mid_slices, pool_volumes, save_pair_figure)
from synthmri_jax.evaluation.privacy.epsilon import models_epsilon
from synthmri_jax.evaluation.privacy.membership import (diffusion_attack_scores, ldm_membership_inference,
                                                       membership_inference, operating_point, split_bias_control)
from synthmri_jax.evaluation.privacy.report import PRIVACY_FILE, result_key, run_privacy, run_privacy_on

__all__ = ["COPY_RULES", "MEASURES", "PRIVACY_FILE", "CopyChecker", "copy_checker", "diffusion_attack_scores",
           "flag_generated", "ldm_membership_inference", "membership_inference", "mid_slices", "models_epsilon",
           "operating_point", "pool_volumes", "result_key", "run_privacy", "run_privacy_on", "save_pair_figure",
           "split_bias_control"]
