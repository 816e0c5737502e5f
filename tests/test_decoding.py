"""models.decoding against teacher forcing (the model's plain forward pass).

The reference for every generated token is the teacher-forced forward pass
over prompt + generated tokens: the logits at position len + i - 1 must be the
logits the decoder saw when it chose token i.
"""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import decoding, transformer

TINY_FIELDS = dict(
  vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
CONFIG = transformer.Config(**TINY_FIELDS)
LENGTHS = np.array([5, 9, 2], np.int32)
S, N = 9, 7


@pytest.fixture(scope="module")
def model():
  return transformer.Transformer(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
  tokens = np.random.RandomState(0).randint(1, CONFIG.vocab_size, (len(LENGTHS), S))
  tokens[np.arange(S)[None, :] >= LENGTHS[:, None]] = 0  # right padding
  return tokens.astype(np.int32)


def teacher_forced_logits(model, prompts, lengths, generated, gen_lengths):
  """[B, N, V] float32: logits that predict generated token i of each row."""
  b, n = generated.shape
  seq = np.zeros((b, S + n), np.int32)
  for r in range(b):
    seq[r, : lengths[r]] = prompts[r, : lengths[r]]
    seq[r, lengths[r] : lengths[r] + gen_lengths[r]] = generated[r, : gen_lengths[r]]
  logits, _ = model(jnp.asarray(seq))
  index = lengths[:, None] - 1 + np.arange(n)[None, :]
  return np.asarray(jnp.take_along_axis(logits, jnp.asarray(index)[..., None], axis=1))


@pytest.fixture(scope="module")
def greedy(model, prompts):
  return decoding.generate(model, prompts, LENGTHS, max_new_tokens=N)


def test_cached_decoding_reproduces_teacher_forced_logits(model, prompts):
  """Padded-batch prefill + per-row decode steps (the protocol generate uses)."""
  b = len(LENGTHS)
  graphdef, state = nnx.split(model)
  forward_cached = jax.jit(
    lambda state, tokens, positions, cache: nnx.merge(graphdef, state).forward_cached(
      tokens, positions, cache
    )
  )
  cache = model.init_cache(b, S + N - 1)
  positions = jnp.broadcast_to(jnp.arange(S), (b, S))
  logits, cache = forward_cached(state, jnp.asarray(prompts), positions, cache)
  step_logits = [np.asarray(logits)[np.arange(b), LENGTHS - 1]]
  tokens = [np.argmax(step_logits[-1], -1).astype(np.int32)]
  for i in range(1, N):
    logits, cache = forward_cached(
      state, jnp.asarray(tokens[-1])[:, None], jnp.asarray(LENGTHS - 1 + i)[:, None], cache
    )
    step_logits.append(np.asarray(logits)[:, 0])
    tokens.append(np.argmax(step_logits[-1], -1).astype(np.int32))
  generated = np.stack(tokens, 1)
  expected = teacher_forced_logits(model, prompts, LENGTHS, generated, np.full(b, N))
  np.testing.assert_allclose(np.stack(step_logits, 1), expected, atol=1e-5, rtol=1e-5)


def test_greedy_matches_teacher_forcing(model, prompts, greedy):
  b = len(LENGTHS)
  assert greedy.tokens_BN.shape == (b, N) and greedy.tokens_BN.dtype == jnp.int32
  assert greedy.logprobs_BN.dtype == jnp.float32
  np.testing.assert_array_equal(greedy.lengths_B, np.full(b, N))
  tokens = np.asarray(greedy.tokens_BN)
  expected = teacher_forced_logits(model, prompts, LENGTHS, tokens, np.full(b, N))
  np.testing.assert_array_equal(tokens, np.argmax(expected, -1))
  # logprobs are the raw model log-softmax of the chosen token.
  logprobs = np.take_along_axis(
    np.asarray(jax.nn.log_softmax(expected, -1)), tokens[..., None], -1
  )[..., 0]
  np.testing.assert_allclose(greedy.logprobs_BN, logprobs, atol=1e-5, rtol=1e-5)


def test_repeated_call_does_not_recompile(model, prompts, greedy):
  sizes = (decoding._prefill._cache_size(), decoding._decode._cache_size())
  again = decoding.generate(model, prompts, LENGTHS, max_new_tokens=N)
  np.testing.assert_array_equal(again.tokens_BN, greedy.tokens_BN)
  assert (decoding._prefill._cache_size(), decoding._decode._cache_size()) == sizes


def test_decode_loop_never_copies_the_whole_cache(model):
  """In the compiled while-loop body no op produces the stacked cache [L, B, T, K, D]
  (no per-step stack/update of the whole cache) and, on CPU, no op produces a
  head-major [B, K, T, D] layer (no per-step transpose copy of a cache layer)."""
  b, capacity = len(LENGTHS), S + N - 1
  graphdef, state = nnx.split(model)
  cache = model.init_cache(b, capacity)
  knobs = decoding._Knobs(
    jnp.float32(1), jnp.float32(1), jnp.zeros((0,), jnp.int32), jnp.int32(0), jax.random.key(0)
  )
  carry = decoding._Carry(
    jnp.int32(1),
    jnp.asarray(LENGTHS),
    jnp.zeros(b, bool),
    jnp.zeros((b, N), jnp.int32),
    jnp.zeros((b, N)),
    jnp.ones(b, jnp.int32),
  )
  hlo = (
    decoding._decode.lower(
      graphdef,
      state,
      cache,
      carry,
      knobs,
      mode=decoding._mode(decoding.Sampling()),
      capacity=capacity,
    )
    .compile()
    .as_text()
  )
  body = [line for line in hlo.splitlines() if "while/body" in line]
  assert body
  c = CONFIG
  stacked = f"f32[{c.num_layers},{b},{capacity},{c.num_kv_heads},{c.head_dim}]"
  head_major = f"f32[{b},{c.num_kv_heads},{capacity},{c.head_dim}]"
  layer = f"f32[{b},{capacity},{c.num_kv_heads},{c.head_dim}]"
  assert any(f"= {layer}" in line for line in body)  # the per-layer in-place writes
  assert not [line for line in body if f"= {stacked}" in line]
  if jax.default_backend() == "cpu":
    assert not [line for line in body if f"= {head_major}" in line]


def test_eos_stops_each_row_and_pads(model, prompts, greedy):
  tokens = np.asarray(greedy.tokens_BN)
  # Row 0 stops at its step-2 token, row 1 at its step-4 token (if not earlier).
  eos_ids = (int(tokens[0, 2]), int(tokens[1, 4]))
  pad = 63
  out = decoding.generate(model, prompts, LENGTHS, max_new_tokens=N, eos_ids=eos_ids, pad_id=pad)
  for r in range(len(LENGTHS)):
    hits = np.flatnonzero(np.isin(tokens[r], eos_ids))
    length = hits[0] + 1 if hits.size else N
    assert int(out.lengths_B[r]) == length
    np.testing.assert_array_equal(out.tokens_BN[r, :length], tokens[r, :length])
    np.testing.assert_array_equal(out.tokens_BN[r, length:], pad)
    np.testing.assert_allclose(
      out.logprobs_BN[r, :length], greedy.logprobs_BN[r, :length], atol=1e-6
    )
    np.testing.assert_array_equal(out.logprobs_BN[r, length:], 0.0)
  assert int(out.lengths_B[0]) <= 3 and int(out.lengths_B[1]) <= 5


def test_max_new_tokens_one(model, prompts, greedy):
  out = decoding.generate(model, prompts, LENGTHS, max_new_tokens=1)
  np.testing.assert_array_equal(out.tokens_BN[:, 0], greedy.tokens_BN[:, 0])
  np.testing.assert_array_equal(out.lengths_B, 1)


def test_top_k_one_and_tiny_top_p_are_greedy(model, prompts, greedy):
  key = jax.random.key(3)
  for sampling in (
    decoding.Sampling(temperature=1.5, top_k=1),
    decoding.Sampling(temperature=1.5, top_p=1e-6),
  ):
    out = decoding.generate(model, prompts, LENGTHS, max_new_tokens=N, sampling=sampling, rng=key)
    np.testing.assert_array_equal(out.tokens_BN, greedy.tokens_BN, err_msg=str(sampling))
    np.testing.assert_allclose(out.logprobs_BN, greedy.logprobs_BN, atol=1e-6)


def test_scan_layers_gives_the_same_tokens(prompts, greedy):
  scanned = transformer.Transformer(CONFIG.replace(scan_layers=True), rngs=nnx.Rngs(0))
  out = decoding.generate(scanned, prompts, LENGTHS, max_new_tokens=N)
  np.testing.assert_array_equal(out.tokens_BN, greedy.tokens_BN)
  np.testing.assert_allclose(out.logprobs_BN, greedy.logprobs_BN, atol=1e-5)


def test_temperature_sampling_is_deterministic_and_follows_softmax(model, prompts):
  """First tokens of many identical rows are i.i.d. draws from softmax(logits / T)."""
  rows, temperature = 512, 0.7
  batch = np.repeat(prompts[:1], rows, axis=0)
  lengths = np.full(rows, LENGTHS[0], np.int32)
  sampling = decoding.Sampling(temperature=temperature)
  out = decoding.generate(
    model, batch, lengths, max_new_tokens=2, sampling=sampling, rng=jax.random.key(0)
  )
  again = decoding.generate(
    model, batch, lengths, max_new_tokens=2, sampling=sampling, rng=jax.random.key(0)
  )
  other = decoding.generate(
    model, batch, lengths, max_new_tokens=2, sampling=sampling, rng=jax.random.key(1)
  )
  np.testing.assert_array_equal(out.tokens_BN, again.tokens_BN)
  assert not np.array_equal(out.tokens_BN, other.tokens_BN)

  logits, _ = model(jnp.asarray(prompts[:1, : LENGTHS[0]]))
  logits = np.asarray(logits[0, -1], np.float64)
  probs = np.exp((logits - logits.max()) / temperature)
  probs /= probs.sum()
  counts = np.bincount(np.asarray(out.tokens_BN[:, 0]), minlength=CONFIG.vocab_size)
  # Pool rare tokens so every cell expects >= 5 draws, then a chi-square test.
  order = np.argsort(-probs)
  expected, observed, pool_e, pool_o = [], [], 0.0, 0
  for v in order:
    if probs[v] * rows >= 5:
      expected.append(probs[v] * rows)
      observed.append(counts[v])
    else:
      pool_e += probs[v] * rows
      pool_o += counts[v]
  expected.append(pool_e)
  observed.append(pool_o)
  expected, observed = np.array(expected), np.array(observed)
  chi2 = float(np.sum((observed - expected) ** 2 / np.maximum(expected, 1e-9)))
  dof = len(expected) - 1
  assert dof >= 3
  assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)  # ~ p < 1e-4
  # The raw logprob of each sampled token is the model's (temperature-free) one.
  np.testing.assert_allclose(
    out.logprobs_BN[:, 0],
    np.log(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())[
      out.tokens_BN[:, 0]
    ],
    atol=1e-5,
  )


def test_top_k_and_top_p_restrict_the_support():
  logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1]] * 4000, jnp.float32))
  mode = decoding._mode(decoding.Sampling(temperature=1.0, top_k=2))
  tokens, _ = decoding.select_tokens(logits, jax.random.key(0), mode, 1.0, 1.0)
  freq = np.bincount(np.asarray(tokens), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.4 / 0.7, 0.3 / 0.7, 0, 0], atol=0.03)
  mode = decoding._mode(decoding.Sampling(temperature=1.0, top_p=0.75))
  tokens, _ = decoding.select_tokens(logits, jax.random.key(1), mode, 1.0, 0.75)
  freq = np.bincount(np.asarray(tokens), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0], atol=0.03)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(prompt_lengths_B=np.array([5, 10, 2])), "prompt_lengths_B"),
    (dict(prompt_lengths_B=np.array([5, 0, 2])), "prompt_lengths_B"),
    (dict(prompt_lengths_B=np.array([5, 2])), "prompt_lengths_B"),
    (dict(prompt_tokens_BS=np.zeros((3,), np.int32)), "prompt_tokens_BS"),
    (dict(prompt_tokens_BS=np.zeros((3, 9), np.float32)), "prompt_tokens_BS"),
    (dict(eos_ids=(64,)), "eos_ids"),
    (dict(sampling=decoding.Sampling(temperature=1.0)), "rng"),
    (dict(rng=3), "rng"),
    (dict(pad_id=None), "pad_id"),
  ],
)
def test_bad_arguments_raise_before_compiling(model, prompts, kwargs, message):
  call = dict(prompt_tokens_BS=prompts, prompt_lengths_B=LENGTHS, max_new_tokens=N)
  call.update(kwargs)
  sizes = (decoding._prefill._cache_size(), decoding._decode._cache_size())
  with pytest.raises(ValueError, match=message):
    decoding.generate(model, call.pop("prompt_tokens_BS"), call.pop("prompt_lengths_B"), **call)
  assert (decoding._prefill._cache_size(), decoding._decode._cache_size()) == sizes


