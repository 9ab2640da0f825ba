"""Trimmed mean: the coordinate-wise mean without the extreme task gradients."""

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from optax_mtl._src import base
from optax_mtl._src import step


class TrimmedMeanState(NamedTuple):
  """State of :func:`trimmed_mean`."""

  weights: chex.Array  # f32[T], ones (no task weights).
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.


def trimmed_mean(num_tasks: int, trim_number: int = 1) -> base.MultiTaskStrategy:
  r"""Coordinate-wise trimmed mean of the task gradients.

  At every coordinate, the T task gradients are sorted, the ``trim_number``
  largest and the ``trim_number`` smallest are dropped, and the update is
  the mean of the :math:`T - 2m` values left:

  .. math::
    d_j = \frac{1}{T - 2m} \sum_{i=m+1}^{T-m} g_{(i), j},

  with :math:`g_{(1), j} \le \dots \le g_{(T), j}` the sorted values at
  coordinate j. A robust aggregator (torchjd's ``TrimmedMean``): no task
  can move a coordinate beyond the range of the others. It costs the
  per-task Jacobian (T × params memory) and a sort along the task axis.

  A step with a non-finite loss or gradient returns a zero update and is
  counted in ``num_skipped``. Zero and negative losses are ordinary values.

  Args:
    num_tasks: the number of tasks T.
    trim_number: m, the values dropped at each end (an integer >= 0 with
      ``2m < T``).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.trimmed_mean(num_tasks=3, trim_number=1)
    >>> task_grads = jnp.array([[1.0, -5.0], [2.0, 0.0], [100.0, 1.0]])
    >>> update, _ = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(3))
    >>> update.tolist()
    [2.0, 0.0]

  References:
    Yin, Chen, Ramchandran & Bartlett, `Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates
    <https://arxiv.org/abs/1803.01498>`_, ICML 2018 (the coordinate-wise
    trimmed mean); torchjd's ``TrimmedMean``.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  if (isinstance(trim_number, (bool, np.bool_))
      or not isinstance(trim_number, (int, np.integer))
      or trim_number < 0 or 2 * trim_number >= num_tasks):
    raise ValueError(
        f"trim_number must be an integer >= 0 with 2 * trim_number < "
        f"num_tasks = {num_tasks}, got {trim_number!r}.")

  trim_number = int(trim_number)

  def init(params):
    del params
    return TrimmedMeanState(**base.common_state_fields(num_tasks,
                                                       gradients=True))

  def rule(task_losses, state, task_grads):
    del task_losses
    return jax.tree.map(_trimmed_leaf_mean, task_grads), state

  def _trimmed_leaf_mean(leaf):
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      return leaf[0]  # float0: an integer parameter.
    ordered = jnp.sort(leaf, axis=0)
    kept = ordered[trim_number:num_tasks - trim_number]
    return jnp.mean(kept.astype(jnp.promote_types(leaf.dtype, jnp.float32)),
                    axis=0).astype(leaf.dtype)

  return step.as_gradient_transformation(base.GradientRule(
      num_tasks=num_tasks, init=init, rule=rule,
      requires_positive_losses=False, name="trimmed_mean"))
