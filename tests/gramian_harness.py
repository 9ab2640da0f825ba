"""Scaffolding shared by the tests of the gradient-balancing strategies.

The tests of mgda, upgrad, dualproj, cagrad, pcgrad, gradnorm, imtl_g,
nash_mtl and aligned_mtl (``from tests import gramian_harness``) drive their
strategy the same ways: one jitted ``strategy.update`` on a fixed Jacobian,
both faces (``strategy.update`` and ``optax_mtl.value_and_grad``) on a linear
``loss_fn``, permutation and scaling of the Jacobian, shared parameters
that keep a head out of the Gramian, and the eager hyperparameter checks.
This module holds those drivers and the fixed Jacobians; the NumPy reference
of each paper's rule, and so the expected values and tolerances, stay in each
test file.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import optax_mtl
from tests import strategies

# Fixed Jacobians (rows are task gradients) used by several test files.
FIXED_JACOBIANS = {
    "t2_conflict": [[1.0, 0.0, 0.5], [-0.8, 0.6, 0.1]],
    "t3_mixed": [[1.0, 2.0, 0.0, -1.0], [0.5, -1.0, 1.0, 0.0],
                 [-1.0, 0.3, 0.2, 1.0]],
    "t4_rank2": [[1.0, -2.0, 0.5], [-0.5, 1.0, 1.0], [0.5, -1.0, 1.5],
                 [-1.5, 3.0, 0.5]],
    "t5_random": np.random.default_rng(5).normal(size=(5, 6)).tolist(),
}


def fixed_jacobians(*names: str, **extra: Any) -> dict[str, Any]:
  """The named entries of FIXED_JACOBIANS plus a file's own Jacobians."""
  return {**{name: FIXED_JACOBIANS[name] for name in names}, **extra}


# A scripted sequence of small Jacobians [T=3, 4] for the dual-cone rules
# (upgrad, dualproj): conflicting, aligned, one zero gradient, very different
# scales, two opposite gradients.
DUAL_CONE_JACOBIANS = np.array([
    [[1.0, 0.0, 0.5, 0.0], [-0.5, 1.0, 0.0, 0.2], [0.3, -0.4, 1.0, 0.0]],
    [[2.0, 1.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0], [1.2, 1.6, 0.5, 0.0]],
    [[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.5, 2.0], [-1.0, 0.5, 0.0, 1.0]],
    [[100.0, 0.0, 5.0, 0.0], [0.0, 0.01, 0.0, 0.02], [-3.0, -2.0, 1.0, 0.0]],
    [[1.0, 2.0, 0.0, 0.0], [-1.0, -2.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]],
])


@functools.lru_cache(maxsize=None)
def jitted_update(factory: Callable[..., Any], num_tasks: int, *args: Any,
                  **kwargs: Any):
  """``factory(num_tasks, *args, **kwargs)`` and its jitted update, cached."""
  strategy = factory(num_tasks, *args, **kwargs)
  return strategy, jax.jit(strategy.update)


def single_step(factory: Callable[..., Any], jacobian, *args: Any,
                **kwargs: Any):
  """One jitted update from a fresh state with unit losses.

  Returns the weights and the combined gradient as NumPy arrays, and the new
  state.
  """
  jacobian = jnp.asarray(jacobian, jnp.float32)
  strategy, update = jitted_update(factory, jacobian.shape[0], *args,
                                   **kwargs)
  combined, state = update(jacobian, strategy.init(None),
                           task_losses=jnp.ones(jacobian.shape[0]))
  return np.asarray(state.weights), np.asarray(combined), state


def linear_loss(jacobian, offsets):
  """The task losses ``offsets + J params``: their Jacobian is ``J``."""
  return lambda params: jnp.asarray(offsets) + jnp.asarray(jacobian) @ params


def check_both_faces_agree(strategy, jacobian, loss_fn, params, *,
                           grads_tolerance, weights_tolerance):
  """``value_and_grad`` and ``strategy.update`` give the same step.

  ``loss_fn(params)`` must have the Jacobian ``jacobian``. The tolerances are
  keyword arguments of ``np.testing.assert_allclose``. Returns the gradient
  and the state of the ``value_and_grad`` face.
  """
  step = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  (losses, grads), state = step(params, strategy.init(params))
  update, optax_state = jax.jit(strategy.update)(
      jnp.asarray(jacobian), strategy.init(params), task_losses=losses)
  np.testing.assert_allclose(grads, update, **grads_tolerance)
  np.testing.assert_allclose(state.weights, optax_state.weights,
                             **weights_tolerance)
  return grads, state


