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

Training (`training_forward`, run by early_exit's `__call__`; the trainer adds
aux["losses"] to the final LM loss):
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

Decoding (early_exit's `forward_cached_exits`, so `early_exit.generate` runs
M2R2 as is): the lead is the second stream that early_exit's exit loops carry
(`init_stream`, `stream_xs`, `update_stream`), and exits read a_e = h_e + c_e
(`exit_input`); `forward_with_exits` is inherited the same way. CALM's
per-row exits, with the confidence computed on a_e. A row that leaves after
exit e freezes both streams; later blocks still write its K/V computed from
the frozen slow state h_e (CALM's copied state: what those blocks' K/V
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
calls: 4·D·r FLOPs per layer and token, `flops.m2r2_adapter_flops`), the
router is CALM's linear classifier on a_e, and adapters train jointly with the
model from scratch (their losses cannot reach the model through the
stop-gradients).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from adaptive import exits
from models import early_exit, transformer
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

  # -- the lead c_l = a_l − h_l as early_exit's second stream --

  def init_stream(self, x_BSD):
    """c_0 = 0: a_0 = h_0, float32 [B, S, D]."""
    return jnp.zeros(x_BSD.shape, jnp.float32)

  def stream_xs(self) -> tuple:
    """The adapters (V_LDR, U_LRD)."""
    return self._adapter_xs()

  def update_stream(self, stream, x_BSD, y_BSD, stream_xs_l):
    """c_l = c_{l−1} + U_l V_lᵀ Δ_l with Δ_l = y − x (0 for a token that left: c stays)."""
    down_DR, up_RD = stream_xs_l
    return stream + adapter_lead(y_BSD - x_BSD, down_DR, up_RD)

  def exit_input(self, x_BSD, stream) -> jax.Array:
    """a = h + c, float32 [B, S, D]: exits decide and predict from the accelerated stream."""
    return x_BSD.astype(jnp.float32) + stream

  # -- training --

  def training_forward(
    self, tokens_BS, positions_BS, segment_ids_BS, *, targets_BS, loss_mask_BS, step, deterministic
  ):
    """(the dense model's logits_BSV float32, aux with the fast stream's "losses", "metrics")."""
    del deterministic  # No layer dropout: the slow stream is the dense model.
    c = self.config
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
    lead_BTD = self.init_stream(h_BTD)
    for layer in range(draft_layers):  # One block at a time: the lead needs each Δ_l.
      y_BTD, cache = self.run_layers(h_BTD, positions_BT, None, cache, (layer, layer + 1))
      lead_BTD = self.update_stream(lead_BTD, h_BTD, y_BTD, (down_LDR[layer], up_LRD[layer]))
      h_BTD = y_BTD
    return self.logits_from_hidden(self.exit_input(h_BTD, lead_BTD)), h_BTD, cache
