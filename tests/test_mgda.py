"""Tests of optax_mtl.mgda (Sener & Koltun 2018)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import gramian_harness

# A scripted sequence of small Jacobians [T=3, 4]: conflicting, aligned,
# one zero gradient, very different scales.
JACOBIANS = np.array([
    [[1.0, 0.0, 0.5, 0.0], [-0.5, 1.0, 0.0, 0.2], [0.3, -0.4, 1.0, 0.0]],
    [[2.0, 1.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0], [1.2, 1.6, -0.5, 0.0]],
    [[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.5, 2.0], [-1.0, 0.5, 0.0, 1.0]],
    [[100.0, 0.0, 5.0, 0.0], [0.0, 0.01, 0.0, 0.02], [3.0, -2.0, 1.0, 0.0]],
])
LOSSES = np.array([[1.0, 2.0, 0.5], [0.7, 1.5, 0.4], [0.5, 1.2, 0.3],
                   [0.4, 1.0, 0.3]])


def numpy_min_norm(gramian):
  """argmin_{w ∈ Δ} wᵀGw by enumerating the faces (KKT on each support)."""
  num_tasks = len(gramian)
  best, best_value = None, np.inf
  for size in range(1, num_tasks + 1):
    for support in itertools.combinations(range(num_tasks), size):
      support = list(support)
      system = np.zeros((size + 1, size + 1))
      system[:size, :size] = gramian[np.ix_(support, support)]
      system[:size, size] = -1.0
      system[size, :size] = 1.0
      rhs = np.zeros(size + 1)
      rhs[size] = 1.0
      solution = np.linalg.lstsq(system, rhs, rcond=None)[0][:size]
      if solution.min() < -1e-12 or abs(solution.sum() - 1) > 1e-9:
        continue
      weights = np.zeros(num_tasks)
      weights[support] = solution
      value = weights @ gramian @ weights
      if value < best_value - 1e-15:
        best, best_value = weights, value
  return best


def numpy_mgda(jacobian, losses, normalization):
  """Weights of Σ w_k g_k from the paper's formula with the normalisation."""
  norms = np.linalg.norm(jacobian, axis=1)
  inverse_norms = np.where(norms > 1e-12, 1 / np.where(norms > 0, norms, 1), 0)
  scales = {"none": np.ones(len(losses)), "l2": inverse_norms,
            "loss": 1 / losses, "loss+": inverse_norms / losses}[normalization]
  scaled = jacobian * scales[:, None]
  return numpy_min_norm(scaled @ scaled.T) * scales


@pytest.mark.parametrize("normalization", ["none", "l2", "loss", "loss+"])
def test_golden_values_over_a_scripted_sequence(normalization):
  strategy = optax_mtl.mgda(num_tasks=3, normalization=normalization)
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  for jacobian, losses in zip(JACOBIANS, LOSSES):
    combined, state = update(jnp.asarray(jacobian, jnp.float32), state,
                             task_losses=jnp.asarray(losses, jnp.float32))
    expected = numpy_mgda(jacobian, losses, normalization)
    np.testing.assert_allclose(state.weights, expected, atol=2e-4,
                               rtol=2e-3)
    np.testing.assert_allclose(combined, expected @ jacobian, atol=2e-3,
                               rtol=2e-3)
    assert bool(state.solver_converged)
    assert state.solver_iterations.dtype == jnp.int32
  assert int(state.num_skipped) == 0


def test_kkt_conditions_and_common_descent():
  # d = Σ w_k g_k on the simplex: g_kᵀd >= ‖d‖² for all k, = where w_k > 0.
  for jacobian, direction, weights, _ in gramian_harness.fresh_steps(
      optax_mtl.mgda(num_tasks=5, tol=1e-7, max_iters=2000), 5, 7, 8):
    np.testing.assert_allclose(weights.sum(), 1.0, atol=1e-6)
    assert weights.min() >= 0
    scale = np.max(np.sum(jacobian**2, axis=1))
    products = jacobian @ direction
    squared = direction @ direction
    assert np.all(products >= squared - 1e-4 * scale)
    np.testing.assert_allclose(products[weights > 1e-3], squared,
                               atol=1e-3 * scale)


def test_permutation_invariance_and_scaling():
  rng = np.random.default_rng(1)
  jacobian = rng.normal(size=(4, 3))
  strategy = optax_mtl.mgda(num_tasks=4, tol=1e-7, max_iters=2000)
  update = jax.jit(strategy.update)
  state = strategy.init(None)

  def weights_of(matrix):
    return np.asarray(update(jnp.asarray(matrix, jnp.float32), state,
                             task_losses=jnp.ones(4))[1].weights)

  order = rng.permutation(4)
  np.testing.assert_allclose(weights_of(jacobian[order]),
                             weights_of(jacobian)[order], atol=1e-4)
  # Scaling every gradient by κ scales d by κ: the weights stay.
  for factor in (1e-5, 1e5):
    np.testing.assert_allclose(weights_of(factor * jacobian),
                               weights_of(jacobian), atol=1e-4)


