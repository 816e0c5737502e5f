"""Batched generation over a fixed-capacity KV cache: the rollout engine.

    out = generate(model, prompt_tokens_BS, prompt_lengths_B, max_new_tokens=256,
                   sampling=Sampling(temperature=1.0, top_p=0.95), eos_ids=(2,),
                   rng=jax.random.key(0))
    out.tokens_BN, out.logprobs_BN, out.lengths_B

Prompts are right-padded to [B, S]; every prompt starts at position 0. One
jitted prefill runs the whole padded batch through the model, writing the
cache slots 0..S-1 of every row, and samples each row's first token from the
logits at its last real prompt position (slots past a row's length hold the
keys of padding, which the row never attends to: causal masking by position
hides them until decoding overwrites them). Then one jitted `lax.while_loop`
feeds one token per row per step, each row at its own position, and stops a
row at any of `eos_ids` (the EOS token is kept) or after its budget
(`max_new_tokens`, or the row's own `max_new_tokens_B`); the loop ends as soon
as every row has stopped. With `speculative=SelfSpeculative(draft_layers=E,
draft_tokens=k)` the loop instead drafts k tokens per row with the model's
first E layers and verifies them in one pass of the rest (`models/speculative.py`),
same output for greedy decoding, same distribution for sampling.

The cache grows in phases (`phase_capacities`: each about `cache_growth` times
the last, at most `MAX_PHASES` of them, the last S + max_new_tokens - 1) so
that decode steps attend over about the filled length, not the whole final
buffer. Each phase is one jitted while loop; a later phase copies the cache
into its larger buffer at the start of the same program, so one generate call
on a new shape compiles at most 1 + MAX_PHASES programs (`compile_counts`
counts them). The cache is donated into the prefill and the first phase.
Inside the loop its per-layer slices (and
the per-layer weights) are held as separate arrays and re-stacked for each
`forward_cached` call, which XLA folds away: every layer's cache is written
in place and nothing cache- or weight-sized is copied per step (checked on
the compiled HLO by tests/test_decoding.py). The jitted functions are
module-level and take the model's graphdef as a static argument: a second
call with the same model structure, shapes and sampling mode reuses the
compiled code (temperature, top_p, eos ids, pad id, row budgets and the key
are traced; greedy-vs-sampling, top_k and top_p < 1 are static).

Prompt token ids are checked on the host before anything is traced: an id
outside [0, vocab_size) within a row's real length is a ValueError naming the
row, the position and the id.

Log-probabilities are the model's raw log_softmax of the chosen token, before
temperature / top-k / top-p, which is what RL importance ratios need.

Randomness is explicit: the token of generation step i is drawn with
`jax.random.fold_in(rng, i)`, so a row's samples depend only on `rng`, the
step and the logits. With one key per row (`rng` of shape [B]) row b's token
i is drawn with `fold_in(rng[b], i)` from that row's logits alone, so a row's
samples do not depend on which other rows share the batch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import first


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen from the model's logits.

  Attributes:
    temperature: 0 means greedy (argmax); otherwise logits are divided by it
      before sampling. Must be a finite number >= 0.
    top_k: keep only the k most likely tokens (0 = no limit).
    top_p: nucleus sampling: keep the smallest set of most likely tokens whose
      probability (after temperature and top-k) reaches top_p; 1 = no limit.
      Must be in (0, 1]. The most likely token is always kept.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    t = self.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
      raise ValueError(f"Sampling.temperature={t!r}: must be a finite number >= 0 (0 = greedy)")
    k = self.top_k
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
      raise ValueError(f"Sampling.top_k={k!r}: must be an integer >= 0 (0 = no limit)")
    p = self.top_p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
      raise ValueError(f"Sampling.top_p={p!r}: must be a number in (0, 1] (1 = no limit)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class SelfSpeculative:
  """Self-speculative decoding (`models.speculative`): the model drafts with its first layers.

  Attributes:
    draft_layers: E, blocks the drafter runs before the shared final norm and
      LM head; in [1, num_layers - 1].
    draft_tokens: k >= 1, tokens drafted before each verify pass.
  """

  draft_layers: int
  draft_tokens: int = 4

  def __post_init__(self):
    for name in ("draft_layers", "draft_tokens"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"SelfSpeculative.{name}={value!r}: must be an integer >= 1")


class SpeculativeStats(NamedTuple):
  """Acceptance statistics of a self-speculative `generate` call.

  Attributes:
    drafted_B: int32 [B] draft tokens made for each row while it was live
      (k per verify pass, rejected ones included).
    accepted_B: int32 [B] drafts the full model accepted (before any cut by
      an EOS or the budget inside the window).
    verify_passes_B: int32 [B] verify passes while the row was live.
    verify_passes: int32 [] loop iterations of the batch (each runs the
      drafts and one verify pass for every row: the executed work).
  """

  drafted_B: jax.Array
  accepted_B: jax.Array
  verify_passes_B: jax.Array
  verify_passes: jax.Array

  @property
  def acceptance_rate(self) -> float:
    """Accepted drafts / drafted tokens over the batch (0 when nothing was drafted)."""
    drafted = int(np.sum(self.drafted_B))
    return int(np.sum(self.accepted_B)) / drafted if drafted else 0.0


class Generation(NamedTuple):
  """What `generate` returns (N = max_new_tokens).

  Attributes:
    tokens_BN: int32 [B, N] generated tokens; pad_id after a row stopped (the
      EOS token that stopped it is kept).
    logprobs_BN: float32 [B, N] log-probability of each generated token under
      the model's raw distribution, log_softmax(logits)[token], before
      temperature, top-k and top-p (what RL importance ratios need); 0 after
      a row stopped.
    lengths_B: int32 [B] number of generated tokens per row, EOS included.
    speculative: `SpeculativeStats` of a self-speculative call, else None.
  """

  tokens_BN: jax.Array
  logprobs_BN: jax.Array
  lengths_B: jax.Array
  speculative: SpeculativeStats | None = None


# -- sampling --------------------------------------------------------------------------


class _SamplingMode(NamedTuple):
  """The static part of `Sampling` (what changes the compiled program)."""

  greedy: bool
  top_k: int
  use_top_p: bool


def _mode(sampling: Sampling) -> _SamplingMode:
  return _SamplingMode(sampling.greedy, int(sampling.top_k), sampling.top_p < 1)


def _is_per_row(key: jax.Array) -> bool:
  """A typed key array [B] (one key per row), as opposed to one key for the batch."""
  return jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1


def _step_key(rng: jax.Array, step) -> jax.Array:
  """The key of generation step `step`: fold_in per row for per-row keys."""
  if _is_per_row(rng):
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rng, step)
  return jax.random.fold_in(rng, step)


def sampling_logits(logits_BV: jax.Array, mode: _SamplingMode, temperature, top_p) -> jax.Array:
  """The logits sampling draws from: divided by temperature, top-k / top-p cut to -inf.

  Any leading shape [..., V]; float32. (Not for greedy mode.)
  """
  scaled_BV = logits_BV.astype(jnp.float32) / temperature
  neg_inf = jnp.array(-jnp.inf, jnp.float32)
  vocab = scaled_BV.shape[-1]
  if 0 < mode.top_k < vocab:
    kth_B1 = jax.lax.top_k(scaled_BV, mode.top_k)[0][..., -1:]
    scaled_BV = jnp.where(scaled_BV >= kth_B1, scaled_BV, neg_inf)
  if mode.use_top_p:
    sorted_BV = jnp.sort(scaled_BV, axis=-1, descending=True)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Mass strictly before each sorted token; keep tokens reached before top_p.
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = before_BV < top_p
    # Smallest kept logit is the threshold (the first token is always kept).
    threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    scaled_BV = jnp.where(scaled_BV >= threshold_B1, scaled_BV, neg_inf)
  return scaled_BV


def select_tokens(
  logits_BV: jax.Array,
  key: jax.Array,
  mode: _SamplingMode,
  temperature: jax.Array,
  top_p: jax.Array,
):
  """Picks one token per row; returns (tokens_B int32, raw logprobs_B float32).

  `key` is one key for the batch, or typed keys [B], one per row (row b is then
  drawn from its own key and logits only).
  """
  logits_BV = logits_BV.astype(jnp.float32)
  raw_logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  if mode.greedy:
    tokens_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  else:
    scaled_BV = sampling_logits(logits_BV, mode, temperature, top_p)
    if _is_per_row(key):
      draw = lambda k, logits_V: jax.random.categorical(k, logits_V)
      tokens_B = jax.vmap(draw)(key, scaled_BV).astype(jnp.int32)
    else:
      tokens_B = jax.random.categorical(key, scaled_BV, axis=-1).astype(jnp.int32)
  logprobs_B = jnp.take_along_axis(raw_logprobs_BV, tokens_B[:, None], axis=-1)[:, 0]
  return tokens_B, logprobs_B


# -- the two jitted programs --------------------------------------------------------------


class _Knobs(NamedTuple):
  """Traced per-call values (changing them does not recompile)."""

  temperature: jax.Array  # float32 []
  top_p: jax.Array  # float32 []
  eos_ids_E: jax.Array  # int32 [E]
  pad_id: jax.Array  # int32 []
  rng: jax.Array  # PRNG key, or typed keys [B] (one per row)
  budgets_B: jax.Array | None = None  # int32 [B]: each row's most tokens (None: all N)


def _budgets(knobs: _Knobs, b: int, n: int) -> jax.Array:
  return jnp.full((b,), n, jnp.int32) if knobs.budgets_B is None else knobs.budgets_B


# Programs traced per jitted function (a trace is a compile, or a persistent-cache hit).
_TRACES: collections.Counter[str] = collections.Counter()


def compile_counts() -> dict[str, int]:
  """Programs this module has traced so far, per jitted function ("prefill", "decode").

  A self-speculative phase (`models.speculative`) counts as a "decode" program.

  Take the difference of two calls to count what a piece of code compiled:
  one `generate` call on a new (B, S, N, sampling mode) compiles at most
  1 prefill + MAX_PHASES decode programs; the same call again compiles none.
  """
  return {name: _TRACES[name] for name in ("prefill", "decode")}


def _is_eos(tokens_B, eos_ids_E):
  return jnp.any(tokens_B[:, None] == eos_ids_E[None, :], axis=-1)


def _prompt_layers(model, tokens_BS, lengths_B, cache):
  """Runs the padded prompts through every layer over the cache; (x_BSD, cache)."""
  b, s = tokens_BS.shape
  positions_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  x_BSD = model.embed_tokens(tokens_BS)
  if isinstance(model, first.FiRSTTransformer):
    # FiRST decides each row's layers from its real prompt tokens at prefill
    # (its `prefill`, without the logits of every prompt position).
    return model._cached_layers(x_BSD, positions_BS, cache, lengths_B)
  return model.run_layers(x_BSD, positions_BS, None, cache)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "mode", "capacity", "max_new_tokens", "cache_dtype")
)
def _prefill(
  graphdef,
  state,
  tokens_BS,
  lengths_B,
  knobs: _Knobs,
  *,
  mode,
  capacity,
  max_new_tokens,
  cache_dtype,
):
  """Runs the padded prompts into a new cache of `capacity` slots.

  Returns (cache, carry) with each row's first token sampled; rows whose
  budget is 0 get pad_id and logprob 0 and start done. The cache and the
  carry are made here, not eagerly, so a call compiles nothing else.
  """
  _TRACES["prefill"] += 1
  model = nnx.merge(graphdef, state)
  b, n = tokens_BS.shape[0], max_new_tokens
  cache = model.init_cache(b, capacity, dtype=cache_dtype)
  x_BSD, cache = _prompt_layers(model, tokens_BS, lengths_B, cache)
  # Only the last real prompt position of each row needs logits.
  last_B11 = (lengths_B - 1)[:, None, None]
  x_B1D = jnp.take_along_axis(x_BSD, last_B11, axis=1)
  logits_BV = model.logits_from_hidden(x_B1D)[:, 0]
  tokens_B, logprobs_B = select_tokens(
    logits_BV, _step_key(knobs.rng, 0), mode, knobs.temperature, knobs.top_p
  )
  budgets_B = _budgets(knobs, b, n)
  live_B = budgets_B >= 1
  tokens_B = jnp.where(live_B, tokens_B, knobs.pad_id)
  logprobs_B = jnp.where(live_B, logprobs_B, 0.0)
  carry = _Carry(
    step=jnp.int32(1),
    positions_B=lengths_B,
    done_B=~live_B | _is_eos(tokens_B, knobs.eos_ids_E) | (budgets_B <= 1),
    tokens_BN=jnp.full((b, n), knobs.pad_id, jnp.int32).at[:, 0].set(tokens_B),
    logprobs_BN=jnp.zeros((b, n), jnp.float32).at[:, 0].set(logprobs_B),
    lengths_B=live_B.astype(jnp.int32),
  )
  return cache, carry


class _LoopState(NamedTuple):
  step: jax.Array  # int32 []: index of the token this iteration generates
  cache_layers: Any  # the cache, its per-layer leaves unstacked (see _Unstacked)
  positions_B: jax.Array  # int32 [B]: position of tokens_BN[:, step - 1]
  done_B: jax.Array  # bool [B]
  tokens_BN: jax.Array
  logprobs_BN: jax.Array
  lengths_B: jax.Array


class _Unstacked:
  """A pytree whose leaves with a leading `layers` axis are held as per-layer arrays.

  On CPU (and elsewhere) XLA materialises `stacked[i]` as a copy, so a decode
  step over stacked weights and a stacked cache copies every weight and the
  whole cache once per token; it also does not hoist those slices out of the
  while loop. Holding the leaves per layer in the loop and re-stacking them
  inside the step (`stack(...)[i]` folds to the i-th array, and a stack at the
  end of `run_layers` unstacks the same way) leaves only the real work.
  """

  def __init__(self, tree, num_layers: int, path_filter=lambda path: True):
    leaves, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
    self.stacked = tuple(
      path_filter(path) and getattr(x, "ndim", 0) >= 1 and x.shape[0] == num_layers
      for path, x in leaves
    )
    self.num_layers = num_layers
    self.leaves = [
      [x[i] for i in range(num_layers)] if s else x
      for (_, x), s in zip(leaves, self.stacked, strict=True)
    ]

  @staticmethod
  def split(tree, num_layers: int, path_filter=lambda path: True):
    """(held leaves, restack function); the held leaves are a plain pytree."""
    u = _Unstacked(tree, num_layers, path_filter)
    return u.leaves, u.restack

  def restack(self, leaves):
    return jax.tree_util.tree_unflatten(
      self.treedef, [jnp.stack(x) if s else x for x, s in zip(leaves, self.stacked, strict=True)]
    )


def _in_layers(path) -> bool:
  return bool(path) and getattr(path[0], "key", None) == "layers"


class _Carry(NamedTuple):
  """What one decode phase hands to the next (everything but the cache)."""

  step: jax.Array  # int32 []: index of the token the next iteration generates
  positions_B: jax.Array  # int32 [B]: position of tokens_BN[:, step - 1]
  done_B: jax.Array  # bool [B]
  tokens_BN: jax.Array
  logprobs_BN: jax.Array
  lengths_B: jax.Array


def _grown(model, cache, batch: int, capacity: int):
  """`cache` copied into the origin of the model's empty cache of `capacity` slots."""
  dtype = jax.tree.leaves(cache)[0].dtype  # the keys' dtype (every cache's first field)
  empty = model.init_cache(batch, capacity, dtype=dtype)
  return jax.tree.map(
    lambda big, small: jax.lax.dynamic_update_slice(
      big, small.astype(big.dtype), (0,) * small.ndim
    ),
    empty,
    cache,
  )


