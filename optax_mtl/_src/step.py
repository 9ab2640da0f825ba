"""The one guarded step both faces run, and the transformations built on it.

A step of any strategy reads top to bottom (:func:`run`):

1. the face's ``prepare()`` gives the rule's input (the Gramian, or the
   per-task gradients, computed lazily) and how to apply its output;
2. the guard checks the losses and that input, calls the rule, and accepts
   the result or keeps the previous state (:func:`guarded`; one guard per
   rule type, around the one :func:`_accept_or_keep`). For a per-task
   weighting a bad loss excludes its task only (previous weight and
   statistics, counted in ``num_rejected_losses``);
3. the weights (or the update) are applied, and, on the training-step face,
   a gradient that overflowed although the losses were finite is counted.

With :func:`recompute_every`, a ``lax.cond`` chooses between that step and
the previous weights applied again. The optax face
(:func:`as_gradient_transformation`) and the training-step face
(:func:`optax_mtl.value_and_grad`) each call :func:`run` exactly once per
step and differ only in how they prepare the rule's input and apply its
output.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

from optax_mtl._src import base
from optax_mtl._src import conv_layout
from optax_mtl._src import deprecation
from optax_mtl._src import tree as tree_lib

# Either rule type.
Rule = Union[base.Weighting, base.GradientRule]


class StrategyOptions(NamedTuple):
  """How a rule is applied, set by the wrappers (defaults: plain)."""

  # Recompute the weights every n steps and reuse them in between.
  recompute_every: int = 1
  # Which parameters are shared (None: all), see tree.shared_mask.
  shared: Any = None
  # Whether task-specific (non-shared) parameters receive w_k ∇L_k rather
  # than their own task's gradient ∇L_k (rules that read gradients only).
  weight_task_specific: bool = False

  def shared_mask(self, params: Any) -> Any:
    """The bools of the shared parameters (all True when none declared)."""
    return tree_lib.shared_mask(self.shared, params)

  def own_gradients_mask(self, params: Any) -> Any:
    """The mask whose False leaves receive their own task's gradient.

    The one rule for task-specific parameters under a rule that reads the
    gradients: the shared mask, or None (every parameter weighted alike)
    with ``weight_task_specific``.
    """
    return None if self.weight_task_specific else self.shared_mask(params)


class RecomputeEveryState(NamedTuple):
  """State of :func:`recompute_every`.

  The wrapped strategy's state is ``inner_state`` (read its fields there:
  ``state.inner_state.weights``); :func:`optax_mtl.diagnostics` reads it
  as a strategy state.
  """

  inner_state: Any  # The wrapped strategy's state.
  steps_since_update: chex.Array  # i32[], 0 at init; 1 right after a recompute.

  inner = deprecation.renamed_field("inner_state")

  def __getattr__(self, name):
    # Reading a field of the inner state here is deprecated (optax_mtl 0.1
    # forwarded it); kept for one release.
    if name.startswith("_"):
      raise AttributeError(name)
    value = getattr(self.inner_state, name)
    deprecation.warn(f"reading RecomputeEveryState.{name}",
                     f"state.inner_state.{name}")
    return value


def unwrapped(state: Any) -> Any:
  """The strategy state inside a :class:`RecomputeEveryState` (or itself)."""
  return state.inner_state if isinstance(state, RecomputeEveryState) else state


class RuleCall(NamedTuple):
  """What a face hands the guard for one step, and how to apply the result.

  ``rule_input_fn() -> G`` (a Weighting that reads the Gramian) or the
  per-task gradients (a GradientRule); None for a loss-only weighting.
  ``apply_fn(weights or update) -> the step's gradient``.
  ``gradients_valid``: optional bool[T], the tasks whose gradient is finite
  (a Weighting; a GradientRule's guard finds them itself).
  ``own_gradients``: for a GradientRule, the mask whose False leaves get
  their own task's gradient (:meth:`StrategyOptions.own_gradients_mask`).
  """

  rule_input_fn: Optional[Callable[[], Any]]
  apply_fn: Callable[[Any], Any]
  gradients_valid: Optional[chex.Array] = None
  own_gradients: Any = None


# --------------------------------------------------------------------------
# The guarded step.
# --------------------------------------------------------------------------


def run(
    rule: Rule,
    options: StrategyOptions,
    task_losses: chex.Array,
    state: Any,
    prepare: Callable[[], RuleCall],
    reuse: Optional[Callable[[chex.Array], Any]] = None,
    *,
    count_overflow: bool = False,
) -> tuple[Any, Any]:
  """One step of a strategy: the guarded rule, then its output applied.

  Args:
    rule: the strategy's :class:`~optax_mtl.Weighting` or
      :class:`~optax_mtl.GradientRule`.
    options: how it is applied (:class:`StrategyOptions`).
    task_losses: f32[T] (at least float32), already checked for shape.
    state: the strategy's state (a :class:`RecomputeEveryState` when
      ``options.recompute_every > 1``).
    prepare: ``() -> RuleCall``; called only on the steps that run the rule
      (so under ``recompute_every`` the Jacobian or the Gramian is computed
      inside the recomputing branch only).
    reuse: ``(previous weights) -> gradient``, the step between
      recomputations (``recompute_every`` only).
    count_overflow: count in ``num_skipped`` a step whose gradient is not
      finite although the losses are (and, for a rule that reads gradients,
      return a zero gradient then): the training-step face.

  Returns:
    ``(gradient, new_state)``.
  """

  def recompute(inner):
    call = prepare()
    output, inner = guarded(rule, task_losses, inner, call.rule_input_fn,
                            call.gradients_valid, call.own_gradients)
    return call.apply_fn(output), inner

  if options.recompute_every == 1:
    grads, new_state = recompute(state)
  else:
    grads, new_state = _recompute_or_reuse(rule, options, task_losses, state,
                                           recompute, reuse)
  if not count_overflow:
    return grads, new_state
  grads_finite = all_finite(grads)
  overflow = (jnp.all(jnp.isfinite(task_losses)) & ~grads_finite
              & (unwrapped(new_state).num_skipped
                 == unwrapped(state).num_skipped))
  new_state = count_skipped(new_state, overflow)
  if rule.needs is not base.Needs.LOSSES:
    # A rule that reads gradients never lets a non-finite one reach the
    # parameters: where excluding its task did not remove it (a VJP of
    # 0 · NaN), the step's gradient is zero.
    grads = _zero_unless(grads_finite, grads)
  return grads, new_state


def weights_step(
    weighting: base.Weighting,
    options: StrategyOptions,
    task_losses: chex.Array,
    state: Any,
    gramian_fn: Optional[Callable[[], chex.Array]] = None,
    gradients_valid: Optional[chex.Array] = None,
) -> tuple[chex.Array, Any]:
  """Losses (and a Gramian) → the weights to apply and the new state.

  :func:`run` with the weights themselves as its output (the solver
  benchmarks time this part of a step).
  """
  return run(weighting, options, task_losses, state,
             lambda: RuleCall(gramian_fn, lambda weights: weights,
                              gradients_valid),
             lambda weights: weights)


def _recompute_or_reuse(
    rule: base.Weighting,
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
  """
  out_types = jax.eval_shape(recompute, state.inner_state)[0]

  def reuse_branch(inner):
    valid = _valid_losses(rule, task_losses)
    out = jax.tree.map(lambda value, like: value.astype(like.dtype),
                       reuse(inner.weights), out_types)
    return out, _count_rejections(rule, inner, valid,
                                  ~_step_ok(rule, valid))

  due = state.steps_since_update % options.recompute_every == 0
  out, inner = jax.lax.cond(
      due, conv_layout.canonical_convolutions(recompute),
      conv_layout.canonical_convolutions(reuse_branch), state.inner_state)
  steps = jnp.where(due, 1, optax.safe_increment(state.steps_since_update))
  return out, RecomputeEveryState(inner, steps.astype(jnp.int32))


