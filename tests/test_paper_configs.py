"""The paper configurations (benchmarks/papers) on tiny fixtures, on CPU.

Fixtures (tests/fixtures/make_paper_fixtures.py writes them):
``celeba_tiny/`` (12 fake aligned-CelebA JPEGs, the attribute and partition
files) and ``pcba_tiny/pcba.csv`` (60 molecules, 5 assays, missing cells).
"""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from benchmarks.papers import __main__ as cli
from benchmarks.papers import _common
from benchmarks.papers import celeba_ema
from benchmarks.papers import pcba_lbtw

ROOT = pathlib.Path(__file__).parents[1]
CELEBA = str(ROOT / "tests" / "fixtures" / "celeba_tiny")
PCBA = str(ROOT / "tests" / "fixtures" / "pcba_tiny")

TINY_CELEBA = ["--epochs", "2", "--batch-size", "3", "--image-size", "8",
               "--channels", "4", "--hidden", "8", "--workers", "2"]
TINY_PCBA = ["--epochs", "3", "--batch-size", "8", "--hidden", "16,16",
             "--eval-batch-size", "16"]


# ---------------------------------------------------------------------------
# Negative transfer against hand-made cases.
# ---------------------------------------------------------------------------


def test_negative_transfer_one_seed_counts_every_lower_score():
  mtl = [0.50, 0.30, np.nan, 0.90, 0.70]
  stl = [0.40, 0.35, 0.20, 0.95, 0.70]
  count, mask, compared = _common.negative_transfer(mtl, stl)
  # Task 1 and 3 are lower; task 2 has no MTL score; task 4 ties.
  assert (count, mask.tolist(), compared) == (
      2, [False, True, False, True, False], 4)


def test_negative_transfer_several_seeds_uses_two_standard_errors():
  mtl = np.array([[0.60, 0.70, 0.50], [0.62, 0.50, 0.52]])
  stl = np.array([[0.70, 0.72, 0.50], [0.72, 0.74, 0.52]])
  # Task 0: difference -0.10, SE = sqrt(2e-4/2 + 2e-4/2) = 0.0141: worse.
  # Task 1: difference -0.13, SE = sqrt(0.02/2 + 2e-4/2) = 0.1005: noise.
  # Task 2: difference 0.
  count, mask, compared = _common.negative_transfer(mtl, stl)
  assert (count, mask.tolist(), compared) == (1, [True, False, False], 3)
  count, _, _ = _common.negative_transfer(mtl, stl, num_standard_errors=1.0)
  assert count == 2  # -0.13 < -1 × 0.1005


def test_negative_transfer_rejects_mismatched_tasks():
  with pytest.raises(ValueError, match="3 multi-task scores but 2"):
    _common.negative_transfer([0.1, 0.2, 0.3], [0.1, 0.2])


def test_delta_m_skips_undefined_tasks():
  assert _common.delta_m([0.6, np.nan, 0.5], [0.5, 0.4, 0.5]) == (
      pytest.approx(10.0))


def test_masked_bce_ignores_missing_labels():
  logits = jnp.array([[0.0, 2.0], [1.0, -3.0], [5.0, 0.0]])
  labels = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  mask = jnp.array([[True, False], [True, False], [False, False]])
  losses = _common.masked_bce(logits, labels, mask)
  expected0 = (np.log(2.0) + np.log1p(np.exp(1.0))) / 2.0
  np.testing.assert_allclose(losses, [expected0, 0.0], rtol=1e-6)


# ---------------------------------------------------------------------------
# Data loading.
# ---------------------------------------------------------------------------


def test_celeba_loader_reads_the_standard_layout():
  (train, val, test), names = celeba_ema.load_celeba(CELEBA, 8, workers=2,
                                                     log=lambda _: None)
  assert len(names) == 40 and names[20] == "Male"
  assert (train.size, val.size, test.size) == (6, 3, 3)
  assert train.inputs.shape == (6, 8, 8, 3) and train.inputs.dtype == np.uint8
  with open(os.path.join(CELEBA, "list_attr_celeba.txt")) as f:
    rows = [line.split() for line in f.readlines()[2:]]
  expected = np.array([[int(v) > 0 for v in row[1:]] for row in rows])
  np.testing.assert_array_equal(train.labels, expected[:6])
  np.testing.assert_array_equal(test.labels, expected[9:])
  (small, _, _), _ = celeba_ema.load_celeba(CELEBA, 8, subset=2,
                                            eval_subset=1,
                                            log=lambda _: None)
  assert small.size == 2