@pytest.mark.parametrize(
  "kwargs, field",
  [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
  ],
)
def test_sampling_validates_its_fields(kwargs, field):
  with pytest.raises(ValueError, match=f"Sampling.{field}"):
    decoding.Sampling(**kwargs)


def test_phase_capacities_grow_to_exactly_the_full_cache():
  assert decoding.phase_capacities(128, 256, None) == [383]
  assert decoding.phase_capacities(128, 256, 1.25) == [192, 256, 320, 383]
  assert decoding.phase_capacities(5, 3, 1.25) == [7]
  for s, n in [(1, 1), (3, 200), (64, 64), (100, 1000)]:
    capacities = decoding.phase_capacities(s, n, 1.5, quantum=8)
    assert capacities[0] >= min(s + 1, s + n - 1) and capacities[-1] == s + n - 1
    assert all(a < b for a, b in zip(capacities, capacities[1:], strict=False))


def test_growing_cache_in_phases_gives_the_same_generation(model, prompts):
  """Many small phases (each a cache copy into a larger one) change nothing."""
  sampling = decoding.Sampling(temperature=1.0, top_k=20)
  kwargs = dict(max_new_tokens=N, sampling=sampling, rng=jax.random.key(3), eos_ids=(5, 9))
  with mock.patch.object(
    decoding, "phase_capacities", lambda s, n, growth: list(range(s + 1, s + n - 1)) + [s + n - 1]
  ):
    phased = decoding.generate(model, prompts, LENGTHS, cache_growth=1.25, **kwargs)
  single = decoding.generate(model, prompts, LENGTHS, cache_growth=None, **kwargs)
  np.testing.assert_array_equal(phased.tokens_BN, single.tokens_BN)
  np.testing.assert_array_equal(phased.lengths_B, single.lengths_B)
  np.testing.assert_allclose(phased.logprobs_BN, single.logprobs_BN, atol=1e-6)


