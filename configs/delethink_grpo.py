"""GRPO with Delethink (Markovian thinking): chunks of C tokens, a carry of m between them.

CPU (a few minutes on 2 cores; a tiny fresh model on long_sum with short lists, C = 64, m = 32,
I = 3; metrics.jsonl, TensorBoard events and checkpoints in the workdir):

  python -m train.main --config=configs/delethink_grpo.py --workdir=/tmp/delethink_grpo

A fresh model rarely closes its thinking with a boxed answer, so its reward stays near 0 and
GRPO has no signal; start from an SFT run on the same task's worked traces instead
(configs/sft_traces.py):

  python -m train.main --config=configs/sft_traces.py --workdir=/tmp/sft
  python -m train.main --config=configs/delethink_grpo.py --workdir=/tmp/delethink_grpo \\
    --config.init_from=/tmp/sft/checkpoints

config.total_steps and optimizer.warmup_steps count RL steps; each RL step makes
grpo.minibatches optimizer steps, and the learning-rate schedule is built over
total_steps x minibatches optimizer steps. An RL step trains on batch_size x grpo.minibatches
rows (one per chunk, padded), so batch_size x minibatches >= prompts_per_step x group_size x
max_chunks; seq_len holds the longest chat-formatted query plus C.

Pod scale, the paper's settings (R1-Distill-Qwen-1.5B converted to safetensors in a Hugging
Face directory; the same command on every host of the slice, a shared workdir):

  python -m train.main --config=configs/delethink_grpo.py --workdir=/mnt/ckpt/delethink \\
    --config.init_from=/mnt/models/DeepSeek-R1-Distill-Qwen-1.5B \\
    --config.rl.tokenizer=/mnt/models/DeepSeek-R1-Distill-Qwen-1.5B/tokenizer.json \\
    --config.rl.task=math --config.rl.chunk_size=8192 --config.rl.carryover=4096 \\
    --config.rl.max_chunks=5 --config.rl.keep_head=100 --config.rl.prompts_per_step=128 \\
    --config.grpo.group_size=8 --config.rl.temperature=0.6 --config.rl.top_p=1.0 \\
    --config.optimizer.learning_rate=1e-6 --config.optimizer.grad_clip_norm=1.0 \\
    --config.optimizer.schedule=constant --config.optimizer.warmup_steps=0 \\
    --config.optimizer.weight_decay=0.0 --config.batch_size=2560 --config.seq_len=9216 \\
    --config.model.remat=dots --config.mesh.data=-1 --config.mesh.fsdp=8 \\
    --config.model.dtype=bfloat16 (and config.model set to the Qwen2 1.5B shapes:
    vocab_size=151936, dim=1536, num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128,
    mlp_dim=8960, tie_embeddings=False, as models.hf reads them from config.json)

(128 prompts x 8 samples x 5 chunks = 5120 rows = batch_size 2560 x 2 minibatches; PPO clip
0.2 / 0.26, dual clip 3, importance cap 2, no KL: the grpo section's defaults.)
"""

import ml_collections

from configs import lm_dense


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.objective = "grpo"
  c.seed = 0
  c.total_steps = 8  # RL steps
  c.batch_size = 24  # rows per optimizer minibatch (one row per chunk)
  c.seq_len = 320  # chat-formatted long_sum query (<= 240 byte tokens) + C
  c.checkpoint_every = 2  # RL steps
  c.eval_every = 0  # held-out accuracy: python -m train.evaluate
  c.eval_steps = 1
  c.log_every = 1
  c.keep_checkpoints = 2
  c.max_nonfinite_steps = 4  # optimizer steps in a row
  c.init_from = ""  # an SFT run's checkpoints (configs/sft_traces.py) or a Hugging Face dir
  c.profile_steps = ()

  # The mesh, rules and model shapes of configs/lm_dense.py (so init_from loads across them),
  # computed in float32.
  dense = lm_dense.get_config()
  c.mesh = dense.mesh
  c.logical_axis_rules = dense.logical_axis_rules
  c.model = dense.model
  c.model.dtype = "float32"
  c.optimizer = ml_collections.ConfigDict(
    dict(
      learning_rate=1e-4,  # the paper: 1e-6 on a 1.5B model
      schedule="constant",
      warmup_steps=0,  # RL steps
      min_learning_rate_ratio=1.0,
      weight_decay=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      grad_clip_norm=1.0,
      grad_accum_steps=1,
    )
  )

  # The environment, the task and the rollouts (train/rl_config.py documents every field).
  c.rl = ml_collections.ConfigDict(
    dict(
      env="delethink",
      chunk_size=64,  # C (paper: 8192)
      carryover=32,  # m (paper: C / 2)
      max_chunks=3,  # I (paper: 5)
      keep_head=8,  # (paper: 100)
      mode="train",  # the reference RL carry; "inference": the paper's Algorithm 1
      budget=128,  # LongCoT only
      task="long_sum",
      # make_task options (every long_sum option, so each can be overridden on the command
      # line; another task needs its own options here). Worked traces of <= 10 steps are
      # ~110 tokens: up to 3 chunks of C = 64, m = 32.
      task_options=ml_collections.ConfigDict(
        dict(length=10, min_length=4, ops="+", modulus=10, max_operand=9)
      ),  # as configs/sft_traces.py's data.task_options
      prompts_per_step=4,  # (paper: 128)
      train_problems=0,  # 0: fresh problems every step; N: cycle through N (overfitting check)
      temperature=1.0,  # (paper: 0.6)
      top_p=1.0,
      tokenizer="byte",
      chat_template="auto",
      require_think=True,
      prompt_buckets=(),
    )
  )
  # GRPO loss (train/grpo.py); defaults are the paper's: clip 0.2 / 0.26, dual clip 3,
  # importance cap 2, no KL, every chunk a row normalised by its trace's length.
  c.grpo = ml_collections.ConfigDict(
    dict(
      advantage="grpo",
      group_size=4,  # G (paper: 8)
      clip_low=0.2,
      clip_high=0.26,
      dual_clip=3.0,
      importance_cap=2.0,
      kl_coef=0.0,
      entropy_coef=0.0,
      loss_agg="delethink",
      norm_length=0,
      std_eps=1e-6,
      minibatches=2,
    )
  )
  c.lock()
  return c
