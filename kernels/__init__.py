"""Attention kernels of `adaptive`: one dispatch function plus references.

Import them as

  from kernels import attention, routed_attention, decode_attention
"""

from kernels.attention import attention, decode_attention, routed_attention
from kernels.block_sizes import BlockSizes, default_block_sizes
from kernels.reference import reference_attention

__all__ = [
  "attention",
  "decode_attention",
  "routed_attention",
  "BlockSizes",
  "default_block_sizes",
  "reference_attention",
]