def check_faces_match_reference(strategy, jacobian, reference):
  """Both faces agree (to 1e-6) on the linear loss of ``jacobian``, in
  float32, and their step is ``reference(jacobian)`` (float64) to 1e-5."""
  jacobian = np.asarray(jacobian)
  grads, _ = check_both_faces_agree(
      strategy, jacobian.astype(np.float32),
      linear_loss(jacobian.astype(np.float32), np.ones(len(jacobian))),
      jnp.zeros(jacobian.shape[1]), grads_tolerance=dict(atol=1e-6),
      weights_tolerance=dict(atol=1e-6))
  np.testing.assert_allclose(grads, reference(jacobian), atol=1e-5)


def direction_fn(strategy, num_tasks):
  """The combined gradient of one jitted update from a fresh state."""
  update = jax.jit(strategy.update)

  def direction(matrix):
    return np.asarray(update(jnp.asarray(matrix, jnp.float32),
                             strategy.init(None),
                             task_losses=jnp.ones(num_tasks))[0])

  return direction


def check_positively_homogeneous(direction, jacobian, *, rtol,
                                 atol_per_factor):
  """d(κJ) = κ d(J) for κ = 1e-5 and 1e5, up to atol_per_factor * κ."""
  for factor in (1e-5, 1e5):
    np.testing.assert_allclose(direction(factor * jacobian),
                               factor * direction(jacobian),
                               rtol=rtol, atol=atol_per_factor * factor)


def check_permutation_invariance_and_homogeneity(
    strategy, num_tasks, *, seed, permutation_atol, rtol, atol_per_factor):
  """d(PJ) = d(J) for a random order P, and d(κJ) = κ d(J), on a random
  Jacobian [T, 3]; returns ``(direction_fn, jacobian)`` for more checks."""
  rng = np.random.default_rng(seed)
  jacobian = rng.normal(size=(num_tasks, 3))
  direction = direction_fn(strategy, num_tasks)
  order = rng.permutation(num_tasks)
  np.testing.assert_allclose(direction(jacobian[order]), direction(jacobian),
                             atol=permutation_atol)
  check_positively_homogeneous(direction, jacobian, rtol=rtol,
                               atol_per_factor=atol_per_factor)
  return direction, jacobian


def check_weights_equivariant_and_homogeneous(weights_fn, jacobian, *,
                                              scales, exponent):
  """w(PJ) = P w(J) for a random order P, and w(cJ) = c^exponent w(J).

  ``weights_fn(jacobian) -> (weights, combined, state)`` (as single_step).
  Returns the combined gradients of the scaled Jacobians.
  """
  jacobian = np.asarray(jacobian)
  order = np.random.default_rng(0).permutation(len(jacobian))
  weights, _, _ = weights_fn(jacobian)
  permuted, _, _ = weights_fn(jacobian[order])
  np.testing.assert_allclose(permuted, weights[order], rtol=1e-4)
  combined = []
  for scale in scales:
    scaled, direction, _ = weights_fn(jacobian * scale)
    np.testing.assert_allclose(scaled, weights * scale**exponent, rtol=1e-4)
    combined.append(direction)
  return combined


def check_weights_over_a_sequence(strategy, jacobians, reference, *,
                                  rtol=2e-4, atol=2e-5):
  """One state through ``jacobians``: at each step the weights are
  ``reference(jacobian)`` (float64) and the update is ``Jᵀ w``."""
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  for jacobian in jacobians:
    combined, state = update(jnp.asarray(jacobian, jnp.float32), state,
                             task_losses=jnp.ones(len(jacobian)))
    expected = reference(np.asarray(jacobian, np.float64))
    np.testing.assert_allclose(state.weights, expected, rtol=rtol, atol=atol)
    scale = np.max(np.linalg.norm(jacobian, axis=1))
    np.testing.assert_allclose(combined, expected @ jacobian, rtol=rtol,
                               atol=atol * scale)


