"""Scaffolding shared by the tests of the loss-weighting strategies.

The tests of loss_ema, rema, dwema, dwa, lbtw, initial_loss, log_loss,
geometric_mean, uncertainty and rlw (``from tests import
loss_weighting_harness``) drive their strategy the same ways: through a
scripted run on both faces (``strategy.update`` and
``optax_mtl.value_and_grad``), through a jitted ``lax.scan`` for the hypothesis
properties, and through the eager hyperparameter checks. This module holds
those drivers and the scripted runs; the NumPy reference of each paper's rule,
and so the expected values, stay in each test file. The properties every
strategy shares (finite output, rejected steps, per-task scale invariance,
...) are checked once for all in tests/test_properties.py.
"""

from __future__ import annotations

from typing import Any, Callable

from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import strategies

NUM_TASKS = 3
NUM_PARAMS = 4
NAN, INF = float("nan"), float("inf")

# A scripted run: a rejected first step (so "first" means first accepted),
# a NaN step and a zero-loss step in the middle.
REJECTED_FIRST_STEP = np.array([
    [INF, 1.0, 1.0],
    [2.0, 0.5, 10.0],
    [1.5, 0.6, 8.0],
    [NAN, 0.4, 7.0],
    [1.2, 0.3, 9.0],
    [1.0, 0.35, 6.0],
    [0.9, 0.0, 5.5],
    [0.8, 0.25, 5.0],
    [0.85, 0.2, 4.0],
    [0.7, 0.22, 4.5],
], np.float32)
REJECTED_FIRST_STEP.setflags(write=False)

# A scripted run of 14 steps, 11 accepted: a rejected first step, a NaN step
# and a negative-loss step. With 2 or 3 steps per epoch it spans 4-6 epochs.
# Its first ten steps are REJECTED_FIRST_STEP with a negative loss at step 6.
EPOCHS = np.concatenate([REJECTED_FIRST_STEP, np.array([
    [0.6, 0.18, 3.0],
    [0.65, 0.15, 3.2],
    [0.5, 0.16, 2.5],
    [0.45, 0.12, 2.6],
], np.float32)])
EPOCHS[6, 1] = -0.1
EPOCHS.setflags(write=False)

# A scripted run with a NaN, a zero and an infinite loss in the middle.
REJECTED_IN_MIDDLE = np.array([
    [2.0, 0.5, 10.0],
    [1.5, 0.4, 8.0],
    [NAN, 0.3, 7.0],
    [1.2, 0.0, 6.0],
    [1.0, 0.25, 5.0],
    [0.8, 0.2, 4.5],
    [0.7, 0.1, INF],
    [0.6, 0.05, 4.0],
], np.float32)
REJECTED_IN_MIDDLE.setflags(write=False)

StepCheck = Callable[[int, Any, Any], None]


def scripted_grads(losses: np.ndarray) -> np.ndarray:
  """Fixed task gradients f32[S, T, P] for a scripted run of S steps."""
  return np.random.default_rng(0).normal(
      size=(len(losses), NUM_TASKS, NUM_PARAMS)).astype(np.float32)


def is_accepted(losses: np.ndarray) -> bool:
  """Whether a step's losses pass the usual guard: finite and positive."""
  return bool(np.all(np.isfinite(losses)) and np.all(losses > 0))


# The (shape, dtype) of every leaf of a state (one helper for all tests).
shapes_and_dtypes = strategies.state_layout


def check_optax_face(strategy, losses, grads, expected_weights, *,
                     weights_rtol: float = 1e-5, update_atol: float = 1e-6,
                     check_step: StepCheck | None = None):
  """Steps the jitted ``strategy.update`` through a scripted run.

  At every step the weights must match ``expected_weights[step]``, the update
  must be ``expected_weights[step] @ grads[step]`` and the state must keep the
  shapes and dtypes of ``strategy.init``; ``check_step(step, previous_state,
  state)`` adds the strategy's own checks. Returns the final state.
  """
  update_fn = jax.jit(strategy.update)
  state = strategy.init(None)
  init_types = shapes_and_dtypes(state)
  for step, (step_losses, step_grads) in enumerate(zip(losses, grads)):
    previous_state = state
    update, state = update_fn(step_grads, state, task_losses=step_losses)
    np.testing.assert_allclose(state.weights, expected_weights[step],
                               rtol=weights_rtol)
    np.testing.assert_allclose(update, expected_weights[step] @ step_grads,
                               rtol=1e-5, atol=update_atol)
    assert shapes_and_dtypes(state) == init_types
    if check_step is not None:
      check_step(step, previous_state, state)
  return state


