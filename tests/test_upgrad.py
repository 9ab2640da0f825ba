"""Tests of optax_mtl.upgrad (Quinton & Rey 2024)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import gramian_harness
from tests import scipy_references

JACOBIANS = gramian_harness.DUAL_CONE_JACOBIANS


numpy_project_onto_dual_cone = scipy_references.project_onto_dual_cone


def numpy_upgrad(jacobian):
  """d = (1/T) Σ_i Π(g_i), straight from the paper's definition."""
  return np.mean([numpy_project_onto_dual_cone(jacobian, row)
                  for row in jacobian], axis=0)


def test_golden_values_over_a_scripted_sequence():
  state = gramian_harness.check_scripted_dual_cone_directions(
      optax_mtl.upgrad(num_tasks=3), numpy_upgrad)
  assert int(state.num_skipped) == 0


def test_non_conflicting_and_mean_when_no_conflict():

  def check_state(state):
    assert bool(state.solver_converged)

  gramian_harness.check_non_conflicting_and_mean_when_no_conflict(
      optax_mtl.upgrad(num_tasks=6), check_state)


def test_permutation_invariance_and_linearity_under_scaling():
  direction, jacobian = (
      gramian_harness.check_permutation_invariance_and_homogeneity(
          optax_mtl.upgrad(num_tasks=4), 4, seed=1, permutation_atol=1e-5,
          rtol=1e-4, atol_per_factor=1e-6))
  # Linear under scaling: d(diag(c) J) = (1/T) Σ c_i Π(g_i), linear in c.
  projections = np.array([numpy_project_onto_dual_cone(jacobian, row)
                          for row in jacobian])
  for scales in (np.array([1.0, 2.0, 0.5, 3.0]), np.array([1e-3, 1, 1, 1e2])):
    np.testing.assert_allclose(
        direction(scales[:, None] * jacobian),
        scales @ projections / 4, atol=1e-5 * scales.max(), rtol=1e-4)


def test_warm_start_from_the_solution_of_the_last_step():
  # state.solution[i] is v^(i): Jᵀ v^(i) is the projection of g_i.
  _, state = gramian_harness.check_warm_start_repeats(
      optax_mtl.upgrad(num_tasks=3), JACOBIANS[0])
  projections = [numpy_project_onto_dual_cone(JACOBIANS[0], row)
                 for row in JACOBIANS[0]]
  np.testing.assert_allclose(np.asarray(state.solution) @ JACOBIANS[0],
                             projections, atol=1e-5)


def test_both_faces_agree():
  gramian_harness.check_faces_match_reference(
      optax_mtl.upgrad(num_tasks=3), JACOBIANS[0], numpy_upgrad)


def numpy_box_qp(matrix, lower):
  """argmin_{v >= u} vᵀAv (A PSD) by enumerating the free sets (KKT)."""
  num_tasks = len(lower)
  best, best_value = None, np.inf
  for size in range(num_tasks + 1):
    for free in itertools.combinations(range(num_tasks), size):
      free = list(free)
      bound = [k for k in range(num_tasks) if k not in free]
      v = np.array(lower, np.float64)
      if free:
        v[free] = -np.linalg.pinv(matrix[np.ix_(free, free)]) @ (
            matrix[np.ix_(free, bound)] @ v[bound])
      gradient = matrix @ v
      if (np.all(v[free] >= lower[free] - 1e-12)
          and np.all(gradient[bound] >= -1e-12)):
        value = v @ matrix @ v
        if value < best_value - 1e-15:
          best, best_value = v, value
  return best


def torchjd_normalize_regularize(gramian, reg_eps, norm_eps=0.0):
  """torchjd's regularize(normalize(G, norm_eps), reg_eps)."""
  trace = np.trace(gramian)
  normalised = np.zeros_like(gramian) if trace < norm_eps else gramian / trace
  return normalised + reg_eps * np.eye(len(gramian))


def torchjd_upgrad_weights(jacobian, pref_vector, reg_eps, norm_eps=0.0):
  """torchjd's UPGradWeighting: Σ_i argmin_{v >= p_i e_i} vᵀ G' v."""
  matrix = torchjd_normalize_regularize(jacobian @ jacobian.T, reg_eps,
                                        norm_eps)
  return sum(numpy_box_qp(matrix, row) for row in np.diag(pref_vector))


@pytest.mark.parametrize("preference", [None, (0.5, 0.3, 0.2),
                                        (0.7, 0.0, 0.3)])
