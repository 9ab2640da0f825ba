"""Tests of the EMA loss weightings loss_ema, rema and dwema (arXiv:2211.12999).

Each is checked against a NumPy reference of its equation (EMA: Eq. 1, REMA:
Eq. 2, DWEMA: the DWA factors divided by the EMA) on both faces. Their
shared properties (per-task scale invariance, rejected steps, ...) are in
tests/test_properties.py.
"""

import functools

from hypothesis import given
from hypothesis import settings
import numpy as np
import pytest

import optax_mtl
from tests import loss_weighting_harness as harness

NUM_TASKS = harness.NUM_TASKS
NAN = harness.NAN
LOSSES = harness.REJECTED_FIRST_STEP
GRADS = harness.scripted_grads(LOSSES)


def loss_average(history, beta):
  """Eq. 1 in closed form: L̃(n) = (1−β)^(n−1) L(1) + Σ_s β (1−β)^(n−s) L(s)."""
  n = len(history)
  average = (1 - beta) ** (n - 1) * history[0]
  for s in range(2, n + 1):
    average = average + beta * (1 - beta) ** (n - s) * history[s - 1]
  return average


def reference_weights(name, losses, beta, temperature=None):
  """The weights of ``name`` at every step of a scripted run (float64).

  Per task: a task's bad loss (non-finite or <= 0) is left out of its own
  history (average and ratios) and the task keeps its previous weight; the
  other tasks go on. A task whose ratio does not exist yet counts as r = 1
  in DWEMA's softmax.
  """
  histories = [[] for _ in range(NUM_TASKS)]

  def step(step_losses, valid, weights):
    # The ratios L(t−1)/L(t−2) from each task's history before this step.
    available = np.array([len(h) >= 2 for h in histories])
    ratios = np.array([h[-1] / h[-2] if len(h) >= 2 else 1.0
                       for h in histories])
    if name == "loss_ema":
      factors = np.ones(NUM_TASKS)
    elif name == "rema":
      factors = ratios
    elif available.any():
      factors = NUM_TASKS * np.exp(ratios / temperature) / np.sum(
          np.exp(ratios / temperature))
    else:
      factors = np.ones(NUM_TASKS)
    weights = weights.copy()
    for k in np.flatnonzero(valid):
      histories[k].append(step_losses[k])
      weights[k] = factors[k] / loss_average(np.array(histories[k]), beta)
    return weights

  return harness.per_task_reference(losses, step)


def test_a_task_first_seen_late_starts_its_average_then():
  """EMA per task: L̃_k(1) = L_k at the task's first accepted loss."""
  losses = np.array([[2.0, 0.0], [4.0, 0.0], [4.0, 8.0], [2.0, 4.0]],
                    np.float32)
  strategy = optax_mtl.loss_ema(2, beta=0.5)
  state = strategy.init(None)
  for step_losses in losses:
    _, state = strategy.update(np.eye(2, dtype=np.float32), state,
                               task_losses=step_losses)
  # Task 0: 2 → 3 → 3.5 → 2.75; task 1: starts at 8 (step 3) → 6.
  np.testing.assert_allclose(state.loss_average.average, [2.75, 6.0])
  np.testing.assert_array_equal(state.loss_average.num_steps, [4, 2])
  np.testing.assert_array_equal(state.num_rejected_losses, [0, 2])
  assert int(state.num_skipped) == 0


@pytest.mark.parametrize("name, kwargs", [
    ("loss_ema", dict(beta=0.1)),
    ("loss_ema", dict(beta=0.5)),
    ("loss_ema", dict(beta=1.0)),
    ("rema", dict(beta=0.1)),
    ("rema", dict(beta=0.5)),
    ("rema", dict(beta=1.0)),
    ("dwema", dict(beta=0.1, temperature=2.0)),
    ("dwema", dict(beta=0.5, temperature=0.5)),
    ("dwema", dict(beta=1.0, temperature=1.0)),
])
def test_golden_values_optax_face(name, kwargs):
  state = harness.check_optax_face(
      getattr(optax_mtl, name)(NUM_TASKS, **kwargs), LOSSES, GRADS,
      reference_weights(name, LOSSES, **kwargs))
  # Task 0 loses two losses (inf, nan), task 1 one (0): no step is
  # rejected as a whole.
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, [2, 1, 0])
  np.testing.assert_array_equal(state.loss_average.num_steps, [8, 9, 10])
  if name != "loss_ema":
    np.testing.assert_array_equal(state.loss_ratios.num_periods, [8, 9, 10])


@pytest.mark.parametrize("name, kwargs", [
    ("loss_ema", dict(beta=0.3)),
    ("rema", dict(beta=0.3)),
    ("dwema", dict(beta=0.3, temperature=2.0)),
])
def test_golden_values_value_and_grad_face(name, kwargs):
  state = harness.check_value_and_grad_face(
      getattr(optax_mtl, name)(NUM_TASKS, **kwargs), LOSSES, GRADS[0],
      reference_weights(name, LOSSES, **kwargs))
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, [2, 1, 0])


@functools.lru_cache(maxsize=None)
def scan_run(name):
  """A jitted run over a whole sequence, compiled once per strategy."""
  return harness.scan_updates(getattr(optax_mtl, name)(NUM_TASKS, beta=0.1))


# DWEMA's softmax of loss ratios is checked on a narrower range.
POSITIVE_LOSSES = {"loss_ema": harness.uniform_losses(6, 1e-3, 1e3),
                   "rema": harness.uniform_losses(6, 1e-3, 1e3),
                   "dwema": harness.uniform_losses(6, 0.1, 10.0)}


@pytest.mark.parametrize("name", sorted(POSITIVE_LOSSES))
def test_weights_finite_and_positive(name):

  @settings(max_examples=30, deadline=None)
  @given(losses=POSITIVE_LOSSES[name])
  def check(losses):
    harness.assert_finite_and_positive(
        harness.weights_with_unit_grads(scan_run(name), losses))

  check()  # pylint: disable=no-value-for-parameter


@pytest.mark.parametrize("name", ["loss_ema", "rema", "dwema"])
@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=0.0), r"beta must lie in \(0.0, 1.0\], got 0.0"),
    (dict(beta=1.5), r"beta must lie in \(0.0, 1.0\], got 1.5"),
    (dict(beta=NAN), r"beta must lie in .*got nan"),
    (dict(beta="0.1"), r"beta must be a real number, got '0.1'"),
])
def test_beta_errors(name, kwargs, message):
  harness.check_rejects(getattr(optax_mtl, name), kwargs, message)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0.0), r"temperature must lie in \(0.0, inf.?, got 0.0"),
    (dict(temperature=-1), r"temperature must lie in .*got -1.0"),
])
def test_dwema_temperature_errors(kwargs, message):
  harness.check_rejects(optax_mtl.dwema, kwargs, message)


def test_the_names_of_optax_mtl_0_1_warn_and_give_the_same_strategy():
  """``optax_mtl.ema``/``EmaState`` (0.1) are ``loss_ema``/``LossEmaState``."""
  with pytest.warns(DeprecationWarning, match="use optax_mtl.loss_ema"):
    old = optax_mtl.ema
  with pytest.warns(DeprecationWarning, match="use optax_mtl.LossEmaState"):
    old_state = optax_mtl.EmaState
  assert old is optax_mtl.loss_ema
  assert old_state is optax_mtl.LossEmaState
  state = old(2, beta=0.5).init(None)
  assert isinstance(state, optax_mtl.LossEmaState)
