"""Tests of optax_mtl.cagrad (Liu et al. 2021)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import gramian_harness
from tests import scipy_references

# A scripted sequence of small Jacobians [T=3, 4]. (A zero task gradient
# makes the update ambiguous, 0/0 in Algorithm 1; see test_special_cases.)
JACOBIANS = np.array([
    [[1.0, 0.0, 0.5, 0.0], [-0.5, 1.0, 0.0, 0.2], [0.3, -0.4, 1.0, 0.0]],
    [[2.0, 1.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0], [1.2, 1.6, 0.5, 0.0]],
    [[0.2, 0.0, -0.3, 0.0], [1.0, -1.0, 0.5, 2.0], [-1.0, 0.5, 0.0, 1.0]],
    [[1.0, 2.0, 0.0, 0.0], [-1.0, -2.0, 0.5, 0.0], [0.0, 1.0, 1.0, 0.0]],
])


def golden_section(function, low, high):
  return scipy_references.golden_section(function, low, high, iterations=80)


def numpy_cagrad(jacobian, c, rescale=0):
  """The paper's Eq. 4 minimised over the 3-simplex, then Algorithm 1, then
  LibMTL's ``rescale``: 0 none, 1 divided by 1 + c², 2 by 1 + c."""
  mean_gradient = jacobian.mean(axis=0)
  radius = c * np.linalg.norm(mean_gradient)  # √φ.

  def dual(weights):
    combined = weights @ jacobian
    return combined @ mean_gradient + radius * np.linalg.norm(combined)

  def best_given_first(first):  # Convex in `first` (partial minimisation).
    second = golden_section(
        lambda t: dual(np.array([first, t, 1 - first - t])), 0.0, 1 - first)
    return np.array([first, second, 1 - first - second])

  first = golden_section(lambda a: dual(best_given_first(a)), 0.0, 1.0)
  weights = best_given_first(first)
  norm = np.linalg.norm(weights @ jacobian)
  combined = mean_gradient + (radius / norm if norm > 0 else 0) * (
      weights @ jacobian)
  return combined / {0: 1.0, 1: 1 + c**2, 2: 1 + c}[int(rescale)]


@pytest.mark.parametrize("c, rescale", [(0.5, False), (0.9, True), (0.9, 1),
                                        (0.7, 2), (0.4, 0)])
def test_golden_values_over_a_scripted_sequence(c, rescale):
  strategy = optax_mtl.cagrad(num_tasks=3, c=c, rescale=rescale)
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  for jacobian in JACOBIANS:
    combined, state = update(jnp.asarray(jacobian, jnp.float32), state,
                             task_losses=jnp.ones(3))
    expected = numpy_cagrad(jacobian, c, rescale)
    np.testing.assert_allclose(combined, expected, atol=2e-4, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(state.weights) @ jacobian, expected,
                               atol=2e-4, rtol=1e-3)
    assert bool(state.solver_converged)


def test_primal_optimality_certificate():
  # d solves max_d min_i g_iᵀd s.t. ‖d - g_0‖ <= c‖g_0‖: feasible, and its
  # value min_i g_iᵀd meets the dual value at w (strong duality).
  for jacobian, direction, weights, _ in gramian_harness.fresh_steps(
      optax_mtl.cagrad(5, 0.4, tol=1e-7, max_iters=2000), 5, 8, 6):
    mean_gradient = jacobian.mean(axis=0)
    radius = 0.4 * np.linalg.norm(mean_gradient)
    assert np.linalg.norm(direction - mean_gradient) <= radius * (1 + 1e-4)
    # The dual point w is recovered from the weights 1/T + (√φ/‖g_w‖) w.
    dual_weights = (weights - 1 / 5) / np.sum(weights - 1 / 5)
    combined_w = dual_weights @ jacobian
    dual_value = combined_w @ mean_gradient + radius * np.linalg.norm(
        combined_w)
    primal_value = np.min(jacobian @ direction)
    scale = np.max(np.sum(jacobian**2, axis=1))
    assert primal_value >= dual_value - 1e-4 * scale


