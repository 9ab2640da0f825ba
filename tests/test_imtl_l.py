"""Tests of optax_mtl.imtl_l (Liu et al. 2021, IMTL-L).

The reference simulates, in NumPy, the documented rule: the weights of step t
are e^{s_k} with s before its update, then s takes one step of Adam (Kingma &
Ba 2015, Algorithm 1, bias-corrected) or of gradient descent on the gradient
of the scaled loss Σ_k e^{s_k} L_k − s_k, i.e. e^{s_k} L_k − 1.
"""

import functools

from hypothesis import given
from hypothesis import settings
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
from tests import loss_weighting_harness as harness

NUM_TASKS = harness.NUM_TASKS
NUM_PARAMS = harness.NUM_PARAMS
NAN, INF = harness.NAN, harness.INF
# A scripted run with a NaN, a zero and an infinite loss (all rejected).
LOSSES = harness.REJECTED_IN_MIDDLE
GRADS = harness.scripted_grads(LOSSES)


def scaled_loss_gradient(scales, losses):
  """∂/∂s_k of Σ_j e^{s_j} L_j − s_j."""
  return np.exp(scales) * losses - 1.0


def reference_run(losses, learning_rate, optimizer, initial_scales):
  """Weights and scales over a run, with the reference Adam or SGD.

  Each scale has its own optimizer; a bad loss (not finite, or not
  positive) skips that task's update and keeps its weight.
  """
  s = np.broadcast_to(np.asarray(initial_scales, np.float64),
                      (NUM_TASKS,)).copy()
  adam = harness.ReferenceAdam(learning_rate)
  weights = np.exp(s)
  out_weights, out_scales = [], []
  for step_losses in np.asarray(losses, np.float64):
    valid = np.isfinite(step_losses) & (step_losses > 0)
    weights = np.where(valid, np.exp(s), weights)  # From s before its step.
    with np.errstate(invalid="ignore"):
      g = np.where(valid, scaled_loss_gradient(s, step_losses), 0.0)
    s = s + (adam.step(g, valid) if optimizer == "adam"
             else np.where(valid, -learning_rate * g, 0.0))
    out_weights.append(weights)
    out_scales.append(s.copy())
  return np.array(out_weights), np.array(out_scales)


CASES = [
    dict(learning_rate=0.1, optimizer="adam", initial_scales=0.0),
    dict(learning_rate=0.05, optimizer="sgd", initial_scales=[0.0, 0.5, -0.3]),
    dict(learning_rate=1e-2, optimizer="adam", initial_scales=[1.0, -1.0, 0.2]),
]


@pytest.mark.parametrize("case", CASES)
def test_golden_values_optax_face(case):
  expected_weights, expected_scales = reference_run(LOSSES, **case)
  state = harness.check_optax_face(
      optax_mtl.imtl_l(NUM_TASKS, **case), LOSSES, GRADS, expected_weights,
      update_atol=1e-5,
      check_step=harness.field_check("loss_scales", expected_scales))
  # Every step had a valid loss: each bad loss excluded its task only.
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, [1, 1, 1])
  # The scales moved: the test would see a rule that ignores the losses.
  assert not np.allclose(expected_scales[-1], expected_scales[0])


def test_golden_values_value_and_grad_face():
  case = CASES[1]
  expected_weights, expected_scales = reference_run(LOSSES, **case)
  state = harness.check_value_and_grad_face(
      optax_mtl.imtl_l(NUM_TASKS, **case), LOSSES, GRADS[0],
      expected_weights, grads_atol=1e-5,
      check_step=harness.field_check("loss_scales", expected_scales))
  assert int(state.num_skipped) == 0


def test_gradient_is_that_of_the_scaled_loss():
  """Model gradient = ∇_θ Σ e^{s_k} L_k − s_k at s before the update."""
  harness.check_gradient_of_total_loss(
      optax_mtl.imtl_l(NUM_TASKS, learning_rate=0.3,
                       initial_scales=[0.2, -0.4, 1.0]),
      "loss_scales", lambda losses, s: jnp.sum(jnp.exp(s) * losses - s),
      scaled_loss_gradient)


@functools.lru_cache(maxsize=None)
def scan_run(learning_rate, optimizer):
  return harness.scan_states(
      optax_mtl.imtl_l(NUM_TASKS, learning_rate=learning_rate,
                       optimizer=optimizer),
      jnp.eye(NUM_TASKS),
      outputs=lambda state: (state.weights, state.loss_scales))


