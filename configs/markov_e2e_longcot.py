"""Markovian end-to-end study, stage 2b: GRPO with LongCoT from the SFT checkpoints.

One chunk of budget C + (I - 1)(C - m), Delethink's thinking budget; steps, G, prompts per
step, learning rate and seed are those of configs/markov_e2e_delethink.py by construction
(both come from configs/markov_e2e_common.py; `:quick` picks its toy `QUICK`, `:signal` the
short-task `SIGNAL`). After stage 1 (configs/markov_e2e_sft.py):

  python -m train.main --config=configs/markov_e2e_longcot.py \\
    --workdir=/tmp/markov_e2e/grpo_longcot --config.init_from=/tmp/markov_e2e/sft/checkpoints
  python -m train.evaluate --config=configs/markov_e2e_longcot.py \\
    --workdir=/tmp/markov_e2e/grpo_longcot --output=eval.json

(the evaluation: the held-out problems under LongCoT at budgets up to 4x the training budget).
The whole study: python -m benchmarks.markov_e2e.
"""

import ml_collections

from configs import markov_e2e_common as common

SFT_CHECKPOINTS = "/tmp/{name}/sft/checkpoints"  # benchmarks.markov_e2e's default workdir


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  s = common.study(arg)
  c = common.grpo_config(s, "longcot", SFT_CHECKPOINTS.format(name=s.name))
  c.lock()
  return c