# -- compiles, token-id checks, per-row keys and budgets, every model kind --------------------


class BackendCompiles:
  """Counts every program XLA builds (the jax.monitoring backend-compile event): an
  independent check of decoding.compile_counts that also sees eager ops."""

  count = 0
  _registered = False

  @classmethod
  def total(cls) -> int:
    if not cls._registered:
      from jax._src import dispatch

      def listener(event, secs, **kwargs):
        cls.count += event == dispatch.BACKEND_COMPILE_EVENT

      jax.monitoring.register_event_duration_secs_listener(listener)
      cls._registered = True
    return cls.count


def test_phase_capacities_are_bounded_in_number():
  for s, n in [(9, 600), (100, 8192), (1024, 8192), (7, 32768)]:
    capacities = decoding.phase_capacities(s, n, 1.25)
    assert len(capacities) <= decoding.MAX_PHASES, (s, n, capacities)
    assert capacities[-1] == s + n - 1 and capacities[0] >= s + 1
    assert all(a < b for a, b in zip(capacities, capacities[1:], strict=False))
    unbounded = decoding.phase_capacities(s, n, 1.25, max_phases=None)
    assert len(unbounded) > decoding.MAX_PHASES  # The bound is what keeps it small.


def test_a_new_shape_compiles_a_bounded_number_of_programs(model):
  """S = 11, N = 600 took 8 phases at growth 1.25 (before: 8 decode + 7 growth programs, a
  prefill and about 10 eager ops); now one prefill and at most MAX_PHASES decode programs,
  nothing else, and a second call, or other row budgets, compile nothing."""
  b, s, n = 2, 11, 600
  prompts = np.random.RandomState(1).randint(1, 64, (b, s)).astype(np.int32)
  lengths = np.array([11, 6], np.int32)
  assert len(decoding.phase_capacities(s, n, 1.25, max_phases=None)) == 8
  before, counts = BackendCompiles.total(), decoding.compile_counts()
  out = decoding.generate(model, prompts, lengths, max_new_tokens=n, max_new_tokens_B=[n, n])
  compiled = BackendCompiles.total() - before
  traced = {k: v - counts[k] for k, v in decoding.compile_counts().items()}
  assert traced == {"prefill": 1, "decode": decoding.MAX_PHASES}, traced
  assert compiled == 1 + decoding.MAX_PHASES, compiled
  before = BackendCompiles.total()
  again = decoding.generate(model, prompts, lengths, max_new_tokens=n, max_new_tokens_B=[n, n])
  cut = decoding.generate(model, prompts, lengths, max_new_tokens=n, max_new_tokens_B=[5, 0])
  assert BackendCompiles.total() == before
  np.testing.assert_array_equal(again.tokens_BN, out.tokens_BN)
  # Budgets: row 0 is the first 5 tokens of its full generation, row 1 generates nothing.
  np.testing.assert_array_equal(cut.lengths_B, [5, 0])
  np.testing.assert_array_equal(cut.tokens_BN[0, :5], out.tokens_BN[0, :5])
  np.testing.assert_allclose(cut.logprobs_BN[0, :5], out.logprobs_BN[0, :5], atol=1e-6)
  np.testing.assert_array_equal(cut.tokens_BN[0, 5:], 0)
  np.testing.assert_array_equal(cut.tokens_BN[1], 0)
  np.testing.assert_array_equal(cut.logprobs_BN[1], 0.0)


