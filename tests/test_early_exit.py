"""Early exit: CALM decoding against the dense model and a teacher-forced forward; LayerSkip/CALM training.

Compiles dominate the time here: the tests share shapes (3 prompts, 8 decode
steps, a cache of 15 slots) so that most programs compile once.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import calm_lm, layerskip_lm
from models import early_exit, registry, transformer
from train import config_lib

TINY = dict(
  vocab_size=64, dim=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
)
L = TINY["num_layers"]
PROMPTS = jnp.asarray(np.random.default_rng(0).integers(1, 64, size=(3, 7)), jnp.int32)
LENGTHS = np.array([7, 3, 5])  # PROMPTS are right-padded to 7.
STEPS = 8  # Decode steps; sequences of prompt + fed tokens are 15 long.
SEGMENTS = jnp.ones((3, 15), jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "kw"))
def _jitted(graphdef, state, *args, method, kw):
  return getattr(nnx.merge(graphdef, state), method)(*args, **dict(kw))


def call(module, method, *args, **kw):
  """module.method(*args, **kw) under one jit per (structure, method, shapes, static kw)."""
  graphdef, state = nnx.split(module)
  return _jitted(graphdef, state, *args, method=method, kw=tuple(sorted(kw.items())))


def _model(**fields):
  model = early_exit.EarlyExitTransformer(early_exit.Config(**TINY, **fields), rngs=nnx.Rngs(0))
  # A sharper head spreads the exits' confidences over [0, 1] (random weights are near uniform).
  model.lm_head.kernel[...] = model.lm_head.kernel[...] * 4
  return model


def _dense(model, keep=None):
  """An independent dense Transformer holding the model's layers in `keep` (default all)."""
  keep = list(range(L)) if keep is None else list(keep)
  config = transformer.Config(**dict(TINY, num_layers=len(keep)))
  dense = nnx.eval_shape(lambda: transformer.Transformer(config, rngs=nnx.Rngs(0)))
  state, sub = nnx.state(model), nnx.state(dense)
  for name in ("embed", "final_norm", "lm_head"):
    sub[name] = state[name]
  sub["layers"] = jax.tree.map(lambda a: a[jnp.asarray(keep)], state["layers"])
  nnx.update(dense, sub)
  return dense


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _hidden(graphdef, state, tokens_BS):
  dense = nnx.merge(graphdef, state)
  positions_BS = jnp.broadcast_to(jnp.arange(tokens_BS.shape[1]), tokens_BS.shape)
  return dense.run_layers(dense.embed_tokens(tokens_BS), positions_BS, None, None)[0]


def _hidden_after(model, tokens_BS, blocks):
  """x after the first `blocks` blocks, [B, S, D], from a dense model holding only those."""
  return _hidden(*nnx.split(_dense(model, range(blocks))), tokens_BS)


@functools.partial(jax.jit, static_argnames=("graphdef", "kw"))
def _step(graphdef, state, tokens, positions, cache, thresholds_B, kw):
  model = nnx.merge(graphdef, state)
  return model.forward_cached_exits(tokens, positions, cache, thresholds_B=thresholds_B, **dict(kw))


def _decode_steps(model, thresholds_B, steps=STEPS, **static):
  """Dense prefill, then greedy cached steps with exits.

  Returns (fed tokens [B, N], logits of each step [B, N, V], exits [B, N], cache).
  """
  b, s = PROMPTS.shape
  cache = model.init_cache(b, s + STEPS)
  logits, cache = call(
    model, "forward_cached", PROMPTS, jnp.broadcast_to(jnp.arange(s), (b, s)), cache
  )
  last_B = jnp.argmax(logits[jnp.arange(b), LENGTHS - 1], -1)
  positions_B = jnp.asarray(LENGTHS)
  graphdef, state = nnx.split(model)
  fed, logits_list, exits_list = [], [], []
  for _ in range(steps):
    fed.append(last_B)
    logits, cache, exit_B1 = _step(
      graphdef,
      state,
      last_B[:, None],
      positions_B[:, None],
      cache,
      thresholds_B,
      tuple(static.items()),
    )
    logits_list.append(logits[:, 0])
    exits_list.append(exit_B1[:, 0])
    last_B, positions_B = jnp.argmax(logits[:, 0], -1), positions_B + 1
  return np.stack(fed, 1), np.stack(logits_list, 1), np.stack(exits_list, 1), cache


