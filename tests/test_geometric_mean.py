"""Tests of optax_mtl.geometric_mean against the gradient of (Π_k L_k)^(1/γ)."""

import decimal
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
# A scripted run with a NaN, a zero and an infinite loss, each of one task
# (each excludes its task only).
LOSSES = harness.REJECTED_IN_MIDDLE
GRADS = harness.scripted_grads(LOSSES)
REJECTED_PER_TASK = [1, 1, 1]


def reference_weights(losses, gamma):
  """w_k = ∂(Π_j L_j)^(1/γ) / ∂L_k = (Π_j L_j)^(1/γ) / (γ L_k), directly.

  A task with a bad loss (non-finite or <= 0) is left out of the product
  and keeps its previous weight.
  """
  weights = np.full(NUM_TASKS, 1.0 / gamma)
  out = []
  for step_losses in np.asarray(losses, np.float64):
    valid = np.isfinite(step_losses) & (step_losses > 0)
    if valid.any():
      total = np.prod(step_losses[valid]) ** (1.0 / gamma)
      with np.errstate(divide="ignore", invalid="ignore"):
        weights = np.where(valid, total / (gamma * step_losses), weights)
    out.append(weights)
  return np.array(out)


@pytest.mark.parametrize("gamma", [None, 1.0, 2.5])
def test_golden_values_optax_face(gamma):
  state = harness.check_optax_face(
      optax_mtl.geometric_mean(NUM_TASKS, gamma=gamma), LOSSES, GRADS,
      reference_weights(LOSSES, NUM_TASKS if gamma is None else gamma),
      weights_rtol=2e-6)
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, REJECTED_PER_TASK)


def test_golden_values_value_and_grad_face():
  state = harness.check_value_and_grad_face(
      optax_mtl.geometric_mean(NUM_TASKS), LOSSES, GRADS[0],
      reference_weights(LOSSES, NUM_TASKS), weights_rtol=2e-6)
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, REJECTED_PER_TASK)


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
  return harness.scan_states(optax_mtl.geometric_mean(num_tasks),
                             jnp.eye(num_tasks))


@settings(max_examples=30, deadline=None)
@given(losses=harness.wide_positive_losses(3))
def test_weights_finite_and_positive(losses):
  weights = scan_run(NUM_TASKS)(losses)
  harness.assert_finite_and_positive(weights)
  np.testing.assert_allclose(weights, reference_weights(losses, NUM_TASKS),
                             rtol=1e-4)


@settings(max_examples=10, deadline=None)
@given(losses=harness.wide_positive_losses(3, 128))
def test_weights_finite_and_positive_many_tasks(losses):
  weights = scan_run(128)(losses)
  harness.assert_finite_and_positive(weights)
  # Every task contributes the same w_k L_k = (Π_j L_j)^(1/T) / T.
  contributions = weights * losses
  np.testing.assert_allclose(
      contributions, np.broadcast_to(contributions[:, :1], losses.shape),
      rtol=1e-5)


def test_weights_beyond_float32_are_clipped_at_1e30():
  """Weights that would overflow float32 (here 1e1270) are 1e30, not inf."""
  strategy = optax_mtl.geometric_mean(128, gamma=1.0)
  losses = np.full(128, 1e10, np.float32)
  _, state = jax.jit(strategy.update)(
      jnp.eye(128), strategy.init(None), task_losses=losses)
  log10_weights = 128 * 10.0 - 10.0  # (Π L)^(1/γ) / (γ L_k), γ = 1.
  assert log10_weights > 38
  assert int(state.num_skipped) == 0
  np.testing.assert_allclose(state.weights, 1e30, rtol=1e-6)


def test_max_weight_clips_every_weight():
  strategy = optax_mtl.geometric_mean(NUM_TASKS, max_weight=2.0)
  losses = np.array([1e-4, 1.0, 1e4], np.float32)
  _, state = jax.jit(strategy.update)(
      jnp.eye(NUM_TASKS), strategy.init(None), task_losses=losses)
  expected = np.minimum(reference_weights(losses[None], NUM_TASKS)[0], 2.0)
  np.testing.assert_allclose(state.weights, expected, rtol=1e-5)
  assert expected[0] == 2.0 and expected[2] < 2.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(gamma=0.0), r"gamma must lie in \(0.0, inf[)\]], got 0.0"),
    (dict(gamma=-2.0), r"gamma must lie in \(0.0, inf[)\]], got -2.0"),
    (dict(gamma=NAN), r"gamma must lie in .*got nan"),
    (dict(gamma=INF), r"gamma must be finite, got inf"),
    (dict(gamma="2"), r"gamma must be a real number, got '2'"),
])
def test_hyperparameter_errors(kwargs, message):
  harness.check_rejects(optax_mtl.geometric_mean, kwargs, message)