def guarded(rule: Rule, task_losses: chex.Array, state: Any,
            rule_input_fn: Optional[Callable[[], Any]] = None,
            gradients_valid: Optional[chex.Array] = None,
            own_gradients: Any = None) -> tuple[Any, Any]:
  """Runs ``rule`` behind the guard of its type; see the two guards."""
  if isinstance(rule, base.GradientRule):
    return _guarded_update(rule, task_losses, state, rule_input_fn,
                           own_gradients)
  return _guarded_weights(rule, task_losses, state, rule_input_fn,
                          gradients_valid)


def _valid_losses(rule: Rule, task_losses: chex.Array) -> chex.Array:
  """bool[T]: the losses the rule may use (finite; > 0 where it must be)."""
  valid = jnp.isfinite(task_losses)
  if rule.requires_positive_losses:
    valid &= task_losses > 0
  return valid


def _step_ok(rule: Rule, valid: chex.Array) -> chex.Array:
  """Whether the losses let the step go on: all valid, or (per task) any."""
  return jnp.any(valid) if rule.per_task else jnp.all(valid)


def _count_rejections(rule: Rule, state: Any, valid: chex.Array,
                      skipped: chex.Array,
                      kept: Optional[chex.Array] = None) -> Any:
  """``num_skipped`` += ``skipped``; per task, ``num_rejected_losses`` +=
  ``~valid`` (every bad loss, whether or not the step went on) and
  ``num_rejected_gradients`` += ``~kept`` (where the state has the field)."""
  state = count_skipped(state, skipped)
  if rule.per_task:
    counts = state.num_rejected_losses
    state = state._replace(num_rejected_losses=jnp.where(
        valid, counts, optax.safe_increment(counts)).astype(counts.dtype))
  if kept is not None and hasattr(state, "num_rejected_gradients"):
    counts = state.num_rejected_gradients
    state = state._replace(num_rejected_gradients=jnp.where(
        kept, counts, optax.safe_increment(counts)).astype(counts.dtype))
  return state


