"""Tests of optax_mtl.dualproj (Quinton & Rey 2024)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import gramian_harness
from tests import test_upgrad

# A scripted sequence of small Jacobians [T=3, 4]: see gramian_harness.
JACOBIANS = gramian_harness.DUAL_CONE_JACOBIANS


def numpy_dualproj(jacobian):
  """argmin_{Jy >= 0} ‖y - ḡ‖ with ḡ the mean gradient (active subsets)."""
  mean = jacobian.mean(axis=0)
  best, best_distance = None, np.inf
  for size in range(len(jacobian) + 1):
    for active in itertools.combinations(range(len(jacobian)), size):
      rows = jacobian[list(active)]
      point = mean - (np.linalg.pinv(rows) @ (rows @ mean) if size else 0)
      if np.all(jacobian @ point >= -1e-10):
        distance = np.linalg.norm(point - mean)
        if distance < best_distance - 1e-14:
          best, best_distance = point, distance
  return best


def test_golden_values_over_a_scripted_sequence():
  gramian_harness.check_scripted_dual_cone_directions(
      optax_mtl.dualproj(num_tasks=3), numpy_dualproj)


def test_warm_start_from_the_weights_of_the_last_step():
  first, _ = gramian_harness.check_warm_start_repeats(
      optax_mtl.dualproj(num_tasks=3), JACOBIANS[4])
  np.testing.assert_allclose(first, numpy_dualproj(JACOBIANS[4]), atol=1e-5)


def test_non_conflicting_and_mean_when_no_conflict():

  def check_state(state):
    # The weights are >= 1/T (v >= u in the dual).
    assert np.all(np.asarray(state.weights) >= 1 / 6 - 1e-6)

  gramian_harness.check_non_conflicting_and_mean_when_no_conflict(
      optax_mtl.dualproj(num_tasks=6), check_state)


def test_permutation_invariance_and_scaling():
  gramian_harness.check_permutation_invariance_and_homogeneity(
      optax_mtl.dualproj(num_tasks=4), 4, seed=1, permutation_atol=1e-5,
      rtol=1e-4, atol_per_factor=1e-6)


def test_both_faces_agree():
  gramian_harness.check_faces_match_reference(
      optax_mtl.dualproj(num_tasks=3), JACOBIANS[0], numpy_dualproj)


def torchjd_dualproj_weights(jacobian, pref_vector, reg_eps):
  """torchjd's DualProj: argmin_{v >= p} vᵀ (G / tr(G) + reg_eps I) v."""
  return test_upgrad.numpy_box_qp(test_upgrad.torchjd_normalize_regularize(
      jacobian @ jacobian.T, reg_eps), pref_vector)


@pytest.mark.parametrize("preference, regularization", itertools.product(
    [None, (0.5, 0.3, 0.2), (1.0, -0.5, 0.2)], [0.0, 1e-4, 0.1]))
def test_preference_and_regularization_reproduce_torchjd(
    preference, regularization):
  pref_vector = np.asarray((1 / 3,) * 3 if preference is None else preference)
  gramian_harness.check_weights_over_a_sequence(
      optax_mtl.dualproj(3, preference, regularization=regularization),
      JACOBIANS[:4], lambda jacobian: torchjd_dualproj_weights(
          jacobian, pref_vector, regularization))


@pytest.mark.parametrize("kwargs, message",
                         gramian_harness.hyperparameter_errors(
                             *gramian_harness.SOLVER_ERRORS,
                             ({"num_tasks": 2, "preference": (1.0,)},
                              "preference"),
                             ({"num_tasks": 2,
                               "preference": (1.0, float("nan"))},
                              "preference"),
                             ({"num_tasks": 2, "regularization": -1.0},
                              "regularization")))
def test_hyperparameter_errors(kwargs, message):
  gramian_harness.check_rejects(optax_mtl.dualproj, kwargs, message)


def test_nearly_opposite_gradients_reach_the_optimum_float32():
  # The exact projection of the mean: SciPy/NumPy active-set enumeration.
  from tests import test_solvers  # pylint: disable=import-outside-toplevel
  test_upgrad.check_nearly_opposite_pair_float32(
      optax_mtl.dualproj(5),
      lambda gramian: test_solvers.exact_dual_cone(gramian, np.full(5, 0.2)))


def test_old_spelling_warns_and_gives_the_same_strategy():
  # 0.1: dualproj(T, preferences=...).
  gramian_harness.check_old_spelling(
      lambda: optax_mtl.dualproj(3, preferences=(1.0, -0.5, 2.0)),
      lambda: optax_mtl.dualproj(3, (1.0, -0.5, 2.0)), old="preferences")
