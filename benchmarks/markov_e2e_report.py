"""The Markovian end-to-end study's results, read from its workdir: JSON fields, claims, figure.

`build(workdir, study, stages, command)` reads what the stages of benchmarks/markov_e2e.py
wrote (each evaluation's eval.json, each GRPO run's metrics.jsonl) and returns the result dict;
`write` saves it as JSON and draws the PNG. Nothing here is fixed in advance: every accuracy,
curve, time and claim is computed from those files.

Accuracies are at the training budget B = C + (I - 1)(C - m) on the same held-out problems:
`sft_accuracy` (the SFT model under LongCoT inference, its training format),
`sft_delethink_zero_shot_accuracy` (the same model under Delethink inference, no RL),
`delethink_rl_accuracy`, `longcot_rl_accuracy` (those of the preset's `envs` only); each with
`_stderr` = sqrt(p (1 - p) / n) and `_n` = n (problems x samples). `learning_signal` compares
each RL model with its step 0 (the SFT model in the same environment) on the same problems: the
difference, its standard error and a z test: paired by problem where both evaluations list
per-problem accuracies (d_i = a problem's change in mean reward over its samples; SE =
std(d, ddof 1) / sqrt(P)), else a two-proportion test (unpooled SE, two-sided p; the problems
are shared, so with positively correlated outcomes it is conservative; but it takes a problem's
samples as independent, so with several samples per problem it is not). A preset that samples
its evaluations (eval_temperature > 0) adds `learning_signal_greedy`, the same comparison under
greedy decoding (stages *_eval_greedy). Rollout
seconds per RL step are means over the RL steps that compiled no XLA program (metrics.jsonl's
rollout_compiles == 0; the first step compiles every rollout program), or over all steps when
every step compiled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import platform
import subprocess
from importlib import metadata

from configs import markov_e2e_common as common

ENVS = ("delethink", "longcot")
SLACK = 0.03  # claim 1: Delethink within 3 points of LongCoT


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def read_metrics(run_dir: str) -> list[dict]:
  """metrics.jsonl's records by step (a resumed run rewrites steps: the last one counts)."""
  by_step = {}
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    for line in f:
      if line.strip():
        record = json.loads(line)
        by_step[record["step"]] = record
  return [by_step[s] for s in sorted(by_step)]


def binomial_stderr(p: float, n: int) -> float:
  return math.sqrt(p * (1 - p) / n) if n else 0.0


def curve_point(evaluation: dict, env: str, setting: int) -> dict:
  """The curve point of `env` at max_chunks (Delethink) or budget (LongCoT) `setting`."""
  key = "max_chunks" if env == "delethink" else "budget"
  for point in evaluation[env]["curve"]:
    if point[key] == setting:
      return point
  raise ValueError(f"{env} evaluation has no point at {key}={setting}: {evaluation[env]['curve']}")


def training_setting(s: common.Study, env: str) -> int:
  return s.max_chunks if env == "delethink" else s.training_budget


def at_training_budget(evaluation: dict, env: str, s: common.Study) -> dict:
  point = curve_point(evaluation, env, training_setting(s, env))
  p, n = float(point["accuracy"]), int(point["count"])
  return {"accuracy": p, "stderr": binomial_stderr(p, n), "n": n}


def budget_curve(evaluation: dict, env: str) -> list[list[float]]:
  """[[thinking budget in tokens, accuracy], ...]"""
  key = "thinking_budget" if env == "delethink" else "budget"
  return [[int(p[key]), float(p["accuracy"])] for p in evaluation[env]["curve"]]


def rollout_timing(records: list[dict]) -> dict:
  steady = [r for r in records if r.get("rollout_compiles", 0) == 0] or records
  mean = lambda key: sum(float(r[key]) for r in steady) / len(steady)
  rollout, update = mean("rollout_seconds"), mean("update_seconds")
  return {
    "rollout_s_per_step": rollout,
    "update_s_per_step": update,
    "rollout_fraction": rollout / (rollout + update) if rollout + update else 0.0,
    "steps_averaged": [r["step"] for r in steady],
    "rollout_s_all_steps": [float(r["rollout_seconds"]) for r in records],
    "update_s_all_steps": [float(r["update_seconds"]) for r in records],
    "rollout_tokens_per_step": sum(float(r["rollout_tokens"]) for r in steady) / len(steady),
    "longest_context": max(int(r["longest_context"]) for r in records),
  }