def _accept_or_keep(rule: Rule, ok: chex.Array, new_state: Any, state: Any,
                    valid: chex.Array, kept: chex.Array) -> Any:
  """The one accept-or-keep step of both guards.

  ``new_state`` where ``ok``, the previous ``state`` otherwise (with the
  step counted in ``num_skipped``); either way the bad losses and gradients
  are counted per task. Every leaf keeps the previous state's dtype.
  """
  accepted = _count_rejections(rule, new_state, valid, jnp.asarray(False),
                               kept)
  rejected = _count_rejections(rule, state, valid, jnp.asarray(True), kept)
  return jax.tree.map(lambda a, r: jnp.where(ok, a, r).astype(r.dtype),
                      accepted, rejected)


def _call_rule(rule: Rule, *args, **kwargs) -> tuple[Any, Any, chex.Array]:
  """``rule.rule(...)`` as ``(output, new_state, accepted)``."""
  return rule_output(rule.rule(*args, **kwargs))


def rule_output(returned: tuple) -> tuple[Any, Any, chex.Array]:
  """A rule's return value as ``(output, new_state, accepted)``.

  A rule returns ``(output, new_state)`` or ``(output, new_state,
  accepted)``, ``accepted`` a bool[] (see :class:`optax_mtl.Weighting`).
  """
  output, new_state, *accepted = returned
  if len(accepted) > 1:
    raise ValueError(
        "a rule returns (output, new_state) or (output, new_state, "
        f"accepted), got {2 + len(accepted)} values.")
  return output, new_state, (jnp.all(jnp.asarray(accepted[0], bool))
                             if accepted else jnp.asarray(True))


def count_skipped(state: Any, skipped: chex.Array) -> Any:
  """``state`` with ``num_skipped`` incremented where ``skipped`` is true."""
  if isinstance(state, RecomputeEveryState):
    return state._replace(inner_state=count_skipped(state.inner_state,
                                                    skipped))
  return state._replace(num_skipped=jnp.where(
      skipped, optax.safe_increment(state.num_skipped), state.num_skipped))


def all_finite(tree: Any) -> chex.Array:
  """Whether every floating-point leaf of ``tree`` is finite."""
  checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _zero_unless(ok: chex.Array, tree: Any) -> Any:
  """``tree`` where ``ok``, zeros (of each float leaf's dtype) otherwise."""
  return jax.tree.map(
      lambda g: jnp.where(ok, g, jnp.zeros_like(g))
      if jnp.issubdtype(g.dtype, jnp.inexact) else g, tree)


