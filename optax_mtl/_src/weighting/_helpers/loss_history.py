"""Loss statistics and weight bounds shared by the loss-weighting strategies.

Three small pure pieces of loss statistics (used by ema, rema, dwema and dwa),
each with its own state:

* :class:`LossAverageState` — the exponential moving average of the losses,
  ``L̃(t) = β·L(t) + (1−β)·L̃(t−1)``, started at the first losses observed;
* :class:`LossRatioState` — the mean losses of the last two complete
  *periods* (a period is one step, or an epoch of a fixed number of steps),
  from which the loss ratios ``r = L(t−1) / L(t−2)`` are read;
* :func:`dwa_coefficients` — the Dynamic Weight Average coefficients
  ``T·softmax(r / τ)`` (1 while the ratios do not exist yet).

Every statistic is kept per task. The strategies built on them are
*per-task* weightings (``Weighting.per_task``): the guard
(``optax_mtl._src.step``) tells the rule which losses are valid (finite and
positive), and each update here takes that mask (``valid``, bool[T]): an
excluded task's statistics and counters are kept, so a rejected loss never
enters a statistic and every counter of a task counts that task's accepted
losses. A task first seen at step 5 starts its statistics at step 5.
``valid=None`` means every task is valid.

No statistic here can overflow, and no weight computed from them is ever
infinite, whatever the accepted losses (any positive float32, 1e-38 to
3e38): the averages are convex combinations of losses, ratios are clipped at
:data:`MAX_WEIGHT`, and the weights that divide by a loss go through
:func:`bounded_ratio` or :func:`normalized_weights`. A state therefore never
holds a value that makes every later step fail.

Loss-weighting strategies whose weights grow as the losses fall
(``w = 1/L̃``) share two options, checked by :func:`check_weight_options`:
``normalize`` (weights rescaled to sum to ``T``) and ``max_weight`` (each
weight clipped), applied by :func:`finish_weights`. The three that divide a
factor by the loss average (``loss_ema``, ``rema``, ``dwema``) are one
weighting, :func:`average_weighting`, with different factors.
"""

import math
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import step

# The largest weight (and loss ratio) any loss-weighting strategy returns,
# whatever the losses: 1/L reaches it only for a loss below 1e-30.
MAX_WEIGHT = 1e30
LOG_MAX_WEIGHT = math.log(MAX_WEIGHT)
# The smallest positive normal float32; a smaller statistic (a denormal, which
# XLA:CPU flushes to zero) is read as this in a division or a logarithm.
TINY = float(np.finfo(np.float32).tiny)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def bounded_ratio(numerator: chex.Array, denominator: chex.Array,
                  bound: float = MAX_WEIGHT) -> chex.Array:
  """``min(numerator / denominator, bound)``, computed without overflow.

  For ``numerator >= 0`` and ``denominator >= 0`` (a zero or denormal
  denominator is read as the smallest normal float32). Exact whenever the
  quotient is at most ``bound`` and the denominator is normal; never inf.
  """
  floor = jnp.maximum(numerator / bound, TINY)
  return jnp.minimum(numerator / jnp.maximum(denominator, floor), bound)


def log_positive(value: chex.Array) -> chex.Array:
  """``log(value)`` of a non-negative statistic, floored at log(tiny)."""
  return jnp.log(jnp.maximum(value, TINY))


def check_weight_options(normalize: Any, max_weight: Any):
  """Checks the ``normalize`` and ``max_weight`` options; returns them."""
  normalize = base.check_bool("normalize", normalize)
  if max_weight is not None:
    max_weight = base.check_in_range("max_weight", max_weight, 0.0,
                                     low_inclusive=False)
  return normalize, max_weight


def normalized_weights(log_weights: chex.Array,
                       valid: Optional[chex.Array] = None,
                       previous_weights: Optional[chex.Array] = None
                       ) -> chex.Array:
  """``T · w / Σ w`` for ``w = exp(log_weights)``, in log space (never inf).

  With a mask ``valid`` (bool[T]) and the ``previous_weights`` (f32[T]) the
  excluded tasks keep their previous weights and the valid ones share the
  rest of the sum ``T`` (``T − Σ_excluded previous``, at least 0) in
  proportion to ``w``: the weights still sum to ``T``. Every task valid
  gives the plain normalisation, bit for bit.
  """
  num_tasks = log_weights.shape[0]
  weights = num_tasks * jax.nn.softmax(log_weights)
  if valid is None:
    return weights
  budget = jnp.maximum(
      num_tasks - jnp.sum(jnp.where(valid, 0.0, previous_weights)), 0.0)
  # At least one task is valid whenever the result is used (the guard
  # rejects a step without one); the where keeps the softmax finite anyway.
  masked = jnp.where(valid, log_weights, -jnp.inf)
  masked = jnp.where(jnp.any(valid), masked, 0.0)
  shared = jnp.where(valid, budget * jax.nn.softmax(masked), previous_weights)
  return jnp.where(jnp.all(valid), weights, shared)


