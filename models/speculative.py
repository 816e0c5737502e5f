"""Self-speculative decoding: the model's first layers draft, the whole model verifies.

    out = decoding.generate(model, prompts_BS, lengths_B, max_new_tokens=256,
                            speculative=decoding.SelfSpeculative(draft_layers=2, draft_tokens=4))
    out.tokens_BN, out.speculative.acceptance_rate

The prompt is prefilled as in plain decoding (`decoding._prefill`). Then each
iteration of one jitted `lax.while_loop`, for every row at its own position p
(the position of its last emitted token, whose K/V is not in the cache yet):

  1. Draft: the first E blocks + the shared final norm and LM head
     (`model.draft_step`) draft k tokens one at a time, from the last token at
     p to the (k-1)-th draft at p+k-1, writing those E layers' K/V. One more
     draft_step (its logits unused) feeds the k-th draft at p+k, so the E
     layers' K/V and exit states of all k+1 positions p..p+k exist.
  2. Verify: `model.verify_step` runs blocks E..L-1 over the k+1 exit states
     in one pass, writing those layers' K/V; its logits at p+j are the full
     model's prediction for the token at p+j+1.
  3. Accept: greedy accepts the longest prefix of drafts equal to the full
     model's argmax, then emits the full model's token at the first mismatch
     (or the bonus token after k accepted drafts): exactly plain greedy
     decoding. Sampling uses the speculative rule (Leviathan et al. 2023,
     Chen et al. 2023): draft x drawn from q is accepted with probability
     min(1, p(x)/q(x)); at the first rejection a token is drawn from
     norm(max(p - q, 0)); after k acceptances a bonus token from p. p and q
     are the full and draft distributions after the same temperature, top-k
     and top-p, so every emitted token is distributed as plain sampling's.
  4. Emit the accepted drafts and the corrected/bonus token, cut after an EOS
     id or at the row's budget; the row advances by the tokens it emitted.

Slots a row wrote for rejected drafts (positions past its new position) hold
stale K/V; causal masking by position hides them, and the next iteration
writes each slot before any query at or after it attends to it
(`models/kv_cache.py`). Rows accept different numbers of tokens with static
shapes: every row drafts and verifies k(+1) positions per iteration, a row that
stopped computes masked work.

Randomness: row b's key is rng[b] with per-row keys, else fold_in(rng, b); an
iteration that starts at the row's generated length n draws its j-th draft
with fold_in(fold_in(key_b, n), j), the acceptance uniforms with index k and
the corrected/bonus token with k + 1. A row's samples depend only on its key,
its logits and how far it got.

The cache grows in phases and each phase is one jitted while loop, as in
plain decoding (at most 1 prefill + MAX_PHASES "decode" programs per new
shape in `decoding.compile_counts`); the cache and the weights are held per
layer in the loop so that the E draft layers and the L - E verify layers write
their slices in place.

Returned statistics: `decoding.SpeculativeStats`, acceptance rate = accepted
drafts / drafted tokens. Executed FLOPs: `adaptive.flops.self_speculative_*`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import decoding, transformer

# Methods whose override changes how blocks run: the inherited dense drafter would be wrong.
_LAYER_METHODS = ("run_layers", "forward_cached", "init_cache")


def check(model, spec: decoding.SelfSpeculative) -> None:
  """Raises ValueError (naming the field) unless `model` can self-speculate with `spec`."""
  if not isinstance(spec, decoding.SelfSpeculative):
    raise ValueError(f"speculative={spec!r}: must be a decoding.SelfSpeculative or None")
  name = type(model).__name__
  for method in ("draft_step", "verify_step"):
    if not callable(getattr(model, method, None)):
      raise ValueError(
        f"speculative: model {name} has no {method} method (see models/speculative.py)"
      )
  cls = type(model)
  overrides = [
    m for m in _LAYER_METHODS if getattr(cls, m, None) is not getattr(transformer.Transformer, m)
  ]
  inherits = getattr(cls, "draft_step", None) is transformer.Transformer.draft_step and (
    getattr(cls, "verify_step", None) is transformer.Transformer.verify_step
  )
  if overrides and inherits:
    raise ValueError(
      f"speculative: model {name} overrides {', '.join(overrides)} but not draft_step / "
      "verify_step, so the dense drafter would not run its blocks; self-speculation is not "
      "supported for it"
    )
  num_layers = model.config.num_layers
  e = spec.draft_layers
  if not 1 <= e < num_layers:
    raise ValueError(
      f"SelfSpeculative.draft_layers={e}: must be in [1, num_layers - 1 = {num_layers - 1}]"
    )


class _Loop(NamedTuple):
  cache_layers: Any  # the cache, per-layer leaves unstacked (decoding._Unstacked)
  positions_B: jax.Array  # int32 [B]: position of each row's last emitted token
  done_B: jax.Array  # bool [B]
  tokens_BN: jax.Array
  logprobs_BN: jax.Array
  lengths_B: jax.Array
  stats: decoding.SpeculativeStats


def _row_keys(rng: jax.Array, b: int) -> jax.Array:
  if decoding._is_per_row(rng):
    return rng
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(b))


def _fold(keys_B, data):
  return jax.vmap(jax.random.fold_in, in_axes=(0, None if jnp.ndim(data) == 0 else 0))(keys_B, data)


def _categorical(keys_B, logits_BV) -> jax.Array:
  return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)


def _accept(logits_BTV, q_BKV, drafts_BK, keys_B, knobs, mode):
  """(emitted_BT int32 [B, k+1], accepted_B int32): drafts then the corrected/bonus token.

  emitted_BT[:, j] is the token at p+j+1 for j <= accepted_B; later columns are unused.
  """
  k = drafts_BK.shape[1]
  if mode.greedy:
    target_BT = jnp.argmax(logits_BTV, axis=-1).astype(jnp.int32)
    match_BK = drafts_BK == target_BT[:, :k]
    accepted_B = jnp.sum(jnp.cumprod(match_BK, axis=1), axis=1).astype(jnp.int32)
    return target_BT, accepted_B
  p_BTV = jax.nn.softmax(decoding.sampling_logits(logits_BTV, mode, knobs.temperature, knobs.top_p))
  q_BKV = jax.nn.softmax(q_BKV, axis=-1)
  p_draft_BK = jnp.take_along_axis(p_BTV[:, :k], drafts_BK[..., None], axis=-1)[..., 0]
  q_draft_BK = jnp.take_along_axis(q_BKV, drafts_BK[..., None], axis=-1)[..., 0]
  u_BK = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(_fold(keys_B, k))
  # u < p/q, i.e. probability min(1, p/q); q(x) > 0 for a drawn x.
  accept_BK = u_BK * q_draft_BK < p_draft_BK
  accepted_B = jnp.sum(jnp.cumprod(accept_BK, axis=1), axis=1).astype(jnp.int32)
  # At the first rejection sample norm(max(p - q, 0)); after k acceptances p itself (q = 0).
  q_BTV = jnp.concatenate([q_BKV, jnp.zeros_like(q_BKV[:, :1])], axis=1)
  at_B11 = accepted_B[:, None, None]
  p_BV = jnp.take_along_axis(p_BTV, at_B11, axis=1)[:, 0]
  q_BV = jnp.take_along_axis(q_BTV, at_B11, axis=1)[:, 0]
  residual_BV = jnp.maximum(p_BV - q_BV, 0.0)
  # p == q leaves no residual mass (and accepts with probability 1): fall back to p.
  residual_BV = jnp.where(jnp.sum(residual_BV, -1, keepdims=True) > 0, residual_BV, p_BV)
  fix_B = _categorical(_fold(keys_B, k + 1), jnp.log(residual_BV))
  drafts_BT = jnp.concatenate([drafts_BK, drafts_BK[:, :1]], axis=1)
  emitted_BT = jnp.where(
    jnp.arange(k + 1)[None, :] == accepted_B[:, None], fix_B[:, None], drafts_BT
  )
  return emitted_BT, accepted_B


def _phase(
  graphdef,
  state,
  cache,
  carry: decoding._Carry,
  stats: decoding.SpeculativeStats,
  knobs: decoding._Knobs,
  *,
  mode,
  capacity,
  final,
  draft_layers,
  draft_tokens,
):
  """One while-loop phase over a cache of `capacity` slots; returns (carry, stats, cache).

  Runs until every row is done or (unless `final`) a live row's drafts would
  pass the capacity; writes past the final capacity are dropped by the cache
  and belong to tokens past the budget.
  """
  decoding._TRACES["decode"] += 1
  e, k = draft_layers, draft_tokens
  b, n = carry.tokens_BN.shape
  model = nnx.merge(graphdef, state)
  num_layers = model.config.num_layers
  if decoding.cache_capacity(cache) < capacity:
    cache = decoding._grown(model, cache, b, capacity)
  budgets_B = decoding._budgets(knobs, b, n)
  row_keys_B = _row_keys(knobs.rng, b)
  if getattr(model.config, "scan_layers", False):
    weights, restack_weights = state, lambda s: s
    cache_layers, restack_cache, unstack_cache = cache, lambda c: c, lambda c: c
  else:
    weights, restack_weights = decoding._Unstacked.split(state, num_layers, decoding._in_layers)
    cache_layers, restack_cache = decoding._Unstacked.split(cache, num_layers)
    unstack_cache = lambda c: decoding._Unstacked(c, num_layers).leaves
  j_T = jnp.arange(k + 1, dtype=jnp.int32)

  def cond(loop: _Loop):
    fits = final | jnp.all(loop.done_B | (loop.positions_B + k < capacity))
    return ~jnp.all(loop.done_B) & fits

  def body(loop: _Loop):
    model = nnx.merge(graphdef, restack_weights(weights))
    last_B = jnp.take_along_axis(loop.tokens_BN, jnp.maximum(loop.lengths_B - 1, 0)[:, None], 1)
    keys_B = _fold(row_keys_B, loop.lengths_B)

    def draft(inputs, j):
      token_B, layers = inputs
      logits_B1V, exit_state, cache = model.draft_step(
        token_B[:, None], (loop.positions_B + j)[:, None], restack_cache(layers), e
      )
      if mode.greedy:
        q_BV = None
        draft_B = jnp.argmax(logits_B1V[:, 0], axis=-1).astype(jnp.int32)
      else:
        q_BV = decoding.sampling_logits(logits_B1V[:, 0], mode, knobs.temperature, knobs.top_p)
        draft_B = _categorical(_fold(keys_B, j), q_BV)
      return (draft_B, unstack_cache(cache)), (draft_B, q_BV, exit_state)

    # Unrolled, not a lax.scan: inside a scan the weights would be one stacked
    # loop operand, which XLA copies (and slices with copies) on every draft.
    carry_in, outs = (last_B[:, 0], loop.cache_layers), []
    for j in range(k):
      carry_in, out = draft(carry_in, j)
      outs.append(out)
    last_draft_B, layers = carry_in
    drafts_KB, q_KBV, states_K = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    # The k-th draft's own exit state (its draft logits are dead code).
    _, state_last, cache = model.draft_step(
      last_draft_B[:, None], (loop.positions_B + k)[:, None], restack_cache(layers), e
    )
    exit_state = jax.tree.map(
      lambda s_K, s: jnp.concatenate([jnp.moveaxis(s_K[:, :, 0], 0, 1), s], axis=1),
      states_K,
      state_last,
    )
    positions_BT = loop.positions_B[:, None] + j_T[None, :]
    logits_BTV, cache = model.verify_step(exit_state, positions_BT, cache, e)
    drafts_BK = drafts_KB.T
    q_BKV = None if q_KBV is None else jnp.moveaxis(q_KBV, 0, 1)
    emitted_BT, accepted_B = _accept(logits_BTV, q_BKV, drafts_BK, keys_B, knobs, mode)
    logprobs_BT = jnp.take_along_axis(
      jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1), emitted_BT[..., None], -1
    )[..., 0]

    live_B = ~loop.done_B
    eos_BT = decoding._is_eos(emitted_BT.reshape(-1), knobs.eos_ids_E).reshape(b, k + 1)
    index_BT = loop.lengths_B[:, None] + j_T[None, :]
    keep_BT = (
      live_B[:, None] & (j_T[None, :] <= accepted_B[:, None]) & (index_BT < budgets_B[:, None])
    )
    # Nothing after the first kept EOS.
    stop_BT = keep_BT & eos_BT
    keep_BT &= (jnp.cumsum(stop_BT, axis=1) - stop_BT) == 0
    emitted_B = jnp.sum(keep_BT, axis=1).astype(jnp.int32)
    rows_BT = jnp.broadcast_to(jnp.arange(b)[:, None], (b, k + 1))
    slot_BT = jnp.where(keep_BT, index_BT, n)  # n: out of bounds, dropped
    lengths_B = loop.lengths_B + emitted_B
    done_B = loop.done_B | jnp.any(keep_BT & eos_BT, axis=1) | (lengths_B >= budgets_B)
    live = live_B.astype(jnp.int32)
    s = loop.stats
    return _Loop(
      cache_layers=unstack_cache(cache),
      positions_B=loop.positions_B + emitted_B,
      done_B=done_B,
      tokens_BN=loop.tokens_BN.at[rows_BT, slot_BT].set(emitted_BT, mode="drop"),
      logprobs_BN=loop.logprobs_BN.at[rows_BT, slot_BT].set(logprobs_BT, mode="drop"),
      lengths_B=lengths_B,
      stats=decoding.SpeculativeStats(
        drafted_B=s.drafted_B + k * live,
        accepted_B=s.accepted_B + accepted_B * live,
        verify_passes_B=s.verify_passes_B + live,
        verify_passes=s.verify_passes + 1,
      ),
    )

  loop = _Loop(
    cache_layers,
    carry.positions_B,
    carry.done_B,
    carry.tokens_BN,
    carry.logprobs_BN,
    carry.lengths_B,
    stats,
  )
  loop = jax.lax.while_loop(cond, body, loop)
  carry = decoding._Carry(
    jnp.max(loop.lengths_B),  # rows stand at different steps; only the loops' exit reads it
    loop.positions_B,
    loop.done_B,
    loop.tokens_BN,
    loop.logprobs_BN,
    loop.lengths_B,
  )
  return carry, loop.stats, restack_cache(loop.cache_layers)


_STATIC = dict(
  static_argnames=("graphdef", "mode", "capacity", "final", "draft_layers", "draft_tokens")
)
# As in models.decoding: the first phase writes the prefilled cache in place; a
# later phase copies it into a larger buffer first.
_decode = jax.jit(_phase, donate_argnames=("cache", "carry", "stats"), **_STATIC)
_grow_and_decode = jax.jit(_phase, donate_argnames=("carry", "stats"), **_STATIC)


def decode(
  graphdef,
  state,
  cache,
  carry: decoding._Carry,
  knobs: decoding._Knobs,
  *,
  mode,
  capacities: list[int],
  spec: decoding.SelfSpeculative,
) -> decoding.Generation:
  """The decode phases after `decoding._prefill`; the `Generation` with its statistics."""
  b = carry.tokens_BN.shape[0]
  zeros_B = np.zeros(b, np.int32)
  stats = decoding.SpeculativeStats(
    *(jax.device_put(zeros_B) for _ in range(3)), jax.device_put(np.int32(0))
  )
  for phase, capacity in enumerate(capacities):
    decode = _grow_and_decode if phase else _decode
    carry, stats, cache = decode(
      graphdef,
      state,
      cache,
      carry,
      stats,
      knobs,
      mode=mode,
      capacity=capacity,
      final=phase == len(capacities) - 1,
      draft_layers=int(spec.draft_layers),
      draft_tokens=int(spec.draft_tokens),
    )
    if np.asarray(carry.done_B).all():
      break
  return decoding.Generation(carry.tokens_BN, carry.logprobs_BN, carry.lengths_B, stats)
