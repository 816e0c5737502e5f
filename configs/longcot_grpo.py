"""GRPO with LongCoT (one growing context): the Delethink config with env="longcot".

CPU (a few minutes; budget = 128 tokens, Delethink's C + (I - 1)(C - m) for C = 64, m = 32,
I = 3, so the two runs think equally long):

  python -m train.main --config=configs/longcot_grpo.py --workdir=/tmp/longcot_grpo

Start from an SFT run with --config.init_from=/tmp/sft/checkpoints (configs/sft_traces.py).

Pod scale, the paper's LongCoT baseline: configs/delethink_grpo.py's command with
--config=configs/longcot_grpo.py, --config.rl.budget=24576 (the thinking budget of Delethink
with C = 8192, m = 4096, I = 5), --config.batch_size=512 (128 prompts x 8 samples, one row each,
over 2 minibatches) and --config.seq_len=25600; its KV cache and per-token cost grow with the
trace, which is what Delethink avoids.
"""

import ml_collections

from configs import delethink_grpo


def get_config() -> ml_collections.ConfigDict:
  c = delethink_grpo.get_config()
  c.rl.env = "longcot"
  c.rl.budget = 128
  c.batch_size = 8  # 4 prompts x 4 samples x 1 row / 2 minibatches
  c.seq_len = 384  # query + budget
  return c