def finish_weights(weights: Optional[chex.Array],
                   log_weights: Optional[chex.Array], normalize: bool,
                   max_weight: Optional[Any],
                   valid: Optional[chex.Array] = None,
                   previous_weights: Optional[chex.Array] = None
                   ) -> chex.Array:
  """Applies the ``normalize`` and ``max_weight`` options.

  Args:
    weights: the (bounded) weights, used when ``normalize`` is False.
    log_weights: their logarithms, used when ``normalize`` is True.
    normalize: rescale the weights to sum to ``T`` (in log space).
    max_weight: None, or the bound each weight is clipped at (after the
      normalisation).
    valid: None, or bool[T], the tasks of this step (see
      :func:`normalized_weights`; the excluded tasks keep
      ``previous_weights``).
    previous_weights: f32[T], the weights applied last (with ``valid``).

  Returns:
    The weights, float32[T].
  """
  if normalize:
    weights = normalized_weights(log_weights, valid, previous_weights)
  if max_weight is not None:
    weights = jnp.minimum(weights, max_weight)
  return weights.astype(jnp.float32)


class LossAverageState(NamedTuple):
  """Exponential moving average of the accepted task losses."""

  # f32[T], L̃; zero for a task before its first accepted loss.
  average: chex.Array
  # i32[T], the accepted losses of each task averaged so far (saturates).
  num_steps: chex.Array


def init_loss_average(num_tasks: int) -> LossAverageState:
  return LossAverageState(
      average=jnp.zeros((num_tasks,), jnp.float32),
      num_steps=jnp.zeros((num_tasks,), jnp.int32))


def update_loss_average(
    state: LossAverageState, task_losses: chex.Array, beta: float,
    valid: Optional[chex.Array] = None,
) -> LossAverageState:
  """``L̃ ← β·L + (1−β)·L̃``, or ``L̃ ← L`` at a task's first accepted loss.

  Only the ``valid`` tasks (all when None) are updated. A convex combination
  of losses: it stays in the range of the losses (the float32 maximum at
  most, should rounding reach past it).
  """
  is_first = state.num_steps == 0
  average = jnp.where(is_first, task_losses,
                      beta * task_losses + (1.0 - beta) * state.average)
  average = jnp.minimum(average, _FLOAT32_MAX)
  num_steps = optax.safe_increment(state.num_steps)
  if valid is not None:
    average = jnp.where(valid, average, state.average)
    num_steps = jnp.where(valid, num_steps, state.num_steps)
  return LossAverageState(
      average=average.astype(jnp.float32),
      num_steps=num_steps.astype(jnp.int32))


class LossRatioState(NamedTuple):
  """Mean losses of the last two complete periods (steps or epochs)."""

  period_mean: chex.Array  # f32[T], running mean of the current period.
  # i32[T], each task's accepted losses in its current period.
  num_period_steps: chex.Array
  last_mean: chex.Array  # f32[T], mean losses of the last period, L(t−1).
  before_last_mean: chex.Array  # f32[T], of the period before, L(t−2).
  num_periods: chex.Array  # i32[T], complete periods so far (saturates).

  steps_in_period = deprecation.renamed_field("num_period_steps")  # 0.1.


def init_loss_ratios(num_tasks: int) -> LossRatioState:
  return LossRatioState(
      period_mean=jnp.zeros((num_tasks,), jnp.float32),
      num_period_steps=jnp.zeros((num_tasks,), jnp.int32),
      last_mean=jnp.ones((num_tasks,), jnp.float32),
      before_last_mean=jnp.ones((num_tasks,), jnp.float32),
      num_periods=jnp.zeros((num_tasks,), jnp.int32))


def loss_ratios(state: LossRatioState) -> tuple[chex.Array, chex.Array]:
  """Returns ``(r, available)``: ``r = L(t−1)/L(t−2)``, or ones if not yet.

  ``available`` (bool[T]) is True for a task once two of its periods are
  complete (for every task at once unless some losses were excluded). The
  means
  are of accepted (hence positive) losses; a ratio above
  :data:`MAX_WEIGHT` (e.g. 1e9 after 1e-30) is clipped to it, so ``r`` is
  always finite.
  """
  available = state.num_periods >= 2
  ratios = bounded_ratio(state.last_mean, state.before_last_mean)
  return jnp.where(available, ratios, 1.0), available


def log_loss_ratios(state: LossRatioState) -> chex.Array:
  """``log r`` (exact, unclipped; zeros until two periods are complete)."""
  available = state.num_periods >= 2
  log_ratios = (log_positive(state.last_mean)
                - log_positive(state.before_last_mean))
  return jnp.where(available, log_ratios, 0.0)