def test_special_cases():
  rng = np.random.default_rng(1)
  jacobian = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  # c = 0: the mean gradient.
  strategy = optax_mtl.cagrad(num_tasks=3, c=0.0)
  combined, state = strategy.update(jacobian, strategy.init(None),
                                    task_losses=jnp.ones(3))
  np.testing.assert_allclose(combined, jacobian.mean(axis=0), rtol=1e-5,
                             atol=1e-6)
  # rescale divides the paper's update by 1 + c².
  plain = optax_mtl.cagrad(num_tasks=3, c=0.7)
  scaled = optax_mtl.cagrad(num_tasks=3, c=0.7, rescale=True)
  d_plain, _ = plain.update(jacobian, plain.init(None), task_losses=jnp.ones(3))
  d_scaled, _ = scaled.update(jacobian, scaled.init(None),
                              task_losses=jnp.ones(3))
  np.testing.assert_allclose(d_scaled, d_plain / 1.49, rtol=1e-5)
  # Identical gradients: d = (1 + c) g.
  same = jnp.tile(jacobian[:1], (3, 1))
  d_same, _ = plain.update(same, plain.init(None), task_losses=jnp.ones(3))
  np.testing.assert_allclose(d_same, 1.7 * same[0], rtol=1e-5)
  # A zero task gradient: the dual optimum has g_w = 0, and the update is the
  # mean gradient, which is primal optimal (min_i g_iᵀd = 0 = g_1ᵀd).
  zero_task = jacobian.at[0].set(0.0).at[1].set(jnp.abs(jacobian[1])).at[
      2].set(jnp.abs(jacobian[2]))
  d_zero, state = plain.update(zero_task, plain.init(None),
                               task_losses=jnp.ones(3))
  np.testing.assert_allclose(d_zero, zero_task.mean(axis=0), rtol=1e-5)
  assert np.all(np.asarray(zero_task @ d_zero) >= 0)


def test_permutation_invariance_and_scaling():
  gramian_harness.check_permutation_invariance_and_homogeneity(
      optax_mtl.cagrad(num_tasks=4), 4, seed=2, permutation_atol=1e-4,
      rtol=1e-3, atol_per_factor=1e-4)


def test_warm_start_from_the_solution_of_the_last_step():
  first, _ = gramian_harness.check_warm_start_repeats(
      optax_mtl.cagrad(num_tasks=3), JACOBIANS[0])
  np.testing.assert_allclose(first, numpy_cagrad(JACOBIANS[0], 0.5),
                             atol=1e-5)


def test_both_faces_agree():
  jacobian = JACOBIANS[0].astype(np.float32)
  grads, _ = gramian_harness.check_both_faces_agree(
      optax_mtl.cagrad(num_tasks=3), jacobian,
      gramian_harness.linear_loss(jacobian, np.ones(3)), jnp.zeros(4),
      grads_tolerance=dict(atol=1e-6), weights_tolerance=dict(atol=1e-6))
  np.testing.assert_allclose(grads, numpy_cagrad(JACOBIANS[0], 0.5),
                             atol=2e-4)


def libmtl_cagrad(jacobian, dual_weights, calpha, rescale):
  """LibMTL's CAGrad update from its dual weights (without its 1e-8s)."""
  gramian = jacobian @ jacobian.T
  g0_norm = np.sqrt(gramian.mean())  # ‖g_0‖.
  coefficient = calpha * g0_norm
  combined = dual_weights @ jacobian
  update = jacobian.mean(axis=0) + coefficient / np.linalg.norm(
      combined) * combined
  return update / {0: 1.0, 1: 1 + calpha**2, 2: 1 + calpha}[rescale]


@pytest.mark.parametrize("rescale", [0, 1, 2])
def test_rescale_reproduces_libmtl(rescale):
  jacobian = JACOBIANS[0]
  strategy = optax_mtl.cagrad(num_tasks=3, c=0.6, rescale=rescale)
  combined, state = jax.jit(strategy.update)(
      jnp.asarray(jacobian, jnp.float32), strategy.init(None),
      task_losses=jnp.ones(3))
  expected = libmtl_cagrad(jacobian, np.asarray(state.solution, np.float64),
                           0.6, rescale)
  np.testing.assert_allclose(combined, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(combined, numpy_cagrad(jacobian, 0.6, rescale),
                             atol=2e-4, rtol=1e-3)


PARETO_STATIONARY = {
    # g_w = 0 at the optimum: d = g_0 by the documented convention.
    "zero_task": np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0],
                           [-1.0, 1.5, 0.2]]),
    "three_in_a_plane": np.array([[1.0, 0.0], [-0.5, 0.8], [-0.5, -0.8]]),
}


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("name", sorted(PARETO_STATIONARY))
def test_pareto_stationary_points_converge(name, x64):
  # 0 is in the hull and the dual optimum has g_w = 0; the solve must
  # certify it at once instead of running max_iters, and the step is kept.
  jacobian = PARETO_STATIONARY[name]
  strategy = optax_mtl.cagrad(num_tasks=3)
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    combined, state = jax.jit(strategy.update)(
        jnp.asarray(jacobian, dtype), strategy.init(None),
        task_losses=jnp.ones(3))
  assert int(state.num_skipped) == 0
  np.testing.assert_allclose(combined, jacobian.mean(axis=0), atol=1e-6)
  np.testing.assert_allclose(state.weights, np.full(3, 1 / 3), rtol=1e-6)
  assert int(state.solver_iterations) <= 10
  assert bool(state.solver_converged)


