"""Self-speculative decoding (models/speculative.py) through the public `decoding.generate`.

References: plain greedy `generate` (token-for-token equality), the model's
teacher-forced forward pass (the exact distribution that speculative sampling
must reproduce), XLA's cost analysis (FLOP accounting).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from flax import nnx

from adaptive import flops
from models import decoding, early_exit, mod, speculative, transformer

TINY = dict(
  vocab_size=64, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
CONFIG = transformer.Config(**TINY)
NUM_PROMPTS, S, N = 64, 16, 60  # batch 8: S + N - 1 > 64 slots, two cache phases at growth 1.25
N_BATCH1 = 24


@pytest.fixture(scope="module")
def model():
  return transformer.Transformer(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
  rs = np.random.RandomState(0)
  lengths = rs.randint(1, S + 1, NUM_PROMPTS).astype(np.int32)
  tokens = rs.randint(0, CONFIG.vocab_size, (NUM_PROMPTS, S)).astype(np.int32)
  tokens[np.arange(S)[None, :] >= lengths[:, None]] = 0
  return tokens, lengths


def generate_all(model, prompts, batch, n, eos_id, speculative=None, cache_growth=None):
  """generate over every prompt in batches of `batch`; numpy (tokens, logprobs, lengths, stats).

  One cache phase unless `cache_growth` is given (the same output either way), so that
  most calls share one compiled program.
  """
  tokens, lengths = prompts
  parts = []
  for i in range(0, len(tokens), batch):
    out = decoding.generate(
      model,
      tokens[i : i + batch],
      lengths[i : i + batch],
      max_new_tokens=n,
      eos_ids=(eos_id,),
      speculative=speculative,
      cache_growth=cache_growth,
    )
    parts.append(jax.device_get(out))
  cat = lambda *xs: np.concatenate(xs) if np.ndim(xs[0]) else np.sum(xs)  # noqa: E731
  stats = None if speculative is None else jax.tree.map(cat, *[p.speculative for p in parts])
  fields = ("tokens_BN", "logprobs_BN", "lengths_B")
  return (*(np.concatenate([getattr(p, f) for p in parts]) for f in fields), stats)


def frequent_token(model, prompts, batch, n):
  """A token plain greedy decoding emits early in many rows (so rows stop inside windows)."""
  tokens = generate_all(model, prompts, batch, n, CONFIG.vocab_size - 1)[0]
  ids, counts = np.unique(tokens[:, 1 : n // 2], return_counts=True)
  counts[ids == CONFIG.vocab_size - 1] = 0
  return int(ids[np.argmax(counts)])


@pytest.fixture(scope="module")
def eos_id(model, prompts):
  return frequent_token(model, prompts, 8, N)


@pytest.fixture(scope="module")
def plain(model, prompts, eos_id):
  """The plain greedy reference at batch 8."""
  return generate_all(model, prompts, 8, N, eos_id)


def assert_same(out, ref):
  np.testing.assert_array_equal(out[2], ref[2])
  np.testing.assert_array_equal(out[0], ref[0])
  np.testing.assert_allclose(out[1], ref[1], atol=2e-5)


# The grid E in {1, 2} x k in {1, 3, 4}, split between the batch sizes to bound the compiles:
# batch 8 runs (2, 3) and (1, 4) (two cache phases), batch 1 runs (2, 1), (1, 3) and (2, 4).
@pytest.mark.parametrize("draft_layers,draft_tokens,cache_growth", [(2, 3, None), (1, 4, 1.25)])
def test_greedy_batch8_equals_plain_greedy(
  model, prompts, plain, eos_id, draft_layers, draft_tokens, cache_growth
):
  spec = decoding.SelfSpeculative(draft_layers=draft_layers, draft_tokens=draft_tokens)
  out = generate_all(model, prompts, 8, N, eos_id, spec, cache_growth)
  assert_same(out, plain)
  lengths, stats = out[2], out[3]
  assert (lengths < N).sum() >= 8 and (lengths == N).any()  # EOS stopped many rows, not all
  np.testing.assert_array_equal(stats.drafted_B, draft_tokens * stats.verify_passes_B)
  assert (stats.accepted_B <= stats.drafted_B).all()
  # Each pass emits at most k + 1 tokens, so at least ceil((len - 1) / (k + 1)) passes.
  assert (stats.verify_passes_B >= -(-(lengths - 1) // (draft_tokens + 1))).all()
  rate = stats.accepted_B.sum() / stats.drafted_B.sum()
  print(f"E={draft_layers} k={draft_tokens} batch 8: acceptance {rate:.3f}")


def test_greedy_batch1_equals_plain_greedy(model, prompts, eos_id):
  ref = generate_all(model, prompts, 1, N_BATCH1, eos_id)
  assert (ref[2] < N_BATCH1).sum() >= 8
  for e, k in [(2, 1), (1, 3), (2, 4)]:
    spec = decoding.SelfSpeculative(draft_layers=e, draft_tokens=k)
    out = generate_all(model, prompts, 1, N_BATCH1, eos_id, spec)
    assert_same(out, ref)
    print(f"E={e} k={k} batch 1: acceptance {out[3].accepted_B.sum() / out[3].drafted_B.sum():.3f}")


def test_drafts_are_always_accepted_when_the_last_layer_is_a_no_op(prompts):
  """Block L-1 adds nothing: the E = L-1 draft is the full model, acceptance is exactly 1,
  every pass emits k+1 tokens, and an EOS inside a window cuts the tokens after it."""
  zeroed = transformer.Transformer(CONFIG, rngs=nnx.Rngs(0))
  last = CONFIG.num_layers - 1
  for kernel in (zeroed.layers.attn.o_proj.kernel, zeroed.layers.mlp.down.kernel):
    kernel.value = kernel.value.at[last].set(0.0)
  k = 3
  eos = frequent_token(zeroed, prompts, 8, N)
  ref = generate_all(zeroed, prompts, 8, N, eos)
  spec = decoding.SelfSpeculative(draft_layers=last, draft_tokens=k)
  out = generate_all(zeroed, prompts, 8, N, eos, spec)
  assert_same(out, ref)
  stats = out[3]
  assert stats.accepted_B.sum() == stats.drafted_B.sum() > 0  # acceptance rate 1.0 exactly
  # Token 0 comes from the prefill, then windows of k + 1: tokens 1..4, 5..8, ...
  lengths = out[2]
  cut_inside = (lengths < N) & ((lengths - 1) % (k + 1) != 0)
  assert cut_inside.any(), "no EOS landed before the end of a drafted window"
  np.testing.assert_array_equal(stats.verify_passes_B, -(-(lengths - 1) // (k + 1)))


def test_loop_never_copies_the_whole_cache(model):
  """In the compiled while-loop body no op produces the stacked cache [L, B, T, K, D] or a
  run of its layers: the draft and verify passes write each layer's cache in place."""
  b, capacity, e, k = 8, S + N - 1, 2, 3  # the program of the batch-8 (2, 3) runs
  graphdef, state = nnx.split(model)
  zeros_B = jnp.zeros(b, jnp.int32)
  hlo = (
    speculative._decode.lower(
      graphdef,
      state,
      model.init_cache(b, capacity),
      decoding._Carry(
        jnp.int32(1),
        zeros_B + 5,
        zeros_B > 0,
        jnp.zeros((b, N), jnp.int32),
        jnp.zeros((b, N)),
        zeros_B + 1,
      ),
      decoding.SpeculativeStats(zeros_B, zeros_B, zeros_B, jnp.int32(0)),
      decoding._Knobs(
        jnp.float32(1), jnp.float32(1), jnp.zeros((1,), jnp.int32), jnp.int32(0), jax.random.key(0)
      ),
      mode=decoding._mode(decoding.Sampling()),
      capacity=capacity,
      final=True,
      draft_layers=e,
      draft_tokens=k,
    )
    .compile()
    .as_text()
  )
  body = [line for line in hlo.splitlines() if "while" in line and "body" in line]
  c = CONFIG
  layer = f"f32[{b},{capacity},{c.num_kv_heads},{c.head_dim}]"
  assert sum(f"= {layer}" in line for line in body) >= 2 * c.num_layers  # in-place writes
  for n in range(2, c.num_layers + 1):
    stacked = f"f32[{n},{b},{capacity},{c.num_kv_heads},{c.head_dim}]"
    assert not [line for line in body if f"= {stacked}" in line], n