# ----------------------------------------------------------------------------- held-out set


def _questions(task_name: str, options: dict, split: str, count: int, seed: int) -> list[str]:
  from adaptive.tasks import make_task

  task = make_task(task_name, **options)
  return [p.question for p in task.problems(split, count, seed=seed)]


def heldout_check(study: str) -> dict:
  """The held-out problems of every config's rl_eval are one list, and none of them is a
  problem any training run draws (SFT's train examples, every GRPO run's prompts)."""
  envs = common.study(study).envs
  configs = {
    kind: importlib.import_module(f"configs.markov_e2e_{kind}").get_config(study)
    for kind in ("sft", *envs)
  }
  heldout = {}
  for name, config in configs.items():
    ev = config.rl_eval
    heldout[name] = _questions(ev.task, dict(ev.task_options), "heldout", ev.heldout, ev.seed)
  first = heldout["sft"]
  sft = configs["sft"]
  train = set(
    _questions(
      sft.data.source.split(":", 1)[1],
      dict(sft.data.task_options),
      "train",
      sft.data.num_examples,
      sft.data.corpus_seed,
    )
  )
  for env in envs:
    rl = configs[env]
    count = rl.total_steps * rl.rl.prompts_per_step
    train |= set(_questions(rl.rl.task, dict(rl.rl.task_options), "train", count, rl.seed))
  digest = hashlib.blake2b("\x1e".join(first).encode(), digest_size=8).hexdigest()
  return {
    "same_problems_in_every_config": all(q == first for q in heldout.values()),
    "heldout_fingerprint": digest,
    "distinct_heldout_questions": len(set(first)),
    "train_problems_checked": len(train),
    "overlap_with_training": len(train & set(first)),
  }


# ----------------------------------------------------------------------------- claims


def two_proportion_test(p0: float, n0: int, p1: float, n1: int) -> dict:
  """p1 - p0 with its unpooled standard error, z and the two-sided normal p-value."""
  se = math.sqrt(p0 * (1 - p0) / n0 + p1 * (1 - p1) / n1) if n0 and n1 else 0.0
  z = (p1 - p0) / se if se else 0.0
  return {
    "difference": p1 - p0,
    "difference_stderr": se,
    "z": z,
    "p_value_two_sided": math.erfc(abs(z) / math.sqrt(2)),
  }


def paired_test(step0_P: list[float], final_P: list[float]) -> dict:
  """The mean per-problem change d = final - step 0 over P problems both models saw (each entry a
  problem's mean reward over its samples), its standard error std(d, ddof 1) / sqrt(P), z and
  the two-sided normal p-value, and how many problems rose and fell."""
  if len(step0_P) != len(final_P) or len(final_P) < 2:
    raise ValueError(f"paired_test: {len(step0_P)} vs {len(final_P)} problems; need equal, >= 2")
  d = [b - a for a, b in zip(step0_P, final_P, strict=True)]
  n = len(d)
  mean = sum(d) / n
  se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)
  z = mean / se if se else 0.0
  return {
    "difference": mean,
    "difference_stderr": se,
    "z": z,
    "p_value_two_sided": math.erfc(abs(z) / math.sqrt(2)),
    "problems": n,
    "problems_up": sum(x > 0 for x in d),
    "problems_down": sum(x < 0 for x in d),
  }