def _decode_phase(graphdef, state, cache, carry: _Carry, knobs: _Knobs, *, mode, capacity):
  """The while-loop decode over a cache of `capacity` slots.

  A smaller cache (the previous phase's) is first copied into a buffer of
  `capacity` slots. Runs until every row is done, N tokens are generated, or a
  live row's next position reaches `capacity` (the caller then calls again
  with a larger capacity). Returns (carry, cache).
  """
  _TRACES["decode"] += 1
  n = carry.tokens_BN.shape[1]
  model = nnx.merge(graphdef, state)
  config = model.config
  if cache_capacity(cache) < capacity:
    cache = _grown(model, cache, carry.tokens_BN.shape[0], capacity)
  budgets_B = _budgets(knobs, carry.tokens_BN.shape[0], n)
  num_layers, scan_layers = config.num_layers, getattr(config, "scan_layers", False)
  if scan_layers:  # lax.scan slices the stacked arrays itself: keep them stacked.
    weights, restack_weights = state, lambda s: s
    cache_layers, restack_cache = cache, lambda c: c
    unstack_cache = lambda c: c
  else:
    weights, restack_weights = _Unstacked.split(state, num_layers, _in_layers)
    cache_layers, restack_cache = _Unstacked.split(cache, num_layers)
    unstack_cache = lambda c: _Unstacked(c, num_layers).leaves

  def cond(loop: _LoopState):
    fits = jnp.all(loop.done_B | (loop.positions_B < capacity))
    return (loop.step < n) & ~jnp.all(loop.done_B) & fits

  def body(loop: _LoopState):
    model = nnx.merge(graphdef, restack_weights(weights))
    last_B = jax.lax.dynamic_index_in_dim(loop.tokens_BN, loop.step - 1, axis=1, keepdims=False)
    logits_B1V, cache = model.forward_cached(
      last_B[:, None], loop.positions_B[:, None], restack_cache(loop.cache_layers)
    )
    new_B, new_logprobs_B = select_tokens(
      logits_B1V[:, 0],
      _step_key(knobs.rng, loop.step),
      mode,
      knobs.temperature,
      knobs.top_p,
    )
    live_B = ~loop.done_B
    new_B = jnp.where(live_B, new_B, knobs.pad_id)
    new_logprobs_B = jnp.where(live_B, new_logprobs_B, 0.0)
    done_B = loop.done_B | _is_eos(new_B, knobs.eos_ids_E) | (loop.step + 1 >= budgets_B)
    return _LoopState(
      step=loop.step + 1,
      cache_layers=unstack_cache(cache),
      positions_B=loop.positions_B + 1,
      done_B=done_B,
      tokens_BN=jax.lax.dynamic_update_index_in_dim(loop.tokens_BN, new_B, loop.step, 1),
      logprobs_BN=jax.lax.dynamic_update_index_in_dim(
        loop.logprobs_BN, new_logprobs_B, loop.step, 1
      ),
      lengths_B=loop.lengths_B + live_B.astype(jnp.int32),
    )

  loop = _LoopState(
    step=carry.step,
    cache_layers=cache_layers,
    positions_B=carry.positions_B,
    done_B=carry.done_B,
    tokens_BN=carry.tokens_BN,
    logprobs_BN=carry.logprobs_BN,
    lengths_B=carry.lengths_B,
  )
  loop = jax.lax.while_loop(cond, body, loop)
  carry = _Carry(
    loop.step, loop.positions_B, loop.done_B, loop.tokens_BN, loop.logprobs_BN, loop.lengths_B
  )
  # Returning the cache lets XLA alias the donated input buffer to it.
  return carry, restack_cache(loop.cache_layers)


