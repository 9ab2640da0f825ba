"""State conventions, the "needs" declaration, and the lift to the optax face.

Every strategy of optax_mtl is one pure *weight rule*: a small function that
turns the per-task losses (and, for gradient-balancing strategies, the T×T
Gramian ``G = J Jᵀ`` of the per-task gradients) into task weights ``w``. Both
faces of the library share that rule:

* the **optax face** (:func:`lift`) takes per-task gradients with a leading
  task axis and returns ``Σ_k w_k · task_grads[k]``;
* the **training-step face** (:func:`optax_mtl.value_and_grad`) computes only
  what the rule needs, e.g. a single VJP with cotangent ``w`` for a rule that
  needs only the losses.

State conventions (checked by the contract test over every strategy):

* a state is a NamedTuple of arrays with fixed shapes and dtypes;
* it has a field ``weights`` (float32[T]) holding the weights applied last;
* it has a field ``num_skipped`` (int32[]) counting the steps whose input was
  rejected (a non-finite loss, a non-positive loss where the rule divides by
  it, a non-finite Gramian, or non-finite weights). On such a step the
  previous weights are applied again and every other statistic is kept;
* a strategy that reads the Gramian also has a field ``gradient_cosines``
  (float32[T, T]), the pairwise cosines of the task gradients it saw last;
* a strategy with an iterative solver also has ``solver_iterations``
  (int32[]), ``solver_gap`` (float32[]) and ``solver_converged`` (bool[]).

The guard (:func:`apply_rule`) fills ``weights`` and ``gradient_cosines``;
rules only update their own statistics. :func:`convention_fields` gives the
initial values of these conventional fields to every strategy's ``init``.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import tree as tree_lib


class Needs(enum.Enum):
  """What a weight rule reads, so that the engine computes only that."""

  LOSSES = "losses"  # One forward and one backward pass.
  GRAMIAN = "gramian"  # Per-task gradients (or Gram-vector products).


# A weight rule: (task_losses f32[T], state, gramian f32[T,T] | None)
#   -> (weights f32[T], new_state). It never sees invalid input: the lift
# replaces rejected losses and Gramians by harmless values and throws the
# result away.
WeightRule = Callable[[chex.Array, Any, Optional[chex.Array]], tuple[chex.Array, Any]]

# Which parameters enter the Gramian: None (all), a pytree of bools shaped
# like the params, or a callable params -> pytree of bools.
GramianFilter = Union[None, Any, Callable[[Any], Any]]


class Weighting(NamedTuple):
  """A strategy's weight rule and what it needs, shared by both faces."""

  num_tasks: int
  needs: Needs
  init: Callable[[], Any]  # () -> state.
  rule: WeightRule
  # True when the rule divides by, or takes the log of, the losses: a zero or
  # negative loss is then rejected like a non-finite one.
  requires_positive_losses: bool = True
  # Which parameters enter the Gramian (Needs.GRAMIAN only).
  gramian_filter: GramianFilter = None
  # Recompute the weights every n steps; reuse state.weights in between
  # (Needs.GRAMIAN only: the steps in between cost one backward pass).
  update_weights_every: int = 1


class PeriodicState(NamedTuple):
  """State of a Gramian strategy that recomputes its weights every n steps."""

  weights: chex.Array  # f32[T], the weights applied last.
  num_skipped: chex.Array  # i32[], rejected steps (see the inner state).
  steps_since_update: chex.Array  # i32[], 0 on a step that recomputes.
  inner: Any  # The strategy's own state.


class MultiTaskStrategy(optax.GradientTransformationExtraArgs):
  """An ``optax.GradientTransformationExtraArgs`` that carries its weight rule.

  ``init(params)`` and ``update(task_grads, state, params=None, *,
  task_losses, **extra_args)`` form the optax face; the attribute
  ``weighting`` (a :class:`Weighting`) is what
  :func:`optax_mtl.value_and_grad` reads to run the training-step face.
  """

  weighting: Weighting


# --------------------------------------------------------------------------
# Validation helpers, used by every factory.
# --------------------------------------------------------------------------


def check_num_tasks(num_tasks: Any) -> int:
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
    raise ValueError(f"num_tasks must be an integer >= 1, got {num_tasks!r}.")
  return num_tasks


