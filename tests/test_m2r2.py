"""M2R2: the accelerated stream against its formula written out, gradients, exit decoding, training.

References: an independent dense Transformer holding the model's first l blocks
gives h_l; the fast stream is then a NumPy float64 loop over the formula
a_l = a_{l−1} + Δ_l + U_l V_lᵀ Δ_l. Tests share shapes so programs compile once.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import m2r2_lm
from models import decoding, early_exit, m2r2, registry, transformer
from train import config_lib
from train import main as train_main

TINY = dict(
  vocab_size=64, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
L = TINY["num_layers"]
PROMPTS = jnp.asarray(np.random.default_rng(0).integers(1, 64, size=(3, 7)), jnp.int32)
LENGTHS = np.array([7, 3, 5])
STEPS = 8
TOKENS = jnp.asarray(np.random.default_rng(1).integers(1, 64, size=(3, 15)), jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "kw"))
def _jitted(graphdef, state, *args, method, kw):
  return getattr(nnx.merge(graphdef, state), method)(*args, **dict(kw))


def call(module, method, *args, **kw):
  graphdef, state = nnx.split(module)
  return _jitted(graphdef, state, *args, method=method, kw=tuple(sorted(kw.items())))


def _model(adapters=True, **fields):
  config = m2r2.Config(**{**TINY, "exit_classifier": True, "exit_loss": "calm", **fields})
  model = m2r2.M2R2Transformer(config, rngs=nnx.Rngs(0))
  model.lm_head.kernel[...] = model.lm_head.kernel[...] * 4  # Spread the confidences.
  if adapters:  # U is zero at init; make the fast stream differ from the slow one.
    model.adapter_up[...] = 0.5 * jax.random.normal(jax.random.key(3), model.adapter_up.shape)
  return model


def _dense(model, blocks=L):
  """An independent dense Transformer holding the model's first `blocks` blocks."""
  dense = nnx.eval_shape(
    lambda: transformer.Transformer(
      transformer.Config(**dict(TINY, num_layers=blocks)), rngs=nnx.Rngs(0)
    )
  )
  state, sub = nnx.state(model), nnx.state(dense)
  for name in ("embed", "final_norm", "lm_head"):
    sub[name] = state[name]
  sub["layers"] = jax.tree.map(lambda a: a[:blocks], state["layers"])
  nnx.update(dense, sub)
  return dense


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _hidden(graphdef, state, tokens_BS):
  dense = nnx.merge(graphdef, state)
  positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1]), tokens_BS.shape)
  return dense.run_layers(dense.embed_tokens(tokens_BS), positions_BS, None, None)[0]


def _reference_streams(model, tokens_BS):
  """(h [L+1, B, S, D], a [L+1, B, S, D]) float64: dense sub-models, then the formula in NumPy."""
  embed = np.asarray(model.embed[...], np.float64)
  h = [embed[np.asarray(tokens_BS)]]
  h += [
    np.asarray(_hidden(*nnx.split(_dense(model, n)), tokens_BS), np.float64)
    for n in range(1, L + 1)
  ]
  down = np.asarray(model.adapter_down[...], np.float64)
  up = np.asarray(model.adapter_up[...], np.float64)
  a = [h[0]]
  for layer in range(L):
    delta = h[layer + 1] - h[layer]
    a.append(a[-1] + delta + delta @ down[layer] @ up[layer])
  return np.stack(h), np.stack(a)


def test_zero_adapters_give_the_slow_stream_and_the_dense_output():
  model = _model(adapters=False)
  h_BSD, fast_LBSD = call(model, "fast_states", TOKENS)
  np.testing.assert_array_equal(fast_LBSD[L - 1], h_BSD)  # Bit for bit: the lead is exactly 0.
  for n in range(1, L):
    want = _hidden(*nnx.split(_dense(model, n)), TOKENS)
    np.testing.assert_allclose(fast_LBSD[n - 1], want, atol=1e-6, rtol=1e-6)
  dense_logits = call(_dense(model), "__call__", TOKENS)[0]
  np.testing.assert_allclose(call(model, "__call__", TOKENS)[0], dense_logits, atol=1e-6)
  # With non-zero adapters the model's output is still the dense model's.
  np.testing.assert_allclose(call(_model(), "__call__", TOKENS)[0], dense_logits, atol=1e-6)


