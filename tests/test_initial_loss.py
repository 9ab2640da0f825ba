"""Tests of optax_mtl.initial_loss against a NumPy reference of w = 1/L^prior."""

import functools
import math

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import loss_weighting_harness as harness

NUM_TASKS = harness.NUM_TASKS
NAN = harness.NAN
LOSSES = harness.REJECTED_IN_MIDDLE
GRADS = harness.scripted_grads(LOSSES)
# log C for tasks with C = 10, 2 and 100 classes.
PRIOR = np.log([10.0, 2.0, 100.0])


is_positive = harness.is_accepted


def reference_measured(losses, warmup_steps):
  """w_k = 1 / mean of L_k over its first accepted losses (up to warmup).

  Per task: a bad loss (non-finite or <= 0) is not measured and the task
  keeps its previous weight (one before its first accepted loss). Returns
  the weights, the steps without any valid loss, the number of bad losses
  of each task and the losses measured per task.
  """
  measured = [[] for _ in range(NUM_TASKS)]
  weights = np.ones(NUM_TASKS)
  out, skipped = [], 0
  rejected = np.zeros(NUM_TASKS, int)
  for step_losses in np.asarray(losses, np.float64):
    valid = np.isfinite(step_losses) & (step_losses > 0)
    rejected += ~valid
    skipped += not valid.any()
    for k in np.flatnonzero(valid):
      if len(measured[k]) < warmup_steps:
        measured[k].append(step_losses[k])
      weights[k] = 1.0 / np.mean(measured[k])
    out.append(weights.copy())
  return (np.array(out), skipped, rejected,
          np.array([len(m) for m in measured]))


@pytest.mark.parametrize("warmup_steps", [1, 3, 10])
def test_golden_values_optax_face_measured(warmup_steps):
  expected, skipped, rejected, measured = reference_measured(
      LOSSES, warmup_steps)

  def check_initial_losses(step, unused_previous_state, state):
    np.testing.assert_allclose(state.initial_losses, 1.0 / expected[step],
                               rtol=1e-6)

  state = harness.check_optax_face(
      optax_mtl.initial_loss(NUM_TASKS, warmup_steps=warmup_steps), LOSSES,
      GRADS, expected, weights_rtol=1e-6, check_step=check_initial_losses)
  # One NaN (task 0), one zero (task 1), one inf (task 2): no step is
  # rejected as a whole.
  assert int(state.num_skipped) == skipped == 0
  np.testing.assert_array_equal(state.num_rejected_losses, rejected)
  np.testing.assert_array_equal(rejected, [1, 1, 1])
  np.testing.assert_array_equal(state.num_measured, measured)


def test_first_step_weights_are_inverse_first_losses():
  strategy = optax_mtl.initial_loss(NUM_TASKS, warmup_steps=5)
  update, state = jax.jit(strategy.update)(
      GRADS[0], strategy.init(None), task_losses=LOSSES[0])
  np.testing.assert_allclose(state.weights, 1.0 / LOSSES[0], rtol=1e-6)
  np.testing.assert_allclose(update, (1.0 / LOSSES[0]) @ GRADS[0], rtol=1e-5)


def test_golden_values_optax_face_prior():
  strategy = optax_mtl.initial_loss(NUM_TASKS, prior_losses=PRIOR)
  expected = 1.0 / PRIOR
  np.testing.assert_allclose(strategy.init(None).weights, expected, rtol=1e-6)
  state = harness.check_optax_face(
      strategy, LOSSES, GRADS, np.broadcast_to(expected, LOSSES.shape),
      weights_rtol=1e-6)
  # Only the non-finite losses are rejected, each for its task alone: the
  # zero loss is fine here.
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, [1, 0, 1])
  np.testing.assert_allclose(state.initial_losses, PRIOR, rtol=1e-6)


def test_golden_values_value_and_grad_face():
  expected, skipped, rejected, _ = reference_measured(LOSSES, 3)
  state = harness.check_value_and_grad_face(
      optax_mtl.initial_loss(NUM_TASKS, warmup_steps=3), LOSSES, GRADS[0],
      expected, accepted=is_positive, weights_rtol=1e-6)
  assert int(state.num_skipped) == skipped
  np.testing.assert_array_equal(state.num_rejected_losses, rejected)


@functools.lru_cache(maxsize=None)
def scan_run(warmup_steps):
  """A jitted run over a whole sequence, compiled once per warmup."""
  return harness.scan_updates(
      optax_mtl.initial_loss(NUM_TASKS, warmup_steps=warmup_steps))


wide_positive_losses = harness.wide_positive_losses(5)


@settings(max_examples=30, deadline=None)
@given(losses=wide_positive_losses)
def test_weights_finite_and_positive(losses):
  weights = harness.weights_with_unit_grads(scan_run(3), losses)
  harness.assert_finite_and_positive(weights)
  expected = reference_measured(losses, 3)[0]
  np.testing.assert_allclose(weights, expected, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(losses=wide_positive_losses, log_scale=st.floats(-3.0, 3.0),
       task=st.integers(0, NUM_TASKS - 1), seed=st.integers(0, 2**16))
def test_update_invariant_to_scaling_one_task(losses, log_scale, task, seed):
  harness.check_invariant_to_scaling_one_task(
      scan_run(3), losses, 10.0 ** log_scale, task, seed, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(warmup_steps=0), r"warmup_steps must be an integer >= 1, got 0"),
    (dict(warmup_steps=2.5), r"warmup_steps must be an integer >= 1, got 2.5"),
    (dict(prior_losses=[1.0, 2.0]),
     r"prior_losses must be 3 numbers in .*got shape \(2,\)"),
    (dict(prior_losses=2.0), r"prior_losses must be 3 numbers in .*got"),
    (dict(prior_losses=[1.0, 0.0, 2.0]),
     r"prior_losses must be 3 numbers in \[1.17.*got \[1.0, 0.0, 2.0\]"),
    (dict(prior_losses=[1.0, -1.0, 2.0]),
     r"prior_losses must be 3 numbers in .*got \[1.0, -1.0, 2.0\]"),
    (dict(prior_losses=[1.0, NAN, 2.0]),
     r"prior_losses must be finite.*got \[1.0, nan, 2.0\]"),
    (dict(prior_losses=[1.0, 1e-45, 2.0]),
     r"prior_losses must be 3 numbers in .*got \[1.0, 1e-45, 2.0\]"),
    (dict(prior_losses=["a", "b", "c"]), r"prior_losses must be 3 numbers"),
    (dict(prior_losses=[1.0, 2.0, 3.0], warmup_steps=4),
     r"warmup_steps has no effect .*got 4"),
])
def test_hyperparameter_errors(kwargs, message):
  harness.check_rejects(optax_mtl.initial_loss, kwargs, message)


def test_prior_accepts_arrays_and_log_num_classes():
  strategy = optax_mtl.initial_loss(
      2, prior_losses=jnp.array([math.log(10), math.log(1000)]))
  np.testing.assert_allclose(strategy.init(None).weights,
                             [1 / math.log(10), 1 / math.log(1000)], rtol=1e-6)


def test_the_spelling_of_optax_mtl_0_1_warns_and_runs_the_same():
  """0.1 took ``warmup_steps`` by position."""
  harness.check_old_spelling(
      lambda: optax_mtl.initial_loss(NUM_TASKS, None, 2),
      lambda: optax_mtl.initial_loss(NUM_TASKS, warmup_steps=2),
      match="warmup_steps=2")
