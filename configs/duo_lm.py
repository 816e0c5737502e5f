"""Duo-LLM LM: configs/lm_dense.py with per-token skip / small / big FFNs.

CPU (a few minutes on 2 cores):

  python -m train.main --config=configs/duo_lm.py --workdir=/tmp/duo_lm

Each layer's small and big MLPs have slots for half of a row's tokens
(`small_capacity`, `big_capacity`): the FFN executes 0.5·(small + big) per
token, about 0.62 of the dense FFN here; tokens past a full option are skipped.
aux/duo/frac_{skip,small,big,dropped} are the realised routing fractions;
aux_loss/duo/compute is the expected-cost penalty.

Dispatched options give the router the gradient of the option a token took
only, so skipping tends to absorb tokens: with these settings (300 steps on
2 CPU cores) frac_skip reached 0.93 and eval loss 0.507 against the dense
config's 0.449 (0.72 and 0.498 with compute_penalty=0). With
`--config.model.small_capacity=1 --config.model.big_capacity=1` every option
runs on every token and the router learns from all of them (the setting of
benchmarks/duo_oracle.py), at more than dense compute.
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
  return c
