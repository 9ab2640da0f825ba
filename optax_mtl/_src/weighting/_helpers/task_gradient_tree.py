"""Small pytree helpers for the strategies that keep per-task gradients.

Their state holds statistics shaped like the params with a leading task
axis (``[T, *leaf.shape]``, float32 or the gradient's wider dtype).
"""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from optax_mtl._src import tree as tree_lib


class GradientAverageState(NamedTuple):
  """The state of a strategy that keeps a moving average of every task's
  gradient (``moco``'s ``MocoState``, ``db_mtl``'s ``DbMtlState``)."""

  weights: chex.Array  # f32[T] (f64 under x64 for moco), applied last.
  num_skipped: chex.Array  # i32[], rejected steps.
  num_rejected_gradients: chex.Array  # i32[T], non-finite gradients per task.
  gradient_average: Any  # params-shaped, leading task axis (≥ f32).
  num_steps: chex.Array  # i32[], accepted steps t (saturates).


def init_gradient_average(state_type, params: Any, num_tasks: int,
                          fields: dict[str, Any]) -> GradientAverageState:
  """``state_type`` with zero averages shaped like ``params``, step 0 and
  the common ``fields``."""
  return state_type(
      **fields, gradient_average=zeros_per_task(params, num_tasks),
      num_steps=jnp.zeros([], jnp.int32))


def decaying_step(step_size: float, sigma: float, num_steps: chex.Array,
                  dtype: Any) -> chex.Array:
  """``step_size / t^sigma`` at step ``t = num_steps``, in ``dtype``."""
  return step_size / num_steps.astype(dtype) ** sigma


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


def scale_per_task(scales: chex.Array, tree: Any) -> Any:
  """``scales[k] · x_k`` for every task slice."""
  return jax.tree.map(
      lambda leaf: leaf * jnp.reshape(scales.astype(leaf.dtype),
                                      (-1,) + (1,) * (leaf.ndim - 1)), tree)


def combine(weights: chex.Array, tree: Any, like: Any) -> Any:
  """``Σ_k weights[k] · x_k`` (:func:`optax_mtl._src.tree.combine`) in the
  dtype of ``like``'s leaves.

  ``like`` is the per-task gradient tree: its non-float leaves (float0
  gradients of integer parameters, None in ``tree``) pass through as
  ``like[0]``.
  """
  combined = tree_lib.combine(weights, tree)
  return jax.tree.map(
      lambda summed, reference: reference[0] if summed is None
      else summed.astype(reference.dtype),
      combined, like, is_leaf=lambda x: x is None)
