"""Shared pieces of the double-sampling strategies (MoDo, SDMGrad), and the
dtype of the iterates that the per-task-gradient strategies keep between
steps (MoDo, SDMGrad, MoCo, ExcessMTL)."""

import chex
import jax
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import tree as tree_lib


def iterate_dtype() -> jnp.dtype:
  """The dtype of an iterate kept in the state between steps (λ, w).

  The default float: float32, or float64 under ``jax_enable_x64``, so that
  a float64 run carries its recursion in float64. Fixed at init, so the
  state's dtypes never change between steps.
  """
  return jnp.dtype(jnp.result_type(float))


def iterate_fields(num_tasks: int) -> dict[str, jax.Array]:
  """``common_state_fields`` with ``weights = 1/T`` in :func:`iterate_dtype`."""
  fields = base.common_state_fields(num_tasks, 1.0 / num_tasks,
                                   gradients=True)
  # 1/T rounded in the iterate's dtype, not through float32.
  fields["weights"] = jnp.full((num_tasks,), 1.0 / num_tasks, iterate_dtype())
  return fields


def cross_gramian(task_grads, first: int, second: int, *,
                  scaled: bool = False) -> chex.Array:
  """``J_a J_bᵀ`` ([T, T]) of minibatches ``a`` and ``b`` (float leaves).

  With ``scaled``, ``J_a J_bᵀ / 4^e`` from the gradients divided by a power
  of two ``2^e`` (their largest entry in ``[½, 1)``), so that the products
  neither underflow nor overflow: for a rule that reads the cross-Gramian
  only up to a positive factor.
  """
  if scaled:
    task_grads = tree_lib.scale_by(
        task_grads, tree_lib.power_of_two_exponent(task_grads))
  total = None
  for leaf in jax.tree.leaves(task_grads):
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      continue
    num_tasks = leaf.shape[1]
    dtype = jnp.promote_types(leaf.dtype, jnp.float32)
    rows_a = jnp.reshape(leaf[first], (num_tasks, -1)).astype(dtype)
    rows_b = jnp.reshape(leaf[second], (num_tasks, -1)).astype(dtype)
    product = tree_lib.row_products(rows_a, rows_b, dtype)
    total = product if total is None else total + product
  return total


def combine_sample(weights: chex.Array, task_grads, sample: int):
  """``Σ_k w_k J_sample[k]`` (:func:`optax_mtl._src.tree.combine`)."""
  return tree_lib.combine(
      weights, jax.tree.map(lambda leaf: leaf[sample], task_grads))


def scale_of(gramian: chex.Array) -> chex.Array:
  """A positive scale of a (cross-)Gramian: its largest absolute entry."""
  largest = jnp.max(jnp.abs(gramian))
  return jnp.where(largest > 0, largest, 1)