def check_in_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
  """Checks that a real hyperparameter lies in an interval; returns it."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ValueError(f"{name} must be a real number, got {value!r}.")
  value = float(value)
  bad = value != value  # NaN.
  if low is not None:
    bad |= value < low if low_inclusive else value <= low
  if high is not None:
    bad |= value > high if high_inclusive else value >= high
  if bad:
    left = "[" if low_inclusive and low is not None else "("
    right = "]" if high_inclusive and high is not None else ")"
    interval = (f"{left}{'-inf' if low is None else low}, "
                f"{'inf' if high is None else high}{right}")
    raise ValueError(f"{name} must lie in {interval}, got {value!r}.")
  return value


def check_positive_int(name: str, value: Any, *, allow_none: bool = False):
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  return value


def check_solver_options(max_iters: Any, tol: Any) -> tuple[int, float | None]:
  """Checks a solver's ``max_iters`` (>= 1) and ``tol`` (>= 0 or None)."""
  max_iters = check_positive_int("max_iters", max_iters)
  if tol is not None:
    tol = check_in_range("tol", tol, 0.0)
  return max_iters, tol


def check_task_losses(task_losses: Any, num_tasks: int) -> jax.Array:
  """Returns the losses as float32[T]; raises at trace time on a bad shape."""
  shape = jnp.shape(task_losses)
  if shape != (num_tasks,):
    raise ValueError(
        f"task_losses must have shape ({num_tasks},) (one loss per task), "
        f"got shape {shape}.")
  return jnp.asarray(task_losses, jnp.float32)


def safe_increment(count: chex.Array) -> chex.Array:
  return optax.safe_increment(count)


# --------------------------------------------------------------------------
# The conventional state fields, shared by every strategy's init.
# --------------------------------------------------------------------------


def convention_fields(
    num_tasks: int,
    initial_weights: Union[float, chex.Array] = 1.0,
    *,
    gramian: bool = False,
    solver: bool = False,
) -> dict[str, jax.Array]:
  """The initial values of the conventional state fields, as a dict.

  Used as ``SomeState(**convention_fields(num_tasks, ...), own_field=...)``.

  Args:
    num_tasks: T.
    initial_weights: a scalar or a float32[T] array, the initial ``weights``.
    gramian: also return ``gradient_cosines`` (the identity), for strategies
      that read the Gramian.
    solver: also return ``solver_iterations`` (0), ``solver_gap`` (0.0) and
      ``solver_converged`` (True), for strategies with an iterative solver.

  Returns:
    ``weights`` f32[T] and ``num_skipped`` i32[] (0), plus the optional fields.
  """
  fields = dict(
      weights=jnp.full((num_tasks,), initial_weights, jnp.float32),
      num_skipped=jnp.zeros([], jnp.int32))
  if gramian:
    fields.update(gradient_cosines=jnp.eye(num_tasks, dtype=jnp.float32))
  if solver:
    fields.update(
        solver_iterations=jnp.zeros([], jnp.int32),
        solver_gap=jnp.zeros([], jnp.float32),
        solver_converged=jnp.asarray(True))
  return fields


# --------------------------------------------------------------------------
# The guard: invalid input never reaches a strategy's statistics.
# --------------------------------------------------------------------------


def apply_rule(
    weighting: Weighting,
    task_losses: chex.Array,
    state: Any,
    gramian: Optional[chex.Array] = None,
) -> tuple[chex.Array, Any]:
  """Runs the weight rule behind the guard and the periodic recomputation.

  Args:
    weighting: the strategy's rule.
    task_losses: float32[T], already checked for shape.
    state: the strategy's state (a ``PeriodicState`` when
      ``update_weights_every > 1``).
    gramian: float32[T, T] for Gramian rules, else None.

  Returns:
    ``(weights, new_state)``; ``new_state.weights`` equals ``weights``.
  """
  if weighting.update_weights_every > 1:
    weights, inner = _guarded_rule(weighting, task_losses, state.inner, gramian)
    new_state = PeriodicState(
        weights=weights,
        num_skipped=inner.num_skipped,
        steps_since_update=jnp.ones_like(state.steps_since_update),
        inner=inner)
    return weights, new_state
  return _guarded_rule(weighting, task_losses, state, gramian)


