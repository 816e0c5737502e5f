"""adaptive/markov_cost.py against a brute-force walk over every token a generator feeds."""

import types

import pytest

from adaptive import markov_cost

# Unequal everything, GQA, so a swapped dimension shows.
SHAPE = markov_cost.Shape(
  num_layers=3,
  dim=40,
  num_heads=6,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=56,
  vocab_size=97,
  cache_bytes=2,
)


def brute_force(shape, chunks, batch, keys=None, attention_only=False):
  """Walks a rollout token by token, as a decoder runs it: (FLOPs, peak KV bytes).

  Written out from the formulas, without the module's helpers: per chunk, the prompt's tokens
  and every new token but the last are fed through each layer (one cache slot each); the token
  at position p attends over p + 1 keys (or keys(prompt, new, p)); a row of logits is computed
  at the last prompt token and at every decode step.
  """
  flops, peak = 0, 0
  for prompt, new in chunks:
    cached = 0
    fed = list(range(prompt)) + [prompt + j for j in range(new - 1)]
    for p in fed:
      k = p + 1 if keys is None else keys(prompt, new, p)
      for _layer in range(shape.num_layers):
        q = shape.dim * shape.num_heads * shape.head_dim
        kv = shape.dim * shape.num_kv_heads * shape.head_dim
        mlp = shape.dim * shape.mlp_dim
        if not attention_only:
          flops += 2 * q  # q projection
          flops += 2 * kv + 2 * kv  # k and v projections
          flops += 2 * q  # o projection
          flops += 2 * 3 * mlp  # gate, up, down
        flops += 2 * k * shape.num_heads * shape.head_dim  # QKᵀ
        flops += 2 * k * shape.num_heads * shape.head_dim  # AV
      cached += 1
    logit_rows = 1 + (new - 1)  # the last prompt position, then each decode step
    if not attention_only:
      flops += logit_rows * 2 * shape.dim * shape.vocab_size
    chunk_bytes = 0
    for _layer in range(shape.num_layers):
      for _kv in ("k", "v"):
        chunk_bytes += cached * shape.num_kv_heads * shape.head_dim * shape.cache_bytes
    peak = max(peak, chunk_bytes)
  return batch * flops, batch * peak


def pairs(chunks):
  return [(c.prompt, c.new_tokens) for c in chunks]


@pytest.mark.parametrize("thinking", [1, 5, 24, 25, 80])
@pytest.mark.parametrize("batch", [1, 3])
def test_rollouts_equal_the_token_by_token_sum(thinking, batch):
  query, c, m = 7, 24, 10
  for chunks in (
    markov_cost.longcot_chunks(query, thinking),
    markov_cost.delethink_chunks(query, thinking, c, m),
    markov_cost.delethink_chunks(query, thinking, c, m, carry=m + 3),
  ):
    flops, peak = brute_force(SHAPE, pairs(chunks), batch)
    assert markov_cost.rollout_flops(SHAPE, chunks, batch) == flops
    assert markov_cost.rollout_peak_kv_bytes(SHAPE, chunks, batch) == peak
    attention, _ = brute_force(SHAPE, pairs(chunks), batch, attention_only=True)
    parts = markov_cost.rollout_flop_parts(SHAPE, chunks, batch)
    assert parts["attention"] == attention and sum(parts.values()) == flops


def test_attending_over_whole_buffers_equals_the_token_by_token_sum():
  # A generator whose decode step reads a whole buffer of `size` slots (buffers of 16, 40, ...).
  def buffer(prompt, new, p):
    return next(size for size in (16, 40, 64, 1000) if p < size)

  chunks = markov_cost.delethink_chunks(5, 70, 32, 12)
  flops, _ = brute_force(SHAPE, pairs(chunks), 2, buffer)
  executed = markov_cost.rollout_flops(
    SHAPE, chunks, 2, keys_attended=lambda chunk, p: buffer(chunk.prompt, chunk.new_tokens, p)
  )
  assert executed == flops
  assert executed > markov_cost.rollout_flops(SHAPE, chunks, 2)


def test_delethink_chunks_follow_the_budgets():
  # C = 8, m = 3: chunk 1 makes 8 tokens, later chunks 5 over a query ⊕ 3-token carry.
  assert pairs(markov_cost.delethink_chunks(4, 8, 8, 3)) == [(4, 8)]
  assert pairs(markov_cost.delethink_chunks(4, 20, 8, 3)) == [(4, 8), (7, 5), (7, 5), (7, 2)]
  assert pairs(markov_cost.delethink_chunks(4, 6, 8, 3)) == [(4, 6)]
  assert pairs(markov_cost.longcot_chunks(4, 20)) == [(4, 20)]
  with pytest.raises(ValueError, match="carryover"):
    markov_cost.delethink_chunks(4, 20, 8, 8)
  with pytest.raises(ValueError, match="new_tokens"):
    markov_cost.Chunk(3, 0)


def test_longcot_is_quadratic_and_delethink_linear_in_thinking():
  shape = markov_cost.Shape(2, 32, 4, 4, 32, 64, 128)
  query, c, m = 16, 128, 64

  def costs(chunks_of):
    return [
      (
        markov_cost.rollout_flops(shape, chunks_of(n * c)),
        markov_cost.rollout_peak_kv_bytes(shape, chunks_of(n * c)),
      )
      for n in (2, 4, 8, 16)
    ]

  (lf2, lk2), _, (lf8, _), (lf16, lk16) = costs(lambda t: markov_cost.longcot_chunks(query, t))
  (_, dk2), (df4, _), (df8, _), (df16, dk16) = costs(
    lambda t: markov_cost.delethink_chunks(query, t, c, m)
  )
  assert 30 < lf16 / lf2 < 64  # → 64 as attention dominates
  assert lf16 - lf8 > 2.5 * (lf8 - lf2)  # the marginal token costs more the longer the trace
  # Delethink: every 8C more tokens cost the same (16 more equal chunks), twice what 4C cost.
  assert df16 - df8 == pytest.approx(2 * (df8 - df4))
  assert lk16 / lk2 == pytest.approx((query + 16 * c - 1) / (query + 2 * c - 1))
  assert dk16 == dk2 == shape.kv_bytes_per_token * (query + c - 1)  # chunk 1 is the largest


def test_shape_from_a_model_config():
  config = types.SimpleNamespace(
    num_layers=3, dim=40, num_heads=6, num_kv_heads=2, head_dim=8, mlp_dim=56, vocab_size=97
  )
  assert markov_cost.Shape.from_config(config, cache_bytes=2) == SHAPE
  assert SHAPE.kv_bytes_per_token == 2 * 3 * 2 * 8 * 2
