"""Tests of optax_mtl.dwa against a NumPy reference of Eq. 7 of MTAN."""

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


def reference_weights(losses, temperature, steps_per_epoch):
  """w_k(t) = T exp(r_k(t−1)/τ) / Σ_i exp(r_i(t−1)/τ), from the paper.

  ``t`` indexes epochs of ``steps_per_epoch`` accepted steps (one step when
  None), ``L(t)`` is the mean loss over epoch ``t`` and ``w = 1`` for the
  first two epochs.
  """
  period = 1 if steps_per_epoch is None else steps_per_epoch
  history = []
  weights = np.ones(NUM_TASKS)
  out = []
  for step_losses in np.asarray(losses, np.float64):
    if is_accepted(step_losses):
      history.append(step_losses)
      epoch = (len(history) - 1) // period
      if epoch >= 2:
        previous = np.mean(history[(epoch - 1) * period:epoch * period], 0)
        before = np.mean(history[(epoch - 2) * period:(epoch - 1) * period], 0)
        ratios = previous / before
        weights = NUM_TASKS * np.exp(ratios / temperature) / np.sum(
            np.exp(ratios / temperature))
      else:
        weights = np.ones(NUM_TASKS)
    out.append(weights)
  return np.array(out)


@pytest.mark.parametrize("temperature, steps_per_epoch", [
    (2.0, None), (0.5, None), (2.0, 1), (0.5, 2), (1.0, 3)])
def test_golden_values_optax_face(temperature, steps_per_epoch):
  strategy = optax_mtl.dwa(NUM_TASKS, temperature=temperature,
                           steps_per_epoch=steps_per_epoch)
  update_fn = jax.jit(strategy.update)
  state = strategy.init(None)
  init_types = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  expected = reference_weights(LOSSES, temperature, steps_per_epoch)
  # The scripted run must reach rates that differ from 1.
  assert np.ptp(expected[-1]) > 1e-2
  for step, (losses, grads) in enumerate(zip(LOSSES, GRADS)):
    update, state = update_fn(grads, state, task_losses=losses)
    np.testing.assert_allclose(state.weights, expected[step], rtol=1e-5)
    np.testing.assert_allclose(update, expected[step] @ grads, rtol=1e-5,
                               atol=1e-6)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == init_types
  assert int(state.num_skipped) == 3
  epochs = 11 // (1 if steps_per_epoch is None else steps_per_epoch)
  assert int(state.loss_ratios.num_periods) == epochs


@pytest.mark.parametrize("steps_per_epoch", [None, 2])
def test_golden_values_value_and_grad_face(steps_per_epoch):
  directions = GRADS[0]  # f32[T, P]

  def loss_fn(params, scripted_losses):
    # Equals scripted_losses at params = 0; gradient L_k · directions[k].
    return scripted_losses * jnp.exp(directions @ params)

  strategy = optax_mtl.dwa(NUM_TASKS, steps_per_epoch=steps_per_epoch)
  step_fn = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  params = jnp.zeros(NUM_PARAMS)
  state = strategy.init(params)
  expected = reference_weights(LOSSES, 2.0, steps_per_epoch)
  for step, losses in enumerate(LOSSES):
    (task_losses, grads), state = step_fn(params, state, losses)
    np.testing.assert_allclose(state.weights, expected[step], rtol=1e-5)
    if is_accepted(losses):
      np.testing.assert_allclose(task_losses, losses)
      np.testing.assert_allclose(
          grads, (expected[step] * losses) @ directions, rtol=1e-5, atol=1e-6)
  assert int(state.num_skipped) == 3


@functools.lru_cache(maxsize=None)
def scan_weights(steps_per_epoch):
  """A jitted run over a whole sequence, compiled once per configuration."""
  strategy = optax_mtl.dwa(NUM_TASKS, steps_per_epoch=steps_per_epoch)

  def run(losses):
    def body(state, step_losses):
      grads = jnp.ones((NUM_TASKS, 2))
      _, state = strategy.update(grads, state, task_losses=step_losses)
      return state, state.weights
    return jax.lax.scan(body, strategy.init(None), losses)[1]

  return jax.jit(run)


@settings(max_examples=30, deadline=None)
@given(losses=st.lists(st.floats(0.1, 10.0), min_size=6 * NUM_TASKS,
                       max_size=6 * NUM_TASKS),
       steps_per_epoch=st.sampled_from([None, 2]))
def test_weights_finite_positive_and_sum_to_num_tasks(losses, steps_per_epoch):
  losses = np.array(losses, np.float32).reshape(6, NUM_TASKS)
  weights = scan_weights(steps_per_epoch)(losses)
  assert np.all(np.isfinite(weights)) and np.all(weights > 0)
  np.testing.assert_allclose(weights.sum(-1), NUM_TASKS, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), r"temperature must lie in \(0.0, inf.?, got 0.0"),
    (dict(temperature=NAN), r"temperature must lie in .*got nan"),
    (dict(steps_per_epoch=0),
     r"steps_per_epoch must be an integer >= 1, got 0"),
    (dict(steps_per_epoch=2.0),
     r"steps_per_epoch must be an integer >= 1, got 2.0"),
    (dict(steps_per_epoch=True),
     r"steps_per_epoch must be an integer >= 1, got True"),
    (dict(num_tasks=-1), r"num_tasks must be an integer >= 1, got -1"),
])
def test_hyperparameter_errors(kwargs, message):
  kwargs = {"num_tasks": NUM_TASKS, **kwargs}
  with pytest.raises(ValueError, match=message):
    optax_mtl.dwa(**kwargs)
