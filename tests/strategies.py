"""Every strategy of optax_mtl under test, in one explicit table.

Adding a strategy is a one-line change: add ``"name": Case(...)`` to
:data:`STRATEGIES`, with what its definition promises. ``name`` is the
factory's name in ``optax_mtl``; the factory is called as
``optax_mtl.<name>(num_tasks, **case.kwargs)``. The contract
(tests/test_contract.py), the properties (tests/test_properties.py), the
diagnostics, mixed-precision, checkpoint and sharding tests then run on it.
``test_contract.test_the_table_lists_every_strategy`` fails until the line
is there.

Declare a property only if the method's definition guarantees it; every
declared property is checked (tests/properties.py), and so are the
attributes that describe the state (``needs``, ``positive_losses``,
``per_task``, ``has_solver``). A property left False is not checked.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import pytest

import optax_mtl

NUM_TASKS = 3


@dataclasses.dataclass(frozen=True)
class Case:
  """What a strategy is and which properties its definition guarantees.

  Attributes:
    needs: what the rule reads, ``"losses"``, ``"gramian"`` or
      ``"gradients"`` (``optax_mtl.Needs``).
    kwargs: factory arguments besides ``num_tasks`` (default: none).
    positive_losses: a zero or negative loss is rejected (the rule divides
      by the losses or takes their log); otherwise it is accepted.
    per_task: a bad loss (non-finite, or not positive where
      ``positive_losses``) excludes its task only: the step goes on for the
      other tasks, the task keeps its weight and statistics and is counted
      in ``num_rejected_losses`` (int32[T]). Otherwise it rejects the step.
    has_solver: the state has ``solver_iterations``, ``solver_gap`` and
      ``solver_converged``.
    stochastic: the weights are drawn at random (from a seed in the state).
    static_args: the factory arguments that ``optax.inject_hyperparams``
      must keep static (integers that set shapes or loops, seeds, initial
      values).
    hyperparams: numeric hyperparameters, not their defaults, given to
      ``optax.inject_hyperparams`` (and to the plain factory it is compared
      with).
    permutation_equivariant: permuting the tasks permutes the weights (the
      update does not change).
    scale_invariant_per_task: multiplying one task's loss and gradient by
      ``c > 0`` at every step leaves the update unchanged.
    non_conflicting: ``g_k · d >= 0`` for every task ``k`` (``J d >= 0``).
    linear_under_scaling: ``d(diag(a c1 + b c2) J) = a d(diag(c1) J) +
      b d(diag(c2) J)`` for ``c1, c2 > 0`` (torchjd's property; only
      meaningful for strategies that read the gradients).
    mean_without_conflict: ``d`` is the mean gradient when no two task
      gradients conflict (``G >= 0``).
    rtol: relative tolerance of the property checks: float32 round-off,
      or the stopping tolerance of an iterative solver.
    factory: for a wrapped strategy, ``factory(num_tasks, **kwargs)``
      builds it (e.g. ``smooth_weights`` over a strategy); None: the entry's
      name is the factory ``optax_mtl.<name>``.
  """

  needs: str
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  positive_losses: bool = False
  per_task: bool = False
  has_solver: bool = False
  stochastic: bool = False
  static_args: tuple[str, ...] = ("num_tasks",)
  hyperparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  permutation_equivariant: bool = False
  scale_invariant_per_task: bool = False
  non_conflicting: bool = False
  linear_under_scaling: bool = False
  mean_without_conflict: bool = False
  rtol: float = 1e-5
  factory: Any = None


def _smoothed(name: str):
  """``optax_mtl.smooth_weights(optax_mtl.<name>(num_tasks), decay)``."""
  def factory(num_tasks: int, decay: float = 0.8) -> optax_mtl.MultiTaskStrategy:
    return optax_mtl.smooth_weights(getattr(optax_mtl, name)(num_tasks),
                                    decay)
  factory.__name__ = f"smooth_weights_{name}"
  return factory


_SOLVER = ("num_tasks", "max_iters")

# pylint: disable=line-too-long
STRATEGIES: dict[str, Case] = {
    # Loss weighting: the weights read the losses only.
    "equal": Case("losses", permutation_equivariant=True),
    "loss_ema": Case("losses", per_task=True, positive_losses=True, hyperparams=dict(beta=0.3), permutation_equivariant=True, scale_invariant_per_task=True),
    "rema": Case("losses", per_task=True, positive_losses=True, hyperparams=dict(beta=0.3), permutation_equivariant=True, scale_invariant_per_task=True),
    "dwema": Case("losses", per_task=True, positive_losses=True, hyperparams=dict(beta=0.3, temperature=1.5), permutation_equivariant=True, scale_invariant_per_task=True),
    "dwa": Case("losses", per_task=True, positive_losses=True, static_args=("num_tasks", "steps_per_epoch"), hyperparams=dict(temperature=1.5), permutation_equivariant=True),
    "lbtw": Case("losses", per_task=True, positive_losses=True, static_args=("num_tasks", "steps_per_epoch"), hyperparams=dict(alpha=0.7), permutation_equivariant=True),
    "initial_loss": Case("losses", per_task=True, positive_losses=True, static_args=("num_tasks", "warmup_steps"), permutation_equivariant=True, scale_invariant_per_task=True),
    "log_loss": Case("losses", per_task=True, positive_losses=True, permutation_equivariant=True, scale_invariant_per_task=True),
    "geometric_mean": Case("losses", per_task=True, positive_losses=True, hyperparams=dict(gamma=2.0), permutation_equivariant=True),
    "uncertainty": Case("losses", per_task=True, positive_losses=True, static_args=("num_tasks", "initial_log_variances"), hyperparams=dict(learning_rate=0.05), permutation_equivariant=True),
    "rlw": Case("losses", stochastic=True, static_args=("num_tasks", "seed")),
    "constant": Case("losses", kwargs=dict(weights=(0.5, 1.0, 2.0)), static_args=("num_tasks", "weights")),
    "famo": Case("losses", per_task=True, positive_losses=True, hyperparams=dict(learning_rate=0.05, weight_decay=0.01), permutation_equivariant=True),
    "stch": Case("losses", kwargs=dict(warmup_epochs=1), per_task=True, positive_losses=True, static_args=("num_tasks", "warmup_epochs"), hyperparams=dict(mu=0.5), permutation_equivariant=True, scale_invariant_per_task=True),
    "imtl_l": Case("losses", per_task=True, positive_losses=True, static_args=("num_tasks", "initial_scales"), hyperparams=dict(learning_rate=0.05), permutation_equivariant=True),
    "cosmos": Case("losses", static_args=("num_tasks", "preference"), hyperparams=dict(penalty=0.5), permutation_equivariant=True),
    "pbi": Case("losses", static_args=("num_tasks", "preference", "reference_point"), hyperparams=dict(theta=3.0), permutation_equivariant=True),
    # Gradient balancing: the weights read the Gramian G = J Jᵀ.
    "normalized_gradients": Case("gramian", hyperparams=dict(min_relative_norm=1e-10), permutation_equivariant=True, scale_invariant_per_task=True),
    "mgda": Case("gramian", has_solver=True, static_args=_SOLVER, hyperparams=dict(tol=1e-5, min_relative_norm=1e-10), permutation_equivariant=True, non_conflicting=True, rtol=1e-3),
    "gradnorm": Case("gramian", positive_losses=True, hyperparams=dict(alpha=1.0, learning_rate=0.05, min_weight=0.01), permutation_equivariant=True),
    "pcgrad": Case("gramian", stochastic=True, static_args=("num_tasks", "seed"), linear_under_scaling=True),
    "cagrad": Case("gramian", has_solver=True, static_args=_SOLVER + ("rescale",), hyperparams=dict(c=0.3, tol=1e-5), permutation_equivariant=True, rtol=1e-3),
    "imtl_g": Case("gramian", hyperparams=dict(min_relative_norm=1e-7), permutation_equivariant=True, rtol=1e-4),
    "imtl": Case("gramian", positive_losses=True, static_args=("num_tasks", "initial_scales"), hyperparams=dict(learning_rate=0.05, min_relative_norm=1e-7), permutation_equivariant=True, rtol=1e-4),
    "nash_mtl": Case("gramian", has_solver=True, static_args=_SOLVER, hyperparams=dict(tol=1e-4), permutation_equivariant=True, scale_invariant_per_task=True, non_conflicting=True, rtol=1e-4),
    "aligned_mtl": Case("gramian", hyperparams=dict(eigenvalue_rtol=1e-5), permutation_equivariant=True, rtol=1e-4),
    "upgrad": Case("gramian", has_solver=True, static_args=_SOLVER, hyperparams=dict(tol=1e-5), permutation_equivariant=True, non_conflicting=True, linear_under_scaling=True, mean_without_conflict=True, rtol=1e-4),
    "dualproj": Case("gramian", has_solver=True, static_args=_SOLVER, hyperparams=dict(tol=1e-5), permutation_equivariant=True, non_conflicting=True, mean_without_conflict=True, rtol=1e-4),
    "config": Case("gramian", static_args=("num_tasks", "preference"), permutation_equivariant=True, rtol=1e-4),  # Equal positive cosines only when rank = T.
    "krum": Case("gramian", static_args=("num_tasks", "num_byzantine", "num_selected")),  # Ties go to the lower index.
    "fairgrad": Case("gramian", has_solver=True, static_args=("num_tasks", "alpha", "max_iters"), hyperparams=dict(tol=1e-5), permutation_equivariant=True, non_conflicting=True, rtol=1e-4),
    "gradvac": Case("gramian", stochastic=True, static_args=("num_tasks", "seed", "target", "groups"), hyperparams=dict(beta=0.3)),
    "pcd": Case("gramian", has_solver=True, static_args=_SOLVER, hyperparams=dict(tau=0.3, decay=0.9, eps=1e-6, tol=1e-5), rtol=1e-4),  # Task 0 is the primary one.
    # Per-task gradients: the rule reads the Jacobian and returns the update.
    "graddrop": Case("gradients", stochastic=True, static_args=("num_tasks", "seed", "leak", "purity_fn", "batch_axis")),
    "trimmed_mean": Case("gradients", static_args=("num_tasks", "trim_number"), permutation_equivariant=True),
    "moco": Case("gradients", static_args=("num_tasks", "projection", "gradient_normalization"), hyperparams=dict(beta=0.3, learning_rate=0.05), permutation_equivariant=True, rtol=1e-4),
    # Wrappers over a strategy of the table (the entry's factory builds it).
    "smooth_weights(loss_ema)": Case("losses", factory=_smoothed("loss_ema"), per_task=True, positive_losses=True, hyperparams=dict(decay=0.5), permutation_equivariant=True, scale_invariant_per_task=True),
    "smooth_weights(upgrad)": Case("gramian", factory=_smoothed("upgrad"), has_solver=True, hyperparams=dict(decay=0.5), permutation_equivariant=True, rtol=1e-4),
    "db_mtl": Case("gradients", positive_losses=True, hyperparams=dict(decay=0.8), permutation_equivariant=True, scale_invariant_per_task=True, rtol=1e-3),
    "excess_mtl": Case("gradients", hyperparams=dict(learning_rate=0.05), permutation_equivariant=True, rtol=1e-4),
}
# pylint: enable=line-too-long

# Strategies that read several independent minibatches per step (double
# sampling: task_grads with leading axes (3, T)). The table's checks feed one
# minibatch, so these are covered by tests/test_double_sampling.py instead
# (golden values in both faces, shared parameters, rejected steps, errors).
SAMPLED_STRATEGIES: tuple[str, ...] = ("modo", "sdmgrad")

NAMES: tuple[str, ...] = tuple(sorted(STRATEGIES))


def names_with(attribute: str) -> list[str]:
  """The strategies whose case declares ``attribute`` (sorted)."""
  return [name for name in NAMES if getattr(STRATEGIES[name], attribute)]


def factory(name: str):
  """The entry's factory: ``optax_mtl.<name>``, or the case's own."""
  return STRATEGIES[name].factory or getattr(optax_mtl, name)


def build(name: str, num_tasks: int = NUM_TASKS,
          **overrides: Any) -> optax_mtl.MultiTaskStrategy:
  """A new ``factory(name)(num_tasks, **kwargs)`` (``overrides`` win)."""
  return factory(name)(num_tasks, **{**STRATEGIES[name].kwargs, **overrides})


@functools.cache
def strategy(name: str) -> optax_mtl.MultiTaskStrategy:
  """The strategy of the table, one instance per test process."""
  return build(name)


@functools.cache
def jitted_update(name: str):
  """``jax.jit(strategy(name).update, donate_argnums=1)``, shared by every
  test module.

  Every module that runs over all strategies calls it on the same shapes
  (through ``properties.update``, which donates a copy of the state), so a
  strategy is compiled once per process.
  """
  return jax.jit(strategy(name).update, donate_argnums=1)


@functools.cache
def jitted_value_and_grad(name: str, loss_fn):
  """``jax.jit(optax_mtl.value_and_grad(loss_fn, strategy(name)))``."""
  return jax.jit(optax_mtl.value_and_grad(loss_fn, strategy(name)))


def strategy_factories() -> set[str]:
  """The names in ``optax_mtl.__all__`` that build a strategy from num_tasks.

  A factory is a function with a ``num_tasks`` parameter that is annotated
  to return a ``MultiTaskStrategy``, or returns one when called with
  ``num_tasks`` alone.
  """
  found = set()
  for name in optax_mtl.__all__:
    function = getattr(optax_mtl, name)
    if not inspect.isfunction(function):
      continue
    signature = inspect.signature(function)
    if "num_tasks" not in signature.parameters:
      continue
    if "MultiTaskStrategy" in str(signature.return_annotation):
      found.add(name)
      continue
    required = [p for p in signature.parameters.values()
                if p.default is p.empty and p.name != "num_tasks"
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not required and isinstance(function(num_tasks=NUM_TASKS),
                                   optax_mtl.MultiTaskStrategy):
      found.add(name)
  return found


def state_layout(tree: Any) -> Any:
  """The (shape, dtype) of every leaf: a state keeps it between steps."""
  return jax.tree.map(lambda leaf: (jnp.shape(leaf), jnp.asarray(leaf).dtype),
                      tree)


def check_rejects(factory, kwargs, message, num_tasks: int = NUM_TASKS):
  """``factory(num_tasks=num_tasks, **kwargs)`` raises ValueError(message).

  ``kwargs`` may set ``num_tasks`` itself.
  """
  with pytest.raises(ValueError, match=message):
    factory(**{"num_tasks": num_tasks, **kwargs})