def check_value_and_grad_face(
    strategy, losses, directions, expected_weights, *,
    accepted: Callable[[np.ndarray], bool] = is_accepted,
    weights_rtol: float = 1e-5, grads_atol: float = 1e-6,
    expected_grads: Callable[[int, np.ndarray], np.ndarray] | None = None,
    check_step: StepCheck | None = None):
  """Steps ``optax_mtl.value_and_grad`` (jitted) through a scripted run.

  The model is ``L_k(θ) = scripted_L_k · exp(directions[k] · θ)`` at θ = 0, so
  the task losses are the scripted ones and ∇L_k = L_k · directions[k]. At
  every step the weights must match ``expected_weights[step]``; on accepted
  steps the task losses must be the scripted ones and the gradient
  ``expected_grads(step, losses)`` (by default Σ_k w_k L_k directions[k]).
  Returns the final state.
  """
  def loss_fn(params, scripted_losses):
    return scripted_losses * jnp.exp(directions @ params)

  if expected_grads is None:
    expected_grads = lambda step, step_losses: (
        (expected_weights[step] * step_losses) @ directions)
  step_fn = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  params = jnp.zeros(directions.shape[-1])
  state = strategy.init(params)
  for step, step_losses in enumerate(losses):
    previous_state = state
    (task_losses, grads), state = step_fn(params, state, step_losses)
    np.testing.assert_allclose(state.weights, expected_weights[step],
                               rtol=weights_rtol)
    if check_step is not None:
      check_step(step, previous_state, state)
    if accepted(step_losses):
      np.testing.assert_allclose(task_losses, step_losses)
      np.testing.assert_allclose(grads, expected_grads(step, step_losses),
                                 rtol=1e-5, atol=grads_atol)
  return state


def scan_updates(strategy):
  """A jitted run ``(losses f32[S, T], grads f32[S, T, P]) -> (updates
  f32[S, P], weights f32[S, T])`` over a whole sequence, compiled once."""

  def run(losses, grads):
    def body(state, inputs):
      update, state = strategy.update(inputs[1], state, task_losses=inputs[0])
      return state, (update, state.weights)
    return jax.lax.scan(body, strategy.init(None), (losses, grads))[1]

  return jax.jit(run)


def scan_states(strategy, grads, outputs=lambda state: state.weights):
  """A jitted run ``losses f32[S, T] -> outputs(state)`` per step, with the
  same task gradients ``grads`` at every step, compiled once."""

  def run(losses):
    def body(state, step_losses):
      _, state = strategy.update(grads, state, task_losses=step_losses)
      return state, outputs(state)
    return jax.lax.scan(body, strategy.init(None), losses)[1]

  return jax.jit(run)


def per_task_reference(losses, step) -> np.ndarray:
  """The weights f64[S, T] of a per-task reference over scripted losses.

  ``step(step_losses, valid, weights)`` returns the weights after one step
  from the previous ones (ones at the start); ``valid`` marks the losses
  that are finite and positive, as the strategies' guard does.
  """
  weights = np.ones(NUM_TASKS)
  out = []
  for step_losses in np.asarray(losses, np.float64):
    valid = np.isfinite(step_losses) & (step_losses > 0)
    weights = step(step_losses, valid, weights)
    out.append(np.array(weights, np.float64))
  return np.array(out)


def share_the_rest(weights, valid, shares) -> np.ndarray:
  """An excluded task keeps its weight; the valid ones share the rest of T
  (``T − Σ_excluded w``) in proportion to ``shares``: the weights still sum
  to T."""
  budget = NUM_TASKS - np.sum(weights[~valid])
  shares = np.where(valid, shares, 0.0)
  return np.where(valid, budget * shares / shares.sum(), weights)