@pytest.mark.parametrize("regularization", [0.0, 1e-4, 0.1])
def test_preference_and_regularization_reproduce_torchjd(
    preference, regularization):
  pref_vector = np.full(3, 1 / 3) if preference is None else preference
  gramian_harness.check_weights_over_a_sequence(
      optax_mtl.upgrad(3, preference, regularization=regularization),
      JACOBIANS[:4], lambda jacobian: torchjd_upgrad_weights(
          jacobian, np.asarray(pref_vector), regularization))


def test_regularization_is_relative_to_the_gradients():
  # torchjd's absolute norm_eps = 1e-4 turns UPGrad into the plain mean as
  # soon as ‖J‖²_F < 1e-4; here the weights do not depend on the scale.
  jacobian = JACOBIANS[0]
  strategy = optax_mtl.upgrad(num_tasks=3, regularization=1e-4)
  direction = gramian_harness.direction_fn(strategy, 3)
  small = 1e-3 * jacobian  # ‖J‖²_F ≈ 4e-6.
  np.testing.assert_allclose(direction(small), 1e-3 * direction(jacobian),
                             rtol=1e-4)
  torchjd_small = torchjd_upgrad_weights(small, np.full(3, 1 / 3), 1e-4,
                                         norm_eps=1e-4)
  np.testing.assert_allclose(torchjd_small, np.full(3, 1 / 3))  # The mean.
  assert np.linalg.norm(direction(small) - torchjd_small @ small) > 0.1 * (
      np.linalg.norm(direction(small)))


@pytest.mark.parametrize("kwargs, message",
                         gramian_harness.hyperparameter_errors(
                             *gramian_harness.SOLVER_ERRORS,
                             ({"num_tasks": 2, "preference": (1.0,)},
                              "preference"),
                             ({"num_tasks": 2, "preference": (1.0, -0.1)},
                              "preference"),
                             ({"num_tasks": 2, "regularization": -1e-4},
                              "regularization")))
def test_hyperparameter_errors(kwargs, message):
  gramian_harness.check_rejects(optax_mtl.upgrad, kwargs, message)


def nearly_opposite_pair_jacobian():
  """Five float32 gradients: a near-duplicate pair and g₄ = −g₃ + 1e-3 g′
  (a hard, badly conditioned instance); the optimum puts ~96–99 on g₃, g₄."""
  rows = np.random.default_rng(3).normal(size=(5, 20))
  return np.stack([rows[0], rows[0] + 1e-6 * rows[1], rows[2],
                   -rows[2] + 1e-3 * rows[3], rows[4]]).astype(np.float32)


def check_nearly_opposite_pair_float32(strategy, exact_weights):
  """On nearly_opposite_pair_jacobian, in float32: the weights of the pair
  (~96–99) are within 10 % of ``exact_weights(G)`` (float64, on the same
  float32 Gramian), and the update conflicts with no gradient beyond
  float32's floor (the exact weights, rounded to float32 and combined in
  float32, conflict by about 7e-6)."""
  jacobian = nearly_opposite_pair_jacobian()
  update, state = strategy.update(jnp.asarray(jacobian), strategy.init(None),
                                  task_losses=jnp.ones(5))
  gramian = np.asarray(optax_mtl.gramian(jnp.asarray(jacobian)), np.float64)
  np.testing.assert_allclose(state.weights[2:4],
                             exact_weights(gramian)[2:4], rtol=0.1)
  rows = jacobian.astype(np.float64)
  direction = np.asarray(update, np.float64)
  cosines = rows @ direction / (np.linalg.norm(rows, axis=1)
                                * np.linalg.norm(direction))
  assert cosines.min() >= -3e-5, cosines


def test_nearly_opposite_gradients_reach_the_optimum_float32():
  # The exact projections: SciPy/NumPy active-set enumeration.
  from tests import test_solvers  # pylint: disable=import-outside-toplevel
  check_nearly_opposite_pair_float32(
      optax_mtl.upgrad(5), lambda gramian: np.mean(
          [test_solvers.exact_dual_cone(gramian, row) for row in np.eye(5)],
          axis=0))


def test_old_spellings_warn_and_give_the_same_strategy():
  # 0.1: upgrad(T, preferences=...), state.solutions.
  gramian_harness.check_old_spelling(
      lambda: optax_mtl.upgrad(3, preferences=(0.5, 0.3, 0.2)),
      lambda: optax_mtl.upgrad(3, (0.5, 0.3, 0.2)), old="preferences",
      renamed_fields={"solutions": "solution"})
