"""Analytic cost of a chunked-reasoning rollout: FLOPs and peak KV-cache bytes, LongCoT vs Delethink.

A rollout is a list of chunks; a chunk is one generation call: a prompt of P tokens, then T new
tokens (LongCoT: one chunk of P = query, T = thinking length; Delethink: chunk 1 of the query and
C new tokens, then chunks of query ⊕ an m-token carry and C − m new tokens). Every chunk starts a
fresh sequence at position 0 with an empty KV cache.

What a generator does for one chunk (the way `models.decoding.generate` runs it):

  * it feeds P + T − 1 tokens through the layers: the P prompt tokens (prefill), then each new
    token but the last (the last is sampled and never fed back), so the KV cache of the chunk
    ends holding the keys and values of P + T − 1 tokens: its *context*;
  * the token fed at position p attends causally to p + 1 keys (itself and everything before);
  * it computes T rows of logits (the last prompt position, then every decode step).

Units and conventions (DESIGN.md, "Compute accounting"): FLOPs count a multiply-add as 2;
embedding lookups, norms, activations, softmax and sampling are not counted. Per layer and per
fed token:

  linear     2 · (matmul parameters of the layer)            q, k, v, o projections + SwiGLU MLP
  attention  4 · keys · num_heads · head_dim                 QKᵀ and AV over `keys` keys

plus the LM head, 2 · dim · vocab_size per row of logits. KV-cache bytes of a context of c tokens:
2 (keys and values) · num_layers · num_kv_heads · head_dim · c · bytes per element, per row of
the batch. Token counts are per row; multiply by the batch (the `batch` arguments do).

Summed over a chunk (n = P + T − 1 fed tokens, keys 1..n): attention 4·H·Dh·n(n+1)/2 per layer,
quadratic in the chunk's length. LongCoT's single chunk grows with the thinking length L, so its
FLOPs grow as L² and its KV cache as L; Delethink's chunks all have bounded length, so its FLOPs
grow as L and its KV cache stays at the largest chunk's.

Plain Python: no JAX, no imports from `models` or `train`; any object with the fields of
`models.transformer.Config` converts with `Shape.from_config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Shape:
  """The dimensions of a decoder transformer that its decoding cost depends on.

  Attributes:
    num_layers, dim, num_heads, num_kv_heads, head_dim, mlp_dim, vocab_size: as in
      `models.transformer.Config` (a SwiGLU MLP of `mlp_dim`; GQA with num_kv_heads).
    cache_bytes: bytes per element of the KV cache (4 for float32, 2 for bfloat16).
  """

  num_layers: int
  dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  vocab_size: int
  cache_bytes: int = 4

  @classmethod
  def from_config(cls, config: Any, cache_bytes: int = 4) -> Shape:
    """A Shape from any object with the fields of `models.transformer.Config`."""
    return cls(
      num_layers=config.num_layers,
      dim=config.dim,
      num_heads=config.num_heads,
      num_kv_heads=config.num_kv_heads,
      head_dim=config.head_dim,
      mlp_dim=config.mlp_dim,
      vocab_size=config.vocab_size,
      cache_bytes=cache_bytes,
    )

  @property
  def matmul_params_per_layer(self) -> int:
    """Parameters of one block's matmuls: q and o (D·H·Dh each), k and v (D·K·Dh each), MLP 3·D·F."""
    q_and_o = 2 * self.dim * self.num_heads * self.head_dim
    k_and_v = 2 * self.dim * self.num_kv_heads * self.head_dim
    return q_and_o + k_and_v + 3 * self.dim * self.mlp_dim

  @property
  def linear_flops_per_token(self) -> float:
    """FLOPs of every layer's matmuls for one fed token: 2 · layers · matmul params."""
    return 2.0 * self.num_layers * self.matmul_params_per_layer

  @property
  def attention_flops_per_key(self) -> float:
    """FLOPs of every layer's QKᵀ and AV for one query and one key: 4 · layers · H · Dh."""
    return 4.0 * self.num_layers * self.num_heads * self.head_dim

  @property
  def head_flops_per_logit_row(self) -> float:
    """FLOPs of the LM head for one row of logits: 2 · dim · vocab_size."""
    return 2.0 * self.dim * self.vocab_size

  @property
  def kv_bytes_per_token(self) -> int:
    """KV-cache bytes of one cached token (one row): 2 · layers · kv_heads · head_dim · bytes."""
    return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.cache_bytes


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One generation call: `prompt` tokens in, `new_tokens` tokens out (both >= 1)."""

  prompt: int
  new_tokens: int

  def __post_init__(self):
    for name in ("prompt", "new_tokens"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Chunk.{name}={value!r}: must be an integer >= 1")

  @property
  def context(self) -> int:
    """Tokens fed through the layers, and so cached: prompt + new_tokens − 1."""
    return self.prompt + self.new_tokens - 1


def chunk_flop_parts(
  shape: Shape, chunk: Chunk, keys_attended: Callable[[int], int] | None = None
) -> dict[str, float]:
  """FLOPs of one chunk for one row of the batch, by part: "linear", "attention", "head".

  Args:
    shape: the model.
    chunk: prompt and new-token counts.
    keys_attended: keys_attended(p) = keys the token fed at position p attends over; default
      p + 1 (causal attention over the filled cache, the analytic model). A generator that
      attends over a whole fixed-size buffer passes its buffer size instead (what it executes).
  Returns:
    linear: the layers' matmuls over the fed tokens; attention: QKᵀ and AV; head: the LM head
    over the rows of logits (see the module docstring).
  """
  n = chunk.context
  if keys_attended is None:
    keys = n * (n + 1) // 2  # sum of p + 1 over p = 0 .. n − 1
  else:
    keys = sum(keys_attended(p) for p in range(n))
  return {
    "linear": n * shape.linear_flops_per_token,
    "attention": keys * shape.attention_flops_per_key,
    "head": chunk.new_tokens * shape.head_flops_per_logit_row,
  }


def chunk_flops(
  shape: Shape, chunk: Chunk, keys_attended: Callable[[int], int] | None = None
) -> float:
  """FLOPs of one chunk for one row: the sum of `chunk_flop_parts`."""
  return sum(chunk_flop_parts(shape, chunk, keys_attended).values())


def chunk_kv_bytes(shape: Shape, chunk: Chunk) -> int:
  """Bytes of the chunk's KV cache at its end (one row): its context times bytes per token."""
  return chunk.context * shape.kv_bytes_per_token


