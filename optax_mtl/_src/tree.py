"""Pytree helpers: the task axis, the Gramian of a Jacobian, the combine."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp


def check_task_axis(task_tree: Any, num_tasks: int, name: str) -> None:
  """Raises ValueError unless every leaf has a leading axis of num_tasks."""
  leaves = jax.tree_util.tree_leaves_with_path(task_tree)
  if not leaves:
    raise ValueError(f"{name} has no array leaves.")
  for path, leaf in leaves:
    shape = jnp.shape(leaf)
    if len(shape) < 1 or shape[0] != num_tasks:
      raise ValueError(
          f"{name} must have a leading task axis of size {num_tasks} on every "
          f"leaf, got shape {shape} at {jax.tree_util.keystr(path)}.")


def filter_mask(gramian_filter: Any, params: Any, task_grads: Any) -> Any:
  """Resolves a Gramian filter into a pytree of bools shaped like task_grads.

  Args:
    gramian_filter: None (every parameter), a pytree of bools with the
      structure of the params, or a callable ``params -> pytree of bools``.
    params: the parameters, or None (the optax face may not receive them).
    task_grads: the per-task gradients, leading task axis.

  Returns:
    A pytree of Python bools with the structure of ``task_grads``.
  """
  if gramian_filter is None:
    return jax.tree.map(lambda _: True, task_grads)
  if callable(gramian_filter):
    if params is None:
      params = jax.tree.map(lambda g: g[0], task_grads)
    gramian_filter = gramian_filter(params)
  grads_def = jax.tree.structure(task_grads)
  mask_leaves = jax.tree.leaves(gramian_filter)
  if len(mask_leaves) != grads_def.num_leaves:
    raise ValueError(
        "gramian_filter must give one bool per parameter leaf "
        f"({grads_def.num_leaves} leaves), got {len(mask_leaves)} leaves.")
  mask = jax.tree.unflatten(grads_def, [bool(m) for m in mask_leaves])
  if not any(jax.tree.leaves(mask)):
    raise ValueError("gramian_filter selects no parameter at all.")
  return mask


def gramian(task_grads: Any, mask: Any = None) -> chex.Array:
  """Returns ``G = J Jᵀ`` (float32[T, T]) summed leaf by leaf.

  Args:
    task_grads: a pytree whose leaves have a leading task axis of size T.
    mask: an optional pytree of bools (same structure): leaves marked False
      are left out (e.g. task-specific heads).
  """
  leaves = jax.tree.leaves(task_grads)
  mask_leaves = ([True] * len(leaves) if mask is None
                 else jax.tree.leaves(mask))
  num_tasks = leaves[0].shape[0]
  total = jnp.zeros((num_tasks, num_tasks), jnp.float32)
  for leaf, keep in zip(leaves, mask_leaves):
    if not keep:
      continue
    flat = jnp.reshape(leaf, (num_tasks, -1))
    total += jnp.matmul(flat, flat.T, precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
  return total


def combine(weights: chex.Array, task_grads: Any) -> Any:
  """Returns ``Σ_k weights[k] · task_grads[k]``, each leaf in its own dtype."""

  def weighted_sum(leaf):
    summed = jnp.tensordot(weights.astype(jnp.float32), leaf, axes=1,
                           precision=jax.lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)
    return summed.astype(leaf.dtype)

  return jax.tree.map(weighted_sum, task_grads)


def cosine_matrix(gramian_matrix: chex.Array) -> chex.Array:
  """Pairwise cosine similarities of the task gradients, from the Gramian."""
  norms = jnp.sqrt(jnp.clip(jnp.diag(gramian_matrix), min=0.0))
  denom = jnp.outer(norms, norms)
  return jnp.where(denom > 0, gramian_matrix / jnp.where(denom > 0, denom, 1.0),
                   0.0)
