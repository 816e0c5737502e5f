"""CALM LM: per-layer losses weighted by layer index and a learned exit classifier.

CPU (a few minutes on 2 cores), from scratch on the default generated corpus:

  python -m train.main --config=configs/calm_lm.py --workdir=/tmp/calm_lm

An exit after every block goes through the shared final norm and LM head
(models/early_exit.py); each exit's cross entropy weighs n/L relative to the
final layer's (CALM's ω_n ∝ n), and a per-exit classifier learns, on
stop-gradient inputs, whether the exit's prediction equals the final one.
Logged: aux_loss/early_exit/exit_ce, aux_loss/early_exit/classifier_bce,
aux/early_exit/agree_exit{n} and aux/early_exit/classifier_accuracy.

Decode with confident exits (threshold decaying over the generated tokens),
after calibrating the threshold on held-out data (adaptive/exits.py):

  from adaptive import exits
  from models import early_exit
  cal = exits.calibrate_threshold(disagree_NK, thresholds_K, tolerance=0.05, risk=0.1)
  policy = early_exit.ExitPolicy(measure="classifier", threshold=cal.threshold, decay_tau=4.0)
  out = early_exit.generate(model, prompts_BS, lengths_B, max_new_tokens=64, policy=policy)
  out.exit_layers_BN  # blocks each token ran; adaptive.flops.early_exit_decode_step_flops
"""

import ml_collections

from configs import lm_dense


def get_config() -> ml_collections.ConfigDict:
  c = lm_dense.get_config()
  with c.unlocked():
    c.model.kind = "early_exit"
    c.model.exit_layers = ()  # An exit after every block.
    c.model.exit_loss = "calm"
    c.model.exit_curriculum = "none"
    c.model.layer_drop_max = 0.0
    c.model.exit_classifier = True
    c.model.classifier_loss_weight = 1.0
  return c
