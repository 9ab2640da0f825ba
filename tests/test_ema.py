"""Tests of the EMA loss weightings ema, rema and dwema (arXiv:2211.12999).

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
is_accepted = harness.is_accepted


def loss_average(history, beta):
  """Eq. 1 in closed form: L̃(n) = (1−β)^(n−1) L(1) + Σ_s β (1−β)^(n−s) L(s)."""
  n = len(history)
  average = (1 - beta) ** (n - 1) * history[0]
  for s in range(2, n + 1):
    average = average + beta * (1 - beta) ** (n - s) * history[s - 1]
  return average


def previous_ratios(history):
  """r = L(t−1) / L(t−2) over the accepted losses; ones until both exist."""
  if len(history) >= 3:  # Two earlier accepted steps exist.
    return history[-2] / history[-3]
  return np.ones(NUM_TASKS)


def ema_factors(history):
  """EMA (Eq. 1): w = 1 / L̃."""
  del history
  return np.ones(NUM_TASKS)


def rema_factors(history):
  """REMA (Eq. 2): w = r / L̃, r = L(t−1) / L(t−2)."""
  return previous_ratios(history)


def dwema_factors(history, temperature):
  """DWEMA: w_k = T exp(r_k/τ) / Σ_i exp(r_i/τ) / L̃_k."""
  ratios = previous_ratios(history)
  return NUM_TASKS * np.exp(ratios / temperature) / np.sum(
      np.exp(ratios / temperature))


def reference_weights(name, losses, beta, **kwargs):
  """The weights of ``name`` at every step of a scripted run (float64)."""
  factors = {"ema": ema_factors, "rema": rema_factors,
             "dwema": dwema_factors}[name]
  history = []
  weights = np.ones(NUM_TASKS)
  out = []
  for step_losses in np.asarray(losses, np.float64):
    if is_accepted(step_losses):
      history.append(step_losses)
      weights = factors(history, **kwargs) / loss_average(history, beta)
    out.append(weights)
  return np.array(out)


@pytest.mark.parametrize("name, kwargs", [
    ("ema", dict(beta=0.1)),
    ("ema", dict(beta=0.5)),
    ("ema", dict(beta=1.0)),
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
  assert int(state.num_skipped) == 3
  assert int(state.loss_average.num_steps) == 7
  if name != "ema":
    assert int(state.loss_ratios.num_periods) == 7


@pytest.mark.parametrize("name, kwargs", [
    ("ema", dict(beta=0.3)),
    ("rema", dict(beta=0.3)),
    ("dwema", dict(beta=0.3, temperature=2.0)),
])
def test_golden_values_value_and_grad_face(name, kwargs):
  state = harness.check_value_and_grad_face(
      getattr(optax_mtl, name)(NUM_TASKS, **kwargs), LOSSES, GRADS[0],
      reference_weights(name, LOSSES, **kwargs))
  assert int(state.num_skipped) == 3


@functools.lru_cache(maxsize=None)
def scan_run(name):
  """A jitted run over a whole sequence, compiled once per strategy."""
  return harness.scan_updates(getattr(optax_mtl, name)(NUM_TASKS, beta=0.1))


# DWEMA's softmax of loss ratios is checked on a narrower range.
POSITIVE_LOSSES = {"ema": harness.uniform_losses(6, 1e-3, 1e3),
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


@pytest.mark.parametrize("name", ["ema", "rema", "dwema"])
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
