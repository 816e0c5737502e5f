"""Reasoning environments over token ids: LongCoT (one growing context) and Delethink (chunks of
bounded context). No model inside: the rollout driver in `train` runs the generator.

  env = DelethinkEnv(chunk_size=8192, carryover=4096, max_chunks=5, eos_ids=[eos])
  obs = env.reset(queries)
  while not obs.done.all():
    outputs = generate(obs.prompts, obs.max_new_tokens)  # rows with obs.done are ignored
    obs = env.step(outputs)
  env.traces[i], env.visible_windows[i], env.trace_lengths, env.ended_on_eos
"""

from adaptive.envs.base import Chunk, ChunkedEnv, Observation
from adaptive.envs.delethink import DelethinkEnv
from adaptive.envs.longcot import LongCoTEnv

__all__ = ["Chunk", "ChunkedEnv", "DelethinkEnv", "LongCoTEnv", "Observation"]