def _with_fed(fed_BN, fill=None):
  """Row b: its prompt (or `fill`), then fed_BN[b], right-padded: [B, S + STEPS]."""
  b, s = PROMPTS.shape
  out = np.full((b, s + STEPS), 0 if fill is None else fill, np.int32)
  for row, n in enumerate(LENGTHS):
    if fill is None:
      out[row, :n] = np.asarray(PROMPTS[row, :n])
    out[row, n : n + fed_BN.shape[1]] = fed_BN[row]
  return jnp.asarray(out)


def _at_fed(values_BS, first=0, count=STEPS):
  """Each row's entries from position LENGTHS[b] + first on: [B, count, ...]."""
  return np.stack(
    [np.asarray(values_BS[r, n + first : n + first + count]) for r, n in enumerate(LENGTHS)]
  )


def _generate(model, threshold, eos_ids=(), **policy):
  policy = early_exit.ExitPolicy(threshold=threshold, **policy)
  return early_exit.generate(
    model, PROMPTS, LENGTHS, max_new_tokens=STEPS + 1, policy=policy, eos_ids=eos_ids
  )


def _check_generation(model, out, want_logits_fn):
  """Tokens are the argmax and log-probs the log_softmax of the reference logits."""
  tokens, lengths = np.asarray(out.tokens_BN), np.asarray(out.lengths_B)
  # Token i comes from the pass over token i − 1 (token 0 from the prompt's last position).
  want = _at_fed(want_logits_fn(_with_fed(tokens[:, :-1]), out), first=-1, count=STEPS + 1)
  for row in range(3):
    m = lengths[row]
    np.testing.assert_array_equal(tokens[row, :m], np.argmax(want[row, :m], -1))
    logprobs = np.take_along_axis(jax.nn.log_softmax(want[row, :m]), tokens[row, :m, None], -1)
    np.testing.assert_allclose(out.logprobs_BN[row, :m], logprobs[:, 0], atol=1e-5)


def test_threshold_above_any_confidence_is_the_dense_model():
  model = _model()
  dense = _dense(model)
  # softmax_diff <= 1: a threshold of 1.01 is never reached.
  fed, logits, exits_, _ = _decode_steps(model, jnp.full((3,), 1.01))
  assert (exits_ == L).all()
  want = _at_fed(call(dense, "__call__", _with_fed(fed))[0])
  np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)
  out = _generate(model, 1.01)
  assert (np.asarray(out.exit_layers_BN) == L).all()
  _check_generation(model, out, lambda seqs, _: call(dense, "__call__", seqs)[0])


def test_threshold_zero_exits_every_token_at_the_first_exit():
  out = _generate(_model(), 0.0)
  exits_ = np.asarray(out.exit_layers_BN)
  assert (exits_[:, 0] == L).all()  # The first token comes from the full-depth prefill.
  assert (exits_[:, 1:] == 1).all()
  # Another first exit, another measure (cosine >= -1 always).
  _, _, exits_, _ = _decode_steps(_model(exit_layers=(2,)), jnp.full((3,), -1.0), measure="cosine")
  assert (exits_ == 2).all()