def fresh_steps(strategy, num_tasks, dimension, count, *, seed=0):
  """``count`` jitted updates, each from a fresh state, on random Jacobians
  [T, dimension]; yields ``(jacobian, direction, weights, state)`` with the
  direction and the weights in float64."""
  update = jax.jit(strategy.update)
  rng = np.random.default_rng(seed)
  for _ in range(count):
    jacobian = rng.normal(size=(num_tasks, dimension))
    combined, state = update(jnp.asarray(jacobian, jnp.float32),
                             strategy.init(None),
                             task_losses=jnp.ones(num_tasks))
    yield (jacobian, np.asarray(combined, np.float64),
           np.asarray(state.weights, np.float64), state)


def parallel_gradient_steps(strategy, num_seeds, *, dtype=np.float32):
  """One jitted update from a fresh state on ``J = [g, g, c g]`` (rank one;
  ``g`` of 1000 normal entries, ``c`` uniform in [0.1, 1]) per seed, in
  ``dtype`` (call under ``jax.enable_x64`` for float64); yields
  ``(seed, c, J, combined, state)``."""
  update = jax.jit(strategy.update)
  for seed in range(num_seeds):
    rng = np.random.default_rng(seed)
    gradient = rng.standard_normal(1000)
    factor = rng.uniform(0.1, 1.0)
    jacobian = np.stack([gradient, gradient, factor * gradient]).astype(dtype)
    combined, state = update(jnp.asarray(jacobian), strategy.init(None),
                             task_losses=jnp.ones(3))
    yield seed, factor, jacobian, combined, state


def check_scripted_dual_cone_directions(strategy, reference):
  """Golden directions and weights (d = Jᵀw) over DUAL_CONE_JACOBIANS.

  Returns the final state.
  """
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  for jacobian in DUAL_CONE_JACOBIANS:
    combined, state = update(jnp.asarray(jacobian, jnp.float32), state,
                             task_losses=jnp.ones(3))
    expected = reference(jacobian)
    scale = np.max(np.linalg.norm(jacobian, axis=1))
    np.testing.assert_allclose(combined, expected, atol=1e-5 * scale,
                               rtol=1e-4)
    # The weights, too: d = Jᵀw.
    np.testing.assert_allclose(np.asarray(state.weights) @ jacobian, expected,
                               atol=1e-5 * scale, rtol=1e-4)
    assert bool(state.solver_converged)
  return state


def check_warm_start_repeats(strategy, jacobian):
  """The same Jacobian twice: the second solve starts from the first's
  solution (kept in the state), is certified in at most one trip (one, where
  a CPU's summation order leaves the recomputed certificate a few ε above
  tol) and gives the same update. (The first step may need no trip either:
  the dual-cone solver corrects its start outside the loop.)

  Returns ``(first update, state after the first step)``.
  """
  update = jax.jit(strategy.update)
  losses = jnp.ones(len(jacobian))
  first, first_state = update(jnp.asarray(jacobian, jnp.float32),
                              strategy.init(None), task_losses=losses)
  assert bool(first_state.solver_converged)
  again, state = update(jnp.asarray(jacobian, jnp.float32), first_state,
                        task_losses=losses)
  assert int(state.solver_iterations) <= 1 and bool(state.solver_converged)
  np.testing.assert_allclose(again, first, atol=1e-6)
  return first, first_state


def check_non_conflicting_and_mean_when_no_conflict(strategy, check_state):
  """Jd >= 0 on random Jacobians [6, 3|10]; d = mean when G >= 0.

  ``check_state(state)`` adds a file's own assertions on each random step.
  """
  update = jax.jit(strategy.update)
  rng = np.random.default_rng(0)
  for width in (3, 10):
    for _ in range(4):
      jacobian = rng.normal(size=(6, width)).astype(np.float32)
      combined, state = update(jnp.asarray(jacobian), strategy.init(None),
                               task_losses=jnp.ones(6))
      scale = np.max(np.sum(jacobian**2, axis=1))
      assert np.all(jacobian @ np.asarray(combined) >= -1e-5 * scale)
      check_state(state)
  # No two gradients conflict (G >= 0): every g_i is in the cone, d = mean.
  jacobian = np.abs(rng.normal(size=(6, 5))).astype(np.float32)
  combined, _ = update(jnp.asarray(jacobian), strategy.init(None),
                       task_losses=jnp.ones(6))
  np.testing.assert_allclose(combined, jacobian.mean(axis=0), rtol=1e-5)


