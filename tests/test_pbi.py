"""Tests of optax_mtl.pbi (Zhang & Li 2007, MOEA/D's PBI scalarization).

The reference writes the paper's scalarization in float64,

  d₁ = (L − z*)ᵀŵ,  d₂ = ‖(L − z*) − d₁ ŵ‖,  g(L) = d₁ + θ d₂,  ŵ = w/‖w‖,

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
from optax_mtl._src.weighting import _pbi
from tests import loss_weighting_harness as harness

NUM_TASKS = harness.NUM_TASKS


def pbi_loss(losses, preference, reference_point, theta):
  """The paper's g(L), on real or complex losses (no abs, no conj)."""
  w = np.asarray(preference, np.float64)
  w = w / np.linalg.norm(w)
  shifted = losses - np.asarray(reference_point, np.float64)
  d1 = np.sum(shifted * w)
  across = shifted - d1 * w
  return d1 + theta * np.sqrt(np.sum(across * across))


def reference_weights(losses, preference, reference_point, theta):
  w = np.asarray(preference, np.float64)
  weights = w / np.linalg.norm(w)
  out = []
  for step_losses in np.asarray(losses, np.float64):
    if np.all(np.isfinite(step_losses)):
      weights = harness.complex_step_gradient(
          lambda x: pbi_loss(x, preference, reference_point, theta),
          step_losses)
    out.append(weights)
  return np.stack(out)


CASES = [
    (5.0, [1.0, 1.0, 1.0], 0.0),
    (2.0, [0.2, 0.3, 0.5], [0.1, 0.0, -1.0]),
    (0.0, [1.0, 0.0, 2.0], 0.5),
]


@pytest.mark.parametrize("theta, preference, reference_point", CASES)
def test_golden_values_optax_face(theta, preference, reference_point):
  losses = harness.REJECTED_IN_MIDDLE
  expected = reference_weights(losses, preference, reference_point, theta)
  state = harness.check_optax_face(
      optax_mtl.pbi(NUM_TASKS, theta, preference,
                    reference_point=reference_point),
      losses, harness.scripted_grads(losses), expected, weights_rtol=1e-5,
      update_atol=1e-5)
  assert int(state.num_skipped) == 2  # The NaN and the infinite loss.


def test_golden_values_value_and_grad_face():
  losses = harness.REJECTED_IN_MIDDLE
  expected = reference_weights(losses, [0.2, 0.3, 0.5], 0.0, 5.0)
  harness.check_value_and_grad_face(
      optax_mtl.pbi(NUM_TASKS, 5.0, [0.2, 0.3, 0.5]), losses,
      harness.scripted_grads(losses)[0], expected,
      accepted=lambda step_losses: bool(np.all(np.isfinite(step_losses))),
      grads_atol=1e-4)


def test_weights_match_reference_over_many_scales():
  """Random losses and reference points from 1e-30 to 1e30, of either sign:
  the closed form equals the complex-step gradient to float32 round-off."""
  rng = np.random.default_rng(0)
  preference = np.array([0.1, 0.6, 0.3])
  direction = preference / np.linalg.norm(preference)
  for exponent in (-30, -10, 0, 10, 30):
    losses = rng.normal(size=(16, NUM_TASKS)) * 10.0**exponent
    point = rng.normal(size=NUM_TASKS) * 10.0**exponent
    losses32, point32 = (np.asarray(losses, np.float32),
                         np.asarray(point, np.float32))
    weights = jax.vmap(lambda x: _pbi.pbi_weights(
        x, jnp.asarray(direction, jnp.float32), jnp.asarray(point32),
        4.0))(jnp.asarray(losses32))
    for row, step_losses in zip(np.asarray(weights), losses32):
      expected = harness.complex_step_gradient(
          lambda x: pbi_loss(x, preference, point32, 4.0), step_losses)
      # u/‖u‖ from f32 inputs: its round-off is ε‖L − z*‖/d₂ (the
      # conditioning of the direction of u), times θ.
      shifted = step_losses.astype(np.float64) - point32
      d2 = np.linalg.norm(shifted - (shifted @ direction) * direction)
      atol = 8 * np.finfo(np.float32).eps * (1 + 4.0 * np.linalg.norm(
          shifted) / d2)
      np.testing.assert_allclose(row, expected, rtol=0, atol=atol)


def test_on_the_line_the_weights_are_the_direction():
  """d₂ = 0 (up to the round-off of computing u): the subgradient ŵ, not a
  direction of noise."""
  direction = np.array([1.0, 2.0, 2.0]) / 3.0
  for scale in (1e-20, 1.0, 3.7, 1e20):
    losses = jnp.asarray(0.5 + scale * direction, jnp.float32)
    weights = _pbi.pbi_weights(losses, jnp.asarray(direction, jnp.float32),
                               jnp.full(3, 0.5, jnp.float32), 5.0)
    np.testing.assert_allclose(weights, direction, rtol=1e-6)


def test_step_along_minus_the_weights_decreases_pbi():
  rng = np.random.default_rng(1)
  preference = np.array([0.5, 0.3, 0.2])
  for _ in range(10):
    losses = rng.uniform(0.1, 5.0, NUM_TASKS)
    weights = np.asarray(_pbi.pbi_weights(
        jnp.asarray(losses, jnp.float32),
        jnp.asarray(preference / np.linalg.norm(preference), jnp.float32),
        jnp.zeros(3), 5.0), np.float64)
    before = pbi_loss(losses, preference, 0.0, 5.0)
    after = pbi_loss(losses - 1e-4 * weights, preference, 0.0, 5.0)
    assert after < before


@pytest.mark.parametrize("kwargs, message", [
    (dict(theta=-1.0), r"theta must lie in \[0.0, inf\), got -1.0"),
    (dict(theta=float("inf")), "theta must be finite"),
    (dict(preference=[1.0, 2.0]), r"preference must .*\[1.0, 2.0\]"),
    (dict(preference=[0.0, 0.0, 0.0]), "not all zero"),
    (dict(reference_point=[1.0, 2.0]),
     r"reference_point must .*\[1.0, 2.0\]"),
    (dict(reference_point=float("nan")), "reference_point must .*nan"),
])
def test_bad_hyperparameters_are_rejected(kwargs, message):
  harness.check_rejects(optax_mtl.pbi, kwargs, message)