def test_early_exit_model_greedy_equals_plain(prompts):
  config = early_exit.Config(**TINY, exit_layers=(1,))
  model = early_exit.EarlyExitTransformer(config, rngs=nnx.Rngs(1))
  tokens = prompts[0][:16], prompts[1][:16]
  eos = frequent_token(model, tokens, 8, N)
  ref = generate_all(model, tokens, 8, N, eos)
  assert (ref[2] < N).any()
  out = generate_all(model, tokens, 8, N, eos, decoding.SelfSpeculative(1, 3))
  assert_same(out, ref)


def _topk_probs(logits_V, top_k):
  """Written out: temperature 1, keep the top_k logits, softmax."""
  logits_V = np.asarray(logits_V, np.float64)
  keep = logits_V >= np.sort(logits_V)[-top_k]
  p = np.where(keep, np.exp(logits_V - logits_V.max()), 0.0)
  return p / p.sum()


def test_sampling_matches_the_full_models_distribution(model, prompts):
  """Tokens 1-3 of 2000 rows with one prompt and per-row keys: their joint frequencies
  against the teacher-forced full model's top-k distribution (chi-square)."""
  rows, top_k, length = 2000, 4, 5
  prompt = prompts[0][0, :length]
  out = decoding.generate(
    model,
    np.tile(prompt, (rows, 1)),
    np.full(rows, length),
    max_new_tokens=3,
    sampling=decoding.Sampling(temperature=1.0, top_k=top_k),
    rng=jax.random.split(jax.random.key(7), rows),
    speculative=decoding.SelfSpeculative(draft_layers=1, draft_tokens=2),
  )
  got = np.asarray(out.tokens_BN)
  rate = out.speculative.acceptance_rate
  assert 0.05 < rate < 0.95, rate  # both acceptance and the residual draw happen

  # Exact joint of (t1, t2, t3) from teacher forcing over every t1, t2 in the top-k supports.
  seqs = np.array([[*prompt, a, b] for a in range(64) for b in range(64)], np.int32)
  logits = np.asarray(model(jnp.asarray(seqs))[0], np.float64)
  logits = logits.reshape(64, 64, length + 2, -1)
  p1 = _topk_probs(logits[0, 0, length - 1], top_k)
  expected = np.zeros((64, 64, 64))
  for a in np.flatnonzero(p1):
    p2 = _topk_probs(logits[a, 0, length], top_k)
    for b in np.flatnonzero(p2):
      expected[a, b] = p1[a] * p2[b] * _topk_probs(logits[a, b, length + 1], top_k)
  observed = np.zeros_like(expected)
  np.add.at(observed, (got[:, 0], got[:, 1], got[:, 2]), 1)
  assert observed[expected == 0].sum() == 0  # never a token outside the top-k
  expected, observed = expected[expected > 0] * rows, observed[expected > 0]
  small = expected < 5  # pooled into one cell
  if small.any():
    expected = np.append(expected[~small], expected[small].sum())
    observed = np.append(observed[~small], observed[small].sum())
  result = scipy.stats.chisquare(observed, expected)
  print(f"sampling: acceptance {rate:.3f}, chi2 p = {result.pvalue:.3f} over {len(expected)} cells")
  assert result.pvalue > 1e-3
  # Log-probs are the raw full-model log_softmax of the emitted token.
  raw = jax.nn.log_softmax(logits[got[:, 0], got[:, 1], length + 1], axis=-1)
  np.testing.assert_allclose(out.logprobs_BN[:, 2], raw[np.arange(rows), got[:, 2]], atol=2e-5)


