"""Delethink end to end at CPU scale: SFT, GRPO with Delethink and with LongCoT, evaluations.

    python -m benchmarks.markov_e2e [--study=full|signal|signal_t1|quick] [--workdir=DIR]
        [--verbose]

`--study` picks a preset of configs/markov_e2e_common.py (`--quick` is `--study=quick`):
`full` the study below; `signal` a short task and LongCoT GRPO only (does GRPO raise held-out
accuracy from an SFT checkpoint that solves 30-70 %?); `signal_t1` the same question measured
at the training temperature (4 samples per problem, a paired test, greedy beside it) on fresh
test problems; `quick` the toy pipeline of the tests.

Every stage is a command a user would run (`python -m train.main` / `python -m train.evaluate`
with a config file of configs/, whose sizes all come from configs/markov_e2e_common.py), run
as a subprocess with its own workdir under --workdir:

  sft              SFT on LongCoT-formatted worked traces          configs/markov_e2e_sft.py
  sft_eval         the SFT model on the held-out problems under LongCoT (budgets up to 4x the
                   training budget) and zero-shot under Delethink (caps up to 4x)
  grpo_delethink   GRPO, Delethink env (C, m, I), from the SFT checkpoints
  grpo_longcot     GRPO, LongCoT env at budget C + (I - 1)(C - m), the same steps, G, prompts,
                   learning rate and seed (a preset's `envs` says which of the two run)
  *_eval           each RL model on the same held-out problems along its budget curve
  *_eval_stepK     intermediate RL checkpoints at the training budget (accuracy vs RL step)
  *_eval_greedy    where the preset evaluates sampled traces: the SFT and final RL models
                   greedy at the training budget (eval_greedy.json beside eval.json)

A stage whose marker (WORKDIR/stages/NAME.json) says it finished with the same command and the
same config values is skipped, so an interrupted study resumes where it stopped (a training
stage killed midway resumes from its own last checkpoint); a marker with another command or
other config values (sizes changed in configs/markov_e2e_common.py) is an error: use a fresh
--workdir, or pass --rerun_changed to rerun just those stages and every later stage that reads a
rerun stage's directory (the SFT stages are kept when only the GRPO sizes changed). A rerun
stage's old directory is kept as DIR.replaced-FINGERPRINT and its old marker as
WORKDIR/stages/NAME.json.replaced-FINGERPRINT. Each stage's output goes to WORKDIR/logs/NAME.log.

Then benchmarks/markov_e2e_report.py turns the workdir into benchmarks/results/NAME.json and
NAME.png, NAME the preset's `name` (markov_e2e, markov_signal; with --quick:
WORKDIR/markov_e2e.json and .png, never the real results). The default workdir is /tmp/NAME.
Unless JAX_COMPILATION_CACHE_DIR is set, the stages share a compilation cache in the workdir
(the evaluations rebuild the rollout programs the training runs compiled).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import time

from tqdm import tqdm

from benchmarks import markov_e2e_report as report
from configs import markov_e2e_common as common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CONFIGS = {
  "sft": "configs/markov_e2e_sft.py",
  "delethink": "configs/markov_e2e_delethink.py",
  "longcot": "configs/markov_e2e_longcot.py",
}


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  argv: tuple[str, ...]  # after `python -m`
  config: str  # fingerprint of the config file's resolved fields (the sizes it ran with)

  @property
  def command(self) -> str:
    return " ".join(("python", "-m", *self.argv))


def config_arg(study: str) -> str:
  """The config argument of a preset: '' for the full study (its commands carry none)."""
  return "" if study == "full" else study


def config_flag(kind: str, study: str) -> str:
  arg = config_arg(study)
  return f"--config={CONFIGS[kind]}" + (f":{arg}" if arg else "")


def config_fingerprint(kind: str, study: str) -> str:
  """A hash of every field of the config a stage runs (so a changed size is noticed)."""
  module = importlib.import_module(f"configs.markov_e2e_{kind}")
  fields = module.get_config(config_arg(study)).to_json_best_effort(sort_keys=True)
  return hashlib.blake2b(fields.encode(), digest_size=8).hexdigest()


def plan(workdir: str, study: str) -> list[Stage]:
  """The study's stages in order; names double as marker and log names."""
  s = common.study(study)
  fingerprints = {kind: config_fingerprint(kind, study) for kind in ("sft", *s.envs)}

  def stage(name, module, kind, run_dir, *extra):
    argv = (module, config_flag(kind, study), f"--workdir={run_dir}", *extra)
    return Stage(name, argv, fingerprints[kind])

  sft_dir = os.path.join(workdir, "sft")
  rl_dir = {env: os.path.join(workdir, f"grpo_{env}") for env in s.envs}
  init = f"--config.init_from={os.path.join(sft_dir, 'checkpoints')}"
  stages = [
    stage("sft", "train.main", "sft", sft_dir),
    stage("sft_eval", "train.evaluate", "sft", sft_dir, "--output=eval.json"),
    *(stage(f"grpo_{env}", "train.main", env, rl_dir[env], init) for env in s.envs),
    *(
      stage(f"{env}_eval", "train.evaluate", env, rl_dir[env], "--output=eval.json")
      for env in s.envs
    ),
  ]
  at_training_budget = {
    "delethink": f"--config.rl_eval.max_chunks=({s.max_chunks},)",
    "longcot": f"--config.rl_eval.longcot_budgets=({s.training_budget},)",
  }
  for env in s.envs:
    for step in s.intermediate_steps():
      checkpoint = os.path.join(rl_dir[env], "checkpoints", str(step))
      eval_dir = os.path.join(workdir, "evals", f"{env}_step{step}")
      stages.append(
        stage(
          f"{env}_eval_step{step}",
          "train.evaluate",
          env,
          eval_dir,
          f"--config.init_from={checkpoint}",
          at_training_budget[env],
          "--output=eval.json",
        )
      )
  if s.eval_temperature > 0:  # sampled evaluations: greedy ones of step 0 and the end beside them
    greedy = ("--config.rl_eval.temperature=0.0", "--config.rl_eval.num_samples=1")
    greedy += ("--output=eval_greedy.json",)
    sft_settings = [at_training_budget["longcot"]]
    sft_settings += [at_training_budget[e] for e in s.envs if e != "longcot"]
    stages.append(
      stage("sft_eval_greedy", "train.evaluate", "sft", sft_dir, *sft_settings, *greedy)
    )
    for env in s.envs:
      stages.append(
        stage(
          f"{env}_eval_greedy", "train.evaluate", env, rl_dir[env], at_training_budget[env], *greedy
        )
      )
  return stages


