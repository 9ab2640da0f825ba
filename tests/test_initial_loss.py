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

NUM_TASKS = 3
NUM_PARAMS = 4
NAN, INF = float("nan"), float("inf")
# A scripted run with a NaN, a zero and an infinite loss in the middle.
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
# log C for tasks with C = 10, 2 and 100 classes.
PRIOR = np.log([10.0, 2.0, 100.0])


def is_finite(losses):
  return bool(np.all(np.isfinite(losses)))


def is_positive(losses):
  return is_finite(losses) and bool(np.all(losses > 0))


def reference_measured(losses, warmup_steps):
  """w_k = 1 / mean of L_k over the first accepted steps (up to warmup)."""
  measured = []
  weights = np.ones(NUM_TASKS)
  out, skipped = [], 0
  for step_losses in np.asarray(losses, np.float64):
    if is_positive(step_losses):
      if len(measured) < warmup_steps:
        measured.append(step_losses)
      weights = 1.0 / np.mean(measured, axis=0)
    else:
      skipped += 1
    out.append(weights)
  return np.array(out), skipped, len(measured)


@pytest.mark.parametrize("warmup_steps", [1, 3, 10])
def test_golden_values_optax_face_measured(warmup_steps):
  strategy = optax_mtl.initial_loss(NUM_TASKS, warmup_steps=warmup_steps)
  update_fn = jax.jit(strategy.update)
  state = strategy.init(None)
  init_types = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  expected, skipped, measured = reference_measured(LOSSES, warmup_steps)
  for step, (losses, grads) in enumerate(zip(LOSSES, GRADS)):
    update, state = update_fn(grads, state, task_losses=losses)
    np.testing.assert_allclose(state.weights, expected[step], rtol=1e-6)
    np.testing.assert_allclose(state.initial_losses, 1.0 / expected[step],
                               rtol=1e-6)
    np.testing.assert_allclose(update, expected[step] @ grads, rtol=1e-5,
                               atol=1e-6)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == init_types
  assert int(state.num_skipped) == skipped == 3
  assert int(state.num_measured) == measured


def test_first_step_weights_are_inverse_first_losses():
  strategy = optax_mtl.initial_loss(NUM_TASKS, warmup_steps=5)
  update, state = jax.jit(strategy.update)(
      GRADS[0], strategy.init(None), task_losses=LOSSES[0])
  np.testing.assert_allclose(state.weights, 1.0 / LOSSES[0], rtol=1e-6)
  np.testing.assert_allclose(update, (1.0 / LOSSES[0]) @ GRADS[0], rtol=1e-5)


def test_golden_values_optax_face_prior():
  strategy = optax_mtl.initial_loss(NUM_TASKS, prior_losses=PRIOR)
  update_fn = jax.jit(strategy.update)
  state = strategy.init(None)
  expected = 1.0 / PRIOR
  np.testing.assert_allclose(state.weights, expected, rtol=1e-6)
  for losses, grads in zip(LOSSES, GRADS):
    update, state = update_fn(grads, state, task_losses=losses)
    np.testing.assert_allclose(state.weights, expected, rtol=1e-6)
    np.testing.assert_allclose(update, expected @ grads, rtol=1e-5, atol=1e-6)
  # Only the non-finite steps are rejected: the zero loss is fine here.
  assert int(state.num_skipped) == sum(not is_finite(l) for l in LOSSES) == 2
  np.testing.assert_allclose(state.initial_losses, PRIOR, rtol=1e-6)


def test_golden_values_value_and_grad_face():
  directions = GRADS[0]  # f32[T, P]

  def loss_fn(params, scripted_losses):
    # Equals scripted_losses at params = 0; gradient L_k · directions[k].
    return scripted_losses * jnp.exp(directions @ params)

  strategy = optax_mtl.initial_loss(NUM_TASKS, warmup_steps=3)
  step_fn = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  params = jnp.zeros(NUM_PARAMS)
  state = strategy.init(params)
  expected, skipped, _ = reference_measured(LOSSES, 3)
  for step, losses in enumerate(LOSSES):
    (task_losses, grads), state = step_fn(params, state, losses)
    np.testing.assert_allclose(state.weights, expected[step], rtol=1e-6)
    if is_positive(losses):
      np.testing.assert_allclose(task_losses, losses)
      np.testing.assert_allclose(
          grads, (expected[step] * losses) @ directions, rtol=1e-5, atol=1e-6)
  assert int(state.num_skipped) == skipped