def test_celeba_image_is_centre_cropped(tmp_path):
  pixels = np.zeros((6, 2, 3), np.uint8)  # 2 wide, 6 high
  pixels[:2] = 255                       # top band: cropped away
  pixels[2:4] = 100                      # the centred 2×2 square
  path = str(tmp_path / "x.jpg")
  Image.fromarray(pixels).save(path, format="PNG")
  image = celeba_ema.load_image(path, 2)
  assert image.shape == (2, 2, 3)
  np.testing.assert_allclose(image, 100, atol=1)


def test_celeba_partition_file_is_checked(tmp_path):
  path = tmp_path / "list_eval_partition.txt"
  path.write_text("000001.jpg 0\n000002.jpg 3\n")
  with pytest.raises(ValueError, match="expected 'filename 0|1|2'"):
    celeba_ema.load_partition(str(path))


def test_pcba_folds_partition_the_molecules():
  tests = []
  for fold in range(5):
    train, val, test = pcba_lbtw.fold_rows(23, fold)
    both = np.concatenate([train, val, test])
    assert sorted(both.tolist()) == list(range(23))
    assert not set(val) & set(test)
    tests.append(test)
  assert sorted(np.concatenate(tests).tolist()) == list(range(23))
  with pytest.raises(ValueError):
    pcba_lbtw.fold_rows(23, 5)


def test_pcba_loader_drops_unlabelled_molecules():
  (train, val, test), tasks, kind = pcba_lbtw.load_pcba(
      PCBA, features="ngram", log=lambda _: None)
  assert len(tasks) == 5 and kind == "smiles-ngram-1024"
  assert train.size + val.size + test.size == 59  # 60 rows, one unlabelled
  assert train.inputs.shape[1] == 1024
  for split in (train, val, test):
    assert np.all(split.mask.any(axis=1))


# ---------------------------------------------------------------------------
# Strategies and the single-task models.
# ---------------------------------------------------------------------------


def test_paper_hyperparameters_reach_the_strategies():
  args = cli.build_parser().parse_args(["celeba", "--data-dir", "x"])
  assert args.strategies == "equal,ema,rema,dwema" and args.beta == 0.2
  strategy = celeba_ema.make_strategy("ema", 2, args.beta)
  params = {"w": jnp.zeros(1)}
  state = strategy.init(params)
  task_grads = {"w": jnp.zeros((2, 1))}
  for losses in ([1.0, 4.0], [2.0, 2.0]):
    _, state = strategy.update(task_grads, state, params,
                               task_losses=jnp.array(losses))
  average = 0.2 * np.array([2.0, 2.0]) + 0.8 * np.array([1.0, 4.0])
  np.testing.assert_allclose(state.weights, 1.0 / average, rtol=1e-6)

  args = cli.build_parser().parse_args(["pcba", "--data-dir", "x"])
  assert (args.strategies, args.alpha, args.batch_size, args.epochs,
          args.hidden, args.dropout) == ("equal,lbtw", 0.5, 1024, 100,
                                         "2000,2000", 0.25)
  strategy = pcba_lbtw.make_strategy("lbtw", 2, args.alpha, steps_per_epoch=2)
  state = strategy.init(params)
  for losses in ([1.0, 1.0], [0.25, 1.0], [4.0, 4.0], [1.0, 4.0]):
    _, state = strategy.update(task_grads, state, params,
                               task_losses=jnp.array(losses))
  # Epoch 2's reference is its first step (4, 4): ratios (1/4, 1)^0.5.
  raw = np.sqrt([0.25, 1.0])
  np.testing.assert_allclose(state.weights, 2 * raw / raw.sum(), rtol=1e-6)


def test_single_task_chunks_equal_separate_training():
  rng = np.random.default_rng(0)
  def split(n):
    return _common.Split(rng.normal(size=(n, 6)).astype(np.float32),
                         (rng.random((n, 3)) < 0.5).astype(np.float32),
                         rng.random((n, 3)) < 0.8)
  train, val, test = split(32), split(16), split(16)
  fns, params = _common.split_model(pcba_lbtw.PcbaMLP(
      6, 3, (8,), dropout_rate=0.0, rngs=nnx.Rngs(0)))
  config = _common.TrainConfig(epochs=3, batch_size=8, eval_batch_size=16)
  def run(tasks, chunk):
    return _common.train_single_task(
        fns, params, optax.adam(1e-2), tasks, train, val, test, config,
        pcba_lbtw.score, "pr_auc", seed=0, chunk=chunk, prefix="t",
        log=lambda _: None)
  together = run([0, 1, 2], chunk=2)  # chunks [0, 1] and [2, (2)]
  alone = run([2], chunk=1)
  np.testing.assert_allclose(together["test_probs"][:, 2],
                             alone["test_probs"][:, 0], rtol=1e-5, atol=1e-6)
  assert len(together["best_epochs"]) == 3
  assert all(1 <= e <= 3 for e in together["best_epochs"])


