"""The device mesh (Auto axes: GSPMD propagates shardings from the annotations) and the one table that maps logical axis names to mesh axes.

Models annotate parameters (nn.with_logical_partitioning) and activations
(nn.with_logical_constraint) with the logical names below; nothing else in the code base
names a mesh axis.
"""

from __future__ import annotations

import jax

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None = replicated).
LOGICAL_AXIS_RULES = (
    # activations
    ("batch", ("data", "fsdp")),
    ("act_spatial", None),
    ("act_channels", None),
    ("act_tokens", None),
    ("act_heads", "tensor"),
    # parameters
    ("conv_spatial", None),   # kernel depth/height/width
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("embed", "fsdp"),        # dense input features
    ("mlp", "tensor"),        # dense output features / hidden
    ("heads", "tensor"),
    ("head_dim", None),
    ("norm", None),           # GroupNorm scale / bias
    ("codebook", "fsdp"),     # VQ codebook entries
    ("code_dim", None),
)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """Mesh ('data', 'fsdp', 'tensor') from config; one -1 entry takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  sizes = [int(mesh_config.data), int(mesh_config.fsdp), int(mesh_config.tensor)]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")
  known = 1
  for s in sizes:
    if s != -1:
      if s < 1:
        raise ValueError(f"mesh: axis sizes must be >= 1 or -1, got {sizes}")
      known *= s
  if -1 in sizes:
    if n % known:
      raise ValueError(f"mesh {sizes}: {n} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = n // known
  if sizes[0] * sizes[1] * sizes[2] != n:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {sizes[0]*sizes[1]*sizes[2]} devices, have {n}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
