"""Builds a model from a config's `model` section: `kind` names the architecture.

    model = build(kind="dense", config=transformer.Config(...), rngs=nnx.Rngs(0))
    config = make_config("dense", {"dim": 512, ...})

Adaptive variants register their (Config class, Module class) pair in MODELS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flax import nnx

from models import duo, early_exit, first, m2r2, mod, transformer

MODELS: dict[str, tuple[type, type]] = {
  "dense": (transformer.Config, transformer.Transformer),
  "mod": (mod.Config, mod.MoDTransformer),
  "duo": (duo.Config, duo.DuoTransformer),
  "first": (first.Config, first.FiRSTTransformer),
  "early_exit": (early_exit.Config, early_exit.EarlyExitTransformer),
  "m2r2": (m2r2.Config, m2r2.M2R2Transformer),
}


def _entry(kind: str) -> tuple[type, type]:
  if kind not in MODELS:
    raise ValueError(f"model.kind={kind!r}; allowed: {sorted(MODELS)}")
  return MODELS[kind]


def make_config(kind: str, fields: Mapping[str, Any]):
  """The validated model Config of `kind` from a mapping of its fields."""
  config_cls, _ = _entry(kind)
  known = {f.name for f in dataclasses.fields(config_cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(
      f"model.{unknown[0]}: not a field of the {kind!r} model; allowed: {sorted(known)}"
    )
  return config_cls(**dict(fields))


def build(kind: str, config, *, rngs: nnx.Rngs) -> nnx.Module:
  _, module_cls = _entry(kind)
  return module_cls(config, rngs=rngs)
