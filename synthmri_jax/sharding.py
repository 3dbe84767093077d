"""Sharding, decided in one place: the device mesh (Auto axes: GSPMD propagates shardings from the annotations) and the one table that maps logical axis names to mesh axes.

Models annotate parameters (nn.with_logical_partitioning) and activations (`constrain`
below, or nn.with_logical_constraint) with the logical names below; nothing else in the
code base names a mesh axis.

Why our own resolver (`logical_to_spec`) rather than flax's nn.logical_to_mesh_sharding:
the same model runs on meshes of any shape, so a dimension that a mesh axis does not
divide (3 input channels over fsdp=2, a batch of 6 over 4 devices) must fall back to
replication on that axis instead of failing to compile; and a name may repeat within one
array (a conv kernel's three 'conv_spatial' dimensions), which flax rejects.

Imports nothing from the project, so models can use it without depending on training.
"""

from __future__ import annotations

import types
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

# 'spatial' splits each volume's activations (depth first) over chips, for volumes whose activations
# alone outgrow a chip (the 1 mm tokenizer); XLA's SPMD partitioner exchanges the convolutions' halos.
# It sits next to 'tensor', the innermost axis, so its frequent halo exchanges take the nearest links.
MESH_AXES = ("data", "fsdp", "spatial", "tensor")
BATCH_AXES = ("data", "fsdp")   # the axes a global batch is split over

# Logical name -> mesh axis (or axes, or None = replicated).
LOGICAL_AXIS_RULES = (
    # activations
    ("batch", ("data", "fsdp")),
    ("act_spatial", "spatial"),   # the first spatial dimension the axis divides (depth, else height, ...)
    ("act_channels", None),
    ("act_tokens", "spatial"),    # tokens are flattened voxels, depth-major: the same split
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


def _axis_size(block, axis: str):
  """A mesh block's size for `axis`; 'spatial' may be left out (1), the others may not (None)."""
  return getattr(block, axis, 1 if axis == "spatial" else None)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """Mesh ('data', 'fsdp', 'spatial', 'tensor') from config (an absent 'spatial' is 1); one -1 entry
  takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  raw = [_axis_size(mesh_config, a) for a in MESH_AXES]
  if None in raw:
    raise ValueError(f"mesh: no size for axis {MESH_AXES[raw.index(None)]!r} (the mesh block needs {list(MESH_AXES)}; "
                     "'spatial' may be left out)")
  sizes = [int(v) for v in raw]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = 1
  for s in sizes:
    if s != -1:
      if s < 1:
        raise ValueError(f"mesh: axis sizes must be >= 1 or -1, got {dict(zip(MESH_AXES, sizes))}")
      known *= s
  if -1 in sizes:
    if n % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {n} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = n // known
  if int(np.prod(sizes)) != n:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {n}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


class _AllData:
  """Mesh block used when a config has none: every device on 'data'."""
  data, fsdp, spatial, tensor = -1, 1, 1, 1


def mesh_block(config=None, stage: str | None = None) -> Any:
  """config.mesh, with the entries of config.<stage>.mesh (if any) in their place.

  A stage whose arrays differ in kind from the others takes its own split: the 1 mm tokenizer
  splits each volume over 'spatial', while the LDM's small latents stay on 'data'."""
  block = config.get("mesh", None) if config is not None else None
  src = block if block is not None else _AllData()
  base = {a: _axis_size(src, a) for a in MESH_AXES}
  own = config.get(stage, {}).get("mesh", None) if (config is not None and stage) else None
  if own:
    unknown = sorted(set(own.keys()) - set(MESH_AXES))
    if unknown:
      raise ValueError(f"{stage}.mesh: unknown mesh axes {unknown} (known: {list(MESH_AXES)})")
    base.update({k: own[k] for k in own.keys()})
  return types.SimpleNamespace(**base)


def mesh_from_config(config=None, devices=None, stage: str | None = None) -> jax.sharding.Mesh:
  """make_mesh(mesh_block(config, stage)): all devices on 'data' when the config has no mesh block."""
  return make_mesh(mesh_block(config, stage), devices=devices)


def _rules_dict(rules) -> dict[str, tuple[str, ...]]:
  out = {}
  for name, axes in rules:
    if name not in out:  # first rule wins, as in flax
      out[name] = _as_axes(axes)
  return out


def _as_axes(axes) -> tuple[str, ...]:
  return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def _fit(axes_per_dim: Sequence[tuple[str, ...]], shape: Sequence[int], axis_sizes: dict[str, int]) -> P:
  """Keeps, per dimension, the mesh axes not used before that divide it (cumulatively)."""
  used: set[str] = set()
  spec = []
  for axes, dim in zip(axes_per_dim, shape):
    kept, size = [], 1
    for axis in axes:
      n = int(axis_sizes.get(axis, 1))
      if axis in used or dim % (size * n):
        continue
      kept.append(axis)
      size *= n
    used.update(kept)
    spec.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], axis_sizes: dict[str, int],
                    rules=LOGICAL_AXIS_RULES) -> P:
  """PartitionSpec for an array of `shape` whose dimensions carry logical `names`.

  Each dimension gets the mesh axes its rule names, minus any axis already used by an
  earlier dimension and minus any axis whose size (times the axes kept before it) does not
  divide the dimension. Unknown names are an error, so a typo cannot silently replicate.
  """
  if names is None:
    return P()
  names = tuple(names)
  if len(names) != len(shape):
    raise ValueError(f"logical names {names} do not match an array of shape {tuple(shape)}")
  table = _rules_dict(rules)
  for name in names:
    if name is not None and name not in table:
      raise ValueError(f"logical axis name {name!r} has no rule in synthmri_jax.sharding.LOGICAL_AXIS_RULES "
                       f"(known: {sorted(table)})")
  return _fit([() if n is None else table[n] for n in names], shape, axis_sizes)


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES) -> Any:
  """NamedShardings for a (possibly abstract) tree whose leaves may be flax Partitioned boxes.

  nn.LogicallyPartitioned leaves are resolved through the rules; nn.Partitioned leaves name
  mesh axes directly (kept where they divide); plain leaves are replicated. The result has
  the structure of the unboxed tree.
  """
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))

  def one(x):
    if isinstance(x, nn.LogicallyPartitioned):
      return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, sizes, x.rules or rules))
    if isinstance(x, nn.Partitioned):
      return NamedSharding(mesh, _fit([_as_axes(n) for n in x.names], x.value.shape, sizes))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over BATCH_AXES ('data', 'fsdp'); the other axes hold replicas."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  """How many shards a global batch is split into: a global batch must be a multiple of this."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x: jax.Array, names: Sequence[str | None], rules=LOGICAL_AXIS_RULES) -> jax.Array:
  """Sharding constraint on an activation by logical names; a no-op outside a mesh context.

  Use instead of nn.with_logical_constraint: repeated names (three 'act_spatial') are
  allowed and axes that do not divide a dimension are dropped, so one model compiles on
  every mesh shape.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, dict(mesh.shape), rules))


def unbox(tree: Any) -> Any:
  """Strips flax partitioning boxes WITHOUT applying their sharding constraints.

  (Box.unbox() would constrain with flax's resolver, which rejects repeated names and
  non-dividing axes; placement is tree_shardings' job.)
  """
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))