def learning_signal(by_step: dict, envs: tuple[str, ...], problems: dict | None = None) -> dict:
  """Per env: held-out accuracy at step 0 (SFT) and at the end, and the test of the change;
  met = the end is higher at p < 0.05. `problems` (env -> `paired_problems`, or None): where
  given, the test is the paired one by problem (a problem's samples are not independent), with
  the two-proportion test kept beside it."""
  out = {}
  for env in envs:
    (_, p0, se0, n0), (step, p1, se1, n1) = by_step[env]["heldout"][0], by_step[env]["heldout"][-1]
    test = two_proportion_test(p0, n0, p1, n1)
    target = "held-out accuracy after RL > at step 0, two-proportion z test, p < 0.05"
    row = {}
    if (problems or {}).get(env):
      row["two_proportion"] = test
      test = paired_test(*problems[env])
      target = "held-out accuracy after RL > at step 0, z test paired by problem, p < 0.05"
    out[env] = {
      "met": bool(test["difference"] > 0 and test["p_value_two_sided"] < 0.05),
      "target": target,
      "step0_accuracy": p0,
      "step0_stderr": se0,
      "rl_steps": step,
      "rl_accuracy": p1,
      "rl_stderr": se1,
      "n": n1,
      **test,
      **row,
    }
  return out


def paired_problems(step0: dict, final: dict, env: str, s: common.Study) -> tuple | None:
  """(step 0's, the end's) per-problem accuracies at the training budget, or None where either
  evaluation was written without them."""
  a, b = (
    curve_point(e, env, training_setting(s, env)).get("problem_accuracy") for e in (step0, final)
  )
  return None if a is None or b is None else (a, b)


def greedy_check(workdir: str, s: common.Study) -> dict | None:
  """Where the study samples its evaluations: greedy accuracy of the SFT and the final RL models
  at the training budget, with the paired test of the change (stages *_eval_greedy)."""
  if s.eval_temperature <= 0:
    return None
  sft = read_json(os.path.join(workdir, "sft", "eval_greedy.json"))
  out = {}
  for env in s.envs:
    final = read_json(os.path.join(workdir, f"grpo_{env}", "eval_greedy.json"))
    by_step = {env: {"heldout": [[0, *at_training_budget(sft, env, s).values()]]}}
    by_step[env]["heldout"].append([s.rl_steps, *at_training_budget(final, env, s).values()])
    out[env] = learning_signal(by_step, (env,), {env: paired_problems(sft, final, env, s)})[env]
  return out


def claims(r: dict) -> dict:
  """The issue's four targets, each {met, target, numbers}, from the result's numbers."""
  d, l, sft = r["delethink_rl_accuracy"], r["longcot_rl_accuracy"], r["sft_accuracy"]
  de, le, se = (
    r["delethink_rl_accuracy_stderr"],
    r["longcot_rl_accuracy_stderr"],
    r["sft_accuracy_stderr"],
  )
  curve = r["delethink_budget_curve"]
  at_b = next(a for b, a in curve if b == r["training_budget_tokens"])
  top_budget, top = curve[-1]
  lc_at_b = next(a for b, a in r["longcot_budget_curve"] if b == r["training_budget_tokens"])
  ds, ls = r["delethink_rollout_s_per_step"], r["longcot_rollout_s_per_step"]
  return {
    "delethink_matches_longcot": {
      "met": bool(d >= l - SLACK),
      "target": f"delethink_rl_accuracy >= longcot_rl_accuracy - {SLACK}",
      "delethink_rl_accuracy": d,
      "longcot_rl_accuracy": l,
      "difference": d - l,
      "difference_stderr": math.hypot(de, le),
    },
    "delethink_rl_beats_sft": {
      "met": bool(d > sft),
      "target": "delethink_rl_accuracy > sft_accuracy",
      "delethink_rl_accuracy": d,
      "sft_accuracy": sft,
      "difference": d - sft,
      "difference_stderr": math.hypot(de, se),
    },
    "delethink_scales_past_training_budget": {
      "met": bool(top > at_b),
      "target": "Delethink accuracy at 4x the training budget > at the training budget",
      "training_budget_tokens": r["training_budget_tokens"],
      "largest_budget_tokens": top_budget,
      "accuracy_at_training_budget": at_b,
      "accuracy_at_largest_budget": top,
      "longcot_accuracy_at_training_budget": lc_at_b,
      "longcot_accuracy_at_largest_budget": r["longcot_budget_curve"][-1][1],
      "longcot_largest_budget_tokens": r["longcot_budget_curve"][-1][0],
    },
    "delethink_rollout_cheaper": {
      "met": bool(ds < ls),
      "target": "delethink_rollout_s_per_step < longcot_rollout_s_per_step",
      "delethink_rollout_s_per_step": ds,
      "longcot_rollout_s_per_step": ls,
      "ratio_longcot_over_delethink": ls / ds if ds else None,
      "rollout_tokens_per_step": {e: r["rl_timing"][e]["rollout_tokens_per_step"] for e in ENVS},
      "longest_context_tokens": {e: r["rl_timing"][e]["longest_context"] for e in ENVS},
    },
  }


