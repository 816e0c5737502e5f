"""Tile sizes for the attention kernels: one small table per backend.

`BlockSizes` holds the query/key tile lengths of the forward kernel, of the two
backward kernels (dq and dk/dv share one tiling) and of decode attention. The
defaults come from `default_block_sizes(platform, head_dim)`; every kernel
entry point also takes a `block_sizes=` override. `fit(...)` shrinks the tiles
for short sequences while keeping each backend's alignment rules:

  * TPU (Mosaic): tiles are multiples of 128, the lane width, because
    positions and logsumexps are laid out along lanes in some kernels.
  * GPU (Triton): tiles are powers of two and at least 16 (the smallest
    `tl.dot` operand).
"""

from __future__ import annotations

import dataclasses
import math

PLATFORMS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile lengths in tokens (queries or keys); all must be powers of two."""

  block_q: int
  block_kv: int
  block_q_bwd: int
  block_kv_bwd: int
  block_kv_decode: int = 128
  num_warps: int = 4  # GPU only
  num_stages: int = 2  # GPU only

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name.startswith("block") and (value < 1 or value & (value - 1)):
        raise ValueError(f"BlockSizes.{field.name}={value}; must be a power of two")


# Per-backend defaults. TPU: large tiles amortise the ~0.35us per grid step.
# GPU (H100-class, Triton): 128x64 forward tiles with 8 warps at head dim 128.
_TABLE = {
  ("tpu", 64): BlockSizes(512, 1024, 256, 512, block_kv_decode=512),
  ("tpu", 128): BlockSizes(512, 512, 256, 256, block_kv_decode=512),
  ("tpu", 256): BlockSizes(256, 512, 128, 256, block_kv_decode=256),
  ("gpu", 64): BlockSizes(128, 64, 64, 64, block_kv_decode=64, num_warps=4, num_stages=3),
  ("gpu", 128): BlockSizes(128, 64, 64, 64, block_kv_decode=64, num_warps=8, num_stages=2),
  ("gpu", 256): BlockSizes(64, 32, 32, 32, block_kv_decode=32, num_warps=8, num_stages=2),
}


def default_block_sizes(platform: str, head_dim: int) -> BlockSizes:
  """Table entry for `platform` ("tpu" | "gpu") at the nearest head dim >= D."""
  if platform not in PLATFORMS:
    raise ValueError(f"block sizes: platform={platform!r}; allowed: {PLATFORMS}")
  dims = sorted(d for p, d in _TABLE if p == platform)
  key = next((d for d in dims if d >= head_dim), dims[-1])
  return _TABLE[(platform, key)]


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _fit_one(block: int, length: int, platform: str) -> int:
  if platform == "tpu":
    return max(128, min(block, _round_up(length, 128)))
  return max(16, min(block, 1 << max(0, math.ceil(math.log2(max(length, 1))))))


def fit(blocks: BlockSizes, q_len: int, kv_len: int, platform: str) -> BlockSizes:
  """Shrinks `blocks` for sequences shorter than a tile (backend alignment kept)."""
  return dataclasses.replace(
    blocks,
    block_q=_fit_one(blocks.block_q, q_len, platform),
    block_kv=_fit_one(blocks.block_kv, kv_len, platform),
    block_q_bwd=_fit_one(blocks.block_q_bwd, q_len, platform),
    block_kv_bwd=_fit_one(blocks.block_kv_bwd, kv_len, platform),
    block_kv_decode=_fit_one(blocks.block_kv_decode, kv_len, platform),
  )