# The shared and head Jacobians of the shared-parameter tests, and the head's
# task gradients, which the filter keeps out of the Gramian.
FILTER_SHARED_JACOBIAN = np.asarray(FIXED_JACOBIANS["t3_mixed"], np.float32)
FILTER_HEAD_JACOBIAN = np.array([[5.0], [0.0], [-1.0]], np.float32)


def filtered_value_and_grad_step(strategy):
  """One ``value_and_grad`` step on a shared block and a filtered-out head.

  The losses are ``FILTER_SHARED_JACOBIAN @ shared + FILTER_HEAD_JACOBIAN @
  head + 10``. Returns the gradients and the state.
  """

  def loss_fn(params):
    return jnp.asarray(FILTER_SHARED_JACOBIAN) @ params["shared"] + (
        jnp.asarray(FILTER_HEAD_JACOBIAN) @ params["head"]) + 10.0

  params = {"shared": jnp.ones(4), "head": jnp.ones(1)}
  step = jax.jit(optax_mtl.value_and_grad(
      loss_fn, strategy, shared={"shared": True, "head": False}))
  (_, grads), state = step(params, strategy.init(params))
  return grads, state


def check_shared_parameters_step(strategy, reference):
  """filtered_value_and_grad_step: the weights are ``reference(J_shared)``,
  the shared gradient is ``J_sharedᵀ w`` and the head, task-specific,
  receives the unweighted task gradients."""
  grads, state = filtered_value_and_grad_step(strategy)
  expected = reference(FILTER_SHARED_JACOBIAN)
  np.testing.assert_allclose(state.weights, expected, rtol=2e-4)
  np.testing.assert_allclose(grads["shared"], expected @ FILTER_SHARED_JACOBIAN,
                             rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(grads["head"], FILTER_HEAD_JACOBIAN.sum(axis=0),
                             rtol=2e-4, atol=1e-5)


# Hyperparameter errors shared by the solver strategies. (num_tasks is checked
# for every strategy in tests/test_contract.py.)
SOLVER_ERRORS = (({"num_tasks": 2, "max_iters": 0}, "max_iters"),
                 ({"num_tasks": 2, "tol": -1.0}, "tol"))


def hyperparameter_errors(*cases):
  """The (kwargs, message) pairs of a test_hyperparameter_errors."""
  return list(cases)


# ``check_rejects(factory, kwargs, message)``: ``factory(**kwargs)`` raises
# ValueError(message).
check_rejects = strategies.check_rejects


def check_old_spelling(old_call: Callable[[], Any], new_call: Callable[[], Any],
                       *, old: str, renamed_fields: dict[str, str] = None,
                       jacobian=None):
  """An 0.1 spelling still works: it warns and gives the same strategy.

  ``old_call()`` builds the strategy with the old spelling (a renamed
  argument, or an option passed by its old position) and must raise a
  ``DeprecationWarning`` whose message names ``old``; ``new_call()`` builds
  it with the new one. Both take one jitted step on ``jacobian`` (default:
  FIXED_JACOBIANS["t3_mixed"]) and must give the same update and state.
  ``renamed_fields`` maps an old state-field name to the new one: reading it
  warns and gives the new field's value.
  """
  import pytest  # pylint: disable=import-outside-toplevel
  with pytest.warns(DeprecationWarning, match=old):
    old_strategy = old_call()
  new_strategy = new_call()
  jacobian = jnp.asarray(FIXED_JACOBIANS["t3_mixed"] if jacobian is None
                         else jacobian, jnp.float32)
  losses = jnp.ones(jacobian.shape[0])
  old_update, old_state = jax.jit(old_strategy.update)(
      jacobian, old_strategy.init(None), task_losses=losses)
  new_update, new_state = jax.jit(new_strategy.update)(
      jacobian, new_strategy.init(None), task_losses=losses)
  np.testing.assert_array_equal(old_update, new_update)
  jax.tree.map(np.testing.assert_array_equal, old_state, new_state)
  for old_name, new_name in (renamed_fields or {}).items():
    with pytest.warns(DeprecationWarning, match=new_name):
      value = getattr(new_state, old_name)
    np.testing.assert_array_equal(value, getattr(new_state, new_name))
