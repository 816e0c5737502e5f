"""Batched greedy generation: `models.decoding` versus Hugging Face `generate`.

    python -m benchmarks.decode [--repeats 3] [--batch 8] [--prompt 128] [--new 256]

Same architecture on both sides (a Llama: 6 layers, width 512, 8 heads of 64,
SwiGLU 1536, vocab 256, float32), random weights (only speed is measured),
batch 8 of 128-token prompts, 256 new tokens, no EOS stopping. Both run in
this one process: JAX on its default backend, torch on CUDA if available else
CPU with its default thread count. Each side is warmed up first (for JAX: the
prefill and decode compilation, reported separately as `compile_s`); the
throughput is generated tokens / wall time of a whole call, the best of
`--repeats` calls, the two sides interleaved so that machine noise hits both.
Writes benchmarks/results/decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import numpy as np
from flax import nnx

from models import decoding, transformer

RESULTS = os.path.join(os.path.dirname(__file__), "results", "decode.json")

ARCH = dict(
  vocab_size=256,
  dim=512,
  num_layers=6,
  num_heads=8,
  num_kv_heads=8,
  head_dim=64,
  mlp_dim=1536,
  rope_theta=10_000.0,
  norm_eps=1e-6,
)


def hf_model(device):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  config = LlamaConfig(
    vocab_size=ARCH["vocab_size"],
    hidden_size=ARCH["dim"],
    intermediate_size=ARCH["mlp_dim"],
    num_hidden_layers=ARCH["num_layers"],
    num_attention_heads=ARCH["num_heads"],
    num_key_value_heads=ARCH["num_kv_heads"],
    head_dim=ARCH["head_dim"],
    rope_theta=ARCH["rope_theta"],
    rms_norm_eps=ARCH["norm_eps"],
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    attention_bias=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
    torch_dtype=torch.float32,
  )
  torch.manual_seed(0)
  model = LlamaForCausalLM(config).to(device=device, dtype=torch.float32).eval()
  return model


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--new", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args()
  import torch
  import transformers

  b, s, n = args.batch, args.prompt, args.new
  tokens_BS = np.random.RandomState(0).randint(3, ARCH["vocab_size"], (b, s)).astype(np.int32)
  lengths_B = np.full((b,), s, np.int32)

  # -- ours --
  model = transformer.Transformer(transformer.Config(**ARCH), rngs=nnx.Rngs(0))

  def ours():
    out = decoding.generate(model, tokens_BS, lengths_B, max_new_tokens=n)
    return jax.block_until_ready(out)

  start = time.perf_counter()
  out = ours()
  compile_s = time.perf_counter() - start
  assert int(out.lengths_B.min()) == n, out.lengths_B

  # -- Hugging Face --
  device = "cuda" if torch.cuda.is_available() else "cpu"
  hf = hf_model(device)
  input_ids = torch.from_numpy(tokens_BS.astype(np.int64)).to(device)
  attention_mask = torch.ones_like(input_ids)

  def theirs(new_tokens=n):
    with torch.inference_mode():
      result = hf.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
      )
    if device == "cuda":
      torch.cuda.synchronize()
    return result

  start = time.perf_counter()
  result = theirs(8)
  hf_warmup_s = time.perf_counter() - start
  assert result.shape == (b, s + 8), result.shape

  ours_s, theirs_s = [], []
  for _ in range(args.repeats):
    start = time.perf_counter()
    ours()
    ours_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    result = theirs()
    theirs_s.append(time.perf_counter() - start)
    assert result.shape == (b, s + n), result.shape

  tokens = b * n
  ours_tps, theirs_tps = tokens / min(ours_s), tokens / min(theirs_s)
  dev = jax.devices()[0]
  report = {
    "benchmark": "batched greedy generation, generated tokens per second",
    "device": {
      "jax": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
      "torch": device if device == "cpu" else torch.cuda.get_device_name(),
      "cpu": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "torch_threads": torch.get_num_threads(),
    },
    "versions": {
      "jax": jax.__version__,
      "torch": torch.__version__,
      "transformers": transformers.__version__,
    },
    "config": dict(
      ARCH,
      batch=b,
      prompt_tokens=s,
      new_tokens=n,
      dtype="float32",
      sampling="greedy",
      eos="none",
      repeats=args.repeats,
    ),
    "ours_tokens_per_s": round(ours_tps, 1),
    "transformers_tokens_per_s": round(theirs_tps, 1),
    "speedup": round(ours_tps / theirs_tps, 3),
    "ours_compile_s": round(compile_s, 2),
    "transformers_warmup_s": round(hf_warmup_s, 2),
    "ours_call_s": [round(x, 3) for x in ours_s],
    "transformers_call_s": [round(x, 3) for x in theirs_s],
    "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    "note": "throughput = best of the repeats; compile/warm-up excluded; other processes"
    " sharing the CPU (see load average) slow both sides, torch's threads more",
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(report, f, indent=2)
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
