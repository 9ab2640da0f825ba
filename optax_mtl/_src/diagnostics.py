"""Logging: a flat dict of scalars from every optax_mtl state in a tree."""

from __future__ import annotations

from typing import Any, Optional, Sequence
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Fields every strategy state has (see optax_mtl._src.base).
_REQUIRED_FIELDS = ("weights", "num_skipped")
# Integer or boolean fields worth logging; other integer fields (step
# counters of a statistic) are left out.
_LOGGED_DISCRETE_FIELDS = ("num_skipped", "num_rejected_losses",
                           "num_rejected_gradients", "solver_iterations",
                           "solver_converged", "solver_outcome",
                           "steps_since_update")


def is_strategy_state(node: Any) -> bool:
  """Whether ``node`` is the state of an optax_mtl strategy.

  Every strategy state is a NamedTuple with the fields ``weights`` and
  ``num_skipped``, or a wrapper state (:class:`optax_mtl.RecomputeEveryState`)
  around one in its field ``inner_state``.
  """
  fields = getattr(type(node), "_fields", None)
  if not isinstance(node, tuple) or fields is None:
    return False
  if all(name in fields for name in _REQUIRED_FIELDS):
    return True
  return "inner_state" in fields and is_strategy_state(node.inner_state)


def _weights(state: Any) -> Any:
  """The weights of a strategy state, or of the state a wrapper holds."""
  while "weights" not in type(state)._fields:
    state = state.inner_state
  return state.weights


def _unwrap(tree: Any) -> Any:
  """Replaces wrapped values (e.g. ``flax.nnx`` variables) by their arrays."""
  is_wrapper = lambda x: callable(getattr(x, "get_value", None))
  return jax.tree.map(lambda x: x.get_value() if is_wrapper(x) else x, tree,
                      is_leaf=is_wrapper)


def _path_name(path: Sequence[Any]) -> str:
  parts = []
  for entry in path:
    for attribute in ("name", "key", "idx"):
      if hasattr(entry, attribute):
        parts.append(str(getattr(entry, attribute)))
        break
    else:
      parts.append(str(entry).strip(".[]'\""))
  return "/".join(parts)


def _task_labels(num_tasks: int, task_names: Optional[Sequence[str]]):
  if task_names is None:
    return [str(index) for index in range(num_tasks)]
  if len(task_names) != num_tasks:
    raise ValueError(
        f"task_names must name the {num_tasks} tasks of the strategy, got "
        f"{len(task_names)} names: {list(task_names)!r}.")
  return [str(name) for name in task_names]


