"""Uncertainty weighting: learned homoscedastic log-variances per task."""

import math
from typing import Any, NamedTuple, Sequence, Union

import chex
import jax.numpy as jnp
import optax
import numpy as np

from optax_mtl._src import base
from optax_mtl._src import step

# Adam's constants for the log-variance updates (Kingma & Ba 2015 defaults).
ADAM_B1 = 0.9
ADAM_B2 = 0.999
ADAM_EPS = 1e-8


class UncertaintyState(NamedTuple):
  """State of :func:`uncertainty`."""

  weights: chex.Array  # f32[T], the weights applied last: c_k exp(-s_k).
  num_skipped: chex.Array  # i32[], rejected steps.
  log_variances: chex.Array  # f32[T], s_k = log σ_k², after the last update.
  adam_mu: chex.Array  # f32[T], Adam's first moment of ∂L/∂s.
  adam_nu: chex.Array  # f32[T], Adam's second moment of ∂L/∂s.
  adam_count: chex.Array  # i32[], accepted updates of s (Adam's step t).


def uncertainty(
    num_tasks: int,
    learning_rate: float = 1e-2,
    classification: Union[bool, Sequence[bool]] = False,
    initial_log_variances: Union[float, Sequence[float]] = 0.0,
) -> base.MultiTaskStrategy:
  r"""Uncertainty weighting: each task weighted by a learned inverse variance.

  The model is trained on the total loss of Kendall et al. (2018), with one
  learned log-variance ``s_k = log σ_k²`` per task,

  .. math::
    L(\theta, s) = \sum_{k=1}^{T} c_k\, e^{-s_k} L_k(\theta)
      + \tfrac{1}{2} s_k, \qquad
    c_k = \begin{cases} \tfrac12 & \text{regression} \\
                        1 & \text{classification} \end{cases}

  so the weights are ``w_k = c_k e^{-s_k}``. The log-variances live in the
  strategy's state (the user adds no parameters) and are updated by the
  strategy itself with Adam (``b1 = 0.9``, ``b2 = 0.999``, ``eps = 1e-8``,
  bias-corrected) on the exact gradient

  .. math::
    \frac{\partial L}{\partial s_k} = \tfrac12 - c_k e^{-s_k} L_k,

  whose zero is ``s_k = log(2 c_k L_k)``: at equilibrium ``w_k L_k = 1/2``.
  At step t the weights are computed from ``s`` *before* its update at t;
  then ``s`` takes one Adam step using the losses of step t. The term
  ``½ s_k`` does not depend on the model parameters, so the returned
  gradient is that of ``L`` with respect to ``θ``.

  A step with a non-finite or non-positive loss (a zero loss would drive
  ``s_k`` to ``-∞``), or whose update of ``s`` is not finite, is counted in
  ``num_skipped``; ``s`` and Adam's moments are kept and the previous weights
  are applied (``c_k e^{-s_k}`` of the initial ``s`` before the first
  accepted step).

  Args:
    num_tasks: the number of tasks T.
    learning_rate: Adam's learning rate for ``s``, ``> 0``. Each update moves
      ``s_k`` by about ``learning_rate`` at most, i.e. changes a weight by a
      factor of about ``e^{±learning_rate}``.
    classification: whether a task's loss is a classification loss (weight
      ``e^{-s_k}``) rather than a regression loss (``½ e^{-s_k}``): one bool
      for all tasks or a sequence of ``num_tasks`` bools.
    initial_log_variances: the initial ``s``, one number for all tasks or a
      sequence of ``num_tasks`` numbers (default 0: unit variances).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.uncertainty(num_tasks=2, learning_rate=0.01)
    >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.array([1.0, 4.0]))
    >>> update.tolist()  # ½ e^{-0}: the weights of the initial s.
    [0.5, 0.5]
    >>> [round(s, 4) for s in state.log_variances.tolist()]
    [0.0, 0.01]

  References:
    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics", CVPR 2018; Kingma & Ba, "Adam:
    A Method for Stochastic Optimization", ICLR 2015.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  learning_rate = base.check_in_range("learning_rate", learning_rate, 0.0,
                                      low_inclusive=False)
  if not math.isfinite(learning_rate):
    raise ValueError(f"learning_rate must be finite, got {learning_rate!r}.")
  is_classification = _check_classification(classification, num_tasks)
  coefficients = np.where(is_classification, 1.0, 0.5).astype(np.float32)
  initial_s = _check_initial_log_variances(initial_log_variances, num_tasks,
                                           coefficients)

  def init():
    zeros = jnp.zeros((num_tasks,), jnp.float32)
    log_variances = jnp.asarray(initial_s, jnp.float32)
    return UncertaintyState(
        **base.common_state_fields(
            num_tasks, jnp.asarray(coefficients) * jnp.exp(-log_variances)),
        log_variances=log_variances,
        adam_mu=zeros,
        adam_nu=zeros,
        adam_count=jnp.zeros([], jnp.int32))

  def rule(task_losses, state, gramian):
    del gramian
    log_variances = state.log_variances
    weights = jnp.asarray(coefficients) * jnp.exp(-log_variances)
    grad = 0.5 - weights * task_losses  # ∂L/∂s at the current s.
    count = optax.safe_increment(state.adam_count)
    mu = ADAM_B1 * state.adam_mu + (1.0 - ADAM_B1) * grad
    nu = ADAM_B2 * state.adam_nu + (1.0 - ADAM_B2) * jnp.square(grad)
    step = count.astype(jnp.float32)
    mu_hat = mu / (1.0 - jnp.power(jnp.float32(ADAM_B1), step))
    nu_hat = nu / (1.0 - jnp.power(jnp.float32(ADAM_B2), step))
    new_log_variances = log_variances - learning_rate * mu_hat / (
        jnp.sqrt(nu_hat) + ADAM_EPS)
    # An update that overflows (a loss near the float32 range) must not enter
    # the state: non-finite weights make the guard reject the whole step.
    update_ok = (jnp.all(jnp.isfinite(new_log_variances))
                 & jnp.all(jnp.isfinite(nu)))
    weights = jnp.where(update_ok, weights, jnp.nan)
    return weights, state._replace(
        log_variances=new_log_variances, adam_mu=mu, adam_nu=nu,
        adam_count=count)

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=True))


def _check_classification(classification: Any, num_tasks: int) -> np.ndarray:
  if isinstance(classification, (bool, np.bool_)):
    return np.full((num_tasks,), bool(classification))
  try:
    values = list(classification)
  except TypeError:
    values = None
  if (values is None or len(values) != num_tasks
      or not all(isinstance(v, (bool, np.bool_)) for v in values)):
    raise ValueError(
        f"classification must be a bool or a sequence of {num_tasks} bools "
        f"(one per task), got {classification!r}.")
  return np.asarray(values, dtype=bool)


def _check_initial_log_variances(initial_log_variances: Any, num_tasks: int,
                                 coefficients: np.ndarray) -> np.ndarray:
  try:
    values = np.asarray(initial_log_variances, dtype=np.float64)
  except (TypeError, ValueError) as error:
    raise ValueError(
        "initial_log_variances must be a number or a sequence of "
        f"{num_tasks} numbers, got {initial_log_variances!r}.") from error
  if values.shape == ():
    values = np.full((num_tasks,), float(values))
  if values.shape != (num_tasks,):
    raise ValueError(
        "initial_log_variances must be a number or have shape "
        f"({num_tasks},), got shape {values.shape}: "
        f"{initial_log_variances!r}.")
  with np.errstate(over="ignore"):
    weights = coefficients * np.exp(-values.astype(np.float32))
  if not np.all(np.isfinite(values) & np.isfinite(weights) & (weights > 0)):
    raise ValueError(
        "initial_log_variances must be finite, with weights c·exp(-s) "
        f"finite and positive in float32, got {initial_log_variances!r}.")
  return values