def test_warm_start_from_the_solution_of_the_last_step():
  first, state = gramian_harness.check_warm_start_repeats(
      optax_mtl.mgda(num_tasks=3), JACOBIANS[0])
  np.testing.assert_allclose(
      state.solution, numpy_min_norm(JACOBIANS[0] @ JACOBIANS[0].T),
      atol=1e-5)
  np.testing.assert_allclose(first, state.solution @ JACOBIANS[0], atol=1e-5)


@pytest.mark.parametrize("normalization", ["none", "loss+"])
def test_both_faces_agree(normalization):
  jacobian = JACOBIANS[0].astype(np.float32)
  offsets = LOSSES[0].astype(np.float32)
  _, state = gramian_harness.check_both_faces_agree(
      optax_mtl.mgda(num_tasks=3, normalization=normalization), jacobian,
      gramian_harness.linear_loss(jacobian, offsets), jnp.zeros(4),
      grads_tolerance=dict(atol=1e-5), weights_tolerance=dict(atol=1e-6))
  expected = numpy_mgda(jacobian.astype(np.float64), offsets, normalization)
  np.testing.assert_allclose(state.weights, expected, atol=2e-4, rtol=2e-3)


def test_positive_losses_needed_only_by_loss_normalisations():
  for normalization, needed in (("none", False), ("l2", False),
                                ("loss", True), ("loss+", True)):
    strategy = optax_mtl.mgda(num_tasks=2, normalization=normalization)
    _, state = strategy.update(jnp.eye(2), strategy.init(None),
                               task_losses=jnp.array([1.0, -1.0]))
    assert int(state.num_skipped) == int(needed), normalization
  strategy = optax_mtl.mgda(num_tasks=2, normalization="loss")
  state = strategy.init(None)
  _, state = strategy.update(jnp.eye(2), state, task_losses=jnp.ones(2))
  _, rejected = strategy.update(jnp.eye(2), state,
                                task_losses=jnp.array([1.0, -1.0]))
  assert int(rejected.num_skipped) == 1
  np.testing.assert_allclose(rejected.weights, state.weights)


def test_state_and_periodic_recomputation():
  strategy = optax_mtl.recompute_every(optax_mtl.mgda(num_tasks=3), 2)
  state = strategy.init(None)
  update = jax.jit(strategy.update)
  _, state = update(jnp.asarray(JACOBIANS[0], jnp.float32), state,
                    task_losses=jnp.ones(3))
  first = np.asarray(state.inner_state.weights)
  _, state = update(jnp.asarray(JACOBIANS[1], jnp.float32), state,
                    task_losses=jnp.ones(3))
  np.testing.assert_allclose(state.inner_state.weights, first)  # Reused.
  state = optax_mtl.mgda(num_tasks=3).init(None)
  assert isinstance(state, optax_mtl.MgdaState)
  assert state.solver_gap.dtype == jnp.float32
  assert state.solver_converged.dtype == jnp.bool_


@pytest.mark.parametrize("kwargs, message",
                         gramian_harness.hyperparameter_errors(
                             *gramian_harness.SOLVER_ERRORS,
                             ({"num_tasks": 2, "normalization": "l1"},
                              "normalization"),
                             ({"num_tasks": 2, "min_relative_norm": -1.0},
                              "min_relative_norm"),
                             ({"num_tasks": 2, "min_relative_norm": 1.0},
                              "min_relative_norm")))
def test_hyperparameter_errors(kwargs, message):
  gramian_harness.check_rejects(optax_mtl.mgda, kwargs, message)


@pytest.mark.parametrize("factory, kwargs", [
    (optax_mtl.mgda, dict(normalization="l2")),
    (optax_mtl.normalized_gradients, {})])
def test_old_spelling_warns_and_gives_the_same_strategy(factory, kwargs):
  # 0.1: mgda(T, eps=...) and normalized_gradients(T, eps=...), a cut-off
  # on the relative norm (now min_relative_norm).
  gramian_harness.check_old_spelling(
      lambda: factory(3, eps=0.5, **kwargs),
      lambda: factory(3, min_relative_norm=0.5, **kwargs), old="eps",
      jacobian=[[1.0, 0.0], [0.0, 0.4], [3.0, 1.0]])
