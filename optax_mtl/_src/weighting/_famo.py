"""FAMO: fast adaptive multitask optimization (learned task logits)."""

import functools
from typing import Any, NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import step

OPTIMIZERS = ("adam", "sgd")


class FamoState(NamedTuple):
  """State of :func:`famo`."""

  weights: chex.Array  # f32[T], the weights applied last (Σ w = 1).
  # i32[], steps rejected as a whole (no valid loss; in the re-measured
  # variant also a logits update with no valid re-measured loss).
  num_skipped: chex.Array
  num_rejected_losses: chex.Array  # i32[T], bad losses per task.
  logits: chex.Array  # f32[T], ξ; the task weights are z = softmax(ξ).
  # The optax state of each logit's optimizer (one per task, so that an
  # excluded task keeps its own): (EmptyState(), ScaleByAdamState(count
  # i32[T], mu f32[T], nu f32[T]), EmptyState()) for "adam";
  # (EmptyState(), EmptyState()) for "sgd".
  optimizer_state: Any
  previous_losses: chex.Array  # f32[T], each task's last accepted loss.
  # bool[T], whether a task's previous loss awaits the logits update (in
  # the re-measured variant, famo_update_logits clears it).
  has_previous_losses: chex.Array

  logits_optimizer = deprecation.renamed_field("optimizer_state")  # 0.1.


def _above_bounds(losses, min_losses):
  return losses - jnp.asarray(min_losses) > 0


def _shifted(losses, min_losses, eps):
  return losses - jnp.asarray(min_losses) + eps


def _famo_weights(logits, losses, min_losses, eps):
  """``w = c z / (L − b + ε)``, ``z = softmax(ξ)``, summing to one."""
  scaled = jax.nn.softmax(logits) / _shifted(losses, min_losses, eps)
  return scaled / jnp.sum(scaled)


def _logits_step(transformation, state, min_losses, eps, losses_before,
                 losses_after, paired):
  """One optimizer step of the paired tasks' ξ_k on ∇_ξ softmax(ξ)ᵀ δ
  (+ weight decay); the others keep ξ_k and their optimizer's state.

  An unpaired task's δ_k is the z-weighted mean of the paired ones', so
  that its gradient z_k (δ_k − zᵀδ) is 0 and the paired tasks' is FAMO's
  on them alone. Returns ``(logits, optimizer_state, finite)``.
  """
  delta = (jnp.log(_shifted(jnp.where(paired, losses_before, 1.0),
                            min_losses, eps))
           - jnp.log(_shifted(jnp.where(paired, losses_after, 1.0),
                              min_losses, eps)))
  z = jax.nn.softmax(state.logits)
  paired_z = jnp.where(paired, z, 0.0)
  mean = jnp.sum(paired_z * delta) / jnp.maximum(jnp.sum(paired_z),
                                                 jnp.finfo(z.dtype).tiny)
  delta = jnp.where(paired, delta, mean)
  # The softmax Jacobian diag(z) − z zᵀ is symmetric: Jᵀδ = z ⊙ (δ − zᵀδ).
  gradient = z * (delta - jnp.dot(z, delta))
  updates, optimizer_state = jax.vmap(transformation.update)(
      gradient, state.optimizer_state, state.logits)
  logits = jnp.where(paired, state.logits + updates,
                     state.logits).astype(jnp.float32)
  optimizer_state = jax.tree.map(
      lambda new, old: jnp.where(paired, new, old).astype(old.dtype),
      optimizer_state, state.optimizer_state)
  finite = jnp.all(jnp.isfinite(logits)) & step.all_finite(optimizer_state)
  return logits, optimizer_state, finite


def _update_logits(transformation, min_losses, eps, state, next_task_losses):
  """The re-measured variant's logits update (see famo_update_logits)."""
  losses_ok = jnp.isfinite(next_task_losses) & _above_bounds(
      next_task_losses, min_losses)
  pending = state.has_previous_losses
  paired = pending & losses_ok
  logits, optimizer_state, finite = _logits_step(
      transformation, state, min_losses, eps, state.previous_losses,
      next_task_losses, paired)
  apply = jnp.any(paired) & finite
  new_state = state._replace(
      logits=jnp.where(apply, logits, state.logits),
      optimizer_state=jax.tree.map(
          lambda new, old: jnp.where(apply, new, old).astype(old.dtype),
          optimizer_state, state.optimizer_state),
      has_previous_losses=jnp.zeros_like(pending),
      num_rejected_losses=jnp.where(
          pending & ~losses_ok,
          optax.safe_increment(state.num_rejected_losses),
          state.num_rejected_losses).astype(jnp.int32))
  return step.count_skipped(new_state, jnp.any(pending) & ~apply)