# ----------------------------------------------------------------------------- running


def marker_path(workdir: str, stage: Stage) -> str:
  return os.path.join(workdir, "stages", f"{stage.name}.json")


def write_marker(workdir: str, stage: Stage, **fields) -> dict:
  marker = {"command": stage.command, "config": stage.config, **fields}
  os.makedirs(os.path.dirname(marker_path(workdir, stage)), exist_ok=True)
  with open(marker_path(workdir, stage), "w") as f:
    json.dump(marker, f, indent=1)
  return marker


def read_marker(workdir: str, stage: Stage) -> dict | None:
  """The stage's marker, or None if it never ran."""
  path = marker_path(workdir, stage)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def same_run(marker: dict, stage: Stage) -> bool:
  """Whether the marker was written by this stage's command with these config values."""
  return (marker.get("command"), marker.get("config")) == (stage.command, stage.config)


def completed(workdir: str, stage: Stage) -> dict | None:
  """The stage's marker if it finished; None if it never ran or was interrupted (a rerun
  resumes it); ValueError if it ran with another command or other config values."""
  marker = read_marker(workdir, stage)
  if marker is None:
    return None
  if not same_run(marker, stage):
    raise ValueError(
      f"--workdir={workdir}: stage {stage.name} ran there as\n  {marker.get('command')}\n"
      f"(config fingerprint {marker.get('config')}), this study runs\n  {stage.command}\n"
      f"(config fingerprint {stage.config}): the sizes changed? use a fresh --workdir"
    )
  return marker if marker.get("finished") else None


def marker_differs(workdir: str, stage: Stage) -> dict | None:
  """The stage's marker if it ran with another command or other config values, else None."""
  marker = read_marker(workdir, stage)
  return None if marker is None or same_run(marker, stage) else marker


def run_dir(stage: Stage) -> str:
  return next(a.split("=", 1)[1] for a in stage.argv if a.startswith("--workdir="))


def reads(stage: Stage, directory: str) -> bool:
  """Whether the stage's command names the directory or a path under it."""
  return any(a.endswith("=" + directory) or f"={directory}{os.sep}" in a for a in stage.argv)


def set_aside(path: str, tag: str) -> str | None:
  """Renames path (if it exists) to path.replaced-TAG[-N]; returns the new name."""
  if not os.path.exists(path):
    return None
  target, n = f"{path}.replaced-{tag}", 1
  while os.path.exists(target):
    n += 1
    target = f"{path}.replaced-{tag}-{n}"
  os.rename(path, target)
  return target


def child_environment(workdir: str) -> dict:
  env = dict(os.environ)
  if "JAX_COMPILATION_CACHE_DIR" not in env:
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(workdir, "jax_cache")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  return env


