"""Tests of optax_mtl.cosmos (Ruchte & Grabocka 2021, COSMOS).

The reference writes the paper's scalarization in float64,

  f(L) = rᵀL − λ · rᵀL / (‖r‖ ‖L‖),

and takes its gradient with respect to the losses by complex-step
differentiation (independently of the closed form in the module): the
weights are that gradient, and a step with a non-finite loss keeps the
previous weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from optax_mtl._src.weighting import _cosmos
from tests import loss_weighting_harness as harness

NUM_TASKS = harness.NUM_TASKS


def cosmos_loss(losses, preference, penalty):
  """The paper's objective, on real or complex losses (no abs, no conj)."""
  r = np.asarray(preference, np.float64)
  linear = np.sum(r * losses)
  return linear - penalty * linear / (np.sqrt(np.sum(r * r))
                                      * np.sqrt(np.sum(losses * losses)))


def reference_weights(losses, preference, penalty):
  """Weights per step of a scripted run; non-finite steps keep the last."""
  weights = np.asarray(preference, np.float64)
  out = []
  for step_losses in np.asarray(losses, np.float64):
    if np.all(np.isfinite(step_losses)):
      weights = harness.complex_step_gradient(
          lambda x: cosmos_loss(x, preference, penalty), step_losses)
    out.append(weights)
  return np.stack(out)


CASES = [
    (0.5, [0.2, 0.3, 0.5]),
    (2.0, [1.0, 0.0, 1.0]),
    (0.0, [0.2, 0.3, 0.5]),
]


@pytest.mark.parametrize("penalty, preference", CASES)
def test_golden_values_optax_face(penalty, preference):
  losses = harness.REJECTED_IN_MIDDLE
  expected = reference_weights(losses, preference, penalty)
  state = harness.check_optax_face(
      optax_mtl.cosmos(NUM_TASKS, penalty, preference), losses,
      harness.scripted_grads(losses), expected, weights_rtol=1e-5)
  assert int(state.num_skipped) == 2  # The NaN and the infinite loss.


def test_golden_values_value_and_grad_face():
  losses = harness.REJECTED_IN_MIDDLE
  preference = [0.2, 0.3, 0.5]
  expected = reference_weights(losses, preference, 0.5)
  harness.check_value_and_grad_face(
      optax_mtl.cosmos(NUM_TASKS, 0.5, preference), losses,
      harness.scripted_grads(losses)[0], expected,
      accepted=lambda step_losses: bool(np.all(np.isfinite(step_losses))),
      grads_atol=1e-5)


def test_default_preference_is_uniform():
  losses = jnp.array([1.0, 2.0, 4.0])
  default = _cosmos.cosmos_weights(losses, jnp.full(3, 1 / 3), 1.0)
  expected = harness.complex_step_gradient(
      lambda x: cosmos_loss(x, np.full(3, 1 / 3), 1.0), losses)
  np.testing.assert_allclose(default, expected, rtol=1e-5)
  state = optax_mtl.cosmos(3).init(None)
  np.testing.assert_allclose(state.weights, np.full(3, 1 / 3), rtol=1e-7)


def test_weights_match_reference_over_many_scales():
  """Random losses from 1e-30 to 1e30 (no overflow of ‖L‖²) and of either
  sign: the closed form equals the complex-step gradient."""
  rng = np.random.default_rng(0)
  preference = np.array([0.1, 0.6, 0.3])
  for exponent in (-30, -10, 0, 10, 30):
    losses = rng.normal(size=(16, NUM_TASKS)) * 10.0**exponent
    weights = jax.vmap(lambda x: _cosmos.cosmos_weights(
        x, jnp.asarray(preference, jnp.float32), 0.7))(
            jnp.asarray(losses, jnp.float32))
    for row, step_losses in zip(np.asarray(weights), losses):
      expected = harness.complex_step_gradient(
          lambda x: cosmos_loss(x, preference, 0.7),
          np.asarray(step_losses, np.float32))
      # f32 round-off of a few terms, each of size |r| + λ/‖L‖ · 2.
      scale = 1.0 + 2 * 0.7 / np.linalg.norm(step_losses) / np.linalg.norm(
          preference)
      np.testing.assert_allclose(row, expected, rtol=0,
                                 atol=16 * np.finfo(np.float32).eps * scale)


def test_zero_losses_give_the_preference():
  weights = _cosmos.cosmos_weights(jnp.zeros(3), jnp.array([0.2, 0.3, 0.5]),
                                   3.0)
  np.testing.assert_array_equal(weights, np.float32([0.2, 0.3, 0.5]))


def test_penalty_pulls_the_losses_towards_the_preference_ray():
  """A small step along −w reduces the angle between L and r (the paper's
  purpose): the directional derivative of the cosine along −w is > 0."""
  preference = np.array([0.5, 0.3, 0.2])
  losses = np.array([0.2, 3.0, 1.0])
  weights = np.asarray(_cosmos.cosmos_weights(
      jnp.asarray(losses, jnp.float32), jnp.asarray(preference, jnp.float32),
      5.0), np.float64)
  cosine = lambda x: preference @ x / (np.linalg.norm(preference)
                                       * np.linalg.norm(x))
  assert cosine(losses - 1e-3 * weights) > cosine(losses)


@pytest.mark.parametrize("kwargs, message", [
    (dict(penalty=-0.1), r"penalty must lie in \[0.0, inf\), got -0.1"),
    (dict(penalty=float("nan")), "penalty must lie in"),
    (dict(penalty="big"), "penalty must be a real number"),
    (dict(preference=[1.0, 2.0]), r"preference must .*\[1.0, 2.0\]"),
    (dict(preference=[1.0, -1.0, 1.0]),
     r"preference must .*\[1.0, -1.0, 1.0\]"),
    (dict(preference=[0.0, 0.0, 0.0]), "not all zero"),
])
def test_bad_hyperparameters_are_rejected(kwargs, message):
  harness.check_rejects(optax_mtl.cosmos, kwargs, message)
