"""Equal weighting: the plain sum (or mean) of the task losses."""

from typing import NamedTuple

import chex
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import step


class EqualState(NamedTuple):
  """State of :func:`equal`."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], steps with a non-finite loss.


@deprecation.renamed_arguments(old_positional=("num_tasks", "mean"))
def equal(num_tasks: int, *, mean: bool = False) -> base.MultiTaskStrategy:
  r"""Equal weighting: the gradient of the plain sum of the task losses.

  .. math::
    L = \sum_{k=1}^{T} w_k L_k, \qquad w_k = 1 \quad (\text{or } 1/T
    \text{ with } \texttt{mean=True}).

  This is the baseline every other strategy is compared with. LibMTL's
  ``EW`` and torchjd's ``Sum`` are ``equal(T)``; torchjd's ``Mean`` is
  ``equal(T, mean=True)``. A step with a
  non-finite loss is counted in ``num_skipped``; the weights stay the same.

  Args:
    num_tasks: the number of tasks T.
    mean: average the losses instead of summing them.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.equal(num_tasks=2)
    >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 3.0]])
    >>> state = strategy.init(jnp.zeros(2))
    >>> update, state = strategy.update(
    ...     task_grads, state, task_losses=jnp.array([0.5, 2.0]))
    >>> update.tolist()
    [1.0, 3.0]
  """
  num_tasks = base.check_num_tasks(num_tasks)
  mean = base.check_bool("mean", mean)
  value = 1.0 / num_tasks if mean else 1.0

  def init():
    return EqualState(**base.common_state_fields(num_tasks, value))

  def rule(task_losses, state, gramian):
    del gramian
    return jnp.full_like(task_losses, value), state

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=False))
