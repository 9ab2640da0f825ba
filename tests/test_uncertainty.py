"""Tests of optax_mtl.uncertainty (Kendall, Gal & Cipolla 2018).

The reference simulates, in NumPy, the documented rule: the weights of step t
are c_k exp(-s_k) with s before its update, then s takes one bias-corrected
Adam step (Kingma & Ba 2015, Algorithm 1) on the gradient of the total loss
Σ_k c_k exp(-s_k) L_k + ½ s_k.
"""

import functools

from hypothesis import given
from hypothesis import settings
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import loss_weighting_harness as harness

NUM_TASKS = harness.NUM_TASKS
NUM_PARAMS = harness.NUM_PARAMS
NAN, INF = harness.NAN, harness.INF
# A scripted run with a NaN, a zero and an infinite loss (each excludes its
# own task from that step).
LOSSES = harness.REJECTED_IN_MIDDLE
GRADS = harness.scripted_grads(LOSSES)


def total_loss_gradient(log_variances, losses, coefficients):
  """∂/∂s_k of Σ_j c_j e^{-s_j} L_j + ½ s_j."""
  return -coefficients * np.exp(-log_variances) * losses + 0.5


def reference_run(losses, learning_rate, classification, initial_s):
  """Weights and log-variances over a run, with the reference Adam.

  Each task runs its own Adam on its s_k; a bad loss (not finite, or not
  positive) skips that task's update and keeps its weight. Returns the
  weights, the log-variances and each task's number of updates.
  """
  coefficients = np.where(classification, 1.0, 0.5)
  s = np.broadcast_to(np.asarray(initial_s, np.float64), (NUM_TASKS,)).copy()
  adam = harness.ReferenceAdam(learning_rate)
  weights = coefficients * np.exp(-s)
  out_weights, out_s = [], []
  for step_losses in np.asarray(losses, np.float64):
    valid = np.isfinite(step_losses) & (step_losses > 0)
    # From s before its update.
    weights = np.where(valid, coefficients * np.exp(-s), weights)
    with np.errstate(invalid="ignore"):
      g = np.where(valid, total_loss_gradient(s, step_losses, coefficients),
                   0.0)
    s = s + adam.step(g, valid)
    out_weights.append(weights)
    out_s.append(s.copy())
  return np.array(out_weights), np.array(out_s), adam.count


CASES = [
    dict(learning_rate=0.1, classification=False, initial_log_variances=0.0),
    dict(learning_rate=0.05, classification=[True, False, True],
         initial_log_variances=[0.0, 0.5, -0.3]),
    dict(learning_rate=1e-2, classification=True, initial_log_variances=1.0),
]


def reference_for(case, losses=LOSSES):
  classification = np.broadcast_to(case["classification"], (NUM_TASKS,))
  return reference_run(losses, case["learning_rate"], classification,
                       case["initial_log_variances"])


@pytest.mark.parametrize("case", CASES)
def test_golden_values_optax_face(case):
  expected_weights, expected_s, num_updates = reference_for(case)
  state = harness.check_optax_face(
      optax_mtl.uncertainty(NUM_TASKS, **case), LOSSES, GRADS,
      expected_weights, update_atol=1e-5,
      check_step=harness.field_check("log_variances", expected_s))
  # Every step had a valid loss: no step rejected as a whole; each task
  # counts its own bad losses and its own Adam updates.
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, [1, 1, 1])
  np.testing.assert_array_equal(state.optimizer_state.count, num_updates)
  np.testing.assert_array_equal(num_updates, len(LOSSES) - 1)


def test_golden_values_value_and_grad_face():
  case = CASES[1]
  expected_weights, expected_s, _ = reference_for(case)
  state = harness.check_value_and_grad_face(
      optax_mtl.uncertainty(NUM_TASKS, **case), LOSSES, GRADS[0],
      expected_weights, grads_atol=1e-5,
      check_step=harness.field_check("log_variances", expected_s))
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, [1, 1, 1])


def test_gradient_is_that_of_the_total_loss():
  """Model gradient = ∇_θ of the total loss at s before the update; and the
  reference's ∂/∂s is the derivative of that same total loss."""
  classification = np.array([True, False, False])
  coefficients = np.where(classification, 1.0, 0.5).astype(np.float32)
  harness.check_gradient_of_total_loss(
      optax_mtl.uncertainty(
          NUM_TASKS, learning_rate=0.3, classification=tuple(classification),
          initial_log_variances=[0.2, -0.4, 1.0]),
      "log_variances",
      lambda losses, s: jnp.sum(coefficients * jnp.exp(-s) * losses
                                + 0.5 * s),
      lambda s, losses: total_loss_gradient(s, losses, coefficients))


@functools.lru_cache(maxsize=None)
def scan_run(learning_rate, classification):
  return harness.scan_states(
      optax_mtl.uncertainty(NUM_TASKS, learning_rate=learning_rate,
                            classification=classification),
      jnp.eye(NUM_TASKS),
      outputs=lambda state: (state.weights, state.log_variances))


