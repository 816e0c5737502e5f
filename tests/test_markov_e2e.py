"""benchmarks/markov_e2e.py --quick end to end (toy sizes: the pipeline, not the claims).

The `signal` and `signal_t1` presets are only built and validated here (no training).

One run of the whole pipeline through the CLIs (SFT, its evaluation, both GRPO runs, their
evaluations and intermediate checkpoints), then a rerun that must skip every stage. The JSON is
checked field by field against configs/markov_e2e_common.py's QUICK sizes, the standard-error
formula is recomputed here, and the claims are recomputed from the JSON's own numbers and
shown to follow them when the numbers change.
"""

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
from cli_env import environment, finish

from benchmarks import grpo_overfit, markov_e2e, markov_e2e_report
from configs import markov_e2e_common as common
from configs import markov_e2e_delethink, markov_e2e_longcot, markov_e2e_sft
from train import config_lib
from train import evaluate as evaluate_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = common.QUICK
ACCURACIES = (
  "sft_accuracy",
  "sft_delethink_zero_shot_accuracy",
  "delethink_rl_accuracy",
  "longcot_rl_accuracy",
)
FIELDS = (
  *ACCURACIES,
  "delethink_budget_curve",
  "longcot_budget_curve",
  "delethink_rollout_s_per_step",
  "longcot_rollout_s_per_step",
  "delethink_update_s_per_step",
  "longcot_update_s_per_step",
  "rollout_s_ratio_longcot_over_delethink",
  "training_budget_tokens",
  "heldout_problems",
  "stage_seconds",
  "commands",
  "git",
  "claims",
  "accuracy_vs_rl_step",
)
CLAIMS = (
  "delethink_matches_longcot",
  "delethink_rl_beats_sft",
  "delethink_scales_past_training_budget",
  "delethink_rollout_cheaper",
)