@pytest.mark.parametrize("align_loss", ["cosine", "mse"])
def test_fast_stream_and_alignment_follow_the_formula(align_loss):
  model = _model(align_loss=align_loss)
  h, a = _reference_streams(model, TOKENS)
  _, fast_LBSD = call(model, "fast_states", TOKENS)
  np.testing.assert_allclose(fast_LBSD, a[1:], atol=2e-5, rtol=1e-5)
  assert np.abs(a[1:-1] - h[1:-1]).max() > 0.1  # The adapters do move the stream.
  _, aux = call(model, "__call__", TOKENS, deterministic=True)
  target = h[L]
  for n in range(1, L):
    if align_loss == "cosine":
      cos = (
        np.sum(a[n] * target, -1) / np.linalg.norm(a[n], axis=-1) / np.linalg.norm(target, axis=-1)
      )
      per_token = 1 - cos
    else:
      rms = lambda x: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)  # noqa: E731
      per_token = np.mean((rms(a[n]) - rms(target)) ** 2, -1)
    want = per_token[:, :-1].mean()  # The last token has no next-token target.
    assert float(aux["metrics"][f"m2r2/align_exit{n}"]) == pytest.approx(want, rel=1e-4, abs=1e-6)


def _grads(model, name):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  def loss(params):
    logits, aux = nnx.merge(graphdef, params, rest)(TOKENS, deterministic=True)
    if name == "lm":
      targets = TOKENS[:, 1:]
      logp = jax.nn.log_softmax(logits[:, :-1])
      return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
    return aux["losses"][name]

  grads = jax.jit(jax.grad(loss))(params)
  return {
    jax.tree_util.keystr(p): np.abs(np.asarray(g)).max()
    for p, g in jax.tree_util.tree_leaves_with_path(grads)
  }


@pytest.mark.parametrize(
  "loss, trained",
  [
    ("m2r2/align", ("adapter_",)),
    ("early_exit/exit_ce", ("adapter_",)),
    ("early_exit/classifier_bce", ("exit_classifier",)),
    ("lm", ("embed", "layers", "final_norm", "lm_head")),
  ],
)
def test_each_loss_trains_only_its_parameters(loss, trained):
  model = _model()
  if loss == "early_exit/classifier_bce":  # Non-zero router weights.
    model.exit_classifier_w[...] = jax.random.normal(
      jax.random.key(4), model.exit_classifier_w.shape
    )
  grads = _grads(model, loss)
  for name, g in grads.items():
    if any(t in name for t in trained):
      assert g > 0, (loss, name)
    else:
      assert g == 0, (loss, name)


def _generate(model, threshold, **policy):
  policy = early_exit.ExitPolicy(threshold=threshold, **policy)
  return early_exit.generate(model, PROMPTS, LENGTHS, max_new_tokens=STEPS + 1, policy=policy)


def _with_fed(tokens_BN, fill=None):
  """Row b: its prompt (or `fill`), then tokens_BN[b], right-padded: [B, 7 + STEPS]."""
  out = np.full((3, 7 + STEPS), 0 if fill is None else fill, np.int32)
  for row, n in enumerate(LENGTHS):
    if fill is None:
      out[row, :n] = np.asarray(PROMPTS[row, :n])
    out[row, n : n + tokens_BN.shape[1]] = tokens_BN[row]
  return jnp.asarray(out)


def test_threshold_above_any_confidence_is_dense_greedy_and_zero_exits_first():
  model = _model()
  dense = decoding.generate(_dense(model), PROMPTS, LENGTHS, max_new_tokens=STEPS + 1)
  out = _generate(model, 1.01)  # softmax_diff <= 1.
  assert (np.asarray(out.exit_layers_BN) == L).all()
  np.testing.assert_array_equal(out.tokens_BN, dense.tokens_BN)
  np.testing.assert_allclose(out.logprobs_BN, dense.logprobs_BN, atol=1e-5)
  out = _generate(model, 0.0)
  assert (np.asarray(out.exit_layers_BN)[:, 1:] == 1).all()


@pytest.mark.parametrize("policy", [dict(threshold=0.5), dict(threshold=0.0, exit_layer=2)])
def test_decoding_with_exits_equals_teacher_forced_forward_under_the_same_exits(policy):
  model = _model()
  model.exit_classifier_w[...] = jax.random.normal(jax.random.key(4), model.exit_classifier_w.shape)
  out = _generate(model, **policy, **({} if "exit_layer" in policy else {"measure": "classifier"}))
  tokens, exit_layers = np.asarray(out.tokens_BN), np.asarray(out.exit_layers_BN)
  if "exit_layer" not in policy:
    assert len(np.unique(exit_layers[:, 1:])) >= 2
  logits = call(
    model, "forward_with_exits", _with_fed(tokens[:, :-1]), _with_fed(exit_layers[:, 1:], fill=L)
  )
  for row, n in enumerate(LENGTHS):
    want = np.asarray(logits[row, n - 1 : n + STEPS])  # Token i comes from position n − 1 + i.
    np.testing.assert_array_equal(tokens[row], want.argmax(-1))
    logp = np.take_along_axis(jax.nn.log_softmax(want), tokens[row, :, None], -1)[:, 0]
    np.testing.assert_allclose(out.logprobs_BN[row], logp, atol=1e-5)
  # A token that alone leaves early gets head(a_e) of the formula (nothing after it is affected).
  h, a = _reference_streams(model, TOKENS)
  exits_ = np.full(TOKENS.shape, L).astype(np.int32)
  exits_[:, -1] = 1
  got = call(model, "forward_with_exits", TOKENS, jnp.asarray(exits_))[:, -1]
  want = call(model, "logits_from_hidden", jnp.asarray(a[1][:, -1:], jnp.float32))[:, 0]
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_scan_layers_changes_nothing():
  unrolled, scanned = _model(), _model(scan_layers=True, remat="full")
  for method in ("fast_states", "__call__"):
    a = call(unrolled, method, TOKENS)
    b = call(scanned, method, TOKENS)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)


