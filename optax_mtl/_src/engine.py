"""The training-step face: a ``jax.value_and_grad`` for multi-task losses.

``value_and_grad(loss_fn, strategy)`` returns ``step(params, state, *args)``
which evaluates the per-task losses, asks the strategy for its weights (or,
for a gradient rule, its update) and returns the combined gradient,
computing only what the strategy needs. The mode is chosen once, when the
step is built; each mode is one function that returns the losses and what
the guarded step needs (:class:`optax_mtl._src.step.RuleCall`):

==================  =====================================================
mode                what one step computes
==================  =====================================================
loss-only           one forward pass and one VJP with cotangent ``w``
Jacobian            the per-task Jacobian ``J`` (one ``vmap`` of the VJP
                    over the T unit cotangents), ``G = J Jᵀ`` leaf by leaf,
                    then ``Jᵀ w`` from the ``J`` already held; a gradient
                    rule gets ``J`` itself and returns the update
low-memory          never holds ``J``: for each task ``g_i = Jᵀ e_i`` (a VJP)
                    and the Gramian column ``J g_i`` (a JVP), one task at a
                    time under ``lax.map``; then one VJP with cotangent ``w``.
                    Memory O(params) instead of O(T · params)
per-layer           the Gramian layer by layer from each dense layer's
                    inputs and output cotangents (:mod:`per_layer`); then
                    one VJP with cotangent ``w``
representation      ``encoder_fn``: the Gramian (MGDA-UB), or for a gradient
                    rule the per-task gradients, with respect to the shared
                    representation ``z = encoder_fn(params)``; then one VJP
sampled             a gradient rule with ``num_samples`` minibatches: the
                    Jacobian of each, leaves ``[S, T, ...]``
==================  =====================================================

``step`` then makes one call of :func:`optax_mtl._src.step.run`: the guarded
rule, its output applied, the overflow count. With ``recompute_every`` a
``lax.cond`` there chooses between a step of the strategy (the mode's
Jacobian or Gramian, the rule, the weighted gradient) and one VJP with the
previous weights. The cond's branches and the low-memory ``lax.map`` body
go through :mod:`conv_layout`, which keeps their convolutions on XLA:CPU's
fast path.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import conv_layout
from optax_mtl._src import deprecation
from optax_mtl._src import per_layer
from optax_mtl._src import step as step_lib
from optax_mtl._src import tree as tree_lib

GRAMIAN_MODES = ("jacobian", "low_memory", "per_layer")


@deprecation.renamed_arguments(
    old_positional=("loss_fn", "strategy", "has_aux"))
def value_and_grad(
    loss_fn: Callable[..., Any],
    strategy: base.MultiTaskStrategy,
    *,
    has_aux: bool = False,
    encoder_fn: Optional[Callable[..., Any]] = None,
    shared: Any = None,
    gramian_mode: str = "jacobian",
    axis_name: Optional[str] = None,
    batch_axis: Optional[int] = None,
) -> Callable[..., Any]:
  """Makes a training step that balances the tasks of ``loss_fn``.

  Like ``jax.value_and_grad`` of the summed losses, but the tasks are
  weighted by the strategy, and only what the strategy needs is computed.

  Gradient rules: under a loss-weighting strategy every parameter receives
  ``Σ_k w_k ∇L_k``. Under a strategy that reads the Gramian, with ``shared``
  declared (here or by :func:`optax_mtl.with_shared_parameters`), the shared
  parameters receive ``Σ_k w_k ∇L_k`` and every other parameter its own
  task's gradient, unweighted (as torchjd and LibMTL do); a
  :class:`optax_mtl.GradientRule` likewise updates the shared parameters
  only. Options the strategy cannot serve are refused here, when the step is
  built, not at its first call.

  Args:
    loss_fn: ``loss_fn(params, *args)`` returns the per-task losses, shape
      ``(num_tasks,)`` (or ``(task_losses, aux)`` with ``has_aux``). With
      ``encoder_fn`` it is called as ``loss_fn(params, representation,
      *args)``.
    strategy: an optax_mtl strategy, e.g. ``optax_mtl.loss_ema(num_tasks=3)``.
    has_aux: whether ``loss_fn`` returns ``(task_losses, aux)``
      (keyword-only; by position it is deprecated).
    encoder_fn: optional ``encoder_fn(params, *args) -> representation``. When
      given, Gramian strategies read the Gramian of the per-task gradients
      with respect to the representation (MGDA-UB, Sener & Koltun 2018)
      instead of the parameters: about the cost of one backward pass. A
      gradient rule then transforms the representation's gradients (refused
      when the step is built for a rule whose state is shaped like the
      params, or that samples several minibatches).
    shared: which parameters all tasks share, for strategies that read the
      Gramian or the gradients (see :func:`optax_mtl.with_shared_parameters`):
      a pytree of bools like the params (or a prefix of it), or a callable
      ``params -> bools``. None keeps the strategy's own declaration (by
      default every parameter is shared).
    gramian_mode: for strategies that read the Gramian, ``"jacobian"``
      (default: hold the per-task Jacobian, fastest) or ``"low_memory"``
      (Gram-vector products, never holds the Jacobian) or ``"per_layer"``
      (the Gramian layer by layer from each dense layer's inputs and output
      cotangents, never the per-task gradients of those layers; see
      :mod:`optax_mtl._src.per_layer`).
    axis_name: inside ``shard_map`` / ``pmap``, the name of the data axis:
      the losses and gradients (and the Jacobian or Gramian) are averaged
      over it, so every device holds the same strategy state. Not with
      ``encoder_fn`` for a strategy that transforms the per-task gradients
      (a ``ValueError``: its rule would see one device's batch).
    batch_axis: instance-wise objectives (IWRM): ``loss_fn`` returns one loss
      per example, shape ``(batch,)``, and the examples lie along this axis
      of every array argument whose axis has the batch size; the strategy's
      ``num_tasks`` is the batch size. With ``gramian_mode="per_layer"`` the
      per-example Gramian of a dense layer is ``(X Xᵀ) ⊙ (Δ Δᵀ)`` from ONE
      backward pass of the summed losses, which assumes that no example's
      loss reads another example (no BatchNorm in training mode); the other
      modes need nothing of the model.

  Returns:
    ``step(params, state, *args) -> ((task_losses, grads), new_state)``, or
    ``(((task_losses, aux), grads), new_state)`` with ``has_aux``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> def loss_fn(params, x):
    ...   return jnp.stack([jnp.sum((params * x) ** 2), jnp.sum(params ** 2)])
    >>> strategy = optax_mtl.equal(num_tasks=2)
    >>> step = optax_mtl.value_and_grad(loss_fn, strategy)
    >>> params = jnp.ones(3)
    >>> (losses, grads), state = step(params, strategy.init(params), 2.0)
    >>> losses.tolist(), grads.tolist()
    ([12.0, 3.0], [10.0, 10.0, 10.0])
  """
  rule, options, mode = build(
      strategy, has_aux=has_aux, encoder_fn=encoder_fn, shared=shared,
      gramian_mode=gramian_mode, axis_name=axis_name, batch_axis=batch_axis)

  def step(params, state, *args):
    if not jax.tree.leaves(params):
      raise ValueError("params has no array leaves: nothing to differentiate.")
    devices = _DeviceAverage.inside(axis_name)
    context = _Context(rule, options, devices.wrap(
        _checked_output(loss_fn, has_aux), has_aux), has_aux, devices,
                       encoder_fn, batch_axis)
    task_losses, aux, prepare, reuse = mode(context, params, args)
    losses32 = jax.lax.stop_gradient(task_losses).astype(jnp.float32)
    grads, new_state = step_lib.run(rule, options, losses32, state, prepare,
                                    reuse, count_overflow=True)
    if has_aux:
      return ((task_losses, aux), grads), new_state
    return (task_losses, grads), new_state

  return step


def build(
    strategy: base.MultiTaskStrategy,
    *,
    has_aux: bool = False,
    encoder_fn: Any = None,
    shared: Any = None,
    gramian_mode: str = "jacobian",
    axis_name: Optional[str] = None,
    batch_axis: Optional[int] = None,
) -> tuple[step_lib.Rule, step_lib.StrategyOptions, Callable[..., Any]]:
  """Checks the options of a training step; returns the rule, options, mode.

  Every refusal of an option that the strategy cannot serve is here, when
  the step is built (both faces call it), and reads the rule's declared
  properties (its type, ``num_samples``, ``state_like_params``).
  """
  rule, options = step_lib.strategy_parts(strategy)
  if shared is not None:
    options = options._replace(shared=shared)
  base.check_bool("has_aux", has_aux)
  if gramian_mode not in GRAMIAN_MODES:
    raise ValueError(
        f"gramian_mode must be one of {GRAMIAN_MODES}, got {gramian_mode!r}.")
  if encoder_fn is not None and not callable(encoder_fn):
    raise ValueError(
        "encoder_fn must be a callable (params or model, *args) -> "
        f"representation, or None, got {encoder_fn!r}.")
  _check_per_layer(gramian_mode, encoder_fn, axis_name, batch_axis)
  if isinstance(rule, base.GradientRule):
    if encoder_fn is not None:
      _check_gradient_rule_on_representation(rule, axis_name)
    if rule.num_samples > 1:
      return rule, options, _sampled
    return rule, options, (_jacobian if encoder_fn is None
                           else _representation)
  if rule.needs is base.Needs.LOSSES:
    return rule, options, _loss_only
  if encoder_fn is not None:
    return rule, options, _representation
  return rule, options, {"jacobian": _jacobian, "low_memory": _low_memory,
                         "per_layer": _per_layer}[gramian_mode]


def _check_gradient_rule_on_representation(rule, axis_name):
  """Refuses ``encoder_fn`` for the gradient rules that cannot serve it."""
  if rule.num_samples > 1:
    raise ValueError(
        f"{rule.title} samples {rule.num_samples} minibatches per step and "
        "reads the parameters' gradients: encoder_fn is not supported with "
        "it. Leave encoder_fn out, or use a weighting that reads the Gramian "
        "(e.g. optax_mtl.upgrad) with encoder_fn.")
  if rule.state_like_params:
    raise ValueError(
        f"{rule.title} keeps per-task statistics shaped like the params, so "
        "it cannot read the representation's gradients: use it without "
        "encoder_fn, or use a weighting that reads the Gramian (e.g. "
        "optax_mtl.upgrad) with encoder_fn.")
  if axis_name is not None:
    # Its per-task representation gradients are per example: each device
    # holds its own batch's, and the rule (GradDrop's purity, its random
    # mask, trimmed_mean's per-coordinate order) would act on the local
    # batch alone, not on what one device would see.
    raise ValueError(
        f"{rule.title} transforms the per-task gradients, so it cannot read "
        "the representation's gradients across devices (encoder_fn with "
        f"axis_name={axis_name!r}): each device would apply the rule to its "
        "own batch. Use jax.jit with a sharded batch (no shard_map), or "
        "leave encoder_fn out (the parameters' gradients are averaged over "
        "the axis).")


def _check_per_layer(gramian_mode, encoder_fn, axis_name, batch_axis):
  """Refuses the options that ``gramian_mode="per_layer"`` cannot serve."""
  if batch_axis is not None and (
      isinstance(batch_axis, bool) or not isinstance(batch_axis, int)
      or batch_axis < 0):
    raise ValueError(
        f"batch_axis must be None or a non-negative int, got {batch_axis!r}.")
  if gramian_mode != "per_layer":
    return
  if encoder_fn is not None:
    raise ValueError(
        "gramian_mode='per_layer' reads the Gramian of the parameters; "
        "encoder_fn reads that of the representation: use one of them, got "
        f"encoder_fn={encoder_fn!r}.")
  if axis_name is not None:
    raise ValueError(
        "gramian_mode='per_layer' cannot yet average over a named data axis "
        f"(axis_name={axis_name!r}): shard the batch under jax.jit instead, "
        "or use gramian_mode='jacobian'.")


def check_output(out: Any, has_aux: bool) -> tuple[Any, Any]:
  """A loss function's output as ``(task_losses, aux)``, with a clear error.

  The one check of both faces that the output fits ``has_aux``.
  """
  if not has_aux:
    if isinstance(out, (tuple, list)):
      raise ValueError(
          f"loss_fn returned a {type(out).__name__} of {len(out)} items: "
          "return the per-task losses as one array of shape (num_tasks,), "
          "e.g. jnp.stack([loss_a, loss_b, ...]). If it returns "
          "(task_losses, aux), pass has_aux=True.")
    return out, None
  if not (isinstance(out, (tuple, list)) and len(out) == 2):
    raise ValueError(
        "with has_aux=True, loss_fn must return (task_losses, aux), got "
        f"{type(out).__name__}.")
  return out[0], out[1]


def _checked_output(loss_fn, has_aux):
  """``loss_fn`` with :func:`check_output` on what it returns."""

  def checked(*args):
    task_losses, aux = check_output(loss_fn(*args), has_aux)
    return (task_losses, aux) if has_aux else task_losses

  return checked


# --------------------------------------------------------------------------
# The modes: each returns (task_losses, aux, prepare, reuse).
# --------------------------------------------------------------------------


class _Context(NamedTuple):
  """What every mode reads, fixed for one step."""

  rule: step_lib.Rule
  options: step_lib.StrategyOptions
  loss_fn: Callable[..., Any]  # Checked and averaged over devices.
  has_aux: bool
  devices: "_DeviceAverage"
  encoder_fn: Optional[Callable[..., Any]]
  batch_axis: Optional[int]

  @property
  def num_tasks(self) -> int:
    return self.rule.num_tasks


class _Forward(NamedTuple):
  """One forward pass: its losses and how to differentiate them."""

  out: jax.Array  # [T], this device's losses.
  vjp_fn: Callable[[jax.Array], tuple[Any]]  # Loss cotangent → (grads,).
  aux: Any

  def jacobian(self, devices):
    """The per-task gradients: one ``vmap`` of the VJP (leaves [T, ...])."""
    eye = jnp.eye(self.out.shape[0], dtype=self.out.dtype)
    return devices.mean(jax.vmap(self.vjp_fn)(eye)[0])


def _forward(context, params, args) -> _Forward:
  """The forward pass of the full loss, checked for its shape."""
  forward = _Forward(*_vjp(lambda p: context.loss_fn(p, *args), (params,),
                           context.has_aux))
  base.check_task_losses(forward.out, context.num_tasks)
  return forward


def _backward(context, forward, own_gradients=None):
  """``weights -> Σ_k w_k ∇L_k`` by one VJP (the task-specific leaves of
  ``own_gradients`` get ``Σ_k ∇L_k``, a second VJP)."""
  out, vjp_fn, devices = forward.out, forward.vjp_fn, context.devices

  def weighted(weights):
    if jnp.finfo(out.dtype).max >= jnp.finfo(jnp.float32).max:
      return devices.mean(vjp_fn(weights.astype(out.dtype))[0])
    # float16: weights like 1/L overflow its range (6.5e4), so the VJP runs
    # with weights scaled to at most 1, and the scale is put back in
    # float32.
    scale = jnp.maximum(jnp.max(jnp.abs(weights)), 1.0)
    scaled = vjp_fn((weights / scale).astype(out.dtype))[0]
    return devices.mean(jax.tree.map(
        lambda g: (g.astype(jnp.float32) * scale).astype(g.dtype)
        if jnp.issubdtype(g.dtype, jnp.inexact) else g, scaled))

  if own_gradients is None or all(jax.tree.leaves(own_gradients)):
    return weighted

  def with_own_gradients(weights):
    unweighted = weighted(jnp.ones_like(weights))
    return jax.tree.map(lambda keep, g, u: g if keep else u, own_gradients,
                        weighted(weights), unweighted)

  return with_own_gradients


def _loss_only(context, params, args):
  """A loss weighting: the weights are the cotangent of one VJP."""
  if context.encoder_fn is None:
    forward = _forward(context, params, args)
  else:
    forward = _encoder_forward(context, params, args)[0]
  backward = _backward(context, forward)
  return (context.devices.mean(forward.out), forward.aux,
          lambda: step_lib.RuleCall(None, backward), backward)


def _jacobian(context, params, args, forward=None):
  """The per-task Jacobian, held once: the rule's input and ``Jᵀw``."""
  forward = forward or _forward(context, params, args)
  options, devices = context.options, context.devices
  task_losses = devices.mean(forward.out)
  if isinstance(context.rule, base.GradientRule):
    call = lambda: step_lib.RuleCall(
        lambda: forward.jacobian(devices), lambda update: update,
        own_gradients=options.own_gradients_mask(params))
    return task_losses, forward.aux, call, None
  shared = options.shared_mask(params)
  own = options.own_gradients_mask(params)

  def prepare():
    # A task with a non-finite gradient is excluded (zeroed, weight 0).
    task_grads = forward.jacobian(devices)
    gradients_valid = tree_lib.finite_tasks(task_grads)
    task_grads = tree_lib.keep_tasks(task_grads, gradients_valid)
    return step_lib.RuleCall(
        lambda: tree_lib.scaled_gramian(task_grads, shared),
        lambda weights: tree_lib.combine(weights, task_grads, own),
        gradients_valid)

  return task_losses, forward.aux, prepare, _backward(context, forward, own)


def _gramian_then_backward(context, forward, params, gramian_fn):
  """A Gramian by ``gramian_fn``, then the weights by one VJP."""
  backward = _backward(context, forward,
                       context.options.own_gradients_mask(params))
  return (context.devices.mean(forward.out), forward.aux,
          lambda: step_lib.RuleCall(gramian_fn, backward), backward)


def _low_memory(context, params, args):
  """Gram-vector products: never holds the Jacobian."""
  forward = _forward(context, params, args)
  full_loss = lambda p: context.loss_fn(p, *args)
  mask = context.options.shared_mask(params)
  return _gramian_then_backward(
      context, forward, params, lambda: _low_memory_gramian(
          full_loss, forward, params, mask, context))


def _per_layer(context, params, args):
  """The Gramian layer by layer (:mod:`per_layer`), where that is cheaper."""
  linearized = per_layer.linearize(context.loss_fn, params, args,
                                   context.has_aux,
                                   batch_axis=context.batch_axis)
  forward = _Forward(linearized.out, linearized.vjp_fn, linearized.aux)
  base.check_task_losses(forward.out, context.num_tasks)
  mask = context.options.shared_mask(params)
  if not linearized.saves(mask, context.num_tasks):
    # No layer has a cheaper route (a batch larger than every dense layer
    # is wide, say): the Jacobian's.
    return _jacobian(context, params, args, forward)
  return _gramian_then_backward(
      context, forward, params,
      lambda: linearized.gramian(mask, context.num_tasks))


def _representation(context, params, args):
  """``encoder_fn``: the rule reads the representation's gradients."""
  forward, representation_vjp, split_backward = _encoder_forward(
      context, params, args)
  devices, out = context.devices, forward.out
  eye = jnp.eye(context.num_tasks, dtype=out.dtype)
  if not isinstance(context.rule, base.GradientRule):
    gramian_fn = lambda: devices.sum_gramian(tree_lib.gramian(
        jax.vmap(representation_vjp)(eye)))
    return _gramian_then_backward(context, forward, params, gramian_fn)
  # The rule transforms the gradients with respect to the shared
  # representation; the heads receive their own tasks' gradients (nothing
  # for a task whose gradient is not finite).
  representation_grads = jax.vmap(representation_vjp)(eye)
  kept = tree_lib.finite_tasks(representation_grads).astype(out.dtype)
  call = lambda: step_lib.RuleCall(
      lambda: representation_grads,
      lambda update: devices.mean(split_backward(update, kept)))
  return devices.mean(out), forward.aux, call, None


def _sampled(context, params, args):
  """A gradient rule that reads ``num_samples`` independent minibatches.

  Every array in ``args`` has a leading axis of size ``num_samples``: entry
  ``s`` is minibatch ``s``. The per-task Jacobian of each minibatch is
  handed to the rule (leaves ``[num_samples, T, ...]``); the losses returned
  are the mean over the minibatches.
  """
  num_samples = context.rule.num_samples
  for leaf in jax.tree.leaves(args):
    if jnp.shape(leaf)[:1] != (num_samples,):
      raise ValueError(
          f"this strategy samples {num_samples} minibatches per step: every "
          f"data argument needs a leading axis of size {num_samples}, got "
          f"shape {jnp.shape(leaf)}.")

  def one_sample(*sample_args):
    forward = _forward(context, params, sample_args)
    return (context.devices.mean(forward.out),
            forward.jacobian(context.devices), forward.aux)

  outs, task_grads, aux = jax.vmap(one_sample)(*args)
  call = lambda: step_lib.RuleCall(
      lambda: task_grads, lambda update: update,
      own_gradients=context.options.own_gradients_mask(params))
  return jnp.mean(outs, axis=0), aux, call, None


# --------------------------------------------------------------------------
# Differentiation helpers.
# --------------------------------------------------------------------------


def _encoder_forward(context, params, args):
  """One forward pass through the encoder, then the heads.

  Returns ``(forward, representation_vjp, split_backward)``: ``forward``'s
  VJP maps a cotangent of the losses to the full parameter gradient,
  ``representation_vjp`` to the gradient with respect to the
  representation, and ``split_backward`` backpropagates a representation
  cotangent through the encoder and a loss cotangent through the heads.
  """
  representation, encoder_vjp = jax.vjp(
      lambda p: context.encoder_fn(p, *args), params)
  out, heads_vjp, aux = _vjp(lambda p, z: context.loss_fn(p, z, *args),
                             (params, representation), context.has_aux)
  base.check_task_losses(out, context.num_tasks)

  def vjp_fn(cotangent):
    params_part, representation_part = heads_vjp(cotangent)
    (encoder_part,) = encoder_vjp(representation_part)
    return (jax.tree.map(_add_cotangents, params_part, encoder_part),)

  def split_backward(representation_cotangent, loss_cotangent):
    """The heads' parameters from ``loss_cotangent``, the encoder's from
    ``representation_cotangent``."""
    params_part, _ = heads_vjp(loss_cotangent)
    (encoder_part,) = encoder_vjp(representation_cotangent)
    return jax.tree.map(_add_cotangents, params_part, encoder_part)

  return (_Forward(out, vjp_fn, aux),
          lambda cotangent: heads_vjp(cotangent)[1], split_backward)


def _add_cotangents(a, b):
  if not jnp.issubdtype(a.dtype, jnp.inexact):
    return a  # float0: an integer parameter.
  return a + b


def _low_memory_gramian(full_loss, forward, params, mask, context):
  """``G = J Jᵀ`` one column at a time: ``g_i = Jᵀe_i``, then ``J g_i``."""
  dtype, devices = forward.out.dtype, context.devices
  num_tasks = context.num_tasks

  def column(index):
    unit = jax.nn.one_hot(index, num_tasks, dtype=dtype)
    task_grad = devices.mean(forward.vjp_fn(unit)[0])
    tangent = jax.tree.map(
        lambda g, keep: g if keep or not jnp.issubdtype(g.dtype, jnp.inexact)
        else jnp.zeros_like(g), task_grad, mask)
    if context.has_aux:
      _, gram_column, _ = jax.jvp(full_loss, (params,), (tangent,),
                                  has_aux=True)
    else:
      _, gram_column = jax.jvp(full_loss, (params,), (tangent,))
    column_dtype = jnp.promote_types(dtype, jnp.float32)
    return devices.mean(gram_column).astype(column_dtype)

  # Under lax.map, XLA:CPU runs a convolution fast only in its canonical
  # form (conv_layout).
  gramian = jax.lax.map(conv_layout.canonical_convolutions(column),
                        jnp.arange(num_tasks))
  return 0.5 * (gramian + gramian.T)


def _vjp(fun, primals, has_aux):
  """``jax.vjp`` that always returns ``(out, vjp_fn, aux)``."""
  if has_aux:
    return jax.vjp(fun, *primals, has_aux=True)
  out, vjp_fn = jax.vjp(fun, *primals)
  return out, vjp_fn, None


class _DeviceAverage:
  """Averages over the data axis of ``shard_map`` / ``pmap``, if one is named.

  The global loss is the mean of the devices' local losses. Two regimes,
  told apart when the step starts (from how ``lax.axis_index`` is typed),
  not while the loss is traced:

  * values are typed as varying over the axis (``shard_map`` with its
    default ``check_vma=True``): a local loss that varies over the axis is
    ``pmean``-ed inside the loss function, so its VJP already yields the
    global gradients of the replicated parameters (AD sums their cotangents
    over devices) and nothing is averaged afterwards;
  * otherwise (``check_vma=False``, ``pmap``): losses, gradients, Jacobians
    and Gramian columns are ``pmean``-ed explicitly after the fact.
  """

  def __init__(self, axis_name: Optional[str], averaged_inside: bool):
    self.axis_name = axis_name
    self.averaged_inside = averaged_inside

  @classmethod
  def inside(cls, axis_name: Optional[str]) -> "_DeviceAverage":
    """The averaging for a step traced now (inside its ``shard_map``)."""
    if axis_name is None:
      return cls(None, False)
    typed = axis_name in _varying_axes(jax.lax.axis_index(axis_name))
    return cls(axis_name, typed)

  def wrap(self, loss_fn, has_aux):
    if not self.averaged_inside:
      return loss_fn

    def averaged(*args):
      out = loss_fn(*args)
      losses = out[0] if has_aux else out
      if self.axis_name in _varying_axes(losses):
        losses = jax.lax.pmean(losses, self.axis_name)
      return (losses, out[1]) if has_aux else losses

    return averaged

  def mean(self, tree):
    if self.axis_name is None or self.averaged_inside:
      return tree
    return jax.lax.pmean(tree, self.axis_name)

  def sum_gramian(self, local_gramian):
    """The Gramian of representation gradients, summed over devices."""
    if self.axis_name is None:
      return local_gramian
    total = jax.lax.psum(local_gramian, self.axis_name)
    if self.averaged_inside:
      # Each local gradient already carries the 1/n of the global mean.
      return total
    # The local gradients are those of the local losses: the global loss is
    # their mean over n devices, so the global Gramian is Σ G_local / n².
    num_devices = jax.lax.psum(1, self.axis_name)
    return total / num_devices**2


def _varying_axes(value) -> frozenset:
  """The mesh axes over which ``value`` is typed as varying (shard_map)."""
  aval = jax.typeof(value)
  varying = getattr(aval, "vma", None)  # jax < 0.10.
  if varying is None:
    manual_axis_type = getattr(aval, "manual_axis_type", None)
    varying = getattr(manual_axis_type, "varying", None)
  return frozenset(varying or ())