def test_scaled_losses_converge_to_one():
  """With constant losses ∂/∂s = 0 at s_k = −log L_k: e^{s_k} L_k = 1."""
  losses = np.array([0.01, 1.0, 50.0], np.float32)
  weights, scales = scan_run(0.05, "adam")(
      np.broadcast_to(losses, (3000, NUM_TASKS)))
  np.testing.assert_allclose(scales[-1], -np.log(losses), atol=0.05)
  np.testing.assert_allclose(weights[-1] * losses, 1.0, atol=0.06)


@settings(max_examples=20, deadline=None)
@given(losses=harness.wide_positive_losses(6))
def test_weights_finite_and_positive_and_match_reference(losses):
  weights, scales = scan_run(0.1, "adam")(losses)
  harness.assert_finite_and_positive(weights)
  expected_weights, expected_scales = reference_run(losses, 0.1, "adam", 0.0)
  np.testing.assert_allclose(weights, expected_weights, rtol=3e-5)
  np.testing.assert_allclose(scales, expected_scales, rtol=1e-5, atol=3e-5)


def test_overflowing_update_is_rejected():
  """A loss so large that e^s L or its square overflows leaves s unchanged."""
  strategy = optax_mtl.imtl_l(NUM_TASKS)
  _, state = jax.jit(strategy.update)(
      jnp.eye(NUM_TASKS), strategy.init(None),
      task_losses=np.array([1.0, 1e30, 1.0], np.float32))
  assert int(state.num_skipped) == 1
  np.testing.assert_array_equal(state.loss_scales, 0.0)
  adam_state = state.optimizer_state[0]
  np.testing.assert_array_equal(adam_state.count, 0)
  np.testing.assert_array_equal(adam_state.nu, 0.0)


def test_learning_rate_can_be_injected():
  """optax.inject_hyperparams: the learning rate is a traced array."""
  injected = optax.inject_hyperparams(
      optax_mtl.imtl_l, static_args=("num_tasks", "optimizer"))(
          num_tasks=NUM_TASKS, learning_rate=0.05, optimizer="sgd")
  state = injected.init(jnp.zeros(2))
  for step_losses in LOSSES[:2]:
    _, state = injected.update(jnp.ones((NUM_TASKS, 2)), state,
                               task_losses=step_losses)
  _, expected_scales = reference_run(LOSSES[:2], 0.05, "sgd", 0.0)
  np.testing.assert_allclose(state.inner_state.loss_scales,
                             expected_scales[-1], rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tasks=0), r"num_tasks must be an integer >= 1, got 0"),
    (dict(learning_rate=0.0),
     r"learning_rate must lie in \(0.0, inf[)\]], got 0.0"),
    (dict(learning_rate=INF), r"learning_rate must be finite, got inf"),
    (dict(learning_rate="big"), r"learning_rate must be a real number"),
    (dict(optimizer="rmsprop"),
     r"optimizer must be one of \('adam', 'sgd'\), got 'rmsprop'"),
    (dict(initial_scales=[0.0, 1.0]),
     r"initial_scales must be a number or 3 numbers, got shape \(2,\)"),
    (dict(initial_scales=NAN), r"initial_scales must be finite.*got nan"),
    (dict(initial_scales=[0.0, 200.0, 0.0]),
     r"initial_scales must be finite.*got \[0.0, 200.0, 0.0\]"),
    (dict(initial_scales="zero"),
     r"initial_scales must be a number or 3 numbers, got 'zero'"),
    (dict(initial_scales="0"),
     r"initial_scales must be a number or 3 numbers, got '0'"),
])
def test_hyperparameter_errors(kwargs, message):
  harness.check_rejects(optax_mtl.imtl_l, kwargs, message)


def test_the_spelling_of_optax_mtl_0_1_warns_and_runs_the_same():
  """0.1 took ``optimizer`` and ``initial_scales`` by position and named
  ``optimizer_state`` ``scales_optimizer``."""
  harness.check_old_spelling(
      lambda: optax_mtl.imtl_l(NUM_TASKS, 0.1, "sgd", [0.5, -1.0, 1.5]),
      lambda: optax_mtl.imtl_l(NUM_TASKS, 0.1, optimizer="sgd",
                               initial_scales=[0.5, -1.0, 1.5]),
      match="by position")
  state = optax_mtl.imtl_l(NUM_TASKS).init(None)
  with pytest.warns(DeprecationWarning,
                    match="scales_optimizer .*ImtlLState.optimizer_state"):
    assert state.scales_optimizer is state.optimizer_state