def test_validation_registry_and_config():
  bad = (
    (dict(adapter_rank=0), "model.adapter_rank"),
    (dict(adapter_rank=33), "model.adapter_rank"),
    (dict(align_loss="kl"), "model.align_loss"),
    (dict(align_loss_weight=-1.0), "model.align_loss_weight"),
    (dict(layer_drop_max=0.1), "model.layer_drop_max"),
    (dict(exit_layers=(3,)), "model.exit_layers"),
  )
  for fields, field in bad:
    with pytest.raises(ValueError, match=field):
      m2r2.Config(**{**TINY, **fields})
  config = registry.make_config("m2r2", dict(TINY, exit_layers=[1], adapter_rank=4))
  assert hash(config) == hash(m2r2.Config(**TINY, exit_layers=(1,), adapter_rank=4))
  assert isinstance(registry.build("m2r2", config, rngs=nnx.Rngs(0)), m2r2.M2R2Transformer)
  run = config_lib.validate(m2r2_lm.get_config(), num_devices=1)
  assert run.model_kind == "m2r2" and run.model_config.adapter_rank == 8


def test_training_steps_report_aux(tmp_path):
  config = m2r2_lm.get_config()
  config.total_steps, config.batch_size, config.seq_len = 3, 4, 32
  config.log_every, config.eval_every, config.checkpoint_every = 1, 0, 0
  config.optimizer.warmup_steps = 1
  config.data.prefetch = 0
  config.model.update(dict(dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8))
  config.model.update(dict(mlp_dim=64, dtype="float32"))
  train_main.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1])
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  last = [r for r in records if "aux_loss/m2r2/align" in r][-1]
  for key in (
    "aux_loss/m2r2/align",
    "aux_loss/early_exit/exit_ce",
    "aux_loss/early_exit/classifier_bce",
    "aux/early_exit/agree_exit1",
    "aux/m2r2/align_exit2",
    "aux/early_exit/classifier_accuracy",
  ):
    assert np.isfinite(last[key]), key
  assert last["step"] == 3


def test_self_speculative_drafts_from_the_fast_stream_and_keeps_greedy_output():
  model, e = _model(), 2
  # One draft step after a 14-token prefill: head(a_E) of the formula, exit state h_E.
  s = TOKENS.shape[1] - 1
  cache = model.init_cache(3, s + 1)
  _, cache = call(
    model, "forward_cached", TOKENS[:, :s], jnp.broadcast_to(jnp.arange(s), (3, s)), cache
  )
  logits, exit_state, _ = call(
    model, "draft_step", TOKENS[:, s:], jnp.full((3, 1), s), cache, draft_layers=e
  )
  h, a = _reference_streams(model, TOKENS)
  np.testing.assert_allclose(exit_state[:, 0], h[e][:, s], atol=2e-5, rtol=1e-5)
  want = call(model, "logits_from_hidden", jnp.asarray(a[e][:, s:], jnp.float32))
  np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)
  dense_draft = call(model, "logits_from_hidden", jnp.asarray(h[e][:, s:], jnp.float32))
  assert np.abs(np.asarray(logits) - np.asarray(dense_draft)).max() > 0.1  # Not the h_E draft.
  # Greedy self-speculative output is plain greedy output, token for token.
  plain = decoding.generate(model, PROMPTS, LENGTHS, max_new_tokens=STEPS + 1)
  spec = decoding.SelfSpeculative(draft_layers=e, draft_tokens=3)
  out = decoding.generate(model, PROMPTS, LENGTHS, max_new_tokens=STEPS + 1, speculative=spec)
  np.testing.assert_array_equal(out.tokens_BN, plain.tokens_BN)
  np.testing.assert_array_equal(out.lengths_B, plain.lengths_B)
  np.testing.assert_allclose(out.logprobs_BN, plain.logprobs_BN, atol=1e-5)
  assert int(np.sum(out.speculative.drafted_B)) > 0