@pytest.mark.parametrize("bad", [64, 1000, -1])
def test_out_of_vocab_prompt_ids_raise_naming_row_and_id_before_compiling(model, prompts, bad):
  tokens = prompts.copy()
  tokens[2, 1] = bad  # row 2 has length 2: position 1 is real
  on_device = jax.device_put(tokens)
  before, counts = BackendCompiles.total(), decoding.compile_counts()
  with pytest.raises(ValueError, match=rf"row 2 holds token id {bad} at position 1"):
    decoding.generate(model, tokens, LENGTHS, max_new_tokens=N)
  with pytest.raises(ValueError, match=rf"row 2 holds token id {bad}"):
    decoding.generate(model, on_device, LENGTHS, max_new_tokens=N)
  assert BackendCompiles.total() == before and decoding.compile_counts() == counts


def test_out_of_vocab_ids_in_the_padding_are_ignored(model, prompts, greedy):
  tokens = prompts.copy()
  tokens[2, LENGTHS[2] :] = -5  # past row 2's length
  out = decoding.generate(model, tokens, LENGTHS, max_new_tokens=N)
  np.testing.assert_array_equal(out.tokens_BN, greedy.tokens_BN)


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(max_new_tokens_B=[N + 1, 1, 1]), "max_new_tokens_B"),
    (dict(max_new_tokens_B=[1, -1, 1]), "max_new_tokens_B"),
    (dict(max_new_tokens_B=[1, 1]), "max_new_tokens_B"),
    (dict(rng=jax.random.split(jax.random.key(0), 2)), "rng"),
  ],
)
def test_bad_row_budgets_and_keys_raise(model, prompts, kwargs, message):
  with pytest.raises(ValueError, match=message):
    decoding.generate(model, prompts, LENGTHS, max_new_tokens=N, **kwargs)


