"""Tests of optax_mtl.dwa against a NumPy reference of Eq. 7 of MTAN."""

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


def reference_weights(losses, temperature, steps_per_epoch):
  """w_k(t) = T exp(r_k(t−1)/τ) / Σ_i exp(r_i(t−1)/τ), from the paper.

  Per task: ``t`` indexes the task's epochs of ``steps_per_epoch`` accepted
  losses (one when None), ``L_k(t)`` is its mean loss over epoch ``t`` and
  ``r_k = 1`` until two of its epochs are complete; ``w = 1`` until some
  task has a ratio. A task with a bad loss (non-finite or <= 0) keeps its
  previous weight and its history; the other tasks share the rest of ``T``
  in the proportions of the softmax.
  """
  period = 1 if steps_per_epoch is None else steps_per_epoch
  histories = [[] for _ in range(NUM_TASKS)]

  def step(step_losses, valid, weights):
    ratios = np.ones(NUM_TASKS)
    for k, history in enumerate(histories):
      epoch = len(history) // period  # The task's complete epochs.
      if epoch >= 2:
        previous = np.mean(history[(epoch - 1) * period:epoch * period])
        before = np.mean(history[(epoch - 2) * period:(epoch - 1) * period])
        ratios[k] = previous / before
    if any(len(h) // period >= 2 for h in histories):
      weights = harness.share_the_rest(weights, valid,
                                       np.exp(ratios / temperature))
    else:
      weights = np.where(valid, 1.0, weights)
    for k in np.flatnonzero(valid):
      histories[k].append(step_losses[k])
    return weights

  return harness.per_task_reference(losses, step)


@pytest.mark.parametrize("temperature, steps_per_epoch", [
    (2.0, None), (0.5, None), (2.0, 1), (0.5, 2), (1.0, 3)])
def test_golden_values_optax_face(temperature, steps_per_epoch):
  expected = reference_weights(LOSSES, temperature, steps_per_epoch)
  # The scripted run must reach rates that differ from 1.
  assert np.ptp(expected[-1]) > 1e-2
  state = harness.check_optax_face(
      optax_mtl.dwa(NUM_TASKS, temperature=temperature,
                    steps_per_epoch=steps_per_epoch), LOSSES, GRADS, expected)
  # Bad losses: two of task 0 (inf, nan), one of task 1 (negative); no step
  # is rejected as a whole, and the weights still sum to T.
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, [2, 1, 0])
  np.testing.assert_allclose(np.sum(state.weights), NUM_TASKS, rtol=1e-6)
  period = 1 if steps_per_epoch is None else steps_per_epoch
  np.testing.assert_array_equal(state.loss_ratios.num_periods,
                                np.array([12, 13, 14]) // period)


@pytest.mark.parametrize("steps_per_epoch", [None, 2])
def test_golden_values_value_and_grad_face(steps_per_epoch):
  state = harness.check_value_and_grad_face(
      optax_mtl.dwa(NUM_TASKS, steps_per_epoch=steps_per_epoch), LOSSES,
      GRADS[0], reference_weights(LOSSES, 2.0, steps_per_epoch))
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, [2, 1, 0])


@functools.lru_cache(maxsize=None)
def scan_weights(steps_per_epoch):
  """A jitted run over a whole sequence, compiled once per configuration."""
  return harness.scan_states(
      optax_mtl.dwa(NUM_TASKS, steps_per_epoch=steps_per_epoch),
      jnp.ones((NUM_TASKS, 2)))


@settings(max_examples=30, deadline=None)
@given(losses=harness.uniform_losses(6, 0.1, 10.0),
       steps_per_epoch=st.sampled_from([None, 2]))
def test_weights_finite_positive_and_sum_to_num_tasks(losses, steps_per_epoch):
  weights = scan_weights(steps_per_epoch)(losses)
  harness.assert_finite_and_positive(weights)
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
  harness.check_rejects(optax_mtl.dwa, kwargs, message)


def test_the_spelling_of_optax_mtl_0_1_warns_and_runs_the_same():
  """0.1 took ``steps_per_epoch`` by position."""
  harness.check_old_spelling(
      lambda: optax_mtl.dwa(NUM_TASKS, 1.5, 2),
      lambda: optax_mtl.dwa(NUM_TASKS, 1.5, steps_per_epoch=2),
      match="steps_per_epoch=2")