@pytest.mark.parametrize("kwargs, message",
                         gramian_harness.hyperparameter_errors(
                             ({"num_tasks": 2, "c": -0.1}, "c"),
                             ({"num_tasks": 2, "rescale": 3}, "rescale"),
                             ({"num_tasks": 2, "rescale": "1"}, "rescale"),
                             *gramian_harness.SOLVER_ERRORS))
def test_hyperparameter_errors(kwargs, message):
  gramian_harness.check_rejects(optax_mtl.cagrad, kwargs, message)


def test_a_worst_off_task_of_small_gradient_gets_the_exact_step_float32():
  # Two orthogonal gradients of norms 1e4 and 1: w* = (0, 1) and g_w = g_2,
  # whose ‖g_w‖² = G_22 is exact in float32. Algorithm 1's step is
  # g_0 + c ‖g_0‖ g_2 / ‖g_2‖, not the mean gradient.
  jacobian = np.array([[1e4, 0.0], [0.0, 1.0]])
  strategy = optax_mtl.cagrad(2, c=0.5)
  update, state = strategy.update(jnp.asarray(jacobian, jnp.float32),
                                  strategy.init(None), task_losses=jnp.ones(2))
  mean = jacobian.mean(0)
  exact = mean + 0.5 * np.linalg.norm(mean) * jacobian[1]
  np.testing.assert_allclose(update, exact, rtol=1e-6)
  assert bool(state.solver_converged)


def duality_gap_in_extended_precision(gramian, c, weights):
  """h(w) − min_k g_kᵀd for d = g_0 + r g_w/‖g_w‖ (in the ball), in NumPy's
  long double: by weak duality an upper bound of h(w) − h*, computed
  independently of the solver's arithmetic."""
  gramian = np.asarray(gramian, np.longdouble)
  weights = np.asarray(weights, np.longdouble)
  mean = np.full(len(weights), 1, np.longdouble) / len(weights)
  linear = gramian @ mean
  radius = np.longdouble(c) * np.sqrt(mean @ linear)
  product = gramian @ weights
  norm = np.sqrt(weights @ product)
  value = weights @ linear + radius * norm
  return float(value), float(value - np.min(linear + radius * product / norm))


def test_converged_only_at_the_optimum_with_gradient_norms_1e_4_to_1e4():
  # Norms spread over 1e-4 … 1e4 (float32 and float64): a reported
  # convergence means h(w) within the dtype's precision of h*, certified by
  # a primal point in extended precision; h* > 0 here (the primal point
  # shows it), so the step then improves every task.
  for seed in (3, 7, 11):
    jacobian = np.random.default_rng(seed).normal(size=(5, 20))
    jacobian *= np.logspace(-4, 4, 5)[:, None]
    for x64, rtol in ((False, 1e-4), (True, 1e-9)):
      with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        gramian = optax_mtl.gramian(jnp.asarray(jacobian, dtype))
        strategy = optax_mtl.cagrad(5)
        update, state = strategy.update(jnp.asarray(jacobian, dtype),
                                        strategy.init(None),
                                        task_losses=jnp.ones(5))
      with jax.enable_x64(True):  # h* of this Gramian, certified below.
        exact = optax_mtl.solve_cagrad(
            jnp.asarray(gramian, jnp.float64), 0.5).weights
      value, gap = duality_gap_in_extended_precision(gramian, 0.5, exact)
      assert gap <= 1e-9 * abs(value), (seed, x64, value, gap)
      ours, _ = duality_gap_in_extended_precision(gramian, 0.5,
                                                  state.solution)
      assert bool(state.solver_converged), (seed, x64)
      assert ours - (value - gap) <= rtol * abs(value), (seed, x64, ours,
                                                        value)
      assert value - gap > 0, (seed, x64)  # h* > 0: every task improves.
      products = jacobian @ np.asarray(update, np.float64)
      assert products.min() > 0, (seed, x64, products)