def reuse_weights(state: PeriodicState):
  """The cheap step of a periodic strategy: the previous weights again."""
  steps = state.steps_since_update + 1
  return state.weights, state._replace(steps_since_update=steps)


def is_due(weighting: Weighting, state: Any) -> chex.Array:
  """Whether this step recomputes the weights (always, unless periodic)."""
  if weighting.update_weights_every > 1:
    return state.steps_since_update % weighting.update_weights_every == 0
  return jnp.asarray(True)


def _guarded_rule(weighting, task_losses, state, gramian):
  losses_ok = jnp.all(jnp.isfinite(task_losses))
  if weighting.requires_positive_losses:
    losses_ok &= jnp.all(task_losses > 0)
  inputs_ok = losses_ok
  if gramian is not None:
    gramian = jnp.asarray(gramian, jnp.float32)
    gramian_ok = jnp.all(jnp.isfinite(gramian))
    inputs_ok &= gramian_ok
    gramian = jnp.where(gramian_ok, gramian, jnp.eye(weighting.num_tasks))
  # Rejected inputs are replaced by harmless ones, so that no rule ever
  # computes on a NaN (a solver loop on NaN could misbehave); the result is
  # discarded below.
  task_losses = jnp.where(losses_ok, task_losses, jnp.ones_like(task_losses))
  weights, new_state = weighting.rule(task_losses, state, gramian)
  weights = jnp.asarray(weights, jnp.float32)
  ok = inputs_ok & jnp.all(jnp.isfinite(weights))
  accepted = new_state._replace(weights=weights)
  if gramian is not None:
    accepted = accepted._replace(
        gradient_cosines=tree_lib.cosine_matrix(gramian))
  rejected = state._replace(num_skipped=safe_increment(state.num_skipped))
  new_state = jax.tree.map(
      lambda a, r: jnp.where(ok, a, r).astype(r.dtype), accepted, rejected)
  return new_state.weights, new_state


def init_state(weighting: Weighting) -> Any:
  state = weighting.init()
  if weighting.update_weights_every > 1:
    return PeriodicState(
        weights=state.weights,
        num_skipped=state.num_skipped,
        steps_since_update=jnp.zeros([], jnp.int32),
        inner=state)
  return state


# --------------------------------------------------------------------------
# The optax face.
# --------------------------------------------------------------------------


def lift(weighting: Weighting) -> MultiTaskStrategy:
  """Builds the optax face of a weight rule.

  ``update(task_grads, state, params=None, *, task_losses, **extra_args)``
  checks that every leaf of ``task_grads`` and ``task_losses`` has a leading
  axis of size ``num_tasks`` (a ``ValueError`` at trace time otherwise),
  computes the Gramian of ``task_grads`` if the rule needs it, and returns the
  params-shaped update ``Σ_k w_k · task_grads[k]``. Unknown keyword arguments
  are ignored.
  """
  num_tasks = weighting.num_tasks

  def init_fn(params):
    del params
    return init_state(weighting)

  def update_fn(task_grads, state, params=None, *, task_losses=None,
                **extra_args):
    del extra_args
    if task_losses is None:
      raise ValueError(
          "update() needs the keyword argument task_losses (shape "
          f"({num_tasks},)), got None.")
    task_losses = check_task_losses(task_losses, num_tasks)
    tree_lib.check_task_axis(task_grads, num_tasks, "task_grads")

    def recompute(state):
      gramian = None
      if weighting.needs is Needs.GRAMIAN:
        mask = tree_lib.filter_mask(weighting.gramian_filter, params,
                                    task_grads)
        gramian = tree_lib.gramian(task_grads, mask)
      return apply_rule(weighting, task_losses, state, gramian)

    if weighting.update_weights_every > 1:
      # The Gramian is computed only on the steps that recompute weights.
      weights, new_state = jax.lax.cond(
          is_due(weighting, state), recompute, reuse_weights, state)
    else:
      weights, new_state = recompute(state)
    return tree_lib.combine(weights, task_grads), new_state

  strategy = MultiTaskStrategy(init_fn, update_fn)
  strategy.weighting = weighting
  return strategy
