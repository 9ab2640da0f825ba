"""Tests of optax_mtl.stch (Lin et al. 2024, smooth Tchebycheff scalarization).

The reference writes the scalarization as in the paper, multiplied by T,

  S(L) = T · μ · log Σ_k exp(λ_k (f_k(L_k) − f_k(z_k)) / μ),

with f = log (the authors' multi-task code) or the identity, and takes its
gradient with respect to the losses by complex-step differentiation in
float64 (independently of the closed form in the module). During the warm-up the
objective is Σ_k f_k(L_k); the nadir z is the mean of the losses of the epoch
that follows the warm-up epochs, as in the authors' code.
"""

import functools

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
from tests import loss_weighting_harness as harness

NUM_TASKS = harness.NUM_TASKS
NAN, INF = harness.NAN, harness.INF


def is_finite(losses):
  return bool(np.all(np.isfinite(losses)))


def numerical_gradient(function, losses):
  """The complex-step derivative Im f(L + i h e_k) / h (Squire & Trapp 1998):
  exact to float64 rounding, with no cancellation for tiny components."""
  losses = np.asarray(losses, np.float64)
  gradient = np.zeros_like(losses)
  step = 1e-30
  for k in range(len(losses)):
    perturbed = losses.astype(np.complex128)
    perturbed[k] += 1j * step
    gradient[k] = np.imag(function(perturbed)) / step
  return gradient


def reference_run(losses, mu=1.0, preference=None, warmup_epochs=4,
                  steps_per_epoch=None, reference_point=None,
                  log_losses=True):
  """Weights per step, the final reference point (loss units) and the
  number of steps with a valid loss.

  A bad loss (non-finite; not positive for log losses) excludes its task:
  the task keeps its weight and its estimate, and its last accepted term
  λ_k (f_k − z_k) / μ stands in the scalarization. A task's nadir estimate
  is the mean of its valid losses in the nadir epoch (its first valid one
  after it when it had none).
  """
  lambdas = (np.ones(NUM_TASKS) if preference is None
             else np.asarray(preference, np.float64))
  objective = np.log if log_losses else (lambda x: x)
  epoch = steps_per_epoch or 1
  warmup_steps = warmup_epochs * epoch
  nadir_steps = epoch if reference_point is None else 0
  point = (np.ones(NUM_TASKS) if reference_point is None
           else np.broadcast_to(np.asarray(reference_point, np.float64),
                                (NUM_TASKS,)).copy())
  nadir_losses = [[] for _ in range(NUM_TASKS)]
  weights = np.ones(NUM_TASKS)
  last_terms = np.zeros(NUM_TASKS)
  num_accepted = 0
  out = []
  for step_losses in np.asarray(losses, np.float64):
    valid = np.isfinite(step_losses)
    if log_losses:
      valid &= step_losses > 0
    if valid.any():
      warming_up = num_accepted < warmup_steps + nadir_steps
      for k in np.flatnonzero(valid):
        if nadir_steps and num_accepted >= warmup_steps and (
            warming_up or not nadir_losses[k]):
          nadir_losses[k].append(step_losses[k])
          point[k] = np.mean(nadir_losses[k])
      safe = np.where(valid, step_losses, 1.0)
      z = objective(point)

      def terms(x, z=z, valid=valid):
        return np.where(valid, lambdas * (objective(x) - z) / mu, last_terms)

      if warming_up:
        new_weights = numerical_gradient(lambda x: np.sum(objective(x)), safe)
      else:
        def scalarization(x, terms=terms):
          values = terms(x)
          top = np.max(values.real)
          return NUM_TASKS * mu * (top + np.log(np.sum(np.exp(values - top))))

        new_weights = numerical_gradient(scalarization, safe)
      weights = np.where(valid, new_weights, weights)
      last_terms = terms(safe)
      num_accepted += 1
    out.append(weights)
  return np.array(out), point, num_accepted


CASES = [
    # The defaults of the authors' code, with epochs of 2 steps.
    (dict(warmup_epochs=1, steps_per_epoch=2), harness.EPOCHS),
    (dict(mu=0.3, preference=[0.2, 0.5, 0.3], warmup_epochs=0),
     harness.REJECTED_IN_MIDDLE),
    (dict(mu=0.5, warmup_epochs=2), harness.EPOCHS),
    # The paper's raw objectives: negative losses are accepted.
    (dict(mu=2.0, reference_point=[0.5, 0.1, 2.0], warmup_epochs=2,
          log_losses=False), harness.EPOCHS),
    (dict(mu=0.7, warmup_epochs=1, steps_per_epoch=3, log_losses=False,
          preference=[1.0, 0.0, 2.0]), harness.EPOCHS),
]


