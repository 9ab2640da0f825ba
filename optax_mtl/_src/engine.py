"""The training-step face: a ``jax.value_and_grad`` for multi-task losses.

``value_and_grad(loss_fn, strategy)`` returns ``step(params, state, *args)``
which evaluates the per-task losses, asks the strategy for its weights and
returns the combined gradient, computing only what the strategy needs:

==================  =====================================================
strategy needs      what one step computes
==================  =====================================================
losses              one forward pass and one VJP with cotangent ``w``
Gramian, jacobian   the per-task Jacobian ``J`` (one ``vmap`` of the VJP
                    over the T unit cotangents), ``G = J Jᵀ`` leaf by leaf,
                    then ``Jᵀ w`` from the ``J`` already held
Gramian, low_memory never holds ``J``: for each task ``g_i = Jᵀ e_i`` (a VJP)
                    and the Gramian column ``J g_i`` (a JVP), one task at a
                    time under ``lax.map``; then one VJP with cotangent ``w``.
                    Memory O(params) instead of O(T · params)
Gramian, encoder_fn MGDA-UB: the Gramian of the gradients with respect to
                    the shared representation ``z = encoder_fn(params)``;
                    then one VJP with cotangent ``w``
gradients           the per-task Jacobian ``J``, handed to the rule, which
                    returns the update (memory O(T · params), like the
                    Jacobian mode); with ``encoder_fn``, the per-task
                    gradients with respect to the representation instead,
                    then one VJP through the encoder
==================  =====================================================

With ``recompute_every`` (Jacobian mode), a ``lax.cond`` chooses between a
step of the strategy (``J``, ``G``, the rule, ``Jᵀw``) and one VJP with the
previous weights; in the other modes the cond holds the Gramian and the rule,
and the VJP with cotangent ``w`` runs after it. The cond's branches and the
low-memory ``lax.map`` body go through :mod:`conv_layout`, which keeps their
convolutions on XLA:CPU's fast path.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import conv_layout
from optax_mtl._src import per_layer
from optax_mtl._src import step as step_lib
from optax_mtl._src import tree as tree_lib

GRAMIAN_MODES = ("jacobian", "low_memory", "per_layer")


def value_and_grad(
    loss_fn: Callable[..., Any],
    strategy: base.MultiTaskStrategy,
    has_aux: bool = False,
    *,
    shared: Any = None,
    gramian_mode: str = "jacobian",
    encoder_fn: Optional[Callable[..., Any]] = None,
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
  task's gradient, unweighted (as torchjd and LibMTL do).

  Args:
    loss_fn: ``loss_fn(params, *args)`` returns the per-task losses, shape
      ``(num_tasks,)`` (or ``(task_losses, aux)`` with ``has_aux``). With
      ``encoder_fn`` it is called as ``loss_fn(params, representation,
      *args)``.
    strategy: an optax_mtl strategy, e.g. ``optax_mtl.loss_ema(num_tasks=3)``.
    has_aux: whether ``loss_fn`` returns ``(task_losses, aux)``.
    shared: which parameters all tasks share, for strategies that read the
      Gramian (see :func:`optax_mtl.with_shared_parameters`): a pytree of
      bools like the params (or a prefix of it), or a callable
      ``params -> bools``. None keeps the strategy's own declaration (by
      default every parameter is shared).
    gramian_mode: for strategies that read the Gramian, ``"jacobian"``
      (default: hold the per-task Jacobian, fastest) or ``"low_memory"``
      (Gram-vector products, never holds the Jacobian) or ``"per_layer"``
      (the Gramian layer by layer from each dense layer's inputs and output
      cotangents, never the per-task gradients of those layers; see
      :mod:`optax_mtl._src.per_layer`).
    encoder_fn: optional ``encoder_fn(params, *args) -> representation``. When
      given, Gramian strategies read the Gramian of the per-task gradients
      with respect to the representation (MGDA-UB, Sener & Koltun 2018)
      instead of the parameters: about the cost of one backward pass.
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
  weighting, options = step_lib.strategy_parts(strategy)
  if shared is not None:
    options = options._replace(shared=shared)
  if gramian_mode not in GRAMIAN_MODES:
    raise ValueError(
        f"gramian_mode must be one of {GRAMIAN_MODES}, got {gramian_mode!r}.")
  has_aux = base.check_bool("has_aux", has_aux)
  num_tasks = weighting.num_tasks
  per_layer_mode = (gramian_mode == "per_layer"
                    and weighting.needs is base.Needs.GRAMIAN)
  _check_per_layer(gramian_mode, encoder_fn, axis_name, batch_axis)

  if weighting.num_samples > 1 and encoder_fn is not None:
    raise ValueError(
        "a strategy that samples several minibatches per step reads the "
        "parameters' gradients: encoder_fn is not supported with it.")
  if (weighting.needs is base.Needs.GRADIENTS and encoder_fn is not None
      and axis_name is not None):
    # Its per-task representation gradients are per example: each device
    # holds its own batch's, and the rule (GradDrop's purity, its random
    # mask, trimmed_mean's per-coordinate order) would act on the local
    # batch alone, not on what one device would see.
    raise ValueError(
        "a strategy that transforms the per-task gradients (graddrop, "
        "trimmed_mean, ...) cannot read the representation's gradients "
        f"across devices (encoder_fn with axis_name={axis_name!r}): each "
        "device would apply the rule to its own batch. Use jax.jit with a "
        "sharded batch (no shard_map), or leave encoder_fn out (the "
        "parameters' gradients are averaged over the axis).")

  def step(params, state, *args):
    if not jax.tree.leaves(params):
      raise ValueError("params has no array leaves: nothing to differentiate.")
    devices = _DeviceAverage(axis_name)
    task_loss_fn = devices.wrap(_checked_output(loss_fn, has_aux), has_aux)
    if weighting.num_samples > 1:
      return _sampled_step(weighting, options, task_loss_fn, has_aux, devices,
                           params, state, args)
    if per_layer_mode:
      linearized = per_layer.linearize(task_loss_fn, params, args, has_aux,
                                       batch_axis=batch_axis)
      out, vjp_fn, aux = linearized.out, linearized.vjp_fn, linearized.aux
      full_loss = representation_vjp = None
    elif encoder_fn is None:
      full_loss = lambda p: task_loss_fn(p, *args)
      out, vjp_fn, aux = _vjp(full_loss, (params,), has_aux)
      representation_vjp = None
    else:
      full_loss = None
      out, vjp_fn, aux, representation_vjp, split_backward = _encoder_vjp(
          encoder_fn, task_loss_fn, params, args, has_aux)
    base.check_task_losses(out, num_tasks)
    task_losses = devices.mean(out)
    losses32 = jax.lax.stop_gradient(task_losses).astype(jnp.float32)

    def backward(weights):
      if jnp.finfo(out.dtype).max >= jnp.finfo(jnp.float32).max:
        return devices.mean(vjp_fn(weights.astype(out.dtype))[0])
      # float16: weights like 1/L overflow its range (6.5e4), so the VJP
      # runs with weights scaled to at most 1, and the scale is put back in
      # float32.
      scale = jnp.maximum(jnp.max(jnp.abs(weights)), 1.0)
      scaled = vjp_fn((weights / scale).astype(out.dtype))[0]
      return devices.mean(jax.tree.map(
          lambda g: (g.astype(jnp.float32) * scale).astype(g.dtype)
          if jnp.issubdtype(g.dtype, jnp.inexact) else g, scaled))

    def jacobian():
      return devices.mean(
          jax.vmap(vjp_fn)(jnp.eye(num_tasks, dtype=out.dtype))[0])

    if weighting.needs is base.Needs.LOSSES:
      weights, new_state = step_lib.weights_step(weighting, options, losses32,
                                                 state)
      grads = backward(weights)
    elif weighting.needs is base.Needs.GRADIENTS:
      if representation_vjp is not None:
        # The rule transforms the gradients with respect to the shared
        # representation; the heads receive their own tasks' gradients.
        representation_grads = jax.vmap(representation_vjp)(
            jnp.eye(num_tasks, dtype=out.dtype))
        try:
          update, new_state = step_lib.gradients_step(
              weighting, losses32, state, representation_grads)
        except step_lib.ParamsShapedStateError as error:
          raise ValueError(
              "this strategy keeps per-task statistics shaped like the params "
              "(moco, db_mtl, excess_mtl, gradvac(groups='leaf')), so it "
              "cannot read the representation's gradients: use it without "
              "encoder_fn.") from error
        # The heads of a task whose gradient is not finite get nothing.
        kept = tree_lib.finite_tasks(representation_grads)
        grads = devices.mean(split_backward(update, kept.astype(out.dtype)))
      else:
        grads, new_state = step_lib.gradients_step(
            weighting, losses32, state, jacobian(),
            tree_lib.shared_mask(options.shared, params),
            options.weight_task_specific)
    else:
      shared_mask = tree_lib.shared_mask(options.shared, params)
      own_gradients = None if options.weight_task_specific else shared_mask

      def weighted_backward(weights):
        grads = backward(weights)
        if own_gradients is not None and not all(
            jax.tree.leaves(own_gradients)):
          unweighted = backward(jnp.ones_like(weights))
          grads = jax.tree.map(lambda keep, g, u: g if keep else u,
                               own_gradients, grads, unweighted)
        return grads

      def jacobian_step(inner):
        # Hold J once: the Gramian and the combination Jᵀw both read it. A
        # task with a non-finite gradient is excluded (zeroed, weight 0).
        task_grads = jacobian()
        gradients_valid = tree_lib.finite_tasks(task_grads)
        task_grads = tree_lib.keep_tasks(task_grads, gradients_valid)
        weights, inner = step_lib.weights_step(
            weighting, options._replace(recompute_every=1), losses32, inner,
            lambda: tree_lib.scaled_gramian(task_grads, shared_mask),
            gradients_valid)
        return tree_lib.combine(weights, task_grads, own_gradients), inner

      # "per_layer" takes the Jacobian's route where no layer has a cheaper
      # one (a batch larger than every dense layer is wide, say).
      jacobian_route = gramian_mode == "jacobian" or (
          per_layer_mode and not linearized.saves(shared_mask, num_tasks))
      if representation_vjp is None and jacobian_route:
        if options.recompute_every == 1:
          grads, new_state = jacobian_step(state)
        else:
          # A recomputing step costs a step of the strategy (J, G, Jᵀw), the
          # others one backward pass with the previous weights.
          grads, new_state = step_lib.recompute_or_reuse(
              weighting, options, losses32, state, jacobian_step,
              weighted_backward)
      else:
        if representation_vjp is not None:
          gramian_fn = lambda: _representation_gramian(
              representation_vjp, num_tasks, out.dtype, devices)
        elif per_layer_mode:
          gramian_fn = lambda: linearized.gramian(shared_mask, num_tasks)
        else:
          gramian_fn = lambda: _low_memory_gramian(
              full_loss, vjp_fn, params, shared_mask, num_tasks, out.dtype,
              has_aux, devices)
        weights, new_state = step_lib.weights_step(
            weighting, options, losses32, state, gramian_fn)
        grads = weighted_backward(weights)

    # A gradient that overflows although the losses were finite is counted.
    grads_finite = step_lib.all_finite(grads)
    overflow = (jnp.all(jnp.isfinite(losses32)) & ~grads_finite
                & (new_state.num_skipped == state.num_skipped))
    new_state = step_lib.count_skipped(new_state, overflow)
    if weighting.needs is not base.Needs.LOSSES:
      # A strategy that reads gradients never lets a non-finite one reach
      # the parameters: where excluding its task did not remove it (a VJP
      # of 0 · NaN), the step's gradient is zero.
      grads = _zero_unless(grads_finite, grads)
    if has_aux:
      return ((task_losses, aux), grads), new_state
    return (task_losses, grads), new_state

  return step


def _sampled_step(weighting, options, task_loss_fn, has_aux, devices, params,
                  state, args):
  """The step of a strategy that reads several independent minibatches.

  Every array in ``args`` has a leading axis of size ``num_samples``: entry
  ``s`` is minibatch ``s``. The per-task Jacobian of each minibatch is
  handed to the rule (leaves ``[num_samples, T, ...]``); the losses returned
  are the mean over the minibatches.
  """
  num_samples, num_tasks = weighting.num_samples, weighting.num_tasks
  for leaf in jax.tree.leaves(args):
    if jnp.shape(leaf)[:1] != (num_samples,):
      raise ValueError(
          f"this strategy samples {num_samples} minibatches per step: every "
          f"data argument needs a leading axis of size {num_samples}, got "
          f"shape {jnp.shape(leaf)}.")

  def one_sample(*sample_args):
    out, vjp_fn, aux = _vjp(lambda p: task_loss_fn(p, *sample_args),
                            (params,), has_aux)
    base.check_task_losses(out, num_tasks)
    jacobian = jax.vmap(vjp_fn)(jnp.eye(num_tasks, dtype=out.dtype))[0]
    return devices.mean(out), devices.mean(jacobian), aux

  outs, task_grads, aux = jax.vmap(one_sample)(*args)
  task_losses = jnp.mean(outs, axis=0)
  losses32 = jax.lax.stop_gradient(task_losses).astype(jnp.float32)
  grads, new_state = step_lib.gradients_step(
      weighting, losses32, state, task_grads,
      tree_lib.shared_mask(options.shared, params),
      options.weight_task_specific)
  if has_aux:
    return ((task_losses, aux), grads), new_state
  return (task_losses, grads), new_state


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


def _zero_unless(ok, tree):
  """``tree`` where ``ok``, zeros (of each leaf's dtype) otherwise."""
  return jax.tree.map(
      lambda g: jnp.where(ok, g, jnp.zeros_like(g))
      if jnp.issubdtype(g.dtype, jnp.inexact) else g, tree)


def _checked_output(loss_fn, has_aux):
  """``loss_fn`` with a clear error when its output does not fit ``has_aux``."""

  def checked(*args):
    out = loss_fn(*args)
    if not has_aux and isinstance(out, (tuple, list)):
      raise ValueError(
          f"loss_fn returned a {type(out).__name__} of {len(out)} items: "
          "return the per-task losses as one array of shape (num_tasks,), "
          "e.g. jnp.stack([loss_a, loss_b, ...]). If it returns "
          "(task_losses, aux), pass has_aux=True.")
    if has_aux and not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise ValueError(
          "with has_aux=True, loss_fn must return (task_losses, aux), got "
          f"{type(out).__name__}.")
    return out

  return checked


def _encoder_vjp(encoder_fn, task_loss_fn, params, args, has_aux):
  """One forward pass through the encoder, then the heads.

  Returns ``(out, vjp_fn, aux, representation_vjp, split_backward)``:
  ``vjp_fn`` maps a cotangent of the losses to the full parameter gradient,
  ``representation_vjp`` to the gradient with respect to the representation,
  and ``split_backward`` backpropagates a representation cotangent through
  the encoder and a loss cotangent through the heads.
  """
  representation, encoder_vjp = jax.vjp(lambda p: encoder_fn(p, *args), params)
  out, heads_vjp, aux = _vjp(lambda p, z: task_loss_fn(p, z, *args),
                             (params, representation), has_aux)

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

  return (out, vjp_fn, aux, lambda cotangent: heads_vjp(cotangent)[1],
          split_backward)


def _add_cotangents(a, b):
  if not jnp.issubdtype(a.dtype, jnp.inexact):
    return a  # float0: an integer parameter.
  return a + b


def _low_memory_gramian(full_loss, vjp_fn, params, mask, num_tasks, dtype,
                        has_aux, devices):
  """``G = J Jᵀ`` one column at a time: ``g_i = Jᵀe_i``, then ``J g_i``."""

  def column(index):
    unit = jax.nn.one_hot(index, num_tasks, dtype=dtype)
    task_grad = devices.mean(vjp_fn(unit)[0])
    tangent = jax.tree.map(
        lambda g, keep: g if keep or not jnp.issubdtype(g.dtype, jnp.inexact)
        else jnp.zeros_like(g), task_grad, mask)
    if has_aux:
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


def _representation_gramian(representation_vjp, num_tasks, dtype, devices):
  """Gramian of the per-task gradients w.r.t. the shared representation."""
  rep_jacobian = jax.vmap(representation_vjp)(jnp.eye(num_tasks, dtype=dtype))
  return devices.sum_gramian(tree_lib.gramian(rep_jacobian))


class _DeviceAverage:
  """Averages over the data axis of ``shard_map`` / ``pmap``, if one is named.

  The global loss is the mean of the devices' local losses. Two regimes:

  * the local losses are typed as varying over the axis (``shard_map`` with
    its default ``check_vma=True``): the loss function is wrapped in
    ``pmean``, so its VJP already yields the global gradients of the
    replicated parameters (AD sums their cotangents over devices) and
    nothing is averaged afterwards;
  * otherwise (``check_vma=False``, ``pmap``): losses, gradients, Jacobians
    and Gramian columns are ``pmean``-ed explicitly after the fact.
  """

  def __init__(self, axis_name):
    self.axis_name = axis_name
    self.averaged_inside = False

  def wrap(self, loss_fn, has_aux):
    if self.axis_name is None:
      return loss_fn

    def averaged(*args):
      out = loss_fn(*args)
      losses = out[0] if has_aux else out
      if self.axis_name in _varying_axes(losses):
        self.averaged_inside = True
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