class ReferenceAdam:
  """Adam written from Kingma & Ba (2015, Algorithm 1) in float64, one per
  task (optax's defaults: β₁ = 0.9, β₂ = 0.999, ε = 1e-8, bias-corrected).

  ``count`` (int[T]) holds each task's own steps, as in the strategies that
  run one optimizer per learned task variable.
  """

  def __init__(self, learning_rate: float):
    self.learning_rate = learning_rate
    self.m = np.zeros(NUM_TASKS)
    self.v = np.zeros(NUM_TASKS)
    self.count = np.zeros(NUM_TASKS, int)

  def step(self, gradient, active) -> np.ndarray:
    """The change of the ``active`` (bool[T]) tasks' variables,
    ``−lr · m̂ / (√v̂ + ε)``, for ``gradient`` (f64[T]); 0 elsewhere."""
    beta1, beta2, epsilon = 0.9, 0.999, 1e-8
    gradient = np.where(active, gradient, 0.0)
    self.count = self.count + active
    self.m = np.where(active, beta1 * self.m + (1 - beta1) * gradient, self.m)
    self.v = np.where(active, beta2 * self.v + (1 - beta2) * gradient**2,
                      self.v)
    with np.errstate(divide="ignore", invalid="ignore"):
      m_hat = self.m / (1 - beta1**self.count)
      v_hat = self.v / (1 - beta2**self.count)
      change = -self.learning_rate * m_hat / (np.sqrt(v_hat) + epsilon)
    return np.where(active, change, 0.0)


def field_check(field: str, expected: np.ndarray) -> StepCheck:
  """A ``check_step`` that compares ``state.<field>`` with ``expected[step]``.

  For a learned per-task state (IMTL's scales ``s``, uncertainty's
  log-variances) against the float64 reference's values after each step.
  Adam divides by ``|ĝ|``, so the float32 rounding of a near-zero gradient
  shows in ``s`` at the level of ``learning_rate · 1e-5``: hence the
  tolerance of 1e-5.
  """

  def check(step, unused_previous_state, state):
    np.testing.assert_allclose(getattr(state, field), expected[step],
                               rtol=1e-5, atol=1e-5, err_msg=field)

  return check


def check_gradient_of_total_loss(strategy, field, total_loss,
                                 reference_gradient):
  """The model's gradient is that of the method's total loss.

  A strategy that learns a per-task state ``s`` (``state.<field>``) from a
  total loss ``total_loss(task_losses, s)`` (a scalar) is run for three
  steps of ``optax_mtl.value_and_grad`` on a linear model with three tasks
  of different scales. At each step the model's gradient must be
  ``∇_θ total_loss`` at ``s`` before the step (``jax.grad``), the
  reference's ``reference_gradient(s, task_losses)`` must be its ``∂/∂s``,
  and ``s`` must move.
  """
  rng = np.random.default_rng(1)
  inputs = rng.normal(size=(8, NUM_PARAMS)).astype(np.float32)
  targets = rng.normal(size=(8, NUM_TASKS)).astype(np.float32)
  params = jnp.asarray(rng.normal(size=(NUM_PARAMS, NUM_TASKS)), jnp.float32)

  def loss_fn(params, inputs, targets):
    errors = jnp.mean((inputs @ params - targets) ** 2, axis=0)
    return errors * jnp.array([1.0, 30.0, 0.1])

  def model_loss(params, learned):
    return total_loss(loss_fn(params, inputs, targets), learned)

  step_fn = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  state = strategy.init(params)
  for _ in range(3):
    before = getattr(state, field)
    (task_losses, grads), state = step_fn(params, state, inputs, targets)
    grad_params, grad_s = jax.grad(model_loss, argnums=(0, 1))(params, before)
    np.testing.assert_allclose(grads, grad_params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        reference_gradient(np.asarray(before), np.asarray(task_losses)),
        grad_s, rtol=1e-5, atol=1e-6)
    assert not np.allclose(getattr(state, field), before)


