"""Small pytree helpers for the strategies that keep per-task gradients.

Their state holds statistics shaped like the params with a leading task
axis (``[T, *leaf.shape]``, float32 or the gradient's wider dtype).
"""

from typing import Any

import chex
import jax
import jax.numpy as jnp

from optax_mtl._src import tree as tree_lib


def _is_float(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def zeros_per_task(params: Any, num_tasks: int) -> Any:
  """Zeros ``[T, *shape]`` (at least float32) for every float leaf."""
  def zeros(leaf):
    dtype = jnp.promote_types(jnp.result_type(leaf), jnp.float32)
    return jnp.zeros((num_tasks,) + jnp.shape(leaf), dtype)
  return jax.tree.map(zeros, _float_leaves_only(params))


def _float_leaves_only(params: Any) -> Any:
  """``params`` with non-float leaves (integer counters) replaced by None."""
  return jax.tree.map(lambda leaf: leaf if _is_float(leaf) else None, params)


def float_part(task_grads: Any) -> Any:
  """The float leaves of ``task_grads``, as float32 (or wider), None elsewhere."""
  return jax.tree.map(
      lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32))
      if _is_float(g) else None, task_grads)


def per_task_sum(tree: Any) -> chex.Array:
  """``Σ`` over every coordinate of every leaf, per task: shape [T]."""
  leaves = [jnp.reshape(leaf, (leaf.shape[0], -1)).sum(axis=1)
            for leaf in jax.tree.leaves(tree)]
  return sum(leaves[1:], leaves[0])


def per_task_sq_norms(tree: Any) -> chex.Array:
  """``‖x_k‖²`` of every task's slice: shape [T]."""
  return per_task_sum(jax.tree.map(jnp.square, tree))


def per_task_norms(tree: Any) -> chex.Array:
  """``‖x_k‖`` of every task's slice: shape [T], without the squares
  underflowing or overflowing (the slices are divided by a power of two
  first, exactly)."""
  exponent = tree_lib.power_of_two_exponent(tree)
  return jnp.ldexp(jnp.sqrt(per_task_sq_norms(
      tree_lib.scale_by(tree, exponent))), exponent)


def gramian(tree: Any) -> chex.Array:
  """``Y Yᵀ`` of the per-task slices: shape [T, T]."""
  flats = [jnp.reshape(leaf, (leaf.shape[0], -1)) for leaf in jax.tree.leaves(tree)]
  return sum(f @ f.T for f in flats[1:]) + flats[0] @ flats[0].T


def scale_per_task(scales: chex.Array, tree: Any) -> Any:
  """``scales[k] · x_k`` for every task slice."""
  return jax.tree.map(
      lambda leaf: leaf * jnp.reshape(scales.astype(leaf.dtype),
                                      (-1,) + (1,) * (leaf.ndim - 1)), tree)


def combine(weights: chex.Array, tree: Any, like: Any) -> Any:
  """``Σ_k weights[k] · x_k`` in the dtype of ``like``'s leaves.

  ``like`` is the per-task gradient tree: its non-float leaves (float0
  gradients of integer parameters) pass through as ``like[0]``.
  """
  def one(leaf, reference):
    if leaf is None:
      return reference[0]
    summed = jnp.tensordot(weights.astype(leaf.dtype), leaf, axes=1)
    return summed.astype(reference.dtype)
  return jax.tree.map(one, tree, like, is_leaf=lambda x: x is None)
