"""Early exit: LayerSkip and CALM training, CALM decoding with propagated K/V (Flax NNX).

    model = EarlyExitTransformer(Config(..., exit_layers=(1, 2, 3)), rngs=nnx.Rngs(0))
    logits_BSV, aux = model(tokens_BS)                      # training: final logits + exit losses
    logits_BSV = model.forward_with_exits(tokens_BS, exit_layers_BS)   # teacher-forced, given exits
    logits_BSV, cache, exits_BS = model.forward_cached_exits(tokens_BS, positions_BS, cache,
                                                             thresholds_B=thr_B)
    out = generate(model, prompts_BS, lengths_B, max_new_tokens=64,
                   policy=ExitPolicy(measure="softmax_diff", threshold=0.9, decay_tau=4.0))

Exits sit after the blocks named in `Config.exit_layers` (the exit after n
blocks reads x_n) and go through the model's own final norm and LM head; the
last block is the final exit. Confidence measures, thresholds and the training
schedules are in `adaptive/exits.py`.

Training (`__call__`; the trainer adds aux["losses"] to the final layer's LM loss):
  * LayerSkip layer dropout: block l (0-based) of a row is skipped with
    probability p_l = S(t)·p_max·(exp(l·ln2/(L−1)) − 1), drawn per row (a packed
    row is one sample). Shapes stay static: a dropped block is computed and
    masked (x_{l+1} = x_l for that row).
  * Early-exit losses, "early_exit/exit_ce" = Σ_e w_e·CE_e with w_e the exit's
    loss scale relative to the final layer's (whose CE the trainer weighs 1):
    "layerskip": ẽ_{t,e}/ẽ_{t,L} with the rotational or gradual curriculum
    (`exits.layerskip_loss_scales`), so LM loss + exit_ce is LayerSkip's
    normalised loss divided by ẽ_{t,L}; "calm": ω_e/ω_L = e/L (losses weighted
    by layer index, `exits.calm_loss_weights`).
  * CALM exit classifier (`exit_classifier`): σ(w_e·norm(x_e) + b_e) per exit,
    trained with BCE ("early_exit/classifier_bce") on whether the exit's argmax
    equals the final layer's; its input is stop-gradient, so it never changes
    the language model.
  * t counts training forward calls (`schedule_step`, a non-parameter
    variable the trainer carries in its model_state): steps × grad_accum_steps.
    `model.eval()` (or deterministic=True) turns the layer dropout off.
  * Exit targets: `targets_BS` / `loss_mask_BS` when passed (the trainer passes
    its objective's, so the exits learn the LM targets, SFT's response tokens or
    GRPO's generated tokens), else the next token of the same segment.

Decoding (CALM): the prompt runs through every block (`forward_cached`, the
dense model's). At each decode step a row leaves after the first exit whose
confidence reaches its threshold; from then on its hidden state is frozen, and
every later block still writes that row's K/V, computed from the frozen state,
so later tokens attend to something consistent. Rows exit at different blocks
with static shapes: a block runs attention and MLP (rows that left are masked)
while any row is still inside, and only the K/V projections once every row has
left (`lax.cond`); an exit's confidence is computed only while a row is inside.
The final logits come from the frozen states through the same norm and head.
aux["metrics"] of training and `ExitGeneration.exit_layers_BN` of decoding feed
`adaptive/flops.py`.

A subclass can carry a second per-token stream through the exit loops
(`init_stream`, `stream_xs`, `update_stream`), have its exits read something
other than x (`exit_input`) and replace the training losses
(`training_forward`): models/m2r2.py does, for its accelerated stream.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from adaptive import exits
from models import decoding, transformer
from models import kv_cache as kv_cache_lib
from models.layers import param

EXIT_LOSSES = ("none", "layerskip", "calm")
GREEDY = decoding.Sampling()


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Config(transformer.Config):
  """transformer.Config plus exits and their training.

  Attributes:
    exit_layers: blocks before each early exit, strictly increasing in
      [1, num_layers − 1]; () = an exit after every block. The last block is
      always the final exit.
    exit_loss: how early-exit CE losses are weighted: one of EXIT_LOSSES.
    exit_loss_scale: LayerSkip's e_scale (relative weight of the early exits).
    exit_curriculum: which early exits train at step t: one of exits.CURRICULA
      ("rotational" and "gradual" need exit_loss="layerskip").
    exit_rotation: R of the rotational curriculum.
    curriculum_steps: T (training forward calls) of the gradual curriculum
      and of the exponential layer-drop curriculum.
    layer_drop_max: LayerSkip's p_max, in [0, 1); 0 = no layer dropout.
    layer_drop_curriculum: S(t): one of exits.LAYER_DROP_CURRICULA.
    exit_classifier: learn a per-exit classifier (CALM's confidence).
    classifier_loss_weight: weight of its BCE loss.
  """

  exit_layers: tuple[int, ...] = ()
  exit_loss: str = "layerskip"
  exit_loss_scale: float = 1.0
  exit_curriculum: str = "none"
  exit_rotation: int = 2
  curriculum_steps: int = 0
  layer_drop_max: float = 0.0
  layer_drop_curriculum: str = "constant"
  exit_classifier: bool = False
  classifier_loss_weight: float = 1.0

  # The dataclass would generate a field hash, which fails on rope_scaling dicts.
  __hash__ = transformer.Config.__hash__

  def __post_init__(self):
    if isinstance(self.exit_layers, list):
      object.__setattr__(self, "exit_layers", tuple(self.exit_layers))
    super().__post_init__()

  def validate(self) -> None:
    super().validate()
    L = self.num_layers
    if L < 2:
      raise ValueError(f"model.num_layers={L}: an early-exit model needs at least 2 layers")
    e = self.exit_layers
    if not isinstance(e, tuple) or not all(_is_count(n) and 1 <= n < L for n in e):
      raise ValueError(
        f"model.exit_layers={e!r}: must be a tuple of block counts in [1, {L - 1}] "
        "(() = an exit after every block)"
      )
    if list(e) != sorted(set(e)):
      raise ValueError(f"model.exit_layers={e!r}: must be strictly increasing")
    choices = (
      ("exit_loss", EXIT_LOSSES),
      ("exit_curriculum", exits.CURRICULA),
      ("layer_drop_curriculum", exits.LAYER_DROP_CURRICULA),
    )
    for name, allowed in choices:
      if getattr(self, name) not in allowed:
        raise ValueError(f"model.{name}={getattr(self, name)!r}; allowed: {allowed}")
    for name in ("exit_loss_scale", "classifier_loss_weight"):
      value = getattr(self, name)
      if not _is_number(value) or value < 0:
        raise ValueError(f"model.{name}={value!r}: must be a number >= 0")
    if not _is_number(self.layer_drop_max) or not 0 <= self.layer_drop_max < 1:
      raise ValueError(f"model.layer_drop_max={self.layer_drop_max!r}: must be in [0, 1)")
    if not _is_count(self.exit_rotation) or self.exit_rotation < 1:
      raise ValueError(f"model.exit_rotation={self.exit_rotation!r}: must be an integer >= 1")
    if not _is_count(self.curriculum_steps) or self.curriculum_steps < 0:
      raise ValueError(f"model.curriculum_steps={self.curriculum_steps!r}: must be an integer >= 0")
    if self.exit_curriculum != "none" and self.exit_loss != "layerskip":
      raise ValueError(
        f"model.exit_curriculum={self.exit_curriculum!r}: needs model.exit_loss='layerskip' "
        f"(got {self.exit_loss!r})"
      )
    needs_t = self.exit_curriculum == "gradual" or (
      self.layer_drop_max > 0 and self.layer_drop_curriculum == "exponential"
    )
    if needs_t and self.curriculum_steps < 1:
      raise ValueError(
        "model.curriculum_steps=0: the gradual exit curriculum and the exponential "
        "layer-drop curriculum need the number of training forward calls T >= 1"
      )
    if not isinstance(self.exit_classifier, bool):
      raise ValueError(f"model.exit_classifier={self.exit_classifier!r}: must be a bool")

  @property
  def early_exits(self) -> tuple[int, ...]:
    """Blocks before each early exit (the final layer excluded)."""
    return self.exit_layers or tuple(range(1, self.num_layers))


class ScheduleStep(nnx.Variable):
  """Training forward calls so far (uint32 []): t of the curricula and the layer-drop draws."""


class DropKey(nnx.Variable):
  """Raw PRNG key data (uint32 [2]) into which the layer-drop draws fold t."""


def next_token_targets(tokens_BS, segment_ids_BS):
  """(targets_BS, mask_BS float32): the next token of the same segment (segment 0 = padding)."""
  targets_BS = jnp.concatenate([tokens_BS[:, 1:], tokens_BS[:, -1:]], axis=1)
  if segment_ids_BS is None:
    mask_BS = jnp.ones(tokens_BS.shape, bool).at[:, -1].set(False)
  else:
    nxt_BS = jnp.concatenate([segment_ids_BS[:, 1:], jnp.zeros_like(segment_ids_BS[:, :1])], 1)
    mask_BS = (segment_ids_BS > 0) & (nxt_BS == segment_ids_BS)
  return targets_BS, mask_BS.astype(jnp.float32)


def _branch(flag, true_fn, false_fn, *operands):
  """A Python branch on a concrete flag (unrolled layers), else lax.cond (scan, remat)."""
  if isinstance(flag, (bool, np.bool_)):
    return true_fn(*operands) if flag else false_fn(*operands)
  return jax.lax.cond(flag, true_fn, false_fn, *operands)


class EarlyExitTransformer(transformer.Transformer):
  """Dense transformer with exits through the shared head. See the module docstring."""

  def __init__(self, config: Config, *, rngs: nnx.Rngs):
    super().__init__(config, rngs=rngs)
    c = config
    if c.exit_classifier:
      self.exit_classifier_w = param(
        rngs, nnx.initializers.zeros, (c.num_layers, c.dim), jnp.float32, ("layers", "embed")
      )
      self.exit_classifier_b = nnx.Param(
        jnp.zeros((c.num_layers,), jnp.float32), logical_axes=("layers",)
      )
    else:
      self.exit_classifier_w = self.exit_classifier_b = None
    self.schedule_step = ScheduleStep(jnp.zeros((), jnp.uint32))
    self.drop_key = DropKey(jax.random.key_data(rngs.dropout()))
    self.deterministic = False

  # -- pieces --

  def is_exit_L(self) -> np.ndarray:
    """bool [L]: an early exit follows block l (0-based); False for the last block."""
    is_exit = np.zeros(self.config.num_layers, bool)
    is_exit[np.asarray(self.config.early_exits) - 1] = True
    return is_exit

  def _classifier_xs(self):
    if self.exit_classifier_w is None:
      return None, None
    return self.exit_classifier_w[...], self.exit_classifier_b[...]

  def exit_classifier_logit(self, x_BSD, w_D, bias) -> jax.Array:
    """CALM's classifier logit on the normalised (stop-gradient) exit state, float32 [B, S]."""
    h_BSD = jax.lax.stop_gradient(self.final_norm(x_BSD)).astype(jnp.float32)
    return h_BSD @ w_D + bias

  def exit_confidence(self, measure, x_BSD, previous_BSD, w_D, bias):
    """Confidence [B, S] of the state after an exit block (`exits.CONFIDENCE_MEASURES`)."""
    if measure in ("softmax_diff", "max_prob"):
      return exits.confidence(measure, logits_V=self.logits_from_hidden(x_BSD))
    if measure == "cosine":
      return exits.hidden_cosine(previous_BSD, x_BSD)
    return exits.classifier_probability(self.exit_classifier_logit(x_BSD, w_D, bias))

  def _exit_loss_weights(self, step) -> jax.Array:
    """Each early exit's CE weight relative to the final layer's, float32 [E]."""
    c = self.config
    if c.exit_loss == "none":
      return jnp.zeros(len(c.early_exits), jnp.float32)
    if c.exit_loss == "calm":
      return jnp.asarray(np.asarray(c.early_exits) / c.num_layers, jnp.float32)
    scales = exits.layerskip_loss_scales(
      c.num_layers,
      c.early_exits,
      step,
      e_scale=c.exit_loss_scale,
      curriculum=c.exit_curriculum,
      rotation=c.exit_rotation,
      total_steps=c.curriculum_steps,
    )
    return scales[:-1] / scales[-1]

  def layer_keep_LB(self, step, batch: int, deterministic: bool = False):
    """bool [L, B]: block l runs for row b at training call `step` (LayerSkip dropout).

    None when there is no dropout (deterministic, or layer_drop_max = 0). Row b
    of the training forward at that step uses exactly this draw.
    """
    c = self.config
    if deterministic or c.layer_drop_max == 0:
      return None
    p_L = exits.layer_drop_probabilities(
      c.num_layers,
      c.layer_drop_max,
      step=step,
      total_steps=c.curriculum_steps,
      curriculum=c.layer_drop_curriculum,
    )
    key = jax.random.fold_in(jax.random.wrap_key_data(self.drop_key[...]), step)
    return (jax.random.uniform(key, (c.num_layers, batch)) >= p_L[:, None]).astype(bool)

  # -- a second per-token stream (none here; models/m2r2.py overrides these four) --

  def init_stream(self, x_BSD):
    """The second stream's start from the embeddings x_0 (None here: there is none).

    `forward_with_exits` and `forward_cached_exits` carry it, per token, next
    to x through their blocks; the training forward does not (a subclass
    replaces `training_forward` instead).
    """
    del x_BSD
    return None

  def stream_xs(self) -> tuple:
    """Per-block inputs of `update_stream`, each with a leading layers axis; () here."""
    return ()

  def update_stream(self, stream, x_BSD, y_BSD, stream_xs_l):
    """The stream after a block took x to y (y = x for a token that has left: it must not move)."""
    del x_BSD, y_BSD, stream_xs_l
    return stream

  def exit_input(self, x_BSD, stream) -> jax.Array:
    """The state an exit reads (its confidence and logits), [B, S, D]: x itself here."""
    del stream
    return x_BSD

  def _output_state(self, x_BSD, stream, exit_layers_BS) -> jax.Array:
    """What the final norm and head read: the exit input of a token that left early, else x_L."""
    early_BS1 = (exit_layers_BS < self.config.num_layers)[..., None]
    return jnp.where(early_BS1, self.exit_input(x_BSD, stream), x_BSD)

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
    """Training forward: (final logits_BSV float32, aux with "losses" and "metrics").

    Counts the call in t (unless deterministic), fills in the exit targets and
    runs `training_forward`.
    """
    tokens_BS = jnp.asarray(tokens_BS)
    if positions_BS is None:
      positions_BS = transformer.default_positions(tokens_BS, segment_ids_BS)
    if deterministic is None:
      deterministic = self.deterministic
    step = self.schedule_step[...]
    if not deterministic:
      self.schedule_step[...] = step + 1
    if targets_BS is None:
      targets_BS, loss_mask_BS = next_token_targets(tokens_BS, segment_ids_BS)
    elif loss_mask_BS is None:
      loss_mask_BS = jnp.ones(tokens_BS.shape, jnp.float32)
    return self.training_forward(
      tokens_BS,
      positions_BS,
      segment_ids_BS,
      targets_BS=targets_BS,
      loss_mask_BS=loss_mask_BS,
      step=step,
      deterministic=deterministic,
    )

  def training_forward(
    self, tokens_BS, positions_BS, segment_ids_BS, *, targets_BS, loss_mask_BS, step, deterministic
  ):
    """`__call__` after its set-up: the layer loop with layer dropout and the exit losses.

    targets_BS int, loss_mask_BS float32 [B, S]; step: t before this call.
    Returns (final logits_BSV float32, aux with "losses" and "metrics").
    """
    c = self.config
    b, s = tokens_BS.shape
    exits_E = np.asarray(c.early_exits)
    weights_E = self._exit_loss_weights(step)
    heads_needed = c.exit_loss != "none" or c.exit_classifier
    if c.exit_curriculum == "none" or c.exit_classifier:
      compute_L = self.is_exit_L() & heads_needed  # Static: every exit, every step.
    else:
      compute_L = jnp.zeros(c.num_layers, bool).at[exits_E - 1].set(weights_E > 0)
    keep_LB = self.layer_keep_LB(step, b, deterministic)
    count = jnp.maximum(jnp.sum(loss_mask_BS), 1.0)
    graphdef, block_state = nnx.split(self.layers)

    def exit_stats(x_BSD, w_D, bias):
      logits_BSV = self.logits_from_hidden(x_BSD)
      target_logit_BS = jnp.take_along_axis(logits_BSV, targets_BS[..., None], -1)[..., 0]
      ce_BS = jax.nn.logsumexp(logits_BSV, axis=-1) - target_logit_BS
      pred_BS = jnp.argmax(logits_BSV, axis=-1).astype(jnp.int32)
      cls_BS = jnp.zeros((b, s), jnp.float32)
      if w_D is not None:
        cls_BS = self.exit_classifier_logit(x_BSD, w_D, bias)
      return jnp.sum(ce_BS * loss_mask_BS) / count, pred_BS, cls_BS

    def no_stats(x_BSD, w_D, bias):
      del x_BSD, w_D, bias
      return jnp.float32(0.0), jnp.zeros((b, s), jnp.int32), jnp.zeros((b, s), jnp.float32)

    def body(carry, xs_l):
      x_BSD, _ = carry
      block_st, keep_B, compute, w_D, bias = xs_l
      y_BSD, _ = nnx.merge(graphdef, block_st)(x_BSD, positions_BS, segment_ids_BS)
      x_BSD = y_BSD if keep_B is None else jnp.where(keep_B[:, None, None], y_BSD, x_BSD)
      return (x_BSD, None), _branch(compute, exit_stats, no_stats, x_BSD, w_D, bias)

    xs = (block_state, keep_LB, compute_L, *self._classifier_xs())
    x_BSD, _, (ce_L, pred_LBS, cls_LBS) = transformer.run_stacked(
      c, body, self.embed_tokens(tokens_BS), None, xs
    )
    logits_BSV = self.logits_from_hidden(x_BSD)
    index_E = exits_E - 1
    losses, metrics = {}, {}
    metrics["early_exit/exit_heads"] = jnp.sum(jnp.asarray(compute_L, jnp.float32))
    metrics["early_exit/layer_drop_fraction"] = (
      jnp.float32(0.0) if keep_LB is None else 1.0 - jnp.mean(keep_LB.astype(jnp.float32))
    )
    if c.exit_loss != "none":
      losses["early_exit/exit_ce"] = jnp.sum(weights_E * ce_L[index_E])
    if heads_needed and isinstance(compute_L, np.ndarray):
      final_BS = jnp.argmax(logits_BSV, axis=-1)
      for n, l in zip(exits_E, index_E, strict=True):
        agree = jnp.sum((pred_LBS[l] == final_BS) * loss_mask_BS) / count
        metrics[f"early_exit/ce_exit{n}"] = ce_L[l]
        metrics[f"early_exit/agree_exit{n}"] = agree
    if c.exit_classifier:
      labels_EBS = (pred_LBS[index_E] == jnp.argmax(logits_BSV, axis=-1)).astype(jnp.float32)
      z_EBS = cls_LBS[index_E]
      bce_EBS = jax.nn.softplus(z_EBS) - labels_EBS * z_EBS
      mask_EBS = jnp.broadcast_to(loss_mask_BS, z_EBS.shape)
      bce = jnp.sum(bce_EBS * mask_EBS) / (len(index_E) * count)
      correct = ((z_EBS > 0) == (labels_EBS > 0)) * mask_EBS
      metrics["early_exit/classifier_bce"] = bce
      metrics["early_exit/classifier_accuracy"] = jnp.sum(correct) / (len(index_E) * count)
      if c.classifier_loss_weight:
        losses["early_exit/classifier_bce"] = c.classifier_loss_weight * bce
    return logits_BSV, {"losses": losses, "metrics": metrics}

  # -- teacher-forced under given exits --

  def forward_with_exits(self, tokens_BS, exit_layers_BS, positions_BS=None, segment_ids_BS=None):
    """Teacher-forced forward in which token (b, s) leaves after exit_layers_BS[b, s] blocks.

    The token's state (and stream) is frozen after that block; every later
    block still computes its keys/values from the frozen state (what decoding
    with exits writes into the cache), and its logits come from the frozen
    state's `exit_input`. exit_layers_BS int in [1, L] (L = no early exit).
    Returns logits_BSV float32.
    """
    c = self.config
    tokens_BS = jnp.asarray(tokens_BS)
    if positions_BS is None:
      positions_BS = transformer.default_positions(tokens_BS, segment_ids_BS)
    exit_layers_BS = jnp.asarray(exit_layers_BS)
    graphdef, block_state = nnx.split(self.layers)

    def body(carry, xs_l):
      (x_BSD, stream), _ = carry
      block_st, number, stream_xs_l = xs_l
      y_BSD, _ = nnx.merge(graphdef, block_st)(x_BSD, positions_BS, segment_ids_BS)
      y_BSD = jnp.where((number <= exit_layers_BS)[..., None], y_BSD, x_BSD)
      return ((y_BSD, self.update_stream(stream, x_BSD, y_BSD, stream_xs_l)), None), None

    x_BSD = self.embed_tokens(tokens_BS)
    numbers_L = jnp.arange(1, c.num_layers + 1, dtype=jnp.int32)
    (x_BSD, stream), _, _ = transformer.run_stacked(
      c, body, (x_BSD, self.init_stream(x_BSD)), None, (block_state, numbers_L, self.stream_xs())
    )
    return self.logits_from_hidden(self._output_state(x_BSD, stream, exit_layers_BS))

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
    """Cached forward (a decode step, or a chunk) in which each token exits on its own.

    A token leaves after the first early exit whose confidence (`measure`, on
    the `exit_input`; "cosine" compares it with the previous block's) reaches
    its row's threshold (thresholds_B float [B]); with a static `exit_layer`
    every token leaves after that many blocks instead (LayerSkip's fixed early
    exit; no confidence is computed). Blocks after a token's exit still write
    its K/V from its frozen state; its logits come from that state's
    `exit_input`, a token that never left gets the final state's logits.

    Returns (logits_BSV float32, cache, exit_layers_BS int32 in [1, L]).
    """
    c = self.config
    L = c.num_layers
    if measure not in exits.CONFIDENCE_MEASURES:
      raise ValueError(f"measure={measure!r}; allowed: {exits.CONFIDENCE_MEASURES}")
    if measure == "classifier" and not c.exit_classifier:
      raise ValueError("measure='classifier' needs a model with model.exit_classifier=True")
    fixed = exit_layer is not None
    if fixed and not (_is_count(exit_layer) and 1 <= exit_layer <= L):
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
      (x_BSD, stream, live_BS, exit_BS), (k_BTKD, v_BTKD) = carry
      block_st, number, full, check, stream_xs_l, w_D, bias = xs_l
      block = nnx.merge(graphdef, block_st)

      def write_kv(x, k_BTKD, v_BTKD):
        q_BSHD, k_BSKD, v_BSKD = block.attn.project_qkv(block.attn_norm(x), positions_BS)
        k_BTKD = kv_cache_lib.write(k_BTKD, k_BSKD, positions_BS)
        v_BTKD = kv_cache_lib.write(v_BTKD, v_BSKD, positions_BS)
        return q_BSHD, k_BTKD, v_BTKD

      def run_block(args):  # Every row; rows that left keep their state (but write K/V).
        x, stream, k_BTKD, v_BTKD = args
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
        y = y + block.mlp(block.mlp_norm(y))
        y = jnp.where(live_BS[..., None], y, x)
        return y, self.update_stream(stream, x, y, stream_xs_l), k_BTKD, v_BTKD

      def propagate(args):  # Every row has left: only their K/V (queries are dead code).
        x, stream, k_BTKD, v_BTKD = args
        _, k_BTKD, v_BTKD = write_kv(x, k_BTKD, v_BTKD)
        return x, stream, k_BTKD, v_BTKD

      previous_BSD = self.exit_input(x_BSD, stream)
      args = (x_BSD, stream, k_BTKD, v_BTKD)
      if fixed:
        x_BSD, stream, k_BTKD, v_BTKD = _branch(full, run_block, propagate, args)
      else:
        x_BSD, stream, k_BTKD, v_BTKD = jax.lax.cond(jnp.any(live_BS), run_block, propagate, args)

        def decide(state):
          live_BS, exit_BS = state
          exit_input_BSD = self.exit_input(x_BSD, stream)
          conf_BS = self.exit_confidence(measure, exit_input_BSD, previous_BSD, w_D, bias)
          leave_BS = live_BS & (conf_BS >= thresholds_B1)
          return live_BS & ~leave_BS, jnp.where(leave_BS, number, exit_BS)

        def check_if_inside(state):
          return jax.lax.cond(jnp.any(state[0]), decide, lambda st: st, state)

        live_BS, exit_BS = _branch(check, check_if_inside, lambda st: st, (live_BS, exit_BS))
      return ((x_BSD, stream, live_BS, exit_BS), (k_BTKD, v_BTKD)), None

    x_BSD = self.embed_tokens(tokens_BS)
    exit_BS = jnp.full((b, s), exit_layer if fixed else L, jnp.int32)
    carry = (x_BSD, self.init_stream(x_BSD), jnp.ones((b, s), bool), exit_BS)
    xs = (block_state, numbers_L, full_L, check_L, self.stream_xs(), *self._classifier_xs())
    (x_BSD, stream, _, exit_BS), cache, _ = transformer.run_stacked(c, body, carry, cache, xs)
    return self.logits_from_hidden(self._output_state(x_BSD, stream, exit_BS)), cache, exit_BS


# -- generation ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
  """When a decode step's token leaves the stack.

  Attributes:
    measure: confidence measure, one of exits.CONFIDENCE_MEASURES.
    threshold: λ; a token exits at the first exit whose confidence is >= the
      threshold (above any reachable confidence: never; 0 with a measure >= 0:
      always at the first exit).
    decay_tau: None = the constant λ; else CALM's decay λ(t) =
      clip(0.9·λ + 0.1·exp(−τ·t/N)) with τ = decay_tau, t the generated
      token's index, N = max_new_tokens (`exits.decayed_threshold`).
    exit_layer: if set, every decoded token leaves after this many blocks
      (LayerSkip's fixed early exit; measure and threshold unused).
  """

  measure: str = "softmax_diff"
  threshold: float = 0.9
  decay_tau: float | None = None
  exit_layer: int | None = None

  def __post_init__(self):
    if self.measure not in exits.CONFIDENCE_MEASURES:
      raise ValueError(f"ExitPolicy.measure={self.measure!r}; allowed: {exits.CONFIDENCE_MEASURES}")
    if not _is_number(self.threshold):
      raise ValueError(f"ExitPolicy.threshold={self.threshold!r}: must be a number")
    if self.decay_tau is not None and (not _is_number(self.decay_tau) or self.decay_tau < 0):
      raise ValueError(f"ExitPolicy.decay_tau={self.decay_tau!r}: must be None or a number >= 0")
    if self.exit_layer is not None and (not _is_count(self.exit_layer) or self.exit_layer < 1):
      raise ValueError(f"ExitPolicy.exit_layer={self.exit_layer!r}: must be None or >= 1")


class ExitGeneration(NamedTuple):
  """`decoding.Generation`'s fields plus where each token's forward pass exited.

  Attributes:
    tokens_BN, logprobs_BN, lengths_B: as in `decoding.Generation`.
    exit_layers_BN: int32 blocks the forward pass that produced token i ran in
      full (L for the first token, which comes from the full prefill, and
      after a row stopped).
  """

  tokens_BN: jax.Array
  logprobs_BN: jax.Array
  lengths_B: jax.Array
  exit_layers_BN: jax.Array


class _Knobs(NamedTuple):
  temperature: jax.Array
  top_p: jax.Array
  eos_ids_E: jax.Array
  pad_id: jax.Array
  rng: jax.Array
  threshold: jax.Array
  decay_tau: jax.Array


def _is_eos(tokens_B, eos_ids_E):
  return jnp.any(tokens_B[:, None] == eos_ids_E[None, :], axis=-1)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "mode", "max_new_tokens"), donate_argnames=("cache",)
)
def _prefill(graphdef, state, tokens_BS, lengths_B, cache, knobs, *, mode, max_new_tokens):
  """Full-depth prompt pass; returns (cache, first tokens_B, logprobs_B, done_B)."""
  model = nnx.merge(graphdef, state)
  b, s = tokens_BS.shape
  positions_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  x_BSD, cache = model.run_layers(model.embed_tokens(tokens_BS), positions_BS, None, cache)
  x_B1D = jnp.take_along_axis(x_BSD, (lengths_B - 1)[:, None, None], axis=1)
  logits_BV = model.logits_from_hidden(x_B1D)[:, 0]
  tokens_B, logprobs_B = decoding.select_tokens(
    logits_BV, jax.random.fold_in(knobs.rng, 0), mode, knobs.temperature, knobs.top_p
  )
  done_B = _is_eos(tokens_B, knobs.eos_ids_E) | (max_new_tokens <= 1)
  return cache, tokens_B, logprobs_B, done_B