def _gramian_input(weighting, gramian_fn, gradients_valid):
  """The Gramian the rule sees, bool[T] kept tasks, usable, the exponent.

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
  if weighting.needs is not base.Needs.GRAMIAN:
    return None, kept, jnp.asarray(True), exponent
  gramian = gramian_fn()
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


def _guarded_weights(weighting, task_losses, state, gramian_fn,
                     gradients_valid=None):
  """A weighting's rule behind the guard: ``(weights to apply, new_state)``.

  ``gramian_fn`` gives the Gramian (:attr:`Needs.GRAMIAN`); it is not called
  for :attr:`Needs.LOSSES`. The step is accepted only when the losses, the
  Gramian, the weights and the new state are finite and the rule did not
  return ``accepted`` false; otherwise the previous state is kept,
  ``num_skipped`` counts the step and the previous weights are applied.

  For a per-task weighting (``weighting.per_task``) a bad loss excludes its
  task only: the rule gets ``valid`` (bool[T]) and the losses of the
  excluded tasks replaced by 1.0; an excluded task keeps its previous
  weight and ``num_rejected_losses`` counts it. The step is rejected as a
  whole only when no loss is valid, or the Gramian, the weights or the new
  state are not finite. With every loss valid the step is the same as for a
  weighting that is not per task.

  A task whose gradient is not finite (``gradients_valid``, or a non-finite
  diagonal entry of the Gramian) is excluded from the step: the rule sees
  it as a zero gradient, its applied weight is 0, the state keeps its
  previous weight, and ``num_rejected_gradients`` counts it where the state
  has that field.
  """
  valid = _valid_losses(weighting, task_losses)
  gramian, kept, usable, exponent = _gramian_input(weighting, gramian_fn,
                                                   gradients_valid)
  if weighting.per_task:
    # Only the excluded tasks' losses are replaced, and the rule is told
    # which they are.
    inputs_ok = usable & jnp.any(valid & kept)
    safe_losses = jnp.where(valid, task_losses, jnp.ones_like(task_losses))
    weights, new_state, accepted = _call_rule(
        weighting, safe_losses, state, gramian, valid=valid & kept)
  else:
    # Rejected losses are replaced by harmless ones, so that no rule ever
    # computes on a NaN (a solver loop on NaN could misbehave); the result
    # is discarded below.
    inputs_ok = usable & jnp.all(valid)
    safe_losses = jnp.where(inputs_ok, task_losses,
                            jnp.ones_like(task_losses))
    weights, new_state, accepted = _call_rule(weighting, safe_losses, state,
                                              gramian)
  weights = _unscaled_weights(weighting, weights, exponent)
  if weighting.per_task:
    # An excluded task keeps its previous weight, whatever the rule gave it.
    weights = jnp.where(valid & kept, weights, state.weights)
  # A task without a usable gradient keeps its weight in the state.
  new_state = new_state._replace(
      weights=jnp.where(kept, weights, state.weights.astype(weights.dtype)))
  if weighting.needs is base.Needs.GRAMIAN:
    new_state = new_state._replace(
        gradient_cosines=tree_lib.cosine_matrix(gramian))
  ok = inputs_ok & accepted & all_finite(weights) & all_finite(new_state)
  new_state = _accept_or_keep(weighting, ok, new_state, state, valid, kept)
  # The weights applied are the rule's own, in its dtype (float64 from a
  # float64 Gramian under x64); the state keeps them in float32. A task
  # without a usable gradient gets 0.
  applied = jnp.where(ok, weights, state.weights.astype(weights.dtype))
  return jnp.where(kept, applied, 0.0).astype(applied.dtype), new_state


def _unscaled_weights(weighting, weights, exponent):
  """The weights for ``G`` from the rule's for ``G / 4^e``: × ``2^{2ep}``."""
  degree = weighting.gramian_degree
  if degree is None or degree == 0:
    return weights
  if 2 * degree == int(2 * degree):  # Exact.
    return jnp.ldexp(weights, int(2 * degree) * exponent)
  return weights * jnp.exp2(2 * degree * exponent.astype(weights.dtype))


def _guarded_update(rule, task_losses, state, task_grads_fn, own_gradients):
  """A gradient rule behind the guard: ``(update, new_state)``.

  The rule gets the per-task gradients with the tasks whose gradient is not
  finite anywhere zeroed (counted in ``num_rejected_gradients`` where the
  state has it) and, with ``own_gradients`` (a mask of bools like the
  params), the shared parameters' gradients only; every task-specific
  parameter then receives ``Σ_k g_k``, its own task's gradient (for a
  sampling rule, the mean over the minibatches). The step is accepted only
  when the losses, the gradients, the update and the new state are finite
  and the rule did not return ``accepted`` false; otherwise the previous
  state is kept, ``num_skipped`` counts the step and the rule's update is
  zero.
  """
  task_axis = 1 if rule.num_samples > 1 else 0
  task_grads = task_grads_fn()
  kept = tree_lib.finite_tasks(task_grads, task_axis)
  task_grads = tree_lib.keep_tasks(task_grads, kept, task_axis)
  rule_grads = tree_lib.shared_only(task_grads, own_gradients)
  valid = _valid_losses(rule, task_losses)
  usable = jnp.any(kept) & all_finite(rule_grads)
  inputs_ok = usable & jnp.all(valid)
  safe_losses = jnp.where(inputs_ok, task_losses, jnp.ones_like(task_losses))
  update, new_state, accepted = _call_rule(
      rule, safe_losses, state, _zero_unless(usable, rule_grads))
  ok = inputs_ok & accepted & all_finite(update) & all_finite(new_state)
  new_state = _accept_or_keep(rule, ok, new_state, state, valid, kept)
  update = _zero_unless(ok, update)
  if rule.num_samples > 1:
    return _own_gradients_of_samples(update, task_grads,
                                     own_gradients), new_state
  return tree_lib.own_gradients_for_task_specific(
      update, task_grads, own_gradients), new_state


