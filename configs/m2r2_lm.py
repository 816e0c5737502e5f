"""M2R2 LM: the dense LM plus an accelerated residual stream, its exits and an exit router.

CPU (a few minutes on 2 cores), from scratch on the default generated corpus:

  python -m train.main --config=configs/m2r2_lm.py --workdir=/tmp/m2r2_lm

The slow stream is the dense model of configs/lm_dense.py (its loss and output
are unchanged); a fast stream a_l = a_{l−1} + Δ_l + U_l V_lᵀ Δ_l with rank-8
adapters (models/m2r2.py) has an exit after every block through the shared
final norm and LM head. Its exit CEs (weighted n/L, CALM's ω_n ∝ n) and the
cosine alignment of a_n with the final state train only the adapters; the
router (a per-exit classifier on a_n) learns whether exit n's prediction
equals the final one. Logged: aux_loss/early_exit/exit_ce, aux_loss/m2r2/align,
aux_loss/early_exit/classifier_bce, aux/early_exit/agree_exit{n},
aux/m2r2/align_exit{n} and aux/early_exit/classifier_accuracy.

Decode with the router's exits (models.early_exit's batched CALM decoding):

  from models import early_exit
  policy = early_exit.ExitPolicy(measure="classifier", threshold=0.8, decay_tau=4.0)
  out = early_exit.generate(model, prompts_BS, lengths_B, max_new_tokens=64, policy=policy)
"""

import ml_collections

from configs import lm_dense


def get_config() -> ml_collections.ConfigDict:
  c = lm_dense.get_config()
  with c.unlocked():
    c.model.kind = "m2r2"
    c.model.exit_layers = ()  # An exit after every block.
    c.model.exit_loss = "calm"
    c.model.exit_curriculum = "none"
    c.model.layer_drop_max = 0.0  # Must stay 0: the slow stream is the dense model.
    c.model.exit_classifier = True  # The exit router.
    c.model.classifier_loss_weight = 1.0
    c.model.adapter_rank = 8
    c.model.align_loss = "cosine"
    c.model.align_loss_weight = 1.0
  return c
