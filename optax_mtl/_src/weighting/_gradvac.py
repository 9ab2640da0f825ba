"""GradVac: task gradients pulled towards moving target cosines."""

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import step
from optax_mtl._src import tree as tree_lib
from optax_mtl._src.weighting._helpers import gradient_surgery

GROUPS = ("model", "leaf")


class GradvacState(NamedTuple):
  """State of :func:`gradvac`."""

  weights: chex.Array  # f32[T], Σ_i of the coefficient rows (whole model).
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  gradient_cosines: chex.Array  # f32[T, T], cosines of the task gradients.
  target_cosines: chex.Array  # f32[T, T] ("model") or f32[L, T, T] ("leaf").
  key: chex.Array  # u32[2], the raw key of the next step's random orders.


def gradvac(
    num_tasks: int,
    beta: float = 0.5,
    *,
    target: Optional[float] = None,
    groups: str = "model",
    seed: int = 0,
) -> base.MultiTaskStrategy:
  r"""Gradient Vaccine: each task gradient pulled towards a target cosine.

  For each task i (its gradient :math:`g'_i` starting at :math:`g_i`) and
  each other task j in a random order, with :math:`\phi_{ij} =
  \cos(g'_i, g_j)` and the target :math:`\hat\phi_{ij}`,

  .. math::
    \text{if } \phi_{ij} < \hat\phi_{ij}: \quad
    g'_i \leftarrow g'_i + \frac{\lVert g'_i \rVert \bigl(\hat\phi_{ij}
      \sqrt{1 - \phi_{ij}^2} - \phi_{ij} \sqrt{1 - \hat\phi_{ij}^2}\bigr)}
      {\lVert g_j \rVert \sqrt{1 - \hat\phi_{ij}^2}}\, g_j, \qquad
    \hat\phi_{ij} \leftarrow (1 - \beta) \hat\phi_{ij} + \beta\, \phi_{ij},

  and the update is :math:`\sum_i g'_i`. The targets start at 0 (so the
  first steps act as PCGrad) and follow the observed cosines; ``target``
  fixes them instead (torchjd's option): ``target=0.0`` is
  :func:`optax_mtl.pcgrad` exactly (the same loop, the same random orders
  for the same ``seed``). Every :math:`g'_i` stays in the
  span of the task gradients, so the whole-model variant is a weight rule
  on the Gramian (coefficients tracked through the loop).

  ``groups="leaf"`` applies GradVac to every parameter tensor separately
  (LibMTL's ``all_matrix`` granularity), each with its own targets; this
  reads the per-task gradients themselves (a Gramian per leaf), so it costs
  the per-task Jacobian.

  A step with a non-finite loss or gradient keeps the targets and the key
  (``num_skipped``); zero and negative losses are ordinary values.

  Defaults: β = 0.5 and whole-model groups, as LibMTL (the paper tunes β).

  Args:
    num_tasks: the number of tasks T.
    beta: β in [0, 1], the weight of the newest cosine in the targets.
    target: None (moving targets) or a constant target cosine in [-1, 1).
    groups: ``"model"`` or ``"leaf"``.
    seed: the seed of the random orders.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.gradvac(num_tasks=2, target=0.0)
    >>> task_grads = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> [round(u, 4) for u in update.tolist()]  # As PCGrad with target 0.
    [0.5, 1.5]

  References:
    Wang, Tsvetkov, Firat & Cao, `Gradient Vaccine: Investigating and
    Improving Multi-task Optimization in Massively Multilingual Models
    <https://arxiv.org/abs/2010.05874>`_, ICLR 2021 (Algorithm 1).
  """
  num_tasks = base.check_num_tasks(num_tasks)
  beta = base.check_in_range("beta", beta, 0.0, 1.0)
  if target is not None:
    target = base.check_in_range("target", target, -1.0, 1.0,
                                 high_inclusive=False)
  if groups not in GROUPS:
    raise ValueError(f"groups must be one of {GROUPS}, got {groups!r}.")
  key_data = base.key_data_from_seed("seed", seed)

  def initial_state(target_shape):
    return GradvacState(
        **base.common_state_fields(num_tasks, gramian=True, gradients=True),
        target_cosines=jnp.zeros(target_shape, jnp.float32),
        key=jnp.asarray(key_data))

  def next_orders(state):
    next_key, key = base.split_key(state.key)
    return gradient_surgery.random_orders(key, num_tasks), next_key

  if groups == "model":

    def init():
      return initial_state((num_tasks, num_tasks))

    def rule(task_losses, state, gramian):
      del task_losses
      orders, key = next_orders(state)
      coefficients, targets = gradient_surgery.surgery_coefficients(
          gramian, state.target_cosines, orders, beta, target)
      return jnp.sum(coefficients, axis=0), state._replace(
          target_cosines=targets.astype(jnp.float32), key=key)

    return step.as_gradient_transformation(base.Weighting(
        num_tasks=num_tasks, needs=base.Needs.GRAMIAN, init=init, rule=rule,
        requires_positive_losses=False, gramian_degree=0))

  def init_per_leaf(params):
    num_leaves = len([leaf for leaf in jax.tree.leaves(params)
                      if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)])
    return initial_state((num_leaves, num_tasks, num_tasks))

  def rule_per_leaf(task_losses, state, task_grads):
    del task_losses
    orders, key = next_orders(state)
    leaves, treedef = jax.tree.flatten(task_grads)
    float_leaves = [leaf for leaf in leaves
                    if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    if len(float_leaves) != state.target_cosines.shape[0]:
      raise ValueError(
          f"gradvac(groups='leaf') was initialised for "
          f"{state.target_cosines.shape[0]} parameter leaves, got "
          f"{len(float_leaves)}: call init with the params.")
    updates, targets, gramians = [], [], []
    index = 0
    for leaf in leaves:
      if not jnp.issubdtype(leaf.dtype, jnp.inexact):
        updates.append(leaf[0])
        continue
      gramians.append(tree_lib.gramian(leaf))
      coefficients, leaf_targets = gradient_surgery.surgery_coefficients(
          gramians[-1], state.target_cosines[index], orders, beta, target)
      updates.append(tree_lib.combine(jnp.sum(coefficients, axis=0), leaf))
      targets.append(leaf_targets.astype(jnp.float32))
      index += 1
    return jax.tree.unflatten(treedef, updates), state._replace(
        target_cosines=jnp.stack(targets), key=key,
        gradient_cosines=tree_lib.cosine_matrix(sum(gramians)).astype(
            jnp.float32))

  return step.as_gradient_transformation(base.GradientRule(
      num_tasks=num_tasks, init=init_per_leaf, rule=rule_per_leaf,
      requires_positive_losses=False, state_like_params=True,
      name="gradvac(groups='leaf')"))
