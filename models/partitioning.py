"""Logical axis names -> mesh PartitionSpecs: the one rules engine of `adaptive`.

Parameters carry `logical_axes` metadata (see models/layers.py). A rules table
maps each logical name to a mesh axis, a tuple of mesh axes, or None
(replicated), at most one rule per name. Per dimension, the rule's mesh axes
minus those already used by an earlier dimension and those of size 1 are taken;
a dimension not divisible by their total size is replicated instead. Unnamed or
unmapped dimensions are replicated. `models.hf` (loading onto a mesh) and
`train.sharding` both use this, so a loaded model sits where the trainer expects.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from jax.sharding import Mesh, PartitionSpec

Rules = Iterable[tuple[str, Any]]


def rules_table(
  rules: Rules | None, mesh_axes: Sequence[str], *, field: str = "logical_axis_rules"
) -> dict[str, tuple[str, ...]]:
  """Logical name -> tuple of mesh axes (empty = replicated); validates the rules.

  Errors name `field[i]` and say what is allowed.
  """
  table: dict[str, tuple[str, ...]] = {}
  for i, rule in enumerate(rules or ()):
    if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(
        f"{field}[{i}]={rule!r}: must be a pair "
        "(logical name, mesh axis | tuple of mesh axes | None)"
      )
    name, target = rule
    axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    for axis in axes:
      if axis not in mesh_axes:
        raise ValueError(
          f"{field}[{i}]=({name!r}, {target!r}): unknown mesh axis {axis!r} "
          f"(mesh has no axis {axis!r}); allowed: {list(mesh_axes)} or None"
        )
    if name in table:
      raise ValueError(f"{field}[{i}]: logical name {name!r} appears twice")
    table[name] = axes
  return table


def partition_spec(
  logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules | None
) -> PartitionSpec:
  """PartitionSpec of an array of `shape` whose dimensions carry `logical_axes` names."""
  table = rules_table(rules, tuple(mesh.shape))
  used: set[str] = set()
  spec = []
  for name, size in zip(logical_axes, shape, strict=True):
    axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1)
    if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes[0] if len(axes) == 1 else axes)
    else:
      spec.append(None)
  return PartitionSpec(*spec)