class _Compiles:
  count = 0

  @classmethod
  def listen(cls):
    from jax._src import dispatch

    jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **kw: setattr(
        cls, "count", cls.count + (event == dispatch.BACKEND_COMPILE_EVENT)
      )
    )


def test_bad_inputs_raise_before_compiling(model, prompts):
  for field in ("draft_layers", "draft_tokens"):
    for bad in (0, -1, 1.5, True):
      with pytest.raises(ValueError, match=f"SelfSpeculative.{field}"):
        decoding.SelfSpeculative(**{"draft_layers": 1, "draft_tokens": 2, field: bad})
  mod_model = mod.MoDTransformer(mod.Config(**TINY), rngs=nnx.Rngs(0))
  tokens, lengths = prompts[0][:2], prompts[1][:2]
  _Compiles.listen()
  before, counts = _Compiles.count, decoding.compile_counts()
  no_methods = types.SimpleNamespace(config=CONFIG)
  cases = [
    (model, decoding.SelfSpeculative(draft_layers=3), "draft_layers=3"),
    (model, "fast", "speculative='fast'"),
    (mod_model, decoding.SelfSpeculative(draft_layers=1), "overrides run_layers"),
    (no_methods, decoding.SelfSpeculative(draft_layers=1), "has no draft_step"),
  ]
  for m, spec, message in cases:
    with pytest.raises(ValueError, match=message):
      decoding.generate(m, tokens, lengths, max_new_tokens=4, speculative=spec)
  assert _Compiles.count == before and decoding.compile_counts() == counts


