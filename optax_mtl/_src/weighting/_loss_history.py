"""Loss statistics shared by the EMA family (ema, rema, dwema) and DWA.

Three small pure pieces, each with its own state:

* :class:`LossAverageState` — the exponential moving average of the losses,
  ``L̃(t) = β·L(t) + (1−β)·L̃(t−1)``, started at the first losses observed;
* :class:`LossRatioState` — the mean losses of the last two complete
  *periods* (a period is one step, or an epoch of a fixed number of steps),
  from which the loss ratios ``r = L(t−1) / L(t−2)`` are read;
* :func:`dwa_coefficients` — the Dynamic Weight Average coefficients
  ``T·softmax(r / τ)`` (1 while the ratios do not exist yet).

The weight rules call these only on accepted steps: ``base.apply_rule``
discards the whole new state on a rejected step (a non-finite, zero or
negative loss), so a rejected loss never enters a statistic and every counter
here counts accepted steps.
"""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import base


class LossAverageState(NamedTuple):
  """Exponential moving average of the accepted task losses."""

  average: chex.Array  # f32[T], L̃; zeros before the first accepted step.
  num_steps: chex.Array  # i32[], accepted steps averaged so far (saturates).


def init_loss_average(num_tasks: int) -> LossAverageState:
  return LossAverageState(
      average=jnp.zeros((num_tasks,), jnp.float32),
      num_steps=jnp.zeros([], jnp.int32))


def update_loss_average(
    state: LossAverageState, task_losses: chex.Array, beta: float
) -> LossAverageState:
  """``L̃ ← β·L + (1−β)·L̃``, or ``L̃ ← L`` on the first accepted step."""
  is_first = state.num_steps == 0
  average = jnp.where(is_first, task_losses,
                      beta * task_losses + (1.0 - beta) * state.average)
  return LossAverageState(
      average=average.astype(jnp.float32),
      num_steps=optax.safe_increment(state.num_steps))


class LossRatioState(NamedTuple):
  """Mean losses of the last two complete periods (steps or epochs)."""

  period_mean: chex.Array  # f32[T], running mean of the current period.
  steps_in_period: chex.Array  # i32[], accepted steps of the current period.
  last_mean: chex.Array  # f32[T], mean losses of the last period, L(t−1).
  before_last_mean: chex.Array  # f32[T], of the period before, L(t−2).
  num_periods: chex.Array  # i32[], complete periods so far (saturates).


def init_loss_ratios(num_tasks: int) -> LossRatioState:
  return LossRatioState(
      period_mean=jnp.zeros((num_tasks,), jnp.float32),
      steps_in_period=jnp.zeros([], jnp.int32),
      last_mean=jnp.ones((num_tasks,), jnp.float32),
      before_last_mean=jnp.ones((num_tasks,), jnp.float32),
      num_periods=jnp.zeros([], jnp.int32))


def loss_ratios(state: LossRatioState) -> tuple[chex.Array, chex.Array]:
  """Returns ``(r, available)``: ``r = L(t−1)/L(t−2)``, or ones if not yet.

  ``available`` (bool[]) is True once two periods are complete. The means
  are of accepted (hence positive) losses, so the division is safe.
  """
  available = state.num_periods >= 2
  denominator = jnp.where(available, state.before_last_mean, 1.0)
  ratios = jnp.where(available, state.last_mean / denominator, 1.0)
  return ratios, available


def record_losses(
    state: LossRatioState, task_losses: chex.Array, steps_per_period: int
) -> LossRatioState:
  """Adds the losses of one accepted step to the current period.

  When the period reaches ``steps_per_period`` accepted steps its mean
  becomes ``L(t−1)`` and the previous one ``L(t−2)``. With
  ``steps_per_period=1`` every step is a period: ``L(t−1)`` is the loss of
  the previous step.
  """
  steps = state.steps_in_period + 1
  # A running mean: accurate in float32 even over long epochs.
  mean = state.period_mean + (task_losses - state.period_mean) / steps
  complete = steps >= steps_per_period
  return LossRatioState(
      period_mean=jnp.where(complete, 0.0, mean).astype(jnp.float32),
      steps_in_period=jnp.where(complete, 0, steps).astype(jnp.int32),
      last_mean=jnp.where(complete, mean, state.last_mean).astype(jnp.float32),
      before_last_mean=jnp.where(complete, state.last_mean,
                                 state.before_last_mean).astype(jnp.float32),
      num_periods=jnp.where(complete, optax.safe_increment(state.num_periods),
                            state.num_periods).astype(jnp.int32))


def dwa_coefficients(state: LossRatioState, temperature: float) -> chex.Array:
  """``T·softmax(r/τ)`` from the ratio history; ones until it exists."""
  ratios, available = loss_ratios(state)
  num_tasks = ratios.shape[0]
  coefficients = num_tasks * jax.nn.softmax(ratios / temperature)
  return jnp.where(available, coefficients, 1.0).astype(jnp.float32)
