"""Tests of optax_mtl.pcd and its solver (Varam et al. 2026, PCD).

The solver is checked against SciPy on the primal problem written from the
paper,

  min_d ½‖d − g₁‖²  s.t.  g_jᵀd ≥ τ_j‖g_j‖²  (j ≥ 2),

on random instances (SLSQP in float64 for the solution, ``linprog`` for
feasibility: an infeasible instance must give ``d = g₁``). The strategy is
checked against a NumPy reference of the whole step: the bias-corrected
moving average of ``‖g_k‖²``, the normalised gradients, the same SciPy QP
and the rescaling of ``d̃`` to ``‖g₁‖``.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg
from scipy import optimize

import optax_mtl
from optax_mtl._src import solvers
from tests import gramian_harness
from tests import strategies


def scipy_pcd_direction(jacobian, taus):
  """The QP's ``d`` (float64), or None when SciPy's ``linprog`` says that
  the constraints cannot hold together.

  Exact, by the paper's enumeration of working sets (its Appendix B.2):
  for every set S of constraints with independent gradients, the point
  ``d = g₁ + J_Sᵀμ`` that holds them with equality (``scipy.linalg.solve``);
  the optimum is the one with ``μ ≥ 0`` that satisfies every constraint
  (a KKT point; the QP is strictly convex, so it is unique).
  """
  jacobian = np.asarray(jacobian, np.float64)
  primary, secondary = jacobian[0], jacobian[1:]
  bounds = np.asarray(taus) * np.sum(secondary**2, axis=1)
  if not len(secondary):
    return primary
  feasibility = optimize.linprog(
      np.zeros(jacobian.shape[1]), A_ub=-secondary, b_ub=-bounds,
      bounds=[(None, None)] * jacobian.shape[1], method="highs")
  if feasibility.status == 2:
    return None
  assert feasibility.status == 0, feasibility.message
  size = np.max(np.abs(secondary) @ np.abs(primary)) + np.max(bounds)
  tolerance = 1e-9 * (1 + size)
  for subset in itertools.chain.from_iterable(
      itertools.combinations(range(len(secondary)), k)
      for k in range(len(secondary) + 1)):
    rows = secondary[list(subset)]
    if subset and np.linalg.matrix_rank(rows) < len(subset):
      continue
    multipliers = (linalg.solve(rows @ rows.T, bounds[list(subset)]
                                - rows @ primary, assume_a="pos")
                   if subset else np.zeros(0))
    direction = primary + multipliers @ rows
    if np.all(multipliers >= -tolerance) and np.all(
        secondary @ direction - bounds >= -tolerance):
      return direction
  raise AssertionError("no KKT point found")


def random_instance(rng, num_tasks, dimension):
  jacobian = rng.normal(size=(num_tasks, dimension)) * np.exp(
      rng.uniform(-2, 2, size=(num_tasks, 1)))
  taus = rng.uniform(0, 1, num_tasks - 1) * rng.choice([0.05, 1.0])
  return jacobian, taus


@pytest.mark.parametrize("x64", [True, False])
def test_solver_matches_scipy_on_random_instances(x64):
  """Independent and dependent gradients (dimension below T), feasible and
  infeasible constraints."""
  rng = np.random.default_rng(0)
  counts = {"feasible": 0, "infeasible": 0}
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    solve = jax.jit(solvers.solve_priority_qp)  # Compiled once per T.
    for num_tasks, dimension in [(3, 5), (5, 2), (5, 8), (5, 3)] * 10:
      jacobian, taus = random_instance(rng, num_tasks, dimension)
      expected = scipy_pcd_direction(jacobian, taus)
      result = solve(jnp.asarray(jacobian @ jacobian.T, dtype),
                     jnp.asarray(taus, dtype))
      direction = np.asarray(result.weights, np.float64) @ jacobian
      if expected is None:
        counts["infeasible"] += 1
        assert int(result.outcome) == solvers.Outcome.NO_SOLUTION
        np.testing.assert_array_equal(result.weights,
                                      np.eye(num_tasks)[0])
        continue
      counts["feasible"] += 1
      assert int(result.outcome) == solvers.Outcome.SUCCESS, result
      assert np.all(np.asarray(result.weights)[1:] >= 0)
      # The error of an active-set solve: the dtype's round-off times the
      # conditioning of the active block, about the size of the terms.
      size = np.abs(np.asarray(result.weights)) @ np.linalg.norm(
          jacobian, axis=1)
      atol = (1e-9 if x64 else 2e-4) * size
      np.testing.assert_allclose(direction, expected, rtol=0, atol=atol)
  assert counts["feasible"] > 20 and counts["infeasible"] > 3, counts


def test_solver_two_tasks_closed_form():
  """T = 2 (Corollary 4.6): μ = max(0, τ‖g₂‖² − g₂ᵀg₁)/‖g₂‖²."""
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    solve = jax.jit(solvers.solve_priority_qp)
    for _ in range(20):
      jacobian = rng.normal(size=(2, 4))
      tau = rng.uniform()
      g1, g2 = jacobian
      expected = max(0.0, tau * g2 @ g2 - g2 @ g1) / (g2 @ g2)
      result = solve(jnp.asarray(jacobian @ jacobian.T), jnp.asarray([tau]))
      np.testing.assert_allclose(result.weights, [1.0, expected], rtol=1e-10,
                                 atol=1e-12)


def test_solver_does_not_depend_on_a_common_scale():
  rng = np.random.default_rng(2)
  jacobian, taus = random_instance(rng, 5, 7)
  gramian = jacobian @ jacobian.T
  solve = jax.jit(solvers.solve_priority_qp)
  base_weights = solve(jnp.asarray(gramian, jnp.float32),
                       jnp.asarray(taus)).weights
  for scale in (2.0**-60, 2.0**40):
    scaled = solve(jnp.asarray(gramian * scale, jnp.float32),
                   jnp.asarray(taus)).weights
    np.testing.assert_array_equal(scaled, base_weights)


def test_solver_reports_a_non_finite_gramian():
  result = solvers.solve_priority_qp(jnp.array([[1.0, jnp.nan], [0.0, 1.0]]),
                                     jnp.array([0.1]))
  assert int(result.outcome) == solvers.Outcome.NONFINITE
  np.testing.assert_array_equal(result.weights, [1.0, 0.0])


def reference_run(jacobians, tau, beta, eps):
  """PCD per step (float64): (weights, average) of every step."""
  num_tasks = jacobians[0].shape[0]
  average = np.zeros(num_tasks)
  taus = np.broadcast_to(tau, (num_tasks - 1,))
  out = []
  for step, jacobian in enumerate(jacobians, start=1):
    squared_norms = np.sum(jacobian**2, axis=1)
    average = beta * average + (1 - beta) * squared_norms
    scales = 1 / np.sqrt(average / (1 - beta**step) + eps)
    normalised = jacobian * scales[:, None]
    direction = scipy_pcd_direction(normalised, taus)
    if direction is None:
      direction = normalised[0]
    direction = direction * np.sqrt(squared_norms[0]) / np.linalg.norm(
        direction)
    # The weights w with Jᵀw = d (least squares: J has full row rank here).
    weights = np.linalg.lstsq(jacobian.T, direction, rcond=None)[0]
    out.append((weights, direction, average))
  return out


@pytest.mark.parametrize("kwargs", [
    dict(tau=0.02, decay=0.999, eps=1e-8),
    dict(tau=(0.5, 0.2, 0.9), decay=0.5, eps=0.0),
])
def test_golden_values_optax_face(kwargs):
  """A run of six steps; the fourth, with a NaN loss, is rejected and
  leaves the moving average alone."""
  rng = np.random.default_rng(3)
  num_tasks = 4
  jacobians = [rng.normal(size=(num_tasks, 6)) * np.array(
      [[1.0], [10.0], [0.1], [3.0]]) for _ in range(6)]
  expected = reference_run([j for i, j in enumerate(jacobians) if i != 3],
                           np.asarray(kwargs["tau"]), kwargs["decay"],
                           kwargs["eps"])
  expected.insert(3, expected[2])  # The rejected step keeps the last ones.
  strategy = optax_mtl.pcd(num_tasks, **kwargs)
  update_fn = jax.jit(strategy.update)
  state = strategy.init(None)
  for index, jacobian in enumerate(jacobians):
    losses = jnp.ones(num_tasks)
    if index == 3:
      losses = losses.at[1].set(jnp.nan)
    update, state = update_fn(jnp.asarray(jacobian, jnp.float32), state,
                              task_losses=losses)
    weights, direction, average = expected[index]
    np.testing.assert_allclose(state.squared_norm_average, average,
                               rtol=1e-5)
    if index == 3:
      assert int(state.num_skipped) == 1
      continue
    np.testing.assert_allclose(update, direction, rtol=0,
                               atol=2e-4 * np.linalg.norm(direction))
    np.testing.assert_allclose(state.weights, weights, rtol=1e-3, atol=1e-4)
    assert bool(state.solver_converged)
  assert int(state.num_steps) == 5


def test_secondary_scale_does_not_matter_and_primary_scale_scales_d():
  rng = np.random.default_rng(4)
  strategy = optax_mtl.pcd(3, tau=0.4, eps=0.0)
  jacobians = [jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
               for _ in range(3)]

  def run(factors):
    state = strategy.init(None)
    for jacobian in jacobians:
      update, state = strategy.update(jacobian * factors[:, None], state,
                                      task_losses=jnp.ones(3))
    return np.asarray(update)

  plain = run(jnp.ones(3))
  np.testing.assert_allclose(run(jnp.array([1.0, 1e3, 1e-3])), plain,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(run(jnp.array([7.0, 1.0, 1.0])), 7 * plain,
                             rtol=1e-4, atol=1e-5)


def test_special_cases():
  strategy = optax_mtl.pcd(3, tau=0.5)
  losses = jnp.ones(3)
  # g₁ = 0: no update.
  grads = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
  update, state = strategy.update(grads, strategy.init(None),
                                  task_losses=losses)
  np.testing.assert_array_equal(update, [0.0, 0.0])
  # Opposed secondary gradients: the constraints are dropped, d = g₁.
  grads = jnp.array([[1.0, 2.0], [1.0, 0.0], [-1.0, 0.0]])
  update, state = strategy.update(grads, strategy.init(None),
                                  task_losses=losses)
  np.testing.assert_allclose(update, [1.0, 2.0], rtol=1e-6)
  assert not bool(state.solver_converged)
  assert int(state.num_skipped) == 0
  # One task: its own gradient.
  single = optax_mtl.pcd(1)
  update, _ = single.update(jnp.array([[3.0, -4.0]]), single.init(None),
                            task_losses=jnp.ones(1))
  np.testing.assert_allclose(update, [3.0, -4.0], rtol=1e-6)


def test_value_and_grad_face_matches_the_optax_face():
  """Through the engine (Gramian by the Jacobian) as through update."""
  directions = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4)),
                           jnp.float32)
  scales = jnp.array([1.0, 2.0, 0.5])

  def loss_fn(params):
    return scales * jnp.exp(directions @ params)

  strategy = optax_mtl.pcd(3, tau=0.3)
  step = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  params = jnp.zeros(4)
  (losses, grads), state = step(params, strategy.init(params))
  task_grads = jax.jacrev(loss_fn)(params)
  update, optax_state = strategy.update(task_grads, strategy.init(params),
                                        task_losses=losses)
  np.testing.assert_allclose(grads, update, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.weights, optax_state.weights, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tau=-0.1), r"tau must lie in \[0.0, 1.0\], got -0.1"),
    (dict(tau=1.5), r"tau must lie in \[0.0, 1.0\], got 1.5"),
    (dict(tau=(0.1,)), r"tau must be a number in \[0, 1\] or 2 numbers"),
    (dict(tau=(0.1, 2.0)), r"tau must be a number in \[0, 1\] or 2 numbers"),
    (dict(decay=1.0), r"decay must lie in \[0.0, 1.0\), got 1.0"),
    (dict(eps=-1e-8), r"eps must lie in \[0.0, inf\), got -1e-08"),
    (dict(max_iters=0), "max_iters must be an integer >= 1, got 0"),
    (dict(tol=-1.0), r"tol must lie in \[0.0, inf\), got -1.0"),
])
def test_bad_hyperparameters_are_rejected(kwargs, message):
  strategies.check_rejects(optax_mtl.pcd, kwargs, message)


def test_old_spelling_warns_and_gives_the_same_strategy():
  # 0.1: pcd(T, tau, beta=...) (the old average's weight is now decay).
  gramian_harness.check_old_spelling(
      lambda: optax_mtl.pcd(3, 0.3, beta=0.9),
      lambda: optax_mtl.pcd(3, 0.3, 0.9), old="beta")