def _own_gradients_of_samples(update, sampled_grads, shared):
  """``update`` on the shared leaves; the mean over minibatches of
  ``Σ_k g_k`` on the task-specific ones."""
  if shared is None:
    return update
  mean_grads = jax.tree.map(
      lambda g: jnp.mean(g, axis=0) if jnp.issubdtype(g.dtype, jnp.inexact)
      else g[0], sampled_grads)
  return tree_lib.own_gradients_for_task_specific(update, mean_grads, shared)


def init_state(rule: Rule, options: StrategyOptions, params: Any) -> Any:
  """The strategy's initial state (wrapped for ``recompute_every``)."""
  if isinstance(rule, base.GradientRule):
    if rule.state_like_params and params is None:
      raise ValueError(
          f"{rule.title} keeps per-task statistics shaped like the params: "
          "initialise it with the params, strategy.init(params) (not "
          "init(None)); for a Flax NNX model, "
          "strategy.init(nnx.state(model, nnx.Param)).")
    # Of plain arrays, also when given nnx.state(model, nnx.Param), whose
    # leaves are nnx.Param wrappers.
    state = rule.init(plain_arrays(params))
  else:
    state = rule.init()
  if options.recompute_every > 1:
    return RecomputeEveryState(inner_state=state,
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
  """The ``update`` of a strategy: the combined update and the new state.

  It carries the rule and options (``value_and_grad`` and the wrappers read
  them). Like every optax ``update``, it does not compile itself: jit the
  step that calls it.
  """

  def __init__(self, rule: Rule, options: StrategyOptions):
    self.weighting = rule  # The rule, of either type (weighting_of).
    self.options = options
    self._reads_losses = None  # Known at the first update without losses.

  def __call__(self, task_grads, state, params=None, *, task_losses=None,
               **extra_args):
    del extra_args
    rule = self.weighting
    if task_losses is None:
      task_losses = self._losses_when_not_given(task_grads, state)
    if rule.num_samples > 1:
      task_losses = _check_sampled(task_grads, task_losses, rule)
    else:
      task_losses = base.check_task_losses(task_losses, rule.num_tasks)
      tree_lib.check_task_axis(task_grads, rule.num_tasks, "task_grads")
    # At least float32 (bf16 losses are read in float32); float64 losses
    # stay float64 under x64, so loss-driven weights are float64 there.
    losses32 = jax.lax.stop_gradient(task_losses).astype(
        jnp.promote_types(jnp.result_type(task_losses), jnp.float32))
    prepare, reuse = _optax_face_call(rule, self.options, task_grads, params)
    return run(rule, self.options, losses32, state, prepare, reuse)

  def _losses_when_not_given(self, task_grads, state):
    """Ones, for a rule that does not read the losses; a TypeError else
    (as for a missing argument).

    Whether the rule reads them is seen in its traced program (once per
    strategy): a strategy that reads the Gramian or the gradients only
    (``upgrad``, ``mgda``, ...) needs no ``task_losses=``.
    """
    rule = self.weighting
    num_tasks = rule.num_tasks
    if self._reads_losses is None:
      self._reads_losses = _rule_reads_losses(rule, task_grads, state)
    if self._reads_losses:
      raise TypeError(
          "this strategy reads the per-task losses: pass task_losses=... "
          f"(shape ({num_tasks},)) to update, e.g. "
          "optimizer.update(task_grads, opt_state, params, "
          "task_losses=task_losses).")
    return jnp.ones((num_tasks,), jnp.float32)


def _optax_face_call(rule, options, task_grads, params):
  """``(prepare, reuse)`` for :func:`run` on given per-task gradients."""
  if isinstance(rule, base.GradientRule):
    template = params if params is not None else jax.tree.map(
        lambda grads: grads[(0,) * (1 + (rule.num_samples > 1))],
        task_grads)
    call = RuleCall(lambda: task_grads, lambda update: update,
                    own_gradients=options.own_gradients_mask(template))
    return lambda: call, None
  if rule.needs is base.Needs.LOSSES:
    apply_fn = lambda weights: tree_lib.combine(weights, task_grads)
    return lambda: RuleCall(None, apply_fn), apply_fn
  template = params if params is not None else jax.tree.map(
      lambda grads: grads[0], task_grads)
  shared = options.shared_mask(template)
  own = options.own_gradients_mask(template)
  # A task with a non-finite gradient is excluded (zeroed, weight 0).
  gradients_valid = tree_lib.finite_tasks(task_grads)
  task_grads = tree_lib.keep_tasks(task_grads, gradients_valid)
  apply_fn = lambda weights: tree_lib.combine(weights, task_grads, own)
  call = RuleCall(lambda: tree_lib.scaled_gramian(task_grads, shared),
                  apply_fn, gradients_valid)
  return lambda: call, apply_fn


def _rule_reads_losses(rule: Rule, task_grads: Any, state: Any) -> bool:
  """Whether ``rule.rule``'s output depends on its losses argument."""
  if rule.needs is base.Needs.LOSSES or rule.requires_positive_losses:
    return True
  num_tasks = rule.num_tasks
  inner = unwrapped(state)
  if rule.needs is base.Needs.GRAMIAN:
    rule_input = jnp.eye(num_tasks, dtype=jnp.float32)
  else:
    rule_input = task_grads
  extra = dict(valid=jnp.ones((num_tasks,), bool)) if rule.per_task else {}
  try:
    jaxpr = jax.make_jaxpr(
        lambda losses: rule.rule(losses, inner, rule_input, **extra))(
            jnp.ones((num_tasks,), jnp.float32)).jaxpr
  except Exception:  # pylint: disable=broad-except
    return True  # Let the update itself report what is wrong.
  losses = jaxpr.invars[0]
  return (any(value is losses for eqn in jaxpr.eqns for value in eqn.invars)
          or any(value is losses for value in jaxpr.outvars))


def _check_sampled(task_grads, task_losses, rule) -> chex.Array:
  """Checks ``[num_samples, T, ...]`` gradients; returns the mean losses."""
  num_samples, num_tasks = rule.num_samples, rule.num_tasks
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


def _strategy(rule: Rule, options: StrategyOptions) -> base.MultiTaskStrategy:
  def init_fn(params):
    return init_state(rule, options, params)

  return base.MultiTaskStrategy(init_fn, StrategyUpdate(rule, options))


def as_gradient_transformation(rule: Rule) -> base.MultiTaskStrategy:
  """Turns a weighting or a gradient rule into a strategy (an optax transformation).

  ``update(task_grads, state, params=None, *, task_losses, **extra_args)``
  checks that every leaf of ``task_grads`` and ``task_losses`` has a leading
  axis of size ``num_tasks`` (a ``ValueError`` at trace time otherwise),
  computes the Gramian of ``task_grads`` if the rule needs it, and returns the
  params-shaped update: ``Σ_k w_k · task_grads[k]`` for a weighting, the
  rule's own update for a gradient rule. Unknown keyword arguments are
  ignored. The result also runs in :func:`optax_mtl.value_and_grad`.

  Args:
    rule: a :class:`optax_mtl.Weighting` or a
      :class:`optax_mtl.GradientRule`. A ``Weighting`` that declares
      :attr:`Needs.GRADIENTS` (deprecated) is turned into a
      ``GradientRule`` with a ``DeprecationWarning``.

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
  if isinstance(rule, base.GradientRule):
    return _strategy(_checked_gradient_rule(rule), StrategyOptions())
  if not isinstance(rule, base.Weighting):
    raise ValueError(
        "rule must be an optax_mtl.Weighting or an optax_mtl.GradientRule, "
        f"got {rule!r}.")
  if rule.needs is base.Needs.GRADIENTS:
    deprecation.warn("optax_mtl.Weighting(needs=Needs.GRADIENTS, ...)",
                     "optax_mtl.GradientRule(num_tasks, init, rule, ...)")
    if rule.per_task:
      raise ValueError(
          "weighting.per_task needs Needs.LOSSES or Needs.GRAMIAN (the guard "
          "keeps an excluded task's previous weight), got Needs.GRADIENTS.")
    return as_gradient_transformation(base.GradientRule(
        num_tasks=rule.num_tasks, init=rule.init, rule=rule.rule,
        requires_positive_losses=rule.requires_positive_losses,
        num_samples=rule.num_samples))
  return _strategy(_checked_weighting(rule), StrategyOptions())


def _checked_weighting(weighting: base.Weighting) -> base.Weighting:
  """Checks a weighting's declared properties; returns it."""
  base.check_num_tasks(weighting.num_tasks)
  if not isinstance(weighting.needs, base.Needs):
    raise ValueError(
        f"weighting.needs must be an optax_mtl.Needs, got {weighting.needs!r}.")
  base.check_positive_int("weighting.num_samples", weighting.num_samples)
  if weighting.num_samples > 1:
    raise ValueError(
        "weighting.num_samples > 1 is a property of a gradient rule: build "
        "an optax_mtl.GradientRule(num_samples=...), got a Weighting with "
        f"{weighting.needs}.")
  degree = weighting.gramian_degree
  if degree is not None and (
      weighting.needs is not base.Needs.GRAMIAN
      or not isinstance(degree, (int, float)) or isinstance(degree, bool)
      or not abs(degree) < 1e3):
    raise ValueError(
        "weighting.gramian_degree must be None or a finite number, for "
        f"Needs.GRAMIAN only, got {degree!r} with {weighting.needs}.")
  return weighting


def _checked_gradient_rule(rule: base.GradientRule) -> base.GradientRule:
  """Checks a gradient rule's declared properties; returns it."""
  base.check_num_tasks(rule.num_tasks)
  base.check_positive_int("rule.num_samples", rule.num_samples)
  base.check_bool("rule.state_like_params", rule.state_like_params)
  if rule.name is not None and not isinstance(rule.name, str):
    raise ValueError(f"rule.name must be None or a str, got {rule.name!r}.")
  return rule


def strategy_parts(strategy: Any) -> tuple[Rule, StrategyOptions]:
  """The rule and options of a strategy; a clear error otherwise."""
  update = getattr(strategy, "update", None)
  if not isinstance(update, StrategyUpdate):
    raise ValueError(
        "strategy must be an optax_mtl strategy (e.g. optax_mtl.loss_ema(3)), "
        f"got {type(strategy).__name__}. Chain it with an optimizer only on "
        "the optax face; value_and_grad and the wrappers take the strategy "
        "itself.")
  return update.weighting, update.options


def weighting_of(strategy: base.MultiTaskStrategy) -> Rule:
  """The rule of a strategy: its :class:`optax_mtl.Weighting` or
  :class:`optax_mtl.GradientRule`.

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

  The state is a :class:`RecomputeEveryState`; the wrapped strategy's state
  is its ``inner_state``.

  Args:
    strategy: an optax_mtl strategy whose rule is a
      :class:`optax_mtl.Weighting` (a :class:`optax_mtl.GradientRule` has
      no weights to reuse: a ``ValueError``).
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
    >>> [round(w, 4) for w in state.inner_state.weights.tolist()]
    [0.8, 0.2]
    >>> int(state.steps_since_update)
    2
  """
  rule, options = strategy_parts(strategy)
  every = base.check_positive_int("every", every)
  if isinstance(rule, base.GradientRule):
    raise ValueError(
        f"recompute_every needs a strategy that computes weights; "
        f"{rule.title} is a GradientRule: it transforms the per-task "
        "gradients themselves, so there are no weights to reuse. Run it at "
        "every step, or recompute a weighting (e.g. optax_mtl.mgda) instead.")
  if options.recompute_every > 1:
    raise ValueError(
        "strategy already recomputes its weights every "
        f"{options.recompute_every} steps; got recompute_every({every}) again.")
  return _strategy(rule, options._replace(recompute_every=every))


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
      instead of their own task's gradient.

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
  rule, options = strategy_parts(strategy)
  if shared is None:
    raise ValueError("shared must be a pytree of bools or a callable, got None.")
  weight_task_specific = base.check_bool("weight_task_specific",
                                         weight_task_specific)
  return _strategy(rule, options._replace(
      shared=shared, weight_task_specific=weight_task_specific))
