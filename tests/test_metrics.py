"""Tests of optax_mtl.metrics against hand-computed values."""

import numpy as np
import pytest

import optax_mtl
from optax_mtl import metrics


def test_relative_change_and_delta_m_hand_computed():
  # Task 1: accuracy 0.9 vs 0.8 (higher better) -> +0.125.
  # Task 2: error 3.0 vs 4.0 (lower better) -> +0.25.
  # Task 3: error 5.0 vs 4.0 (lower better) -> -0.25.
  scores = np.array([[0.9, 3.0, 5.0], [0.7, 4.0, 4.0]])
  baseline = np.array([0.8, 4.0, 4.0])
  higher = [True, False, False]
  np.testing.assert_allclose(
      metrics.relative_change(scores, baseline, higher),
      [[0.125, 0.25, -0.25], [-0.125, 0.0, 0.0]])
  np.testing.assert_allclose(
      metrics.delta_m(scores, baseline, higher),
      [100 * (0.125 + 0.25 - 0.25) / 3, 100 * (-0.125) / 3])
  assert float(metrics.delta_m(baseline, baseline, higher)) == 0.0


def test_delta_m_uses_absolute_baseline():
  # A negative baseline (e.g. a log-likelihood): improvement stays positive.
  assert float(metrics.delta_m([-1.0], [-2.0], [True])) == pytest.approx(50.0)


def test_negative_transfer_hand_computed():
  mtl = np.array([[0.70, 0.90, 1.00], [0.72, 0.91, 1.10], [0.71, 0.89, 0.90]])
  stl = np.array([[0.80, 0.90, 1.00], [0.81, 0.90, 1.05], [0.79, 0.90, 0.95]])
  higher = [True, True, False]
  # Hand computation: SE_k = sqrt(var_m/3 + var_s/3), ddof=1.
  mean_diff = mtl.mean(0) - stl.mean(0)
  var_m = ((mtl - mtl.mean(0)) ** 2).sum(0) / 2
  var_s = ((stl - stl.mean(0)) ** 2).sum(0) / 2
  se = np.sqrt(var_m / 3 + var_s / 3)
  signed = np.array([1, 1, -1]) * mean_diff
  expected = signed < -2 * se
  np.testing.assert_array_equal(
      metrics.negative_transfer_mask(mtl, stl, higher), expected)
  assert expected.tolist() == [True, False, False]
  assert metrics.negative_transfer_count(mtl, stl, higher) == 1
  # A larger margin forgives the first task too.
  assert metrics.negative_transfer_count(mtl, stl, higher,
                                         num_standard_errors=100.0) == 0


def test_negative_transfer_single_seed_counts_any_loss():
  assert metrics.negative_transfer_count([0.5, 2.0], [0.6, 1.0],
                                         [True, False]) == 2
  assert metrics.negative_transfer_count([0.6, 1.0], [0.6, 1.0],
                                         [True, False]) == 0


def test_mean_and_std():
  mean, std = metrics.mean_and_std([[1.0, 2.0], [3.0, 6.0]])
  np.testing.assert_allclose(mean, [2.0, 4.0])
  np.testing.assert_allclose(std, [np.sqrt(2.0), np.sqrt(8.0)])
  _, std = metrics.mean_and_std([[1.0, 2.0]])
  np.testing.assert_allclose(std, [0.0, 0.0])


def test_public_module_keeps_its_names():
  # optax_mtl.metrics is a module users import; its implementation lives in
  # optax_mtl/_src/metrics.py and the ROC/PR-AUC helpers moved to benchmarks/.
  assert optax_mtl.metrics is metrics
  assert sorted(metrics.__all__) == [
      "delta_m", "mean_and_std", "negative_transfer_count",
      "negative_transfer_mask", "relative_change"]
  for name in metrics.__all__:
    assert getattr(metrics, name).__module__ == "optax_mtl._src.metrics"
  assert not hasattr(metrics, "roc_auc")
  assert not hasattr(metrics, "average_precision")
