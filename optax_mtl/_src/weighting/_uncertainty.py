"""Uncertainty weighting: learned homoscedastic log-variances per task."""

from typing import Any, NamedTuple, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import step
from optax_mtl._src.weighting._helpers import loss_history

# Adam's constants for the log-variance updates (Kingma & Ba 2015 defaults).
ADAM_B1 = 0.9
ADAM_B2 = 0.999
ADAM_EPS = 1e-8
# ∂L/∂s is clipped to [-MAX_GRADIENT, MAX_GRADIENT]: its square (Adam's
# second moment) then stays finite, whatever the loss. Adam divides by the
# gradient's scale, so the clip changes a step only for |∂L/∂s| > 1e18.
MAX_GRADIENT = 1e18
# exp(-s) is computed with -s clipped here (e^88 ≈ 1.7e38 < float32 max).
_MAX_EXPONENT = 88.0


class UncertaintyState(NamedTuple):
  """State of :func:`uncertainty`."""

  weights: chex.Array  # f32[T], the weights applied last: c_k exp(-s_k).
  num_skipped: chex.Array  # i32[], steps rejected as a whole.
  num_rejected_losses: chex.Array  # i32[T], bad losses per task.
  log_variances: chex.Array  # f32[T], s_k = log σ_k², after the last update.
  # optax.scale_by_adam's state for each s_k: count (i32[T], accepted
  # updates of s_k), mu and nu (f32[T], the moments of ∂L/∂s_k).
  optimizer_state: optax.ScaleByAdamState

  adam = deprecation.renamed_field("optimizer_state")  # 0.1 name.


@deprecation.renamed_arguments(old_positional=(
    "num_tasks", "learning_rate", "classification", "initial_log_variances"))