@pytest.mark.parametrize("classification", [False, True])
def test_log_variances_converge_to_log_of_twice_weighted_loss(classification):
  """With constant losses ∂L/∂s = 0 at s_k = log(2 c_k L_k)."""
  losses = np.array([0.01, 1.0, 50.0], np.float32)
  _, log_variances = scan_run(0.05, classification)(
      np.broadcast_to(losses, (3000, NUM_TASKS)))
  coefficient = 1.0 if classification else 0.5
  np.testing.assert_allclose(log_variances[-1],
                             np.log(2 * coefficient * losses), atol=0.05)


wide_positive_losses = harness.wide_positive_losses(6)


@settings(max_examples=30, deadline=None)
@given(losses=wide_positive_losses)
def test_weights_finite_and_positive(losses):
  weights, log_variances = scan_run(0.1, False)(losses)
  harness.assert_finite_and_positive(weights)
  assert np.all(np.isfinite(log_variances))
  expected_weights, expected_s, _ = reference_run(
      losses, 0.1, np.zeros(NUM_TASKS, bool), 0.0)
  # Float32 rounding of a near-zero ∂L/∂s, amplified by Adam's division.
  np.testing.assert_allclose(weights, expected_weights, rtol=3e-5)
  np.testing.assert_allclose(log_variances, expected_s, rtol=1e-5, atol=3e-5)


def test_a_loss_of_1e30_moves_s_by_the_learning_rate():
  """(∂L/∂s)² would overflow float32; clipped, Adam's first step is still
  learning_rate · sign(∂L/∂s), as in the float64 reference."""
  strategy = optax_mtl.uncertainty(NUM_TASKS)
  losses = np.array([[1.0, 1e30, 1.0]], np.float32)
  _, state = jax.jit(strategy.update)(
      jnp.eye(NUM_TASKS), strategy.init(None), task_losses=losses[0])
  expected_weights, expected_s, _ = reference_run(
      losses, 1e-2, np.zeros(NUM_TASKS, bool), 0.0)
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.optimizer_state.count, [1, 1, 1])
  np.testing.assert_allclose(state.log_variances, expected_s[0], atol=1e-7)
  np.testing.assert_allclose(state.log_variances, [0.0, 0.01, 0.0], atol=1e-7)
  np.testing.assert_array_equal(state.weights, expected_weights[0])
  assert np.all(np.isfinite(state.optimizer_state.nu))
  assert np.all(np.isfinite(state.optimizer_state.mu))


def test_normalize_and_max_weight_change_only_the_applied_weights():
  # Valid losses only: an excluded task keeps its previous applied weight.
  losses = np.asarray(harness.REJECTED_IN_MIDDLE)[[0, 1, 4, 5, 7]]
  case = CASES[1]
  expected_weights, expected_s, _ = reference_for(case, losses)
  for options in (dict(normalize=True), dict(max_weight=0.6),
                  dict(normalize=True, max_weight=1.2)):
    strategy = optax_mtl.uncertainty(NUM_TASKS, **case, **options)
    expected = expected_weights
    if options.get("normalize"):
      expected = NUM_TASKS * expected / expected.sum(1, keepdims=True)
    expected = np.minimum(expected, options.get("max_weight", np.inf))
    harness.check_optax_face(
        strategy, losses, harness.scripted_grads(losses), expected,
        check_step=harness.field_check("log_variances", expected_s))


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate=0.0),
     r"learning_rate must lie in \(0.0, inf[)\]], got 0.0"),
    (dict(learning_rate=-1e-3),
     r"learning_rate must lie in \(0.0, inf[)\]], got -0.001"),
    (dict(learning_rate=INF), r"learning_rate must be finite, got inf"),
    (dict(learning_rate=None),
     r"learning_rate must be a real number, got None"),
    (dict(classification=[True, False]),
     r"classification must be a bool or a sequence of 3 bools.*"
     r"got \[True, False\]"),
    (dict(classification=[1, 0, 1]),
     r"classification must be a bool .*got \[1, 0, 1\]"),
    (dict(classification="yes"), r"classification must be a bool .*'yes'"),
    (dict(initial_log_variances=[0.0, 1.0]),
     r"initial_log_variances must be a number or 3 numbers, "
     r"got shape \(2,\)"),
    (dict(initial_log_variances=NAN),
     r"initial_log_variances must be finite.*got nan"),
    (dict(initial_log_variances=[0.0, -200.0, 0.0]),
     r"initial_log_variances must give weights c·exp\(-s\) finite .*"
     r"got \[0.0, -200.0, 0.0\]"),
    (dict(initial_log_variances="zero"),
     r"initial_log_variances must be a number or 3 numbers, got 'zero'"),
])
def test_hyperparameter_errors(kwargs, message):
  harness.check_rejects(optax_mtl.uncertainty, kwargs, message)


def test_the_spelling_of_optax_mtl_0_1_warns_and_runs_the_same():
  """0.1 took ``classification`` and ``initial_log_variances`` by position
  and named the state field ``optimizer_state`` ``adam``."""
  harness.check_old_spelling(
      lambda: optax_mtl.uncertainty(NUM_TASKS, 0.05, [True, False, True],
                                    -0.5),
      lambda: optax_mtl.uncertainty(NUM_TASKS, 0.05,
                                    classification=[True, False, True],
                                    initial_log_variances=-0.5),
      match="by position")
  state = optax_mtl.uncertainty(NUM_TASKS).init(None)
  with pytest.warns(DeprecationWarning,
                    match="UncertaintyState.adam .*optimizer_state"):
    assert state.adam is state.optimizer_state
