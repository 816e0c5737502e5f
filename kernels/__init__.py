"""Attention kernels behind one dispatch function, `kernels.attention`."""

from kernels.attention import attention

__all__ = ["attention"]
