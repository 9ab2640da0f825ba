"""Fast tests of the benchmark suite: tiny configurations only."""

import io
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

import benchmarks
import optax_mtl
from benchmarks import __main__ as cli
from benchmarks import costs
from benchmarks import data as data_lib
from benchmarks import problems
from benchmarks import publish
from benchmarks import report
from benchmarks import runner
from benchmarks import speed
from benchmarks import strategies as strategies_lib
from benchmarks.problems import _auc
from benchmarks.problems import toy2d

ROOT = pathlib.Path(__file__).parents[1]
FIXTURES = str(ROOT / "tests" / "fixtures")
TINY = {
    "scales": dict(num_tasks=3, input_dim=8, output_dim=4, hidden=8, depth=2,
                   num_train=64, num_test=32, batch_size=16),
    "digits": dict(num_train=128, num_test=64, hidden=16, depth=1,
                   batch_size=16),
    "manytask": dict(num_tasks=6, num_factors=4, input_dim=8, hidden=8,
                     depth=1, num_train=256, num_test=256, batch_size=32),
}


# One loss-only and one Gramian strategy on one problem, one each elsewhere
# (every strategy costs a compilation).
TINY_STRATEGIES = {"scales": ["equal", "normalized_gradients"],
                   "digits": ["equal"], "manytask": ["normalized_gradients"]}
TINY_STEPS = 20


@pytest.fixture(scope="module")
def tiny_results():
  out = {}
  for name, overrides in TINY.items():
    problem = problems.make(name, **overrides)
    out[name] = runner.run_problem(problem, TINY_STRATEGIES[name], seeds=2,
                                   num_steps=TINY_STEPS, eval_every=4,
                                   patience=2)
  toy = problems.make("toy2d", grid_size=41)
  out["toy2d"] = runner.run_problem(toy, ["equal"], num_steps=20)
  return out


@pytest.mark.parametrize("name", sorted(TINY))
def test_problem_builds_and_trains(name, tiny_results):
  result = tiny_results[name]
  problem = problems.make(name, **TINY[name])
  t = problem.num_tasks
  assert result["tasks"] == list(problem.task_names)
  assert result["curve_steps"] == [4, 8, 12, 16, 20]
  stl = result["single_task"]
  assert len(stl["per_task"][problem.metric_names[0]]["mean"]) == t
  assert np.asarray(stl["selection"]["best_step"]).shape == (t, 2)
  for strategy in TINY_STRATEGIES[name]:
    entry = result["strategies"][strategy]
    assert np.asarray(entry["weights"]).shape == (5, t)
    assert np.all(np.isfinite(entry["final_train_losses"]))
    assert 0 <= entry["negative_transfer"] <= t
    assert np.isfinite(entry["delta_m"]["mean"])
    assert len(entry["delta_m"]["per_seed"]) == 2
    assert entry["step_ms"] > 0 and entry["gramian"] == (
        strategy == "normalized_gradients")
    best = np.asarray(entry["selection"]["best_step"])
    run = np.asarray(entry["selection"]["steps_run"])
    assert np.all((best % 4 == 0) & (best <= run) & (run <= TINY_STEPS))
  if "equal" in result["strategies"]:  # weight 1 on every task throughout
    weights = np.asarray(result["strategies"]["equal"]["weights"], float)
    assert np.isfinite(weights[0]).all()  # NaN only after every seed stopped
    np.testing.assert_array_equal(weights[np.isfinite(weights)], 1.0)
  assert sorted(result["ranking"]) == sorted(TINY_STRATEGIES[name])


def test_training_lowers_the_loss():
  problem = problems.make("scales", **TINY["scales"])
  out = runner.train_multitask(problem, strategies_lib.make("equal", 3), [0],
                               num_steps=200, eval_every=20, patience=100)
  assert out["losses"].shape == (1, 10, 3)
  assert out["steps_run"].tolist() == [200]  # patience 100: no early stop
  assert out["losses"][0, -1].mean() < out["losses"][0, 0].mean()
  assert out["num_skipped"].tolist() == [0]


def test_single_task_models_train_only_their_task():
  problem = problems.make("scales", **TINY["scales"])
  out = runner.train_single_task(problem, [0], num_steps=40, eval_every=5,
                                 patience=100)
  assert jax.tree.leaves(out["params"])[0].shape[:2] == (3, 1)
  # Model 0 learns task 0 better than model 1 does, and vice versa.
  final = out["losses"][:, 0, -1]  # [model, task]
  assert final[0, 0] < final[1, 0]
  assert final[1, 1] < final[0, 1]
  # Model t's weights are the one-hot vector of task t.
  np.testing.assert_array_equal(out["weights"][:, 0, -1], np.eye(3))


def _criterion(problem, params, validation, initial):
  losses = np.asarray(problem.loss_fn(params, validation))
  return float(np.mean(losses / initial))


