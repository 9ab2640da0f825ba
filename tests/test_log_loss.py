"""Tests of optax_mtl.log_loss against a NumPy reference of ∇ Σ_k log L_k."""

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
NUM_PARAMS = harness.NUM_PARAMS
# A scripted run with a NaN, a zero and an infinite loss, each of one task
# (each excludes its task only).
LOSSES = harness.REJECTED_IN_MIDDLE
GRADS = harness.scripted_grads(LOSSES)
REJECTED_PER_TASK = [1, 1, 1]


def reference_weights(losses):
  """d/dL_k Σ_j log L_j = 1 / L_k; a task with a bad loss (non-finite or
  <= 0) keeps its old weight, the others do not wait for it."""
  weights = np.ones(NUM_TASKS)
  out = []
  for step_losses in np.asarray(losses, np.float64):
    valid = np.isfinite(step_losses) & (step_losses > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
      weights = np.where(valid, 1.0 / step_losses, weights)
    out.append(weights)
  return np.array(out)


STRATEGY = optax_mtl.log_loss(NUM_TASKS)


def test_golden_values_optax_face():
  state = harness.check_optax_face(STRATEGY, LOSSES, GRADS,
                                   reference_weights(LOSSES),
                                   weights_rtol=1e-6)
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, REJECTED_PER_TASK)


def test_golden_values_value_and_grad_face():
  directions = GRADS[0]  # f32[T, P]
  state = harness.check_value_and_grad_face(
      STRATEGY, LOSSES, directions, reference_weights(LOSSES),
      weights_rtol=1e-6,
      # Σ_k (1/L_k) L_k d_k = Σ_k d_k: the gradient of Σ log L_k.
      expected_grads=lambda step, losses: directions.sum(0))
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, REJECTED_PER_TASK)


def test_gradient_equals_gradient_of_sum_of_logs():
  x = np.random.default_rng(1).normal(size=(8, NUM_PARAMS)).astype(np.float32)

  def loss_fn(params, inputs):
    predictions = inputs @ params  # f32[8, T]
    return jnp.stack([jnp.mean((predictions[:, 0] - 1.0) ** 2),
                      10.0 * jnp.mean((predictions[:, 1] + 2.0) ** 2),
                      0.01 * jnp.mean(jnp.abs(predictions[:, 2] - 3.0))])

  params = jnp.asarray(
      np.random.default_rng(2).normal(size=(NUM_PARAMS, NUM_TASKS)),
      jnp.float32)
  step_fn = jax.jit(optax_mtl.value_and_grad(loss_fn, STRATEGY))
  (_, grads), _ = step_fn(params, STRATEGY.init(params), x)
  expected = jax.grad(lambda p: jnp.sum(jnp.log(loss_fn(p, x))))(params)
  np.testing.assert_allclose(grads, expected, rtol=1e-5, atol=1e-6)


RUN = harness.scan_updates(STRATEGY)
wide_positive_losses = harness.wide_positive_losses(4)


@settings(max_examples=30, deadline=None)
@given(losses=wide_positive_losses)
def test_weights_finite_and_positive(losses):
  weights = harness.weights_with_unit_grads(RUN, losses)
  harness.assert_finite_and_positive(weights)
  np.testing.assert_allclose(weights, 1.0 / losses.astype(np.float64),
                             rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(losses=wide_positive_losses, log_scale=st.floats(-3.0, 3.0),
       task=st.integers(0, NUM_TASKS - 1), seed=st.integers(0, 2**16))
def test_update_invariant_to_scaling_one_task(losses, log_scale, task, seed):
  harness.check_invariant_to_scaling_one_task(
      RUN, losses, 10.0 ** log_scale, task, seed, rtol=1e-5)


@pytest.mark.parametrize("num_tasks, message", [
    (2.0, r"num_tasks must be an integer >= 1, got 2.0"),
    (True, r"num_tasks must be an integer >= 1, got True"),
])
def test_hyperparameter_errors(num_tasks, message):
  harness.check_rejects(optax_mtl.log_loss, dict(num_tasks=num_tasks),
                        message)
