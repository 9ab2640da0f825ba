"""Tests of optax_mtl.lbtw against a NumPy reference of the paper's rule."""

import functools

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import loss_weighting_harness as harness

NUM_TASKS = harness.NUM_TASKS
NAN = harness.NAN
LOSSES = harness.EPOCHS
GRADS = harness.scripted_grads(LOSSES)


def reference_weights(losses, alpha, steps_per_epoch, normalize):
  """w_k = (L_k / L_k^ref)^α, L^ref the loss of the epoch's first step.

  Per task: a task's epochs are runs of ``steps_per_epoch`` of its accepted
  losses (one epoch for ever when None). A task with a bad loss (non-finite
  or <= 0) keeps its previous weight and its reference; with ``normalize``
  the other tasks share the rest of T in proportion to their ratios.
  """
  histories = [[] for _ in range(NUM_TASKS)]

  def step(step_losses, valid, weights):
    ratios = np.ones(NUM_TASKS)
    for k in np.flatnonzero(valid):
      history = histories[k]
      history.append(step_losses[k])
      index = len(history) - 1
      start = 0 if steps_per_epoch is None else (
          index // steps_per_epoch * steps_per_epoch)
      ratios[k] = (step_losses[k] / history[start]) ** alpha
    if normalize:
      return harness.share_the_rest(weights, valid, ratios)
    return np.where(valid, ratios, weights)

  return harness.per_task_reference(losses, step)


@pytest.mark.parametrize("alpha, steps_per_epoch, normalize", [
    (0.5, None, True), (0.5, None, False), (1.0, 2, True), (2.0, 3, False),
    (0.0, 3, True)])
def test_golden_values_optax_face(alpha, steps_per_epoch, normalize):
  state = harness.check_optax_face(
      optax_mtl.lbtw(NUM_TASKS, alpha=alpha, steps_per_epoch=steps_per_epoch,
                     normalize=normalize), LOSSES, GRADS,
      reference_weights(LOSSES, alpha, steps_per_epoch, normalize))
  # Bad losses: two of task 0, one of task 1; no step rejected as a whole.
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, [2, 1, 0])
  if steps_per_epoch is not None:  # 12, 13 and 14 accepted losses.
    np.testing.assert_array_equal(
        state.num_epoch_steps, np.array([12, 13, 14]) % steps_per_epoch)


@pytest.mark.parametrize("steps_per_epoch", [None, 2])
def test_golden_values_value_and_grad_face(steps_per_epoch):
  state = harness.check_value_and_grad_face(
      optax_mtl.lbtw(NUM_TASKS, steps_per_epoch=steps_per_epoch), LOSSES,
      GRADS[0], reference_weights(LOSSES, 0.5, steps_per_epoch, True))
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, [2, 1, 0])


@functools.lru_cache(maxsize=None)
def scan_weights(steps_per_epoch, normalize):
  """A jitted run over a whole sequence, compiled once per configuration."""
  return harness.scan_states(
      optax_mtl.lbtw(NUM_TASKS, steps_per_epoch=steps_per_epoch,
                     normalize=normalize), jnp.ones((NUM_TASKS, 2)))


@settings(max_examples=30, deadline=None)
@given(losses=harness.uniform_losses(6, 1e-3, 1e3),
       steps_per_epoch=st.sampled_from([None, 2]), normalize=st.booleans())
def test_weights_finite_and_positive(losses, steps_per_epoch, normalize):
  weights = scan_weights(steps_per_epoch, normalize)(losses)
  harness.assert_finite_and_positive(weights)
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
    (dict(normalize="yes"), r"normalize must be True or False, got 'yes'"),
])
def test_hyperparameter_errors(kwargs, message):
  harness.check_rejects(optax_mtl.lbtw, kwargs, message)


def test_the_spelling_of_optax_mtl_0_1_warns_and_runs_the_same():
  """0.1 took ``steps_per_epoch`` and ``normalize`` by position and named
  the state field ``steps_in_epoch``."""
  harness.check_old_spelling(
      lambda: optax_mtl.lbtw(NUM_TASKS, 0.5, 3, False),
      lambda: optax_mtl.lbtw(NUM_TASKS, 0.5, steps_per_epoch=3,
                             normalize=False),
      match="by position")
  state = optax_mtl.lbtw(NUM_TASKS, steps_per_epoch=3).init(None)
  with pytest.warns(DeprecationWarning,
                    match="LbtwState.steps_in_epoch .*num_epoch_steps"):
    assert state.steps_in_epoch is state.num_epoch_steps