def test_selection_keeps_the_best_validation_checkpoint():
  problem = problems.make("scales", **TINY["scales"])
  seeds = [0, 1]
  out = runner.train_multitask(problem, strategies_lib.make("equal", 3),
                               seeds, num_steps=200, eval_every=5,
                               patience=3)
  _, validation = runner.split_validation(problem, 0.2)
  initial_params, _ = runner.initial_params_and_batches(problem, seeds, 1, 1)
  for seed in range(len(seeds)):
    initial = np.abs(np.asarray(problem.loss_fn(
        jax.tree.map(lambda a, i=seed: a[i], initial_params), validation)))
    curve = out["criterion"][seed]
    evaluated = curve[np.isfinite(curve)]
    best_step, steps_run = out["best_step"][seed], out["steps_run"][seed]
    assert len(evaluated) == steps_run // 5
    # The returned params are the checkpoint of the best evaluation.
    selected = jax.tree.map(lambda a, i=seed: a[i], out["params"])
    value = _criterion(problem, selected, validation, initial)
    if best_step == 0:
      assert value == pytest.approx(1.0, rel=1e-5)
    else:
      assert value == pytest.approx(curve[best_step // 5 - 1], rel=1e-4)
      assert value == pytest.approx(evaluated.min(), rel=1e-4)
    if out["stopped_early"][seed]:  # patience evaluations without a gain
      assert steps_run - best_step == 3 * 5
    else:
      assert steps_run == 200
  # The loop stops early once the validation loss stops improving.
  assert out["stopped_early"].any()


def test_a_sampling_strategy_reads_the_next_steps_minibatches():
  # MoDo and SDMGrad read three minibatches a step: the step's own and the
  # next two steps' ones, wrapping around at the end of the budget.
  train = {"x": jnp.arange(10.0)[:, None] * jnp.ones((1, 2))}
  indices = jnp.array([[0, 1], [2, 3], [4, 5], [6, 7]])
  minibatch = runner._minibatch  # pylint: disable=protected-access
  np.testing.assert_array_equal(minibatch(train, indices, 1, 1)["x"][:, 0],
                                [2.0, 3.0])
  three = minibatch(train, indices, 3, 3)
  assert three["x"].shape == (3, 2, 2)
  np.testing.assert_array_equal(three["x"][:, :, 0],
                                [[6.0, 7.0], [0.0, 1.0], [2.0, 3.0]])
  sdmgrad = strategies_lib.make("sdmgrad", 3)
  assert optax_mtl.weighting_of(sdmgrad).num_samples == 3


def test_split_validation_holds_out_the_last_rows():
  problem = problems.make("scales", **TINY["scales"])
  train, validation = runner.split_validation(problem, 0.25)
  np.testing.assert_array_equal(validation[0], problem.train_data[0][48:])
  np.testing.assert_array_equal(train[1], problem.train_data[1][:48])
  with pytest.raises(ValueError, match="validation_fraction"):
    runner.split_validation(problem, 0.0)


def test_late_gain():
  nan = np.nan
  criterion = np.array([
      # Budget used, still falling: the last fifth (0.3 -> 0.2) brought
      # 0.1 of the whole reduction 1 -> 0.2.
      [1.0, 0.5, 0.4, 0.3, 0.2],
      [1.0, 0.5, 0.4, 0.4, 0.41],   # budget used, flat at the end
      [1.0, 0.5, 0.4, nan, nan],    # stopped early
      [1.0, 1.2, 1.1, 1.3, 1.5],    # never improved
  ])
  gain = runner.late_gain(criterion,
                          np.array([False, False, True, False]))
  np.testing.assert_allclose(gain, [0.1 / 0.8, 0.0, 0.0, 0.0])


def test_run_problem_reports_unconverged_baselines():
  problem = problems.make("scales", **TINY["scales"])
  # 10 steps: the single-task model of the smallest-scale task still
  # improves fast when the budget runs out.
  result = runner.run_problem(problem, ["equal"], seeds=1, num_steps=10,
                              eval_every=1, patience=50)
  still_improving = result["single_task"]["still_improving"]
  assert "sigma=1" in still_improving
  assert all(gain > runner.STILL_IMPROVING
             for gain in still_improving.values())
  text = "\n".join(report.findings_markdown({"scales": result}))
  assert "Single-task baselines still improving" in text
  assert f"sigma=1 ({still_improving['sigma=1']:.0%})" in text


def test_toy2d_definition_and_pareto():
  # Hand-computed values of the CAGrad toy at (0, 0): c1 = c2 = 0.
  np.testing.assert_allclose(toy2d.objectives(jnp.zeros(2), 1.0), [0.0, 0.0])
  # At x = (7, -8) the quadratic part: h1 = -20, h2 = (196)/10 - 20.
  x = jnp.array([7.0, -8.0])
  c2 = np.tanh(4.0)
  np.testing.assert_allclose(toy2d.objectives(x, 1.0),
                             [-20 * c2, (19.6 - 20) * c2], rtol=1e-5)
  np.testing.assert_allclose(toy2d.objectives(x, 0.1)[0], -2 * c2,
                             rtol=1e-5)
  front_x, front_values, tolerance = toy2d.pareto_reference(0.1, 101)
  # The Pareto set lies near x2 = -8.36 for x1 in [-7, 7].
  assert np.all(np.abs(front_x[:, 1] + 8.36) < 0.5)
  assert front_x[:, 0].min() < -6 and front_x[:, 0].max() > 6
  assert toy2d.reaches_pareto(front_values[:3], front_values,
                              tolerance).all()
  far = np.asarray(toy2d.objectives(jnp.array([[9.0, 9.0]]), 0.1))
  assert not toy2d.reaches_pareto(far, front_values, tolerance).any()
  # The training losses are the objectives shifted to be positive.
  points = jnp.array([[0.0, 0.0], [9.0, 9.0], [-7.0, -8.4], [7.0, -9.9]])
  shifted = np.asarray(toy2d.training_losses(points, 0.1))
  assert (shifted > 0).all()
  np.testing.assert_allclose(
      shifted - np.asarray(toy2d.objectives(points, 0.1)),
      np.broadcast_to([2.1, 21.0], shifted.shape), rtol=1e-5)


def test_toy2d_run(tiny_results):
  entry = tiny_results["toy2d"]["strategies"]["equal"]
  assert len(entry["reached"]) == len(toy2d.STARTS)
  assert np.asarray(entry["trajectories"]).shape[:2] == (5, 20)


def test_confidence_interval_and_ties():
  # Hand computation: mean 2, sd 1, t(0.975, 2 dof) = 4.302653.
  mean, low, high = report.confidence_interval([1.0, 2.0, 3.0])
  half = 4.302653 / np.sqrt(3)
  assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half),
                                            rel=1e-6)
  assert report.confidence_interval([5.0]) == (5.0, 5.0, 5.0)

  def entry(per_seed):
    return {"delta_m": {"mean": float(np.mean(per_seed)),
                        "per_seed": per_seed}}

  result = {"ranking": ["a", "b", "c"], "strategies": {
      "a": entry([10.0, 12.0, 11.0]),
      # Paired differences 1, 1.1, 0.9: small spread, clearly behind.
      "b": entry([9.0, 10.9, 10.1]),
      # Differences 5, -4, 1: the interval contains 0, a tie.
      "c": entry([5.0, 16.0, 10.0])}}
  assert report.ties_with_best(result) == ("a", ["c"])


