"""Duo-LLM LM: configs/lm_dense.py with per-token skip / small / big FFNs.

CPU (a few minutes on 2 cores):

  python -m train.main --config=configs/duo_lm.py --workdir=/tmp/duo_lm

aux/duo/frac_{skip,small,big} are the realised routing fractions (the executed-FLOP MFU
uses them); aux_loss/duo/compute is the expected-cost penalty.
"""

import ml_collections

from configs import lm_dense


def get_config() -> ml_collections.ConfigDict:
  c = lm_dense.get_config()
  with c.unlocked():
    c.model.kind = "duo"
    c.model.small_mlp_dim = 96
    c.model.compute_penalty = 0.01
  return c