def reference_point_check(losses, kwargs):
  """The state's reference point matches the running nadir estimate."""

  def check(step, unused_previous_state, state):
    _, point, _ = reference_run(losses[:step + 1], **kwargs)
    if point is not None:
      np.testing.assert_allclose(state.reference_point, point, rtol=1e-6)

  return check


@pytest.mark.parametrize("kwargs, losses", CASES)
def test_golden_values_optax_face(kwargs, losses):
  expected_weights, _, num_accepted = reference_run(losses, **kwargs)
  state = harness.check_optax_face(
      optax_mtl.stch(NUM_TASKS, **kwargs), losses,
      harness.scripted_grads(losses), expected_weights, weights_rtol=1e-5,
      update_atol=1e-5, check_step=reference_point_check(losses, kwargs))
  assert int(state.num_steps) == num_accepted
  assert int(state.num_skipped) == len(losses) - num_accepted
  # The run reaches the STCH phase and its weights are not the warm-up's.
  warmup_weights = (1.0 / np.asarray(losses[-1], np.float64)
                    if kwargs.get("log_losses", True) else np.ones(NUM_TASKS))
  assert not np.allclose(expected_weights[-1], warmup_weights, rtol=1e-2)


def test_golden_values_value_and_grad_face():
  kwargs, losses = CASES[0]
  expected_weights, _, _ = reference_run(losses, **kwargs)
  state = harness.check_value_and_grad_face(
      optax_mtl.stch(NUM_TASKS, **kwargs), losses,
      harness.scripted_grads(losses)[0], expected_weights, grads_atol=1e-5)
  # Each bad loss excluded its task only (two of task 0, one of task 1).
  assert int(state.num_skipped) == 0
  np.testing.assert_array_equal(state.num_rejected_losses, [2, 1, 0])


def test_small_mu_approaches_the_tchebycheff_max():
  """μ → 0: all the weight goes to argmax_k λ_k log(L_k / n_k)."""
  losses = np.array([[1.0, 2.0, 4.0], [0.5, 1.5, 3.0]], np.float32)
  strategy = optax_mtl.stch(NUM_TASKS, mu=1e-3, warmup_epochs=0,
                            preference=[1.0, 2.0, 1.0])
  state = strategy.init(None)
  for step_losses in losses:
    _, state = strategy.update(jnp.eye(NUM_TASKS), state,
                               task_losses=step_losses)
  # log(L/n) = (log .5, log .75, log .75), λ·that largest for task 3.
  np.testing.assert_allclose(state.weights, [0.0, 0.0, 3.0 / 3.0], atol=1e-6)


@functools.lru_cache(maxsize=None)
def scan_run(mu):
  return harness.scan_updates(
      optax_mtl.stch(NUM_TASKS, mu=mu, warmup_epochs=1, steps_per_epoch=2))


positive_losses = harness.uniform_losses(8, 1e-3, 1e3)


@settings(max_examples=25, deadline=None)
@given(losses=positive_losses, scale=st.floats(1e-3, 1e3),
       task=st.integers(0, NUM_TASKS - 1), seed=st.integers(0, 2**16))
def test_update_invariant_to_scaling_one_task(losses, scale, task, seed):
  """Log losses over an estimated nadir: scaling a task changes nothing."""
  harness.check_invariant_to_scaling_one_task(
      scan_run(0.5), losses, scale, task, seed, rtol=1e-4, atol=1e-30)


@settings(max_examples=25, deadline=None)
@given(losses=positive_losses)
def test_weights_finite_positive_and_match_reference(losses):
  weights = harness.weights_with_unit_grads(scan_run(0.5), losses)
  harness.assert_finite_and_positive(weights)
  expected, _, _ = reference_run(losses, mu=0.5, warmup_epochs=1,
                                 steps_per_epoch=2)
  np.testing.assert_allclose(weights, expected, rtol=1e-4)