# ----------------------------------------------------------------------------- assembling


def git_commit() -> dict:
  def git(*args):
    return subprocess.run(
      ["git", *args], capture_output=True, text=True, cwd=os.path.dirname(__file__)
    ).stdout.strip()

  return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "-uno"))}


def task_sizes(s: common.Study) -> dict:
  """What the issue asks of the task, measured on its options (reported, not enforced)."""
  from adaptive.tasks import make_task

  low, high = common.completion_tokens_range(s)
  window = make_task(s.task, **s.task_options).markov_window_chars()
  return {
    "completion_tokens_range": [low, high],
    "shortest_completion_over_chunk": low / s.chunk_size,
    "markov_window_tokens": window,
    "carry_holds_window": s.carryover - s.keep_head >= window,
    "training_budget_holds_longest_completion": s.training_budget >= high,
    "longest_query_tokens": common.longest_query_tokens(s),
  }


def evaluation_decoding(s: common.Study) -> str:
  if s.eval_temperature <= 0:
    return "greedy"
  return f"temperature {s.eval_temperature}, {s.eval_samples} sample(s) per problem"


def accuracy_vs_rl_step(workdir: str, s: common.Study, sft_eval: dict) -> dict:
  """Held-out accuracy at the training budget at step 0 (SFT), the intermediate checkpoints and
  the end; and the sampled accuracy of each RL step's training rollouts (metrics.jsonl)."""
  out = {}
  for env in s.envs:
    heldout = [[0, *at_training_budget(sft_eval, env, s).values()]]
    for step in s.intermediate_steps():
      evaluation = read_json(os.path.join(workdir, "evals", f"{env}_step{step}", "eval.json"))
      heldout.append([step, *at_training_budget(evaluation, env, s).values()])
    final = read_json(os.path.join(workdir, f"grpo_{env}", "eval.json"))
    heldout.append([s.rl_steps, *at_training_budget(final, env, s).values()])
    records = read_metrics(os.path.join(workdir, f"grpo_{env}"))
    out[env] = {
      "heldout": heldout,  # [step, accuracy, stderr, n]
      "train_rollouts": [[r["step"], float(r["accuracy"])] for r in records],
    }
  out["note"] = (
    f"heldout: {evaluation_decoding(s)}, on the held-out problems at the training budget (step "
    "0 = the SFT model "
    f"under that environment); train_rollouts: each RL step's sampled rollouts (temperature "
    f"{s.rl_temperature}, {s.prompts_per_step} training prompts x G = {s.group_size})"
  )
  return out


DIAGNOSTICS = ("reward", "approx_kl", "clip_fraction", "entropy", "grad_norm")


def rl_diagnostics(records: list[dict], window: int = 10) -> dict:
  """Means of the GRPO update's health signals over consecutive windows of RL steps (reward:
  the training rollouts'; approx_kl and clip_fraction: the policy's move per step; entropy in
  nats per sampled token), and the learning rate the run used."""
  windows = []
  for start in range(0, len(records), window):
    chunk = records[start : start + window]
    row = {"steps": [chunk[0]["step"], chunk[-1]["step"]]}
    for key in DIAGNOSTICS:
      values = [float(r[key]) for r in chunk if key in r]
      row[key] = sum(values) / len(values) if values else None
    windows.append(row)
  rates = sorted({float(r["learning_rate"]) for r in records if "learning_rate" in r})
  return {"learning_rate": rates, "windows": windows}


