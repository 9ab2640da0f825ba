"""Tests of optax_mtl.log_loss against a NumPy reference of ∇ Σ_k log L_k."""

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl

NUM_TASKS = 3
NUM_PARAMS = 4
NAN, INF = float("nan"), float("inf")
# A scripted run with a NaN, a zero and an infinite loss (all rejected).
LOSSES = np.array([
    [2.0, 0.5, 10.0],
    [1.5, 0.4, 8.0],
    [NAN, 0.3, 7.0],
    [1.2, 0.0, 6.0],
    [1.0, 0.25, 5.0],
    [0.8, 0.2, 4.5],
    [0.7, 0.1, INF],
    [0.6, 0.05, 4.0],
], np.float32)
GRADS = np.random.default_rng(0).normal(
    size=(len(LOSSES), NUM_TASKS, NUM_PARAMS)).astype(np.float32)
NUM_REJECTED = 3


def is_accepted(losses):
  return bool(np.all(np.isfinite(losses)) and np.all(losses > 0))


def reference_weights(losses):
  """d/dL_k Σ_j log L_j = 1 / L_k; a rejected step keeps the old weights."""
  weights = np.ones(NUM_TASKS)
  out = []
  for step_losses in np.asarray(losses, np.float64):
    if is_accepted(step_losses):
      weights = np.array([1.0 / loss for loss in step_losses])
    out.append(weights)
  return np.array(out)


STRATEGY = optax_mtl.log_loss(NUM_TASKS)
UPDATE_FN = jax.jit(STRATEGY.update)


def test_golden_values_optax_face():
  state = STRATEGY.init(None)
  init_types = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  expected = reference_weights(LOSSES)
  for step, (losses, grads) in enumerate(zip(LOSSES, GRADS)):
    update, state = UPDATE_FN(grads, state, task_losses=losses)
    np.testing.assert_allclose(state.weights, expected[step], rtol=1e-6)
    np.testing.assert_allclose(update, expected[step] @ grads, rtol=1e-5,
                               atol=1e-6)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == init_types
  assert int(state.num_skipped) == NUM_REJECTED


def test_golden_values_value_and_grad_face():
  directions = GRADS[0]  # f32[T, P]

  def loss_fn(params, scripted_losses):
    # Equals scripted_losses at params = 0; gradient L_k · directions[k].
    return scripted_losses * jnp.exp(directions @ params)

  step_fn = jax.jit(optax_mtl.value_and_grad(loss_fn, STRATEGY))
  params = jnp.zeros(NUM_PARAMS)
  state = STRATEGY.init(params)
  expected = reference_weights(LOSSES)
  for step, losses in enumerate(LOSSES):
    (task_losses, grads), state = step_fn(params, state, losses)
    np.testing.assert_allclose(state.weights, expected[step], rtol=1e-6)
    if is_accepted(losses):
      np.testing.assert_allclose(task_losses, losses)
      # Σ_k (1/L_k) L_k d_k = Σ_k d_k: the gradient of Σ log L_k.
      np.testing.assert_allclose(grads, directions.sum(0), rtol=1e-5,
                                 atol=1e-6)
  assert int(state.num_skipped) == NUM_REJECTED


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


def run(losses, grads):
  def body(state, inputs):
    update, state = STRATEGY.update(inputs[1], state, task_losses=inputs[0])
    return state, (update, state.weights)
  return jax.lax.scan(body, STRATEGY.init(None), (losses, grads))[1]


RUN = jax.jit(run)
SEQUENCE_SHAPE = (4, NUM_TASKS)
wide_positive_losses = st.lists(
    st.floats(-10.0, 10.0), min_size=4 * NUM_TASKS,
    max_size=4 * NUM_TASKS).map(
        lambda xs: (10.0 ** np.array(xs)).astype(np.float32).reshape(
            SEQUENCE_SHAPE))


@settings(max_examples=30, deadline=None)
@given(losses=wide_positive_losses)
def test_weights_finite_and_positive(losses):
  grads = np.ones(SEQUENCE_SHAPE + (2,), np.float32)
  _, weights = RUN(losses, grads)
  assert np.all(np.isfinite(weights)) and np.all(weights > 0)
  np.testing.assert_allclose(weights, 1.0 / losses.astype(np.float64),
                             rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(losses=wide_positive_losses, log_scale=st.floats(-3.0, 3.0),
       task=st.integers(0, NUM_TASKS - 1), seed=st.integers(0, 2**16))
def test_update_invariant_to_scaling_one_task(losses, log_scale, task, seed):
  grads = np.random.default_rng(seed).normal(
      size=SEQUENCE_SHAPE + (2,)).astype(np.float32)
  factor = np.ones(NUM_TASKS, np.float32)
  factor[task] = 10.0 ** log_scale
  updates, weights = RUN(losses, grads)
  scaled_updates, _ = RUN(losses * factor, grads * factor[None, :, None])
  # Float tolerance relative to the size of the terms of Σ_k w_k g_k.
  term_size = np.einsum("sk,skp->sp", np.abs(weights), np.abs(grads))
  assert np.all(np.abs(scaled_updates - updates) <= 1e-5 * term_size)


@pytest.mark.parametrize("num_tasks, message", [
    (0, r"num_tasks must be an integer >= 1, got 0"),
    (2.0, r"num_tasks must be an integer >= 1, got 2.0"),
    (True, r"num_tasks must be an integer >= 1, got True"),
])
def test_hyperparameter_errors(num_tasks, message):
  with pytest.raises(ValueError, match=message):
    optax_mtl.log_loss(num_tasks)
