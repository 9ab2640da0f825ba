"""CR-MOGM's weight smoothing, as a wrapper over any strategy with weights."""

from __future__ import annotations

import collections
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import step
from optax_mtl._src import tree as tree_lib

# The conventional fields the guard and the diagnostics read on a state
# (optax_mtl._src.base), besides weights and num_skipped; the smoothed state
# has those of the wrapped state.
_SOLVER_FIELDS = ("solver_iterations", "solver_gap", "solver_converged",
                  "solver_outcome")
_OPTIONAL_FIELDS = ("gradient_cosines",) + _SOLVER_FIELDS + (
    "num_rejected_losses", "num_rejected_gradients")


class SmoothWeightsState(tuple):
  """State of :func:`smooth_weights` (a NamedTuple; see its fields below).

  * ``weights`` (f32[T]): the smoothed weights ``λ_k``, applied last;
  * ``num_skipped`` (i32[]): rejected steps;
  * the other conventional fields of the wrapped state
    (``gradient_cosines``, ``solver_*``, ``num_rejected_losses``,
    ``num_rejected_gradients``), kept
    here, where the guard and :func:`optax_mtl.diagnostics` read them;
  * ``started`` (bool[T]): whether ``λ_{k−1}`` exists: a step was accepted
    for the task, or ``initial_weights`` were given;
  * ``inner_state``: the wrapped strategy's state, whose ``weights`` are
    its own (unsmoothed) weights ``λ̂_k``. Its other conventional fields
    are not maintained (read them on this state).

  Any other field of the wrapped state is read on ``state.inner_state``
  (``state.inner_state.solution``), as on every wrapper's state; reading it
  here, as optax_mtl 0.1 allowed, still works for one release, with a
  ``DeprecationWarning``. The NamedTuple type depends on which conventional
  fields the wrapped state has: ``isinstance(state, SmoothWeightsState)``
  holds for every one.
  """

  __slots__ = ()

  def __getattr__(self, name):
    if name.startswith("__") or name == "inner_state":
      raise AttributeError(name)
    value = getattr(self.inner_state, name)
    deprecation.warn(f"reading SmoothWeightsState.{name}",
                     f"state.inner_state.{name}")
    return value


@functools.cache
def _state_type(optional_fields: tuple[str, ...]) -> type:
  """The NamedTuple type with these conventional fields (one per set, so
  that states of one strategy share a type: a pytree node, a checkpoint)."""
  fields = ("weights", "num_skipped") + optional_fields + (
      "started", "inner_state")
  base_type = collections.namedtuple("SmoothWeightsFields", fields)
  return type("SmoothWeightsState", (SmoothWeightsState, base_type),
              {"__slots__": (), "__module__": __name__,
               "__doc__": SmoothWeightsState.__doc__})


