"""Krum: the task gradients closest to their neighbours (Byzantine-robust)."""

from typing import NamedTuple

import chex
import jax.numpy as jnp
import numpy as np

from optax_mtl._src import base
from optax_mtl._src import step


class KrumState(NamedTuple):
  """State of :func:`krum`."""

  weights: chex.Array  # f32[T], 1/m on the selected tasks, 0 elsewhere.
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.


def krum_weights(gramian: chex.Array, num_byzantine: int,
                 num_selected: int) -> chex.Array:
  """Weights 1/m on the m gradients of lowest Krum score (ties: lowest index)."""
  num_tasks = gramian.shape[0]
  diagonal = jnp.diagonal(gramian)
  distances = jnp.maximum(diagonal[:, None] + diagonal[None, :] - 2 * gramian,
                          0)
  # Each task's own distance (0) is pushed past every other one.
  distances = jnp.where(jnp.eye(num_tasks, dtype=bool), jnp.inf, distances)
  num_neighbours = num_tasks - num_byzantine - 2
  nearest = jnp.sort(distances, axis=1)[:, :num_neighbours]
  scores = jnp.sum(nearest, axis=1)
  selected = jnp.argsort(scores, stable=True)[:num_selected]
  return jnp.zeros((num_tasks,), gramian.dtype).at[selected].set(
      1.0 / num_selected)


def krum(num_tasks: int, num_byzantine: int = 0,
         num_selected: int = 1) -> base.MultiTaskStrategy:
  r"""Krum and multi-Krum: the mean of the most central task gradients.

  With :math:`f` = ``num_byzantine``, the score of task i is the sum of its
  squared distances to its :math:`T - f - 2` nearest other gradients,

  .. math::
    s_i = \sum_{j \in N_i} \lVert g_i - g_j \rVert^2, \qquad
    \lVert g_i - g_j \rVert^2 = G_{ii} + G_{jj} - 2 G_{ij},

  and the update is the mean of the :math:`m` = ``num_selected`` gradients
  of lowest score (Krum for :math:`m = 1`, multi-Krum otherwise; ties go to
  the lower task index). A task whose gradient is far from every other
  (a corrupted or outlying task) is never selected while at most :math:`f`
  are. Computed from the Gramian.

  torchjd's ``Krum`` scores with distances, not squared distances (the
  paper's): the two may select different gradients, and no option here
  reproduces torchjd's choice.

  Steps with a non-finite loss or Gramian are counted in ``num_skipped`` and
  the previous weights applied; zero and negative losses are ordinary
  values.

  Args:
    num_tasks: the number of tasks T, at least ``num_byzantine + 3``.
    num_byzantine: f >= 0, the number of tasks that may be outliers.
    num_selected: m in [1, T], the number of gradients averaged.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`; its weights are ``1/m`` on the
    selected tasks and 0 elsewhere.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.krum(4, 1, 2)  # f = 1 outlier, m = 2 averaged.
    >>> task_grads = jnp.array([[1.0, 0.0], [1.1, 0.0], [0.9, 0.1],
    ...                         [-50.0, 9.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(4))
    >>> state.weights.tolist()
    [0.5, 0.5, 0.0, 0.0]

  References:
    Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017;
    torchjd's ``Krum``.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  if (isinstance(num_byzantine, (bool, np.bool_))
      or not isinstance(num_byzantine, (int, np.integer))
      or num_byzantine < 0 or num_tasks < num_byzantine + 3):
    raise ValueError(
        "num_byzantine must be an integer >= 0 with num_tasks >= "
        f"num_byzantine + 3 (num_tasks = {num_tasks}), got "
        f"{num_byzantine!r}.")
  if (isinstance(num_selected, (bool, np.bool_))
      or not isinstance(num_selected, (int, np.integer))
      or not 1 <= num_selected <= num_tasks):
    raise ValueError(
        f"num_selected must be an integer in [1, {num_tasks}], got "
        f"{num_selected!r}.")

  num_byzantine, num_selected = int(num_byzantine), int(num_selected)

  def init():
    return KrumState(**base.common_state_fields(
        num_tasks, 1.0 / num_selected, gramian=True, gradients=True))

  def rule(task_losses, state, gramian):
    del task_losses
    return krum_weights(gramian, num_byzantine, num_selected), state

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False, gramian_degree=0))
