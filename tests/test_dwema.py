"""Tests of optax_mtl.dwema against a NumPy reference (DWA factors / EMA)."""

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
# A scripted run: a rejected first step (so "first" means first accepted),
# a NaN step and a zero-loss step in the middle.
LOSSES = np.array([
    [INF, 1.0, 1.0],
    [2.0, 0.5, 10.0],
    [1.5, 0.6, 8.0],
    [NAN, 0.4, 7.0],
    [1.2, 0.3, 9.0],
    [1.0, 0.35, 6.0],
    [0.9, 0.0, 5.5],
    [0.8, 0.25, 5.0],
    [0.85, 0.2, 4.0],
    [0.7, 0.22, 4.5],
], np.float32)
GRADS = np.random.default_rng(0).normal(
    size=(len(LOSSES), NUM_TASKS, NUM_PARAMS)).astype(np.float32)


def is_accepted(losses):
  return bool(np.all(np.isfinite(losses)) and np.all(losses > 0))


def loss_average(history, beta):
  """Eq. 1 in closed form: L̃(n) = (1−β)^(n−1) L(1) + Σ_s β (1−β)^(n−s) L(s)."""
  n = len(history)
  average = (1 - beta) ** (n - 1) * history[0]
  for s in range(2, n + 1):
    average = average + beta * (1 - beta) ** (n - s) * history[s - 1]
  return average


def reference_weights(losses, beta, temperature):
  """w_k = T exp(r_k/τ) / Σ_i exp(r_i/τ) / L̃_k, r = L(t−1) / L(t−2)."""
  history = []
  weights = np.ones(NUM_TASKS)
  out = []
  for step_losses in np.asarray(losses, np.float64):
    if is_accepted(step_losses):
      history.append(step_losses)
      if len(history) >= 3:  # Two earlier accepted steps exist.
        ratios = history[-2] / history[-3]
      else:
        ratios = np.ones(NUM_TASKS)
      factors = NUM_TASKS * np.exp(ratios / temperature) / np.sum(
          np.exp(ratios / temperature))
      weights = factors / loss_average(history, beta)
    out.append(weights)
  return np.array(out)


@pytest.mark.parametrize("beta, temperature", [(0.1, 2.0), (0.5, 0.5),
                                               (1.0, 1.0)])
def test_golden_values_optax_face(beta, temperature):
  strategy = optax_mtl.dwema(NUM_TASKS, beta=beta, temperature=temperature)
  update_fn = jax.jit(strategy.update)
  state = strategy.init(None)
  init_types = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  expected = reference_weights(LOSSES, beta, temperature)
  for step, (losses, grads) in enumerate(zip(LOSSES, GRADS)):
    update, state = update_fn(grads, state, task_losses=losses)
    np.testing.assert_allclose(state.weights, expected[step], rtol=1e-5)
    np.testing.assert_allclose(update, expected[step] @ grads, rtol=1e-5,
                               atol=1e-6)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == init_types
  assert int(state.num_skipped) == 3
  assert int(state.loss_average.num_steps) == 7
  assert int(state.loss_ratios.num_periods) == 7


def test_golden_values_value_and_grad_face():
  beta = 0.3
  directions = GRADS[0]  # f32[T, P]

  def loss_fn(params, scripted_losses):
    # Equals scripted_losses at params = 0; gradient L_k · directions[k].
    return scripted_losses * jnp.exp(directions @ params)

  strategy = optax_mtl.dwema(NUM_TASKS, beta=beta, temperature=2.0)
  step_fn = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  params = jnp.zeros(NUM_PARAMS)
  state = strategy.init(params)
  expected = reference_weights(LOSSES, beta, 2.0)
  for step, losses in enumerate(LOSSES):
    (task_losses, grads), state = step_fn(params, state, losses)
    np.testing.assert_allclose(state.weights, expected[step], rtol=1e-5)
    if is_accepted(losses):
      np.testing.assert_allclose(task_losses, losses)
      np.testing.assert_allclose(
          grads, (expected[step] * losses) @ directions, rtol=1e-5, atol=1e-6)
  assert int(state.num_skipped) == 3


@functools.lru_cache(maxsize=None)
def scan_run(beta):
  """A jitted run over a whole sequence, compiled once per beta."""
  strategy = optax_mtl.dwema(NUM_TASKS, beta=beta)

  def run(losses, grads):
    def body(state, inputs):
      update, state = strategy.update(inputs[1], state, task_losses=inputs[0])
      return state, (update, state.weights)
    return jax.lax.scan(body, strategy.init(None), (losses, grads))[1]

  return jax.jit(run)


SEQUENCE_SHAPE = (6, NUM_TASKS)
positive_losses = st.lists(
    st.floats(0.1, 10.0), min_size=6 * NUM_TASKS, max_size=6 * NUM_TASKS).map(
        lambda xs: np.array(xs, np.float32).reshape(SEQUENCE_SHAPE))


@settings(max_examples=30, deadline=None)
@given(losses=positive_losses)
def test_weights_finite_and_positive(losses):
  grads = np.ones(SEQUENCE_SHAPE + (2,), np.float32)
  _, weights = scan_run(0.1)(losses, grads)
  assert np.all(np.isfinite(weights)) and np.all(weights > 0)


@settings(max_examples=30, deadline=None)
@given(losses=positive_losses, scale=st.floats(1e-3, 1e3),
       task=st.integers(0, NUM_TASKS - 1), seed=st.integers(0, 2**16))
def test_update_invariant_to_scaling_one_task(losses, scale, task, seed):
  grads = np.random.default_rng(seed).normal(
      size=SEQUENCE_SHAPE + (2,)).astype(np.float32)
  factor = np.ones(NUM_TASKS, np.float32)
  factor[task] = scale
  updates, weights = scan_run(0.1)(losses, grads)
  scaled_updates, _ = scan_run(0.1)(losses * factor,
                                    grads * factor[None, :, None])
  # Float tolerance relative to the size of the terms of Σ_k w_k g_k.
  term_size = np.einsum("sk,skp->sp", np.abs(weights), np.abs(grads))
  assert np.all(np.abs(scaled_updates - updates) <= 1e-4 * term_size + 1e-30)


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=0.0), r"beta must lie in \(0.0, 1.0\], got 0.0"),
    (dict(beta=1.5), r"beta must lie in \(0.0, 1.0\], got 1.5"),
    (dict(beta=NAN), r"beta must lie in .*got nan"),
    (dict(beta="0.1"), r"beta must be a real number, got '0.1'"),
    (dict(num_tasks=0), r"num_tasks must be an integer >= 1, got 0"),
    (dict(temperature=0.0), r"temperature must lie in \(0.0, inf.?, got 0.0"),
    (dict(temperature=-1), r"temperature must lie in .*got -1.0"),
])
def test_hyperparameter_errors(kwargs, message):
  kwargs = {"num_tasks": NUM_TASKS, **kwargs}
  with pytest.raises(ValueError, match=message):
    optax_mtl.dwema(**kwargs)
