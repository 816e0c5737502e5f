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
row at any of `eos_ids` (the EOS token is kept) or after `max_new_tokens`; the
loop ends as soon as every row has stopped.

The cache grows in phases (`phase_capacities`: each about `cache_growth` times
the last, the last S + max_new_tokens - 1) so that decode steps attend over
about the filled length, not the whole final buffer; each phase is one jitted
while loop, and the cache is donated into every jitted function. Inside the loop its per-layer slices (and
the per-layer weights) are held as separate arrays and re-stacked for each
`forward_cached` call, which XLA folds away: every layer's cache is written
in place and nothing cache- or weight-sized is copied per step (checked on
the compiled HLO by tests/test_decoding.py). The jitted functions are
module-level and take the model's graphdef as a static argument: a second
call with the same model structure, shapes and sampling mode reuses the
compiled code (temperature, top_p, eos ids, pad id and the key are traced;
greedy-vs-sampling, top_k and top_p < 1 are static).

Log-probabilities are the model's raw log_softmax of the chosen token, before
temperature / top-k / top-p, which is what RL importance ratios need.

Randomness is explicit: the token of generation step i is drawn with
`jax.random.fold_in(rng, i)`, so a row's samples depend only on `rng`, the
step and the logits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


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
  """

  tokens_BN: jax.Array
  logprobs_BN: jax.Array
  lengths_B: jax.Array


# -- sampling --------------------------------------------------------------------------


class _SamplingMode(NamedTuple):
  """The static part of `Sampling` (what changes the compiled program)."""

  greedy: bool
  top_k: int
  use_top_p: bool


def _mode(sampling: Sampling) -> _SamplingMode:
  return _SamplingMode(sampling.greedy, int(sampling.top_k), sampling.top_p < 1)


def select_tokens(
  logits_BV: jax.Array,
  key: jax.Array,
  mode: _SamplingMode,
  temperature: jax.Array,
  top_p: jax.Array,
):
  """Picks one token per row; returns (tokens_B int32, raw logprobs_B float32)."""
  logits_BV = logits_BV.astype(jnp.float32)
  raw_logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  if mode.greedy:
    tokens_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  else:
    scaled_BV = logits_BV / temperature
    neg_inf = jnp.array(-jnp.inf, jnp.float32)
    vocab = scaled_BV.shape[-1]
    if 0 < mode.top_k < vocab:
      kth_B1 = jax.lax.top_k(scaled_BV, mode.top_k)[0][:, -1:]
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
  rng: jax.Array  # PRNG key


def _is_eos(tokens_B, eos_ids_E):
  return jnp.any(tokens_B[:, None] == eos_ids_E[None, :], axis=-1)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "mode", "max_new_tokens"), donate_argnames=("cache",)
)
def _prefill(graphdef, state, tokens_BS, lengths_B, cache, knobs: _Knobs, *, mode, max_new_tokens):
  """Runs the padded prompts; returns (cache, first tokens_B, logprobs_B, done_B)."""
  model = nnx.merge(graphdef, state)
  b, s = tokens_BS.shape
  positions_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  x_BSD, cache = model.run_layers(model.embed_tokens(tokens_BS), positions_BS, None, cache)
  # Only the last real prompt position of each row needs logits.
  last_B11 = (lengths_B - 1)[:, None, None]
  x_B1D = jnp.take_along_axis(x_BSD, last_B11, axis=1)
  logits_BV = model.logits_from_hidden(x_B1D)[:, 0]
  tokens_B, logprobs_B = select_tokens(
    logits_BV, jax.random.fold_in(knobs.rng, 0), mode, knobs.temperature, knobs.top_p
  )
  done_B = _is_eos(tokens_B, knobs.eos_ids_E) | (max_new_tokens <= 1)
  return cache, tokens_B, logprobs_B, done_B


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


@functools.partial(
  jax.jit, static_argnames=("graphdef", "mode", "capacity"), donate_argnames=("cache", "carry")
)
def _decode(graphdef, state, cache, carry: _Carry, knobs: _Knobs, *, mode, capacity):
  """The while-loop decode over a cache of `capacity` slots.

  Runs until every row is done, N tokens are generated, or a live row's next
  position reaches `capacity` (the caller then grows the cache and calls
  again). Returns (carry, cache).
  """
  n = carry.tokens_BN.shape[1]
  config = nnx.merge(graphdef, state).config
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
      jax.random.fold_in(knobs.rng, loop.step),
      mode,
      knobs.temperature,
      knobs.top_p,
    )
    live_B = ~loop.done_B
    new_B = jnp.where(live_B, new_B, knobs.pad_id)
    new_logprobs_B = jnp.where(live_B, new_logprobs_B, 0.0)
    done_B = loop.done_B | _is_eos(new_B, knobs.eos_ids_E) | (loop.step + 1 >= n)
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


@functools.partial(jax.jit, donate_argnames=("empty_cache",))
def _grow_cache(cache, empty_cache):
  """Copies every leaf of `cache` into the origin of the larger `empty_cache`.

  The larger buffer is donated (the output aliases it); the old cache is freed
  when the caller drops it.
  """
  return jax.tree.map(
    lambda big, small: jax.lax.dynamic_update_slice(big, small, (0,) * small.ndim),
    empty_cache,
    cache,
  )


def phase_capacities(
  prompt_len: int, max_new_tokens: int, growth: float | None, quantum: int = 64
) -> list[int]:
  """Cache capacities of the successive decode phases.

  A fixed cache makes every decode step attend over all of its slots, the
  unwritten ones too. Growing it in phases (each `growth` times the last,
  rounded up to `quantum` slots, the last one exactly S + N - 1) keeps the
  attention close to the filled length at the price of one compilation and
  one cache copy per phase. growth=None: one phase at the full capacity.
  """
  full = prompt_len + max_new_tokens - 1
  if growth is None:
    return [full]
  capacities = [min(full, -(-(prompt_len + 1) // quantum) * quantum)]
  while capacities[-1] < full:
    grown = -(-math.ceil(capacities[-1] * growth) // quantum) * quantum
    capacities.append(min(full, max(grown, capacities[-1] + quantum)))
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
) -> Generation:
  """Generates up to `max_new_tokens` tokens for every prompt of a batch.

  Args:
    model: a `models.transformer.Transformer` (or a variant with the same
      `embed_tokens` / `run_layers` / `logits_from_hidden` / `forward_cached`
      / `init_cache` methods).
    prompt_tokens_BS: int [B, S] prompts, right-padded (padding values are
      ignored).
    prompt_lengths_B: int [B] real length of each prompt, in [1, S].
    max_new_tokens: N >= 1, the most tokens generated per row.
    sampling: greedy, temperature, top-k, top-p; see `Sampling`.
    eos_ids: token ids that stop a row (any of them); empty = never stop early.
    rng: PRNG key (`jax.random.key` or legacy uint32 key); required unless
      sampling is greedy.
    pad_id: written after a row stopped.
    cache_dtype: KV cache dtype; default the model's compute dtype.
    cache_growth: the cache grows in phases, each this many times the last
      (see `phase_capacities`), so attention reads about the filled length;
      None keeps one cache of the full capacity S + N - 1. Results are the
      same either way.

  Returns:
    `Generation(tokens_BN, logprobs_BN, lengths_B)`.
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
  if rng is None:
    if not sampling.greedy:
      raise ValueError(
        f"rng: a PRNG key is required when sampling.temperature={sampling.temperature} > 0"
      )
    rng = jax.random.key(0)  # unused by greedy decoding
  elif not (
    isinstance(rng, jax.Array)
    and (
      jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
      or (rng.dtype == jnp.uint32 and rng.shape == (2,))
    )
  ):
    raise ValueError(f"rng={rng!r}: must be a jax.random.key (or a legacy uint32[2] key)")
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

  mode = _mode(sampling)
  knobs = _Knobs(
    temperature=jnp.float32(sampling.temperature or 1.0),
    top_p=jnp.float32(sampling.top_p),
    eos_ids_E=jnp.asarray(eos_np.reshape(-1), jnp.int32),
    pad_id=jnp.int32(pad_id),
    rng=rng,
  )
  graphdef, state = nnx.split(model)
  tokens_BS = jnp.asarray(prompt_tokens_BS, jnp.int32)
  lengths_B = jnp.asarray(prompt_lengths_B, jnp.int32)
  capacities = phase_capacities(s, max_new_tokens, cache_growth)
  cache = model.init_cache(b, capacities[0], dtype=cache_dtype)
  cache, first_B, first_logprobs_B, done_B = _prefill(
    graphdef, state, tokens_BS, lengths_B, cache, knobs, mode=mode, max_new_tokens=max_new_tokens
  )
  carry = _Carry(
    step=jnp.int32(1),
    positions_B=lengths_B,
    done_B=done_B,
    tokens_BN=jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B),
    logprobs_BN=jnp.zeros((b, max_new_tokens), jnp.float32).at[:, 0].set(first_logprobs_B),
    lengths_B=jnp.ones((b,), jnp.int32),
  )
  for phase, phase_capacity in enumerate(capacities):
    if phase:
      cache = _grow_cache(cache, model.init_cache(b, phase_capacity, dtype=cache_dtype))
    carry, cache = _decode(graphdef, state, cache, carry, knobs, mode=mode, capacity=phase_capacity)
    if int(carry.step) >= max_new_tokens or bool(jnp.all(carry.done_B)):
      break
  return Generation(carry.tokens_BN, carry.logprobs_BN, carry.lengths_B)