@functools.partial(
  jax.jit,
  static_argnames=("graphdef", "mode", "policy"),
  donate_argnames=("cache", "tokens_BN", "logprobs_BN", "exits_BN"),
)
def _decode(
  graphdef,
  state,
  cache,
  positions_B,
  done_B,
  tokens_BN,
  logprobs_BN,
  exits_BN,
  knobs,
  *,
  mode,
  policy,
):
  """The while-loop decode with exits; returns (tokens_BN, logprobs_BN, lengths_B, exits_BN, cache)."""
  model = nnx.merge(graphdef, state)
  b, n = tokens_BN.shape

  def cond(loop):
    step, _, _, done_B, *_ = loop
    return (step < n) & ~jnp.all(done_B)

  def body(loop):
    step, cache, positions_B, done_B, tokens_BN, logprobs_BN, exits_BN, lengths_B = loop
    last_B = jax.lax.dynamic_index_in_dim(tokens_BN, step - 1, axis=1, keepdims=False)
    if policy.decay_tau is None:
      threshold = knobs.threshold
    else:
      threshold = exits.decayed_threshold(knobs.threshold, step, n, knobs.decay_tau)
    logits_B1V, cache, exit_B1 = model.forward_cached_exits(
      last_B[:, None],
      positions_B[:, None],
      cache,
      # Rows that stopped leave at the first exit, so they keep no block running.
      thresholds_B=jnp.where(done_B, -jnp.inf, threshold).astype(jnp.float32),
      measure=policy.measure,
      exit_layer=policy.exit_layer,
    )
    new_B, new_logprobs_B = decoding.select_tokens(
      logits_B1V[:, 0], jax.random.fold_in(knobs.rng, step), mode, knobs.temperature, knobs.top_p
    )
    live_B = ~done_B
    new_B = jnp.where(live_B, new_B, knobs.pad_id)
    new_logprobs_B = jnp.where(live_B, new_logprobs_B, 0.0)
    exit_B = jnp.where(live_B, exit_B1[:, 0], model.config.num_layers)
    done_B = done_B | _is_eos(new_B, knobs.eos_ids_E) | (step + 1 >= n)
    update = lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v, step, 1)
    return (
      step + 1,
      cache,
      positions_B + 1,
      done_B,
      update(tokens_BN, new_B),
      update(logprobs_BN, new_logprobs_B),
      update(exits_BN, exit_B),
      lengths_B + live_B.astype(jnp.int32),
    )

  loop = (jnp.int32(1), cache, positions_B, done_B, tokens_BN, logprobs_BN, exits_BN)
  loop = jax.lax.while_loop(cond, body, (*loop, jnp.ones((b,), jnp.int32)))
  _, cache, _, _, tokens_BN, logprobs_BN, exits_BN, lengths_B = loop
  # Returning the cache lets XLA alias the donated input buffer to it.
  return tokens_BN, logprobs_BN, lengths_B, exits_BN, cache


