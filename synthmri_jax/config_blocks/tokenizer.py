"""The `config.tokenizer` block: architecture, losses and staged training of the tokenizers.

Attach it in a config file as `c.tokenizer = tokenizer_config("quickstart")` (or "gpu").
Every size the models use comes from here; nothing in models/tokenizer.py is hard-coded.

Resolutions are given as the number of 2x downsamplings from the volume grid: with
`channels` of length L the generative latent sits at 1/2^(L-1) and the clinical latent at
1/2^clinical.level (quickstart 40x48x40: clinical 20x24x20, generative 10x12x10).

Train settings: the phase runner starts from `config.train` (if the config has one; else the
trainer's defaults), overlays `tokenizer.train` (common to every phase of the tokenizer) and
then `tokenizer.phase_train.<phase>` for the phase being run. Phase names: 'clinical',
'generative', 'joint' for the dual variant, 'main' for vqvae / vqgan.
"""

from __future__ import annotations

import ml_collections

PROFILES = ("quickstart", "gpu")


def tokenizer_config(profile: str = "gpu") -> ml_collections.ConfigDict:
  """Defaults per profile: 'gpu' = the article's sizes (16,384 x 256 clinical, 4,096 x 128
  generative codebooks), 'quickstart' = a model that trains on 2 CPU cores in minutes."""
  if profile not in PROFILES:
    raise ValueError(f"tokenizer profile must be one of {PROFILES}, got {profile!r}")
  quick = profile == "quickstart"
  c = ml_collections.ConfigDict()
  c.variant = "dual"                 # 'dual' (BrainG3N) | 'vqvae' | 'vqgan'
  c.batch_size = 2 if quick else 0   # global batch; 0: config.data.batch_size
  # True: the lesion mask is one more input channel (after the sequences), so the latent holds image
  # and mask together and the LDM generates them as a pair; the sample stage writes the decoded
  # channel, thresholded at 0.5, as each synthetic subject's *_mask.nii.gz. Needs a cohort with masks.
  c.mask_channel = False
  # The trainer's evaluation (every train.eval_every steps and at each phase's end, with image
  # summaries). Off in the quickstart: each eval is one more compile of the model on 2 CPU
  # cores; the phase always evaluates the final model on 'val' (tokenizer_metrics.json, and
  # eval/* scalars + images in the last phase's TensorBoard).
  c.phase_eval = not quick
  # This stage's own mesh entries over config.mesh (sharding.mesh_block). spatial > 1 splits each
  # volume's activations over that many chips: the 1 mm tokenizer on 16 GiB chips (configs/v5e_1mm.py).
  c.mesh = ml_collections.ConfigDict(dict(spatial=1))

  # ------------------------------------------------------------ architecture
  a = c.model = ml_collections.ConfigDict()
  a.patch_size = 1                   # >1: fold patch^3 voxels into channels first (level i at 1/(patch 2^i))
  a.channels = (16, 32, 64) if quick else (64, 128, 256, 256)  # width per level; level i is at 1/2^i
  a.num_res_blocks = (0, 1, 1) if quick else (1, 2, 2, 2)      # ResBlocks per level (encoder and decoder)
  a.attention_levels = (False, False, True) if quick else (False, False, False, True)  # self-attention, one bool
                                     # per level (the lowest by default); one bool: every level
  a.num_heads = 4
  a.norm_groups = 8
  a.dtype = "float32"                # activation dtype of the convs ("bfloat16" on accelerators)
  a.remat = False                    # nn.remat every ResBlock / attention block: less activation memory, more compute

  cl = c.clinical = ml_collections.ConfigDict()
  cl.level = 1 if quick else 2       # clinical latent at 1/2^level (must be < len(channels) - 1)
  cl.num_codes = 1024 if quick else 16384
  cl.code_dim = 16 if quick else 256
  cl.dropout = 0.25                  # P(clinical features replaced by the learned null) per training volume
  cl.fusion = "cross_attention+aligned"  # or "cross_attention": see DualTokenizer
  cl.head_res_blocks = 0 if quick else 1   # ResBlocks of the clinical reconstruction head (phase 1 target)

  g = c.generative = ml_collections.ConfigDict()   # also the single codebook of vqvae / vqgan
  g.num_codes = 256 if quick else 4096
  g.code_dim = 8 if quick else 128
  g.quantize = True                  # vqvae only: False = continuous autoencoder (no codebook; loss.latent_l2 instead)

  p = c.prior = ml_collections.ConfigDict()        # clinical codes | generative latent (VQ-VAE-2 style)
  p.channels = 32 if quick else 256
  p.num_res_blocks = 1 if quick else 2   # at the generative resolution
  p.weight = 1.0                     # weight of its cross-entropy in the summed loss (own params: no interference)
  p.logit_chunk = 4096               # codes per chunk of the logsumexp / argmax (memory O(tokens x chunk))

  q = c.vq = ml_collections.ConfigDict()
  q.mode = "ema"                     # 'ema' | 'learned'
  q.beta = 0.25                      # commitment weight
  q.decay = 0.99
  q.cosine = False
  q.restart_threshold = 0.01 if quick else 1e-3   # dead-code restart below this EMA cluster size
  q.chunk_size = 4096                # codes per nearest-code matmul chunk

  # ------------------------------------------------------------ losses
  lo = c.loss = ml_collections.ConfigDict()
  lo.l1 = 1.0
  lo.perceptual = 0.1
  lo.boundary = 1.0                  # segmentation-aware: weight of the mean L1 inside the boundary band
  lo.boundary_width = 1              # band half-width in voxels around mask / edge boundaries
  lo.edge_fraction = 0.15            # without masks: the top fraction of gradient-magnitude voxels are edges
  lo.codebook = 1.0                  # weight of the quantisers' commitment (+ codebook) losses
  lo.latent_l2 = 1e-3                # continuous autoencoder (generative.quantize=False): weight of mean(z^2)
  lo.clinical_head = 0.5             # joint phase: keep the clinical latent decodable on its own

  pe = c.perceptual = ml_collections.ConfigDict()
  pe.weights = ""                    # "" = fixed random-weight feature net (see models/perceptual.py); else .npz / .msgpack
  pe.channels = (8, 16, 32) if quick else (32, 64, 128)   # FeatureNet3D widths (must match a weights file)
  pe.seed = 1234

  gan = c.gan = ml_collections.ConfigDict()        # vqgan only
  gan.start_step = 200 if quick else 10000          # discriminator and adversarial term off before this step
  gan.weight = 0.5                   # disc_factor; adaptive weight multiplies the generator term
  gan.channels = 16 if quick else 64
  gan.num_layers = 2 if quick else 3
  gan.max_adaptive_weight = 1e4

  # ------------------------------------------------------------ phases
  c.phases = "clinical,generative,joint"            # dual; vqvae / vqgan always run one phase 'main'
  c.train = ml_collections.ConfigDict(dict(
      warmup_steps=20 if quick else 500, log_every=25 if quick else 100,
      eval_every=0 if quick else 2000, checkpoint_every=200 if quick else 2000,
      weight_decay=0.0, clip_norm=1.0))
  s = c.phase_train = ml_collections.ConfigDict()
  s.clinical = ml_collections.ConfigDict(dict(steps=120 if quick else 20000, lr=2e-3 if quick else 2e-4))
  s.generative = ml_collections.ConfigDict(dict(steps=240 if quick else 40000, lr=2e-3 if quick else 2e-4))
  s.joint = ml_collections.ConfigDict(dict(steps=80 if quick else 10000, lr=4e-4 if quick else 2e-5))
  s.main = ml_collections.ConfigDict(dict(steps=360 if quick else 60000, lr=2e-3 if quick else 2e-4))
  return c
