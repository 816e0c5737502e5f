"""Small dense decoder LM on generated reasoning-gym text (byte tokens).

CPU (a few minutes on 2 cores; checkpoints, metrics.jsonl and TensorBoard events in the workdir):

  python -m train.main --config=configs/lm_dense.py --workdir=/tmp/lm_dense

Override any field with --config.FIELD=VALUE (an unknown field is an error), e.g.
  --config.total_steps=50 --config.model.num_layers=2 --config.mesh.fsdp=2

TPU pod slice (the same command on every host; jax.distributed is initialised from the TPU
environment; the workdir must be shared by the hosts, e.g. a gcsfuse mount):

  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="cd adaptive && \\
    python -m train.main --config=configs/lm_dense.py --workdir=/mnt/ckpt/lm_dense \\
      --config.batch_size=256 --config.seq_len=1024 --config.total_steps=20000 \\
      --config.model.dim=1024 --config.model.num_layers=16 --config.model.num_heads=16 \\
      --config.model.num_kv_heads=8 --config.model.mlp_dim=4096 \\
      --config.mesh.data=-1 --config.mesh.fsdp=4 --config.model.remat=dots"
"""

import ml_collections

from train import data as data_lib


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 300
  c.batch_size = 16  # global, in packed sequences
  c.seq_len = 128
  c.checkpoint_every = 100
  c.eval_every = 100
  c.eval_steps = 4  # held-out batches per evaluation
  c.log_every = 25
  c.keep_checkpoints = 2
  c.max_nonfinite_steps = 10  # this many skipped (NaN/Inf) steps in a row stop the run
  c.init_from = ""  # another run's checkpoint dir or a Hugging Face model dir
  c.profile_steps = ()  # (start, stop): jax.profiler trace of these steps
  # "sharded": each process reads its share of the documents (scales to pods);
  # "replicated": each process reads the whole global batch and keeps its rows, so the
  # batches do not depend on the process count (debugging, equivalence tests).
  c.data_loading = "sharded"

  # Mesh axis sizes; -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Logical parameter axis -> mesh axis (or a tuple of mesh axes, or None = replicated).
  c.logical_axis_rules = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
  )

  c.model = ml_collections.ConfigDict(
    dict(
      kind="dense",
      vocab_size=320,  # >= the byte tokenizer's 259
      dim=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      head_dim=32,
      mlp_dim=384,
      dtype="bfloat16",  # compute; parameters and optimizer state stay float32
      param_dtype="float32",
      remat="none",
      scan_layers=False,
      tie_embeddings=False,
    )
  )

  c.optimizer = ml_collections.ConfigDict(
    dict(
      learning_rate=3e-3,
      schedule="cosine",  # cosine | linear | constant (after linear warmup)
      warmup_steps=30,
      min_learning_rate_ratio=0.1,
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      grad_clip_norm=1.0,  # 0 = no clipping
      grad_accum_steps=1,  # micro-batches per step (lax.scan)
    )
  )

  c.data = data_lib.default_data_config()
  c.lock()
  return c
