"""Mixture-of-Depths LM: configs/lm_dense.py with every other block routed at 12.5% capacity.

CPU (a few minutes on 2 cores):

  python -m train.main --config=configs/mod_lm.py --workdir=/tmp/mod_lm

The progress line reports aux/mod/* routing statistics, aux_loss/mod/* (router BCE and
predictor BCE) and executed-FLOP MFU from adaptive.flops (routed blocks at k/S).
Override e.g. --config.model.capacity=0.25 --config.model.decode_router=router.
"""

import ml_collections

from configs import lm_dense


def get_config() -> ml_collections.ConfigDict:
  c = lm_dense.get_config()
  with c.unlocked():
    c.model.kind = "mod"
    c.model.capacity = 0.125
    c.model.routed_every = 2
    c.model.routed_offset = 1
    c.model.router_activation = "identity"  # paper: x + r·f(x) for the top-k tokens
    c.model.decode_router = "predictor"
    c.model.router_loss_weight = 0.01
    c.model.predictor_loss_weight = 0.01
    c.model.predictor_hidden = 64
  return c
