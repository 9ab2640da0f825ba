"""Tests of optax_mtl.imtl, the hybrid IMTL of Liu et al. (2021).

The reference, in NumPy (float64), follows the paper on the explicit
gradients: scale each task gradient by e^{s_k}; IMTL-G on the scaled
gradients g̃_k (task 1 as the anchor): α_{2:T} = g̃_1 Uᵀ (D Uᵀ)⁻¹ with
D = [g̃_1 − g̃_k], U = [u_1 − u_k], α_1 = 1 − Σ α_{2:T}; the raw gradients'
weights are α_k e^{s_k}; then s takes one Adam step (Kingma & Ba) on
e^{s_k} L_k − 1, the gradient of the scaled loss Σ e^{s_k} L_k − s_k.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import gramian_harness
from tests import loss_weighting_harness as harness

NUM_TASKS = harness.NUM_TASKS
NAN, INF = harness.NAN, harness.INF
LOSSES = harness.REJECTED_IN_MIDDLE  # A NaN, a zero, an infinite loss.
JACOBIANS = harness.scripted_grads(LOSSES)  # Well-conditioned, [S, 3, 4].
NUM_REJECTED = 3


def imtl_g_alpha(jacobian):
  """IMTL-G's α on explicit gradients, task 1 as anchor (the paper)."""
  jacobian = np.asarray(jacobian, np.float64)
  units = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)
  d = jacobian[0] - jacobian[1:]
  u = units[0] - units[1:]
  rest = jacobian[0] @ u.T @ np.linalg.inv(d @ u.T)
  return np.concatenate([[1.0 - rest.sum()], rest])


def reference_run(losses, jacobians, learning_rate, initial_scales):
  """Weights and scales over a run, with the reference Adam on s."""
  s = np.broadcast_to(np.asarray(initial_scales, np.float64),
                      (NUM_TASKS,)).copy()
  adam = harness.ReferenceAdam(learning_rate)
  weights = np.exp(s)
  out_weights, out_scales = [], []
  for step_losses, jacobian in zip(np.asarray(losses, np.float64), jacobians):
    if harness.is_accepted(step_losses):
      scales = np.exp(s)
      weights = imtl_g_alpha(scales[:, None] * jacobian) * scales
      s = s + adam.step(scales * step_losses - 1.0, np.ones(NUM_TASKS, bool))
    out_weights.append(weights)
    out_scales.append(s.copy())
  return np.array(out_weights), np.array(out_scales)


CASES = [
    dict(learning_rate=0.1, initial_scales=0.0),
    dict(learning_rate=0.3, initial_scales=[0.5, -1.0, 1.5]),
]


@pytest.mark.parametrize("case", CASES)
def test_golden_values_optax_face(case):
  expected_weights, expected_scales = reference_run(LOSSES, JACOBIANS, **case)
  state = harness.check_optax_face(
      optax_mtl.imtl(NUM_TASKS, **case), LOSSES, JACOBIANS, expected_weights,
      weights_rtol=2e-4, update_atol=1e-4,
      check_step=harness.field_check("loss_scales", expected_scales))
  assert int(state.num_skipped) == NUM_REJECTED
  # The scales change the weights: not IMTL-G's α alone.
  alpha = imtl_g_alpha(JACOBIANS[-1])
  assert not np.allclose(expected_weights[-1], alpha, rtol=1e-2)


def test_golden_values_value_and_grad_face():
  case = dict(learning_rate=0.1, initial_scales=[0.2, -0.2, 0.1])
  directions = JACOBIANS[0]
  # The harness's model has ∇L_k = L_k · directions_k.
  jacobians = [np.where(np.isfinite(l), l, 1.0)[:, None] * directions
               for l in np.asarray(LOSSES, np.float64)]
  expected_weights, expected_scales = reference_run(LOSSES, jacobians, **case)
  # The losses scale the gradients here: cond(G̃) reaches ~1e4, and IMTL-G's
  # float32 solve on the Gramian agrees with float64 to about 1e-7 · cond.
  state = harness.check_value_and_grad_face(
      optax_mtl.imtl(NUM_TASKS, **case), LOSSES, directions, expected_weights,
      weights_rtol=1e-3, grads_atol=1e-3,
      check_step=harness.field_check("loss_scales", expected_scales))
  assert int(state.num_skipped) == NUM_REJECTED


