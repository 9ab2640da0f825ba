"""Warm starts of CAGrad's and PCD's solvers: from any guess (a wrong
support or active set included) the answer is the exact one; from the
previous step's answer in slowly drifting training no iteration is left;
and a float32 solve that reports success is as close to the float64 optimum
as its certificate says (the start never weakens the stopping test)."""

import jax
import jax.numpy as jnp
import numpy as np

import optax_mtl
from optax_mtl._src import solvers
from tests import test_pcd
from tests import test_solvers


def _cagrad_size(gramian):
  """The size of CAGrad's objective terms: max_k ‖g_k‖ · ‖g_0‖."""
  norms = np.sqrt(np.maximum(np.diag(gramian), 0))
  return norms.max() * np.linalg.norm(test_solvers.factor(gramian).mean(0))


def test_cagrad_warm_start_from_wrong_supports_float64():
  rng = np.random.default_rng(31)
  solve = test_solvers.jitted("solve_cagrad")
  with jax.enable_x64(True):
    for num_tasks, kind, _, gramian in test_solvers.instances(31, (3, 5)):
      c = float(rng.uniform(0.1, 0.9))
      best = test_solvers.exact_cagrad(gramian, c)
      drifted = gramian + 0.05 * np.diag(np.diag(gramian))
      guesses = {
          "wrong support": rng.uniform(size=num_tasks) * (
              rng.uniform(size=num_tasks) < 0.5),
          "vertex": np.eye(num_tasks)[rng.integers(num_tasks)],
          "drifted optimum": np.asarray(solve(jnp.asarray(drifted),
                                              c).weights)}
      for name, guess in guesses.items():
        where = f"T={num_tasks} {kind} {name}"
        result = solve(jnp.asarray(gramian), c, warm_start=jnp.asarray(guess))
        assert bool(result.converged), (where, result)
        ours = test_solvers.cagrad_objective(gramian, c,
                                             np.asarray(result.weights))
        assert abs(ours - best) <= (1e-9 * abs(best)
                                    + 1e-7 * _cagrad_size(gramian)), where


def _drifting_jacobians(rng, num_tasks, steps, spread):
  """Task gradients that drift slowly, with norms spread over 10^±spread."""
  scales = rng.permutation(np.logspace(-spread, spread, num_tasks))[:, None]
  jacobian = rng.normal(size=(num_tasks, 3 * num_tasks))
  for _ in range(steps):
    jacobian = jacobian + 0.01 * rng.normal(size=jacobian.shape)
    yield jacobian * scales


def test_cagrad_warm_start_in_training_float32_is_certified_honestly():
  # Float32, as in training, with gradient norms over 1e-4 … 1e4: warm
  # started from the previous step, most steps need no trip, and every
  # success lies within what its certificate allows of the float64 optimum
  # of the same (float32-rounded) Gramian: tol = 1e-6 of the objective's
  # terms, or float32 round-off of them (1e-6 of the size at most).
  rng = np.random.default_rng(32)
  solve = test_solvers.jitted("solve_cagrad")
  for num_tasks, spread in ((6, 0), (8, 4)):
    guess, trips = jnp.full((num_tasks,), 1 / num_tasks, jnp.float32), []
    for jacobian in _drifting_jacobians(rng, num_tasks, 12, spread):
      gramian32 = jnp.asarray(jacobian @ jacobian.T, jnp.float32)
      gramian = np.asarray(gramian32, np.float64)
      result = solve(gramian32, 0.5, warm_start=guess)
      guess = result.weights
      trips.append(int(result.iterations))
      with jax.enable_x64(True):
        exact = np.asarray(solve(jnp.asarray(gramian), 0.5).weights)
      best = test_solvers.cagrad_objective(gramian, 0.5, exact)
      ours = test_solvers.cagrad_objective(
          gramian, 0.5, np.asarray(result.weights, np.float64))
      assert bool(result.converged), (num_tasks, spread, result)
      assert ours - best <= 1e-4 * abs(best) + 1e-6 * _cagrad_size(
          gramian), (num_tasks, spread, ours, best)
    assert np.median(trips[1:]) <= 1, trips


def test_pcd_warm_start_from_any_active_set_matches_scipy():
  rng = np.random.default_rng(33)
  solve = jax.jit(solvers.solve_priority_qp)
  with jax.enable_x64(True):
    for num_tasks, dimension in [(3, 5), (5, 2), (5, 8), (6, 4)] * 4:
      jacobian, taus = test_pcd.random_instance(rng, num_tasks, dimension)
      gramian = jnp.asarray(jacobian @ jacobian.T)
      expected = test_pcd.scipy_pcd_direction(jacobian, taus)
      cold = solve(gramian, jnp.asarray(taus))
      guesses = {
          "own": np.asarray(cold.weights),
          "wrong": np.concatenate([[1.0], rng.uniform(size=num_tasks - 1) * (
              rng.uniform(size=num_tasks - 1) < 0.5)]),
          "all active": np.ones(num_tasks),
          "non-finite": np.full(num_tasks, np.nan)}
      for name, guess in guesses.items():
        where = f"T={num_tasks} n={dimension} {name}"
        result = solve(gramian, jnp.asarray(taus),
                       warm_start=jnp.asarray(guess))
        if expected is None:
          assert int(result.outcome) == solvers.Outcome.NO_SOLUTION, where
          continue
        assert int(result.outcome) == solvers.Outcome.SUCCESS, (where, result)
        if name == "own":
          assert int(result.iterations) == 0, where
        direction = np.asarray(result.weights) @ jacobian
        size = np.abs(np.asarray(result.weights)) @ np.linalg.norm(
            jacobian, axis=1)
        np.testing.assert_allclose(direction, expected, rtol=0,
                                   atol=1e-9 * size, err_msg=where)


def test_pcd_keeps_its_active_set_and_the_cold_answer():
  # The strategy's state carries the solution; in drifting training the
  # steps after the first make no solver iteration, and each update equals
  # the one computed from a state without it (the cold start).
  rng = np.random.default_rng(34)
  strategy = optax_mtl.pcd(5, 0.3)
  state, trips = strategy.init(None), []
  for jacobian in _drifting_jacobians(rng, 5, 10, 0):
    grads = jnp.asarray(jacobian, jnp.float32)
    update, new_state = strategy.update(grads, state,
                                        task_losses=jnp.ones(5))
    cold_update, _ = strategy.update(
        grads, state._replace(solution=strategy.init(None).solution),
        task_losses=jnp.ones(5))
    # Float32 active-set solves of the same set: their round-off apart.
    np.testing.assert_allclose(update, cold_update, rtol=0,
                               atol=2e-4 * float(jnp.linalg.norm(update)))
    trips.append(int(new_state.solver_iterations))
    state = new_state
  assert np.median(trips[1:]) == 0, trips