_DECODE_STATIC = dict(static_argnames=("graphdef", "mode", "capacity"))
# The first phase decodes in the prefilled cache in place; a later phase starts
# by copying the cache into a larger buffer, which cannot alias the donated
# smaller one, so only the carry is donated there (the old cache is freed when
# the caller drops it).
_decode = jax.jit(_decode_phase, donate_argnames=("cache", "carry"), **_DECODE_STATIC)
_grow_and_decode = jax.jit(_decode_phase, donate_argnames=("carry",), **_DECODE_STATIC)


def cache_capacity(cache) -> int:
  """Slots per row of any model's cache (its leaves are [layers, batch, capacity, ...])."""
  return max(x.shape[2] for x in jax.tree.leaves(cache) if x.ndim >= 3)


# Most decode phases of one generate call, so a new (B, S, N) compiles at most
# 1 + MAX_PHASES programs however long the generation.
MAX_PHASES = 4


def phase_capacities(
  prompt_len: int,
  max_new_tokens: int,
  growth: float | None,
  quantum: int = 64,
  max_phases: int | None = MAX_PHASES,
) -> list[int]:
  """Cache capacities of the successive decode phases.

  A fixed cache makes every decode step attend over all of its slots, the
  unwritten ones too. Growing it in phases (each `growth` times the last,
  rounded up to `quantum` slots, the last one exactly S + N - 1) keeps the
  attention close to the filled length at the price of one compilation and
  one cache copy per phase. Where that would take more than `max_phases`
  phases, the growth factor is raised until `max_phases` suffice (None: no
  limit). growth=None: one phase at the full capacity.
  """
  full = prompt_len + max_new_tokens - 1
  if growth is None:
    return [full]
  first_capacity = min(full, -(-(prompt_len + 1) // quantum) * quantum)

  def ladder(factor: float) -> list[int]:
    capacities = [first_capacity]
    while capacities[-1] < full:
      grown = -(-math.ceil(capacities[-1] * factor) // quantum) * quantum
      capacities.append(min(full, max(grown, capacities[-1] + quantum)))
    return capacities

  capacities = ladder(growth)
  if max_phases is not None and len(capacities) > max(max_phases, 1):
    if max_phases <= 1:
      return [full]
    # first * factor^(max_phases - 1) >= full; rounding up only shortens the ladder.
    factor = (full / first_capacity) ** (1 / (max_phases - 1)) * (1 + 1e-9)
    capacities = ladder(max(factor, growth))
  return capacities


# -- the entry point ------------------------------------------------------------------


def _as_int_array(name: str, value: Any, ndim: int) -> np.ndarray | jax.Array:
  shape, dtype = np.shape(value), getattr(value, "dtype", None)
  if dtype is None:
    value = np.asarray(value)
    dtype = value.dtype
  if len(shape) != ndim:
    raise ValueError(f"{name}: expected a {ndim}-D integer array, got shape {shape}")
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{name}: expected integer token ids, got dtype {dtype}")
  return value


def first_out_of_vocab(tokens_BS, lengths_B, vocab_size: int) -> tuple[int, int, int] | None:
  """(row, position, id) of the first id outside [0, vocab_size) within a row's length, or None.

  tokens_BS: int [B, S] (host or device; read on the host); lengths_B: int [B].
  """
  tokens_BS, lengths_B = np.asarray(tokens_BS), np.asarray(lengths_B)
  real_BS = np.arange(tokens_BS.shape[1])[None, :] < lengths_B[:, None]
  bad_BS = real_BS & ((tokens_BS < 0) | (tokens_BS >= vocab_size))
  if not bad_BS.any():
    return None
  row, position = np.argwhere(bad_BS)[0]
  return int(row), int(position), int(tokens_BS[row, position])


def _as_rng(rng, b: int, sampling: Sampling) -> jax.Array:
  """One key for the batch (typed or legacy uint32[2]) or typed keys [B] (legacy [B, 2] wrapped)."""
  if rng is None:
    if not sampling.greedy:
      raise ValueError(
        f"rng: a PRNG key is required when sampling.temperature={sampling.temperature} > 0"
      )
    return jax.random.key(0)  # unused by greedy decoding
  if isinstance(rng, jax.Array):
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.shape in ((), (b,)):
      return rng
    if rng.dtype == jnp.uint32 and rng.shape == (2,):
      return rng
    if rng.dtype == jnp.uint32 and rng.shape == (b, 2):
      return jax.random.wrap_key_data(rng)
  raise ValueError(
    f"rng={rng!r}: must be a jax.random.key (or a legacy uint32[2] key), or B={b} of them "
    "(one per row)"
  )


def generate(
  model,
  prompt_tokens_BS,
  prompt_lengths_B,
  *,
  max_new_tokens: int,
  sampling: Sampling = Sampling(),
  eos_ids=(),
  rng: jax.Array | None = None,
  pad_id: int = 0,
  cache_dtype=None,
  cache_growth: float | None = 1.25,
  max_new_tokens_B=None,
  speculative: SelfSpeculative | None = None,
) -> Generation:
  """Generates up to `max_new_tokens` tokens for every prompt of a batch.

  Args:
    model: a `models.transformer.Transformer` (or a variant with the same
      `embed_tokens` / `run_layers` / `logits_from_hidden` / `forward_cached`
      / `init_cache` methods; FiRST's prompt-decided layers are decided at
      prefill).
    prompt_tokens_BS: int [B, S] prompts, right-padded (padding values are
      ignored); ids within each row's length must be in [0, vocab_size).
    prompt_lengths_B: int [B] real length of each prompt, in [1, S].
    max_new_tokens: N >= 1, the most tokens generated per row.
    sampling: greedy, temperature, top-k, top-p; see `Sampling`.
    eos_ids: token ids that stop a row (any of them); empty = never stop early.
    rng: PRNG key (`jax.random.key` or legacy uint32 key), or one key per row
      (typed keys [B], or legacy uint32 [B, 2]) so that a row's samples do not
      depend on the rest of the batch; required unless sampling is greedy.
    pad_id: written after a row stopped.
    cache_dtype: KV cache dtype; default the model's compute dtype.
    cache_growth: the cache grows in phases, each this many times the last
      (see `phase_capacities`; at most MAX_PHASES), so attention reads about
      the filled length; None keeps one cache of the full capacity
      S + N - 1. Results are the same either way.
    max_new_tokens_B: optional int [B], each row's own budget in [0, N]: a row
      stops after that many tokens (0: the row generates nothing, e.g. a
      padding row). Default N for every row. Changing it does not recompile.
    speculative: `SelfSpeculative(draft_layers=E, draft_tokens=k)` decodes
      self-speculatively (`models.speculative`; the model needs `draft_step` /
      `verify_step`): greedy output equal to plain greedy decoding, sampled
      tokens distributed as plain sampling's (not the same samples).

  Returns:
    `Generation(tokens_BN, logprobs_BN, lengths_B)`, with `speculative`
    acceptance statistics (`SpeculativeStats`) when decoding self-speculatively.
  """
  # Validate everything before anything is traced or compiled.
  if not isinstance(sampling, Sampling):
    raise ValueError(f"sampling={sampling!r}: must be a decoding.Sampling")
  if (
    isinstance(max_new_tokens, bool)
    or not isinstance(max_new_tokens, (int, np.integer))
    or max_new_tokens < 1
  ):
    raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
  max_new_tokens = int(max_new_tokens)
  prompt_tokens_BS = _as_int_array("prompt_tokens_BS", prompt_tokens_BS, 2)
  prompt_lengths_B = _as_int_array("prompt_lengths_B", prompt_lengths_B, 1)
  b, s = prompt_tokens_BS.shape
  if b < 1 or s < 1:
    raise ValueError(f"prompt_tokens_BS: shape {(b, s)} must have B >= 1 and S >= 1")
  if prompt_lengths_B.shape != (b,):
    raise ValueError(
      f"prompt_lengths_B: shape {prompt_lengths_B.shape} must be ({b},), "
      f"one length per row of prompt_tokens_BS {(b, s)}"
    )
  lengths_np = np.asarray(prompt_lengths_B)
  if lengths_np.min() < 1 or lengths_np.max() > s:
    raise ValueError(
      f"prompt_lengths_B: every length must be in [1, S={s}], got "
      f"min {lengths_np.min()} max {lengths_np.max()}"
    )
  vocab = model.config.vocab_size
  bad = first_out_of_vocab(prompt_tokens_BS, lengths_np, vocab)
  if bad is not None:
    row, position, token = bad
    raise ValueError(
      f"prompt_tokens_BS: row {row} holds token id {token} at position {position}, "
      f"outside [0, vocab_size={vocab})"
    )
  budgets_np = None
  if max_new_tokens_B is not None:
    budgets_np = np.asarray(_as_int_array("max_new_tokens_B", max_new_tokens_B, 1))
    if budgets_np.shape != (b,) or budgets_np.min() < 0 or budgets_np.max() > max_new_tokens:
      raise ValueError(
        f"max_new_tokens_B: must be {b} budgets in [0, max_new_tokens={max_new_tokens}], got "
        f"shape {budgets_np.shape} min {budgets_np.min(initial=0)} max {budgets_np.max(initial=0)}"
      )
  eos_np = np.asarray(tuple(eos_ids) if not isinstance(eos_ids, (int, np.integer)) else (eos_ids,))
  if eos_np.size and (
    eos_np.ndim != 1
    or not np.issubdtype(eos_np.dtype, np.integer)
    or eos_np.min() < 0
    or eos_np.max() >= vocab
  ):
    raise ValueError(f"eos_ids={eos_ids!r}: must be token ids in [0, vocab_size={vocab})")
  if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)):
    raise ValueError(f"pad_id={pad_id!r}: must be an integer")
  rng = _as_rng(rng, b, sampling)
  if cache_growth is not None and (
    isinstance(cache_growth, bool)
    or not isinstance(cache_growth, (int, float))
    or not cache_growth > 1
  ):
    raise ValueError(f"cache_growth={cache_growth!r}: must be a number > 1, or None")
  capacity = s + max_new_tokens - 1
  max_capacity = getattr(model.config, "max_cache_length", None)
  if max_capacity is not None and capacity > max_capacity:
    raise ValueError(
      f"max_new_tokens={max_new_tokens}: S + max_new_tokens - 1 = {capacity} "
      f"exceeds the model's max_cache_length={max_capacity}"
    )
  if speculative is not None:
    from models import speculative as self_speculative  # it builds on this module

    self_speculative.check(model, speculative)

  mode = _mode(sampling)
  # Host values go to the device with device_put, a plain transfer (jnp.asarray of
  # a NumPy array compiles a small program per shape).
  knobs = _Knobs(
    temperature=jax.device_put(np.float32(sampling.temperature or 1.0)),
    top_p=jax.device_put(np.float32(sampling.top_p)),
    eos_ids_E=jax.device_put(eos_np.reshape(-1).astype(np.int32)),
    pad_id=jax.device_put(np.int32(pad_id)),
    rng=rng,
    budgets_B=None if budgets_np is None else jax.device_put(budgets_np.astype(np.int32)),
  )
  graphdef, state = nnx.split(model)
  tokens_BS = jax.device_put(np.asarray(prompt_tokens_BS, np.int32))
  lengths_B = jax.device_put(lengths_np.astype(np.int32))
  capacities = phase_capacities(s, max_new_tokens, cache_growth)
  cache, carry = _prefill(
    graphdef,
    state,
    tokens_BS,
    lengths_B,
    knobs,
    mode=mode,
    capacity=capacities[0],
    max_new_tokens=max_new_tokens,
    cache_dtype=None if cache_dtype is None else jnp.dtype(cache_dtype),
  )
  if speculative is not None:
    return self_speculative.decode(
      graphdef, state, cache, carry, knobs, mode=mode, capacities=capacities, spec=speculative
    )
  for phase, phase_capacity in enumerate(capacities):
    decode = _grow_and_decode if phase else _decode
    carry, cache = decode(graphdef, state, cache, carry, knobs, mode=mode, capacity=phase_capacity)
    if int(carry.step) >= max_new_tokens or np.asarray(carry.done_B).all():
      break
  return Generation(carry.tokens_BN, carry.logprobs_BN, carry.lengths_B)
