"""GradDrop: per-coordinate sign dropout of the task gradients."""

from typing import Callable, NamedTuple, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

from optax_mtl._src import base
from optax_mtl._src import step


class GraddropState(NamedTuple):
  """State of :func:`graddrop`."""

  weights: chex.Array  # f32[T], ones (GradDrop has no task weights).
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  key: chex.Array  # u32[2], the raw key of the next step's uniforms.


def graddrop(
    num_tasks: int,
    leak: Union[float, Sequence[float]] = 0.0,
    *,
    batch_axis: Optional[int] = None,
    purity_fn: Optional[Callable[[chex.Array], chex.Array]] = None,
    seed: int = 0,
) -> base.MultiTaskStrategy:
  r"""GradDrop: keeps, at each coordinate, the gradients of one sign only.

  With :math:`g_k` task k's gradient (every leaf, coordinate by coordinate),

  .. math::
    P = \tfrac12 \Bigl(1 + \frac{\sum_k g_k}{\sum_k |g_k|}\Bigr), \qquad
    U \sim \mathcal U[0, 1], \\
    M_k = \mathbb 1[f(P) > U]\,\mathbb 1[g_k > 0]
        + \mathbb 1[f(P) < U]\,\mathbb 1[g_k < 0], \qquad
    d = \sum_k \bigl(\ell_k + (1 - \ell_k) M_k\bigr)\, g_k,

  where :math:`P` is the *positive sign purity* (½ where every gradient is
  zero), :math:`f` is ``purity_fn`` (identity by default) and
  :math:`\ell_k` the leak of task k (0: pure GradDrop, 1: plain sum). A
  coordinate where the tasks agree in sign keeps all their gradients; where
  they conflict, one sign is kept at random, with probability given by the
  purity.

  Placement: on the parameters' gradients (torchjd's placement), or, with
  ``optax_mtl.value_and_grad(..., encoder_fn=...)``, on the gradients with
  respect to the shared representation (the paper's and LibMTL's
  placement); there set ``batch_axis=0`` to compute the purity and each
  task's sign from its gradient summed over the batch, as the paper
  (Algorithm 1) and LibMTL do: the drop mask is shared across the batch, so
  a task's samples at a feature are kept or dropped together. Cost: the
  per-task Jacobian (T × params memory), or T gradients of the
  representation.

  A step with a non-finite loss or gradient returns a zero update, keeps the
  key and is counted in ``num_skipped``. Zero and negative losses are
  ordinary values.

  Args:
    num_tasks: the number of tasks T.
    leak: ℓ, a number in [0, 1] or one per task (the paper's leak
      parameters; default 0 as in the paper's main experiments and LibMTL).
    batch_axis: None (every coordinate on its own), or the axis of each
      gradient leaf (after the task axis) to sum over for the purity.
    purity_fn: f, a monotone map of [0, 1] to itself applied to the purity
      (torchjd's ``f``; None: identity).
    seed: the seed of the random uniforms, an integer.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.graddrop(num_tasks=2)
    >>> task_grads = jnp.array([[1.0, 2.0], [3.0, -2.0]])
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> float(update[0])  # Same sign: both kept.
    4.0
    >>> float(update[1]) in (2.0, -2.0)  # Opposite signs: one kept.
    True

  References:
    Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, `Just Pick a
    Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout
    <https://arxiv.org/abs/2010.06808>`_, NeurIPS 2020.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  leaks = _check_leak(leak, num_tasks)
  if purity_fn is not None and not callable(purity_fn):
    raise ValueError(f"purity_fn must be callable or None, got {purity_fn!r}.")
  if batch_axis is not None and (
      isinstance(batch_axis, (bool, np.bool_))
      or not isinstance(batch_axis, (int, np.integer)) or batch_axis < 0):
    raise ValueError(
        f"batch_axis must be None or an integer >= 0, got {batch_axis!r}.")
  key_data = base.key_data_from_seed("seed", seed)

  def init(params):
    del params
    return GraddropState(
        **base.common_state_fields(num_tasks, gradients=True),
        key=jnp.asarray(key_data))

  def rule(task_losses, state, task_grads):
    del task_losses
    next_key, key = base.split_key(state.key)
    leaves, treedef = jax.tree.flatten(task_grads)
    keys = jax.random.split(key, len(leaves))
    dropped = [_drop_leaf(leaf, leaf_key, leaks, purity_fn, batch_axis)
               for leaf, leaf_key in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, dropped), state._replace(key=next_key)

  return step.as_gradient_transformation(base.GradientRule(
      num_tasks=num_tasks, init=init, rule=rule,
      requires_positive_losses=False, name="graddrop"))


def _drop_leaf(task_grads, key, leaks, purity_fn, batch_axis):
  """GradDrop on one leaf ``[T, *shape]``; returns ``[*shape]``."""
  if not jnp.issubdtype(task_grads.dtype, jnp.inexact):
    return task_grads[0]  # float0: an integer parameter.
  grads = task_grads.astype(jnp.promote_types(task_grads.dtype, jnp.float32))
  summed = grads
  if batch_axis is not None:
    if batch_axis >= grads.ndim - 1:
      raise ValueError(
          f"batch_axis={batch_axis} is out of range for a gradient leaf of "
          f"shape {task_grads.shape[1:]}.")
    summed = jnp.sum(grads, axis=batch_axis + 1, keepdims=True)
  total = jnp.sum(summed, axis=0)
  magnitude = jnp.sum(jnp.abs(summed), axis=0)
  purity = 0.5 * (1.0 + jnp.where(
      magnitude > 0, total / jnp.where(magnitude > 0, magnitude, 1.0), 0.0))
  if purity_fn is not None:
    purity = purity_fn(purity)
  uniforms = jax.random.uniform(key, purity.shape, purity.dtype)
  keep_positive = purity > uniforms
  keep_negative = purity < uniforms
  # The sign test reads the same gradients as the purity: with batch_axis,
  # task k's batch sum, so its mask is shared by all its samples (Chen et
  # al. 2020, Algorithm 1): a task is kept or dropped whole.
  mask = (keep_positive[None] & (summed > 0)) | (keep_negative[None] & (
      summed < 0))
  leak = jnp.reshape(jnp.asarray(leaks, grads.dtype),
                     (-1,) + (1,) * (grads.ndim - 1))
  kept = (leak + (1.0 - leak) * mask.astype(grads.dtype)) * grads
  return jnp.sum(kept, axis=0).astype(task_grads.dtype)


def _check_leak(leak, num_tasks: int):
  return base.check_task_vector("leak", leak, num_tasks, 0.0, 1.0)