# ---------------------------------------------------------------------------
# End to end: the documented commands on the fixtures.
# ---------------------------------------------------------------------------


def _lines(capsys):
  return capsys.readouterr().out.splitlines()


@pytest.mark.slow
def test_celeba_command_end_to_end(tmp_path, capsys):
  out = tmp_path / "results"
  results = cli.main(["celeba", "--data-dir", CELEBA, "--out", str(out),
                      "--strategies", "ema", "--stl-tasks", "0,5,20,39"]
                     + TINY_CELEBA)
  lines = _lines(capsys)
  epoch_lines = [l for l in lines if " epoch " in l]
  assert len(epoch_lines) == 4  # 2 epochs × (single-task chunk, ema)
  assert all("loss" in l and "val accuracy" in l and l.endswith(" s")
             for l in epoch_lines)

  saved = json.loads((out / "celeba_ema.json").read_text())
  report = (out / "celeba_ema.md").read_text()
  assert saved["tasks"][20] == "Male" and len(saved["tasks"]) == 40
  ema = saved["strategies"]["ema"]
  accuracy = np.array(ema["per_seed"][0]["accuracy"], float)
  assert accuracy.shape == (40,) and np.all(np.isfinite(accuracy))
  assert np.all((0 <= accuracy) & (accuracy <= 1))
  assert np.isfinite(ema["mean_over_tasks"]["accuracy"])
  assert [h["epoch"] for h in ema["history"][0]] == [1, 2]
  assert np.all(np.isfinite(ema["weights"][0]))
  stl = saved["single_task"]
  assert stl["task_indices"] == [0, 5, 20, 39]
  stl_accuracy = np.array(stl["per_seed"][0]["accuracy"], float)
  expected = int(np.sum(accuracy[[0, 5, 20, 39]] < stl_accuracy))
  assert ema["negative_transfer"] == expected
  assert ema["tasks_compared"] == 4
  assert "see paper" in report and "arXiv:2211.12999" in report
  assert "| ema: mean test accuracy | see paper |" in report
  assert results["files"] == [str(out / "celeba_ema.json"),
                              str(out / "celeba_ema.md")]


@pytest.mark.slow
def test_pcba_command_end_to_end(tmp_path, capsys):
  out = tmp_path / "results"
  cli.main(["pcba", "--data-dir", PCBA, "--out", str(out),
            "--features", "ngram"] + TINY_PCBA)
  lines = _lines(capsys)
  assert sum(" epoch " in l and "val pr_auc" in l for l in lines) == 9

  saved = json.loads((out / "pcba_lbtw.json").read_text())
  report = (out / "pcba_lbtw.md").read_text()
  assert saved["data"]["features"] == "smiles-ngram-1024"
  assert saved["data"]["train"] + saved["data"]["val"] + saved["data"][
      "test"] == 59
  stl = np.array(saved["single_task"]["per_seed"][0]["pr_auc"], float)
  assert np.sum(np.isfinite(stl)) >= 4
  for name in ("equal", "lbtw"):
    entry = saved["strategies"][name]
    pr = np.array(entry["per_seed"][0]["pr_auc"], float)
    finite = np.isfinite(pr) & np.isfinite(stl)
    assert np.sum(finite) >= 4 and np.all((0 <= pr[finite]) & (pr[finite] <= 1))
    assert np.isfinite(entry["mean_over_tasks"]["pr_auc"])
    assert entry["negative_transfer"] == int(np.sum(pr[finite] < stl[finite]))
    assert entry["tasks_compared"] == int(np.sum(finite))
    assert f"| {name}: tasks with negative transfer | see paper | " \
        f"{entry['negative_transfer']} of {entry['tasks_compared']} |" in report
  assert "doi:10.1609/aaai.v33i01.33019977" in report
  assert "| α of lbtw | 0.5 (json/LBTW.json) | 0.5 |" in report


def test_command_lists_both_papers():
  done = subprocess.run([sys.executable, "-m", "benchmarks.papers", "--help"],
                        cwd=ROOT, capture_output=True, text=True, check=True,
                        timeout=120)
  assert "celeba" in done.stdout and "pcba" in done.stdout
