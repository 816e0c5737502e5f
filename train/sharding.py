"""Device mesh and logical-axis sharding of parameters, optimizer state and batches.

    mesh = make_mesh({"data": -1, "fsdp": 2, "tensor": 1})       # -1 = the rest of the devices
    rules = (("embed", "fsdp"), ("mlp", "tensor"), ...)            # logical name -> mesh axes
    shardings = param_shardings(abstract_params_state, mesh, rules)

Every `nnx.Param` carries `logical_axes` metadata, one name per dimension
(models/layers.py). A rule maps a logical name to one mesh axis, a tuple of mesh
axes, or None (replicated). A dimension is sharded only if its size divides by
the product of its mesh axes, and no mesh axis shards two dimensions of one array;
otherwise that dimension is replicated. Nothing here hard-codes a device count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from models import partitioning

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Parameters with at least this many elements are "large": replicating one over a
# mesh that has model-parallel axes is almost always a rules mistake.
LARGE_PARAM_ELEMENTS = 1 << 20

Rules = Sequence[tuple[str, Any]]


def resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Axis sizes with at most one -1 replaced by the remaining device count.

  Raises ValueError naming the field when the sizes cannot fill `num_devices`.
  """
  unknown = sorted(set(mesh_config) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh.{unknown[0]}: unknown mesh axis; allowed: {list(MESH_AXES)}")
  sizes = {axis: int(mesh_config.get(axis, 1)) for axis in MESH_AXES}
  rest = [axis for axis, size in sizes.items() if size == -1]
  for axis, size in sizes.items():
    if size != -1 and size < 1:
      raise ValueError(f"mesh.{axis}={size}: must be a positive integer or -1 (the rest)")
  if len(rest) > 1:
    raise ValueError(
      f"mesh.{rest[1]}=-1: at most one mesh axis may be -1 (already mesh.{rest[0]}=-1)"
    )
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if rest:
    if num_devices % fixed:
      set_axes = ", ".join(f"mesh.{a}={s}" for a, s in sizes.items() if s not in (1, -1))
      raise ValueError(
        f"{set_axes}: needs a multiple of {fixed} devices, but {num_devices} "
        f"device{'s are' if num_devices != 1 else ' is'} available "
        f"(mesh.{rest[0]}=-1 takes the rest); choose sizes whose product divides {num_devices}"
      )
    sizes[rest[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
      f"mesh={dict(mesh_config)}: {fixed} devices in the mesh but "
      f"{num_devices} available; the product of the sizes must equal the "
      f"device count (use -1 for one axis to take the rest)"
    )
  return sizes


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor) over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  if len(devices) == jax.device_count():
    return jax.make_mesh(shape, MESH_AXES, (AxisType.Auto,) * len(MESH_AXES), devices=devices)
  # A subset of devices (tests, resharding): keep their order.
  return Mesh(
    np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
  )


def rules_dict(rules: Rules) -> dict[str, tuple[str, ...]]:
  """Logical name -> tuple of mesh axes (empty = replicated); validates the rules."""
  return partitioning.rules_table(rules, MESH_AXES)


def logical_to_spec(
  logical_axes: Iterable[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules
) -> PartitionSpec:
  """PartitionSpec of an array whose dimensions carry `logical_axes` names."""
  return partitioning.partition_spec(tuple(logical_axes), shape, mesh, rules)


def _metadata_axes(variable) -> tuple | None:
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  axes = meta.get("logical_axes")
  return None if axes is None else tuple(axes)


def state_shardings(
  state: nnx.State, mesh: Mesh, rules: Rules, *, warn_replicated: bool = True
) -> Any:
  """NamedShardings (as a pure dict shaped like `state.to_pure_dict()`).

  `state` is an abstract (nnx.eval_shape) or concrete nnx.State; variables
  without `logical_axes` metadata are replicated. Logs a warning for each large
  parameter that ends up fully replicated although the mesh has fsdp/tensor axes.
  """
  model_parallel = mesh.shape["fsdp"] * mesh.shape["tensor"] > 1

  def one(path, variable):
    value = variable.get_value() if hasattr(variable, "get_value") else variable
    shape = tuple(value.shape)
    axes = _metadata_axes(variable)
    spec = PartitionSpec() if axes is None else logical_to_spec(axes, shape, mesh, rules)
    if (
      warn_replicated
      and model_parallel
      and math.prod(shape) >= LARGE_PARAM_ELEMENTS
      and all(s is None for s in spec)
    ):
      logging.warning(
        "sharding: parameter %s %s (logical axes %s) is replicated on every "
        "device; add a logical_axis_rules entry for one of its axes",
        "/".join(map(str, path)),
        shape,
        axes,
      )
    return NamedSharding(mesh, spec)

  flat = {path: one(path, variable) for path, variable in state.flat_state()}
  return nnx.State.from_flat_path(flat).to_pure_dict()


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of [batch, ...] arrays: batch split over (data, fsdp)."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def data_parallel_size(mesh_sizes: Mapping[str, int]) -> int:
  return math.prod(mesh_sizes[a] for a in BATCH_AXES)


def optimizer_shardings(tx, abstract_params, params_shardings, mesh: Mesh) -> Any:
  """Shardings of `tx.init(params)`: parameter-shaped subtrees follow the parameters.

  Every subtree of the optimizer state with the structure of the parameter tree
  (Adam's mu and nu, ...) gets `params_shardings`; other leaves (step counts)
  are replicated.
  """
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  params_def = jax.tree.structure(abstract_params)

  def is_params_tree(x) -> bool:
    return (
      not isinstance(x, jax.ShapeDtypeStruct)
      and isinstance(x, (dict, Mapping))
      and jax.tree.structure(x) == params_def
    )

  return jax.tree.map(
    lambda x: params_shardings if is_params_tree(x) else replicated(mesh),
    abstract_opt,
    is_leaf=is_params_tree,
  )


def describe(shardings: Any) -> str:
  """One line per leaf: path and PartitionSpec (for logs)."""
  lines = []
  for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]:
    lines.append(f"{jax.tree_util.keystr(path)}: {s.spec}")
  return "\n".join(lines)
