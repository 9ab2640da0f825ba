"""PCGrad: project each task gradient off the gradients it conflicts with."""

from typing import NamedTuple

import chex
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import solvers
from optax_mtl._src import step
from optax_mtl._src.weighting._helpers import gradient_surgery


class PcgradState(NamedTuple):
  """State of :func:`pcgrad`."""

  weights: chex.Array  # f32[T], the weights applied last (Σ_i a_i).
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  key: chex.Array  # u32[...], raw key data (jax.random.key_data).


def _pcgrad_weights(gramian: chex.Array, orders: chex.Array) -> chex.Array:
  """The PCGrad weights ``Σ_i a_i`` for fixed visiting orders.

  GradVac's loop with the target cosine 0
  (:func:`~optax_mtl._src.weighting._helpers.gradient_surgery.surgery_coefficients`).
  The coefficients are ratios of entries of G: G is first divided by a
  power of two (exactly), so they do not depend on the common scale of the
  gradients and nothing underflows or overflows on the way.
  """
  gramian, _ = solvers.scale_by_power_of_two(gramian)
  coefficients, _ = gradient_surgery.surgery_coefficients(
      gramian, jnp.zeros_like(gramian), orders, beta=0.0, fixed_target=0.0)
  return jnp.sum(coefficients, axis=0)


@deprecation.renamed_arguments(old_positional=("num_tasks", "seed"))
def pcgrad(
    num_tasks: int,
    *,
    seed: int = 0,
) -> base.MultiTaskStrategy:
  r"""PCGrad ("gradient surgery"): conflicting components projected away.

  For every task :math:`i`, starting from :math:`g_i^{PC} = g_i`, the other
  tasks :math:`j \ne i` are visited in a random order and

  .. math::
    g_i^{PC} \leftarrow g_i^{PC} - \frac{g_i^{PC} \cdot g_j}{\lVert g_j
    \rVert^2}\, g_j \quad \text{if } g_i^{PC} \cdot g_j < 0,
    \qquad d = \sum_{i=1}^{T} g_i^{PC}.

  Every :math:`g_i^{PC}` is a combination :math:`a_i^\top J` of the task
  gradients, so the projections only need the Gramian
  (:math:`g_i^{PC} \cdot g_j = a_i^\top G e_j`) and the weights are
  :math:`w = \sum_i a_i`. Each task draws its own order, fresh at every
  step, from a PRNG key kept in the state (``key``, raw key data). A
  task with a zero gradient is never projected onto. The coefficients are
  ratios of entries of G, computed on G divided by a power of two
  (exactly): the weights do not depend on the common scale of the
  gradients, and the update scales with them.

  This is :func:`optax_mtl.gradvac` with ``target=0.0``: the same loop on
  the Gramian and, for the same ``seed``, the same orders.

  A step with a non-finite loss or Gramian is counted in ``num_skipped``;
  the previous weights are applied and the key is not advanced.

  Args:
    num_tasks: the number of tasks T.
    seed: the seed of the random visiting orders, an integer in
      [-2**63, 2**64) (all 64 bits count); keyword-only (optax_mtl 0.1
      took it second, by position: still accepted, with a
      ``DeprecationWarning``).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.pcgrad(num_tasks=2)
    >>> task_grads = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> [round(u, 4) for u in update.tolist()]
    [0.5, 1.5]
    >>> [round(w, 4) for w in state.weights.tolist()]
    [2.0, 1.5]

  References:
    Yu, Kumar, Gupta, Levine, Hausman & Finn, `Gradient Surgery for
    Multi-Task Learning <https://arxiv.org/abs/2001.06782>`_, NeurIPS 2020.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  key_data = base.key_data_from_seed("seed", seed)

  def init():
    return PcgradState(
        **base.common_state_fields(num_tasks, gramian=True, gradients=True),
        key=jnp.asarray(key_data))

  def rule(task_losses, state, gramian):
    del task_losses
    key, orders_key = base.split_key(state.key)
    orders = gradient_surgery.random_orders(orders_key, num_tasks)
    weights = _pcgrad_weights(gramian, orders)
    return weights, state._replace(key=key)

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
      requires_positive_losses=False, gramian_degree=0))
