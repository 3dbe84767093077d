"""Training tasks for the tokenizers (synthmri_jax.training.task protocol): VQ-VAE, VQGAN and the
staged dual-codebook tokenizer.

Reconstruction loss, per volume, with e = |x_hat - x| averaged over channels:
    rec = l1 * mean_v(e) + boundary * mean_{v in band}(e) + perceptual * P(x_hat, x)
i.e. every voxel has weight l1/N and voxels in the boundary band get boundary/N_band on top
(`voxel_weights`): the segmentation-aware term. The band (`boundary_band`) is the set of
voxels within `boundary_width` of a label change of the cohort's mask (lesion / tissue
labels) when the volume has one; otherwise -- no masks, or a mask without any boundary,
e.g. a control without lesion -- it is a band around the image's own tissue boundaries:
the top `edge_fraction` of voxels by gradient magnitude of the target, dilated by
`boundary_width`. P is models/perceptual.py's distance. The quantisers add their
commitment (+ codebook) losses times `loss.codebook`.

VQGAN: one params tree {'tokenizer', 'discriminator'} (task.py's GAN pattern). From
`gan.start_step` on:
    loss += gan.weight * (lambda * g_adv + hinge(D(x), D(sg(x_hat))))
    g_adv = -mean D_sg(x_hat)          (discriminator params stop-gradiented)
    lambda = ||grad_W rec|| / (||grad_W g_adv|| + 1e-4), clipped to [0, max_adaptive_weight]
with W the decoder's last conv kernel (taming-transformers' adaptive weight), stop-gradiented.
So the generator's gradient comes from rec + g_adv only, the discriminator's from the hinge
only, and one optimizer step updates both. Before start_step the adversarial block is not
computed at all (lax.cond).

Dual tokenizer phases (DualTask(phase=...); `trainable` freezes the rest bit-identically):
  'clinical'   trains trunk + clinical quantiser + clinical head on rec(clinical head(z_c), x).
               The decoder, generative path and prior are frozen (and not run).
  'generative' trains the generative encoder/quantiser, the clinical-token projection, the
               decoder (with clinical-feature dropout) and the prior; the clinical encoder and
               its codebook are frozen (its EMA codebook is not updated either).
  'joint'      everything, at a small learning rate (config), with the clinical head's
               reconstruction kept in the loss (`loss.clinical_head`).
The prior's cross-entropy trains only the prior (its input is stop-gradiented).

Metrics (evaluate: sums + 'count', so the trainer reports per-volume means over the split):
psnr / ssim (3D, Gaussian 11-tap window, as evaluation/fidelity.py) / l1 / band_l1 of the
main reconstruction; for the dual model also psnr/ssim with 'predicted' and 'null' clinical
latents, the clinical head's psnr and the prior's top-1 accuracy. `eval_outputs` gives the
per-volume values, per-codebook code counts (split-level usage / perplexity) and mid slices of
the reconstructions (images without a second compile).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from synthmri_jax.models import discriminator as disc_lib
from synthmri_jax.models import perceptual as perc_lib
from synthmri_jax.models.conv import Conv3D
from synthmri_jax.models.tokenizer import DualTokenizer, VQVAE, build_tokenizer

DUAL_PHASES = ("clinical", "generative", "joint")
_PHASE_MODULES = {
    "clinical": ("trunk", "clinical_quant_head", "clinical_vq", "clinical_head"),
    "generative": ("generative_encoder", "generative_quant_head", "generative_vq", "clinical_tokens", "decoder",
                   "prior"),
}


# ------------------------------------------------------------------------------ boundary band


def _dilate(b: jax.Array, width: int) -> jax.Array:
  """Grey-value dilation (max filter) of float (B, X, Y, Z) by a (2w+1)^3 cube; outside counts as -inf."""
  if width <= 0:
    return b
  k = 2 * width + 1
  return jax.lax.reduce_window(b, jnp.array(-jnp.inf, b.dtype), jax.lax.max, (1, k, k, k), (1, 1, 1, 1), "SAME")


def mask_band(mask: jax.Array, width: int) -> jax.Array:
  """Voxels within `width` of a label change (any label pair, both sides): (B, X, Y, Z) float {0, 1}."""
  m = mask.astype(jnp.float32)
  w = max(int(width), 1)
  hi = _dilate(m, w)
  lo = -_dilate(-m, w)
  return (hi != lo).astype(jnp.float32)


def edge_band(image: jax.Array, width: int, fraction: float) -> jax.Array:
  """Band around the image's own tissue boundaries: top `fraction` of voxels by gradient magnitude, dilated."""
  x = jnp.mean(image.astype(jnp.float32), axis=-1)
  g2 = sum(jnp.square(jnp.gradient(x, axis=a)) for a in (1, 2, 3))
  g = jnp.sqrt(g2)
  flat = g[:, ::2, ::2, ::2].reshape(g.shape[0], -1)   # quantile estimated on a 2x subgrid: 8x less to sort
  thr = jnp.quantile(flat, 1.0 - float(fraction), axis=1)
  edges = (g >= thr[:, None, None, None]) & (g > 1e-6)
  return _dilate(edges.astype(jnp.float32), int(width))