def run_stage(workdir: str, stage: Stage, bar, verbose: bool) -> dict:
  """Runs the stage's command (output to its log, last line on the bar); writes its marker."""
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  log_path = os.path.join(workdir, "logs", f"{stage.name}.log")
  write_marker(workdir, stage, finished=None)  # a changed config is caught after a crash too
  started = time.perf_counter()
  with open(log_path, "wb") as log:
    proc = subprocess.Popen(
      [sys.executable, "-m", *stage.argv],
      cwd=ROOT,
      env=child_environment(workdir),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    pending = b""
    for chunk in iter(lambda: proc.stdout.read1(4096), b""):
      log.write(chunk)
      if verbose:
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
      lines = re.split(rb"[\r\n]", pending + chunk)
      pending = lines[-1]
      last = next((x for x in reversed(lines[:-1]) if x.strip()), b"")
      if last:
        bar.set_postfix_str(last.decode(errors="replace").strip()[-70:], refresh=True)
    code = proc.wait()
  seconds = time.perf_counter() - started
  if code != 0:
    with open(log_path, errors="replace") as f:
      tail = "".join(f.readlines()[-40:])
    raise RuntimeError(
      f"stage {stage.name} failed (exit {code}) after {seconds:.0f} s:\n  {stage.command}\n"
      f"last lines of {log_path}:\n{tail}"
    )
  return write_marker(workdir, stage, seconds=seconds, finished=time.time())


def run_all(
  workdir: str, stages: list[Stage], verbose: bool = False, rerun_changed: bool = False
) -> list[dict]:
  """Runs (or skips) every stage; returns [{name, command, seconds, skipped}] in order.

  With rerun_changed, a stage whose marker has another command or config, or whose command
  reads the directory of a stage rerun before it, is run again from scratch (its old directory
  and marker set aside) instead of being an error."""
  done = []
  rerun_dirs: set[str] = set()  # directories this call fills anew
  bar = tqdm(total=len(stages), unit="stage", dynamic_ncols=True)
  try:
    for i, stage in enumerate(stages, 1):
      bar.set_description(stage.name)
      if rerun_changed:
        old = marker_differs(workdir, stage)
        upstream = [d for d in rerun_dirs if reads(stage, d)]
        if old is not None or upstream:
          tag = (old or {}).get("config") or "upstream"
          why = "its config or command changed" if old is not None else f"it reads {upstream[0]}"
          moved = set_aside(run_dir(stage), tag) if run_dir(stage) not in rerun_dirs else None
          set_aside(marker_path(workdir, stage), tag)
          tqdm.write(
            f"[{i}/{len(stages)}] {stage.name}: rerun, {why}"
            + (f" (old directory kept as {moved})" if moved else "")
          )
          rerun_dirs.add(run_dir(stage))
      marker = completed(workdir, stage)
      skipped = marker is not None
      if skipped:
        tqdm.write(
          f"[{i}/{len(stages)}] {stage.name}: complete, skipped "
          f"(took {marker['seconds']:.1f} s when run)"
        )
      else:
        tqdm.write(f"[{i}/{len(stages)}] {stage.name}: {stage.command}")
        marker = run_stage(workdir, stage, bar, verbose)
        tqdm.write(f"[{i}/{len(stages)}] {stage.name}: done in {marker['seconds']:.1f} s")
      record = {"name": stage.name, "command": stage.command, "seconds": marker["seconds"]}
      done.append(record | {"skipped": skipped})
      bar.update(1)
  finally:
    bar.close()
  return done


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--study", choices=sorted(common.STUDIES), default="full", help="the preset")
  p.add_argument("--quick", action="store_true", help="--study=quick: the toy sizes of QUICK")
  p.add_argument("--workdir", default=None, help="every stage's workdir (default /tmp/NAME)")
  p.add_argument("--verbose", action="store_true", help="echo every stage's output")
  p.add_argument(
    "--rerun_changed",
    action="store_true",
    help="rerun stages whose config changed (and those reading their output) instead of failing",
  )
  p.add_argument("--out", default=None, help="JSON path (default: see the module docstring)")
  p.add_argument("--png", default=None, help="PNG path (default: next to the JSON)")
  args = p.parse_args(argv)
  if args.quick:
    if args.study not in ("full", "quick"):
      p.error(f"--quick and --study={args.study}: pick one")
    args.study = "quick"
  name = common.study(args.study).name
  args.workdir = os.path.abspath(args.workdir or os.path.join("/tmp", name))
  if args.out is None:
    folder = args.workdir if args.study == "quick" else RESULTS
    args.out = os.path.join(folder, f"{name}.json")
  if args.png is None:
    args.png = os.path.splitext(args.out)[0] + ".png"
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  stages = plan(args.workdir, args.study)
  stage_records = run_all(
    args.workdir, stages, verbose=args.verbose, rerun_changed=args.rerun_changed
  )
  command = " ".join(["python -m benchmarks.markov_e2e", *(sys.argv[1:] if argv is None else argv)])
  result = report.build(args.workdir, args.study, stage_records, command=command)
  report.write(result, args.out, args.png)
  print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict | list)}, indent=1))
  print(
    json.dumps(result.get("claims", {}) | {"learning_signal": result["learning_signal"]}, indent=1)
  )
  print("task sizes:", json.dumps(result["task"]))
  print(f"wrote {args.out}" + (f" and {args.png}" if result.get("png") else ""))
  return result


def run_cli(main_fn) -> None:
  """Runs a staged benchmark's main; a reused workdir or a failed stage is one clear message."""
  try:
    main_fn()
  except (ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  run_cli(main)
