"""Fast tests of the benchmark suite: tiny configurations only."""

import json
import os
import sys

# An editable install made before benchmarks/__init__.py existed maps
# "benchmarks" to a namespace package; the repository root first fixes that.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
import pytest

import benchmarks
from benchmarks import __main__ as cli
from benchmarks import data as data_lib
from benchmarks import problems
from benchmarks import publish
from benchmarks import report
from benchmarks import runner
from benchmarks import speed
from benchmarks import strategies as strategies_lib
from benchmarks.problems import toy2d

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
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


@pytest.fixture(scope="module")
def tiny_results():
  out = {}
  for name, overrides in TINY.items():
    problem = problems.make(name, **overrides)
    out[name] = runner.run_problem(problem, TINY_STRATEGIES[name], seeds=2,
                                   num_steps=5)
  toy = problems.make("toy2d", grid_size=41)
  out["toy2d"] = runner.run_problem(toy, ["equal"], num_steps=20)
  return out


@pytest.mark.parametrize("name", sorted(TINY))
def test_problem_builds_and_trains(name, tiny_results):
  result = tiny_results[name]
  problem = problems.make(name, **TINY[name])
  t = problem.num_tasks
  assert result["tasks"] == list(problem.task_names)
  assert len(result["single_task"]["per_task"][problem.metric_names[0]]
             ["mean"]) == t
  for strategy in TINY_STRATEGIES[name]:
    entry = result["strategies"][strategy]
    assert np.asarray(entry["weights"]).shape == (5, t)
    assert np.all(np.isfinite(entry["final_train_losses"]))
    assert 0 <= entry["negative_transfer"] <= t
    assert np.isfinite(entry["delta_m"]["mean"])
    assert len(entry["delta_m"]["per_seed"]) == 2
  if "equal" in result["strategies"]:  # weight 1 on every task throughout
    np.testing.assert_allclose(result["strategies"]["equal"]["weights"], 1.0)
  assert sorted(result["ranking"]) == sorted(TINY_STRATEGIES[name])


def test_training_lowers_the_loss():
  problem = problems.make("scales", **TINY["scales"])
  _, losses, _, skipped = runner.train_multitask(
      problem, strategies_lib.make("equal", 3), [0], num_steps=60)
  assert losses.shape == (1, 60, 3)
  assert losses[0, -10:].mean() < losses[0, :10].mean()
  assert skipped.tolist() == [0]


def test_single_task_models_train_only_their_task():
  problem = problems.make("scales", **TINY["scales"])
  params, losses = runner.train_single_task(problem, [0], num_steps=40)
  assert jax.tree.leaves(params)[0].shape[:2] == (3, 1)
  # Model 0 learns task 0 better than model 1 does, and vice versa.
  final = losses[:, 0, -5:].mean(axis=1)  # [model, task]
  assert final[0, 0] < final[1, 0]
  assert final[1, 1] < final[0, 1]


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


def test_report_writes_json_markdown_png(tiny_results, tmp_path):
  speed_result = speed.run_speed(
      ["equal", "normalized_gradients"], num_tasks=[2],
      config=dict(input_dim=4, hidden=8, depth=1, batch_size=4, rounds=1,
                  target_seconds=0.001))
  paths = report.write_report(tiny_results, str(tmp_path),
                              speed=speed_result,
                              meta={"command": "test", "wall_seconds": 1.0})
  with open(paths["json"]) as f:
    loaded = json.load(f)
  assert set(loaded["problems"]) == set(tiny_results)
  text = open(paths["markdown"]).read()
  for name in tiny_results:
    assert f"## {name}" in text
  assert "## Speed and memory" in text
  assert len(paths["plots"]) == 5
  for plot in paths["plots"]:
    with open(plot, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  entry = speed_result["strategies"]["normalized_gradients"]["2"]
  assert entry["kind"] == "gramian" and entry["ratio_jacobian"] > 0
  assert entry["memory_bytes"] > 0 and entry["memory_low_memory_bytes"] > 0
  assert speed_result["strategies"]["equal"]["2"]["ratio_plain"] > 0
  # Publishing: RESULTS.md with the requirement summary, plots alongside.
  published = tmp_path / "published"
  published.mkdir()
  results_md = publish.publish(str(tmp_path), destination=published)
  text = results_md.read_text()
  assert "## Requirements at a glance" in text
  assert "/1 strategies within 1.05" in text  # equal, the one loss-only.
  assert "/1 within 1.10" in text  # normalized_gradients.
  # A further speed-only folder adds its own summary under its command.
  text = publish.publish(str(tmp_path), destination=published,
                         speed_dirs=(str(tmp_path),)).read_text()
  assert ("## Further speed runs\n\n### `test` (minibatch 4)\n\n"
          "Computed from") in text
  assert text.count("/1 strategies within 1.05") == 2
  worst_line = next(line for line in text.splitlines()
                    if line.startswith("- Worst loss-only strategy"))
  assert worst_line.count("(equal, T=2)") == 2
  assert "## Speed and memory" in text and "](results/speed.png)" in text
  assert (published / "results" / "speed.png").exists()


def test_cli_parsing():
  args = cli.parse_args([])
  assert args.suite == "quick" and args.seeds == [0, 1, 2]
  assert args.problems == ["scales", "digits", "manytask", "toy2d"]
  assert args.out == "bench_results" and args.strategies is None
  args = cli.parse_args(["--suite", "full", "--problem", "digits",
                         "--problem", "toy2d", "--strategies", "equal, mgda",
                         "--seeds", "0,4,7", "--out", "x"])
  assert args.problems == ["digits", "toy2d"] and args.seeds == [0, 4, 7]
  assert args.strategies == ["equal", "mgda"] and args.out == "x"
  assert cli.parse_args(["--seeds", "2"]).seeds == [0, 1]
  assert cli.parse_args(["--suite", "full"]).seeds == [0, 1, 2, 3, 4]
  args = cli.parse_args(["--data-dir", FIXTURES])
  assert args.problems[-1] == "pcba"  # pcba.csv present, no CelebA images
  assert cli.parse_args(["--speed-only"]).problems == []
  assert cli.parse_args([]).speed_batch is None
  assert cli.parse_args(["--speed-batch", "1024"]).speed_batch == 1024
  with pytest.raises(SystemExit):
    cli.parse_args(["--speed-batch", "0"])
  with pytest.raises(SystemExit):
    cli.parse_args(["--speed-only", "--no-speed"])
  with pytest.raises(SystemExit):
    cli.parse_args(["--problem", "nope"])
  with pytest.raises(SystemExit):
    cli.parse_args(["--seeds", "0"])


def test_missing_strategy_is_skipped(capsys):
  assert strategies_lib.available(["equal", "no_such_strategy"]) == ["equal"]
  assert "no_such_strategy" in capsys.readouterr().out


def test_strategy_table_names_are_unique_and_include_baseline():
  assert strategies_lib.BASELINE in strategies_lib.STRATEGIES
  assert len(set(strategies_lib.STRATEGIES)) == len(strategies_lib.STRATEGIES)


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
