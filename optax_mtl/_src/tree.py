"""Pytree helpers: the task axis, the Gramian of a Jacobian, the combine."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np


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


def shared_mask(shared: Any, params: Any) -> Any:
  """Resolves a declaration of the shared parameters into a mask of bools.

  Args:
    shared: None (every parameter is shared), a pytree of bools with the
      structure of ``params`` or a prefix of it (as ``optax.masked``
      accepts: ``{"trunk": True, "heads": False}`` for nested params), or a
      callable ``params -> such a pytree``.
    params: the parameters (or any pytree with their structure).

  Returns:
    A pytree of Python bools with the structure of ``params``.

  Raises:
    ValueError: the mask's structure is not a prefix of the params', a leaf
      is not a bool, or no parameter is shared.
  """
  if shared is None:
    return jax.tree.map(lambda _: True, params)
  if callable(shared):
    try:
      shared = shared(params)
    except TypeError as error:
      raise ValueError(
          "shared is a callable that could not be called as shared(params) "
          f"({error}). A Flax NNX filter (nnx.PathContains, a type, ...) "
          "selects parameters of a model: use optax_mtl.nnx.value_and_grad("
          "..., shared=filter), or optax_mtl.nnx.shared_mask(model, filter) "
          "for the optax face.") from error

  def is_flag(leaf):
    return isinstance(leaf, (bool, np.bool_))
  try:
    mask = jax.tree.map(
        lambda flag, subtree: jax.tree.map(lambda _: flag, subtree), shared,
        params, is_leaf=lambda x: is_flag(x) or x is None)
  except ValueError as error:
    raise ValueError(
        "shared must be a pytree of bools with the structure of the params "
        f"({jax.tree.structure(params)}) or a prefix of it, got "
        f"{jax.tree.structure(shared)}.") from error
  flags = jax.tree.leaves(shared)
  bad = [flag for flag in flags if not is_flag(flag)]
  if bad:
    raise ValueError(
        f"shared must hold Python bools (one per parameter or subtree), got "
        f"{bad[0]!r}.")
  mask = jax.tree.map(bool, mask)
  if not any(jax.tree.leaves(mask)):
    raise ValueError("shared selects no parameter at all.")
  return mask


def gramian(task_grads: Any, mask: Any = None) -> chex.Array:
  """Returns ``G = J Jᵀ`` ([T, T]) summed leaf by leaf.

  The Gramian is float32, or float64 when a leaf is float64. Leaves that are
  not floating point (the ``float0`` gradients of integer parameters) are
  left out.

  Args:
    task_grads: a pytree whose leaves have a leading task axis of size T.
    mask: an optional pytree of bools (same structure): leaves marked False
      are left out (e.g. task-specific heads).
  """
  leaves = jax.tree.leaves(task_grads)
  mask_leaves = ([True] * len(leaves) if mask is None
                 else jax.tree.leaves(mask))
  kept = [leaf for leaf, keep in zip(leaves, mask_leaves)
          if keep and _is_inexact(leaf)]
  num_tasks = leaves[0].shape[0]
  dtype = jnp.result_type(jnp.float32, *[leaf.dtype for leaf in kept])
  total = jnp.zeros((num_tasks, num_tasks), dtype)
  for leaf in kept:
    flat = jnp.reshape(leaf, (num_tasks, -1))
    total += row_products(flat, flat, dtype)
  return total


def row_products(first: chex.Array, second: chex.Array,
                 dtype: Any) -> chex.Array:
  """``first @ secondᵀ`` ([T, n] × [S, n] → [T, S]) in ``dtype``, at full
  precision (no TF32/bf16 passes on GPU): the one product behind every
  Gramian of the package (:func:`gramian`, the double-sampling
  cross-Gramian)."""
  return jnp.matmul(first, second.T, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=dtype, **_replicated_output(first))


class ScaledGramian(NamedTuple):
  """``G / 4^e`` and ``e``: the Gramian of the gradients divided by ``2^e``."""

  gramian: chex.Array  # [T, T], G / 4^e.
  exponent: chex.Array  # i32[], e.


def scaled_gramian(task_grads: Any, mask: Any = None) -> ScaledGramian:
  """``G / 4^e`` computed from the gradients divided by ``2^e``.

  ``2^e`` is the smallest power of two above the largest finite absolute
  entry of the (kept) gradients (``e = 0`` when they are all zero), so the
  products that form the Gramian neither underflow nor overflow: gradients
  of 1e-20 give the Gramian that gradients of 1 give, divided by an exact
  power of two, where :func:`gramian` would give zeros (1e-40 is below
  float32's normal range). Dividing by ``2^e`` is exact, so within the
  normal range ``4^e · (G / 4^e)`` is :func:`gramian`'s ``G`` bit for bit.

  Args:
    task_grads: as for :func:`gramian`.
    mask: as for :func:`gramian`.
  """
  leaves = jax.tree.leaves(task_grads)
  mask_leaves = ([True] * len(leaves) if mask is None
                 else jax.tree.leaves(mask))
  exponent = power_of_two_exponent(
      [leaf for leaf, keep in zip(leaves, mask_leaves) if keep])
  return ScaledGramian(gramian(scale_by(task_grads, exponent), mask), exponent)


def power_of_two_exponent(tree: Any) -> chex.Array:
  """i32[]: ``e`` with ``2^e`` the smallest power of two above the largest
  finite absolute entry of the float leaves of ``tree`` (0 if none)."""
  kept = [leaf for leaf in jax.tree.leaves(tree) if _is_inexact(leaf)]
  largest = jnp.zeros([], jnp.result_type(
      jnp.float32, *[leaf.dtype for leaf in kept]))
  for leaf in kept:
    magnitude = jnp.abs(leaf).astype(largest.dtype)
    largest = jnp.maximum(largest, jnp.max(
        jnp.where(jnp.isfinite(magnitude), magnitude, 0), initial=0))
  _, exponent = jnp.frexp(jnp.where(largest > 0, largest, 0.5))
  return exponent.astype(jnp.int32)


def scale_by(tree: Any, exponent: chex.Array) -> Any:
  """Every float leaf of ``tree`` divided by ``2^exponent`` (exact)."""
  return jax.tree.map(
      lambda leaf: jnp.ldexp(leaf, -exponent) if _is_inexact(leaf) else leaf,
      tree)


def _replicated_output(operand: chex.Array) -> dict[str, Any]:
  """``out_sharding`` for a product that sums over an explicitly sharded axis.

  Under ``jax.make_mesh``'s explicit axes, a contraction over a sharded axis
  (the batch axis of representation gradients, say) must name its output
  sharding; the T×T Gramian is replicated. Elsewhere nothing is needed.
  """
  sharding = getattr(jax.typeof(operand), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or all(axis is None for axis in spec):
    return {}
  return {"out_sharding": sharding.update(spec=jax.sharding.PartitionSpec())}


def _is_inexact(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def combine(weights: chex.Array, task_grads: Any, shared: Any = None) -> Any:
  """Returns ``Σ_k weights[k] · task_grads[k]``, each leaf in its own dtype.

  Args:
    weights: [T].
    task_grads: a pytree whose leaves have a leading task axis of size T.
    shared: an optional pytree of bools (same structure): the leaves marked
      False (task-specific parameters) receive the unweighted sum
      ``Σ_k task_grads[k]`` instead, i.e. their own task's gradient.
  """
  if shared is None:
    shared = jax.tree.map(lambda _: True, task_grads)

  def weighted_sum(leaf, is_shared):
    if not _is_inexact(leaf):
      return leaf[0]  # The float0 gradient of an integer parameter.
    leaf_weights = weights if is_shared else jnp.ones_like(weights)
    dtype = jnp.promote_types(leaf.dtype, jnp.float32)
    summed = jnp.tensordot(leaf_weights.astype(dtype), leaf, axes=1,
                           precision=jax.lax.Precision.HIGHEST,
                           preferred_element_type=dtype)
    return summed.astype(leaf.dtype)

  return jax.tree.map(weighted_sum, task_grads, shared)


def own_gradients_for_task_specific(update: Any, task_grads: Any,
                                    shared: Any) -> Any:
  """``update`` on the shared leaves; ``Σ_k task_grads[k]`` on the others."""
  if shared is None:
    return update
  own = combine(jnp.ones((jax.tree.leaves(task_grads)[0].shape[0],)),
                task_grads)
  return jax.tree.map(lambda keep, u, o: u if keep else o, shared, update, own)


def finite_tasks(task_grads: Any, task_axis: int = 0) -> chex.Array:
  """bool[T]: whether every float coordinate of task k's gradient is finite.

  ``task_axis`` is the position of the task axis on every leaf (1 for the
  ``[num_samples, T, ...]`` gradients of double sampling).
  """
  leaves = [leaf for leaf in jax.tree.leaves(task_grads) if _is_inexact(leaf)]
  num_tasks = jax.tree.leaves(task_grads)[0].shape[task_axis]
  finite = jnp.ones((num_tasks,), bool)
  for leaf in leaves:
    moved = jnp.moveaxis(jnp.isfinite(leaf), task_axis, 0)
    finite &= jnp.all(jnp.reshape(moved, (num_tasks, -1)), axis=1)
  return finite


def keep_tasks(task_grads: Any, keep: chex.Array, task_axis: int = 0) -> Any:
  """``task_grads`` with the gradients of the tasks not in ``keep`` zeroed.

  A ``where``, not a product: a NaN of an excluded task does not survive.
  """
  def one(leaf):
    if not _is_inexact(leaf):
      return leaf
    shape = [1] * leaf.ndim
    shape[task_axis] = -1
    return jnp.where(jnp.reshape(keep, shape), leaf, jnp.zeros_like(leaf))
  return jax.tree.map(one, task_grads)


def shared_only(task_grads: Any, shared: Any) -> Any:
  """``task_grads`` with the task-specific leaves (``shared`` False) zeroed.

  What a rule that reads the per-task gradients sees when shared parameters
  are declared: the gradients of the shared parameters only.
  """
  if shared is None:
    return task_grads
  return jax.tree.map(
      lambda g, keep: g if keep or not _is_inexact(g) else jnp.zeros_like(g),
      task_grads, shared)


def cosine_matrix(gramian_matrix: chex.Array) -> chex.Array:
  """Pairwise cosine similarities of the task gradients, from the Gramian."""
  norms = jnp.sqrt(jnp.clip(jnp.diag(gramian_matrix), min=0.0))
  denom = jnp.outer(norms, norms)
  return jnp.where(denom > 0, gramian_matrix / jnp.where(denom > 0, denom, 1.0),
                   0.0)
