"""The Flax NNX face: training steps that take the model itself.

:func:`value_and_grad` is :func:`optax_mtl.value_and_grad` for a loss function
of an ``nnx.Module``. It only adapts the model to the engine:

1. ``nnx.split`` the model into its parameters (``nnx.Param``) and the rest
   of its state (BatchNorm statistics, Dropout RNG counts, any other
   ``nnx.Variable``);
2. call the engine with a pure function of the parameters, which rebuilds a
   private copy of the model (``nnx.merge``), runs ``loss_fn`` on it and
   returns the copy's new non-parameter state as an auxiliary output;
3. write that state back into the model (``nnx.update``), exactly what
   ``nnx.value_and_grad`` does to a module it differentiates.

:func:`value_and_jacobian` does the same for the optax face, where
``nnx.Optimizer(model, optax.chain(strategy, ...), wrt=nnx.Param)`` wants the
per-task gradients, and :func:`shared_mask` turns an NNX filter into the
mask that :func:`optax_mtl.with_shared_parameters` takes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

from flax import nnx
import jax
import jax.numpy as jnp

from optax_mtl._src import base
from optax_mtl._src import deprecation
from optax_mtl._src import engine


@deprecation.renamed_arguments({"features_fn": "encoder_fn"})
def value_and_grad(
    loss_fn: Callable[..., Any],
    strategy: Any,
    *,
    has_aux: bool = False,
    encoder_fn: Optional[Callable[..., Any]] = None,
    shared: Any = None,
    gramian_mode: str = "jacobian",
    axis_name: Optional[str] = None,
    batch_axis: Optional[int] = None,
) -> Callable[..., Any]:
  """Makes a training step for a multi-task ``nnx.Module``.

  Like :func:`optax_mtl.value_and_grad` (the same gradient rules: one
  backward pass for a loss-weighting strategy; the Gramian of the per-task
  gradients for a gradient-balancing one, and with ``shared`` declared every
  task-specific parameter receives its own task's gradient, unweighted), but
  ``loss_fn`` takes the model, and the step updates the model's non-parameter
  state (``nnx.BatchStat``, the ``nnx.RngState`` of Dropout, any other
  ``nnx.Variable`` that is not an ``nnx.Param``) as a plain
  ``nnx.value_and_grad`` step does. The forward pass runs once per step, so
  BatchNorm statistics and Dropout keys advance once, whatever the strategy.
  Works eagerly and under ``nnx.jit``. A strategy that samples several
  minibatches per step (``modo``, ``sdmgrad``) maps the forward pass over
  the leading axis of ``args``; every minibatch starts from the same state
  (the same Dropout keys), and the statistics move by the mean of the
  minibatches' updates.

  Args:
    loss_fn: ``loss_fn(model, *args)`` returns the per-task losses, shape
      ``(num_tasks,)`` (or ``(task_losses, aux)`` with ``has_aux``). With
      ``encoder_fn`` it is called as ``loss_fn(model, features, *args)`` and
      computes the losses from the shared features.
    strategy: an optax_mtl strategy, e.g. ``optax_mtl.upgrad(num_tasks=3)``.
    has_aux: whether ``loss_fn`` returns ``(task_losses, aux)``.
    encoder_fn: optional ``encoder_fn(model, *args) -> features``, the
      shared trunk's output (any pytree of arrays). When given, strategies
      that read the Gramian read it on the gradients of the losses with
      respect to the features (torchjd's ``mtl_backward(features=...)``,
      LibMTL's ``rep_grad``, MGDA-UB): the step then costs about one
      backward pass plus T backward passes through the heads only. Pass
      ``shared`` as well (the trunk) so that the heads get their own
      gradients. With a strategy that transforms the per-task gradients
      themselves (``graddrop``, ``trimmed_mean``, ...), the trunk may update
      floating-point state (BatchNorm) but not a Dropout stream (a clear
      ``ValueError`` says so). Formerly ``features_fn``, still accepted
      with a ``DeprecationWarning``.
    shared: an NNX filter selecting the parameters all tasks share, e.g.
      ``nnx.PathContains("trunk")``, a ``Variable`` type, ``nnx.All(...)``,
      ``nnx.Any(...)``, ``nnx.Not(...)`` or ``(path, variable) -> bool``.
      Strategies that read the Gramian then measure it on these parameters
      only, and every other parameter receives its own task's gradient. None
      keeps the strategy's own declaration (every parameter is shared unless
      :func:`optax_mtl.with_shared_parameters` says otherwise).
    gramian_mode: ``"jacobian"``, ``"low_memory"`` or ``"per_layer"``, as
      in :func:`optax_mtl.value_and_grad` (``"per_layer"`` finds the
      model's dense layers in the traced program: the model is unchanged).
    axis_name: inside ``shard_map`` / ``pmap``, the name of the data axis,
      as in :func:`optax_mtl.value_and_grad`.
    batch_axis: instance-wise objectives (``loss_fn`` returns one loss per
      example), as in :func:`optax_mtl.value_and_grad`.

  Returns:
    ``step(model, strategy_state, *args) -> ((task_losses, grads),
    new_strategy_state)`` (``(((task_losses, aux), grads), new_state)`` with
    ``has_aux``), where ``grads`` is an ``nnx.State`` of the model's
    ``nnx.Param`` variables, as ``nnx.grad`` returns, ready for
    ``nnx.Optimizer.update(model, grads)``. ``strategy.init`` takes
    ``nnx.state(model, nnx.Param)``.

  Raises:
    ValueError: ``shared`` is not an NNX filter or selects no parameter,
      the model is not an NNX object, an extra argument is an NNX object
      (its state could not be threaded: keep ``nnx.Rngs`` inside the model),
      or any error of :func:`optax_mtl.value_and_grad`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import optax_mtl
    >>> from optax_mtl import nnx as mtl_nnx
    >>> class Model(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.trunk = nnx.Linear(2, 4, rngs=rngs)
    ...     self.norm = nnx.BatchNorm(4, rngs=rngs)
    ...     self.heads = nnx.Linear(4, 2, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.heads(self.norm(self.trunk(x)))
    >>> def loss_fn(model, x, y):
    ...   return jnp.mean((model(x) - y) ** 2, axis=0)
    >>> model = Model(nnx.Rngs(0))
    >>> strategy = optax_mtl.upgrad(num_tasks=2)
    >>> step = mtl_nnx.value_and_grad(loss_fn, strategy,
    ...                               shared=nnx.PathContains("trunk"))
    >>> state = strategy.init(nnx.state(model, nnx.Param))
    >>> (losses, grads), state = step(model, state, jnp.ones((8, 2)),
    ...                               jnp.zeros((8, 2)))
    >>> losses.shape, grads["trunk"]["kernel"].shape
    ((2,), (2, 4))
    >>> [round(v, 2) for v in model.norm.var[...].tolist()]  # Updated.
    [0.99, 0.99, 0.99, 0.99]
  """
  if shared is not None:
    _check_filter("shared", shared)
  # Every option is checked now, as the engine checks it, not at the first
  # step.
  rule = engine.build(strategy, has_aux=has_aux, encoder_fn=encoder_fn,
                      gramian_mode=gramian_mode, axis_name=axis_name,
                      batch_axis=batch_axis)[0]
  engine_options = dict(has_aux=True, gramian_mode=gramian_mode,
                        axis_name=axis_name, batch_axis=batch_axis)
  model_functions = functools.partial(
      _pure_functions, loss_fn, has_aux, encoder_fn,
      isinstance(rule, base.GradientRule))

  def step(model, strategy_state, *args):
    _check_model(model)
    _check_args(args)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.as_pure(rest)
    # The data goes through the engine (a strategy that samples several
    # minibatches maps over it); the model's state is closed over.
    pure_loss, pure_encoder = model_functions(graphdef, rest)
    engine_step = engine.value_and_grad(
        pure_loss, strategy, encoder_fn=pure_encoder,
        shared=None if shared is None else _mask(params, shared),
        **engine_options)
    ((task_losses, (aux, new_rest)), pure_grads), new_state = engine_step(
        nnx.as_pure(params), nnx.as_pure(strategy_state), *args)
    if rule.num_samples > 1:
      new_rest = _merge_samples(new_rest)
    nnx.update(model, new_rest)
    grads = _as_variables(params, pure_grads)
    if has_aux:
      return ((task_losses, aux), grads), new_state
    return (task_losses, grads), new_state

  return step


def _pure_functions(loss_fn, has_aux, encoder_fn, reads_gradients, graphdef,
                    rest):
  """The engine's ``(loss_fn, encoder_fn)``: pure functions of the params.

  Each rebuilds a private copy of the model and returns, beside the losses,
  ``(aux, the copy's non-parameter state)``.
  """
  if encoder_fn is None:
    def pure_loss(pure_params, *args):
      copy = nnx.merge(graphdef, pure_params, rest)
      task_losses, aux = engine.check_output(loss_fn(copy, *args), has_aux)
      return task_losses, (aux, _non_params(copy))
    return pure_loss, None

  # The representation carries the non-parameter state that the trunk
  # changed, so the heads run on a model with the trunk's updates. That
  # state does not enter the loss differentiably (stop_gradient): it adds
  # zeros to the Gramian.
  def pure_encoder(pure_params, *args):
    copy = nnx.merge(graphdef, pure_params, rest)
    features = encoder_fn(copy, *args)
    trunk_updates = _changed(rest, _non_params(copy))
    if reads_gradients:
      _check_representation_state(trunk_updates)
    return features, _stop_gradient(trunk_updates)

  def pure_loss(pure_params, representation, *args):
    features, trunk_updates = representation
    copy = nnx.merge(graphdef, pure_params, rest)
    nnx.update(copy, _stop_gradient(trunk_updates))
    task_losses, aux = engine.check_output(
        loss_fn(copy, features, *args), has_aux)
    return task_losses, (aux, _non_params(copy))

  return pure_loss, pure_encoder


def value_and_jacobian(
    loss_fn: Callable[..., Any],
    *,
    has_aux: bool = False,
) -> Callable[..., Any]:
  """Per-task gradients of an ``nnx.Module``, for the optax face.

  The optax face, ``nnx.Optimizer(model, optax.chain(strategy, ...),
  wrt=nnx.Param)``, takes the per-task gradients (every leaf with a leading
  task axis) and the losses (``optimizer.update(model, task_grads,
  task_losses=task_losses)``). This computes both in one forward pass and
  updates the model's non-parameter state as :func:`value_and_grad` does.

  Args:
    loss_fn: ``loss_fn(model, *args)`` returns the per-task losses, shape
      ``(num_tasks,)`` (or ``(task_losses, aux)`` with ``has_aux``).
    has_aux: whether ``loss_fn`` returns ``(task_losses, aux)``.

  Returns:
    ``fn(model, *args) -> (task_losses, task_grads)`` (``((task_losses, aux),
    task_grads)`` with ``has_aux``); ``task_grads`` is an ``nnx.State`` of the
    model's ``nnx.Param`` variables whose values have shape
    ``(num_tasks, *param.shape)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from flax import nnx
    >>> import optax_mtl
    >>> from optax_mtl import nnx as mtl_nnx
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> def loss_fn(model, x):
    ...   return jnp.mean(model(x) ** 2, axis=0)
    >>> optimizer = nnx.Optimizer(
    ...     model, optax.chain(optax_mtl.mgda(2), optax.sgd(0.1)),
    ...     wrt=nnx.Param)
    >>> task_losses, task_grads = mtl_nnx.value_and_jacobian(loss_fn)(
    ...     model, jnp.ones((4, 3)))
    >>> task_grads["kernel"].shape
    (2, 3, 2)
    >>> _ = optimizer.update(model, task_grads, task_losses=task_losses)
  """
  has_aux = base.check_bool("has_aux", has_aux)

  def jacobian_fn(model, *args):
    _check_model(model)
    _check_args(args)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.as_pure(rest)

    def pure_loss(pure_params):
      copy = nnx.merge(graphdef, pure_params, rest)
      task_losses, aux = engine.check_output(loss_fn(copy, *args), has_aux)
      if jnp.ndim(task_losses) != 1:
        raise ValueError(
            "loss_fn must return the per-task losses, shape (num_tasks,), "
            f"got shape {jnp.shape(task_losses)}.")
      return task_losses, (task_losses, aux, _non_params(copy))

    pure_grads, (task_losses, aux, new_rest) = jax.jacrev(
        pure_loss, has_aux=True)(nnx.as_pure(params))
    nnx.update(model, new_rest)
    task_grads = _as_variables(params, pure_grads)
    if has_aux:
      return (task_losses, aux), task_grads
    return task_losses, task_grads

  return jacobian_fn


def shared_mask(model: Any, shared: Any) -> Any:
  """The mask of shared parameters that an NNX filter selects.

  For the optax face: ``optax_mtl.with_shared_parameters(strategy,
  shared_mask(model, nnx.PathContains("trunk")))`` declares the trunk shared
  in a strategy used by ``nnx.Optimizer(model, ..., wrt=nnx.Param)``.

  Args:
    model: the ``nnx.Module`` (or an ``nnx.State`` of its parameters).
    shared: an NNX filter (``nnx.PathContains("trunk")``, a ``Variable``
      type, ``nnx.All``/``nnx.Any``/``nnx.Not`` of filters, or a callable
      ``(path, variable) -> bool``).

  Returns:
    An ``nnx.State`` of Python bools with the structure of
    ``nnx.as_pure(nnx.state(model, nnx.Param))``, the params that
    ``nnx.Optimizer`` hands to the strategy.

  Raises:
    ValueError: ``shared`` is not an NNX filter, or it selects no parameter.

  Examples:
    >>> from flax import nnx
    >>> from optax_mtl import nnx as mtl_nnx
    >>> class Model(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.trunk = nnx.Linear(2, 4, rngs=rngs)
    ...     self.head = nnx.Linear(4, 1, rngs=rngs)
    >>> mask = mtl_nnx.shared_mask(Model(nnx.Rngs(0)),
    ...                            nnx.PathContains("trunk"))
    >>> mask["trunk"]["kernel"], mask["head"]["kernel"]
    (True, False)
  """
  _check_filter("shared", shared)
  if isinstance(model, nnx.State):
    params = nnx.filter_state(model, nnx.Param)
  else:
    _check_model(model)
    params = nnx.state(model, nnx.Param)
  return _mask(params, shared)


# --------------------------------------------------------------------------
# Helpers.
# --------------------------------------------------------------------------


def _non_params(model):
  """The model's state other than its parameters, as plain arrays."""
  return nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))


def _changed(before, after):
  """The entries of ``after`` that are not those of ``before`` (same paths).

  Inside one trace an untouched variable keeps its value object, so this is
  exactly the state that a forward pass wrote.
  """
  previous = dict(nnx.to_flat_state(before))
  return nnx.from_flat_state([
      (path, value) for path, value in nnx.to_flat_state(after)
      if value is not previous.get(path)])


def _check_representation_state(trunk_updates):
  """A rule that transforms the per-task gradients reads the representation's
  gradients leaf by leaf: it cannot take counters or keys."""
  discrete = [".".join(map(str, path))
              for path, value in nnx.to_flat_state(trunk_updates)
              if not jnp.issubdtype(jnp.result_type(value), jnp.inexact)]
  if discrete:
    raise ValueError(
        "with encoder_fn, a strategy that transforms the per-task gradients "
        "(rather than reading their Gramian) cannot yet run a trunk that "
        f"updates integer or key state ({discrete}: Dropout's random "
        "stream, counters). Move that layer out of encoder_fn, use a "
        "strategy that reads the Gramian, or leave encoder_fn out.")


def _merge_samples(rest):
  """One state from the states left by each sampled minibatch.

  Every minibatch ran from the same state: statistics (floating point) are
  averaged, so BatchNorm's running mean moves towards the mean over all the
  minibatches; counters and keys (the same in every sample) are taken once.
  """
  return jax.tree.map(
      lambda leaf: jnp.mean(leaf, axis=0)
      if jnp.issubdtype(leaf.dtype, jnp.inexact) else leaf[0], rest)


def _stop_gradient(tree):
  """``stop_gradient`` on the floating-point leaves (RNG keys are left)."""
  return jax.tree.map(
      lambda leaf: jax.lax.stop_gradient(leaf)
      if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) else leaf, tree)


def _as_variables(params, pure_grads):
  """Gradients as an ``nnx.State`` of ``nnx.Param``, like ``nnx.grad``'s."""
  return jax.tree.map(lambda variable, grad: variable.replace(grad), params,
                      pure_grads,
                      is_leaf=lambda leaf: isinstance(leaf, nnx.Variable))


def _mask(params, shared):
  """The bools ``shared`` (an NNX filter) gives each parameter."""
  predicate = nnx.filterlib.to_predicate(shared)
  mask = nnx.map_state(lambda path, variable: bool(predicate(path, variable)),
                       params)
  if not any(jax.tree.leaves(mask)):
    paths = [".".join(map(str, path))
             for path, _ in nnx.to_flat_state(params)]
    hint = (" (a string is an NNX tag filter; nnx.PathContains("
            f"{shared!r}) selects by path)" if isinstance(shared, str) else "")
    raise ValueError(
        f"shared={shared!r} selects no nnx.Param of the model{hint}; its "
        f"parameters are {paths[:8]}{' ...' if len(paths) > 8 else ''}.")
  return mask


def _check_filter(name, value):
  try:
    nnx.filterlib.to_predicate(value)
  except (TypeError, ValueError) as error:
    raise ValueError(
        f"{name} must be an NNX filter (e.g. nnx.PathContains('trunk'), a "
        f"Variable type, nnx.All/Any/Not of filters, or a callable "
        f"(path, variable) -> bool), got {value!r}.") from error


def _check_model(model):
  if not nnx.graph.is_graph_node(model) or isinstance(model, nnx.State):
    raise ValueError(
        "the first argument of the step must be the nnx.Module to train, got "
        f"{type(model).__name__}.")


def _check_args(args):
  for index, arg in enumerate(args):
    if nnx.graph.is_graph_node(arg):
      raise ValueError(
          f"argument {index + 1} after the model is an NNX object "
          f"({type(arg).__name__}); its state would not be updated. Keep "
          "nnx.Rngs and submodules inside the model (e.g. "
          "nnx.Dropout(rate, rngs=rngs)), or pass plain arrays.")