def test_equal_projections_on_unit_gradients():
  """IMTL-G's property holds on the raw unit gradients for any scales."""
  jacobian = np.asarray(gramian_harness.FIXED_JACOBIANS["t3_mixed"],
                        np.float32)
  strategy = optax_mtl.imtl(3, initial_scales=[1.0, -2.0, 0.5])
  combined, state = jax.jit(strategy.update)(
      jnp.asarray(jacobian), strategy.init(None), task_losses=jnp.ones(3))
  units = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)
  projections = units @ np.asarray(combined)
  np.testing.assert_allclose(projections, projections[0], rtol=1e-4)
  # Σ α = 1 on the scaled gradients: Σ w_k e^{-s_k} = 1.
  np.testing.assert_allclose(
      np.sum(np.asarray(state.weights) * np.exp([-1.0, 2.0, -0.5])), 1.0,
      rtol=1e-5)


def test_a_non_finite_gradient_excludes_its_task_as_if_it_were_absent():
  """IMTL on T tasks, one gradient NaN = IMTL on the other T - 1 tasks."""
  strategy = optax_mtl.imtl(NUM_TASKS, initial_scales=0.3)
  jacobian = np.array(JACOBIANS[0])
  jacobian[1, 2] = NAN
  update, state = jax.jit(strategy.update)(
      jnp.asarray(jacobian), strategy.init(None), task_losses=jnp.ones(3))
  assert int(state.num_skipped) == 0
  others = optax_mtl.imtl(NUM_TASKS - 1, initial_scales=0.3)
  expected, others_state = others.update(
      jnp.asarray(jacobian[[0, 2]]), others.init(None),
      task_losses=jnp.ones(2))
  eps = np.finfo(np.float32).eps
  np.testing.assert_allclose(update, expected, rtol=64 * eps, atol=64 * eps)
  np.testing.assert_allclose(np.asarray(state.weights)[[0, 2]],
                             others_state.weights,
                             rtol=64 * eps)
  np.testing.assert_allclose(state.weights[1], np.exp(0.3), rtol=eps)


def test_single_task_weight_is_the_scale():
  strategy = optax_mtl.imtl(1, initial_scales=0.7)
  update, state = strategy.update(jnp.array([[2.0, -1.0]]),
                                  strategy.init(None),
                                  task_losses=jnp.array([3.0]))
  np.testing.assert_allclose(state.weights, [np.exp(0.7)], rtol=1e-6)
  np.testing.assert_allclose(update, np.exp(0.7) * np.array([2.0, -1.0]),
                             rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tasks=0), r"num_tasks must be an integer >= 1, got 0"),
    (dict(learning_rate=-1.0),
     r"learning_rate must lie in \(0.0, inf[)\]], got -1.0"),
    (dict(optimizer="Adam"), r"optimizer must be one of .*got 'Adam'"),
    (dict(initial_scales=[1.0]),
     r"initial_scales must be a number or 3 numbers, got shape \(1,\)"),
    (dict(min_relative_norm=1.0),
     r"min_relative_norm must lie in \[0.0, 1.0\), got 1.0"),
    (dict(min_relative_norm=-1e-3),
     r"min_relative_norm must lie in \[0.0, 1.0\), got -0.001"),
])
def test_hyperparameter_errors(kwargs, message):
  harness.check_rejects(optax_mtl.imtl, kwargs, message)


def test_first_step_is_imtl_g_in_float64_under_x64():
  # Loss scales 0 at the start: imtl's first update is imtl_g's, to float64
  # round-off (the IMTL-G weights were rounded to float32).
  with jax.enable_x64(True):
    jacobian = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)))
    updates = []
    for strategy in (optax_mtl.imtl(3), optax_mtl.imtl_g(3)):
      update, _ = strategy.update(jacobian, strategy.init(None),
                                  task_losses=jnp.ones(3))
      assert update.dtype == jnp.float64
      updates.append(np.asarray(update))
    np.testing.assert_allclose(updates[0], updates[1], rtol=1e-13)


def test_the_spelling_of_optax_mtl_0_1_warns_and_runs_the_same():
  """0.1 took ``optimizer`` and ``initial_scales`` by position, spelled
  ``min_relative_norm`` ``eps`` and named ``optimizer_state``
  ``scales_optimizer``."""
  harness.check_old_spelling(
      lambda: optax_mtl.imtl(NUM_TASKS, 0.1, "sgd", [0.5, -1.0, 1.5],
                             eps=1e-6),
      lambda: optax_mtl.imtl(NUM_TASKS, 0.1, optimizer="sgd",
                             initial_scales=[0.5, -1.0, 1.5],
                             min_relative_norm=1e-6),
      losses=LOSSES)
  state = optax_mtl.imtl(NUM_TASKS).init(None)
  with pytest.warns(DeprecationWarning,
                    match="scales_optimizer .*ImtlState.optimizer_state"):
    assert state.scales_optimizer is state.optimizer_state