def check_old_spelling(old_call, new_call, losses=EPOCHS,
                       match="deprecated"):
  """``old_call()``, a spelling of optax_mtl 0.1, warns and runs as the new.

  ``old_call`` must raise a ``DeprecationWarning`` that matches ``match``;
  both strategies then run the scripted ``losses`` (with the gradients of
  :func:`scripted_grads`) and must give the same updates and final state,
  bit for bit.
  """
  with pytest.warns(DeprecationWarning, match=match):
    old = old_call()
  new = new_call()
  grads = scripted_grads(losses)

  def final(strategy):
    def body(state, inputs):
      update, state = strategy.update(inputs[1], state, task_losses=inputs[0])
      return state, update
    return jax.jit(lambda: jax.lax.scan(body, strategy.init(None),
                                        (losses, grads)))()

  for old_leaf, new_leaf in zip(jax.tree.leaves(final(old)),
                                jax.tree.leaves(final(new)), strict=True):
    np.testing.assert_array_equal(old_leaf, new_leaf)


def uniform_losses(num_steps: int, low: float, high: float,
                   num_tasks: int = NUM_TASKS):
  """Hypothesis strategy: f32[num_steps, num_tasks] losses in [low, high]."""
  return st.lists(
      st.floats(low, high), min_size=num_steps * num_tasks,
      max_size=num_steps * num_tasks).map(
          lambda xs: np.array(xs, np.float32).reshape(num_steps, num_tasks))


def wide_positive_losses(num_steps: int, num_tasks: int = NUM_TASKS):
  """Hypothesis strategy: losses 10^u, u in [-10, 10], f32[steps, tasks]."""
  return st.lists(
      st.floats(-10.0, 10.0), min_size=num_steps * num_tasks,
      max_size=num_steps * num_tasks).map(
          lambda xs: (10.0 ** np.array(xs)).astype(np.float32).reshape(
              num_steps, num_tasks))


def assert_finite_and_positive(weights):
  assert np.all(np.isfinite(weights)) and np.all(weights > 0)


def weights_with_unit_grads(run, losses):
  """The weights f32[S, T] of a :func:`scan_updates` run whose task gradients
  are all ones f32[S, T, 2]."""
  grads = np.ones(losses.shape + (2,), np.float32)
  _, weights = run(losses, grads)
  return weights


def check_invariant_to_scaling_one_task(run, losses, scale, task, seed, *,
                                        rtol: float, atol: float = 0.0):
  """Scaling task ``task``'s loss and gradient by ``scale`` keeps the update.

  ``run`` is a :func:`scan_updates` run; the gradients are random f32[S, T, 2]
  from ``seed``. The float tolerance is relative to the size of the terms of
  Σ_k w_k g_k: |Δupdate| ≤ rtol · Σ_k |w_k| |g_k| + atol.
  """
  grads = np.random.default_rng(seed).normal(
      size=losses.shape + (2,)).astype(np.float32)
  factor = np.ones(losses.shape[-1], np.float32)
  factor[task] = scale
  updates, weights = run(losses, grads)
  scaled_updates, _ = run(losses * factor, grads * factor[None, :, None])
  term_size = np.einsum("sk,skp->sp", np.abs(weights), np.abs(grads))
  assert np.all(np.abs(scaled_updates - updates) <= rtol * term_size + atol)


# ``check_rejects(factory, kwargs, message)``: ``factory(num_tasks=NUM_TASKS,
# **kwargs)`` raises ValueError(message). (num_tasks itself is checked for
# every strategy in tests/test_contract.py.)
check_rejects = strategies.check_rejects


def complex_step_gradient(function, losses):
  """Im f(L + i h e_k) / h: exact to float64 rounding (Squire & Trapp 1998),
  with h far below the size of the losses."""
  losses = np.asarray(losses, np.float64)
  step = 1e-20 * (np.max(np.abs(losses)) or 1.0)
  gradient = np.zeros_like(losses)
  for k in range(len(losses)):
    perturbed = losses.astype(np.complex128)
    perturbed[k] += 1j * step
    gradient[k] = np.imag(function(perturbed)) / step
  return gradient