def record_losses(
    state: LossRatioState, task_losses: chex.Array, steps_per_period: int,
    valid: Optional[chex.Array] = None,
) -> LossRatioState:
  """Adds the losses of one step to each task's current period.

  Only the ``valid`` tasks (all when None) record their loss; the periods
  are counted per task, in accepted losses. When a task's period reaches
  ``steps_per_period`` accepted losses its mean becomes ``L(t−1)`` and the
  previous one ``L(t−2)``. With ``steps_per_period=1`` every step is a
  period: ``L(t−1)`` is the task's previous accepted loss.
  """
  steps = state.num_period_steps + 1
  # A running mean: accurate in float32 even over long epochs.
  mean = state.period_mean + (task_losses - state.period_mean) / steps
  if valid is not None:
    steps = jnp.where(valid, steps, state.num_period_steps)
    mean = jnp.where(valid, mean, state.period_mean)
  complete = steps >= steps_per_period
  if valid is not None:
    complete &= valid
  return LossRatioState(
      period_mean=jnp.where(complete, 0.0, mean).astype(jnp.float32),
      num_period_steps=jnp.where(complete, 0, steps).astype(jnp.int32),
      last_mean=jnp.where(complete, mean, state.last_mean).astype(jnp.float32),
      before_last_mean=jnp.where(complete, state.last_mean,
                                 state.before_last_mean).astype(jnp.float32),
      num_periods=jnp.where(complete, optax.safe_increment(state.num_periods),
                            state.num_periods).astype(jnp.int32))


def _dwa_logits(state: LossRatioState, temperature: float):
  # r/τ, clipped at MAX_WEIGHT like r: finite for any τ > 0. A task whose
  # ratio does not exist yet (it missed steps) counts with r = 1.
  ratios, available = loss_ratios(state)
  return (bounded_ratio(ratios, jnp.asarray(temperature, jnp.float32)),
          jnp.any(available))


def dwa_coefficients(state: LossRatioState, temperature: float,
                     valid: Optional[chex.Array] = None,
                     previous_weights: Optional[chex.Array] = None
                     ) -> chex.Array:
  """``T·softmax(r/τ)`` from the ratio history; ones until it exists.

  Always finite, in ``[0, T]``: ``r/τ`` is clipped at :data:`MAX_WEIGHT`.
  With ``valid`` and ``previous_weights``, the excluded tasks keep their
  previous weights and the others share the rest of ``T``
  (:func:`normalized_weights`).
  """
  logits, available = _dwa_logits(state, temperature)
  coefficients = normalized_weights(logits, valid, previous_weights)
  ones = jnp.ones_like(coefficients)
  if valid is not None:
    ones = jnp.where(valid, ones, previous_weights)
  return jnp.where(available, coefficients, ones).astype(jnp.float32)


def log_dwa_coefficients(state: LossRatioState,
                         temperature: float) -> chex.Array:
  """``log(T·softmax(r/τ))``, finite (zeros until the ratios exist)."""
  logits, available = _dwa_logits(state, temperature)
  num_tasks = logits.shape[0]
  log_coefficients = math.log(num_tasks) + jax.nn.log_softmax(logits)
  return jnp.where(available, log_coefficients, 0.0).astype(jnp.float32)


def average_weighting(
    num_tasks: Any,
    beta: Any,
    normalize: Any,
    max_weight: Any,
    state_type: type,
    factor: Optional[Callable[[LossRatioState], chex.Array]] = None,
    log_factor: Optional[Callable[[LossRatioState], chex.Array]] = None,
) -> base.MultiTaskStrategy:
  """The weighting ``w_k = f_k / L̃_k`` of ``loss_ema``, ``rema`` and ``dwema``.

  Checks ``num_tasks``, ``beta`` (in (0, 1]) and the weight options, and
  returns the per-task strategy whose state (``state_type``) holds the loss
  average and, when a ``factor`` is given, the loss-ratio history.

  Args:
    num_tasks: T.
    beta: the weight of the newest loss in the average ``L̃``.
    normalize: the option of :func:`finish_weights`.
    max_weight: the option of :func:`finish_weights`.
    state_type: the strategy's state, with the fields of
      ``common_state_fields(per_task=True)``, ``loss_average`` and (with a
      ``factor``) ``loss_ratios``.
    factor: None (``f = 1``), or ``f`` (f32[T], finite, >= 0) from the loss
      ratios before this step's losses are recorded.
    log_factor: ``log f`` (finite), used when ``normalize`` is True.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  beta = base.check_in_range("beta", beta, 0.0, 1.0, low_inclusive=False)
  normalize, max_weight = check_weight_options(normalize, max_weight)

  def init():
    ratios = {} if factor is None else {
        "loss_ratios": init_loss_ratios(num_tasks)}
    return state_type(
        **base.common_state_fields(num_tasks, per_task=True),
        loss_average=init_loss_average(num_tasks), **ratios)

  def rule(task_losses, state, gramian, valid=None):
    del gramian
    loss_average = update_loss_average(
        state.loss_average, task_losses, beta, valid)
    average = loss_average.average
    log_weights = -log_positive(average) if normalize else None
    if factor is None:
      weights, ratios = bounded_ratio(1.0, average), {}
    else:
      weights = bounded_ratio(factor(state.loss_ratios), average)
      if normalize:
        log_weights = log_factor(state.loss_ratios) + log_weights
      ratios = {"loss_ratios": record_losses(state.loss_ratios, task_losses,
                                             1, valid)}
    weights = finish_weights(weights, log_weights, normalize, max_weight,
                             valid, state.weights)
    return weights, state._replace(loss_average=loss_average, **ratios)

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=True, per_task=True))
