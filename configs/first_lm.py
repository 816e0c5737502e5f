"""FiRST LM: routers that skip layers per sequence, trained on top of a dense checkpoint.

CPU (a few minutes on 2 cores); first a dense run, then the routers from its checkpoint:

  python -m train.main --config=configs/lm_dense.py --workdir=/tmp/lm_dense
  python -m train.main --config=configs/first_lm.py --workdir=/tmp/first_lm \\
      --config.init_from=/tmp/lm_dense

(Without init_from it trains from scratch, which also works.) Relaxed gates in
training execute every layer (aux/first/skip_fraction = 0); aux/first/executed_prob
is the expected executed fraction the compute penalty (aux_loss/first/compute) lowers.
"""

import ml_collections

from configs import lm_dense


def get_config() -> ml_collections.ConfigDict:
  c = lm_dense.get_config()
  with c.unlocked():
    c.model.kind = "first"
    c.model.skip_penalty = 0.05
    c.model.router_init_bias = 3.0
    c.model.gate_temperature = 1.0
    c.model.prompt_length = 32
  return c