def test_per_row_keys_make_a_row_independent_of_its_batch(model, prompts):
  """Row b sampled with key k_b in a batch equals the row alone with key [k_b]; a legacy
  uint32 [B, 2] key batch is the same keys."""
  sampling = decoding.Sampling(temperature=1.3, top_k=40)
  keys = jax.random.split(jax.random.key(7), len(LENGTHS))
  batch = decoding.generate(
    model, prompts, LENGTHS, max_new_tokens=N, sampling=sampling, rng=keys, eos_ids=(3,)
  )
  for r in range(len(LENGTHS)):
    alone = decoding.generate(
      model,
      prompts[r : r + 1],
      LENGTHS[r : r + 1],
      max_new_tokens=N,
      sampling=sampling,
      rng=keys[r : r + 1],
      eos_ids=(3,),
    )
    np.testing.assert_array_equal(alone.tokens_BN[0], batch.tokens_BN[r])
    np.testing.assert_allclose(alone.logprobs_BN[0], batch.logprobs_BN[r], atol=1e-5)
  legacy = decoding.generate(
    model,
    prompts,
    LENGTHS,
    max_new_tokens=N,
    sampling=sampling,
    rng=jax.random.key_data(keys),
    eos_ids=(3,),
  )
  np.testing.assert_array_equal(legacy.tokens_BN, batch.tokens_BN)
  # Different keys per row give different samples (the keys are used).
  other = decoding.generate(
    model,
    prompts,
    LENGTHS,
    max_new_tokens=N,
    sampling=sampling,
    rng=jax.random.split(jax.random.key(8), len(LENGTHS)),
    eos_ids=(3,),
  )
  assert not np.array_equal(other.tokens_BN, batch.tokens_BN)


