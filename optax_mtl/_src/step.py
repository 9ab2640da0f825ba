"""The one step both faces run, and the transformations built on it.

A step of any strategy reads top to bottom:

1. the guard checks the losses (and, lazily, the Gramian);
2. the weighting's rule turns them into weights and a new state;
3. the guard accepts the result, or keeps the previous state and weights and
   counts the step in ``num_skipped``. For a per-task weighting a bad loss
   excludes its task only (previous weight and statistics, counted in
   ``num_rejected_losses``) and the step goes on for the other tasks.

:func:`weights_step` is that step; :func:`recompute_every` makes it reuse the
weights between recomputations. The optax face (:func:`as_gradient_transformation`)
and the training-step face (:func:`optax_mtl.value_and_grad`) each call
:func:`weights_step` exactly once per step and differ only in how they get
the Gramian and apply the weights.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import base
from optax_mtl._src import conv_layout
from optax_mtl._src import tree as tree_lib


class StrategyOptions(NamedTuple):
  """How a weighting is applied, set by the wrappers (defaults: plain)."""

  # Recompute the weights every n steps and reuse them in between.
  recompute_every: int = 1
  # Which parameters are shared (None: all), see tree.shared_mask.
  shared: Any = None
  # Whether task-specific (non-shared) parameters receive w_k ∇L_k rather
  # than their own task's gradient ∇L_k (Gramian strategies only).
  weight_task_specific: bool = False


class RecomputeEveryState(NamedTuple):
  """State of :func:`recompute_every`.

  Reading a field of the wrapped strategy's state (``state.weights``,
  ``state.num_skipped``, ``state.solver_gap``, ...) works on this state as
  on the inner one.
  """

  inner: Any  # The wrapped strategy's state.
  steps_since_update: chex.Array  # i32[], 0 at init; 1 right after a recompute.

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return getattr(self.inner, name)


# --------------------------------------------------------------------------
# The guarded step.
# --------------------------------------------------------------------------


def weights_step(
    weighting: base.Weighting,
    options: StrategyOptions,
    task_losses: chex.Array,
    state: Any,
    gramian_fn: Optional[Callable[[], chex.Array]] = None,
    gradients_valid: Optional[chex.Array] = None,
) -> tuple[chex.Array, Any]:
  """Losses (and a Gramian) → weights and the new state, behind the guard.

  Args:
    weighting: the strategy's weighting.
    options: how it is applied (:class:`StrategyOptions`).
    task_losses: f32[T], already checked for shape.
    state: the strategy's state (a :class:`RecomputeEveryState` when
      ``options.recompute_every > 1``).
    gramian_fn: ``() -> G`` ([T, T]), called only when the weights are
      recomputed (for :attr:`Needs.GRAMIAN` weightings).
    gradients_valid: optional bool[T], the tasks whose gradients are finite
      (the others were zeroed by the caller): they are excluded from the
      step and get weight 0.

  Returns:
    ``(weights, new_state)``; ``weights`` are the ones to apply this step.
  """
  if options.recompute_every == 1:
    return _guarded_rule(weighting, task_losses, state, gramian_fn,
                         gradients_valid)

  def recompute(inner):
    weights, inner = _guarded_rule(weighting, task_losses, inner, gramian_fn,
                                   gradients_valid)
    # Both branches of the cond return the state's dtype.
    return weights.astype(inner.weights.dtype), inner

  return recompute_or_reuse(weighting, options, task_losses, state,
                            recompute, lambda weights: weights)


def recompute_or_reuse(
    weighting: base.Weighting,
    options: StrategyOptions,
    task_losses: chex.Array,
    state: RecomputeEveryState,
    recompute: Callable[[Any], tuple[Any, Any]],
    reuse: Callable[[chex.Array], Any],
) -> tuple[Any, RecomputeEveryState]:
  """The step of :func:`recompute_every`: ``recompute`` or ``reuse``.

  On steps 0, n, 2n, ... ``recompute(inner_state) -> (out, inner_state)``;
  on the others ``reuse(previous_weights) -> out``, with the inner state
  kept (a rejected loss still counted). Both run under one ``lax.cond``
  with their convolutions in the form XLA:CPU runs fast there
  (:mod:`conv_layout`); ``reuse``'s output takes the dtypes of
  ``recompute``'s.

  Returns:
    ``(out, new_state)``.
  """
  out_types = jax.eval_shape(recompute, state.inner)[0]

  def reuse_branch(inner):
    valid = _valid_losses(weighting, task_losses)
    out = jax.tree.map(lambda value, like: value.astype(like.dtype),
                       reuse(inner.weights), out_types)
    return out, _count_rejections(weighting, inner, valid,
                                  ~_step_ok(weighting, valid))

  due = state.steps_since_update % options.recompute_every == 0
  out, inner = jax.lax.cond(
      due, conv_layout.canonical_convolutions(recompute),
      conv_layout.canonical_convolutions(reuse_branch), state.inner)
  steps = jnp.where(due, 1, optax.safe_increment(state.steps_since_update))
  return out, RecomputeEveryState(inner, steps.astype(jnp.int32))


def _valid_losses(weighting: base.Weighting,
                  task_losses: chex.Array) -> chex.Array:
  """bool[T]: the losses the rule may use (finite; > 0 where it must be)."""
  valid = jnp.isfinite(task_losses)
  if weighting.requires_positive_losses:
    valid &= task_losses > 0
  return valid


def _step_ok(weighting: base.Weighting, valid: chex.Array) -> chex.Array:
  """Whether the losses let the step go on: all valid, or (per task) any."""
  return jnp.any(valid) if weighting.per_task else jnp.all(valid)


def _losses_ok(weighting: base.Weighting, task_losses: chex.Array):
  return _step_ok(weighting, _valid_losses(weighting, task_losses))


def _count_rejections(weighting: base.Weighting, state: Any,
                      valid: chex.Array, skipped: chex.Array,
                      kept: Optional[chex.Array] = None) -> Any:
  """``num_skipped`` += ``skipped``; per task, ``num_rejected_losses`` +=
  ``~valid`` (every bad loss, whether or not the step went on) and
  ``num_rejected_gradients`` += ``~kept`` (where the state has the field)."""
  state = state._replace(num_skipped=jnp.where(
      skipped, optax.safe_increment(state.num_skipped), state.num_skipped))
  if weighting.per_task:
    counts = state.num_rejected_losses
    state = state._replace(num_rejected_losses=jnp.where(
        valid, counts, optax.safe_increment(counts)).astype(counts.dtype))
  if kept is not None and hasattr(state, "num_rejected_gradients"):
    counts = state.num_rejected_gradients
    state = state._replace(num_rejected_gradients=jnp.where(
        kept, counts, optax.safe_increment(counts)).astype(counts.dtype))
  return state


def count_skipped(state: Any, skipped: chex.Array) -> Any:
  """``state`` with ``num_skipped`` incremented where ``skipped`` is true."""
  if isinstance(state, RecomputeEveryState):
    return state._replace(inner=count_skipped(state.inner, skipped))
  return state._replace(num_skipped=jnp.where(
      skipped, optax.safe_increment(state.num_skipped), state.num_skipped))


def all_finite(tree: Any) -> chex.Array:
  """Whether every floating-point leaf of ``tree`` is finite."""
  checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _rule_input(weighting, rule_input_fn, gradients_valid):
  """The rule's input and bool[T]: the tasks whose gradient is usable.

  A task whose gradient is not finite (a NaN or inf in any coordinate, seen
  on the Gramian's diagonal or given as ``gradients_valid``) is excluded
  from this step: its Gramian row and column are zero (as for a zero
  gradient), and the rule never sees a non-finite number.

  A Gramian given as :class:`tree.ScaledGramian` (``G / 4^e``) is handed to
  a rule that declares ``gramian_degree`` as it is, and to the others as
  ``G``; the last value returned is ``e`` for the first, 0 otherwise.
  """
  num_tasks = weighting.num_tasks
  kept = (jnp.ones((num_tasks,), bool) if gradients_valid is None
          else jnp.asarray(gradients_valid))
  exponent = jnp.zeros([], jnp.int32)
  if weighting.needs is base.Needs.GRAMIAN:
    gramian = rule_input_fn()
    if isinstance(gramian, tree_lib.ScaledGramian):
      if weighting.gramian_degree is None:
        gramian = jnp.ldexp(gramian.gramian, 2 * gramian.exponent)
      else:
        gramian, exponent = gramian
    gramian = jnp.asarray(gramian)
    if not jnp.issubdtype(gramian.dtype, jnp.floating):
      gramian = gramian.astype(jnp.float32)
    kept &= jnp.isfinite(jnp.diagonal(gramian))
    gramian = jnp.where(kept[:, None] & kept[None, :], gramian, 0.0)
    usable = jnp.any(kept) & all_finite(gramian)
    return (jnp.where(usable, gramian, jnp.eye(num_tasks, dtype=gramian.dtype)),
            kept, usable, exponent)
  if weighting.needs is base.Needs.GRADIENTS:
    task_grads = rule_input_fn()
    usable = jnp.any(kept) & all_finite(task_grads)
    return jax.tree.map(
        lambda g: jnp.where(usable, g, jnp.zeros_like(g))
        if jnp.issubdtype(g.dtype, jnp.inexact) else g,
        task_grads), kept, usable, exponent
  return None, kept, jnp.asarray(True), exponent


def _guarded_rule(weighting, task_losses, state, rule_input_fn,
                  gradients_valid=None):
  """Runs the rule behind the guard.

  ``rule_input_fn`` gives the Gramian (:attr:`Needs.GRAMIAN`) or the per-task
  gradients (:attr:`Needs.GRADIENTS`); it is not called for
  :attr:`Needs.LOSSES`. The step is accepted only when the losses, that
  input, the rule's output and the new state are all finite; otherwise the
  previous state is kept, ``num_skipped`` counts the step and the previous
  weights (or, for :attr:`Needs.GRADIENTS`, a zero update) are returned.

  For a per-task weighting (``weighting.per_task``) a bad loss excludes its
  task only: the rule gets ``valid`` (bool[T]) and the losses of the
  excluded tasks replaced by 1.0; an excluded task keeps its previous
  weight and ``num_rejected_losses`` counts it. The step is rejected as a
  whole only when no loss is valid, or the Gramian, the weights or the new
  state are not finite. With every loss valid the step is the same as for a
  weighting that is not per task.

  A task whose gradient is not finite (``gradients_valid``, or a non-finite
  diagonal entry of the Gramian) is excluded from the step for every
  weighting that reads gradients: the rule sees it as a zero gradient, its
  applied weight is 0, the state keeps its previous weight, and
  ``num_rejected_gradients`` counts it where the state has that field.
  """
  valid = _valid_losses(weighting, task_losses)
  per_task = weighting.per_task
  rule_input, kept, usable, exponent = _rule_input(weighting, rule_input_fn,
                                                   gradients_valid)
  inputs_ok = usable & (jnp.any(valid & kept) if per_task
                        else jnp.all(valid))
  # Rejected inputs are replaced by harmless ones, so that no rule ever
  # computes on a NaN (a solver loop on NaN could misbehave); the result is
  # discarded below.
  if per_task:
    # Per task: only the excluded tasks' losses are replaced, and the rule is
    # told which they are.
    safe_losses = jnp.where(valid, task_losses, jnp.ones_like(task_losses))
    output, new_state = weighting.rule(safe_losses, state, rule_input,
                                       valid=valid & kept)
    output = _unscaled_weights(weighting, output, exponent)
    # An excluded task keeps its previous weight, whatever the rule gave it.
    output = jnp.where(valid & kept, output, state.weights)
  else:
    safe_losses = jnp.where(inputs_ok, task_losses,
                            jnp.ones_like(task_losses))
    output, new_state = weighting.rule(safe_losses, state, rule_input)
    output = _unscaled_weights(weighting, output, exponent)
  if weighting.needs is base.Needs.GRADIENTS:
    accepted = new_state  # The rule reports its own weights, if any.
  else:
    # A task without a usable gradient keeps its weight in the state.
    accepted = new_state._replace(
        weights=jnp.where(kept, output, state.weights.astype(output.dtype)))
  if weighting.needs is base.Needs.GRAMIAN:
    accepted = accepted._replace(
        gradient_cosines=tree_lib.cosine_matrix(rule_input))
  ok = inputs_ok & all_finite(output) & all_finite(accepted)
  accepted = _count_rejections(weighting, accepted, valid, jnp.asarray(False),
                               kept)
  rejected = _count_rejections(weighting, state, valid, jnp.asarray(True),
                               kept)
  new_state = jax.tree.map(
      lambda a, r: jnp.where(ok, a, r).astype(r.dtype), accepted, rejected)
  if weighting.needs is base.Needs.GRADIENTS:
    return jax.tree.map(
        lambda u: jnp.where(ok, u, jnp.zeros_like(u))
        if jnp.issubdtype(u.dtype, jnp.inexact) else u, output), new_state
  # The weights applied are the rule's own, in its dtype (float64 from a
  # float64 Gramian under x64); the state keeps them in float32. A task
  # without a usable gradient gets 0.
  applied = jnp.where(ok, output, state.weights.astype(output.dtype))
  return jnp.where(kept, applied, 0.0).astype(applied.dtype), new_state


def _unscaled_weights(weighting, weights, exponent):
  """The weights for ``G`` from the rule's for ``G / 4^e``: × ``2^{2ep}``."""
  degree = weighting.gramian_degree
  if degree is None or degree == 0:
    return weights
  if 2 * degree == int(2 * degree):  # Exact.
    return jnp.ldexp(weights, int(2 * degree) * exponent)
  return weights * jnp.exp2(2 * degree * exponent.astype(weights.dtype))


class ParamsShapedStateError(ValueError):
  """A state with params-shaped statistics does not fit the gradients."""


def gradients_step(
    weighting: base.Weighting,
    task_losses: chex.Array,
    state: Any,
    task_grads: Any,
    shared: Any = None,
    weight_task_specific: bool = False,
) -> tuple[Any, Any]:
  """Losses and per-task gradients → the update and the new state (guarded).

  The step of the strategies that read the per-task gradients themselves
  (:attr:`Needs.GRADIENTS`): the rule returns the combined update. With
  ``shared`` (a mask of bools like the params) the rule sees the shared
  parameters' gradients only (the others are zero) and every task-specific
  parameter receives ``Σ_k g_k``, its own task's gradient (unless
  ``weight_task_specific``: then the rule sees every gradient and its update
  is applied everywhere). A task whose gradient is not finite anywhere is
  excluded from the step: zero for the rule and for its own parameters,
  counted in ``num_rejected_gradients`` where the state has it.

  Raises:
    ParamsShapedStateError: the state keeps statistics shaped like other
      params (``init(None)``, or params of another model).
  """
  task_axis = 1 if weighting.num_samples > 1 else 0
  kept = tree_lib.finite_tasks(task_grads, task_axis)
  task_grads = tree_lib.keep_tasks(task_grads, kept, task_axis)
  own = None if weight_task_specific else shared
  rule_grads = tree_lib.shared_only(task_grads, own)
  try:
    update, new_state = _guarded_rule(weighting, task_losses, state,
                                      lambda: rule_grads, kept)
  except (ValueError, TypeError) as error:
    if not ("structure" in str(error) or "init with the params" in str(error)):
      raise
    raise ParamsShapedStateError(
        "this strategy keeps per-task statistics shaped like the params "
        "(moco, db_mtl, excess_mtl, gradvac(groups='leaf')): its state does "
        "not fit these gradients. Initialise it with the params, "
        "strategy.init(params) (not init(None)); for a Flax NNX model, "
        "strategy.init(nnx.state(model, nnx.Param)).") from error
  if weighting.num_samples > 1:
    return own_gradients_of_samples(update, task_grads, own), new_state
  return tree_lib.own_gradients_for_task_specific(
      update, task_grads, own), new_state


def init_state(weighting: base.Weighting, options: StrategyOptions,
               params: Any) -> Any:
  if weighting.needs is base.Needs.GRADIENTS:
    # May keep params-shaped statistics: of plain arrays, also when given
    # nnx.state(model, nnx.Param), whose leaves are nnx.Param wrappers.
    state = weighting.init(plain_arrays(params))
  else:
    state = weighting.init()
  if options.recompute_every > 1:
    return RecomputeEveryState(inner=state,
                               steps_since_update=jnp.zeros([], jnp.int32))
  return state


def plain_arrays(tree: Any) -> Any:
  """``tree`` with Flax NNX ``Variable`` wrappers replaced by their values.

  Flax is not a dependency: when ``flax.nnx`` was never imported, ``tree``
  cannot hold its variables and is returned as it is.
  """
  nnx = sys.modules.get("flax.nnx")
  return tree if nnx is None else nnx.as_pure(tree)


# --------------------------------------------------------------------------
# The optax face.
# --------------------------------------------------------------------------


class StrategyUpdate:
  """The ``update`` of a strategy: ``Σ_k w_k task_grads[k]`` and the state.

  It carries the weighting and options (``value_and_grad`` reads them) and
  compiles its step once per strategy, so an un-jitted call does not
  retrace the solvers at every step.
  """

  def __init__(self, weighting: base.Weighting, options: StrategyOptions):
    self.weighting = weighting
    self.options = options
    self._compiled = jax.jit(self._update)
    self._reads_losses = None  # Known at the first update without losses.

  def __call__(self, task_grads, state, params=None, *, task_losses=None,
               **extra_args):
    del extra_args
    weighting = self.weighting
    if task_losses is None:
      task_losses = self._losses_when_not_given(task_grads, state)
    if weighting.num_samples > 1:
      task_losses = _check_sampled(task_grads, task_losses, weighting)
    else:
      task_losses = base.check_task_losses(task_losses, weighting.num_tasks)
      tree_lib.check_task_axis(task_grads, weighting.num_tasks, "task_grads")
    return self._compiled(task_grads, state, params, task_losses)

  def _losses_when_not_given(self, task_grads, state):
    """Ones, for a rule that does not read the losses; a TypeError else
    (as for a missing argument).

    Whether the rule reads them is seen in its traced program (once per
    strategy): a strategy that reads the Gramian or the gradients only
    (``upgrad``, ``mgda``, ...) needs no ``task_losses=``.
    """
    weighting = self.weighting
    num_tasks = weighting.num_tasks
    if self._reads_losses is None:
      self._reads_losses = _rule_reads_losses(weighting, task_grads, state)
    if self._reads_losses:
      raise TypeError(
          "this strategy reads the per-task losses: pass task_losses=... "
          f"(shape ({num_tasks},)) to update, e.g. "
          "optimizer.update(task_grads, opt_state, params, "
          "task_losses=task_losses).")
    return jnp.ones((num_tasks,), jnp.float32)

  def _update(self, task_grads, state, params, task_losses):
    weighting, options = self.weighting, self.options
    shared = None
    if weighting.needs is not base.Needs.LOSSES:
      template = params if params is not None else jax.tree.map(
          lambda grads: grads[(0,) * (1 + (weighting.num_samples > 1))],
          task_grads)
      shared = tree_lib.shared_mask(options.shared, template)
    own_gradients = None if options.weight_task_specific else shared
    # At least float32 (bf16 losses are read in float32); float64 losses
    # stay float64 under x64, so loss-driven weights are float64 there.
    losses32 = jax.lax.stop_gradient(task_losses).astype(
        jnp.promote_types(jnp.result_type(task_losses), jnp.float32))
    if weighting.needs is base.Needs.GRADIENTS:
      return gradients_step(weighting, losses32, state, task_grads, shared,
                            options.weight_task_specific)
    gradients_valid = None
    if weighting.needs is base.Needs.GRAMIAN:
      # A task with a non-finite gradient is excluded (zeroed, weight 0).
      gradients_valid = tree_lib.finite_tasks(task_grads)
      task_grads = tree_lib.keep_tasks(task_grads, gradients_valid)
    weights, new_state = weights_step(
        weighting, options, losses32, state,
        lambda: tree_lib.scaled_gramian(task_grads, shared), gradients_valid)
    return tree_lib.combine(weights, task_grads, own_gradients), new_state


def _rule_reads_losses(weighting: base.Weighting, task_grads: Any,
                       state: Any) -> bool:
  """Whether ``weighting.rule``'s output depends on its losses argument."""
  if (weighting.needs is base.Needs.LOSSES
      or weighting.requires_positive_losses):
    return True
  num_tasks = weighting.num_tasks
  inner = state.inner if isinstance(state, RecomputeEveryState) else state
  if weighting.needs is base.Needs.GRAMIAN:
    rule_input = jnp.eye(num_tasks, dtype=jnp.float32)
  else:
    rule_input = task_grads
  extra = dict(valid=jnp.ones((num_tasks,), bool)) if weighting.per_task else {}
  try:
    jaxpr = jax.make_jaxpr(
        lambda losses: weighting.rule(losses, inner, rule_input, **extra))(
            jnp.ones((num_tasks,), jnp.float32)).jaxpr
  except Exception:  # pylint: disable=broad-except
    return True  # Let the update itself report what is wrong.
  losses = jaxpr.invars[0]
  return (any(value is losses for eqn in jaxpr.eqns for value in eqn.invars)
          or any(value is losses for value in jaxpr.outvars))


def _check_sampled(task_grads, task_losses, weighting) -> chex.Array:
  """Checks ``[num_samples, T, ...]`` gradients; returns the mean losses."""
  num_samples, num_tasks = weighting.num_samples, weighting.num_tasks
  for path, leaf in jax.tree_util.tree_leaves_with_path(task_grads):
    if jnp.shape(leaf)[:2] != (num_samples, num_tasks):
      raise ValueError(
          f"task_grads must have leading axes ({num_samples}, {num_tasks}) "
          f"(minibatches, tasks) on every leaf, got shape {jnp.shape(leaf)} "
          f"at {jax.tree_util.keystr(path)}.")
  if not jax.tree.leaves(task_grads):
    raise ValueError("task_grads has no array leaves.")
  task_losses = jnp.asarray(task_losses)
  if task_losses.shape == (num_samples, num_tasks):
    task_losses = jnp.mean(task_losses, axis=0)
  return base.check_task_losses(task_losses, num_tasks)


def own_gradients_of_samples(update, sampled_grads, shared):
  """``update`` on the shared leaves; the mean over minibatches of
  ``Σ_k g_k`` on the task-specific ones."""
  if shared is None:
    return update
  mean_grads = jax.tree.map(
      lambda g: jnp.mean(g, axis=0) if jnp.issubdtype(g.dtype, jnp.inexact)
      else g[0], sampled_grads)
  return tree_lib.own_gradients_for_task_specific(update, mean_grads, shared)


def _strategy(weighting: base.Weighting,
              options: StrategyOptions) -> base.MultiTaskStrategy:
  def init_fn(params):
    return init_state(weighting, options, params)

  return base.MultiTaskStrategy(init_fn, StrategyUpdate(weighting, options))


def as_gradient_transformation(
    weighting: base.Weighting) -> base.MultiTaskStrategy:
  """Turns a weighting into a strategy (an optax transformation).

  ``update(task_grads, state, params=None, *, task_losses, **extra_args)``
  checks that every leaf of ``task_grads`` and ``task_losses`` has a leading
  axis of size ``num_tasks`` (a ``ValueError`` at trace time otherwise),
  computes the Gramian of ``task_grads`` if the rule needs it, and returns the
  params-shaped update ``Σ_k w_k · task_grads[k]``. Unknown keyword arguments
  are ignored. The result also runs in :func:`optax_mtl.value_and_grad`.

  Args:
    weighting: a :class:`optax_mtl.Weighting`.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    A strategy that weights each task by the inverse of its loss:

    >>> from typing import NamedTuple
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> class InverseLossState(NamedTuple):
    ...   weights: jnp.ndarray  # f32[T], the weights applied last.
    ...   num_skipped: jnp.ndarray  # i32[], rejected steps.
    >>> def inverse_loss(num_tasks):
    ...   def init():
    ...     return InverseLossState(**optax_mtl.common_state_fields(num_tasks))
    ...   def rule(task_losses, state, gramian):
    ...     return 1.0 / task_losses, state
    ...   return optax_mtl.as_gradient_transformation(optax_mtl.Weighting(
    ...       num_tasks=num_tasks, needs=optax_mtl.Needs.LOSSES, init=init,
    ...       rule=rule, requires_positive_losses=True))
    >>> strategy = inverse_loss(2)
    >>> update, state = strategy.update(
    ...     jnp.array([[2.0, 0.0], [0.0, 2.0]]), strategy.init(None),
    ...     task_losses=jnp.array([2.0, 4.0]))
    >>> update.tolist(), state.weights.tolist()
    ([1.0, 0.5], [0.5, 0.25])
  """
  if not isinstance(weighting, base.Weighting):
    raise ValueError(
        f"weighting must be an optax_mtl.Weighting, got {weighting!r}.")
  base.check_num_tasks(weighting.num_tasks)
  if not isinstance(weighting.needs, base.Needs):
    raise ValueError(
        f"weighting.needs must be an optax_mtl.Needs, got {weighting.needs!r}.")
  base.check_positive_int("weighting.num_samples", weighting.num_samples)
  if weighting.num_samples > 1 and weighting.needs is not base.Needs.GRADIENTS:
    raise ValueError(
        "weighting.num_samples > 1 needs Needs.GRADIENTS, got "
        f"{weighting.needs}.")
  degree = weighting.gramian_degree
  if degree is not None and (
      weighting.needs is not base.Needs.GRAMIAN
      or not isinstance(degree, (int, float)) or isinstance(degree, bool)
      or not abs(degree) < 1e3):
    raise ValueError(
        "weighting.gramian_degree must be None or a finite number, for "
        f"Needs.GRAMIAN only, got {degree!r} with {weighting.needs}.")
  if weighting.per_task and weighting.needs is base.Needs.GRADIENTS:
    raise ValueError(
        "weighting.per_task needs Needs.LOSSES or Needs.GRAMIAN (the guard "
        "keeps an excluded task's previous weight), got Needs.GRADIENTS.")
  return _strategy(weighting, StrategyOptions())


def strategy_parts(strategy: Any) -> tuple[base.Weighting, StrategyOptions]:
  """The weighting and options of a strategy; a clear error otherwise."""
  update = getattr(strategy, "update", None)
  if not isinstance(update, StrategyUpdate):
    raise ValueError(
        "strategy must be an optax_mtl strategy (e.g. optax_mtl.ema(3)), got "
        f"{type(strategy).__name__}. Chain it with an optimizer only on the "
        "optax face; value_and_grad and the wrappers take the strategy itself.")
  return update.weighting, update.options


def weighting_of(strategy: base.MultiTaskStrategy) -> base.Weighting:
  """The :class:`optax_mtl.Weighting` of a strategy.

  Examples:
    >>> import optax_mtl
    >>> optax_mtl.weighting_of(optax_mtl.mgda(3)).needs
    <Needs.GRAMIAN: 'gramian'>
  """
  return strategy_parts(strategy)[0]


def recompute_every(strategy: base.MultiTaskStrategy,
                    every: int) -> base.MultiTaskStrategy:
  """Recomputes a strategy's weights every ``every`` steps, reuses them between.

  On the steps in between, the previous weights are applied again: with
  :func:`optax_mtl.value_and_grad` such a step costs one backward pass, even
  for a strategy that reads the Gramian. A non-finite loss on such a step is
  counted in ``num_skipped`` like on any other step.

  The state is a :class:`RecomputeEveryState`; fields of the wrapped state
  read the same way (``state.weights``, ``state.solver_gap``).

  Args:
    strategy: an optax_mtl strategy.
    every: recompute the weights on steps 0, n, 2n, ... (an integer >= 1).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.recompute_every(optax_mtl.mgda(2), 3)
    >>> state = strategy.init(None)
    >>> for grads in ([[1.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]]):
    ...   update, state = strategy.update(
    ...       jnp.array(grads), state, task_losses=jnp.ones(2))
    >>> [round(w, 4) for w in state.weights.tolist()]  # From the first step.
    [0.8, 0.2]
    >>> int(state.steps_since_update)
    2
  """
  weighting, options = strategy_parts(strategy)
  every = base.check_positive_int("every", every)
  if weighting.needs is base.Needs.GRADIENTS:
    raise ValueError(
        "recompute_every needs a strategy that computes weights; this one "
        "transforms the per-task gradients themselves (Needs.GRADIENTS).")
  if options.recompute_every > 1:
    raise ValueError(
        "strategy already recomputes its weights every "
        f"{options.recompute_every} steps; got recompute_every({every}) again.")
  return _strategy(weighting, options._replace(recompute_every=every))


def with_shared_parameters(
    strategy: base.MultiTaskStrategy,
    shared: Any,
    *,
    weight_task_specific: bool = False,
) -> base.MultiTaskStrategy:
  """Declares which parameters all tasks share (optax face).

  A strategy that reads the Gramian then measures the task gradients on the
  shared parameters only, and every other (task-specific) parameter receives
  the plain sum of the task gradients, i.e. its own task's gradient,
  unweighted — the semantics of torchjd and LibMTL. Loss-weighting
  strategies weight the whole loss, so every parameter keeps
  ``Σ_k w_k ∇L_k`` under them.

  Args:
    strategy: an optax_mtl strategy.
    shared: a pytree of bools with the structure of the params (or a prefix
      of it, as ``optax.masked`` accepts), or a callable ``params -> bools``.
    weight_task_specific: give the task-specific parameters ``w_k ∇L_k``
      instead (the behaviour before version 0.2).

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.with_shared_parameters(
    ...     optax_mtl.mgda(2), {"trunk": True, "heads": False})
    >>> task_grads = {"trunk": jnp.array([[1.0, 0.0], [0.0, 2.0]]),
    ...               "heads": jnp.array([[3.0, 0.0], [0.0, 5.0]])}
    >>> update, state = strategy.update(
    ...     task_grads, strategy.init(None), task_losses=jnp.ones(2))
    >>> [round(u, 4) for u in update["trunk"].tolist()], update["heads"].tolist()
    ([0.8, 0.4], [3.0, 5.0])
  """
  weighting, options = strategy_parts(strategy)
  if shared is None:
    raise ValueError("shared must be a pytree of bools or a callable, got None.")
  weight_task_specific = base.check_bool("weight_task_specific",
                                         weight_task_specific)
  return _strategy(weighting, options._replace(
      shared=shared, weight_task_specific=weight_task_specific))