def _state_statistics(state: Any, prefix: str,
                      task_names: Optional[Sequence[str]]) -> dict[str, chex.Array]:
  """Flattens one strategy state (and any strategy state nested in it)."""
  weights_shape = jnp.shape(_weights(state))
  if len(weights_shape) != 1:
    raise ValueError(
        "diagnostics expects the state of one run: its strategy state has "
        f"weights of shape {weights_shape}, not (num_tasks,). A state with "
        "leading batch axes (an ensemble or a seed sweep run under jax.vmap) "
        "is read one run at a time with jax.vmap(optax_mtl.diagnostics)"
        "(state), which returns the same keys, each value with the leading "
        "batch axes (e.g. shape (num_runs,)).")
  num_tasks = weights_shape[0]
  labels = _task_labels(num_tasks, task_names)
  out: dict[str, chex.Array] = {}

  def add_leaf(name: str, leaf: chex.Array):
    leaf = jnp.asarray(leaf)
    field = name.rsplit("/", 1)[-1]
    if name == "gradient_cosines":
      rows, cols = np.triu_indices(num_tasks, k=1)
      for row, col in zip(rows.tolist(), cols.tolist()):
        out[f"{prefix}gradient_cosines/{labels[row]}_{labels[col]}"] = (
            leaf[row, col].astype(jnp.float32))
      off_diagonal = leaf[rows, cols].astype(jnp.float32)
      if num_tasks > 1:
        out[f"{prefix}gradient_cosines/min"] = jnp.min(off_diagonal)
        out[f"{prefix}gradient_conflicts"] = jnp.sum(
            off_diagonal < 0).astype(jnp.int32)
      return
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      leaf = leaf.astype(jnp.float32)
    elif field in _LOGGED_DISCRETE_FIELDS:
      leaf = leaf.astype(jnp.int32)
    else:
      return  # Internal counters (e.g. steps of a running average), keys.
    if leaf.shape == ():
      out.setdefault(f"{prefix}{name}", leaf)
    elif leaf.shape == (num_tasks,):
      for index, label in enumerate(labels):
        out.setdefault(f"{prefix}{name}/{label}", leaf[index])
      if name == "weights":  # The outer state's, as the weights above.
        out.setdefault(f"{prefix}weights/sum", jnp.sum(leaf))

  def walk(node: Any, name: str):
    fields = getattr(type(node), "_fields", None)
    if isinstance(node, tuple) and fields is not None:
      for field in fields:
        child = getattr(node, field)
        # A nested strategy state (the inner state of a RecomputeEveryState)
        # shares the outer keys: its weights are the ones applied.
        child_name = name if is_strategy_state(child) else (
            f"{name}/{field}" if name else field)
        walk(child, child_name)
      return
    leaves = jax.tree_util.tree_leaves_with_path(node)
    for path, leaf in leaves:
      suffix = _path_name(path)
      add_leaf(f"{name}/{suffix}" if suffix else name, leaf)

  walk(state, "")
  return out


