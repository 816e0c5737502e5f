"""Duo-LLM LM: configs/lm_dense.py with per-token skip / small / big FFNs.

CPU (a few minutes on 2 cores):

  python -m train.main --config=configs/duo_lm.py --workdir=/tmp/duo_lm

Each layer's small and big MLPs have slots for half of a row's tokens
(`small_capacity`, `big_capacity`): the FFN executes 0.5·(small + big) per
token, about 0.62 of the dense FFN here; tokens past a full option are skipped.
aux/duo/frac_{skip,small,big,dropped} are the realised routing fractions;
aux_loss/duo/compute is the expected-cost penalty.

The slots an option's choosers leave spare probe it on the tokens that did
not choose it (`probe_spare_slots`, forward unchanged, no extra compute), so
the routers learn from options not taken. Without it skipping absorbs tokens.
300 steps on 2 CPU cores (eval loss; the dense config reaches 0.449):

  probe_spare_slots=True   eval 0.466, frac skip/small/big 0.30/0.33/0.37
  probe_spare_slots=False  eval 0.507, frac skip/small/big 0.93/0.03/0.04

With `--config.model.small_capacity=1 --config.model.big_capacity=1` every
option runs on every token (the setting of benchmarks/duo_oracle.py), at more
than dense compute.
"""

import ml_collections

from configs import lm_dense


def get_config() -> ml_collections.ConfigDict:
  c = lm_dense.get_config()
  with c.unlocked():
    c.model.kind = "duo"
    c.model.small_mlp_dim = 96
    c.model.compute_penalty = 0.01
    c.model.small_capacity = 0.5
    c.model.big_capacity = 0.5
    c.model.probe_spare_slots = True
  return c