def boundary_band(image: jax.Array, mask: Optional[jax.Array], width: int, fraction: float) -> jax.Array:
  """The segmentation-aware band: mask boundaries where the volume's mask has any, else image edges."""
  edges = edge_band(image, width, fraction)
  if mask is None:
    return edges
  mb = mask_band(mask, width)
  has = jnp.any(mb > 0, axis=(1, 2, 3))
  return jnp.where(has[:, None, None, None], mb, edges)


def voxel_weights(band: jax.Array, l1: float, boundary: float) -> jax.Array:
  """Per-voxel weights w with rec_L1 = sum_v w_v e_v: l1/N everywhere plus boundary/N_band inside the band."""
  n = math.prod(band.shape[1:])
  n_band = jnp.maximum(jnp.sum(band, axis=(1, 2, 3), keepdims=True), 1.0)
  return l1 / n + boundary * band / n_band


# ------------------------------------------------------------------------------ metrics


def psnr(x_hat: jax.Array, x: jax.Array, data_range: float = 1.0) -> jax.Array:
  """Per-volume PSNR in dB (B,), capped at 100 dB for exact reconstructions."""
  mse = jnp.mean(jnp.square(x_hat.astype(jnp.float32) - x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=-1)
  return jnp.minimum(10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-10)), 100.0)


def _valid_filter_matrix(n: int, win: np.ndarray) -> np.ndarray:
  k = len(win)
  m = np.zeros((n - k + 1, n), np.float32)
  for i in range(n - k + 1):
    m[i, i:i + k] = win
  return m


def ssim3d(x: jax.Array, y: jax.Array, data_range: float = 1.0, win_size: int = 11, sigma: float = 1.5,
           k1: float = 0.01, k2: float = 0.03) -> jax.Array:
  """Per-volume mean 3D SSIM (B,) over valid windows, channels averaged; the same definition as
  evaluation/fidelity.ssim (Wang et al. 2004), with the separable Gaussian filter as three matmuls."""
  b, X, Y, Z, C = x.shape
  win = min(win_size, X, Y, Z)
  win -= 1 - win % 2
  r = np.arange(win, dtype=np.float64) - (win - 1) / 2
  g = np.exp(-0.5 * (r / sigma) ** 2)
  g = g / g.sum()
  mx_, my_, mz_ = (jnp.asarray(_valid_filter_matrix(n, g)) for n in (X, Y, Z))
  hp = jax.lax.Precision.HIGHEST

  def filt(a):   # (B, X, Y, Z, C) -> valid-filtered
    a = jnp.einsum("ix,bxyzc->biyzc", mx_, a, precision=hp)
    a = jnp.einsum("jy,biyzc->bijzc", my_, a, precision=hp)
    return jnp.einsum("kz,bijzc->bijkc", mz_, a, precision=hp)

  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  mx, my = filt(x), filt(y)
  vx = filt(x * x) - mx * mx
  vy = filt(y * y) - my * my
  cxy = filt(x * y) - mx * my
  s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx * mx + my * my + c1) * (vx + vy + c2))
  return jnp.mean(s.reshape(b, -1), axis=-1)