def smooth_weights(
    strategy: base.MultiTaskStrategy,
    decay: float = 0.9,
    initial_weights: Optional[Sequence[float]] = None,
) -> base.MultiTaskStrategy:
  r"""Smooths a strategy's weights by a moving average across steps (CR-MOGM).

  .. math::
    \lambda_k = \alpha\,\lambda_{k-1} + (1 - \alpha)\,\hat\lambda_k,

  with ``λ̂_k`` the wrapped strategy's weights at step ``k`` and ``α`` the
  ``decay``; ``λ_0 = λ̂_1`` (so the first accepted step applies ``λ̂_1``; per
  task, for a per-task strategy), or the given ``initial_weights``. Zhou et
  al. (2022) show that smoothing the weights of a stochastic multi-objective
  gradient method (MGDA, PCGrad, CAGrad, ...) removes the bias that noisy
  weights put in its update, and so makes it converge. The update applies the
  smoothed weights to this step's gradients, ``d_k = Σ_t λ_{k,t} g_t``.

  It wraps any strategy that produces weights, loss-only or Gramian-based,
  and keeps its cost: through :func:`optax_mtl.value_and_grad` a loss-only
  strategy still takes one backward pass. A strategy over the per-task
  gradients (``Needs.GRADIENTS``: graddrop, moco, ...) returns an update,
  not weights, and is refused. The wrapped strategy runs on its own
  (unsmoothed) weights, e.g. as the warm start of its solver; they are kept
  in ``state.inner_state.weights``.

  A rejected step (a non-finite loss, or Gramian; a non-positive loss where
  the wrapped strategy divides by it) leaves ``λ`` and the wrapped state
  untouched and applies the previous smoothed weights. For a per-task
  strategy, a task excluded by a bad loss keeps its smoothed weight and the
  wrapped strategy's statistics for it, as without the wrapper.

  Combines with :func:`optax_mtl.recompute_every` (either order: the
  weights are smoothed at each recomputation) and
  :func:`optax_mtl.with_shared_parameters`.

  Options that reproduce torchjd's ``CRMOGMWeighting(weighting, alpha,
  initial_weights)``: ``decay = alpha`` (0.9 there and here),
  ``initial_weights`` alike. The paper's schedule ``α_k = 1 − η_k/η_0``
  (Corollary 1) can be given through ``optax.inject_hyperparams``.

  Args:
    strategy: an optax_mtl strategy whose rule returns weights
      (``Needs.LOSSES`` or ``Needs.GRAMIAN``).
    decay: ``α`` in ``[0, 1]``: 0 applies ``λ̂_k`` itself, 1 keeps ``λ_0``.
    initial_weights: ``λ_0``, T finite numbers; None: ``λ̂_1``.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy` whose state is a
    :class:`SmoothWeightsState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.smooth_weights(optax_mtl.mgda(2), decay=0.5)
    >>> state = strategy.init(None)
    >>> for grads in ([[1.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, 1.0]]):
    ...   update, state = strategy.update(
    ...       jnp.array(grads), state, task_losses=jnp.ones(2))
    >>> state.inner_state.weights.tolist()  # MGDA's own: λ̂_2.
    [0.5, 0.5]
    >>> [round(w, 4) for w in state.weights.tolist()]  # ½ (0.8, 0.2) + ½ λ̂_2
    [0.65, 0.35]

  References:
    Zhou, Zhang, Jiang, Zhong, Gu & Zhu, `On the Convergence of Stochastic
    Multi-Objective Gradient Manipulation and Beyond
    <https://proceedings.neurips.cc/paper_files/paper/2022/hash/f91bd64a3620aad8e70a27ad9cb3ca57-Abstract-Conference.html>`_,
    NeurIPS 2022; torchjd's ``CRMOGMWeighting``.
  """
  weighting, options = step.strategy_parts(strategy)
  if isinstance(weighting, base.GradientRule):
    raise ValueError(
        "smooth_weights needs a strategy that computes weights (a Weighting); "
        f"{weighting.title} is a GradientRule: it transforms the per-task "
        "gradients themselves and returns an update, not weights. Smooth a "
        "weighting instead (e.g. optax_mtl.mgda).")
  decay = base.check_in_range("decay", decay, 0.0, 1.0)
  num_tasks = weighting.num_tasks
  initial = (None if initial_weights is None else base.check_task_vector(
      "initial_weights", initial_weights, num_tasks, allow_scalar=False))
  template = jax.eval_shape(weighting.init)
  optional = tuple(f for f in _OPTIONAL_FIELDS if f in template._fields)
  state_type = _state_type(optional)
  solver_fields = tuple(f for f in _SOLVER_FIELDS if f in optional)

  def init():
    inner = weighting.init()
    weights = (inner.weights if initial is None
               else jnp.asarray(initial, jnp.float32))
    return state_type(
        weights=jnp.array(weights, jnp.float32),
        num_skipped=jnp.zeros([], jnp.int32),
        **{f: jnp.array(getattr(inner, f)) for f in optional},
        started=jnp.full((num_tasks,), initial is not None),
        inner_state=inner)

  def rule(task_losses, state, rule_input, valid=None):
    previous_raw = state.inner_state.weights
    if weighting.per_task:
      if valid is None:  # Run as a whole-step weighting: every task valid.
        valid = jnp.ones((num_tasks,), bool)
      raw, inner, accepted = step.rule_output(weighting.rule(
          task_losses, state.inner_state, rule_input, valid=valid))
      # An excluded task keeps its previous weights, smoothed or not.
      raw = jnp.where(valid, raw, previous_raw.astype(raw.dtype))
    else:
      raw, inner, accepted = step.rule_output(weighting.rule(
          task_losses, state.inner_state, rule_input))
    inner = inner._replace(weights=raw.astype(previous_raw.dtype))
    if "gradient_cosines" in optional:
      inner = inner._replace(gradient_cosines=tree_lib.cosine_matrix(
          rule_input).astype(jnp.float32))
    previous = jnp.where(state.started, state.weights.astype(raw.dtype), raw)
    alpha = jnp.asarray(decay, raw.dtype)
    smoothed = alpha * previous + (1 - alpha) * raw
    return smoothed, state._replace(
        started=state.started | (True if valid is None else valid),
        inner_state=inner,
        **{f: getattr(inner, f) for f in solver_fields}), accepted

  return step._strategy(base.Weighting(  # pylint: disable=protected-access
      num_tasks=num_tasks, needs=weighting.needs, init=init, rule=rule,
      requires_positive_losses=weighting.requires_positive_losses,
      num_samples=weighting.num_samples, per_task=weighting.per_task,
      # Smoothing is linear in the weights: scale-free weights stay so.
      gramian_degree=0 if weighting.gramian_degree == 0 else None),
                                    options)