def _kv_written_out(model, layer, h_D, position):
  """Layer `layer`'s key and value of hidden state h at `position`: RMSNorm, projections, RoPE."""
  block = nnx.state(model)["layers"]
  scale = np.asarray(block["attn_norm"]["scale"][...][layer])
  wk = np.asarray(block["attn"]["k_proj"]["kernel"][...][layer])  # [D, K, Dh]
  wv = np.asarray(block["attn"]["v_proj"]["kernel"][...][layer])
  h = np.asarray(h_D, np.float64)
  normed = h / np.sqrt(np.mean(h * h) + model.config.norm_eps) * scale
  k, v = np.einsum("d,dkh->kh", normed, wk), np.einsum("d,dkh->kh", normed, wv)
  dh = k.shape[-1]
  angles = position * model.config.rope_theta ** (-np.arange(0, dh, 2) / dh)
  k1, k2 = k[:, : dh // 2], k[:, dh // 2 :]
  cos, sin = np.cos(angles), np.sin(angles)
  return np.concatenate([k1 * cos - k2 * sin, k2 * cos + k1 * sin], -1), v


def test_propagated_kv_is_the_skipped_layer_applied_to_the_copied_state():
  model = _model()
  # CALM's confident exit (rows 0 and 2 leave at the first exit, row 1 never: one batch, two
  # depths), then LayerSkip's fixed exit after the first block.
  runs = [(jnp.asarray([0.0, 1.01, 0.0]), {}, [1, L, 1]), (None, {"exit_layer": 1}, [1, 1, 1])]
  for thresholds, static, want_exits in runs:
    fed, _, exits_, cache = _decode_steps(model, thresholds, steps=1, **static)
    np.testing.assert_array_equal(exits_[:, 0], want_exits)
    seqs = _with_fed(fed)
    h_BSD = _hidden_after(model, seqs, 1)
    for row in range(3):
      n = LENGTHS[row]
      for layer in range(want_exits[row], L):  # Skipped: from the copied exit state.
        want_k, want_v = _kv_written_out(model, layer, h_BSD[row, n], n)
        np.testing.assert_allclose(cache.k_LBTKD[layer, row, n], want_k, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(cache.v_LBTKD[layer, row, n], want_v, atol=1e-5, rtol=1e-5)
    if not static:  # Blocks that ran wrote what the dense model writes.
      dense = _dense(model)
      positions = jnp.broadcast_to(jnp.arange(seqs.shape[1]), seqs.shape)
      _, dense_cache = call(dense, "forward_cached", seqs, positions, dense.init_cache(3, 15))
      for row in range(3):
        n, ran = LENGTHS[row], want_exits[row]
        for kv, dense_kv in (
          (cache.k_LBTKD, dense_cache.k_LBTKD),
          (cache.v_LBTKD, dense_cache.v_LBTKD),
        ):
          np.testing.assert_allclose(kv[:ran, row, n], dense_kv[:ran, row, n], atol=1e-5, rtol=1e-5)


def test_decoding_with_exits_equals_teacher_forced_forward_under_the_same_exits():
  model = _model()
  fed, logits, exits_, _ = _decode_steps(model, jnp.asarray([0.3, 0.5, 0.7]))
  assert len(np.unique(exits_)) == L  # Tokens exit at every depth ...
  assert (exits_.min(0) != exits_.max(0)).any()  # ... and rows of one step at different ones.
  # The prompt (and the padding after the fed tokens) at full depth.
  want = call(
    model, "forward_with_exits", _with_fed(fed), _with_fed(exits_, fill=L), None, SEGMENTS
  )
  want = _at_fed(want)
  print(f"max |decode - teacher-forced| logit: {np.abs(logits - want).max():.2e}")
  np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)
  # generate, with CALM's decaying threshold and an EOS that stops row 0 after 4 tokens:
  # the teacher-forced forward under its exits.
  free = _generate(model, 0.5, eos_ids=(-1,), decay_tau=2.0)
  _check_exit_decisions(model, free, threshold=0.5, tau=2.0)
  eos = int(free.tokens_BN[0, 3])
  out = _generate(model, 0.5, eos_ids=(eos,), decay_tau=2.0)
  assert int(out.lengths_B[0]) <= 4 and (np.asarray(out.tokens_BN)[0, 4:] == 0).all()
  exit_layers = np.asarray(out.exit_layers_BN)
  assert len(np.unique(exit_layers)) >= 2

  def teacher_forced(seqs, out):
    exits_ = _with_fed(np.asarray(out.exit_layers_BN)[:, 1:], fill=L)
    return call(model, "forward_with_exits", seqs, exits_, None, SEGMENTS)

  _check_generation(model, out, teacher_forced)


def _check_exit_decisions(model, out, threshold, tau):
  """Token i left at the first exit whose softmax top-1 − top-2 reached λ(i) (CALM's decay).

  The confidence at exit e of token i is its logit there, i.e. the teacher-forced
  forward in which only token i's exit changes to e (earlier tokens unchanged).
  """
  tokens, exit_layers = np.asarray(out.tokens_BN), np.asarray(out.exit_layers_BN)
  seqs, exits_ = _with_fed(tokens[:, :-1]), np.asarray(_with_fed(exit_layers[:, 1:], fill=L))
  rows, variants = [], []
  for b, i, e in np.ndindex(3, STEPS, L - 1):  # Generated token i + 1, exit e + 1.
    changed = exits_[b].copy()
    changed[LENGTHS[b] + i] = e + 1
    rows.append(b)
    variants.append(changed)
  logits = call(
    model, "forward_with_exits", seqs[np.asarray(rows)], jnp.asarray(np.stack(variants))
  )
  logits = np.asarray(logits).reshape(3, STEPS, L - 1, *logits.shape[1:])
  for b, i in np.ndindex(3, STEPS):
    lam = min(1.0, 0.9 * threshold + 0.1 * math.exp(-tau * (i + 1) / (STEPS + 1)))
    p = np.sort(np.asarray(jax.nn.softmax(logits[b, i, :, LENGTHS[b] + i])), axis=-1)
    conf_E = p[:, -1] - p[:, -2]
    reached = np.flatnonzero(conf_E >= lam)
    assert exit_layers[b, i + 1] == (reached[0] + 1 if reached.size else L), (b, i, conf_E, lam)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _train_forward(graphdef, state, tokens_BS):
  """model(tokens_BS) as the trainer calls it; returns (logits, aux, the state it leaves)."""
  model = nnx.merge(graphdef, state)
  logits, aux = model(tokens_BS)
  return logits, aux, nnx.state(model)


def test_layer_dropout_is_per_row_rising_with_depth_and_off_in_eval():
  model = _model(layer_drop_max=0.6)
  tokens = jax.random.randint(jax.random.key(1), (6, 8), 0, 64)
  keep_LB = np.asarray(model.layer_keep_LB(0, 6))
  assert not keep_LB.all()  # Some row drops some block at this step.
  logits, aux, state = _train_forward(*nnx.split(model), tokens)  # Step 0: exactly that draw.
  nnx.update(model, state)
  assert int(model.schedule_step[...]) == 1
  for row in range(6):
    dense = _dense(model, [l for l in range(L) if keep_LB[l, row]])
    want = call(dense, "__call__", tokens)[0][row]
    np.testing.assert_allclose(logits[row], want, atol=1e-5, rtol=1e-5)
  dropped = float(aux["metrics"]["early_exit/layer_drop_fraction"])
  assert dropped == pytest.approx(1 - keep_LB.mean())
  # The draw frequencies follow p_l = p_max·(exp(l·ln2/(L−1)) − 1).
  keep = np.asarray(model.layer_keep_LB(7, 20_000)).mean(1)
  p = [0.6 * (math.exp(l * math.log(2) / (L - 1)) - 1) for l in range(L)]
  np.testing.assert_allclose(1 - keep, p, atol=0.015)
  # Evaluation: no dropout, no step advance.
  model.eval()
  logits, _, state = _train_forward(*nnx.split(model), tokens)
  np.testing.assert_allclose(logits, call(_dense(model), "__call__", tokens)[0], atol=1e-5)
  assert int(state["schedule_step"][...]) == 1


def test_exit_losses_are_layerskip_and_calm_weighted_cross_entropies():
  tokens = jax.random.randint(jax.random.key(3), (3, 15), 0, 64)
  segments = jnp.asarray([[1] * 6 + [2] * 7 + [0] * 2, [1] * 15, [3] * 4 + [4] * 11])

  def exit_ce(blocks):  # Mean next-token CE (same segment) of the exit after `blocks` blocks.
    exits_ = jnp.full(tokens.shape, blocks)  # Every token leaves after `blocks` blocks.
    logits = np.asarray(call(_model(), "forward_with_exits", tokens, exits_, None, segments))
    tok, seg, losses = np.asarray(tokens), np.asarray(segments), []
    for b, s in np.ndindex(3, 14):
      if seg[b, s] > 0 and seg[b, s + 1] == seg[b, s]:
        z = logits[b, s].astype(np.float64)
        losses.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[tok[b, s + 1]])
    return float(np.mean(losses))

  ce = {n: exit_ce(n) for n in (1, 2)}

  def aux_of(model):
    return call(model, "__call__", tokens, None, segments, deterministic=True)[1]

  # LayerSkip, e_scale 2, rotational R=2: e = 2·(0, 1) after 1, 2 blocks and 2 + 2·(0 + 1) = 4
  # at the top. At t=1 only the exit after 2 blocks is on: weight 2/4; at t=2 only the first.
  model = _model(exit_curriculum="rotational", exit_loss_scale=2.0)
  model.schedule_step[...] = jnp.uint32(1)
  aux = aux_of(model)
  assert float(aux["losses"]["early_exit/exit_ce"]) == pytest.approx(2 * ce[2] / 4, rel=1e-5)
  assert float(aux["metrics"]["early_exit/exit_heads"]) == 1.0  # Disabled exits: no head.
  model.schedule_step[...] = jnp.uint32(2)  # e_0 = 0: the exit after one block weighs nothing.
  assert float(aux_of(model)["losses"]["early_exit/exit_ce"]) == 0.0
  # CALM: losses weighted by layer index, relative to the top: n / L.
  aux = aux_of(_model(exit_loss="calm"))
  want = sum(n / L * ce[n] for n in (1, 2))
  assert float(aux["losses"]["early_exit/exit_ce"]) == pytest.approx(want, rel=1e-5)
  for n in (1, 2):
    assert float(aux["metrics"][f"early_exit/ce_exit{n}"]) == pytest.approx(ce[n], rel=1e-5)