def test_a_bad_loss_excludes_its_task_only():
  """A task without labels (loss 0) keeps its weight and estimate; the others
  move on; a step with no valid loss is skipped and not counted as a step."""
  strategy = optax_mtl.stch(NUM_TASKS, warmup_epochs=1)
  state = strategy.init(None)
  for step_losses in ([NAN, 0.0, -1.0], [1.0, 2.0, NAN], [2.0, 4.0, 0.0],
                      [1.0, 1.0, 0.0]):
    _, state = strategy.update(jnp.eye(NUM_TASKS), state,
                               task_losses=jnp.array(step_losses))
  assert int(state.num_skipped) == 1 and int(state.num_steps) == 3
  np.testing.assert_array_equal(state.num_rejected_losses, [1, 1, 4])
  # Warm-up step 1, nadir step 2 (tasks 0 and 1), STCH at step 3: task 2
  # never had a valid loss, its weight and reference point are the initial
  # ones (its term in the softmax: 0).
  np.testing.assert_array_equal(state.reference_point, [2.0, 4.0, 1.0])
  terms = np.log([1.0 / 2.0, 1.0 / 4.0])
  softmax = np.exp(terms) / (np.exp(terms).sum() + 1.0)
  np.testing.assert_allclose(state.weights[:2], 3 * softmax / [1.0, 1.0],
                             rtol=1e-6)
  assert float(state.weights[2]) == 1.0


def test_mu_can_be_injected():
  injected = optax.inject_hyperparams(
      optax_mtl.stch, static_args=("num_tasks", "warmup_epochs"))(
          num_tasks=NUM_TASKS, mu=0.3, warmup_epochs=0)
  state = injected.init(jnp.zeros(2))
  losses = harness.REJECTED_IN_MIDDLE[:3]
  for step_losses in losses:
    _, state = injected.update(jnp.ones((NUM_TASKS, 2)), state,
                               task_losses=step_losses)
  expected, _, _ = reference_run(losses, mu=0.3, warmup_epochs=0)
  np.testing.assert_allclose(state.inner_state.weights, expected[-1],
                             rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tasks=0), r"num_tasks must be an integer >= 1, got 0"),
    (dict(mu=0.0), r"mu must lie in \(0.0, inf[)\]], got 0.0"),
    (dict(mu=NAN), r"mu must lie in .*got nan"),
    (dict(preference=[1.0, 2.0]),
     r"preference must be 3 numbers in \[0.0, inf\), got shape \(2,\)"),
    (dict(preference=[1.0, -1.0, 1.0]),
     r"preference must be 3 numbers in \[0.0, inf\), got \[1.0, -1.0"),
    (dict(preference=[0.0, 0.0, 0.0]), r"preference must be .*not all zero"),
    (dict(preference="equal"), r"preference must be 3 numbers .*'equal'"),
    (dict(preference=["1", "1", "1"]), r"preference must be 3 numbers .*'1'"),
    (dict(warmup_epochs=-1), r"warmup_epochs must be an integer >= 0, got -1"),
    (dict(warmup_epochs=1.5), r"warmup_epochs must be an integer >= 0"),
    (dict(steps_per_epoch=0), r"steps_per_epoch must be an integer >= 1"),
    (dict(reference_point=[1.0, 2.0]),
     r"reference_point must be a number or 3 numbers, got shape \(2,\)"),
    (dict(reference_point=0.0),
     r"reference_point must be positive with log_losses=True, got 0.0"),
    (dict(reference_point=INF),
     r"reference_point must be finite \(in float32\), got inf"),
    (dict(log_losses="yes"), r"log_losses must be True or False, got 'yes'"),
])
def test_hyperparameter_errors(kwargs, message):
  harness.check_rejects(optax_mtl.stch, kwargs, message)


def test_negative_reference_point_allowed_for_raw_losses():
  strategy = optax_mtl.stch(NUM_TASKS, reference_point=-1.0, log_losses=False,
                            warmup_epochs=0)
  _, state = jax.jit(strategy.update)(jnp.eye(NUM_TASKS), strategy.init(None),
                                      task_losses=jnp.array([0.0, -0.5, 2.0]))
  assert int(state.num_skipped) == 0
  expected, _, _ = reference_run([[0.0, -0.5, 2.0]], reference_point=-1.0,
                                 log_losses=False, warmup_epochs=0)
  np.testing.assert_allclose(state.weights, expected[0], rtol=1e-5)


def test_the_state_field_of_optax_mtl_0_1_warns_and_reads_the_same():
  """0.1 named ``StchState.num_nadir_losses`` ``nadir_counts``."""
  state = optax_mtl.stch(NUM_TASKS).init(None)
  with pytest.warns(DeprecationWarning,
                    match="StchState.nadir_counts .*num_nadir_losses"):
    assert state.nadir_counts is state.num_nadir_losses
