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
==================  =====================================================
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import tree as tree_lib

GRAMIAN_MODES = ("jacobian", "low_memory")


def _weighting_of(strategy: Any) -> base.Weighting:
  weighting = getattr(strategy, "weighting", None)
  if not isinstance(weighting, base.Weighting):
    raise ValueError(
        "strategy must be an optax_mtl strategy (e.g. optax_mtl.ema(3)), got "
        f"{type(strategy).__name__}. Chain it with an optimizer only on the "
        "optax face; value_and_grad takes the strategy itself.")
  return weighting


def value_and_grad(
    loss_fn: Callable[..., Any],
    strategy: base.MultiTaskStrategy,
    has_aux: bool = False,
    *,
    gramian_mode: str = "jacobian",
    encoder_fn: Optional[Callable[..., Any]] = None,
    axis_name: Optional[str] = None,
) -> Callable[..., Any]:
  """Makes a training step that balances the tasks of ``loss_fn``.

  Args:
    loss_fn: ``loss_fn(params, *args)`` returns the per-task losses, shape
      ``(num_tasks,)`` (or ``(task_losses, aux)`` with ``has_aux``). With
      ``encoder_fn`` it is called as ``loss_fn(params, representation,
      *args)``.
    strategy: an optax_mtl strategy, e.g. ``optax_mtl.ema(num_tasks=3)``.
    has_aux: whether ``loss_fn`` returns ``(task_losses, aux)``.
    gramian_mode: for strategies that read the Gramian, ``"jacobian"``
      (default: hold the per-task Jacobian, fastest) or ``"low_memory"``
      (Gram-vector products, never holds the Jacobian).
    encoder_fn: optional ``encoder_fn(params, *args) -> representation``. When
      given, Gramian strategies read the Gramian of the per-task gradients
      with respect to the representation (MGDA-UB, Sener & Koltun 2018)
      instead of the parameters.
    axis_name: inside ``shard_map`` / ``pmap``, the name of the data axis:
      the losses and gradients (and the Jacobian or Gramian) are averaged
      over it, so every device holds the same strategy state.

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
  weighting = _weighting_of(strategy)
  if gramian_mode not in GRAMIAN_MODES:
    raise ValueError(
        f"gramian_mode must be one of {GRAMIAN_MODES}, got {gramian_mode!r}.")
  num_tasks = weighting.num_tasks
  needs_gramian = weighting.needs is base.Needs.GRAMIAN

  def step(params, state, *args):
    devices = _DeviceAverage(axis_name)
    task_loss_fn = devices.wrap(loss_fn, has_aux)
    representation_vjp = None
    if encoder_fn is None:
      full_loss = lambda p: task_loss_fn(p, *args)
      out, vjp_fn, aux = _vjp(full_loss, (params,), has_aux)
    else:
      # One forward pass through the encoder; the heads' VJP gives both the
      # parameter cotangent and the representation cotangent.
      representation, encoder_vjp = jax.vjp(
          lambda p: encoder_fn(p, *args), params)
      out, heads_vjp, aux = _vjp(lambda p, z: task_loss_fn(p, z, *args),
                                 (params, representation), has_aux)
      representation_vjp = lambda cotangent: heads_vjp(cotangent)[1]

      def vjp_fn(cotangent):
        params_part, representation_part = heads_vjp(cotangent)
        (encoder_part,) = encoder_vjp(representation_part)
        return (jax.tree.map(jnp.add, params_part, encoder_part),)

    base.check_task_losses(out, num_tasks)
    task_losses = devices.mean(out)
    losses32 = jax.lax.stop_gradient(task_losses.astype(jnp.float32))

    def backward(weights):
      return devices.mean(vjp_fn(weights.astype(out.dtype))[0])

    if not needs_gramian:
      weights, new_state = base.apply_rule(weighting, losses32, state)
      grads = backward(weights)
    else:

      def recompute(state):
        if representation_vjp is not None:
          gramian = _representation_gramian(representation_vjp, num_tasks,
                                            out.dtype, devices)
        elif gramian_mode == "low_memory":
          # pylint: disable-next=undefined-variable (set when no encoder_fn)
          mask = tree_lib.filter_mask(weighting.gramian_filter, params, params)
          gramian = _low_memory_gramian(full_loss, vjp_fn, params, mask,
                                        num_tasks, out.dtype, has_aux,
                                        devices)
        else:
          jacobian = devices.mean(
              jax.vmap(vjp_fn)(jnp.eye(num_tasks, dtype=out.dtype))[0])
          mask = tree_lib.filter_mask(weighting.gramian_filter, params,
                                      jacobian)
          weights, new_state = base.apply_rule(
              weighting, losses32, state, tree_lib.gramian(jacobian, mask))
          return weights, new_state, tree_lib.combine(weights, jacobian)
        weights, new_state = base.apply_rule(weighting, losses32, state,
                                             gramian)
        return weights, new_state, backward(weights)

      def reuse(state):
        weights, new_state = base.reuse_weights(state)
        return weights, new_state, backward(weights)

      if weighting.update_weights_every > 1:
        weights, new_state, grads = jax.lax.cond(
            base.is_due(weighting, state), recompute, reuse, state)
      else:
        weights, new_state, grads = recompute(state)

    if has_aux:
      return ((task_losses, aux), grads), new_state
    return (task_losses, grads), new_state

  return step


def _low_memory_gramian(full_loss, vjp_fn, params, mask, num_tasks, dtype,
                        has_aux, devices):
  """``G = J Jᵀ`` one column at a time: ``g_i = Jᵀe_i``, then ``J g_i``."""

  def column(index):
    unit = jax.nn.one_hot(index, num_tasks, dtype=dtype)
    task_grad = devices.mean(vjp_fn(unit)[0])
    tangent = jax.tree.map(
        lambda g, keep: g if keep else jnp.zeros_like(g), task_grad, mask)
    if has_aux:
      _, gram_column, _ = jax.jvp(full_loss, (params,), (tangent,),
                                  has_aux=True)
    else:
      _, gram_column = jax.jvp(full_loss, (params,), (tangent,))
    return devices.mean(gram_column).astype(jnp.float32)

  gramian = jax.lax.map(column, jnp.arange(num_tasks))
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