def band_l1(x_hat: jax.Array, x: jax.Array, band: jax.Array) -> jax.Array:
  e = jnp.mean(jnp.abs(x_hat.astype(jnp.float32) - x.astype(jnp.float32)), axis=-1)
  return jnp.sum(e * band, axis=(1, 2, 3)) / jnp.maximum(jnp.sum(band, axis=(1, 2, 3)), 1.0)


def _code_counts(indices: jax.Array, num_codes: int, valid: jax.Array) -> jax.Array:
  w = jnp.broadcast_to(valid.astype(jnp.float32).reshape((-1,) + (1,) * (indices.ndim - 1)), indices.shape)
  return jnp.zeros((num_codes,), jnp.float32).at[indices.reshape(-1)].add(w.reshape(-1))


def mid_slices(v) -> dict[str, Any]:
  """Mid axial / coronal / sagittal slices of channel 0, (B, rows, cols), superior / anterior up."""
  X, Y, Z = v.shape[1:4]
  return {"axial": v[:, :, ::-1, Z // 2, 0].swapaxes(1, 2), "coronal": v[:, :, Y // 2, ::-1, 0].swapaxes(1, 2),
          "sagittal": v[:, X // 2, :, ::-1, 0].swapaxes(1, 2)}


def slice_images(x_slices: dict, recon_slices: dict) -> dict[str, np.ndarray]:
  """TensorBoard images of volume 0: input | reconstruction side by side, per view."""
  return {f"{k}_input|recon": np.clip(np.concatenate([np.asarray(x_slices[k][0]), np.asarray(recon_slices[k][0])],
                                                     axis=1), 0, 1) for k in x_slices}


# ------------------------------------------------------------------------------ tasks


class _TokenizerTaskBase:
  """What the variants share: the perceptual net (weights in model_state['perceptual']), the
  reconstruction loss and the boundary band."""

  variant = ""

  def __init__(self, tcfg: Any, in_channels: int, phase: str = "main"):
    self.tcfg = tcfg
    self.in_channels = int(in_channels)
    self.phase = phase
    self.model = build_tokenizer(tcfg, in_channels)
    self.perceptual = perc_lib.from_config(tcfg.perceptual)
    self.lcfg = tcfg.loss
    self.name = f"tokenizer_{self.variant}" + ("" if phase == "main" else f"_{phase}")
    self._recon = None

  # -- pieces

  def band(self, batch) -> jax.Array:
    return boundary_band(batch["image"], batch.get("mask"), int(self.lcfg.boundary_width),
                         float(self.lcfg.edge_fraction))

  def rec_loss(self, pparams, x_hat, x, band) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar reconstruction loss (mean over volumes) and its parts."""
    x = x.astype(jnp.float32)
    x_hat = x_hat.astype(jnp.float32)
    e = jnp.mean(jnp.abs(x_hat - x), axis=-1)
    l1 = jnp.mean(e, axis=(1, 2, 3))
    bl1 = jnp.sum(e * band, axis=(1, 2, 3)) / jnp.maximum(jnp.sum(band, axis=(1, 2, 3)), 1.0)
    total = float(self.lcfg.l1) * l1 + float(self.lcfg.boundary) * bl1
    parts = {"l1": jnp.mean(l1), "band_l1": jnp.mean(bl1)}
    if float(self.lcfg.perceptual) > 0:
      p = self.perceptual.distance(pparams, x_hat, jax.lax.stop_gradient(x))
      total = total + float(self.lcfg.perceptual) * p
      parts["perceptual"] = jnp.mean(p)
    return jnp.mean(total), parts

  def _init_variables(self, rng, batch):
    x = jnp.asarray(batch["image"], jnp.float32)
    r1, r2 = jax.random.split(rng)
    variables = self.model.init({"params": r1, "vq": r2}, x, train=False)
    model_state = {"vq_stats": variables.get("vq_stats", {}), "perceptual": self.perceptual.init_params(self.in_channels)}
    return {"tokenizer": variables["params"]}, model_state

  @staticmethod
  def _vq_metrics(prefix: str, aux: dict) -> dict[str, jax.Array]:
    return {f"{prefix}perplexity": aux["perplexity"], f"{prefix}usage": aux["usage"],
            f"{prefix}restarts": aux["restarts"], f"{prefix}commitment": aux["commitment_loss"]}

  def _variables(self, params, model_state):
    return {"params": params["tokenizer"], "vq_stats": model_state["vq_stats"]}

  # -- Task protocol (shared)

  def init(self, rng, batch):
    return self._init_variables(rng, batch)

  def evaluate(self, params, model_state, batch):
    out = self.eval_outputs(params, model_state, batch)
    valid = out.pop("valid")
    sums = {k: jnp.sum(v * valid) for k, v in out.items() if not k.startswith(("counts_", "slices_"))}
    sums["count"] = jnp.sum(valid)
    return sums

  def summaries(self, params, model_state, batch):
    if self._recon is None:
      self._recon = jax.jit(self.reconstruct)
    x_hat = jax.device_get(self._recon(params, model_state, batch))
    return slice_images(mid_slices(np.asarray(jax.device_get(batch["image"]))), mid_slices(np.asarray(x_hat)))


class VQVAETask(_TokenizerTaskBase):
  """Single-path VQ-VAE: L1 + perceptual + boundary-band L1 + commitment; without a codebook
  (generative.quantize=False) the commitment term becomes loss.latent_l2 * mean(z^2), which
  keeps the continuous latent's scale from drifting."""

  variant = "vqvae"

  def __init__(self, tcfg, in_channels, phase="main"):
    super().__init__(tcfg, in_channels, phase)
    if not isinstance(self.model, VQVAE):
      raise ValueError(f"{type(self).__name__} needs tokenizer.variant 'vqvae' or 'vqgan', got {tcfg.variant!r}")

  def _generator(self, params, model_state, batch, rng):
    x = batch["image"].astype(jnp.float32)
    out, upd = self.model.apply(self._variables(params, model_state), x, train=True, rngs={"vq": rng},
                                mutable=["vq_stats"])
    band = self.band(batch)
    rec, parts = self.rec_loss(model_state["perceptual"], out["x_hat"], x, band)
    metrics = {"rec": rec, **parts, "psnr": jnp.mean(psnr(out["x_hat"], x))}
    if out["vq"] is not None:
      loss = rec + float(self.lcfg.codebook) * out["vq"]["loss"]
      metrics.update(self._vq_metrics("vq_", out["vq"]))
    else:
      z2 = jnp.mean(jnp.square(out["z"]))
      loss = rec + float(self.lcfg.get("latent_l2", 0.0)) * z2
      metrics["latent_rms"] = jnp.sqrt(z2)
    return loss, out, band, metrics, {"vq_stats": upd.get("vq_stats", {}), "perceptual": model_state["perceptual"]}

  def loss(self, params, model_state, batch, rng, step):
    loss, _, _, metrics, new_ms = self._generator(params, model_state, batch, rng)
    return loss, (metrics, new_ms)

  def reconstruct(self, params, model_state, batch):
    return self.model.apply(self._variables(params, model_state), batch["image"].astype(jnp.float32))["x_hat"]

  def eval_outputs(self, params, model_state, batch):
    x = batch["image"].astype(jnp.float32)
    out = self.model.apply(self._variables(params, model_state), x)
    band = self.band(batch)
    valid = batch.get("valid", jnp.ones((x.shape[0],), bool)).astype(jnp.float32)
    return {"psnr": psnr(out["x_hat"], x), "ssim": ssim3d(out["x_hat"], x),
            "l1": jnp.mean(jnp.abs(out["x_hat"] - x).reshape(x.shape[0], -1), axis=-1),
            "band_l1": band_l1(out["x_hat"], x, band), "valid": valid,
            **({"counts_generative": _code_counts(out["vq"]["indices"], self.model.num_codes, valid)}
               if out["vq"] is not None else {}),
            **{f"slices_{k}": v for k, v in mid_slices(out["x_hat"]).items()}}


class VQGANTask(VQVAETask):
  """VQ-VAE generator + 3D PatchGAN discriminator in one params tree (hinge loss, adaptive weight, delayed start)."""

  variant = "vqgan"

  def __init__(self, tcfg, in_channels, phase="main"):
    super().__init__(tcfg, in_channels, phase)
    self.gcfg = tcfg.gan
    self.disc = disc_lib.from_config(tcfg.gan)
    self.conv_out = Conv3D(in_channels, kernel_size=3, strides=1, padding="SAME", use_bias=True,
                           dtype=self.model.dtype)

  def init(self, rng, batch):
    params, model_state = self._init_variables(rng, batch)
    params["discriminator"] = self.disc.init(jax.random.fold_in(rng, 7), jnp.asarray(batch["image"], jnp.float32))[
        "params"]
    return params, model_state

  def gan_terms(self, params, model_state, x, x_hat, features, band):
    """The adversarial terms, each routed per task.py's GAN pattern (see the module docstring)."""
    dp = params["discriminator"]
    d_real = self.disc.apply({"params": dp}, x)
    d_fake = self.disc.apply({"params": dp}, jax.lax.stop_gradient(x_hat))
    hinge = jnp.mean(jax.nn.relu(1.0 - d_real)) + jnp.mean(jax.nn.relu(1.0 + d_fake))
    g_adv = -jnp.mean(self.disc.apply({"params": jax.lax.stop_gradient(dp)}, x_hat))
    lam = self.adaptive_weight(params, model_state, x, x_hat, features, band)
    return {"hinge": hinge, "g_adv": g_adv, "adaptive_weight": lam,
            "d_real": jnp.mean(d_real), "d_fake": jnp.mean(d_fake)}

  def adaptive_weight(self, params, model_state, x, x_hat, features, band):
    """||dRec/dW|| / (||dG/dW|| + 1e-4) at the decoder's last conv kernel W, stop-gradiented.

    Both gradients go through conv_out's VJP at its (fixed) input features, so only the
    loss heads are differentiated again, not the decoder.
    """
    sg = jax.lax.stop_gradient
    conv_params = sg(params["tokenizer"]["decoder"]["conv_out"])
    feats, x, band = sg(features), sg(x), sg(band)
    pparams, dp = sg(model_state["perceptual"]), sg(params["discriminator"])
    f_out = lambda p: self.conv_out.apply({"params": p}, feats).astype(jnp.float32)
    out, vjp = jax.vjp(f_out, conv_params)
    d_rec = jax.grad(lambda xh: self.rec_loss(pparams, xh, x, band)[0])(out)
    d_g = jax.grad(lambda xh: -jnp.mean(self.disc.apply({"params": dp}, xh)))(out)
    kernel_norm = lambda g: jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(g) if a.ndim >= 2))
    lam = kernel_norm(vjp(d_rec)[0]) / (kernel_norm(vjp(d_g)[0]) + 1e-4)
    return sg(jnp.clip(lam, 0.0, float(self.gcfg.max_adaptive_weight)))

  def loss(self, params, model_state, batch, rng, step):
    gen_loss, out, band, metrics, new_ms = self._generator(params, model_state, batch, rng)
    x = batch["image"].astype(jnp.float32)
    active = step >= int(self.gcfg.start_step)
    keys = ("hinge", "g_adv", "adaptive_weight", "d_real", "d_fake")

    def on(operands):
      p, ms, xx, xh, f, b = operands
      return self.gan_terms(p, ms, xx, xh, f, b)

    def off(operands):
      return {k: jnp.zeros((), jnp.float32) for k in keys}

    t = jax.lax.cond(active, on, off, (params, model_state, x, out["x_hat"], out["features"], band))
    w = float(self.gcfg.weight)
    loss = gen_loss + w * (t["adaptive_weight"] * t["g_adv"] + t["hinge"])
    metrics.update({f"gan_{k}": v for k, v in t.items()}, gan_active=active.astype(jnp.float32))
    return loss, (metrics, new_ms)


class DualTask(_TokenizerTaskBase):
  """The dual-codebook tokenizer, one task per training phase ('clinical' | 'generative' | 'joint')."""

  variant = "dual"

  def __init__(self, tcfg, in_channels, phase="joint"):
    if phase not in DUAL_PHASES:
      raise ValueError(f"dual tokenizer phase must be one of {DUAL_PHASES}, got {phase!r}")
    super().__init__(tcfg, in_channels, phase)
    if not isinstance(self.model, DualTokenizer):
      raise ValueError(f"DualTask needs tokenizer.variant 'dual', got {tcfg.variant!r}")
    self.dropout = float(tcfg.clinical.dropout)

  def trainable(self, path: tuple[str, ...]) -> bool:
    if self.phase == "joint":
      return True
    return len(path) > 1 and path[0] == "tokenizer" and path[1] in _PHASE_MODULES[self.phase]

  def loss(self, params, model_state, batch, rng, step):
    x = batch["image"].astype(jnp.float32)
    band = self.band(batch)
    pparams = model_state["perceptual"]
    r_vq, r_drop = jax.random.split(rng)
    phase, lw = self.phase, self.lcfg
    b = x.shape[0]
    drop = jax.random.bernoulli(r_drop, self.dropout, (b,)) if self.dropout > 0 else None

    def forward(m: DualTokenizer, x):
      if phase == "clinical":
        z_c, aux_c, _ = m.encode_clinical(x, train=True)
        return {"x_hat_clinical": m.decode_clinical_head(z_c), "vq_clinical": aux_c}
      if phase == "generative":
        z_c, aux_c, feats = m.encode_clinical(x, train=False)
        z_c, feats = jax.lax.stop_gradient(z_c), jax.lax.stop_gradient(feats)
        z_g, aux_g = m.encode_generative_from_trunk(feats, train=True)
        x_hat, _ = m.decode(z_g, z_c, drop)
        ce, acc = m.prior_cross_entropy(z_g, aux_c["indices"])
        return {"x_hat": x_hat, "vq_clinical": aux_c, "vq_generative": aux_g, "prior_ce": ce, "prior_accuracy": acc}
      return m(x, train=True, drop=drop)

    out, upd = self.model.apply(self._variables(params, model_state), x, method=forward, rngs={"vq": r_vq},
                                mutable=["vq_stats"])
    metrics = {}
    loss = jnp.zeros((), jnp.float32)
    if "x_hat" in out:
      rec, parts = self.rec_loss(pparams, out["x_hat"], x, band)
      loss = loss + rec
      metrics.update(rec=rec, psnr=jnp.mean(psnr(out["x_hat"], x)), **parts)
    if "x_hat_clinical" in out:
      rec_c, parts_c = self.rec_loss(pparams, out["x_hat_clinical"], x, band)
      loss = loss + (rec_c if phase == "clinical" else float(lw.clinical_head) * rec_c)
      metrics.update(rec_clinical_head=rec_c, psnr_clinical_head=jnp.mean(psnr(out["x_hat_clinical"], x)),
                     **{f"clinical_head_{k}": v for k, v in parts_c.items()})
    if phase in ("clinical", "joint"):
      loss = loss + float(lw.codebook) * out["vq_clinical"]["loss"]
      metrics.update(self._vq_metrics("vq_clinical_", out["vq_clinical"]))
    if phase in ("generative", "joint"):
      loss = loss + float(lw.codebook) * out["vq_generative"]["loss"]
      loss = loss + float(self.tcfg.prior.weight) * out["prior_ce"]
      metrics.update(self._vq_metrics("vq_generative_", out["vq_generative"]),
                     prior_ce=out["prior_ce"], prior_accuracy=out["prior_accuracy"])
    return loss, (metrics, {"vq_stats": upd["vq_stats"], "perceptual": pparams})

  def reconstruct(self, params, model_state, batch):
    x = batch["image"].astype(jnp.float32)

    def fwd(m, x):
      z_c, _, feats = m.encode_clinical(x)
      if self.phase == "clinical":
        return m.decode_clinical_head(z_c)
      return m.decode(m.encode_generative_from_trunk(feats)[0], z_c)[0]

    return self.model.apply(self._variables(params, model_state), x, method=fwd)

  def eval_outputs(self, params, model_state, batch):
    """Per-volume metrics for the encoded / predicted / null clinical modes and code counts."""
    x = batch["image"].astype(jnp.float32)
    valid = batch.get("valid", jnp.ones((x.shape[0],), bool)).astype(jnp.float32)
    band = self.band(batch)
    model = self.model

    def fwd(m: DualTokenizer, x):
      z_c, aux_c, feats = m.encode_clinical(x)
      z_g, aux_g = m.encode_generative_from_trunk(feats)
      idx_p, z_p = m.predict_clinical(z_g)
      return {"encoded": m.decode(z_g, z_c)[0], "predicted": m.decode(z_g, z_p)[0], "null": m.decode(z_g, None)[0],
              "head": m.decode_clinical_head(z_c), "idx_c": aux_c["indices"], "idx_g": aux_g["indices"],
              "idx_p": idx_p}

    o = model.apply(self._variables(params, model_state), x, method=fwd)
    main = o["head"] if self.phase == "clinical" else o["encoded"]
    out = {"psnr": psnr(main, x), "ssim": ssim3d(main, x),
           "l1": jnp.mean(jnp.abs(main - x).reshape(x.shape[0], -1), axis=-1), "band_l1": band_l1(main, x, band),
           "psnr_clinical_head": psnr(o["head"], x), "valid": valid,
           "prior_accuracy": jnp.mean((o["idx_p"] == o["idx_c"]).reshape(x.shape[0], -1).astype(jnp.float32), -1),
           "counts_clinical": _code_counts(o["idx_c"], model.clinical_codes, valid),
           "counts_generative": _code_counts(o["idx_g"], model.generative_codes, valid),
           "counts_predicted": _code_counts(o["idx_p"], model.clinical_codes, valid),
           **{f"slices_{k}": v for k, v in mid_slices(main).items()},
           **{f"slices_predicted_{k}": v for k, v in mid_slices(o["predicted"]).items()}}
    for mode in ("encoded", "predicted", "null"):
      out[f"psnr_{mode}"] = psnr(o[mode], x)
      out[f"ssim_{mode}"] = ssim3d(o[mode], x)
      out[f"band_l1_{mode}"] = band_l1(o[mode], x, band)
    return out


def make_task(tcfg: Any, in_channels: int, phase: str = "main"):
  """The task for config.tokenizer.variant (and the dual phase)."""
  variant = str(tcfg.variant)
  if variant == "dual":
    return DualTask(tcfg, in_channels, "joint" if phase == "main" else phase)
  if variant == "vqvae":
    return VQVAETask(tcfg, in_channels, phase)
  if variant == "vqgan":
    return VQGANTask(tcfg, in_channels, phase)
  raise ValueError(f"tokenizer.variant must be 'dual', 'vqvae' or 'vqgan', got {variant!r}")


__all__ = ["DUAL_PHASES", "DualTask", "VQGANTask", "VQVAETask", "boundary_band", "edge_band", "make_task",
           "mask_band", "psnr", "ssim3d", "voxel_weights"]
