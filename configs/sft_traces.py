"""SFT of a small dense model on worked long-trace solutions (long_sum), then its evaluation.

The data: chat-formatted long_sum problems (a running digit sum over 4..10 steps) with their
worked traces, loss on the response tokens only (train/sft_data.py). CPU (a few minutes on 2
cores; checkpoints, metrics.jsonl and TensorBoard events in the workdir), then held-out
accuracy with Delethink at several chunk caps and LongCoT at several budgets:

  python -m train.main --config=configs/sft_traces.py --workdir=/tmp/sft
  python -m train.evaluate --config=configs/sft_traces.py --workdir=/tmp/sft

The SFT checkpoint is the starting point of GRPO (configs/delethink_grpo.py,
--config.init_from=/tmp/sft/checkpoints; keep rl.task_options equal to data.task_options).
Harder or longer traces: --config.data.task_options.length=40 --config.seq_len=640, or
--config.data.task_options.ops="+-*" (examples longer than seq_len are dropped, see
data.sft_too_long).

Pod scale (R1-Distill-Qwen-1.5B converted to safetensors in a Hugging Face directory, its
tokenizer and chat template; the same command on every host, a shared workdir):

  python -m train.main --config=configs/sft_traces.py --workdir=/mnt/ckpt/sft_traces \\
    --config.init_from=/mnt/models/DeepSeek-R1-Distill-Qwen-1.5B \\
    --config.data.tokenizer=/mnt/models/DeepSeek-R1-Distill-Qwen-1.5B/tokenizer.json \\
    --config.data.task_options.length=2000 --config.data.task_options.min_length=500 \\
    --config.data.num_examples=200000 --config.seq_len=16384 --config.batch_size=64 \\
    --config.total_steps=2000 --config.optimizer.learning_rate=1e-5 \\
    --config.optimizer.warmup_steps=100 --config.model.remat=dots \\
    --config.mesh.data=-1 --config.mesh.fsdp=8 (and config.model set to the Qwen2 1.5B
    shapes: vocab_size=151936, dim=1536, num_layers=28, num_heads=12, num_kv_heads=2,
    head_dim=128, mlp_dim=8960, as models.hf reads them from config.json)
  python -m train.evaluate --config=configs/sft_traces.py --workdir=/mnt/ckpt/sft_traces \\
    (same overrides) --config.rl_eval.chunk_size=8192 --config.rl_eval.carryover=4096 \\
    --config.rl_eval.keep_head=100 --config.rl_eval.max_chunks="(1,2,3,4,5,6,8)" \\
    --config.rl_eval.longcot_budgets="(8192,16384,24576)" --config.rl_eval.heldout=500

(the paper's C = 8192, m = 4096, I = 5, temperature 0.6; long_sum traces of 500..2000 steps
are ~9K..40K tokens, several chunks long.)
"""

import ml_collections

from configs import lm_dense
from train import data as data_lib
from train import evaluate


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.objective = "sft"
  c.seed = 0
  c.total_steps = 300
  c.batch_size = 8  # global, in packed sequences
  c.seq_len = 384  # an example (prompt ~230 + response ~110 byte tokens) fits whole
  c.checkpoint_every = 100
  c.eval_every = 100
  c.eval_steps = 2  # held-out batches per loss evaluation
  c.log_every = 25
  c.keep_checkpoints = 2
  c.max_nonfinite_steps = 10
  c.init_from = ""  # another run's checkpoint dir or a Hugging Face model dir
  c.profile_steps = ()
  c.data_loading = "sharded"

  # The mesh, rules and model shapes of configs/lm_dense.py (so init_from loads across them),
  # computed in float32.
  dense = lm_dense.get_config()
  c.mesh = dense.mesh
  c.logical_axis_rules = dense.logical_axis_rules
  c.model = dense.model
  c.model.dtype = "float32"
  c.optimizer = ml_collections.ConfigDict(
    dict(
      learning_rate=3e-3,
      schedule="cosine",
      warmup_steps=40,
      min_learning_rate_ratio=0.1,
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      grad_clip_norm=1.0,
      grad_accum_steps=1,
    )
  )

  # Every long_sum option is listed, so each can be overridden on the command line.
  task_options = dict(length=10, min_length=4, ops="+", modulus=10, max_operand=9)
  c.data = data_lib.default_data_config()
  c.data.source = "sft:long_sum"
  c.data.task_options = ml_collections.ConfigDict(task_options)
  c.data.num_examples = 20_000  # train problems (generated on first use)
  c.data.eval_examples = 256  # held-out problems for the eval loss

  # python -m train.evaluate: held-out accuracy and accuracy versus thinking budget.
  c.rl_eval = evaluate.default_rl_eval_config()
  c.rl_eval.task = "long_sum"
  c.rl_eval.task_options = ml_collections.ConfigDict(task_options)
  c.rl_eval.heldout = 64
  c.rl_eval.chunk_size = 64  # C: a 10-step trace (~110 tokens) takes 2-3 chunks
  c.rl_eval.carryover = 32  # m >= keep_head + long_sum's Markov window (~18 tokens)
  c.rl_eval.keep_head = 8
  c.rl_eval.max_chunks = (1, 2, 3, 4, 6)
  c.rl_eval.longcot_budgets = (32, 64, 96, 128, 192)
  c.rl_eval.temperature = 0.0  # greedy: the SFT model's own answer
  c.lock()
  return c
