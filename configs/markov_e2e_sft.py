"""Markovian end-to-end study, stage 1: SFT on LongCoT-formatted long_sum worked traces.

The sizes live in configs/markov_e2e_common.py (`FULL`; `:quick` picks the toy `QUICK`,
`:signal` the short-task `SIGNAL`). The whole study (this run, its evaluations and both GRPO
runs) is

  python -m benchmarks.markov_e2e [--workdir=/tmp/markov_e2e]

and this stage alone, with its held-out evaluation (LongCoT at budgets up to 4x the training
budget, then the same model zero-shot under Delethink inference at caps up to 4x):

  python -m train.main --config=configs/markov_e2e_sft.py --workdir=/tmp/markov_e2e/sft
  python -m train.evaluate --config=configs/markov_e2e_sft.py --workdir=/tmp/markov_e2e/sft \\
    --output=eval.json
"""

import ml_collections

from configs import markov_e2e_common as common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.sft_config(common.study(arg))
  c.lock()
  return c
