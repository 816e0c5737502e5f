"""Markovian end-to-end study, stage 2a: GRPO with Delethink from the SFT checkpoints.

Chunk C, carry m, cap I from configs/markov_e2e_common.py (`FULL`; `:quick` picks `QUICK`,
`:signal` `SIGNAL`); steps, G, prompts per step, learning rate and seed are those of
configs/markov_e2e_longcot.py by construction. After stage 1 (configs/markov_e2e_sft.py):

  python -m train.main --config=configs/markov_e2e_delethink.py \\
    --workdir=/tmp/markov_e2e/grpo_delethink --config.init_from=/tmp/markov_e2e/sft/checkpoints
  python -m train.evaluate --config=configs/markov_e2e_delethink.py \\
    --workdir=/tmp/markov_e2e/grpo_delethink --output=eval.json

(the evaluation: the held-out problems under Delethink at caps up to 4x the training budget).
The whole study: python -m benchmarks.markov_e2e.
"""

import ml_collections

from configs import markov_e2e_common as common

SFT_CHECKPOINTS = "/tmp/{name}/sft/checkpoints"  # benchmarks.markov_e2e's default workdir


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  s = common.study(arg)
  c = common.grpo_config(s, "delethink", SFT_CHECKPOINTS.format(name=s.name))
  c.lock()
  return c
