"""M2R2: an accelerated residual stream with exits and an exit router (Flax NNX).

    model = M2R2Transformer(Config(..., exit_layers=(1, 2, 3), adapter_rank=8), rngs=nnx.Rngs(0))
    logits_BSV, aux = model(tokens_BS)                  # training: the dense output + fast-stream losses
    h_BSD, fast_LBSD = model.fast_states(tokens_BS)     # main stream's last state, a_1..a_L
    out = early_exit.generate(model, prompts_BS, lengths_B, max_new_tokens=64,
                              policy=early_exit.ExitPolicy(measure="classifier", threshold=0.9))
    out = decoding.generate(model, prompts_BS, lengths_B, max_new_tokens=64,   # a_E drafts
                            speculative=decoding.SelfSpeculative(draft_layers=2, draft_tokens=4))

What is implemented (after Mixture of Multi-Rate Residuals, Bhendawade et al.
2025, arXiv 2502.02040). The main ("slow") residual stream h_0..h_L is the
dense transformer's, unchanged, so the model's output is the dense model's.
Next to it runs an accelerated ("fast") stream, per token:

    a_0 = h_0,   a_l = a_{l−1} + Δ_l + U_l V_lᵀ Δ_l,   Δ_l = h_l − h_{l−1}

with a rank-r adapter per block (V_l [D, r] random, U_l [r, D] zero at init,
so a_l = h_l at init). It is stored as the lead c_l = a_l − h_l =
c_{l−1} + U_l V_lᵀ Δ_l (float32), which keeps a_l = h_l bit for bit while the
adapters are zero. The fast stream mixes nothing across tokens, so it has no
K/V and adds nothing to the cache: it reads the slow stream's per-layer updates.
Exits sit after `Config.exit_layers` and read a_e through the model's own final
norm and LM head (the shared head of `models/early_exit.py`).

Training (`__call__`; the trainer adds aux["losses"] to the final LM loss):
  * "early_exit/exit_ce": Σ_e w_e·CE(head(a_e)), w_e from `exit_loss` exactly as
    in early_exit ("calm": e/L; "layerskip": LayerSkip's scales, curricula
    allowed; "none": off).
  * "m2r2/align": align_loss_weight × the mean over exits of 1 − cos(a_e,
    sg(h_L)) ("cosine") or the mean squared difference of the RMS-normalised
    (parameter-free) a_e and sg(h_L) ("mse"), over the loss-mask tokens.
  * "early_exit/classifier_bce" (exit_classifier=True): the router, CALM's
    classifier σ(w_e·sg(norm(a_e)) + b_e) trained on whether head(a_e)'s argmax
    equals the final argmax.
  Gradients: the fast stream reads sg(Δ_l) and the exit heads use stop-gradient
  copies of the final norm and head, so the exit CE and the alignment loss train
  only the adapters U, V; the router's BCE trains only the router; the LM loss
  trains everything but the adapters and router. So the language model's
  gradients are the dense model's; only a global gradient-norm clip (the
  trainer's grad_clip_norm) couples the two, as it scales all gradients alike.
  aux["metrics"] reports early_exit's per-exit names (ce_exit{n}, agree_exit{n},
  exit_heads, classifier_*) measured on the fast stream, plus m2r2/align_exit{n}.

Decoding (`forward_cached_exits`, so `early_exit.generate` runs M2R2 as is):
CALM's per-row exits, with the confidence computed on a_e. A row that leaves
after exit e freezes both streams; later blocks still write its K/V computed
from the frozen slow state h_e (CALM's copied state: what those blocks' K/V
projections were trained on), and its logits come from head(a_e). A row that
never leaves gets head(h_L), the dense model's logits.

Self-speculative decoding (`draft_step`, used by `models.speculative`): the
first E blocks draft from head(a_E); the inherited `verify_step` continues the
slow stream from h_E through blocks E..L−1, so greedy output is the dense
model's, token for token, whatever the adapters.

How this differs from the paper (only its abstract and public summaries were
available to us, so this lists what they state): the paper's fast stream runs
the blocks' own attention and MLP at an accelerated rate with "accelerator
adapters", attending to the slow stream's shared KV cache, and decides exits
with ARLA, a router attending over the residual latents; its adapters are
trained on a frozen pre-trained model. Here the fast stream only re-weights
each block's update with a low-rank adapter (no extra attention or MLP
calls: 4·D·r FLOPs per layer and token, not yet in adaptive/flops.py), the
router is CALM's linear classifier on a_e, and adapters train jointly with the
model from scratch (their losses cannot reach the model through the
stop-gradients).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaptive import exits
from models import early_exit, transformer
from models import kv_cache as kv_cache_lib
from models.layers import param

ALIGN_LOSSES = ("cosine", "mse")


@dataclasses.dataclass(frozen=True)
class Config(early_exit.Config):
  """early_exit.Config (exits, exit losses, router) plus the accelerated stream.

  Attributes:
    adapter_rank: r of each block's adapter U_l V_lᵀ.
    align_loss: how a_e is pulled toward sg(h_L): one of ALIGN_LOSSES.
    align_loss_weight: weight of the mean alignment loss over the exits.
    layer_drop_max: must stay 0 (the slow stream is the dense model).
  """

  adapter_rank: int = 8
  align_loss: str = "cosine"
  align_loss_weight: float = 1.0

  __hash__ = transformer.Config.__hash__

  def validate(self) -> None:
    super().validate()
    r = self.adapter_rank
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= self.dim:
      raise ValueError(f"model.adapter_rank={r!r}: must be an integer in [1, {self.dim}]")
    if self.align_loss not in ALIGN_LOSSES:
      raise ValueError(f"model.align_loss={self.align_loss!r}; allowed: {ALIGN_LOSSES}")
    w = self.align_loss_weight
    if not isinstance(w, (int, float)) or isinstance(w, bool) or w < 0:
      raise ValueError(f"model.align_loss_weight={w!r}: must be a number >= 0")
    if self.layer_drop_max != 0:
      raise ValueError(
        f"model.layer_drop_max={self.layer_drop_max!r}: must be 0 for m2r2 "
        "(the slow stream is the dense model)"
      )


def adapter_lead(delta_BSD, down_DR, up_RD) -> jax.Array:
  """U Vᵀ Δ for each token: how far one block moves a ahead of h, float32 [B, S, D]."""
  f32 = jnp.float32
  return (delta_BSD.astype(f32) @ down_DR.astype(f32)) @ up_RD.astype(f32)


def rms_normalise(x_BSD, eps: float = 1e-6) -> jax.Array:
  """x / rms(x) over the last axis, float32, no parameters."""
  x = x_BSD.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def alignment_BS(kind: str, fast_BSD, target_BSD) -> jax.Array:
  """Per-token alignment loss [B, S] float32: 1 − cosine, or MSE of the RMS-normalised states."""
  if kind == "cosine":
    return 1.0 - exits.hidden_cosine(fast_BSD.astype(jnp.float32), target_BSD.astype(jnp.float32))
  diff = rms_normalise(fast_BSD) - rms_normalise(target_BSD)
  return jnp.mean(diff * diff, axis=-1)


class M2R2Transformer(early_exit.EarlyExitTransformer):
  """Dense transformer + accelerated residual stream and router. See the module docstring."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    c = config
    shape = (c.num_layers, c.dim, c.adapter_rank)
    self.adapter_down = param(
      rngs, nnx.initializers.normal(c.dim**-0.5), shape, jnp.float32, ("layers", "embed", None)
    )
    self.adapter_up = param(
      rngs,
      nnx.initializers.zeros,
      (c.num_layers, c.adapter_rank, c.dim),
      jnp.float32,
      ("layers", None, "embed"),
    )

  def _adapter_xs(self):
    return self.adapter_down[...], self.adapter_up[...]

  def frozen_logits(self, x_BSD) -> jax.Array:
    """Final norm + LM head with stop-gradient weights (exit losses do not train the head)."""
    graphdef, state = nnx.split(self)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state)).logits_from_hidden(x_BSD)

  # -- the two streams --

  def fast_states(self, tokens_BS, positions_BS=None, segment_ids_BS=None):
    """Teacher-forced forward of both streams.

    Returns (h_BSD, fast_LBSD): the slow stream's last state h_L (the dense
    model's) and a_1..a_L, float32 [L, B, S, D], computed from sg(Δ_l) (only
    the adapters get gradients through them).
    """
    tokens_BS = jnp.asarray(tokens_BS)
    if positions_BS is None:
      positions_BS = transformer.default_positions(tokens_BS, segment_ids_BS)
    graphdef, block_state = nnx.split(self.layers)

    def body(carry, xs_l):
      (h_BSD, lead_BSD), _ = carry
      block_st, down_DR, up_RD = xs_l
      y_BSD, _ = nnx.merge(graphdef, block_st)(h_BSD, positions_BS, segment_ids_BS)
      lead_BSD = lead_BSD + adapter_lead(jax.lax.stop_gradient(y_BSD - h_BSD), down_DR, up_RD)
      fast_BSD = jax.lax.stop_gradient(y_BSD).astype(jnp.float32) + lead_BSD
      return ((y_BSD, lead_BSD), None), fast_BSD

    x_BSD = self.embed_tokens(tokens_BS)
    lead_BSD = jnp.zeros(x_BSD.shape, jnp.float32)
    (h_BSD, _), _, fast_LBSD = transformer.run_stacked(
      self.config, body, (x_BSD, lead_BSD), None, (block_state, *self._adapter_xs())
    )
    return h_BSD, fast_LBSD

  # -- training --

  def __call__(
    self,
    tokens_BS,
    positions_BS=None,
    segment_ids_BS=None,
    *,
    targets_BS=None,
    loss_mask_BS=None,
    deterministic: bool | None = None,
  ):
    """Training forward: (the dense model's logits_BSV float32, aux with "losses" and "metrics")."""
    c = self.config
    tokens_BS = jnp.asarray(tokens_BS)
    b, s = tokens_BS.shape
    if deterministic is None:
      deterministic = self.deterministic
    step = self.schedule_step[...]
    if not deterministic:
      self.schedule_step[...] = step + 1
    if targets_BS is None:
      targets_BS, loss_mask_BS = early_exit.next_token_targets(tokens_BS, segment_ids_BS)
    elif loss_mask_BS is None:
      loss_mask_BS = jnp.ones((b, s), jnp.float32)
    count = jnp.maximum(jnp.sum(loss_mask_BS), 1.0)
    masked_mean = lambda v_BS: jnp.sum(v_BS * loss_mask_BS) / count  # noqa: E731

    h_BSD, fast_LBSD = self.fast_states(tokens_BS, positions_BS, segment_ids_BS)
    logits_BSV = self.logits_from_hidden(h_BSD)
    final_BS = jnp.argmax(logits_BSV, axis=-1)
    target_BSD = jax.lax.stop_gradient(h_BSD)
    weights_E = self._exit_loss_weights(step)
    w_LD, b_L = self._classifier_xs()
    ce_E, align_E, bce_E, correct_E, metrics = [], [], [], [], {}
    for n in c.early_exits:
      fast_BSD = fast_LBSD[n - 1]
      exit_logits_BSV = self.frozen_logits(fast_BSD)
      target_logit_BS = jnp.take_along_axis(exit_logits_BSV, targets_BS[..., None], -1)[..., 0]
      ce_E.append(masked_mean(jax.nn.logsumexp(exit_logits_BSV, axis=-1) - target_logit_BS))
      align_E.append(masked_mean(alignment_BS(c.align_loss, fast_BSD, target_BSD)))
      agree_BS = (jnp.argmax(exit_logits_BSV, axis=-1) == final_BS).astype(jnp.float32)
      metrics[f"early_exit/ce_exit{n}"] = ce_E[-1]
      metrics[f"early_exit/agree_exit{n}"] = masked_mean(agree_BS)
      metrics[f"m2r2/align_exit{n}"] = align_E[-1]
      if w_LD is not None:
        z_BS = self.exit_classifier_logit(fast_BSD, w_LD[n - 1], b_L[n - 1])
        bce_E.append(masked_mean(jax.nn.softplus(z_BS) - agree_BS * z_BS))
        correct_E.append(masked_mean(((z_BS > 0) == (agree_BS > 0)).astype(jnp.float32)))
    num_exits = len(c.early_exits)
    align = sum(align_E) / num_exits
    losses = {}
    metrics["early_exit/exit_heads"] = jnp.float32(num_exits)
    metrics["m2r2/align"] = align
    if c.exit_loss != "none":
      losses["early_exit/exit_ce"] = jnp.sum(weights_E * jnp.stack(ce_E))
    if c.align_loss_weight:
      losses["m2r2/align"] = c.align_loss_weight * align
    if bce_E:
      bce = sum(bce_E) / num_exits
      metrics["early_exit/classifier_bce"] = bce
      metrics["early_exit/classifier_accuracy"] = sum(correct_E) / num_exits
      if c.classifier_loss_weight:
        losses["early_exit/classifier_bce"] = c.classifier_loss_weight * bce
    return logits_BSV, {"losses": losses, "metrics": metrics}

  # -- teacher-forced under given exits --

  def forward_with_exits(self, tokens_BS, exit_layers_BS, positions_BS=None, segment_ids_BS=None):
    """Teacher-forced forward in which token (b, s) leaves after exit_layers_BS[b, s] blocks.

    Both streams freeze after that block; later blocks compute the token's K/V
    from its frozen slow state, and its logits come from head(a_e) (head(h_L)
    for exit_layers_BS = L). Returns logits_BSV float32.
    """
    c = self.config
    tokens_BS = jnp.asarray(tokens_BS)
    if positions_BS is None:
      positions_BS = transformer.default_positions(tokens_BS, segment_ids_BS)
    exit_layers_BS = jnp.asarray(exit_layers_BS)
    graphdef, block_state = nnx.split(self.layers)

    def body(carry, xs_l):
      (h_BSD, lead_BSD), _ = carry
      block_st, number, down_DR, up_RD = xs_l
      y_BSD, _ = nnx.merge(graphdef, block_st)(h_BSD, positions_BS, segment_ids_BS)
      y_BSD = jnp.where((number <= exit_layers_BS)[..., None], y_BSD, h_BSD)
      return ((y_BSD, lead_BSD + adapter_lead(y_BSD - h_BSD, down_DR, up_RD)), None), None

    x_BSD = self.embed_tokens(tokens_BS)
    numbers_L = jnp.arange(1, c.num_layers + 1, dtype=jnp.int32)
    (h_BSD, lead_BSD), _, _ = transformer.run_stacked(
      c,
      body,
      (x_BSD, jnp.zeros(x_BSD.shape, jnp.float32)),
      None,
      (block_state, numbers_L, *self._adapter_xs()),
    )
    return self.logits_from_hidden(self._output_state(h_BSD, lead_BSD, exit_layers_BS))

  def _output_state(self, h_BSD, lead_BSD, exit_layers_BS):
    """a_e = h + lead for tokens that left early, h_L for the others."""
    early_BS1 = (exit_layers_BS < self.config.num_layers)[..., None]
    return jnp.where(early_BS1, h_BSD.astype(jnp.float32) + lead_BSD, h_BSD)

  # -- decoding with exits --

  def forward_cached_exits(
    self,
    tokens_BS,
    positions_BS,
    cache: kv_cache_lib.KVCache,
    *,
    thresholds_B=None,
    measure: str = "softmax_diff",
    exit_layer: int | None = None,
  ):
    """early_exit's cached forward with exits, deciding and predicting from a_e.

    A token leaves after the first early exit whose confidence (`measure`, on
    a_e; "cosine" compares a_e with a_{e−1}) reaches its row's threshold
    (thresholds_B float [B]), or after a static `exit_layer` blocks. Later
    blocks still write its K/V from its frozen slow state h_e.
    Returns (logits_BSV float32, cache, exit_layers_BS int32 in [1, L]).
    """
    c = self.config
    L = c.num_layers
    if measure not in exits.CONFIDENCE_MEASURES:
      raise ValueError(f"measure={measure!r}; allowed: {exits.CONFIDENCE_MEASURES}")
    if measure == "classifier" and not c.exit_classifier:
      raise ValueError("measure='classifier' needs a model with model.exit_classifier=True")
    fixed = exit_layer is not None
    if fixed and not (early_exit._is_count(exit_layer) and 1 <= exit_layer <= L):
      raise ValueError(f"exit_layer={exit_layer!r}: must be an integer in [1, {L}]")
    if not fixed and thresholds_B is None:
      raise ValueError("thresholds_B: required unless a fixed exit_layer is given")
    b, s = tokens_BS.shape
    kv_positions_BT = cache.kv_positions_BT()
    numbers_L = np.arange(1, L + 1, dtype=np.int32)
    if fixed:
      full_L, check_L = numbers_L <= exit_layer, np.zeros(L, bool)
    else:
      full_L, check_L = None, self.is_exit_L()
      thresholds_B1 = jnp.asarray(thresholds_B, jnp.float32).reshape(b, 1)
    graphdef, block_state = nnx.split(self.layers)

    def body(carry, xs_l):
      (h_BSD, lead_BSD, live_BS, exit_BS), (k_BTKD, v_BTKD) = carry
      block_st, number, full, check, down_DR, up_RD, w_D, bias = xs_l
      block = nnx.merge(graphdef, block_st)

      def write_kv(x, k_BTKD, v_BTKD):
        q_BSHD, k_BSKD, v_BSKD = block.attn.project_qkv(block.attn_norm(x), positions_BS)
        k_BTKD = kv_cache_lib.write(k_BTKD, k_BSKD, positions_BS)
        v_BTKD = kv_cache_lib.write(v_BTKD, v_BSKD, positions_BS)
        return q_BSHD, k_BTKD, v_BTKD

      def run_block(args):  # Every row; rows that left keep both states (but write K/V).
        x, lead, k_BTKD, v_BTKD = args
        q_BSHD, k_BTKD, v_BTKD = write_kv(x, k_BTKD, v_BTKD)
        out_BSHD = transformer.attend(
          c,
          q_BSHD,
          k_BTKD.astype(q_BSHD.dtype),
          v_BTKD.astype(q_BSHD.dtype),
          positions=positions_BS,
          kv_positions=kv_positions_BT,
        )
        y = x + block.attn.o_proj(out_BSHD)
        y = jnp.where(live_BS[..., None], y + block.mlp(block.mlp_norm(y)), x)
        # Δ = 0 for rows that left, so their lead (and a_e) stays exactly as it was.
        return y, lead + adapter_lead(y - x, down_DR, up_RD), k_BTKD, v_BTKD

      def propagate(args):  # Every row has left: only their K/V.
        x, lead, k_BTKD, v_BTKD = args
        _, k_BTKD, v_BTKD = write_kv(x, k_BTKD, v_BTKD)
        return x, lead, k_BTKD, v_BTKD

      previous_BSD = h_BSD.astype(jnp.float32) + lead_BSD
      args = (h_BSD, lead_BSD, k_BTKD, v_BTKD)
      if fixed:
        h_BSD, lead_BSD, k_BTKD, v_BTKD = early_exit._branch(full, run_block, propagate, args)
      else:
        h_BSD, lead_BSD, k_BTKD, v_BTKD = jax.lax.cond(jnp.any(live_BS), run_block, propagate, args)

        def decide(state):
          live_BS, exit_BS = state
          fast_BSD = h_BSD.astype(jnp.float32) + lead_BSD
          conf_BS = self.exit_confidence(measure, fast_BSD, previous_BSD, w_D, bias)
          leave_BS = live_BS & (conf_BS >= thresholds_B1)
          return live_BS & ~leave_BS, jnp.where(leave_BS, number, exit_BS)

        def check_if_inside(state):
          return jax.lax.cond(jnp.any(state[0]), decide, lambda st: st, state)

        live_BS, exit_BS = early_exit._branch(
          check, check_if_inside, lambda st: st, (live_BS, exit_BS)
        )
      return ((h_BSD, lead_BSD, live_BS, exit_BS), (k_BTKD, v_BTKD)), None

    x_BSD = self.embed_tokens(tokens_BS)
    exit_BS = jnp.full((b, s), exit_layer if fixed else L, jnp.int32)
    carry = (x_BSD, jnp.zeros(x_BSD.shape, jnp.float32), jnp.ones((b, s), bool), exit_BS)
    xs = (
      block_state,
      numbers_L,
      full_L,
      check_L,
      *self._adapter_xs(),
      *self._classifier_xs(),
    )
    (h_BSD, lead_BSD, _, exit_BS), cache, _ = transformer.run_stacked(c, body, carry, cache, xs)
    return self.logits_from_hidden(self._output_state(h_BSD, lead_BSD, exit_BS)), cache, exit_BS

  # -- self-speculative drafting (models.speculative) --

  def draft_step(self, tokens_BT, positions_BT, cache, draft_layers: int):
    """Draft pass of self-speculative decoding from the accelerated stream.

    Runs blocks [0, E) over the cache (writing their K/V), carrying the fast
    stream along; the draft logits are head(a_E). exit_state is the slow state
    h_E [B, T, D], from which the inherited `verify_step` runs blocks [E, L),
    so the verified (emitted) tokens are the dense model's.
    Returns (logits_BTV float32, h_BTD, cache).
    """
    down_LDR, up_LRD = self._adapter_xs()
    h_BTD = self.embed_tokens(tokens_BT)
    lead_BTD = jnp.zeros(h_BTD.shape, jnp.float32)
    for layer in range(draft_layers):  # One block at a time: the lead needs each Δ_l.
      y_BTD, cache = self.run_layers(h_BTD, positions_BT, None, cache, (layer, layer + 1))
      lead_BTD = lead_BTD + adapter_lead(y_BTD - h_BTD, down_LDR[layer], up_LRD[layer])
      h_BTD = y_BTD
    return self.logits_from_hidden(h_BTD.astype(jnp.float32) + lead_BTD), h_BTD, cache