def build(workdir: str, study: str, stages: list[dict], *, command: str) -> dict:
  s = common.study(study)
  envs = s.envs
  sft_eval = read_json(os.path.join(workdir, "sft", "eval.json"))
  rl_eval = {env: read_json(os.path.join(workdir, f"grpo_{env}", "eval.json")) for env in envs}
  r = {
    "benchmark": "Delethink vs LongCoT end to end: SFT, GRPO in each environment, held-out "
    "accuracy at and beyond the training budget, rollout cost",
    "command": command,
    "study": study,
    "quick": study == "quick",
    "training_budget_tokens": s.training_budget,
    "heldout_problems": int(sft_eval["problems"]),
    "heldout_decoding": evaluation_decoding(s),
  }
  headline = {"sft_accuracy": at_training_budget(sft_eval, "longcot", s)}
  if "delethink" in envs:
    headline["sft_delethink_zero_shot_accuracy"] = at_training_budget(sft_eval, "delethink", s)
  for env in envs:
    headline[f"{env}_rl_accuracy"] = at_training_budget(rl_eval[env], env, s)
  for name, value in headline.items():
    r[name], r[f"{name}_stderr"], r[f"{name}_n"] = value["accuracy"], value["stderr"], value["n"]
  for env in envs:
    r[f"{env}_budget_curve"] = budget_curve(rl_eval[env], env)
  for env in ("longcot", *(e for e in envs if e != "longcot")):
    r[f"sft_{env}_budget_curve"] = budget_curve(sft_eval, env)
  metrics = {env: read_metrics(os.path.join(workdir, f"grpo_{env}")) for env in envs}
  timing = {env: rollout_timing(metrics[env]) for env in envs}
  for env in envs:
    r[f"{env}_rollout_s_per_step"] = timing[env]["rollout_s_per_step"]
    r[f"{env}_update_s_per_step"] = timing[env]["update_s_per_step"]
  r["rl_timing"] = timing
  r["rl_diagnostics"] = {env: rl_diagnostics(metrics[env]) for env in envs}
  if set(envs) == set(ENVS):  # the Delethink vs LongCoT claims need both runs
    r["rollout_s_ratio_longcot_over_delethink"] = (
      r["longcot_rollout_s_per_step"] / r["delethink_rollout_s_per_step"]
    )
    r["update_s_ratio_longcot_over_delethink"] = (
      r["longcot_update_s_per_step"] / r["delethink_update_s_per_step"]
    )
    r["claims"] = claims(r)
  r["accuracy_vs_rl_step"] = accuracy_vs_rl_step(workdir, s, sft_eval)
  pairs = {env: paired_problems(sft_eval, rl_eval[env], env, s) for env in envs}
  r["learning_signal"] = learning_signal(r["accuracy_vs_rl_step"], envs, pairs)
  greedy = greedy_check(workdir, s)
  if greedy is not None:
    r["learning_signal_greedy"] = greedy
  r["heldout"] = heldout_check(study) | {
    "evaluations_report_the_same_count": len({e["problems"] for e in (sft_eval, *rl_eval.values())})
    == 1
  }
  r["evaluations"] = {
    "sft": {env: sft_eval[env]["curve"] for env in envs},
    **{env: rl_eval[env][env]["curve"] for env in envs},
  }
  r["task"] = task_sizes(s)
  r["settings"] = dataclasses.asdict(s) | {
    "delethink_caps": list(s.delethink_caps()),
    "longcot_budgets": list(s.longcot_budgets()),
    "intermediate_steps": list(s.intermediate_steps()),
  }
  r["stages"] = stages
  r["stage_seconds"] = {st["name"]: st["seconds"] for st in stages}
  r["total_stage_seconds"] = sum(st["seconds"] for st in stages)
  r["commands"] = [st["command"] for st in stages]
  r["git"] = git_commit()
  r["environment"] = {
    "jax": metadata.version("jax"),
    "flax": metadata.version("flax"),
    "python": platform.python_version(),
    "machine": platform.machine(),
    "cpu_count": os.cpu_count(),
    "load_average": [round(x, 2) for x in os.getloadavg()],
  }
  return r