def famo(
    num_tasks: int,
    learning_rate: float = 0.025,
    weight_decay: float = 1e-3,
    min_losses: Optional[Sequence[float]] = None,
    *,
    remeasured_losses: bool = False,
    optimizer: str = "adam",
    eps: float = 1e-8,
) -> base.MultiTaskStrategy:
  r"""FAMO: weights that decrease every task's log loss at the same rate.

  FAMO (Liu et al. 2023) keeps task logits :math:`\xi` (zeros at the start)
  and :math:`z = \operatorname{softmax}(\xi)`. The model's update is the
  gradient of :math:`\sum_k z_k \log L_k` rescaled to a convex combination,

  .. math::
    d = c \sum_{k=1}^{T} \frac{z_k}{L_k} \nabla L_k, \qquad
    c = \Big(\sum_{k=1}^{T} \frac{z_k}{L_k}\Big)^{-1},
    \qquad\text{so}\qquad w_k = \frac{c\, z_k}{L_k},

  with :math:`L_k - b_k + \epsilon` in place of :math:`L_k` (``min_losses``
  :math:`b`, zeros by default, and :math:`\epsilon` as in the authors'
  code). After the model's step, the logits learn from the change of the
  log losses,

  .. math::
    \delta_k = \log L_k(\theta_t) - \log L_k(\theta_{t+1}), \qquad
    \xi \leftarrow \xi - \beta \big(J_z(\xi)^\top \delta + \gamma\, \xi\big),

  (:math:`J_z = \operatorname{diag}(z) - z z^\top`), which moves weight to
  the tasks whose loss decreased least. ``optimizer="sgd"`` is this update
  (the paper's Algorithm 1); ``"adam"`` (default) feeds
  :math:`J_z^\top \delta + \gamma \xi` to Adam (``optax.scale_by_adam``
  defaults) instead, as the authors' code and LibMTL do (PyTorch's
  ``Adam(weight_decay=γ)``).

  **Two variants.** :math:`L(\theta_{t+1})` is a second measurement:

  * ``remeasured_losses=False`` (default, one pass): at step t+1 the losses
    of the new batch, at :math:`\theta_{t+1}`, stand in for the re-measured
    ones. Each step first updates :math:`\xi` from the previous accepted
    step's losses and this step's, then computes this step's weights. It
    costs nothing extra and works unchanged in both faces; the benchmark
    suite uses it. :math:`\delta` then mixes the change of the parameters
    with the change of the batch.
  * ``remeasured_losses=True`` (the authors' code and LibMTL): the step only
    computes the weights. After the parameter update, evaluate the losses
    again *on the same batch* and call :func:`optax_mtl.famo_update_logits`
    with them; it takes the logits' step. It costs one extra forward pass.

  The authors' code also clips the model's gradient to norm 1
  (``max_norm``); chain ``optax.clip_by_global_norm(1.0)`` after the
  strategy for that.

  Defaults: ``learning_rate`` :math:`\beta = 0.025` (the paper, the authors'
  code and LibMTL), ``weight_decay`` :math:`\gamma = 10^{-3}` (LibMTL's
  ``FAMO_w_gamma`` and the authors' QM9 script; their CelebA script and
  their parser default use 0.01), ``eps = 1e-8`` (the authors' code).

  A bad loss (non-finite; zero or negative by default: a task without
  labels in the batch) excludes its task only: the task keeps its logit,
  its optimizer's state (each logit has its own, with its own Adam step
  count) and its previous weight, ``num_rejected_losses`` counts it, and
  the other tasks go on. In :math:`c` the excluded task's last accepted
  loss stands in; in the logits' update its :math:`\delta_k` is the
  :math:`z`-weighted mean of the other tasks', so that its gradient
  :math:`z_k(\delta_k - z^\top \delta)` is 0 and the others take FAMO's
  step among themselves. In the one-pass variant each task pairs its loss
  with its own last accepted one. With every loss valid this is FAMO
  exactly. A step with no valid loss, a loss at or below a given
  ``min_losses``, or a logits update that is not finite is rejected as a
  whole and counted in ``num_skipped``: the logits are kept and the previous
  weights applied.

  Args:
    num_tasks: the number of tasks T.
    learning_rate: the logits' learning rate :math:`\beta > 0`.
    weight_decay: the logits' weight decay :math:`\gamma \ge 0`.
    min_losses: None (zeros) or T finite lower bounds :math:`b` of the
      losses.
    remeasured_losses: False for the one-pass variant, True for the
      authors' (call :func:`optax_mtl.famo_update_logits` after each step).
    optimizer: ``"adam"`` (authors' code) or ``"sgd"`` (Algorithm 1).
    eps: the :math:`\epsilon \ge 0` added to :math:`L_k - b_k`.

  Returns:
    A :class:`optax_mtl.MultiTaskStrategy`.

  Examples:
    One pass (both faces as usual):

    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> strategy = optax_mtl.famo(num_tasks=2, learning_rate=0.1)
    >>> task_grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> state = strategy.init(None)
    >>> _, state = strategy.update(
    ...     task_grads, state, task_losses=jnp.array([1.0, 3.0]))
    >>> [round(w, 4) for w in state.weights.tolist()]  # z = ½: w ∝ 1/L.
    [0.75, 0.25]
    >>> _, state = strategy.update(  # Task 2 improved less: ξ_2 grows.
    ...     task_grads, state, task_losses=jnp.array([0.5, 2.9]))
    >>> [round(x, 4) for x in state.logits.tolist()]
    [-0.1, 0.1]

    The authors' variant re-measures the losses after the model's step:

    >>> strategy = optax_mtl.famo(2, learning_rate=0.1, remeasured_losses=True)
    >>> state = strategy.init(None)
    >>> _, state = strategy.update(
    ...     task_grads, state, task_losses=jnp.array([1.0, 3.0]))
    >>> # ... apply the update, evaluate the same batch again ...
    >>> state = optax_mtl.famo_update_logits(
    ...     strategy, state, jnp.array([0.5, 2.9]))
    >>> [round(x, 4) for x in state.logits.tolist()]
    [-0.1, 0.1]

  References:
    Liu, Feng, Stone & Liu, `FAMO: Fast Adaptive Multitask Optimization
    <https://arxiv.org/abs/2306.03792>`_, NeurIPS 2023 (Algorithm 1); the
    authors' code, Cranial-XIX/FAMO.
  """
  num_tasks = base.check_num_tasks(num_tasks)
  learning_rate = base.check_in_range("learning_rate", learning_rate, 0.0,
                                      low_inclusive=False)
  weight_decay = base.check_in_range("weight_decay", weight_decay, 0.0)
  remeasured_losses = base.check_bool("remeasured_losses", remeasured_losses)
  if not isinstance(optimizer, str) or optimizer not in OPTIMIZERS:
    raise ValueError(
        f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
  bounds = _check_min_losses(min_losses, num_tasks)
  eps = base.check_in_range("eps", eps, 0.0)
  transformation = optax.chain(
      optax.add_decayed_weights(weight_decay),
      *([optax.scale_by_adam()] if optimizer == "adam" else []),
      optax.scale_by_learning_rate(learning_rate))

  def rule(task_losses, state, gramian, valid=None):
    del gramian
    if valid is None:  # Run as a whole-step weighting: all valid here.
      valid = jnp.isfinite(task_losses)
    # A loss not above its bound (min_losses given) rejects the whole step.
    above_bounds = jnp.all(_above_bounds(task_losses, bounds) | ~valid)
    logits, optimizer_state = state.logits, state.optimizer_state
    update_ok = jnp.asarray(True)
    if not remeasured_losses:
      # Each valid task pairs its loss with its own last accepted one.
      logits, optimizer_state, update_ok = _logits_step(
          transformation, state, bounds, eps, state.previous_losses,
          task_losses, valid & state.has_previous_losses & above_bounds)
    # An excluded task's term in c is its last accepted loss.
    losses = jnp.where(valid, task_losses, state.previous_losses)
    new_state = state._replace(
        logits=logits, optimizer_state=optimizer_state,
        previous_losses=losses.astype(jnp.float32),
        has_previous_losses=(valid if remeasured_losses
                             else state.has_previous_losses | valid))
    # A failed logits step or a loss below its bound rejects the step.
    return (_famo_weights(logits, losses, bounds, eps), new_state,
            update_ok & above_bounds)

  if remeasured_losses:  # The update that famo_update_logits applies.
    rule.update_logits = functools.partial(_update_logits, transformation,
                                           bounds, eps)

  def init():
    logits = jnp.zeros((num_tasks,), jnp.float32)
    return FamoState(
        **base.common_state_fields(num_tasks, 1.0 / num_tasks,
                                   per_task=True),
        logits=logits,
        optimizer_state=jax.vmap(transformation.init)(logits),
        previous_losses=jnp.ones((num_tasks,), jnp.float32),
        has_previous_losses=jnp.zeros((num_tasks,), bool))

  return step.as_gradient_transformation(base.Weighting(
      num_tasks=num_tasks, needs=base.Needs.LOSSES, init=init, rule=rule,
      requires_positive_losses=min_losses is None, per_task=True))


def famo_update_logits(
    strategy: base.MultiTaskStrategy,
    state: Any,
    next_task_losses: chex.Array,
) -> Any:
  r"""FAMO's logits update from losses re-measured after the model's step.

  For ``optax_mtl.famo(..., remeasured_losses=True)`` (the authors'
  variant): after the step whose weights used the losses :math:`L(\theta_t)`
  of a batch, update the parameters, evaluate the losses of the *same*
  batch at :math:`\theta_{t+1}` and pass them here. The logits take one step
  on :math:`\delta = \log L(\theta_t) - \log L(\theta_{t+1})` (see
  :func:`optax_mtl.famo`). Works on both faces: ``state`` is any tree that
  holds :class:`optax_mtl.FamoState` (the strategy's own state, an optax
  chain's state, a :class:`optax_mtl.RecomputeEveryState`), and every
  ``FamoState`` in it is updated; the rest is returned unchanged. It is
  jittable.

  Nothing changes when the last weights step was rejected, or when this
  function was already called since it. A non-finite re-measured loss (or
  one not above ``min_losses``) of a task leaves that task's logit unchanged
  and is counted in its ``num_rejected_losses``; the other tasks take their
  step. When no task has a usable pair, the logits are unchanged and
  ``num_skipped`` counts it.

  Args:
    strategy: the strategy built by ``optax_mtl.famo(...,
      remeasured_losses=True)`` (possibly wrapped by
      :func:`optax_mtl.recompute_every` or
      :func:`optax_mtl.with_shared_parameters`).
    state: a tree holding that strategy's state.
    next_task_losses: f[T], the losses of the same batch after the step.

  Returns:
    ``state`` with every :class:`optax_mtl.FamoState` updated.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_mtl
    >>> famo = optax_mtl.famo(2, remeasured_losses=True)
    >>> optimizer = optax.chain(famo, optax.sgd(0.1))
    >>> def task_losses_fn(params):
    ...   return jnp.array([(params[0] - 1.0) ** 2 + 0.1, params[1] ** 2 + 1.0])
    >>> params = jnp.array([3.0, 2.0])
    >>> opt_state = optimizer.init(params)
    >>> @jax.jit
    ... def train_step(params, opt_state):
    ...   task_grads, task_losses = jax.jacrev(
    ...       lambda p: (task_losses_fn(p), task_losses_fn(p)), has_aux=True)(
    ...           params)
    ...   updates, opt_state = optimizer.update(
    ...       task_grads, opt_state, params, task_losses=task_losses)
    ...   params = optax.apply_updates(params, updates)
    ...   opt_state = optax_mtl.famo_update_logits(  # Same batch, new params.
    ...       famo, opt_state, task_losses_fn(params))
    ...   return params, opt_state
    >>> for _ in range(3):
    ...   params, opt_state = train_step(params, opt_state)
    >>> bool(opt_state[0].logits[1] > opt_state[0].logits[0])
    True
  """
  weighting = step.weighting_of(strategy)
  update_logits = getattr(weighting.rule, "update_logits", None)
  if update_logits is None:
    rule = weighting.rule
    raise ValueError(
        "famo_update_logits needs a strategy built by optax_mtl.famo(..., "
        "remeasured_losses=True); the one-pass famo updates its logits "
        "itself, got a strategy whose weighting is "
        f"{getattr(rule, '__qualname__', type(rule).__name__)}.")
  losses = base.check_task_losses(next_task_losses, weighting.num_tasks)
  losses = jax.lax.stop_gradient(losses).astype(jnp.float32)
  found = []

  def visit(node):
    if isinstance(node, FamoState):
      found.append(True)
      return update_logits(node, losses)
    return node

  new_state = jax.tree.map(visit, state,
                           is_leaf=lambda node: isinstance(node, FamoState))
  if not found:
    raise ValueError(
        "state holds no optax_mtl.FamoState: pass the state of the famo "
        f"strategy (or a tree that contains it), got {type(state).__name__}.")
  return new_state


def _check_min_losses(min_losses: Any, num_tasks: int):
  if min_losses is None:
    return np.zeros(num_tasks, np.float32)
  return base.check_task_vector("min_losses", min_losses, num_tasks)
