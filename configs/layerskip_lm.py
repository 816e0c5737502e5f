"""LayerSkip LM: layer dropout rising with depth and an early-exit loss at every block.

CPU (a few minutes on 2 cores), from scratch on the default generated corpus:

  python -m train.main --config=configs/layerskip_lm.py --workdir=/tmp/layerskip_lm

or continued from a dense run (then a constant layer-drop curriculum is the paper's choice):

  python -m train.main --config=configs/layerskip_lm.py --workdir=/tmp/layerskip_lm \\
      --config.init_from=/tmp/lm_dense --config.model.layer_drop_curriculum=constant

An exit after every block goes through the shared final norm and LM head
(models/early_exit.py). Block l (0-based) is dropped per row with probability
S(t)·p_max·(exp(l·ln2/(L−1)) − 1), S(t) = exp(t·ln2/T) − 1 ("exponential", from
scratch); the exit losses use LayerSkip's scales e_l with the rotational
curriculum (one of every `exit_rotation` exits per step). T = curriculum_steps
counts training forward calls: total_steps × grad_accum_steps, linked below.
Logged: aux_loss/early_exit/exit_ce, aux/early_exit/layer_drop_fraction and
aux/early_exit/exit_heads (heads computed this step, for the executed FLOPs).

Decode with early exits (CALM-style, or a fixed exit after E blocks):

  from models import early_exit
  out = early_exit.generate(model, prompts_BS, lengths_B, max_new_tokens=64,
                            policy=early_exit.ExitPolicy(exit_layer=2))
"""

import ml_collections

from configs import lm_dense


def get_config() -> ml_collections.ConfigDict:
  c = lm_dense.get_config()
  with c.unlocked():
    c.model.kind = "early_exit"
    c.model.exit_layers = ()  # An exit after every block.
    c.model.exit_loss = "layerskip"
    c.model.exit_loss_scale = 1.0
    c.model.exit_curriculum = "rotational"
    c.model.exit_rotation = 2
    c.model.layer_drop_max = 0.2
    c.model.layer_drop_curriculum = "exponential"
    c.model.curriculum_steps = c.get_ref("total_steps") * c.optimizer.get_ref("grad_accum_steps")
    c.model.exit_classifier = False
    # "auto": Pallas kernels on TPU/GPU, XLA on CPU; "xla" | "pallas" | "cudnn" to choose.
    c.model.attention_impl = "auto"
    c.model.classifier_loss_weight = 1.0
  return c