def _params_and_rest(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  # Pure dicts, as the trainer passes them: merge makes fresh variables inside the trace,
  # so the forward may advance the schedule step.
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def test_exit_classifier_learns_agreement_without_touching_the_model():
  model = _model(exit_loss="none", exit_classifier=True)
  graphdef, params, rest = _params_and_rest(model)

  def loss(params):
    _, aux = nnx.merge(graphdef, params, rest)(PROMPTS, deterministic=True)
    return aux["losses"]["early_exit/classifier_bce"], aux["metrics"]

  (bce, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert float(bce) == pytest.approx(math.log(2), rel=1e-6)
  agree = np.mean([float(metrics[f"early_exit/agree_exit{n}"]) for n in (1, 2)])
  # Zero weights predict "disagrees" everywhere: right exactly where the exit disagrees.
  assert float(metrics["early_exit/classifier_accuracy"]) == pytest.approx(1 - agree, rel=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = jax.tree_util.keystr(path)
    if "exit_classifier" in name:
      assert np.abs(np.asarray(g)).max() > 0, name
    else:  # The target and the input are stop-gradient: the LM gets nothing.
      assert not np.asarray(g).any(), name


def test_scan_layers_and_remat_change_nothing():
  """Training (with layer dropout) and decoding, unrolled against scan + remat."""
  fields = dict(layer_drop_max=0.5)
  results = []
  for variant in ({}, {"scan_layers": True, "remat": "full"}):
    graphdef, params, rest = _params_and_rest(_model(**fields, **variant))

    def loss(params, rest, graphdef=graphdef):
      logits, aux = nnx.merge(graphdef, params, rest)(PROMPTS)
      return jnp.mean(logits**2) + sum(aux["losses"].values())

    # Each block call is a jax.checkpoint (remat) only when asked.
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, rest))
    assert ("remat" in jaxpr) == ("remat" in variant)
    results.append(jax.jit(jax.value_and_grad(loss))(params, rest))
  # Decoding: the scanned model against the unrolled one of the other tests.
  thresholds = jnp.asarray([0.3, 0.5, 0.7])
  results += [_decode_steps(_model(**v), thresholds)[1:3] for v in ({}, {"scan_layers": True})]
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)
  for a, b in zip(results[2], results[3], strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_validation_and_registry():
  bad = (
    (dict(exit_layers=(0, 2)), "model.exit_layers"),
    (dict(exit_layers=(2, 1)), "model.exit_layers"),
    (dict(exit_layers=(3,)), "model.exit_layers"),
    (dict(exit_loss="kl"), "model.exit_loss"),
    (dict(exit_curriculum="rotational", exit_loss="calm"), "model.exit_curriculum"),
    (dict(exit_curriculum="gradual"), "model.curriculum_steps"),
    (dict(layer_drop_max=1.0), "model.layer_drop_max"),
    (dict(exit_rotation=0), "model.exit_rotation"),
    (dict(num_layers=1), "model.num_layers"),
  )
  for fields, field in bad:
    with pytest.raises(ValueError, match=field):
      early_exit.Config(**{**TINY, **fields})
  config = registry.make_config("early_exit", dict(TINY, exit_layers=[2]))
  assert config.exit_layers == (2,) and config.early_exits == (2,)
  assert hash(config) == hash(early_exit.Config(**TINY, exit_layers=(2,)))
  model = registry.build("early_exit", config, rngs=nnx.Rngs(0))
  assert isinstance(model, early_exit.EarlyExitTransformer)
  with pytest.raises(ValueError, match="classifier"):
    _generate(model, 0.5, measure="classifier")
  with pytest.raises(ValueError, match="exit_layer"):
    _generate(model, 0.5, exit_layer=L + 1)
  # The configs validate (they train: python -m train.main --config=configs/layerskip_lm.py).
  for module, loss in ((layerskip_lm, "layerskip"), (calm_lm, "calm")):
    run = config_lib.validate(module.get_config(), num_devices=1)
    assert run.model_kind == "early_exit" and run.model_config.exit_loss == loss
  config = layerskip_lm.get_config()
  config.total_steps = 50
  assert config_lib.validate(config, num_devices=1).model_config.curriculum_steps == 50


def test_the_trainer_gives_exit_losses_the_objectives_targets():
  """The trainer passes its batch's targets and loss mask (e.g. SFT's response tokens) to a model
  whose losses take them, and nothing to one whose forward has no such arguments."""
  from train import trainer

  tokens = jax.random.randint(jax.random.key(5), (2, 15), 0, 64)
  mb = {
    "tokens": tokens,
    "positions": jnp.broadcast_to(jnp.arange(15), (2, 15)),
    "segment_ids": jnp.ones((2, 15), jnp.int32),
    "targets": jnp.roll(tokens, -1, axis=1),
    "loss_mask": jnp.zeros((2, 15)).at[:, 8:12].set(1.0),  # 8 response tokens
  }
  model = _model(exit_loss="calm")
  kwargs = trainer._target_kwargs(model, mb)
  assert set(kwargs) == {"targets_BS", "loss_mask_BS"}
  assert (
    trainer._target_kwargs(
      transformer.Transformer(transformer.Config(**TINY), rngs=nnx.Rngs(0)), mb
    )
    == {}
  )

  def exit_ce(**kw):  # eager: the targets are arrays, not static arguments
    inputs = (mb["tokens"], mb["positions"], mb["segment_ids"])
    aux = model(*inputs, deterministic=True, **kw)[1]
    return float(aux["metrics"]["early_exit/ce_exit1"])

  # With the mask, the exit CE is the mean over the 8 response tokens alone.
  logits = np.asarray(
    call(model, "forward_with_exits", tokens, jnp.ones((2, 15), jnp.int32), None, mb["segment_ids"])
  )
  z = logits[:, 8:12].astype(np.float64)
  target = np.asarray(mb["targets"])[:, 8:12]
  lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
  want = float(np.mean(lse - np.take_along_axis(z, target[..., None], -1)[..., 0]))
  assert exit_ce(**kwargs) == pytest.approx(want, rel=1e-5)
  assert exit_ce() != pytest.approx(want, rel=1e-3)  # the default: every next token