def uncertainty(
    num_tasks: int,
    learning_rate: float = 1e-2,
    *,
    initial_log_variances: Union[float, Sequence[float]] = 0.0,
    classification: Union[bool, Sequence[bool]] = False,
    normalize: bool = False,
    max_weight: Optional[float] = None,
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
  strategy itself with Adam (``optax.scale_by_adam``: ``b1 = 0.9``,
  ``b2 = 0.999``, ``eps = 1e-8``, bias-corrected) on the exact gradient

  .. math::
    \frac{\partial L}{\partial s_k} = \tfrac12 - c_k e^{-s_k} L_k,

  clipped to ±1e18 so that Adam's moments stay finite for any loss (Adam
  divides by the gradient's scale: the clip only matters beyond it). Its
  zero is ``s_k = log(2 c_k L_k)``: at equilibrium ``w_k L_k = 1/2``.
  At step t the weights are computed from ``s`` *before* its update at t;
  then ``s`` takes one Adam step using the losses of step t. The term
  ``½ s_k`` does not depend on the model parameters, so the returned
  gradient is that of ``L`` with respect to ``θ``.

  At equilibrium the weights are ``1/(2 L_k)``: they grow as the losses fall,
  a learning-rate multiplier that Adam and other scale-invariant optimizers
  cancel but plain SGD (or momentum) applies. With SGD, use
  ``normalize=True`` (the applied weights rescaled to sum to ``T``) or
  ``max_weight``; both change only the applied weights, ``s`` is learnt from
  the total loss above. Every applied weight is at most 1e30 in any case, so
  it is never infinite.

  A non-finite or non-positive loss (a zero loss would drive ``s_k`` to
  ``-∞``: a task without labels in the batch) excludes its task only: its
  ``s_k``, Adam moments and step count are kept, its previous weight is
  applied, and ``num_rejected_losses`` counts it; the other tasks' ``s``
  take their step. Each ``s_k`` has its own Adam step count, so the bias
  correction of a task is that of its own updates. A step with no valid
  loss, or whose update of ``s`` is not finite (only with an absurd
  ``learning_rate``), is counted in ``num_skipped``; ``s`` and Adam's
  moments are kept and the previous weights are applied (``c_k e^{-s_k}``
  of the initial ``s`` before the first accepted step).

  Args:
    num_tasks: the number of tasks T.
    learning_rate: Adam's learning rate for ``s``, ``> 0``. Each update moves
      ``s_k`` by about ``learning_rate`` at most, i.e. changes a weight by a
      factor of about ``e^{±learning_rate}``.
    initial_log_variances: the initial ``s``, one number for all tasks or a
      sequence of ``num_tasks`` numbers (default 0: unit variances). LibMTL's
      ``UW`` starts at ``s = -0.5``: pass ``initial_log_variances=-0.5`` to
      reproduce it.
    classification: whether a task's loss is a classification loss (weight
      ``e^{-s_k}``) rather than a regression loss (``½ e^{-s_k}``): one bool
      for all tasks or a sequence of ``num_tasks`` bools.
    normalize: rescale the applied weights to sum to ``T``.
    max_weight: None, or a bound > 0 on each applied weight
      :math:`c_k e^{-s_k}` (after ``normalize``).

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
    Kendall, Gal & Cipolla, `Multi-Task Learning Using Uncertainty to Weigh
    Losses for Scene Geometry and Semantics
    <https://arxiv.org/abs/1705.07115>`_, CVPR 2018; Kingma & Ba, `Adam: A
    Method for Stochastic Optimization <https://arxiv.org/abs/1412.6980>`_,
    ICLR 2015.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  learning_rate = base.check_in_range("learning_rate", learning_rate, 0.0,
                                      low_inclusive=False)
  is_classification = _check_classification(classification, num_tasks)
  coefficients = np.where(is_classification, 1.0, 0.5).astype(np.float32)
  log_coefficients = np.log(coefficients)
  initial_s = _check_initial_log_variances(initial_log_variances, num_tasks,
                                           coefficients)
  normalize, max_weight = loss_history.check_weight_options(normalize,
                                                             max_weight)
  adam = optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS)

  def raw_weights(log_variances):
    # c_k e^{-s_k}, finite (e^{-s} is at most e^88).
    return jnp.asarray(coefficients) * jnp.exp(
        jnp.minimum(-log_variances, _MAX_EXPONENT))

  def applied_weights(log_variances):
    return loss_history.finish_weights(
        jnp.minimum(raw_weights(log_variances), loss_history.MAX_WEIGHT),
        jnp.asarray(log_coefficients) - log_variances, normalize, max_weight)

  def init():
    log_variances = jnp.asarray(initial_s, jnp.float32)
    # Every field its own buffer (optax's init makes fresh zeros), so that a
    # fresh state can be donated to jax.jit.
    return UncertaintyState(
        **base.common_state_fields(num_tasks, applied_weights(log_variances),
                                   per_task=True),
        log_variances=log_variances,
        optimizer_state=jax.vmap(adam.init)(
            jnp.zeros((num_tasks,), jnp.float32)))

  def rule(task_losses, state, gramian, valid=None):
    del gramian
    if valid is None:  # Run as a whole-step weighting: all valid here.
      valid = jnp.isfinite(task_losses) & (task_losses > 0)
    log_variances = state.log_variances
    # ∂L/∂s at the current s. For s < -88 the product is underestimated but
    # still > 1/2 (the loss is a normal float32), so the sign is right; a
    # product that overflows is clipped with the rest.
    grad = jnp.clip(0.5 - raw_weights(log_variances) * task_losses,
                    -MAX_GRADIENT, MAX_GRADIENT)
    # One Adam per task; an excluded task keeps its s, moments and count.
    direction, adam_state = jax.vmap(adam.update)(grad, state.optimizer_state)
    adam_state = jax.tree.map(lambda new, old: jnp.where(valid, new, old),
                              adam_state, state.optimizer_state)
    new_log_variances = log_variances - learning_rate * jnp.where(
        valid, direction, 0.0)
    # Only an absurd learning rate can overflow s: reject such a step.
    return applied_weights(log_variances), state._replace(
        log_variances=new_log_variances, optimizer_state=adam_state), jnp.all(
            jnp.isfinite(new_log_variances))

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=True, per_task=True))


def _check_classification(classification: Any, num_tasks: int) -> np.ndarray:
  if isinstance(classification, (bool, np.bool_)):
    return np.full((num_tasks,), base.check_bool("classification",
                                                 classification))
  try:
    values = list(classification)
  except TypeError:
    values = None
  message = (f"classification must be a bool or a sequence of {num_tasks} "
             f"bools (one per task), got {classification!r}.")
  if values is None or len(values) != num_tasks:
    raise ValueError(message)
  try:
    return np.asarray([base.check_bool("classification", value)
                       for value in values], dtype=bool)
  except ValueError as error:
    raise ValueError(message) from error



def _check_initial_log_variances(initial_log_variances: Any, num_tasks: int,
                                 coefficients: np.ndarray) -> Any:
  values = base.check_task_vector("initial_log_variances",
                                  initial_log_variances, num_tasks)
  if isinstance(values, np.ndarray):
    with np.errstate(over="ignore"):
      weights = coefficients * np.exp(-values)
    if not np.all(np.isfinite(weights) & (weights > 0)):
      raise ValueError(
          "initial_log_variances must give weights c·exp(-s) finite and "
          f"positive in float32, got {initial_log_variances!r}.")
  return values