def run_benchmark(module: str, *argv: str) -> str:
  """`python -m benchmarks.MODULE ARGV...` as a user runs it; its output (it must succeed)."""
  proc = subprocess.Popen(
    [sys.executable, "-m", f"benchmarks.{module}", *argv],
    cwd=ROOT,
    env=environment(1),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  code, out = finish(proc, timeout=600)
  assert code == 0, out[-4000:]
  return out


def run_quick(workdir):
  out = run_benchmark("markov_e2e", "--quick", f"--workdir={workdir}")
  with open(workdir / "markov_e2e.json") as f:
    return json.load(f), out


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("markov_e2e")
  real = os.path.join(markov_e2e.RESULTS, "markov_e2e.json")
  real_mtime = os.path.getmtime(real) if os.path.exists(real) else None
  first, _ = run_quick(workdir)
  second, out = run_quick(workdir)
  # --quick never touches the study's results.
  assert (os.path.getmtime(real) if os.path.exists(real) else None) == real_mtime
  return workdir, first, second, out


def test_every_field_is_there_with_the_quick_sizes(quick):
  workdir, result, _, _ = quick
  missing = [f for f in FIELDS if f not in result]
  assert not missing, missing
  assert result["quick"] is True
  assert result["training_budget_tokens"] == S.training_budget
  assert result["heldout_problems"] == S.heldout
  assert result["png"] == "markov_e2e.png" and (workdir / "markov_e2e.png").exists()
  assert [s["name"] for s in result["stages"]] == [
    s.name for s in markov_e2e.plan(str(workdir), "quick")
  ]
  assert all(c.startswith("python -m train.") and ":quick" in c for c in result["commands"])
  assert len(result["git"]["commit"]) == 40
  for key in ("delethink_rollout_s_per_step", "longcot_rollout_s_per_step"):
    assert result[key] > 0
  assert result["heldout"]["same_problems_in_every_config"]
  assert result["heldout"]["overlap_with_training"] == 0
  assert result["heldout"]["evaluations_report_the_same_count"]
  for env in ("delethink", "longcot"):
    diagnostics = result["rl_diagnostics"][env]
    assert diagnostics["learning_rate"] == [pytest.approx(S.rl_learning_rate)]
    assert diagnostics["windows"][0]["steps"][0] == 1
    assert diagnostics["windows"][-1]["steps"][1] == S.rl_steps
    assert all(w["approx_kl"] is not None for w in diagnostics["windows"])


def test_curves_have_one_point_per_setting(quick):
  _, result, _, _ = quick
  step = S.chunk_size - S.carryover
  delethink = [S.chunk_size + (i - 1) * step for i in S.delethink_caps()]
  for key in ("delethink_budget_curve", "sft_delethink_budget_curve"):
    assert [b for b, _ in result[key]] == delethink
  for key in ("longcot_budget_curve", "sft_longcot_budget_curve"):
    assert [b for b, _ in result[key]] == list(S.longcot_budgets())
  # Up to 4x the training budget, the training budget itself on both curves.
  for key in ("delethink_budget_curve", "longcot_budget_curve"):
    budgets = [b for b, _ in result[key]]
    assert S.training_budget in budgets and budgets[-1] >= 4 * S.training_budget
    assert all(0 <= a <= 1 for _, a in result[key])
  by_step = result["accuracy_vs_rl_step"]
  for env in ("delethink", "longcot"):
    steps = [p[0] for p in by_step[env]["heldout"]]
    assert steps == [0, *S.intermediate_steps(), S.rl_steps]
    assert [p[0] for p in by_step[env]["train_rollouts"]] == list(range(1, S.rl_steps + 1))


def test_each_accuracy_has_its_binomial_standard_error(quick):
  _, result, _, _ = quick
  for name in ACCURACIES:
    p, n = result[name], result[f"{name}_n"]
    assert n == S.heldout
    assert result[f"{name}_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / n), abs=1e-12)
  # The headline accuracies are the curves' points at the training budget.
  curve = dict(result["delethink_budget_curve"])
  assert result["delethink_rl_accuracy"] == curve[S.training_budget]
  assert result["longcot_rl_accuracy"] == dict(result["longcot_budget_curve"])[S.training_budget]
  assert result["sft_accuracy"] == dict(result["sft_longcot_budget_curve"])[S.training_budget]
  zero_shot = dict(result["sft_delethink_budget_curve"])[S.training_budget]
  assert result["sft_delethink_zero_shot_accuracy"] == zero_shot


def test_claims_are_computed_from_the_numbers(quick):
  _, result, _, _ = quick
  claims = result["claims"]
  assert set(claims) == set(CLAIMS)
  d, l, sft = (result[k] for k in ("delethink_rl_accuracy", "longcot_rl_accuracy", "sft_accuracy"))
  assert claims["delethink_matches_longcot"]["met"] == (d >= l - 0.03)
  assert claims["delethink_rl_beats_sft"]["met"] == (d > sft)
  curve = dict(result["delethink_budget_curve"])
  top = result["delethink_budget_curve"][-1][1]
  assert claims["delethink_scales_past_training_budget"]["met"] == (top > curve[S.training_budget])
  ds, ls = result["delethink_rollout_s_per_step"], result["longcot_rollout_s_per_step"]
  assert claims["delethink_rollout_cheaper"]["met"] == (ds < ls)

  # Changing the numbers changes the verdicts.
  changed = copy.deepcopy(result)
  changed.update(delethink_rl_accuracy=0.5, longcot_rl_accuracy=0.6, sft_accuracy=0.4)
  changed["delethink_budget_curve"] = [[b, 0.5] for b, _ in result["delethink_budget_curve"]]
  changed["delethink_budget_curve"][-1][1] = 0.7
  changed.update(delethink_rollout_s_per_step=1.0, longcot_rollout_s_per_step=2.0)
  verdicts = {k: v["met"] for k, v in markov_e2e_report.claims(changed).items()}
  assert verdicts == {
    "delethink_matches_longcot": False,
    "delethink_rl_beats_sft": True,
    "delethink_scales_past_training_budget": True,
    "delethink_rollout_cheaper": True,
  }
  changed.update(delethink_rl_accuracy=0.58, longcot_rollout_s_per_step=0.5)
  verdicts = {k: v["met"] for k, v in markov_e2e_report.claims(changed).items()}
  assert verdicts["delethink_matches_longcot"] and not verdicts["delethink_rollout_cheaper"]


def test_a_rerun_skips_every_completed_stage(quick):
  _, first, second, out = quick
  assert all(s["skipped"] for s in second["stages"]), second["stages"]
  assert not any(s["skipped"] for s in first["stages"])
  assert second["stage_seconds"] == first["stage_seconds"]
  assert out.count("complete, skipped") == len(first["stages"])
  for key in (*ACCURACIES, "delethink_budget_curve", "longcot_budget_curve"):
    assert second[key] == first[key]


def test_a_stage_run_with_another_command_or_config_is_an_error(tmp_path):
  workdir = str(tmp_path)
  stage = markov_e2e.plan(workdir, "quick")[0]
  assert markov_e2e.completed(workdir, stage) is None
  markov_e2e.write_marker(workdir, stage, finished=None)  # interrupted: run it again
  assert markov_e2e.completed(workdir, stage) is None
  markov_e2e.write_marker(workdir, stage, seconds=1.0, finished=1.0)
  assert markov_e2e.completed(workdir, stage)["seconds"] == 1.0
  for other in (
    dataclasses.replace(stage, argv=tuple(a.replace(":quick", "") for a in stage.argv)),
    dataclasses.replace(stage, config="another study's sizes"),
  ):
    markov_e2e.write_marker(workdir, other, seconds=1.0, finished=1.0)
    with pytest.raises(ValueError, match="use a fresh --workdir"):
      markov_e2e.completed(workdir, stage)


def test_rerun_changed_reruns_the_changed_stages_and_those_reading_them(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  stages = markov_e2e.plan(workdir, "quick")
  ran = []

  def fake_run(workdir_, stage, bar, verbose):
    ran.append(stage.name)
    os.makedirs(markov_e2e.run_dir(stage), exist_ok=True)
    return markov_e2e.write_marker(workdir_, stage, seconds=2.0, finished=2.0)

  monkeypatch.setattr(markov_e2e, "run_stage", fake_run)
  markov_e2e.run_all(workdir, stages)
  assert ran == [s.name for s in stages]
  old_fp = next(s.config for s in stages if s.name == "grpo_longcot")
  # Only the LongCoT config changed: SFT and Delethink stages are kept, LongCoT's rerun.
  longcot = [
    dataclasses.replace(s, config="new") if "markov_e2e_longcot" in s.command else s for s in stages
  ]
  with pytest.raises(ValueError, match="use a fresh --workdir"):
    markov_e2e.run_all(workdir, longcot)
  ran.clear()
  records = markov_e2e.run_all(workdir, longcot, rerun_changed=True)
  assert ran == [s.name for s in longcot if s.config == "new"] and "grpo_longcot" in ran
  assert [r["name"] for r in records if not r["skipped"]] == ran
  grpo_dir = os.path.join(workdir, "grpo_longcot")
  assert os.path.isdir(grpo_dir) and os.path.isdir(f"{grpo_dir}.replaced-{old_fp}")
  assert os.path.exists(os.path.join(workdir, "stages", f"grpo_longcot.json.replaced-{old_fp}"))
  ran.clear()
  markov_e2e.run_all(workdir, longcot, rerun_changed=True)  # now complete: all skipped
  assert ran == []
  # A changed SFT config reruns everything downstream of it, even stages whose config did not.
  sft_changed = [
    dataclasses.replace(s, config="sft2") if "_sft" in s.command else s for s in longcot
  ]
  markov_e2e.run_all(workdir, sft_changed, rerun_changed=True)
  assert ran == [s.name for s in stages]


def test_the_signal_preset_builds_valid_configs():
  sig = common.study("signal")
  assert sig is common.SIGNAL and sig.envs == ("longcot",) and sig.rl_steps == 50
  assert sig.heldout >= 200 and sig.eval_seed == common.FULL.eval_seed
  configs = {
    "sft": markov_e2e_sft.get_config("signal"),
    "longcot": markov_e2e_longcot.get_config("signal"),
    "delethink": markov_e2e_delethink.get_config("signal"),
  }
  for kind, config in configs.items():
    run = config_lib.validate(config, num_devices=1)
    assert run.model_config.dtype == "float32", kind
    evaluate_lib.validate_rl_eval(config.rl_eval)
    assert config.rl_eval.heldout == sig.heldout and config.rl_eval.seed == sig.eval_seed
  assert configs["sft"].total_steps == sig.sft_steps
  assert tuple(configs["sft"].rl_eval.envs) == ("longcot",)
  longcot = configs["longcot"]
  assert longcot.total_steps == 50 and longcot.grpo.group_size == sig.group_size
  assert longcot.rl.budget == sig.training_budget
  assert longcot.init_from == "/tmp/markov_signal/sft/checkpoints"
  # A short task: every worked completion fits the one LongCoT budget.
  task = markov_e2e_report.task_sizes(sig)
  assert task["training_budget_holds_longest_completion"] and task["carry_holds_window"]
  assert task["completion_tokens_range"][1] <= 200
  # The runner: LongCoT stages only, `:signal` configs, results under benchmarks/results.
  stages = markov_e2e.plan("/tmp/markov_signal", "signal")
  assert [s.name for s in stages] == [
    "sft",
    "sft_eval",
    "grpo_longcot",
    "longcot_eval",
    *(f"longcot_eval_step{k}" for k in sig.intermediate_steps()),
  ]
  assert all(":signal" in s.command for s in stages)
  args = markov_e2e.parse_args(["--study=signal"])
  assert args.workdir == "/tmp/markov_signal"
  assert args.out == os.path.join(markov_e2e.RESULTS, "markov_signal.json")
  assert args.png.endswith("markov_signal.png")
  quick = markov_e2e.parse_args(["--quick", "--workdir=/tmp/q"])
  assert quick.study == "quick" and quick.out == "/tmp/q/markov_e2e.json"
  assert markov_e2e.parse_args([]).out == os.path.join(markov_e2e.RESULTS, "markov_e2e.json")
  assert [s.command for s in markov_e2e.plan("/tmp/markov_e2e", "full")][0] == (
    "python -m train.main --config=configs/markov_e2e_sft.py --workdir=/tmp/markov_e2e/sft"
  )
  with pytest.raises(ValueError, match="'signal'"):
    common.study("nope")


def test_the_signal_heldout_problems_are_never_trained_on():
  check = markov_e2e_report.heldout_check("signal")
  assert check["same_problems_in_every_config"] and check["overlap_with_training"] == 0


def test_learning_signal_is_a_two_proportion_z_test():
  by_step = {
    "longcot": {"heldout": [[0, 0.4, 0.0, 400], [25, 0.45, 0.0, 400], [50, 0.5, 0.0, 400]]}
  }
  t = markov_e2e_report.learning_signal(by_step, ("longcot",))["longcot"]
  se = math.sqrt(0.4 * 0.6 / 400 + 0.5 * 0.5 / 400)
  assert t["difference"] == pytest.approx(0.1) and t["difference_stderr"] == pytest.approx(se)
  assert t["z"] == pytest.approx(0.1 / se)  # 2.857: two-sided p = 0.00427
  assert t["p_value_two_sided"] == pytest.approx(0.00427, abs=1e-5)
  assert t["met"] and t["rl_steps"] == 50
  by_step["longcot"]["heldout"][-1][1] = 0.38
  assert not markov_e2e_report.learning_signal(by_step, ("longcot",))["longcot"]["met"]


def test_learning_signal_pairs_problems_when_the_evaluations_list_them():
  # 4 problems, 2 samples each: d = (0.5, 0.5, 0, -0.5), mean 0.125,
  # SE = sqrt(((3/8)^2 * 2 + (1/8)^2 + (5/8)^2) / 3 / 4) = sqrt(0.6875 / 12).
  step0, final = [0.0, 0.5, 1.0, 0.5], [0.5, 1.0, 1.0, 0.0]
  by_step = {"longcot": {"heldout": [[0, 0.5, 0.0, 8], [50, 0.625, 0.0, 8]]}}
  t = markov_e2e_report.learning_signal(by_step, ("longcot",), {"longcot": (step0, final)})
  t = t["longcot"]
  se = math.sqrt(0.6875 / 12)
  assert t["difference"] == pytest.approx(0.125) and t["difference_stderr"] == pytest.approx(se)
  assert t["z"] == pytest.approx(0.125 / se)
  assert t["p_value_two_sided"] == pytest.approx(math.erfc(0.125 / se / math.sqrt(2)))
  assert (t["problems"], t["problems_up"], t["problems_down"]) == (4, 2, 1)
  assert "paired" in t["target"] and not t["met"]  # z = 0.52
  assert t["two_proportion"]["difference"] == pytest.approx(0.125)
  with pytest.raises(ValueError, match="4 vs 3 problems"):
    markov_e2e_report.paired_test(step0, final[:3])


def _eval_json(path, accuracy, problem_accuracy, budget):
  point = {"budget": budget, "accuracy": accuracy, "count": len(problem_accuracy)}
  point["problem_accuracy"] = problem_accuracy
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"longcot": {"curve": [point]}}, f)


def test_the_sampled_signal_preset_adds_greedy_evaluations_and_their_paired_test(tmp_path):
  t1 = common.study("signal_t1")
  assert t1.eval_temperature == 1.0 and t1.eval_samples > 1 and t1.rl_steps == 50
  assert t1.eval_seed not in (common.SIGNAL.eval_seed, common.SIGNAL.eval_seed + 1)
  for get_config in (markov_e2e_sft.get_config, markov_e2e_longcot.get_config):
    config = get_config("signal_t1")
    evaluate_lib.validate_rl_eval(config.rl_eval)
    assert config.rl_eval.num_samples == t1.eval_samples and config.rl_eval.temperature == 1.0
  check = markov_e2e_report.heldout_check("signal_t1")
  assert check["same_problems_in_every_config"] and check["overlap_with_training"] == 0
  stages = {s.name: s for s in markov_e2e.plan(str(tmp_path), "signal_t1")}
  greedy = ("--config.rl_eval.temperature=0.0", "--config.rl_eval.num_samples=1")
  budget = f"--config.rl_eval.longcot_budgets=({t1.training_budget},)"
  for name, run_dir in (("sft_eval_greedy", "sft"), ("longcot_eval_greedy", "grpo_longcot")):
    argv = stages[name].argv
    assert argv[0] == "train.evaluate" and f"--workdir={tmp_path / run_dir}" in argv
    assert set(greedy) | {budget, "--output=eval_greedy.json"} <= set(argv)
  assert "sft_eval_greedy" not in {s.name for s in markov_e2e.plan(str(tmp_path), "signal")}
  # The report's greedy comparison reads those files.
  b = t1.training_budget
  _eval_json(tmp_path / "sft" / "eval_greedy.json", 0.25, [0.0, 0.0, 1.0, 0.0], b)
  _eval_json(tmp_path / "grpo_longcot" / "eval_greedy.json", 0.75, [1.0, 1.0, 1.0, 0.0], b)
  g = markov_e2e_report.greedy_check(str(tmp_path), t1)["longcot"]
  assert (g["step0_accuracy"], g["rl_accuracy"], g["rl_steps"]) == (0.25, 0.75, 50)
  assert g["difference"] == pytest.approx(0.5) and g["problems_up"] == 2
  assert g["difference_stderr"] == pytest.approx(math.sqrt(1 / 3 / 4))  # d = (1, 1, 0, 0)
  assert markov_e2e_report.greedy_check(str(tmp_path), common.SIGNAL) is None


# ----------------------------------------------------------------------------- grpo_overfit


def test_grpo_overfit_trains_each_pool_from_the_studys_sft_and_reports_it(quick):
  workdir = quick[0]
  out_dir = workdir / "overfit"
  out = run_benchmark(
    "grpo_overfit",
    "--study=quick",
    f"--study_workdir={workdir}",
    f"--workdir={out_dir}",
    "--pools=1,3",
    "--steps=2",
    "--window=1",
  )
  with open(out_dir / "markov_e2e_overfit.json") as f:  # --quick writes under its workdir
    r = json.load(f)
  s = common.QUICK
  assert [run["pool"] for run in r["runs"]] == [1, 3]
  for run in r["runs"]:
    assert len(run["reward_by_step"]) == 2 and all(0 <= x <= 1 for x in run["reward_by_step"])
    assert run["reward_change"] == run["reward_by_step"][1] - run["reward_by_step"][0]
    assert run["visits_per_problem"] == 2 * s.prompts_per_step / run["pool"]
    assert run["heldout"]["n"] == s.heldout and 0 <= run["heldout"]["accuracy"] <= 1
    # The run cycled through its pool: its checkpointed problem stream says so.
    with open(out_dir / f"pool{run['pool']}" / "checkpoints" / "2" / "data" / "metadata") as f:
      (stream,) = json.load(f)["states"]
    assert stream["problems"]["pool"] == run["pool"]
    assert stream["problems"]["consumed"] == 2 * s.prompts_per_step
  fresh = r["fresh_problems"]  # the quick study's own GRPO run on fresh problems
  assert fresh["pool"] is None and len(fresh["reward_by_step"]) == s.rl_steps
  assert r["sft_heldout"]["n"] == s.heldout and r["settings"]["prompts_per_step"] == 2
  assert (out_dir / "markov_e2e_overfit.png").exists() == (r["png"] is not None)
  assert "pool 1: training reward" in out


@pytest.mark.parametrize(
  "argv,message",
  [
    (["--pools=0"], "--pools=(0,)"),
    (["--pools=a"], "--pools='a'"),
    (["--steps=1"], "--steps=1"),
    (["--study_workdir=/no/such/dir"], "no finished SFT stage there"),
  ],
)
def test_grpo_overfit_rejects_bad_arguments(argv, message, capsys):
  with pytest.raises(SystemExit):
    grpo_overfit.parse_args(["--study_workdir=/no/such/dir", *argv])
  assert message in capsys.readouterr().err