def test_flops_match_xla_cost_analysis():
  """One draft-and-verify pass: k draft steps with the head, the k-th draft's own position
  without it, the verify pass over k+1 positions; against XLA's count of that program."""
  config = transformer.Config(
    vocab_size=4096, dim=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64, mlp_dim=1024
  )
  # Shapes are all XLA needs to count: an abstract model, no weights initialised.
  model = nnx.eval_shape(lambda: transformer.Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  b, t, e, k = 2, 64, 1, 3
  cache = jax.eval_shape(lambda: model.init_cache(b, t))
  # Distinct tokens and positions per step (nothing for XLA to merge); XLA counts every slot.
  positions_T = jnp.arange(t - k - 1, t, dtype=jnp.int32)

  def cost(fn, *args):
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])

  def one_pass(st, cache):  # What one iteration of the decode loop computes.
    model = nnx.merge(graphdef, st)
    logits, states = [], []
    for j in range(k + 1):
      tokens_B1 = jnp.full((b, 1), j + 1, jnp.int32)
      positions_B1 = jnp.full((b, 1), positions_T[j])
      draft_logits, exit_state, cache = model.draft_step(tokens_B1, positions_B1, cache, e)
      logits += [draft_logits] if j < k else []  # the k-th draft's head is not needed
      states.append(exit_state)
    positions_BT = jnp.broadcast_to(positions_T, (b, k + 1))
    verify_logits, cache = model.verify_step(jnp.concatenate(states, 1), positions_BT, cache, e)
    return logits, verify_logits, cache

  xla = cost(one_pass, state, cache)
  ours = flops.self_speculative_pass_flops(config, b, t, draft_layers=e, draft_tokens=k)
  print(f"self-speculative pass: ours/xla = {ours / xla:.3f}")
  assert ours == pytest.approx(xla, rel=0.10), (ours, xla)
  # Leaving out the rejected drafts' or the verify heads would miss by more than that.
  assert abs(ours - k * flops.lm_head_flops(config, b) - xla) > 0.10 * xla
  passes = 7
  assert flops.self_speculative_decode_flops(
    config, passes, t, draft_layers=e, draft_tokens=k, batch=b
  ) == pytest.approx(passes * ours)