def _finding_result(**overrides):
  """A synthetic two-task result for the generated findings."""
  entry = {
      "delta_m": {"mean": 5.0, "std": 1.0, "per_seed": [4.0, 5.0, 6.0]},
      "mean_score": {"mean": 0.9, "std": 0.0},
      "negative_transfer": 0, "skipped_steps": [0, 0, 0],
      "weight_max": [1.0, 1.0], "nonfinite_weight_steps": [0, 0, 0],
      "selection": {"steps_run": [100, 100, 100], "best_step": [90, 90, 90]},
      "step_ms": 1.0}
  equal = dict(entry, delta_m={"mean": -20.0, "std": 1.0,
                               "per_seed": [-21.0, -20.0, -19.0]},
               negative_transfer=2, mean_score={"mean": 0.5, "std": 0.0})
  log_loss = dict(entry, delta_m={"mean": -40.0, "std": 1.0,
                                  "per_seed": [-41.0, -40.0, -39.0]},
                  skipped_steps=[30, 40, 50], weight_max=[7.5e37, 2.0],
                  mean_score={"mean": 0.3, "std": 0.0})
  result = {"problem": "p", "tasks": ["a", "b"], "metrics": ["score"],
            "higher_is_better": [True], "ranking": ["loss_ema", "equal",
                                                    "log_loss"],
            "strategies": {"loss_ema": entry, "equal": equal,
                           "log_loss": log_loss},
            "single_task": {"still_improving": {}}}
  result.update(overrides)
  return result


def test_findings_name_best_interval_skips_and_overflow():
  text = "\n".join(report.findings_markdown({"p": _finding_result()}))
  half = 4.302653 / np.sqrt(3)
  assert (f"**Best by Δm%: `loss_ema`**, Δm% +5.0 (95% CI {5 - half:+.1f} to "
          f"{5 + half:+.1f}) over 3 seeds") in text
  assert "ahead of every other strategy beyond seed noise" in text
  assert "`loss_ema` gains +25.0" in text
  assert "No task worse than single-task" in text and "`loss_ema`" in text
  assert "`log_loss` rejected 40 of 100 steps" in text
  assert "reached 7.5e+37" in text and "w_k = 1/L_k" in text
  assert "Every single-task baseline converged" in text
  assert "`equal` rejected" not in text