def longcot_chunks(query: int, thinking: int) -> list[Chunk]:
  """LongCoT: one chunk, the query as prompt, `thinking` new tokens."""
  return [Chunk(query, thinking)]


def delethink_chunks(
  query: int, thinking: int, chunk_size: int, carryover: int, carry: int | None = None
) -> list[Chunk]:
  """Delethink chunks that generate exactly `thinking` tokens (no EOS: every chunk full).

  Chunk 1: prompt = query, up to C = `chunk_size` new tokens. Every later chunk: prompt = query ⊕
  a carry of `carry` tokens, up to C − m new tokens (m = `carryover`). The last chunk takes what
  is left of `thinking`. `carry` defaults to m, what `DelethinkEnv` carries in train mode when
  chunks run full; its inference mode carries keep_head + m.
  """
  if not 1 <= carryover < chunk_size:
    raise ValueError(f"carryover={carryover}: must be in [1, chunk_size={chunk_size})")
  if thinking < 1:
    raise ValueError(f"thinking={thinking}: must be >= 1")
  carry = carryover if carry is None else carry
  chunks = [Chunk(query, min(thinking, chunk_size))]
  left = thinking - chunks[0].new_tokens
  while left > 0:
    new = min(left, chunk_size - carryover)
    chunks.append(Chunk(query + carry, new))
    left -= new
  return chunks


def rollout_flop_parts(
  shape: Shape,
  chunks: Sequence[Chunk],
  batch: int = 1,
  keys_attended: Callable[[Chunk, int], int] | None = None,
) -> dict[str, float]:
  """FLOPs of a rollout of `batch` rows that each run `chunks`, by part (see `chunk_flop_parts`).

  keys_attended(chunk, p), if given, replaces the causal p + 1 keys.
  """
  total = {"linear": 0.0, "attention": 0.0, "head": 0.0}
  for chunk in chunks:
    per_position = None if keys_attended is None else (lambda p, c=chunk: keys_attended(c, p))
    for part, flops in chunk_flop_parts(shape, chunk, per_position).items():
      total[part] += batch * flops
  return total


def rollout_flops(
  shape: Shape,
  chunks: Sequence[Chunk],
  batch: int = 1,
  keys_attended: Callable[[Chunk, int], int] | None = None,
) -> float:
  """FLOPs of a rollout of `batch` rows that each run `chunks`: the sum of the parts."""
  return sum(rollout_flop_parts(shape, chunks, batch, keys_attended).values())


def rollout_peak_kv_bytes(shape: Shape, chunks: Sequence[Chunk], batch: int = 1) -> int:
  """The largest KV cache of any chunk of the rollout, over `batch` rows (caches never coexist:
  a chunk's cache is dropped before the next chunk starts)."""
  return batch * max(chunk_kv_bytes(shape, chunk) for chunk in chunks)
