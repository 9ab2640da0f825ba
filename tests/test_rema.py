"""Tests of optax_mtl.rema against a NumPy reference of Eq. 2 of the paper."""

import functools

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

import optax_mtl
from tests import loss_weighting_harness as harness

NUM_TASKS = harness.NUM_TASKS
NAN = harness.NAN
LOSSES = harness.REJECTED_FIRST_STEP
GRADS = harness.scripted_grads(LOSSES)
is_accepted = harness.is_accepted


def loss_average(history, beta):
  """Eq. 1 in closed form: L̃(n) = (1−β)^(n−1) L(1) + Σ_s β (1−β)^(n−s) L(s)."""
  n = len(history)
  average = (1 - beta) ** (n - 1) * history[0]
  for s in range(2, n + 1):
    average = average + beta * (1 - beta) ** (n - s) * history[s - 1]
  return average


def reference_weights(losses, beta):
  """Eq. 2 over the accepted losses: w = r / L̃, r = L(t−1) / L(t−2)."""
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
      weights = ratios / loss_average(history, beta)
    out.append(weights)
  return np.array(out)


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
def test_golden_values_optax_face(beta):
  state = harness.check_optax_face(
      optax_mtl.rema(NUM_TASKS, beta=beta), LOSSES, GRADS,
      reference_weights(LOSSES, beta))
  assert int(state.num_skipped) == 3
  assert int(state.loss_average.num_steps) == 7
  assert int(state.loss_ratios.num_periods) == 7


def test_golden_values_value_and_grad_face():
  beta = 0.3
  state = harness.check_value_and_grad_face(
      optax_mtl.rema(NUM_TASKS, beta=beta), LOSSES, GRADS[0],
      reference_weights(LOSSES, beta))
  assert int(state.num_skipped) == 3


@functools.lru_cache(maxsize=None)
def scan_run(beta):
  """A jitted run over a whole sequence, compiled once per beta."""
  return harness.scan_updates(optax_mtl.rema(NUM_TASKS, beta=beta))


positive_losses = harness.uniform_losses(6, 1e-3, 1e3)


@settings(max_examples=30, deadline=None)
@given(losses=positive_losses)
def test_weights_finite_and_positive(losses):
  harness.assert_finite_and_positive(
      harness.weights_with_unit_grads(scan_run(0.1), losses))


@settings(max_examples=30, deadline=None)
@given(losses=positive_losses, scale=st.floats(1e-3, 1e3),
       task=st.integers(0, NUM_TASKS - 1), seed=st.integers(0, 2**16))
def test_update_invariant_to_scaling_one_task(losses, scale, task, seed):
  harness.check_invariant_to_scaling_one_task(
      scan_run(0.1), losses, scale, task, seed, rtol=1e-4, atol=1e-30)


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=0.0), r"beta must lie in \(0.0, 1.0\], got 0.0"),
    (dict(beta=1.5), r"beta must lie in \(0.0, 1.0\], got 1.5"),
    (dict(beta=NAN), r"beta must lie in .*got nan"),
    (dict(beta="0.1"), r"beta must be a real number, got '0.1'"),
    (dict(num_tasks=0), r"num_tasks must be an integer >= 1, got 0"),
])
def test_hyperparameter_errors(kwargs, message):
  harness.check_rejects(optax_mtl.rema, kwargs, message)