def diagnostics(
    state: Any,
    *,
    prefix: str = "mtl",
    task_names: Optional[Sequence[str]] = None,
) -> dict[str, chex.Array]:
  """Flat dict of scalars describing every optax_mtl strategy state in a tree.

  Finds every strategy state inside ``state``: a bare strategy state, a
  :class:`optax_mtl.RecomputeEveryState`, or one nested inside an optimizer state
  (``optax.chain``, ``optax.MultiSteps``, ``optax.apply_if_finite``,
  ``flax.nnx.Optimizer.opt_state``, a dict ...). For each it reports, as
  scalar arrays keyed ``"<prefix>/<statistic>[/<task>]"``:

  * ``weights/<task>`` (float32) and ``weights/sum``: the weights applied
    last;
  * ``num_skipped`` (int32): the steps rejected so far;
  * ``num_rejected_losses/<task>`` (int32), for per-task strategies
    (``Weighting.per_task``): the losses of that task rejected so far (a
    step that excluded that task alone went on for the others);
  * ``num_rejected_gradients/<task>`` (int32), for strategies that read the
    per-task gradients: the steps that excluded that task because its
    gradient was not finite (the step went on for the others);
  * ``gradient_cosines/<i>_<j>`` for ``i < j``, ``gradient_cosines/min`` and
    ``gradient_conflicts`` (the number of pairs with a negative cosine), for
    strategies that read the Gramian;
  * ``solver_iterations`` (int32), ``solver_gap`` (float32),
    ``solver_converged`` (int32, 0 or 1) and ``solver_outcome`` (int32, an
    :class:`optax_mtl.Outcome` code) for strategies with a solver;
  * ``steps_since_update`` for strategies that recompute their weights every
    n steps;
  * every other float statistic of the state that is a scalar or has one
    value per task (e.g. ``loss_average/average/<task>``), keyed by its path
    in the state;
  * ``wrong_chain_order`` (int32, 1), only when a transformation chained
    *before* the strategy keeps statistics that all have a leading axis of
    size T (``optax.chain(optax.adam(...), strategy)``: Adam saw per-task
    gradients); a warning says so too.

  The dict holds only scalars, so each entry can go to any logger as it is
  (``writer.add_scalar(key, value, step)``). It is a pure function of the
  state: call it inside a jitted step and return it with the losses. When the
  tree holds more than one strategy state, each key gets the state's path in
  the tree after the prefix.

  A batch of states (an ensemble under ``jax.vmap``, whose fields have a
  leading run axis) raises a ``ValueError``: read it with
  ``jax.vmap(optax_mtl.diagnostics)(state)``, whose values have one entry
  per run under the same keys.

  Args:
    state: any pytree holding optax_mtl strategy states.
    prefix: prepended to every key, followed by ``/`` (``""``: no prefix).
    task_names: optional names of the tasks, used instead of their indices.

  Returns:
    A dict from ``str`` to scalar ``jax.Array``; empty if ``state`` holds no
    strategy state.

  Raises:
    ValueError: ``task_names`` does not name every task, or a strategy state
      has leading batch axes (use ``jax.vmap(optax_mtl.diagnostics)``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import optax_mtl
    >>> tx = optax.chain(optax_mtl.equal(num_tasks=2), optax.sgd(0.1))
    >>> opt_state = tx.init(jnp.zeros(3))
    >>> logs = optax_mtl.diagnostics(opt_state, task_names=["depth", "seg"])
    >>> sorted(logs)
    ['mtl/num_skipped', 'mtl/weights/depth', 'mtl/weights/seg', 'mtl/weights/sum']
    >>> float(logs["mtl/weights/sum"])
    2.0
  """
  prefix = f"{prefix}/" if prefix else ""
  state = _unwrap(state)
  found = [
      (path, node)
      for path, node in jax.tree_util.tree_flatten_with_path(
          state, is_leaf=is_strategy_state)[0]
      if is_strategy_state(node)
  ]
  out: dict[str, chex.Array] = {}
  for path, node in found:
    where = _path_name(path) if len(found) > 1 else ""
    key_prefix = f"{prefix}{where}/" if where else prefix
    out.update(_state_statistics(node, key_prefix, task_names))
    if _optimizer_before_strategy(state, path, jnp.shape(_weights(node))[0]):
      warnings.warn(
          "the optimizer state holds, before the strategy's state, a "
          "transformation whose statistics all have a leading axis of size "
          "num_tasks, as per-task gradients do: the chain is probably in the "
          "wrong order. The strategy comes first, optax.chain(strategy, "
          "optax.adam(...)) (see the README).", stacklevel=2)
      out[f"{key_prefix}wrong_chain_order"] = jnp.asarray(1, jnp.int32)
  return out


def _child(node: Any, key: Any) -> Any:
  for attribute in ("idx", "key"):
    if hasattr(key, attribute):
      return node[getattr(key, attribute)]
  if hasattr(key, "name"):
    return getattr(node, key.name)
  raise KeyError(key)


def _optimizer_before_strategy(state: Any, path: Sequence[Any],
                               num_tasks: int) -> bool:
  """Whether a chain holds, before the strategy, a per-task-shaped state.

  In ``optax.chain(optax.adam(...), strategy)`` Adam sees the per-task
  gradients: every one of its params-shaped statistics gets a leading axis
  of size T. A transformation that runs before the strategy and keeps
  statistics of that shape is the sign of the wrong order.
  """
  if not path:
    return False
  try:
    parent = state
    for key in path[:-1]:
      parent = _child(parent, key)
  except (KeyError, IndexError, TypeError, AttributeError):
    return False
  position = getattr(path[-1], "idx", getattr(path[-1], "key", None))
  if not isinstance(position, int) or position == 0:
    return False
  try:
    before = [parent[index] for index in range(position)]
  except (KeyError, IndexError, TypeError):
    return False
  arrays = [leaf for leaf in jax.tree.leaves(before)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
            and jnp.ndim(leaf) >= 1]
  return bool(arrays) and all(jnp.shape(leaf)[0] == num_tasks
                              for leaf in arrays)
