"""Tests of optax_mtl.geometric_mean against the gradient of (Π_k L_k)^(1/γ)."""

import decimal
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


def reference_weights(losses, gamma):
  """w_k = ∂(Π_j L_j)^(1/γ) / ∂L_k = (Π_j L_j)^(1/γ) / (γ L_k), directly."""
  weights = np.full(NUM_TASKS, 1.0 / gamma)
  out = []
  for step_losses in np.asarray(losses, np.float64):
    if is_accepted(step_losses):
      total = np.prod(step_losses) ** (1.0 / gamma)
      weights = total / (gamma * step_losses)
    out.append(weights)
  return np.array(out)


@pytest.mark.parametrize("gamma", [None, 1.0, 2.5])
def test_golden_values_optax_face(gamma):
  strategy = optax_mtl.geometric_mean(NUM_TASKS, gamma=gamma)
  update_fn = jax.jit(strategy.update)
  state = strategy.init(None)
  init_types = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  expected = reference_weights(LOSSES, NUM_TASKS if gamma is None else gamma)
  for step, (losses, grads) in enumerate(zip(LOSSES, GRADS)):
    update, state = update_fn(grads, state, task_losses=losses)
    np.testing.assert_allclose(state.weights, expected[step], rtol=2e-6)
    np.testing.assert_allclose(update, expected[step] @ grads, rtol=1e-5,
                               atol=1e-6)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == init_types
  assert int(state.num_skipped) == NUM_REJECTED


def test_golden_values_value_and_grad_face():
  directions = GRADS[0]  # f32[T, P]

  def loss_fn(params, scripted_losses):
    # Equals scripted_losses at params = 0; gradient L_k · directions[k].
    return scripted_losses * jnp.exp(directions @ params)

  strategy = optax_mtl.geometric_mean(NUM_TASKS)
  step_fn = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  params = jnp.zeros(NUM_PARAMS)
  state = strategy.init(params)
  expected = reference_weights(LOSSES, NUM_TASKS)
  for step, losses in enumerate(LOSSES):
    (task_losses, grads), state = step_fn(params, state, losses)
    np.testing.assert_allclose(state.weights, expected[step], rtol=2e-6)
    if is_accepted(losses):
      np.testing.assert_allclose(task_losses, losses)
      np.testing.assert_allclose(
          grads, (expected[step] * losses) @ directions, rtol=1e-5, atol=1e-6)
  assert int(state.num_skipped) == NUM_REJECTED


@pytest.mark.parametrize("gamma", [None, 1.0, 4.0])
def test_gradient_equals_jax_grad_of_product_power(gamma):
  """value_and_grad's gradient is ∇(Π_k L_k)^(1/γ) on a small linear model."""
  rng = np.random.default_rng(1)
  inputs = rng.normal(size=(8, NUM_PARAMS)).astype(np.float32)
  targets = rng.normal(size=(8, NUM_TASKS)).astype(np.float32)
  params = {"w": jnp.asarray(rng.normal(size=(NUM_PARAMS, NUM_TASKS)),
                             jnp.float32),
            "b": jnp.zeros(NUM_TASKS)}

  def loss_fn(params, inputs, targets):
    predictions = inputs @ params["w"] + params["b"]
    errors = jnp.mean((predictions - targets) ** 2, axis=0)  # f32[T]
    return errors * jnp.array([1.0, 100.0, 0.01])

  strategy = optax_mtl.geometric_mean(NUM_TASKS, gamma=gamma)
  step_fn = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  (_, grads), _ = step_fn(params, strategy.init(params), inputs, targets)
  power = 1.0 / (NUM_TASKS if gamma is None else gamma)
  expected = jax.grad(
      lambda p: jnp.prod(loss_fn(p, inputs, targets)) ** power)(params)
  for name in params:
    np.testing.assert_allclose(grads[name], expected[name], rtol=2e-5,
                               atol=1e-6)