def generate(
  model: EarlyExitTransformer,
  prompt_tokens_BS,
  prompt_lengths_B,
  *,
  max_new_tokens: int,
  policy: ExitPolicy = ExitPolicy(),
  sampling: decoding.Sampling = GREEDY,
  eos_ids=(),
  rng: jax.Array | None = None,
  pad_id: int = 0,
  cache_dtype=None,
) -> ExitGeneration:
  """Batched generation with CALM early exits (see `decoding.generate` for the common arguments).

  The prompt runs at full depth; every later token's forward pass exits per
  `policy`, per row. One cache of S + N − 1 slots (no growth phases).
  """
  if not isinstance(policy, ExitPolicy):
    raise ValueError(f"policy={policy!r}: must be an early_exit.ExitPolicy")
  if not isinstance(sampling, decoding.Sampling):
    raise ValueError(f"sampling={sampling!r}: must be a decoding.Sampling")
  if not _is_count(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
  L = model.config.num_layers
  if policy.exit_layer is not None and policy.exit_layer > L:
    raise ValueError(f"ExitPolicy.exit_layer={policy.exit_layer}: must be <= num_layers={L}")
  if policy.measure == "classifier" and not model.config.exit_classifier:
    raise ValueError("ExitPolicy.measure='classifier' needs model.exit_classifier=True")
  tokens_BS = jnp.asarray(prompt_tokens_BS, jnp.int32)
  lengths_B = jnp.asarray(prompt_lengths_B, jnp.int32)
  if tokens_BS.ndim != 2 or lengths_B.shape != tokens_BS.shape[:1]:
    raise ValueError(
      f"prompt_tokens_BS {tokens_BS.shape} and prompt_lengths_B {lengths_B.shape}: "
      "expected [B, S] and [B]"
    )
  lengths_np = np.asarray(lengths_B)
  b, s = tokens_BS.shape
  if lengths_np.min() < 1 or lengths_np.max() > s:
    raise ValueError(f"prompt_lengths_B: every length must be in [1, S={s}]")
  if rng is None:
    if not sampling.greedy:
      raise ValueError("rng: a PRNG key is required when sampling.temperature > 0")
    rng = jax.random.key(0)
  eos = np.asarray(eos_ids if not isinstance(eos_ids, int) else (eos_ids,), np.int32).reshape(-1)
  knobs = _Knobs(
    temperature=jnp.float32(sampling.temperature or 1.0),
    top_p=jnp.float32(sampling.top_p),
    eos_ids_E=jnp.asarray(eos),
    pad_id=jnp.int32(pad_id),
    rng=rng,
    threshold=jnp.float32(policy.threshold),
    decay_tau=jnp.float32(policy.decay_tau or 0.0),
  )
  # The threshold and τ are traced (knobs): only measure, exit_layer and whether to decay compile.
  static_policy = dataclasses.replace(
    policy, threshold=0.0, decay_tau=None if policy.decay_tau is None else 0.0
  )
  mode = decoding._mode(sampling)
  graphdef, state = nnx.split(model)
  cache = model.init_cache(b, s + max_new_tokens - 1, dtype=cache_dtype)
  cache, first_B, first_logprobs_B, done_B = _prefill(
    graphdef, state, tokens_BS, lengths_B, cache, knobs, mode=mode, max_new_tokens=max_new_tokens
  )
  n = max_new_tokens
  tokens_BN, logprobs_BN, lengths_B, exits_BN, _ = _decode(
    graphdef,
    state,
    cache,
    lengths_B,
    done_B,
    jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first_B),
    jnp.zeros((b, n), jnp.float32).at[:, 0].set(first_logprobs_B),
    jnp.full((b, n), L, jnp.int32),
    knobs,
    mode=mode,
    policy=static_policy,
  )
  return ExitGeneration(tokens_BN, logprobs_BN, lengths_B, exits_BN)