# ----------------------------------------------------------------------------- figure


def plot(r: dict, path: str) -> bool:
  try:
    import matplotlib
  except ImportError:
    return False
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  colors = {"delethink": "tab:blue", "longcot": "tab:red"}
  envs = [env for env in ENVS if env in r["rl_timing"]]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))

  ax = axes[0]
  for env in envs:
    series = r["accuracy_vs_rl_step"][env]
    steps, acc, err = zip(*[(p[0], p[1], p[2]) for p in series["heldout"]], strict=True)
    label = f"{env} held-out ({r.get('heldout_decoding', 'greedy')})"
    ax.errorbar(steps, acc, yerr=err, marker="o", capsize=3, color=colors[env], label=label)
    greedy = (r.get("learning_signal_greedy") or {}).get(env)
    if greedy:
      ax.plot(
        [0, greedy["rl_steps"]],
        [greedy["step0_accuracy"], greedy["rl_accuracy"]],
        marker="s",
        ls="--",
        color=colors[env],
        alpha=0.5,
        label=f"{env} held-out greedy",
      )
    steps, acc = zip(*series["train_rollouts"], strict=True)
    ax.plot(
      steps, acc, ls=":", color=colors[env], alpha=0.6, label=f"{env} train rollouts (sampled)"
    )
  ax.set_xlabel("RL step")
  ax.set_ylabel(f"accuracy at B = {r['training_budget_tokens']} tokens")
  signal = "; ".join(
    f"{env} {t['step0_accuracy']:.3f} -> {t['rl_accuracy']:.3f}, z = {t['z']:.2f}"
    for env, t in r["learning_signal"].items()
  )
  ax.set_title(f"accuracy vs RL step ({signal})", fontsize=9)

  ax = axes[1]
  for key, label, style in (
    ("delethink_budget_curve", "Delethink RL", dict(color=colors["delethink"], marker="o")),
    ("longcot_budget_curve", "LongCoT RL", dict(color=colors["longcot"], marker="o")),
    (
      "sft_delethink_budget_curve",
      "SFT, Delethink zero-shot",
      dict(color=colors["delethink"], marker="x", ls="--", alpha=0.7),
    ),
    (
      "sft_longcot_budget_curve",
      "SFT, LongCoT",
      dict(color=colors["longcot"], marker="x", ls="--", alpha=0.7),
    ),
  ):
    if key not in r:
      continue
    budgets, acc = zip(*r[key], strict=True)
    ax.plot(budgets, acc, label=label, **style)
  ax.axvline(r["training_budget_tokens"], color="gray", ls="-.", lw=1, label="training budget")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("test-time thinking budget (tokens)")
  ax.set_ylabel("held-out accuracy")
  ax.set_title(f"accuracy vs budget (n = {r['heldout_problems']})", fontsize=10)

  ax = axes[2]
  for env in envs:
    timing = r["rl_timing"][env]
    steps = list(range(1, len(timing["rollout_s_all_steps"]) + 1))
    ax.plot(
      steps, timing["rollout_s_all_steps"], marker=".", color=colors[env], label=f"{env} rollout"
    )
    ax.axhline(
      timing["rollout_s_per_step"],
      color=colors[env],
      ls="--",
      lw=1,
      label=f"{env} mean (no compiles)",
    )
  ax.set_yscale("log")
  ax.set_xlabel("RL step")
  ax.set_ylabel("rollout seconds")
  ratio = r.get("rollout_s_ratio_longcot_over_delethink")
  ratio = f" (LongCoT / Delethink = {ratio:.2f})" if ratio else ""
  ax.set_title(f"rollout s per RL step{ratio}", fontsize=10)
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def write(r: dict, out: str, png: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(png)), exist_ok=True)
  r["png"] = os.path.basename(png) if plot(r, png) else None
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(r, f, indent=2)
