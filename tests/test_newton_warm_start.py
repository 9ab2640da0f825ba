"""Warm starts of the Newton solvers (nash_mtl, fairgrad): same solution as a
cold start (checked against SciPy), few steps on a drifting Gramian, and a
warm start that a rejected step leaves as it was."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from optax_mtl._src import solvers
from optax_mtl._src.solvers import _alpha_fair
from tests import test_fairgrad
from tests import test_nash_mtl


@functools.partial(jax.jit, static_argnames=("alpha", "tol"))
def solve(gramian, warm_start, alpha, tol=None):
  """``solve_alpha_fair`` (``solve_nash`` for α = 1), and its ``u``."""
  if alpha == 1.0:
    result = solvers.solve_nash(gramian, tol=tol, warm_start=warm_start)
  else:
    result = solvers.solve_alpha_fair(gramian, alpha, tol=tol,
                                      warm_start=warm_start)
  return result, _alpha_fair.scale_free_solution(result.weights, gramian,
                                                 alpha)


def scipy_solution(gramian, alpha):
  if alpha == 1.0:
    jacobian = np.linalg.cholesky(gramian)  # Rows: gradients, L Lᵀ = G.
    return test_nash_mtl.nash_reference(jacobian)[0]
  return test_fairgrad.scipy_alpha_fair(gramian, alpha)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("num_tasks, seed", [(3, 0), (8, 1), (16, 2)])
def test_warm_start_reaches_the_cold_solution(alpha, num_tasks, seed):
  gramian = test_fairgrad.random_gramian(num_tasks, num_tasks + 3, seed)
  expected = scipy_solution(gramian, alpha)
  rng = np.random.default_rng(seed)
  exact = expected * np.diag(gramian) ** (alpha / (alpha + 1))  # u*.
  guesses = {
      "near": exact * rng.uniform(0.5, 2.0, num_tasks),
      "far": np.exp(rng.uniform(-7, 7, num_tasks)),
      # Unusable entries (0, negative, NaN, inf) fall back to the cold 1.
      "unusable": np.where(np.arange(num_tasks) % 4 == 0, np.nan, exact)
                  * np.where(np.arange(num_tasks) % 4 == 1, -1.0, 1.0),
      "zero": np.zeros(num_tasks),
  }
  with jax.enable_x64(True):
    cold, _ = solve(jnp.asarray(gramian), None, alpha)
    for label, guess in guesses.items():
      warm, _ = solve(jnp.asarray(gramian), jnp.asarray(guess), alpha)
      assert int(warm.outcome) == solvers.Outcome.SUCCESS, label
      # The test of test_fairgrad.test_solver_matches_scipy (the SciPy
      # reference's own accuracy), and the cold start's within its tol.
      np.testing.assert_allclose(warm.weights, expected, rtol=1e-7,
                                 err_msg=label)
      np.testing.assert_allclose(warm.weights, cold.weights, rtol=1e-10,
                                 err_msg=label)
    # A guess of zeros is no guess: the cold start, bit for bit.
    zero, _ = solve(jnp.asarray(gramian), jnp.zeros(num_tasks), alpha)
    np.testing.assert_array_equal(zero.weights, cold.weights)
    assert int(zero.iterations) == int(cold.iterations)
    # The exact solution needs no step at all.
    at_solution, _ = solve(jnp.asarray(gramian), jnp.asarray(exact), alpha)
    assert int(at_solution.iterations) == 0


def drifting_gramians(num_tasks, drift, steps, seed):
  """``G_t = J_t J_tᵀ``: each row of ``J`` turns by about ``drift`` radians
  and changes its norm by about ``drift`` per step."""
  rng = np.random.default_rng(seed)
  jacobian = rng.normal(size=(num_tasks, 2 * num_tasks)) * np.exp(
      rng.uniform(-1, 1, (num_tasks, 1)))
  norms = np.linalg.norm(jacobian, axis=1, keepdims=True)
  turn = rng.normal(size=jacobian.shape) * norms / np.sqrt(2 * num_tasks)
  stretch = rng.uniform(-1, 1, (num_tasks, 1))
  for t in range(steps):
    moved = (jacobian + t * drift * turn) * np.exp(t * drift * stretch)
    yield moved @ moved.T


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("num_tasks", [3, 10, 40])
def test_drifting_gramian_needs_at_most_two_steps(alpha, num_tasks):
  # float32 and its default tol (1e-6), as in training; a drift of 1e-2
  # per step (the cosines and the norms).
  guess = None
  iterations, cold_iterations = [], []
  for gramian in drifting_gramians(num_tasks, 1e-2, 12, seed=num_tasks):
    gramian = jnp.asarray(gramian, jnp.float32)
    result, guess = solve(gramian, guess, alpha)
    assert int(result.outcome) == solvers.Outcome.SUCCESS
    iterations.append(int(result.iterations))
    cold_iterations.append(int(solve(gramian, None, alpha)[0].iterations))
  assert max(iterations[1:]) <= 2, iterations
  # The cold starts need more: the test can fail.
  assert sum(iterations[1:]) < sum(cold_iterations[1:]), cold_iterations


def step_function(strategy):
  jacobian = jnp.asarray(
      np.random.default_rng(3).normal(size=(4, 6)), jnp.float32)

  def loss_fn(params, data):
    return (jacobian * data) @ params + 1.0

  return jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))


@pytest.mark.parametrize("make", [
    lambda: optax_mtl.nash_mtl(4),
    lambda: optax_mtl.fairgrad(4),
])
def test_rejected_step_keeps_the_warm_start(make):
  strategy = make()
  step = step_function(strategy)
  params = jnp.ones(6)
  state = strategy.init(params)
  assert not np.any(np.asarray(state.solution))  # No guess: a cold start.
  data = [jnp.asarray(1.0 + 0.05 * np.random.default_rng(i).normal(size=6),
                      jnp.float32) for i in range(3)]
  _, first = step(params, state, data[0])
  assert np.all(np.asarray(first.solution) > 0)
  # A NaN in the data: a non-finite loss and Gramian, the step rejected.
  (_, update), rejected = step(params, first, data[1].at[0].set(jnp.nan))
  assert int(rejected.num_skipped) == 1
  np.testing.assert_array_equal(rejected.solution, first.solution)
  # The next step is the one it would have been without the rejected step.
  (_, expected_update), expected = step(params, first, data[2])
  (_, got_update), got = step(params, rejected, data[2])
  np.testing.assert_array_equal(got_update, expected_update)
  np.testing.assert_array_equal(got.solution, expected.solution)
  assert int(got.solver_iterations) == int(expected.solver_iterations)
  assert np.all(np.isfinite(np.asarray(update)))


@pytest.mark.parametrize("make, cold_solve", [
    (lambda: optax_mtl.nash_mtl(3), solvers.solve_nash),
    (lambda: optax_mtl.fairgrad(3),
     lambda gramian: solvers.solve_alpha_fair(gramian, 2.0)),
])
def test_the_first_step_is_the_cold_solve(make, cold_solve):
  strategy = make()
  gramian = jnp.asarray(test_fairgrad.random_gramian(3, 5, 9), jnp.float32)
  task_grads = jnp.linalg.cholesky(gramian)
  _, state = strategy.update(task_grads, strategy.init(None),
                             task_losses=jnp.ones(3))
  cold = cold_solve(task_grads @ task_grads.T)
  assert int(state.solver_iterations) == int(cold.iterations) > 2
  np.testing.assert_allclose(state.weights, cold.weights, rtol=1e-5)