def test_report_writes_json_markdown_png(tiny_results, tmp_path):
  speed_result = speed.run_speed_models(
      ["equal", "normalized_gradients"], models=("mlp", "conv"),
      num_tasks=[2],
      config=dict(input_dim=4, hidden=8, depth=1, batch_size=4, rounds=1,
                  target_seconds=0.001, side=8, channels=(2,)))
  paths = report.write_report(tiny_results, str(tmp_path),
                              speed=speed_result,
                              meta={"command": "test", "wall_seconds": 1.0})
  with open(paths["json"]) as f:
    loaded = json.load(f)
  assert set(loaded["problems"]) == set(tiny_results)
  assert set(loaded["speed"]) == {"mlp", "conv"}
  text = open(paths["markdown"]).read()
  assert text.index("## What this run says") < text.index("## Protocol")
  for name in tiny_results:
    assert f"## {name}" in text
  assert "## Speed and memory" in text
  assert "### mlp trunk" in text and "### conv trunk" in text
  # Three problems × (cost, outcomes, weights), the toy, speed.
  names = sorted(pathlib.Path(p).name for p in paths["plots"])
  assert names == sorted(
      [f"{p}_{kind}.png" for p in TINY for kind in ("cost", "outcomes",
                                                    "weights")]
      + ["toy2d_trajectories.png", "speed.png"])
  for plot in paths["plots"]:
    with open(plot, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"]({pathlib.Path(plot).name})" in text
  for model in ("mlp", "conv"):
    entry = speed_result[model]["strategies"]["normalized_gradients"]["2"]
    assert entry["kind"] == "gramian" and entry["ratio_jacobian"] > 0
    assert entry["ratio_plain"] > 0 and entry["step_ms"] > 0
    assert entry["slowest_step_ms"] > 0 and entry["memory_bytes"] > 0
    assert speed_result[model]["strategies"]["equal"]["2"]["ratio_plain"] > 0
    assert speed_result[model]["options"] == {}  # upgrad was not run
  # The speed table gives every strategy's absolute time and ÷ plain.
  row = next(line for line in text.splitlines()
             if line.startswith("| normalized_gradients | gramian |"))
  assert len(row.split("|")) == 2 + 2 + 4
  # Publishing: RESULTS.md with the requirement summary, plots alongside.
  published = tmp_path / "published"
  published.mkdir()
  results_md = publish.publish(str(tmp_path), destination=published)
  text = results_md.read_text()
  assert "## Requirements at a glance" in text
  assert "**mlp trunk**" in text and "**conv trunk**" in text
  assert text.count("/1 strategies within 1.05") == 2  # equal, per model
  assert text.count("/1 within 1.10") == 2  # normalized_gradients
  assert text.count("Gramian strategies ÷ a plain training step") == 2
  # A further speed-only folder adds its own summary under its command.
  text = publish.publish(str(tmp_path), destination=published,
                         speed_dirs=(str(tmp_path),)).read_text()
  assert ("## Further speed runs\n\n### `test` (mlp trunk, minibatch 4, ?)\n\n"
          "Computed from") in text
  assert text.count("/1 strategies within 1.05") == 4
  worst_line = next(line for line in text.splitlines()
                    if line.startswith("- Worst loss-only strategy"))
  assert worst_line.count("(equal, mlp, T=2)") == 2
  assert worst_line.count("(equal, conv, T=2)") == 2
  assert "## Speed and memory" in text and "](results/speed.png)" in text
  assert (published / "results" / "speed.png").exists()
  # A part below KEEP_MARKER survives republishing.
  results_md.write_text(results_md.read_text() + f"\n{publish.KEEP_MARKER}"
                        "\n\n## Hand-made run\n")
  text = publish.publish(str(tmp_path), destination=published).read_text()
  assert text.count(publish.KEEP_MARKER) == 1
  assert text.endswith(f"{publish.KEEP_MARKER}\n\n## Hand-made run\n")
  assert "## Requirements at a glance" in text
  # The README's generated section is replaced, the rest kept.
  readme = tmp_path / "README.md"
  readme.write_text(f"# x\n\nbefore\n{publish.README_BEGIN}\nstale 1.0\n"
                    f"{publish.README_END}\nafter\n")
  publish.publish(str(tmp_path), destination=published, readme=readme)
  text = readme.read_text()
  assert text.startswith("# x\n\nbefore\n") and text.endswith("\nafter\n")
  assert "stale" not in text and text.count(publish.README_BEGIN) == 1
  for name in TINY:
    assert f"- **`{name}`**" in text


def test_speed_times_consecutive_top_level_steps_over_whole_cycles():
  # A step that counts its calls in its state and moves the params by the
  # minibatch it got: the harness must carry both from step to step (a
  # training trajectory, not one step from the same state) and compile
  # each step on its own, without a loop around it.
  def step(params, state, batch):
    return batch, -jnp.ones_like(params), state + 1

  batches = jnp.arange(4.0)[:, None] * jnp.ones((4, 2))
  trajectories = speed._prepare(
      {"plain": (step, jnp.int32(0)), "again": (step, jnp.int32(0))},
      learning_rate=0.5, params=jnp.zeros(2), batches=batches,
      target_seconds=0.0)
  rounds = speed._interleaved_rounds(trajectories, rounds=2)
  steps = speed.RECOMPUTE_EVERY + 1 + 2 * speed.RECOMPUTE_EVERY
  for trajectory in trajectories.values():
    assert trajectory.cycles == 1 and trajectory.index == steps
    assert int(trajectory.state) == steps
    np.testing.assert_allclose(trajectory.params, 0.5 * steps)
    assert "while" not in trajectory.compiled.as_text()
  assert rounds.mean["plain"].shape == (2,)
  assert rounds.by_position["plain"].shape == (speed.RECOMPUTE_EVERY,)
  assert np.all(np.isfinite(rounds.by_position["plain"]))
  timing = speed._timing(rounds, "again")
  assert timing["slowest_step_ms"] >= timing["step_ms"] > 0


@pytest.mark.slow
def test_speed_times_engine_options_on_a_conv_trunk():
  result = speed.run_speed(
      ["upgrad"], num_tasks=[2], model="conv",
      config=dict(batch_size=4, rounds=1, target_seconds=0.001, side=8,
                  channels=(2,), hidden=4))
  assert result["model"] == "conv"
  assert sorted(result["options"]) == sorted(speed.options("upgrad"))
  for entry in result["options"].values():
    assert entry["2"]["ratio_plain"] > 0 and entry["2"]["ratio_base"] > 0
    assert entry["2"]["memory_bytes"] > 0
    assert entry["2"]["slowest_step_ms"] > 0
  params, loss_fn, batches, encoder_fn, head_loss_fn = speed.make_model(
      3, speed.model_config("conv", dict(side=8, channels=(2, 4), hidden=5)))
  batch = jax.tree.map(lambda b: b[0], batches)
  assert params["trunk"]["conv"][1]["w"].shape == (3, 3, 2, 4)
  assert encoder_fn(params, batch).shape == (64, 5)
  np.testing.assert_allclose(
      loss_fn(params, batch),
      head_loss_fn(params, encoder_fn(params, batch), batch))
  with pytest.raises(ValueError, match="unknown speed model"):
    speed.model_config("transformer")


def test_cli_parsing():
  args = cli.parse_args([])
  assert args.suite == "quick" and args.seeds == [0, 1]
  assert args.problems == ["scales", "digits", "manytask", "toy2d"]
  assert args.out == "bench_results"
  assert args.strategies == list(strategies_lib.STRATEGIES)
  assert args.speed_models == ["mlp"] and args.speed_tasks == [10]
  args = cli.parse_args(["--suite", "full"])
  assert args.speed_models == ["mlp", "conv"] and args.speed_tasks is None
  args = cli.parse_args(["--suite", "full", "--problem", "digits",
                         "--problem", "toy2d", "--strategies", "equal, mgda",
                         "--seeds", "0,4,7", "--out", "x",
                         "--speed-models", "conv"])
  assert args.problems == ["digits", "toy2d"] and args.seeds == [0, 4, 7]
  assert args.strategies == ["equal", "mgda"] and args.out == "x"
  assert args.speed_models == ["conv"]
  assert cli.parse_args(["--seeds", "2"]).seeds == [0, 1]
  assert cli.parse_args(["--suite", "full"]).seeds == [0, 1, 2, 3, 4]
  assert cli.parse_args(["--suite", "paper"]).speed_models == ["mlp", "conv"]
  args = cli.parse_args(["--data-dir", FIXTURES])
  assert args.problems[-1] == "pcba"  # pcba.csv present, no CelebA images
  assert cli.parse_args(["--speed-only"]).problems == []
  assert cli.parse_args([]).speed_batch is None
  assert cli.parse_args(["--speed-batch", "1024"]).speed_batch == 1024
  for bad in (["--speed-batch", "0"], ["--speed-only", "--no-speed"],
              ["--problem", "nope"], ["--seeds", "0"],
              ["--strategies", "equal,no_such_strategy"],
              ["--speed-models", "mlp,transformer"]):
    with pytest.raises(SystemExit):
      cli.parse_args(bad)


def test_unknown_strategy_or_keyword_raises():
  with pytest.raises(ValueError, match="no_such_strategy"):
    strategies_lib.resolve(["equal", "no_such_strategy"])
  with pytest.raises(ValueError, match="no_such_strategy"):
    runner.run_problem("toy2d", ["no_such_strategy"], num_steps=2)
  with pytest.raises(TypeError, match="no_such_argument"):
    strategies_lib.make("loss_ema", 2, no_such_argument=1.0)
  with pytest.raises(TypeError, match="no_such_setting"):
    runner.run_problem(problems.make("scales", **TINY["scales"]), ["equal"],
                       num_steps=2, no_such_setting=1)
  assert strategies_lib.resolve(None) == list(strategies_lib.STRATEGIES)
  assert strategies_lib.BASELINE in strategies_lib.STRATEGIES


# What the README documents for each strategy (loss-only or Gramian).
LOSS_ONLY = {"equal", "loss_ema", "rema", "dwema", "dwa", "lbtw", "initial_loss",
             "log_loss", "geometric_mean", "uncertainty", "rlw", "imtl_l",
             "stch", "famo", "cosmos", "pbi", "constant"}


@pytest.mark.parametrize("name", sorted(strategies_lib.STRATEGIES))
def test_every_table_entry_builds(name):
  strategy = strategies_lib.make(name, 3)
  assert strategies_lib.reads_task_gradients(strategy) == (name not in LOSS_ONLY)
  assert optax_mtl.weighting_of(strategy).num_tasks == 3


def test_wheel_ships_optax_mtl_only():
  config = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert config["tool"]["setuptools"]["packages"]["find"]["include"] == [
      "optax_mtl*"]
  assert "scripts" not in config["project"]
  runtime = [re.split(r"[<>=\[ ;]", d)[0]
             for d in config["project"]["dependencies"]]
  assert "flax" not in runtime
  extras = config["project"]["optional-dependencies"]
  for extra in ("nnx", "dev"):
    assert any(d.startswith("flax") for d in extras[extra]), extra
  # Only the Flax NNX face imports flax; `import optax_mtl` does not.
  importers = sorted(
      str(path.relative_to(ROOT)) for path in (ROOT / "optax_mtl").rglob(
          "*.py")
      if re.search(r"^\s*(import|from)\s+flax\b", path.read_text(),
                   re.MULTILINE))
  assert set(importers) <= {"optax_mtl/nnx.py", "optax_mtl/_src/nnx.py"}
  check = subprocess.run(
      [sys.executable, "-c",
       "import sys, optax_mtl, optax_mtl.metrics; "
       "print(sorted(m for m in sys.modules if m.split('.')[0] in "
       "('flax', 'benchmarks')))"],
      capture_output=True, text=True, check=True, cwd=ROOT / "tests")
  assert check.stdout.strip() == "[]"


@pytest.mark.parametrize("seed", range(8))
def test_auc_matches_sklearn(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(5, 300))
  labels = rng.random(n) < rng.uniform(0.05, 0.6)
  labels[0], labels[1] = True, False
  # Rounded scores make many ties.
  scores = np.round(rng.normal(size=n) + labels * rng.uniform(0, 2),
                    int(rng.integers(0, 3)))
  assert _auc.roc_auc(labels, scores) == pytest.approx(
      sk_metrics.roc_auc_score(labels, scores), abs=1e-12)
  assert _auc.average_precision(labels, scores) == pytest.approx(
      sk_metrics.average_precision_score(labels, scores), abs=1e-12)


def test_auc_mask_and_degenerate():
  labels = np.array([1, 0, 1, 0, 1])
  scores = np.array([0.9, 0.1, 0.2, 0.8, 0.7])
  mask = np.array([True, True, True, False, False])
  assert _auc.roc_auc(labels, scores, mask) == pytest.approx(
      sk_metrics.roc_auc_score(labels[mask], scores[mask]))
  assert _auc.average_precision(labels, scores, mask) == pytest.approx(
      sk_metrics.average_precision_score(labels[mask], scores[mask]))
  assert np.isnan(_auc.roc_auc([1, 1], [0.1, 0.2]))
  assert np.isnan(_auc.average_precision([0, 0], [0.1, 0.2]))
  # Hand-computed: pairs (pos, neg) = (0.35 > 0.1), (0.35 < 0.4),
  # (0.8 > 0.1), (0.8 > 0.4) -> 3/4.
  assert _auc.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75


def test_celeba_loader_on_fixture():
  path = os.path.join(FIXTURES, "list_attr_celeba.txt")
  filenames, names, labels = data_lib.load_celeba_attributes(path)
  assert len(names) == 40 and names[0] == "5_o_Clock_Shadow"
  assert names[-1] == "Young"
  assert filenames[0] == "000001.jpg" and len(filenames) == 6
  assert labels.shape == (6, 40) and set(np.unique(labels)) <= {0, 1}
  raw = open(path).read().splitlines()[2].split()
  np.testing.assert_array_equal(labels[0],
                                (np.array(raw[1:], int) > 0).astype(int))


def test_celeba_problem_with_images(tmp_path):
  from PIL import Image
  lines = open(os.path.join(FIXTURES, "list_attr_celeba.txt")).read()
  (tmp_path / "list_attr_celeba.txt").write_text(lines)
  image_dir = tmp_path / "img_align_celeba"
  image_dir.mkdir()
  rng = np.random.default_rng(0)
  for i in range(6):
    Image.fromarray(rng.integers(0, 255, (20, 18, 3), dtype=np.uint8)).save(
        image_dir / f"{i + 1:06d}.jpg")
  problem = problems.make("celeba", data_dir=str(tmp_path), side=4,
                          hidden=4, depth=1, batch_size=4)
  assert problem.num_tasks == 40
  losses = problem.loss_fn(problem.init_params(jax.random.key(0)),
                           jax.tree.map(lambda a: a[:4], problem.train_data))
  assert losses.shape == (40,) and np.all(np.isfinite(losses))


def test_pcba_loader_and_problem_on_fixture():
  path = os.path.join(FIXTURES, "pcba.csv")
  smiles, tasks, labels, mask = data_lib.load_multilabel_csv(path)
  assert tasks == ["PCBA-1030", "PCBA-1379", "PCBA-1452", "PCBA-1454"]
  assert smiles[0] == "CC(=O)Oc1ccccc1C(=O)O" and len(smiles) == 8
  np.testing.assert_array_equal(mask[0], [True, False, True, True])
  np.testing.assert_array_equal(labels[0], [0, 0, 1, 0])
  assert mask.sum() == 32 - 7
  features = data_lib.smiles_ngram_features(smiles, 32)
  assert features.shape == (8, 32) and np.all(features >= 0)
  # "CCO": n-grams C, C, O, CC, CO, CCO -> 6 counts in total.
  counts = np.expm1(data_lib.smiles_ngram_features(["CCO"], 4096))
  assert counts.sum() == pytest.approx(6.0)
  problem = problems.make("pcba", data_dir=FIXTURES, num_buckets=16,
                          hidden=4, depth=1, batch_size=4)
  params = problem.init_params(jax.random.key(0))
  batch = jax.tree.map(lambda a: a[:6], problem.train_data)
  losses = problem.loss_fn(params, batch)
  assert losses.shape == (4,) and np.all(np.isfinite(losses))
  # A missing label does not enter the loss: changing it changes nothing.
  x, y, m = batch
  changed = problem.loss_fn(params, (x, jnp.where(m, y, 1.0 - y), m))
  np.testing.assert_allclose(losses, changed)


def test_run_problem_by_name_is_notebook_friendly():
  result = benchmarks.run_problem("toy2d", ["equal"], num_steps=3)
  assert result["problem"] == "toy2d" and "equal" in result["strategies"]


# --------------------------------------------------------------------------
# One compiled program per kind of strategy; the run's plan and progress.


def test_a_shared_program_trains_each_strategy_as_its_own_program():
  problem = problems.make("scales", **TINY["scales"])
  names = ["equal", "loss_ema", "normalized_gradients"]
  built = [strategies_lib.make(n, problem.num_tasks) for n in names]
  shared = runner.prepare_multitask(problem, built, [0, 1], num_steps=12,
                                    eval_every=4)
  ((compiled, seconds),) = runner.compile_jobs([shared])
  for index, strategy in enumerate(built):
    alone = runner.train_multitask(problem, strategy, [0, 1], num_steps=12,
                                   eval_every=4)
    together = runner.execute(shared, compiled, seconds, index=index)
    for key in ("weights", "losses", "criterion", "best_step"):
      np.testing.assert_allclose(together[key], alone[key], rtol=1e-5,
                                 atol=1e-6, err_msg=f"{names[index]} {key}")


def test_plan_groups_one_program_per_kind():
  kinds = {"equal": "losses", "loss_ema": "losses", "upgrad": "gramian",
           "mgda": "gramian", "cagrad": "gramian", "modo": "samples"}
  groups = runner.plan_groups(kinds, num_threads=2)
  assert groups == [("losses", ["equal", "loss_ema"]),
                    ("gramian", ["upgrad", "cagrad"]), ("gramian", ["mgda"]),
                    ("samples", ["modo"])]
  assert runner.plan_groups(kinds, num_threads=1)[1] == (
      "gramian", ["upgrad", "mgda", "cagrad"])
  assert runner.kind_of(strategies_lib.make("upgrad", 3)) == "gramian"
  assert runner.kind_of(strategies_lib.make("loss_ema", 3)) == "losses"
  assert runner.kind_of(strategies_lib.make("modo", 3)) == "samples"


def test_plan_expected_time_is_the_sum_of_stored_unit_costs(tmp_path):
  args = cli.parse_args(["--problem", "scales", "--problem", "toy2d",
                         "--strategies", "equal,upgrad", "--no-speed"])
  table = {"note": "test", "suites": {"quick": {
      "scales": {"compile:single-task": 4.0, "compile:losses": 2.0,
                 "compile:gramian": 3.0, "single-task": 5.0,
                 "run:losses": 1.0, "run:gramian": 7.0},
      "toy2d": {"compile:losses": 1.0, "run:losses": 0.5,
                "run:gramian": 0.5}}}}
  plan = costs.plan(args, table)
  assert plan.units == [
      "scales/compile single-task (1)", "scales/compile losses (1)",
      "scales/compile gramian (1)", "scales/single-task", "scales/equal",
      "scales/upgrad", "toy2d/compile losses (1)",
      "toy2d/compile gramian (1)", "toy2d/equal", "toy2d/upgrad"]
  # toy2d has no stored compile:gramian: the mean over the problems that
  # have one (3.0), and the summary says so.
  # CPU seconds over two busy threads at 80 % (one on a one-CPU machine).
  assert plan.total_seconds == pytest.approx(
      (4 + 2 + 3 + 5 + 1 + 7 + 1 + 3 + 0.5 + 0.5) / costs.parallelism())
  assert "toy2d compile:gramian" in plan.summary()
  # The minutes follow this process's CPUs (affinity): 0.28 on two, 0.56
  # on one.
  assert f"expected ~{plan.total_seconds / 60:.0f} min" in plan.summary()
  path = str(tmp_path / "costs.json")
  costs.record(args, [("scales/compile gramian (2)", 99.0, 10.0),
                      ("scales/upgrad", 99.0, 6.0),
                      ("scales/mgda", 99.0, 8.0)], path)
  stored = costs.load_table(path)["suites"]["quick"]["scales"]
  assert stored == {"compile:gramian": 5.0, "run:gramian": 7.0}


def test_progress_line_says_units_elapsed_and_left():
  args = cli.parse_args(["--problem", "toy2d", "--strategies", "equal",
                         "--no-speed"])
  table = {"suites": {"quick": {"toy2d": {"compile:losses": 30.0,
                                          "run:losses": 30.0}}}}
  stream = io.StringIO()
  progress = cli.Progress(costs.plan(args, table), stream=stream,
                          tick_seconds=0.05)
  time.sleep(0.2)  # The ticker writes while nothing finishes.
  progress("toy2d/compile losses (1)")
  progress.stop()
  lines = stream.getvalue().splitlines()
  assert lines[0].startswith("[0/2 units] starting")
  assert lines[-1].startswith("[1/2 units] toy2d/compile losses (1)")
  assert "elapsed, ~" in lines[-1] and lines[-1].endswith("left")
  label, wall, cpu = progress.unit_seconds[0]
  assert label == "toy2d/compile losses (1)" and wall >= 0.2 and cpu >= 0


def test_interrupt_writes_the_partial_report(tiny_results, tmp_path,
                                             monkeypatch, capsys):
  def interrupted(args, progress, results, speed_out):
    results["scales"] = dict(tiny_results["scales"])
    results["scales"].pop("ranking")
    results["digits"] = {}  # Started, nothing trained yet.
    raise KeyboardInterrupt

  monkeypatch.setattr(cli, "run_all", interrupted)
  code = cli.main(["--problem", "scales", "--strategies",
                   "equal,normalized_gradients", "--no-speed", "--no-cache",
                   "--out", str(tmp_path)])
  assert code == 130
  text = (tmp_path / "report.md").read_text()
  assert "## scales" in text and "## digits" not in text
  err = capsys.readouterr().err
  assert "interrupted: writing the partial results" in err
  assert "Traceback" not in err and "Main conclusions:" in err
  assert str(tmp_path / "report.md") in err


def test_report_wording_one_value_and_single_seed(tiny_results):
  assert report._span(0.91, 0.93, unit="×") == "0.91–0.93×"
  assert report._span(0.9, 0.9004, unit="×") == "0.9×"
  single = json.loads(json.dumps(tiny_results["scales"]))
  for entry in single["strategies"].values():
    entry["delta_m"]["per_seed"] = entry["delta_m"]["per_seed"][:1]
  text = "\n".join(report._problem_findings(single))
  assert "single seed" in text and "standard errors" not in text
  conclusions = report.main_conclusions(tiny_results)
  assert conclusions[0].startswith("Best by Δm%: scales `")
  # The strategies ahead of equal's mean Δm% on every problem that ran
  # equal, counted here from the results themselves.
  ahead = None
  for result in tiny_results.values():
    entries = result.get("strategies") or {}
    if result["problem"] == "toy2d" or "equal" not in entries:
      continue
    base = entries["equal"]["delta_m"]["mean"]
    better = {n for n, e in entries.items()
              if n != "equal" and e["delta_m"]["mean"] > base}
    ahead = better if ahead is None else ahead & better
  assert ahead is not None
  assert conclusions[1].startswith(
      f"{len(ahead)} strategies beat `equal` (mean Δm%) on every problem")
  for name in ahead:
    assert name in conclusions[1]
  # No speed run here: the cost comes from the training steps.
  assert conclusions[2].startswith("Training step ÷ `equal`'s on ")
  assert len(conclusions) == 3


def test_an_extreme_delta_m_is_commented():
  result = {"metrics": ["score"], "tasks": ["a", "b"],
            "single_task": {"per_task": {"score": {"mean": [0.9, 0.8]}}},
            "strategies": {}}
  for name, delta in (("x", -5.0), ("y", -8.0), ("z", -2.0),
                      ("mgda", -413.6)):
    result["strategies"][name] = {
        "delta_m": {"mean": delta},
        "per_task": {"score": {"mean": [0.9, -13.7 if name == "mgda"
                                        else 0.7]}}}
  (line,) = report._outlier_findings(result)
  assert "`mgda` is an outlier" in line and "b -13.7 against 0.8" in line


def test_every_problem_has_a_configuration_per_suite():
  # A suite the command line offers must exist in every problem, or the
  # run fails after minutes of other work.
  import importlib  # pylint: disable=import-outside-toplevel
  for name in ("scales", "digits", "manytask", "toy2d", "celeba", "pcba"):
    configs = importlib.import_module(f"benchmarks.problems.{name}").CONFIGS
    assert set(configs) == set(cli.SUITES), (name, sorted(configs))
    # The full suite trains at least as long as the quick one.
    assert configs["full"]["num_steps"] >= configs["quick"]["num_steps"]


def test_every_strategy_factory_is_run_or_said_why_not():
  import inspect  # pylint: disable=import-outside-toplevel
  factories = set()
  for name in optax_mtl.__all__:
    value = getattr(optax_mtl, name)
    if name[0].islower() and callable(value):
      returns = str(inspect.signature(value).return_annotation)
      if "MultiTaskStrategy" in returns:
        factories.add(name)
  assert "krum" in factories and "recompute_every" in factories
  covered = set(strategies_lib.STRATEGIES) | set(strategies_lib.NOT_RUN)
  assert factories - covered == set()
  assert not set(strategies_lib.STRATEGIES) & set(strategies_lib.NOT_RUN)


def test_strategies_not_defined_at_a_task_count_are_skipped_and_said():
  runnable, skipped = strategies_lib.split_runnable(
      ["equal", "krum", "trimmed_mean", "constant"], 2)
  assert runnable == ["equal", "constant"]
  assert skipped == {"krum": "needs at least 3 tasks",
                     "trimmed_mean": "needs at least 3 tasks"}
  assert strategies_lib.split_runnable(["krum"], 3) == (["krum"], {})
  # constant's weights follow T: the mean of the losses.
  state = strategies_lib.make("constant", 4).init({"w": jnp.zeros(3)})
  np.testing.assert_allclose(state.weights, [0.25] * 4)


def _claim_result(delta_m, scores, stl_scores):
  """A results.json problem entry with per-seed Δm% and primary scores."""
  return {
      "metrics": ["accuracy"], "higher_is_better": [True],
      "single_task": {"per_task": {"accuracy": {"per_seed": stl_scores}}},
      "strategies": {
          name: {"delta_m": {"per_seed": delta_m[name]},
                 "per_task": {"accuracy": {"per_seed": scores[name]}}}
          for name in delta_m}}


def test_claims_are_paired_t_intervals_over_seeds():
  from benchmarks import claims  # pylint: disable=import-outside-toplevel
  from scipy import stats  # pylint: disable=import-outside-toplevel
  ema = [3.0, 5.0, 4.0, 6.0, 2.0]
  dwa = [1.0, 1.5, 2.5, 2.0, 1.0]
  result = _claim_result({"loss_ema": ema, "dwa": dwa},
                         {"loss_ema": [[0.9]] * 5, "dwa": [[0.9]] * 5},
                         [[0.8]] * 5)
  claim = claims.CLAIMS[0]
  found = claims.compare(result, claim, "dwa")
  diff = np.subtract(ema, dwa)
  half = stats.t.ppf(0.975, 4) * diff.std(ddof=1) / np.sqrt(5)
  np.testing.assert_allclose(
      [found["mean"], found["low"], found["high"]],
      [diff.mean(), diff.mean() - half, diff.mean() + half], rtol=1e-12)
  assert found["verdict"] == "supported" and found["seeds"] == 5
  assert claims.compare(result, claim, "gradnorm") is None  # Not run.
  # The other way round the same interval is "contradicted".
  swapped = _claim_result({"loss_ema": dwa, "dwa": ema},
                          {"loss_ema": [[0.9]] * 5, "dwa": [[0.9]] * 5},
                          [[0.8]] * 5)
  assert claims.compare(swapped, claim, "dwa")["verdict"] == "contradicted"


def test_negative_transfer_claim_counts_tasks_worse_than_the_same_seed():
  from benchmarks import claims  # pylint: disable=import-outside-toplevel
  stl = [[0.5, 0.5, 0.5], [0.6, 0.6, 0.6]]
  scores = {"lbtw": [[0.6, 0.4, 0.7], [0.7, 0.7, 0.7]],   # 1, 0 worse
            "equal": [[0.4, 0.4, 0.7], [0.5, 0.5, 0.7]]}  # 2, 2 worse
  result = _claim_result({"lbtw": [0.0, 0.0], "equal": [0.0, 0.0]},
                         scores, stl)
  np.testing.assert_array_equal(
      claims.negative_tasks_per_seed(result, "lbtw"), [1, 0])
  found = claims.compare(result, claims.CLAIMS[1], "equal")
  assert found["values"] == (0.5, 2.0)
  assert found["mean"] == pytest.approx(1.5)  # Positive: lbtw has fewer.
  lines = claims.claims_markdown({"manytask": result})
  assert any("`lbtw` vs `equal`" in line for line in lines)
  assert any("Not tested by this run" in line for line in lines)
