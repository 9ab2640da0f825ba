"""Constant weighting: fixed weights given by the user."""

from typing import Any, NamedTuple, Sequence

import chex
import jax.numpy as jnp
import numpy as np

from optax_mtl._src import base
from optax_mtl._src import step


class ConstantState(NamedTuple):
  """State of :func:`constant`."""

  weights: chex.Array  # f32[T], the given weights (applied at every step).
  num_skipped: chex.Array  # i32[], rejected steps.


def constant(
    num_tasks: int,
    weights: Sequence[float],
) -> base.MultiTaskStrategy:
  r"""Constant weighting: the same user-given weights at every step.

  .. math::
    d = \sum_{k=1}^{T} w_k\, g_k, \qquad w \text{ fixed}.

  Like every factory, ``constant`` takes ``num_tasks`` first, so that code
  that builds strategies as ``factory(num_tasks, **kwargs)`` (the benchmark
  and test tables, ``optax.inject_hyperparams``) builds it too;
  ``len(weights)`` must equal it, which also catches a weight list of the
  wrong length. torchjd's ``Constant`` infers the number of tasks from the
  weights instead. The weights may be any finite numbers,
  zero and negative ones included, as torchjd's ``Constant`` allows; they
  are stored in float32 and not normalised (``constant(T, [1.0] * T)`` is
  :func:`optax_mtl.equal`).

  A step with a non-finite loss is counted in ``num_skipped``, as for every
  strategy; the weights do not change. Zero and negative losses are
  accepted (the weights do not depend on the losses).

  Args:
    num_tasks: the number of tasks T.
    weights: a 1-D sequence or array of T finite numbers.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.constant(2, [0.25, 2.0])
    >>> task_grads = jnp.array([[4.0, 0.0], [0.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.array([3.0, 1.0]))
    >>> update.tolist(), state.weights.tolist()
    ([1.0, 2.0], [0.25, 2.0])

  References:
    Quinton & Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024 (torchjd's ``Constant``
    aggregator).
  """
  num_tasks = base.check_num_tasks(num_tasks)
  values = base.check_task_vector("weights", weights, num_tasks,
                                  allow_scalar=False)
  # Checked; applied in the losses' dtype (float64 under x64), unrounded.
  exact = (np.asarray(weights, np.float64) if isinstance(values, np.ndarray)
           else values)

  def init():
    return ConstantState(**base.common_state_fields(num_tasks, values))

  def rule(task_losses, state, gramian):
    del gramian
    return jnp.asarray(exact, task_losses.dtype), state

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=False))
