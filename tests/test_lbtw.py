"""Tests of optax_mtl.lbtw against a NumPy reference of the paper's rule."""

import functools

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
# A scripted run of 14 steps, 11 accepted: a rejected first step, a NaN step
# and a negative-loss step. With 2 or 3 steps per epoch it spans 4-6 epochs.
LOSSES = np.array([
    [INF, 1.0, 1.0],
    [2.0, 0.5, 10.0],
    [1.5, 0.6, 8.0],
    [NAN, 0.4, 7.0],
    [1.2, 0.3, 9.0],
    [1.0, 0.35, 6.0],
    [0.9, -0.1, 5.5],
    [0.8, 0.25, 5.0],
    [0.85, 0.2, 4.0],
    [0.7, 0.22, 4.5],
    [0.6, 0.18, 3.0],
    [0.65, 0.15, 3.2],
    [0.5, 0.16, 2.5],
    [0.45, 0.12, 2.6],
], np.float32)
GRADS = np.random.default_rng(0).normal(
    size=(len(LOSSES), NUM_TASKS, NUM_PARAMS)).astype(np.float32)


def is_accepted(losses):
  return bool(np.all(np.isfinite(losses)) and np.all(losses > 0))


def reference_weights(losses, alpha, steps_per_epoch, normalize):
  """w_k = (L_k / L_k^ref)^α, L^ref the losses of the epoch's first step.

  Epochs are runs of ``steps_per_epoch`` accepted steps (one epoch for ever
  when None); with ``normalize`` the weights are rescaled to sum to T.
  """
  history = []
  weights = np.ones(NUM_TASKS)
  out = []
  for step_losses in np.asarray(losses, np.float64):
    if is_accepted(step_losses):
      history.append(step_losses)
      index = len(history) - 1
      start = 0 if steps_per_epoch is None else (
          index // steps_per_epoch * steps_per_epoch)
      weights = (step_losses / history[start]) ** alpha
      if normalize:
        weights = NUM_TASKS * weights / weights.sum()
    out.append(weights)
  return np.array(out)


@pytest.mark.parametrize("alpha, steps_per_epoch, normalize", [
    (0.5, None, True), (0.5, None, False), (1.0, 2, True), (2.0, 3, False),
    (0.0, 3, True)])
def test_golden_values_optax_face(alpha, steps_per_epoch, normalize):
  strategy = optax_mtl.lbtw(NUM_TASKS, alpha=alpha,
                            steps_per_epoch=steps_per_epoch,
                            normalize=normalize)
  update_fn = jax.jit(strategy.update)
  state = strategy.init(None)
  init_types = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  expected = reference_weights(LOSSES, alpha, steps_per_epoch, normalize)
  for step, (losses, grads) in enumerate(zip(LOSSES, GRADS)):
    update, state = update_fn(grads, state, task_losses=losses)
    np.testing.assert_allclose(state.weights, expected[step], rtol=1e-5)
    np.testing.assert_allclose(update, expected[step] @ grads, rtol=1e-5,
                               atol=1e-6)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == init_types
  assert int(state.num_skipped) == 3
  if steps_per_epoch is not None:  # 11 accepted steps.
    assert int(state.steps_in_epoch) == 11 % steps_per_epoch


@pytest.mark.parametrize("steps_per_epoch", [None, 2])
def test_golden_values_value_and_grad_face(steps_per_epoch):
  directions = GRADS[0]  # f32[T, P]

  def loss_fn(params, scripted_losses):
    # Equals scripted_losses at params = 0; gradient L_k · directions[k].
    return scripted_losses * jnp.exp(directions @ params)

  strategy = optax_mtl.lbtw(NUM_TASKS, steps_per_epoch=steps_per_epoch)
  step_fn = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  params = jnp.zeros(NUM_PARAMS)
  state = strategy.init(params)
  expected = reference_weights(LOSSES, 0.5, steps_per_epoch, True)
  for step, losses in enumerate(LOSSES):
    (task_losses, grads), state = step_fn(params, state, losses)
    np.testing.assert_allclose(state.weights, expected[step], rtol=1e-5)
    if is_accepted(losses):
      np.testing.assert_allclose(task_losses, losses)
      np.testing.assert_allclose(
          grads, (expected[step] * losses) @ directions, rtol=1e-5, atol=1e-6)
  assert int(state.num_skipped) == 3


@functools.lru_cache(maxsize=None)
def scan_weights(steps_per_epoch, normalize):
  """A jitted run over a whole sequence, compiled once per configuration."""
  strategy = optax_mtl.lbtw(NUM_TASKS, steps_per_epoch=steps_per_epoch,
                            normalize=normalize)

  def run(losses):
    def body(state, step_losses):
      grads = jnp.ones((NUM_TASKS, 2))
      _, state = strategy.update(grads, state, task_losses=step_losses)
      return state, state.weights
    return jax.lax.scan(body, strategy.init(None), losses)[1]

  return jax.jit(run)


@settings(max_examples=30, deadline=None)
@given(losses=st.lists(st.floats(1e-3, 1e3), min_size=6 * NUM_TASKS,
                       max_size=6 * NUM_TASKS),
       steps_per_epoch=st.sampled_from([None, 2]), normalize=st.booleans())
def test_weights_finite_and_positive(losses, steps_per_epoch, normalize):
  losses = np.array(losses, np.float32).reshape(6, NUM_TASKS)
  weights = scan_weights(steps_per_epoch, normalize)(losses)
  assert np.all(np.isfinite(weights)) and np.all(weights > 0)
  if normalize:
    np.testing.assert_allclose(weights.sum(-1), NUM_TASKS, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=-0.5), r"alpha must lie in \[0.0, inf.?, got -0.5"),
    (dict(alpha=NAN), r"alpha must lie in .*got nan"),
    (dict(alpha=None), r"alpha must be a real number, got None"),
    (dict(steps_per_epoch=0),
     r"steps_per_epoch must be an integer >= 1, got 0"),
    (dict(steps_per_epoch=1.5),
     r"steps_per_epoch must be an integer >= 1, got 1.5"),
    (dict(normalize="yes"), r"normalize must be a bool, got 'yes'"),
    (dict(num_tasks=0), r"num_tasks must be an integer >= 1, got 0"),
])
def test_hyperparameter_errors(kwargs, message):
  kwargs = {"num_tasks": NUM_TASKS, **kwargs}
  with pytest.raises(ValueError, match=message):
    optax_mtl.lbtw(**kwargs)