def _step_by_step_greedy(model, prompt, n):
  """The model's own cached-decoding protocol for one unpadded row (FiRST: its prefill)."""
  graphdef, state = nnx.split(model)
  run = lambda method: jax.jit(lambda st, *a: getattr(nnx.merge(graphdef, st), method)(*a))
  cache = model.init_cache(1, S + n)
  tokens = jnp.asarray(prompt)[None]
  if hasattr(model, "prefill"):
    logits, cache = run("prefill")(state, tokens, jnp.asarray([len(prompt)]), cache)
  else:
    logits, cache = run("forward_cached")(state, tokens, jnp.arange(len(prompt))[None], cache)
  step = run("forward_cached")
  out, logprobs = [], []
  for i in range(n):
    logp = np.asarray(jax.nn.log_softmax(logits[0, -1]))
    out.append(int(np.argmax(logp)))
    logprobs.append(logp[out[-1]])
    if i + 1 < n:
      logits, cache = step(state, jnp.asarray([[out[-1]]]), jnp.asarray([[len(prompt) + i]]), cache)
  return np.array(out), np.array(logprobs)


@pytest.mark.parametrize("kind", ["mod", "first"])  # duo: tests/test_duo.py
def test_every_decoding_model_kind_generates_like_its_own_cached_protocol(kind, prompts):
  from models import registry

  fields = dict(TINY_FIELDS)
  fields.update({"mod": dict(capacity=0.5), "first": dict(router_init_bias=0.0)}[kind])
  model = registry.build(kind, registry.make_config(kind, fields), rngs=nnx.Rngs(1))
  if kind == "first":  # Prompt-dependent decisions, different per row.
    model.skip_router_w[...] = jax.random.normal(jax.random.key(0), (2, 32)) * 2.0
  n = 4
  out = decoding.generate(model, prompts, LENGTHS, max_new_tokens=n)
  for r in range(len(LENGTHS)):
    tokens, logprobs = _step_by_step_greedy(model, prompts[r, : LENGTHS[r]], n)
    np.testing.assert_array_equal(out.tokens_BN[r], tokens)
    np.testing.assert_allclose(out.logprobs_BN[r], logprobs, atol=1e-5)
