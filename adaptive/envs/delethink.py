"""Delethink (The Markovian Thinker, Aghajohari et al. 2025): reasoning in chunks of bounded context.

A trace is a sequence of chunks. Chunk 1 sees the query and may generate up to C = `chunk_size`
tokens; every later chunk sees the query ⊕ a carry of at most m = `carryover` tokens (train mode)
or h + m (inference mode) and may generate up to C − m. A chunk ends only on EOS (which also ends the trace) or at its budget; after
`max_chunks` = I chunks the trace stops. The context, KV cache and per-token cost stay bounded while
the thinking length grows to at most C + (I − 1)(C − m) tokens.

The two modes differ only in the carry (h = `keep_head`, y_k = chunk k's output, y_last = the
chunk just finished):

  "inference", the paper's Algorithm 1 (and the reference's tracing demo):
      carry = y_1[:h] ⊕ y_last[-m:]      (h + m tokens when the chunks are long enough)
  "train", the reference RL environment (verl agent loop with its "progressive" trimmer):
      a = previous carry ⊕ y_last        (a = y_1 after chunk 1)
      carry = a[:h] ⊕ a[-(m − h):]       (m tokens), or a itself when len(a) <= m

In both modes a token of the trace appears at most once in a prompt: in inference mode the tail
taken from chunk 1 starts no earlier than token h (it never repeats the head), and in train mode a
carry that is no longer than m is kept whole. Both cases arise only when a chunk stops short of its
budget without EOS, or (inference) when h + m > C; the reference never meets them with its settings
(chunks end on EOS or at the budget, m = C/2, h = 100), and its trimmer raises on a short carry.

keep_head = 0 folds nothing into the query. In inference mode the carry is then y_last[-m:]; in
train mode it is the last m tokens of a = previous carry ⊕ y_last, so when C − m < m or a chunk
stops short the carry also keeps the end of the previous carry (it is a sliding window over the
whole trace, not over one chunk).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adaptive.envs import validation
from adaptive.envs.base import Chunk, ChunkedEnv

MODES = ("inference", "train")


class DelethinkEnv(ChunkedEnv):
  """Chunked reasoning with a carry of the last tokens; see the module docstring.

  Args:
    chunk_size: C, tokens chunk 1 may generate (later chunks: C − m).
    carryover: m, the Markovian state size in tokens, 1 <= m < C.
    max_chunks: I, the chunk cap (>= 1); raise it at inference for test-time scaling.
    eos_ids: the token id(s) that end a trace.
    keep_head: h, tokens of chunk 1 folded into every later prompt, 0 <= h < m.
    mode: "train" (the reference RL environment) or "inference" (the paper's Algorithm 1).
  """

  def __init__(
    self,
    chunk_size: int,
    carryover: int,
    max_chunks: int,
    eos_ids: int | Sequence[int],
    keep_head: int = 100,
    mode: str = "train",
  ):
    self.chunk_size = validation.check_int(chunk_size, "chunk_size", 1)
    self.carryover = validation.check_int(carryover, "carryover", 1)
    if self.carryover >= self.chunk_size:
      raise ValueError(
        f"carryover={carryover} must be < chunk_size={chunk_size}: later chunks may generate "
        "chunk_size − carryover tokens"
      )
    self._max_chunks = validation.check_int(max_chunks, "max_chunks", 1)
    self.keep_head = validation.check_int(keep_head, "keep_head", 0)
    if self.keep_head >= self.carryover:
      raise ValueError(
        f"keep_head={keep_head} must be < carryover={carryover}: the head is part of the carry"
      )
    if mode not in MODES:
      raise ValueError(f"mode={mode!r}: must be one of {MODES}")
    self.mode = mode
    super().__init__(eos_ids)

  @property
  def max_chunks(self) -> int:
    """I, the most chunks a trace may have."""
    return self._max_chunks

  @property
  def thinking_budget(self) -> int:
    """C + (I − 1)(C − m), the most tokens a trace may generate."""
    return self.chunk_size + (self.max_chunks - 1) * (self.chunk_size - self.carryover)

  def _budget(self, chunk_index: int) -> int:
    return self.chunk_size if chunk_index == 0 else self.chunk_size - self.carryover

  def _next_carry(self, query: np.ndarray, trace: tuple[Chunk, ...]) -> np.ndarray:
    head, m = self.keep_head, self.carryover
    last_output = trace[-1].output
    if self.mode == "inference":
      first_output = trace[0].output
      tail_start = len(last_output) - m
      if len(trace) == 1:
        tail_start = max(tail_start, head)
      return np.concatenate([first_output[:head], last_output[max(tail_start, 0) :]])
    previous_carry = trace[-1].prompt[len(query) :]
    running = np.concatenate([previous_carry, last_output])
    if len(running) <= m:
      return running
    return np.concatenate([running[:head], running[len(running) - (m - head) :]])