@functools.lru_cache(maxsize=None)
def scan_run(warmup_steps):
  """A jitted run over a whole sequence, compiled once per warmup."""
  strategy = optax_mtl.initial_loss(NUM_TASKS, warmup_steps=warmup_steps)

  def run(losses, grads):
    def body(state, inputs):
      update, state = strategy.update(inputs[1], state, task_losses=inputs[0])
      return state, (update, state.weights)
    return jax.lax.scan(body, strategy.init(None), (losses, grads))[1]

  return jax.jit(run)


SEQUENCE_SHAPE = (5, NUM_TASKS)
wide_positive_losses = st.lists(
    st.floats(-10.0, 10.0), min_size=5 * NUM_TASKS,
    max_size=5 * NUM_TASKS).map(
        lambda xs: (10.0 ** np.array(xs)).astype(np.float32).reshape(
            SEQUENCE_SHAPE))


@settings(max_examples=30, deadline=None)
@given(losses=wide_positive_losses)
def test_weights_finite_and_positive(losses):
  grads = np.ones(SEQUENCE_SHAPE + (2,), np.float32)
  _, weights = scan_run(3)(losses, grads)
  assert np.all(np.isfinite(weights)) and np.all(weights > 0)
  expected, _, _ = reference_measured(losses, 3)
  np.testing.assert_allclose(weights, expected, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(losses=wide_positive_losses, log_scale=st.floats(-3.0, 3.0),
       task=st.integers(0, NUM_TASKS - 1), seed=st.integers(0, 2**16))
def test_update_invariant_to_scaling_one_task(losses, log_scale, task, seed):
  grads = np.random.default_rng(seed).normal(
      size=SEQUENCE_SHAPE + (2,)).astype(np.float32)
  factor = np.ones(NUM_TASKS, np.float32)
  factor[task] = 10.0 ** log_scale
  updates, weights = scan_run(3)(losses, grads)
  scaled_updates, _ = scan_run(3)(losses * factor,
                                  grads * factor[None, :, None])
  # Float tolerance relative to the size of the terms of Σ_k w_k g_k.
  term_size = np.einsum("sk,skp->sp", np.abs(weights), np.abs(grads))
  assert np.all(np.abs(scaled_updates - updates) <= 1e-5 * term_size)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tasks=0), r"num_tasks must be an integer >= 1, got 0"),
    (dict(warmup_steps=0), r"warmup_steps must be an integer >= 1, got 0"),
    (dict(warmup_steps=2.5), r"warmup_steps must be an integer >= 1, got 2.5"),
    (dict(prior_losses=[1.0, 2.0]),
     r"prior_losses must have shape \(3,\).*got shape \(2,\)"),
    (dict(prior_losses=[1.0, 0.0, 2.0]),
     r"prior_losses must be finite and positive.*got \[1.0, 0.0, 2.0\]"),
    (dict(prior_losses=[1.0, -1.0, 2.0]),
     r"prior_losses must be finite and positive.*got \[1.0, -1.0, 2.0\]"),
    (dict(prior_losses=[1.0, NAN, 2.0]),
     r"prior_losses must be finite and positive.*got \[1.0, nan, 2.0\]"),
    (dict(prior_losses=[1.0, 1e-45, 2.0]),
     r"prior_losses must be finite and positive.*got \[1.0, 1e-45, 2.0\]"),
    (dict(prior_losses=["a", "b", "c"]), r"prior_losses must be an array"),
    (dict(prior_losses=[1.0, 2.0, 3.0], warmup_steps=4),
     r"warmup_steps has no effect .*got 4"),
])
def test_hyperparameter_errors(kwargs, message):
  kwargs = {"num_tasks": NUM_TASKS, **kwargs}
  with pytest.raises(ValueError, match=message):
    optax_mtl.initial_loss(**kwargs)


def test_prior_accepts_arrays_and_log_num_classes():
  strategy = optax_mtl.initial_loss(
      2, prior_losses=jnp.array([math.log(10), math.log(1000)]))
  np.testing.assert_allclose(strategy.init(None).weights,
                             [1 / math.log(10), 1 / math.log(1000)], rtol=1e-6)