def decimal_weights(losses, gamma):
  """The weights in arbitrary precision: Π_k L_k may be far out of range."""
  with decimal.localcontext() as context:
    context.prec = 50
    values = [decimal.Decimal(float(loss)) for loss in losses]
    product = decimal.Decimal(1)
    for value in values:
      product *= value
    total = product ** (decimal.Decimal(1) / decimal.Decimal(gamma))
    return np.array([float(total / (decimal.Decimal(gamma) * value))
                     for value in values])


@pytest.mark.parametrize("losses", [
    np.full(128, 1e10), np.full(128, 1e-10),
    10.0 ** np.linspace(-10, 10, 128),
    10.0 ** np.random.default_rng(3).uniform(-10, 10, size=128),
])
def test_many_tasks_neither_overflow_nor_underflow(losses):
  """T = 128: Π L_k is 1e±1280, far outside float32 (and float64)."""
  losses = losses.astype(np.float32)
  strategy = optax_mtl.geometric_mean(128)
  update, state = jax.jit(strategy.update)(
      jnp.eye(128), strategy.init(None), task_losses=losses)
  expected = decimal_weights(losses, 128)
  assert int(state.num_skipped) == 0
  np.testing.assert_allclose(state.weights, expected, rtol=1e-4)
  np.testing.assert_allclose(update, expected, rtol=1e-4)


@functools.lru_cache(maxsize=None)
def scan_run(num_tasks):
  strategy = optax_mtl.geometric_mean(num_tasks)

  def run(losses):
    def body(state, step_losses):
      _, state = strategy.update(jnp.eye(num_tasks), state,
                                 task_losses=step_losses)
      return state, state.weights
    return jax.lax.scan(body, strategy.init(None), losses)[1]

  return jax.jit(run)


def wide_positive_losses(num_tasks):
  return st.lists(
      st.floats(-10.0, 10.0), min_size=3 * num_tasks,
      max_size=3 * num_tasks).map(
          lambda xs: (10.0 ** np.array(xs)).astype(np.float32).reshape(
              3, num_tasks))


@settings(max_examples=30, deadline=None)
@given(losses=wide_positive_losses(NUM_TASKS))
def test_weights_finite_and_positive(losses):
  weights = scan_run(NUM_TASKS)(losses)
  assert np.all(np.isfinite(weights)) and np.all(weights > 0)
  np.testing.assert_allclose(weights, reference_weights(losses, NUM_TASKS),
                             rtol=1e-4)


@settings(max_examples=10, deadline=None)
@given(losses=wide_positive_losses(128))
def test_weights_finite_and_positive_many_tasks(losses):
  weights = scan_run(128)(losses)
  assert np.all(np.isfinite(weights)) and np.all(weights > 0)
  # Every task contributes the same w_k L_k = (Π_j L_j)^(1/T) / T.
  contributions = weights * losses
  np.testing.assert_allclose(
      contributions, np.broadcast_to(contributions[:, :1], losses.shape),
      rtol=1e-5)


def test_gamma_too_small_for_the_product_is_rejected():
  """Weights that overflow float32 reject the step instead of going inf."""
  strategy = optax_mtl.geometric_mean(128, gamma=1.0)
  _, state = jax.jit(strategy.update)(
      jnp.eye(128), strategy.init(None), task_losses=np.full(128, 1e10))
  assert int(state.num_skipped) == 1
  np.testing.assert_allclose(state.weights, 1.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tasks=0), r"num_tasks must be an integer >= 1, got 0"),
    (dict(gamma=0.0), r"gamma must lie in \(0.0, inf[)\]], got 0.0"),
    (dict(gamma=-2.0), r"gamma must lie in \(0.0, inf[)\]], got -2.0"),
    (dict(gamma=NAN), r"gamma must lie in .*got nan"),
    (dict(gamma=INF), r"gamma must be finite, got inf"),
    (dict(gamma="2"), r"gamma must be a real number, got '2'"),
])
def test_hyperparameter_errors(kwargs, message):
  kwargs = {"num_tasks": NUM_TASKS, **kwargs}
  with pytest.raises(ValueError, match=message):
    optax_mtl.geometric_mean(**kwargs)
