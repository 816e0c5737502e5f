"""Does GRPO learn the problems it trains on? Training reward on a fixed pool against fresh ones.

    python -m benchmarks.grpo_overfit [--study=signal_t1] [--pools=16,128,512] [--steps=30]
        [--study_workdir=/tmp/NAME] [--workdir=/tmp/NAME_overfit] [--verbose]

Issue #10's learning-signal check found no held-out gain from 50 GRPO steps
(benchmarks/results/markov_signal_t1.json): the training reward on fresh problems stayed flat
too. This run tells a loop that cannot learn apart from a policy that learns only what it sees.
From the study's SFT checkpoint (STUDY_WORKDIR/sft/checkpoints: run
`python -m benchmarks.markov_e2e --study=NAME` first), one LongCoT GRPO run per pool size N,
with every GRPO setting of the study (prompts per step, G, learning rate, temperature,
minibatches) except `rl.train_problems=N`: the runs cycle through the first N problems of the
train split (a revisited problem draws fresh samples), then the study's held-out evaluation of
each final model. The stages are markov_e2e's (a marker each, so a rerun resumes):

  pool{N}        python -m train.main --config=configs/markov_e2e_longcot.py:NAME
                   --config.rl.train_problems=N --config.total_steps=STEPS ...
  pool{N}_eval   python -m train.evaluate (the study's held-out problems and decoding)

Writes benchmarks/results/NAME_overfit.json and .png (with --quick: under the workdir): the
training reward per RL step of each pool and of the study's own run on fresh problems
(STUDY_WORKDIR/grpo_longcot/metrics.jsonl), the mean of the first and last `--window` steps
with its change, and each final model's held-out accuracy against the SFT model's on the same
problems, paired by problem.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

from benchmarks import markov_e2e as e2e
from benchmarks import markov_e2e_report as report
from configs import markov_e2e_common as common

ENV = "longcot"  # the signal presets train LongCoT only


def pool_stages(workdir: str, study: str, sft_checkpoints: str, pools, steps: int):
  """The train and evaluation stage of every pool size, in order."""
  s = common.study(study)
  fingerprint = e2e.config_fingerprint(ENV, study)
  flag = e2e.config_flag(ENV, study)
  stages = []
  for pool in pools:
    run_dir = os.path.join(workdir, f"pool{pool}")
    overrides = (
      f"--config.init_from={sft_checkpoints}",
      f"--config.rl.train_problems={pool}",
      f"--config.total_steps={steps}",
      f"--config.checkpoint_every={steps}",
      "--config.keep_checkpoints=1",
    )
    train = ("train.main", flag, f"--workdir={run_dir}", *overrides)
    budget = f"--config.rl_eval.longcot_budgets=({s.training_budget},)"
    evaluate = ("train.evaluate", flag, f"--workdir={run_dir}", budget, "--output=eval.json")
    stages.append(e2e.Stage(f"pool{pool}", train, fingerprint))
    stages.append(e2e.Stage(f"pool{pool}_eval", evaluate, fingerprint))
  return stages


def reward_summary(records: list[dict], window: int) -> dict:
  """Rewards per RL step, and the mean of the first and the last `window` steps."""
  rewards = [float(r["reward"]) for r in records]
  window = max(1, min(window, len(rewards) // 2))
  first, last = rewards[:window], rewards[-window:]
  return {
    "reward_by_step": rewards,
    "reward_first": statistics.fmean(first),
    "reward_last": statistics.fmean(last),
    "reward_change": statistics.fmean(last) - statistics.fmean(first),
    "window_steps": window,
    "approx_kl_mean": statistics.fmean(float(r["approx_kl"]) for r in records),
    "entropy_first_last": [float(records[0]["entropy"]), float(records[-1]["entropy"])],
  }


def heldout(evaluation: dict, sft: dict | None, s: common.Study) -> dict:
  """A model's held-out accuracy at the training budget, and (given the SFT model's evaluation)
  the change from SFT paired by problem."""
  out = report.at_training_budget(evaluation, ENV, s)  # stderr: binomial over all n samples
  point = report.curve_point(evaluation, ENV, report.training_setting(s, ENV))
  if "problem_accuracy" in point:  # a problem's samples are not independent: SE by problem
    out["problems"] = len(point["problem_accuracy"])
    out["problem_stderr"] = point["problem_stderr"]
  pair = None if sft is None else report.paired_problems(sft, evaluation, ENV, s)
  if pair is not None:
    out["paired_vs_sft"] = report.paired_test(*pair)
  return out


def build(workdir: str, study_workdir: str, study: str, pools, steps: int, window: int, command):
  s = common.study(study)
  sft = report.read_json(os.path.join(study_workdir, "sft", "eval.json"))
  runs = []
  for pool in pools:
    run_dir = os.path.join(workdir, f"pool{pool}")
    evaluation = report.read_json(os.path.join(run_dir, "eval.json"))
    row = {"pool": pool, "visits_per_problem": steps * s.prompts_per_step / pool}
    runs.append(
      row
      | reward_summary(report.read_metrics(run_dir), window)
      | {"heldout": heldout(evaluation, sft, s)}
    )
  fresh_dir = os.path.join(study_workdir, f"grpo_{ENV}")
  fresh = None
  if os.path.exists(os.path.join(fresh_dir, "eval.json")):
    records = report.read_metrics(fresh_dir)[:steps]  # the same number of steps as the pools
    fresh = {"pool": None, "visits_per_problem": 1.0} | reward_summary(records, window)
    # Its held-out accuracy is the study's, after all of its steps (rl_steps_of_heldout).
    fresh["heldout"] = heldout(report.read_json(os.path.join(fresh_dir, "eval.json")), sft, s)
    fresh["rl_steps_of_heldout"] = s.rl_steps
  return {
    "benchmark": "GRPO training reward on a fixed pool of problems vs fresh problems, "
    "same SFT start and settings; held-out accuracy of each final model",
    "command": command,
    "study": s.name,
    "sft_checkpoint": os.path.join(study_workdir, "sft", "checkpoints"),
    "settings": {
      "env": ENV,
      "task": s.task,
      "task_options": s.task_options,
      "rl_steps": steps,
      "prompts_per_step": s.prompts_per_step,
      "group_size": s.group_size,
      "learning_rate": s.rl_learning_rate,
      "minibatches": s.minibatches,
      "temperature": s.rl_temperature,
      "training_budget_tokens": s.training_budget,
    },
    "heldout_decoding": report.evaluation_decoding(s),
    "sft_heldout": heldout(sft, None, s),
    "runs": runs,
    "fresh_problems": fresh,
    "environment": report.git_commit(),
  }


def plot(r: dict, path: str) -> bool:
  try:
    import matplotlib
  except ImportError:
    return False
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
  series = [(f"pool of {run['pool']}", run) for run in r["runs"]]
  if r["fresh_problems"]:
    series.append(("fresh problems (the study's run)", r["fresh_problems"]))
  for label, run in series:
    rewards = run["reward_by_step"]
    left.plot(range(1, len(rewards) + 1), rewards, marker=".", label=label)
  left.set_xlabel("RL step")
  left.set_ylabel(f"training reward (sampled, T = {r['settings']['temperature']:g})")
  left.set_title("reward on the problems trained on", fontsize=10)

  names = ["SFT"] + [
    label if run["pool"] else f"fresh problems\n({run['rl_steps_of_heldout']} steps)"
    for label, run in series
  ]
  points = [r["sft_heldout"]] + [run["heldout"] for _, run in series]
  accuracy = [p["accuracy"] for p in points]
  errors = [p.get("problem_stderr", p["stderr"]) for p in points]
  right.bar(range(len(names)), accuracy, yerr=errors, capsize=4, color="tab:gray")
  right.set_xticks(range(len(names)), names, fontsize=8)
  right.set_ylabel("held-out accuracy (± SE)")
  problems = r["sft_heldout"].get("problems", r["sft_heldout"]["n"])
  right.set_title(f"{problems} held-out problems, {r['heldout_decoding']}", fontsize=9)
  for ax in (left, right):
    ax.grid(True, alpha=0.3)
  left.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--study", choices=sorted(common.STUDIES), default="signal_t1")
  p.add_argument("--pools", default="16,128,512", help="comma-separated pool sizes (problems)")
  p.add_argument("--steps", type=int, default=30, help="GRPO steps of every pool run")
  p.add_argument("--window", type=int, default=5, help="steps averaged at the start and the end")
  p.add_argument("--study_workdir", default=None, help="the markov_e2e study's workdir")
  p.add_argument("--workdir", default=None, help="this run's stages (default /tmp/NAME_overfit)")
  p.add_argument("--verbose", action="store_true", help="echo every stage's output")
  p.add_argument("--out", default=None, help="JSON path (default: see the module docstring)")
  args = p.parse_args(argv)
  try:
    args.pools = tuple(int(x) for x in args.pools.split(","))
  except ValueError:
    p.error(f"--pools={args.pools!r}: expected comma-separated integers, e.g. 16,128")
  if not args.pools or min(args.pools) < 1 or len(set(args.pools)) != len(args.pools):
    p.error(f"--pools={args.pools}: expected distinct pool sizes >= 1")
  if args.steps < 2 or args.window < 1:
    p.error(f"--steps={args.steps} --window={args.window}: expected steps >= 2, window >= 1")
  name = common.study(args.study).name
  args.study_workdir = os.path.abspath(args.study_workdir or os.path.join("/tmp", name))
  args.workdir = os.path.abspath(args.workdir or os.path.join("/tmp", f"{name}_overfit"))
  sft = os.path.join(args.study_workdir, "sft", "eval.json")
  if not os.path.exists(sft):
    p.error(
      f"--study_workdir={args.study_workdir}: no finished SFT stage there ({sft} is missing); "
      f"run python -m benchmarks.markov_e2e --study={args.study} first"
    )
  if args.out is None:
    folder = args.workdir if args.study == "quick" else e2e.RESULTS
    args.out = os.path.join(folder, f"{name}_overfit.json")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  sft_checkpoints = os.path.join(args.study_workdir, "sft", "checkpoints")
  stages = pool_stages(args.workdir, args.study, sft_checkpoints, args.pools, args.steps)
  e2e.run_all(args.workdir, stages, verbose=args.verbose)
  command = " ".join(
    ["python -m benchmarks.grpo_overfit", *(sys.argv[1:] if argv is None else argv)]
  )
  r = build(
    args.workdir, args.study_workdir, args.study, args.pools, args.steps, args.window, command
  )
  png = os.path.splitext(args.out)[0] + ".png"
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  r["png"] = os.path.basename(png) if plot(r, png) else None
  with open(args.out, "w") as f:
    json.dump(r, f, indent=2)
  for run in [*r["runs"], *([r["fresh_problems"]] if r["fresh_problems"] else [])]:
    point = run["heldout"]
    paired = point.get("paired_vs_sft", {})
    print(
      f"pool {run['pool'] or 'fresh'}: training reward {run['reward_first']:.3f} -> "
      f"{run['reward_last']:.3f}; held-out {point['accuracy']:.3f} "
      f"(SFT {r['sft_heldout']['accuracy']:.3f}, paired {paired.get('difference', math.nan):+.3f}"
      f" ± {paired.get('difference_stderr', math.nan):.3f})"
    )
  print(f"wrote {args.out}" + (f" and {png}" if r["png"] else ""))
  return r


if __name__ == "__main__":
  e2e.run_cli(main)
