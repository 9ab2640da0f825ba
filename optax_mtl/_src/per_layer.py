"""The Gramian layer by layer, without the per-objective parameter gradients.

``gramian_mode="per_layer"`` of :func:`optax_mtl.value_and_grad`. The loss
function is traced to a jaxpr once; every operation that reads a parameter
(through reshapes, transposes and dtype conversions, or any computation on
that parameter alone) is a *consumer* of that parameter. The jaxpr is then
re-evaluated with a zero perturbation ``ε_c`` added to each consumer's
output and the consumer's other inputs kept. One VJP of the losses with
respect to the perturbations, mapped over the T unit cotangents, gives
each objective's output cotangents ``Δ_k`` at every consumer, and the
Gramian is summed consumer by consumer:

* a dense operation ``y = X W`` (a ``dot_general`` one of whose operands is
  a parameter, possibly reshaped, transposed or converted) adds

  .. math::

    G_{kj} \\mathrel{+}= \\langle X^\\top Δ_k, X^\\top Δ_j\\rangle
      = \\sum_{b,c} (X X^\\top)_{bc} (Δ_k Δ_j^\\top)_{bc},

  contracted through the ``rows × rows`` kernel ``X Xᵀ`` or through the
  per-objective gradient ``Xᵀ Δ_k``, whichever takes fewer operations;
* any other consumer (a bias added, a convolution, a scan or a remat'd
  block that reads a parameter, a parameter read by two operations) gets
  that parameter's per-objective gradient from the consumer's own VJP alone
  (``vmap`` over the objectives), contracted at once;
* a parameter whose value reaches the losses directly, or is read by an
  operation with side effects, takes its per-objective gradient from the
  whole VJP (what the Jacobian mode does for every parameter).

Where no dense operation is cheaper through ``X Xᵀ`` (a batch larger than
every layer is wide), :meth:`Linearized.saves` says so and the engine takes
the Jacobian mode's route from the same forward pass.

With ``batch_axis`` (instance-wise objectives, one loss per example), ``Δ``
comes from ONE backward pass of the summed losses: example ``b`` only
touches its own rows, so a dense operation adds ``(X Xᵀ) ⊙ (Δ Δᵀ)`` summed
over each example's rows, and a bias each example's rows' cotangents
summed. The rows of each example are found by tracing the loss function a
second time with one more example; the same comparison refuses losses that
read a value computed across the examples (BatchNorm in training mode).

References:
  Rumelhart, Hinton & Williams, *Learning representations by
  back-propagating errors*, Nature 1986 (``∇_W L = Xᵀ Δ``).

  Goodfellow, *Efficient per-example gradient computations*,
  arXiv:1510.01799, 2015 (the per-example Gramian from ``X`` and ``Δ``).

  Quinton & Rey, *Jacobian descent for multi-objective optimization*,
  arXiv:2406.16232, 2024 (instance-wise risk minimisation; torchjd's
  ``autogram`` engine).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
# Operations through which a parameter keeps its entries, only moved or
# converted: the inner product of two gradients is the same on either side.
_VIEWS = frozenset({"reshape", "transpose", "convert_element_type", "squeeze",
                    "expand_dims", "copy", "copy_p", "reduce_precision"})
# Calls whose body is walked as if inlined (their operations are found).
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call"})


@dataclasses.dataclass(frozen=True)
class _Pure:
  """A value computed from one parameter leaf alone."""
  leaf: int  # index into the flat parameters
  fn: Callable[[Any], Any]  # the leaf's value -> this value
  view: bool  # fn only reshapes, transposes or converts the leaf


@dataclasses.dataclass(frozen=True)
class _Literal:
  """A value that depends on no argument: a literal, a constant of the
  program (e.g. a model's BatchNorm statistics) or computed from them."""
  value: Any


@dataclasses.dataclass
class _Dense:
  """Where the rows, contraction and outputs of a dense operation lie."""
  data_position: int  # 0 or 1: which operand of dot_general is the data
  data_perm: tuple  # data operand -> (batch, free, contracting)
  out_perm: tuple  # output -> (batch, data free, parameter free)
  batch_size: int  # the product of the batch dimensions
  rows: int  # the product of the data operand's free dimensions
  contracting: int
  outputs: int  # the product of the parameter operand's free dimensions
  data_free: tuple  # the data operand's free dimensions, in order
  out_batch: tuple  # where the output holds the batch dimensions
  out_data: tuple  # ... the data operand's free dimensions
  out_param: tuple  # ... the parameter operand's free dimensions
  contract: tuple  # the data operand's contracting dimensions
  batch: tuple  # the data operand's batch dimensions


@dataclasses.dataclass
class _Consumer:
  """An operation that reads one or more parameter leaves and other data."""
  path: tuple
  eqn: Any
  inputs: list  # per input: _Pure, _Literal or None (data, captured)
  leaves: tuple  # the parameter leaves it reads
  inexact_outputs: tuple  # the outputs that get a perturbation
  dense: Optional[_Dense]


@dataclasses.dataclass
class _Program:
  """The traced loss function and its consumers."""
  closed_jaxpr: Any
  out_tree: Any
  consumers: list
  by_path: dict
  calls: frozenset  # paths of the call operations walked into
  fallback: frozenset  # leaves whose gradient comes from the whole VJP
  num_params: int


def trace(fun: Callable[..., Any], flat_params: Sequence[Any],
          flat_args: Sequence[Any]) -> _Program:
  """Traces ``fun(flat_params, flat_args)`` and finds the consumers.

  Args:
    fun: ``fun(flat_params, flat_args)`` returns the loss function's output
      (its first flat leaf is the losses).
    flat_params: the parameters' leaves (arrays or abstract values).
    flat_args: the data arguments' array leaves.

  Returns:
    The program, ready for :func:`linearize`.
  """
  closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(
      list(flat_params), list(flat_args))
  num_params = len(flat_params)
  jaxpr = closed.jaxpr
  in_info = []
  for index, var in enumerate(jaxpr.invars):
    if index < num_params and jnp.issubdtype(var.aval.dtype, jnp.inexact):
      in_info.append(_Pure(index, _identity, True))
    else:
      in_info.append(None)
  walker = _Walker()
  out_info = walker.walk(jaxpr, in_info, (), closed.consts)
  fallback = set(walker.fallback)
  # A parameter that reaches the losses without a consumer in between.
  losses_info = out_info[0]
  if isinstance(losses_info, _Pure):
    fallback.add(losses_info.leaf)
  return _Program(closed, jax.tree.structure(out_shape), walker.consumers,
                  {c.path: c for c in walker.consumers},
                  frozenset(walker.calls), frozenset(fallback), num_params)


def _identity(value):
  return value


class _Walker:
  """Finds the consumers of the parameters, walking into calls."""

  def __init__(self):
    self.consumers = []
    self.calls = set()
    self.fallback = set()

  def walk(self, jaxpr, in_info, path, consts):
    env = {var: _Literal(value) for var, value in zip(jaxpr.constvars, consts)}
    env.update(zip(jaxpr.invars, in_info))

    def read(atom):
      if isinstance(atom, jax_core.Literal):
        return _Literal(atom.val)
      return env.get(atom)

    for index, eqn in enumerate(jaxpr.eqns):
      infos = [read(atom) for atom in eqn.invars]
      pure = [info for info in infos if isinstance(info, _Pure)]
      eqn_path = path + (index,)
      if not pure and not eqn.effects and all(
          isinstance(info, _Literal) for info in infos):
        # A constant: its value is computed now, for the functions of the
        # parameters that read it (scale · rsqrt(running variance)).
        out_info = [_Literal(value) for value in _bind(
            eqn, [info.value for info in infos])]
      elif not pure:
        out_info = [None] * len(eqn.outvars)
      elif (len({info.leaf for info in pure}) == 1
            and all(isinstance(info, (_Pure, _Literal)) for info in infos)
            and not eqn.effects):
        out_info = _chain(eqn, infos, pure[0].leaf)
      elif eqn.primitive.name in _CALLS and not eqn.effects:
        self.calls.add(eqn_path)
        inner = _call_jaxpr(eqn)
        out_info = self.walk(inner.jaxpr, infos, eqn_path, inner.consts)
      elif eqn.effects:
        self.fallback.update(info.leaf for info in pure)
        out_info = [None] * len(eqn.outvars)
      else:
        self.consumers.append(_consumer(eqn, infos, eqn_path))
        out_info = [None] * len(eqn.outvars)
      for var, info in zip(eqn.outvars, out_info):
        env[var] = info
    return [read(atom) for atom in jaxpr.outvars]


def _call_jaxpr(eqn):
  inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
  if isinstance(inner, jax_core.Jaxpr):
    return jax_core.ClosedJaxpr(inner, ())
  return inner


def _chain(eqn, infos, leaf):
  """The outputs of an operation on one leaf alone, as functions of it."""
  view = (eqn.primitive.name in _VIEWS and len(infos) == 1
          and infos[0].view)

  def output(position):
    def fn(leaf_value):
      inputs = [info.fn(leaf_value) if isinstance(info, _Pure)
                else info.value for info in infos]
      return _bind(eqn, inputs)[position]
    return _Pure(leaf, fn, view)

  return [output(position) for position in range(len(eqn.outvars))]


def _bind(eqn, inputs):
  """Applies one jaxpr operation, as ``jax.core.eval_jaxpr`` does."""
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bind_params, tuple):  # Older jax: (subfuns, params).
    subfuns, bind_params = bind_params
    inputs = list(subfuns) + list(inputs)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*inputs, **bind_params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _consumer(eqn, infos, path):
  leaves = tuple(sorted({info.leaf for info in infos
                         if isinstance(info, _Pure)}))
  inexact = tuple(position for position, var in enumerate(eqn.outvars)
                  if jnp.issubdtype(var.aval.dtype, jnp.inexact))
  return _Consumer(path, eqn, infos, leaves, inexact, _dense(eqn, infos))


def _dense(eqn, infos):
  """The geometry of ``dot_general(data, view of a parameter)``, or None."""
  if eqn.primitive.name != "dot_general" or len(infos) != 2:
    return None
  kinds = [isinstance(info, _Pure) and info.view for info in infos]
  if sorted(kinds) != [False, True] or any(
      isinstance(info, _Literal) for info in infos):
    return None
  data_position = kinds.index(False)
  (contract_l, contract_r), (batch_l, batch_r) = eqn.params[
      "dimension_numbers"]
  contract = (contract_l, contract_r)[data_position]
  batch = (batch_l, batch_r)[data_position]
  param_contract = (contract_l, contract_r)[1 - data_position]
  param_batch = (batch_l, batch_r)[1 - data_position]
  data_shape = eqn.invars[data_position].aval.shape
  param_shape = eqn.invars[1 - data_position].aval.shape
  data_free = tuple(d for d in range(len(data_shape))
                    if d not in contract and d not in batch)
  param_free = tuple(d for d in range(len(param_shape))
                     if d not in param_contract and d not in param_batch)
  num_batch = len(batch)
  out_batch = tuple(range(num_batch))
  if data_position == 0:
    out_data = tuple(range(num_batch, num_batch + len(data_free)))
    out_param = tuple(range(num_batch + len(data_free),
                            num_batch + len(data_free) + len(param_free)))
  else:
    out_param = tuple(range(num_batch, num_batch + len(param_free)))
    out_data = tuple(range(num_batch + len(param_free),
                           num_batch + len(param_free) + len(data_free)))
  size = lambda dims, shape: int(np.prod([shape[d] for d in dims]))
  return _Dense(
      data_position=data_position,
      data_perm=tuple(batch) + data_free + tuple(contract),
      out_perm=out_batch + out_data + out_param,
      batch_size=size(batch, data_shape), rows=size(data_free, data_shape),
      contracting=size(contract, data_shape),
      outputs=size(param_free, param_shape), data_free=data_free,
      out_batch=out_batch, out_data=out_data, out_param=out_param,
      contract=tuple(contract), batch=tuple(batch))


# --------------------------------------------------------------------------
# Evaluation with perturbations.
# --------------------------------------------------------------------------


def _evaluate(program, flat_inputs, perturbations):
  """Runs the jaxpr; returns its outputs and each consumer's data inputs.

  ``perturbations[i]`` (a list, one per inexact output) is added to the
  outputs of consumer ``i``.
  """
  index_of = {c.path: i for i, c in enumerate(program.consumers)}
  captured = [None] * len(program.consumers)

  def run(jaxpr, consts, inputs, path):
    env = {}

    def read(atom):
      return atom.val if isinstance(atom, jax_core.Literal) else env[atom]

    for var, value in zip(jaxpr.constvars, consts):
      env[var] = value
    for var, value in zip(jaxpr.invars, inputs):
      env[var] = value
    for index, eqn in enumerate(jaxpr.eqns):
      eqn_path = path + (index,)
      values = [read(atom) for atom in eqn.invars]
      if eqn_path in program.calls:
        inner = _call_jaxpr(eqn)
        outs = run(inner.jaxpr, inner.consts, values, eqn_path)
      else:
        outs = _bind(eqn, values)
      consumer_index = index_of.get(eqn_path)
      if consumer_index is not None:
        consumer = program.consumers[consumer_index]
        captured[consumer_index] = [
            jax.lax.stop_gradient(value)
            for value, info in zip(values, consumer.inputs) if info is None]
        for slot, position in enumerate(consumer.inexact_outputs):
          outs[position] = outs[position] + perturbations[consumer_index][slot]
      for var, value in zip(eqn.outvars, outs):
        env[var] = value
    return [read(atom) for atom in jaxpr.outvars]

  closed = program.closed_jaxpr
  outs = run(closed.jaxpr, closed.consts, flat_inputs, ())
  return outs, captured


def _local_pullback(consumer, captured, leaf_values):
  """The VJP of this consumer alone with respect to its leaves.

  Args:
    consumer: the consumer.
    captured: its data inputs, as evaluated.
    leaf_values: the values of ``consumer.leaves``.

  Returns:
    ``pullback(cotangents)`` (one per inexact output) -> a tuple of leaf
    gradients, one per leaf of the consumer.
  """

  def local(*values):
    by_leaf = dict(zip(consumer.leaves, values))
    data = iter(captured)
    inputs = []
    for info in consumer.inputs:
      if isinstance(info, _Pure):
        inputs.append(info.fn(by_leaf[info.leaf]))
      elif isinstance(info, _Literal):
        inputs.append(info.value)
      else:
        inputs.append(next(data))
    outs = _bind(consumer.eqn, inputs)
    return [outs[position] for position in consumer.inexact_outputs]

  _, pullback = jax.vjp(local, *leaf_values)
  return lambda cotangents: pullback(list(cotangents))


# --------------------------------------------------------------------------
# The Gramian.
# --------------------------------------------------------------------------


def _dense_gramian(dense, data, cotangents, dtype):
  """``Σ ⟨Xᵀ Δ_k, Xᵀ Δ_j⟩`` for ``cotangents`` ``[T, *output]``."""
  num_objectives = cotangents.shape[0]
  rows = jnp.transpose(data, dense.data_perm).reshape(
      dense.batch_size, dense.rows, dense.contracting).astype(dtype)
  deltas = jnp.transpose(cotangents, (0,) + tuple(
      1 + d for d in dense.out_perm)).reshape(
          num_objectives, dense.batch_size, dense.rows,
          dense.outputs).astype(dtype)
  kernel_cost, gradient_cost = _dense_costs(dense, num_objectives)
  if kernel_cost <= gradient_cost:
    kernel = jnp.einsum("nrc,nsc->nrs", rows, rows, precision=_HIGHEST)
    mixed = jnp.einsum("nrs,tnso->tnro", kernel, deltas, precision=_HIGHEST)
    return jnp.einsum("tnro,unro->tu", mixed, deltas, precision=_HIGHEST)
  grads = jnp.einsum("nrc,tnro->tnco", rows, deltas,
                     precision=_HIGHEST).reshape(num_objectives, -1)
  return jnp.matmul(grads, grads.T, precision=_HIGHEST)


def _dense_costs(dense, num_objectives):
  """Multiply-adds of a dense layer's Gramian: through ``X Xᵀ``, through
  the per-objective gradients ``Xᵀ Δ_k``."""
  n, r, c, o, t = (dense.batch_size, dense.rows, dense.contracting,
                   dense.outputs, num_objectives)
  kernel_cost = n * r * r * c + t * n * r * r * o + t * t * n * r * o
  gradient_cost = t * n * r * c * o + t * t * n * c * o
  return kernel_cost, gradient_cost


def _flat_gramian(grads, dtype):
  flat = grads.reshape(grads.shape[0], -1).astype(dtype)
  return jnp.matmul(flat, flat.T, precision=_HIGHEST)


@dataclasses.dataclass
class Linearized:
  """The losses, their VJP and the Gramian, from one forward pass.

  Attributes:
    out: the losses.
    aux: the loss function's auxiliary output (None without ``has_aux``).
    vjp_fn: ``cotangent -> (grads,)``, the VJP of the losses with respect to
      the parameters (a pytree like them).
    gramian: ``gramian(mask, num_objectives) -> G``, the Gramian of the
      per-objective gradients of the parameters that ``mask`` (a pytree of
      bools like the parameters) marks, float32 or float64.
    saves: ``saves(mask, num_objectives) -> bool``: whether some dense
      layer's Gramian is cheaper through ``X Xᵀ`` than through its
      per-objective gradients (always, for per-example objectives). When
      not, the Jacobian mode computes the same with fewer passes.
  """
  out: Any
  aux: Any
  vjp_fn: Callable[..., Any]
  gramian: Callable[..., Any]
  saves: Callable[..., bool]


def linearize(loss_fn: Callable[..., Any], params: Any, args: Sequence[Any],
              has_aux: bool, *, batch_axis: Optional[int] = None
              ) -> Linearized:
  """One forward pass of ``loss_fn(params, *args)`` ready for the Gramian.

  Args:
    loss_fn: returns the losses ``(T,)`` (or ``(losses, aux)``).
    params: the parameters (a pytree).
    args: the other arguments; array leaves are traced, other leaves are
      kept as they are.
    has_aux: whether ``loss_fn`` returns ``(losses, aux)``.
    batch_axis: None (T objectives), or the axis of the array arguments
      along which lie the examples, one objective each (the losses are
      then ``(batch,)``).

  Returns:
    A :class:`Linearized`.

  Raises:
    ValueError: with ``batch_axis``, no argument has the batch size along
      it, the program's structure depends on the batch size, or an
      operation that reads a parameter has no example axis in its output.
  """
  flat_params, params_tree = jax.tree.flatten(params)
  array_args, rebuild_args = _split_args(args)
  def fun(flat_params, flat_args):
    return loss_fn(jax.tree.unflatten(params_tree, flat_params),
                   *rebuild_args(flat_args))
  program = trace(fun, flat_params, array_args)
  examples = (None if batch_axis is None else
              _example_axes(fun, program, flat_params, array_args, batch_axis))
  zeros = [[jnp.zeros(consumer.eqn.outvars[p].aval.shape,
                      consumer.eqn.outvars[p].aval.dtype)
            for p in consumer.inexact_outputs]
           for consumer in program.consumers]

  def forward(flat_params, perturbations):
    outs, captured = _evaluate(program, list(flat_params) + list(array_args),
                               perturbations)
    out = jax.tree.unflatten(program.out_tree, outs)
    if has_aux:
      return out[0], (out[1], captured)
    return out, (None, captured)

  out, pullback, (aux, captured) = jax.vjp(forward, flat_params, zeros,
                                           has_aux=True)

  def vjp_fn(cotangent):
    return (jax.tree.unflatten(params_tree, pullback(cotangent)[0]),)

  def gramian(mask, num_objectives):
    if examples is None:
      parts = _TaskParts(program, captured, flat_params, pullback,
                         num_objectives, out.dtype)
    else:
      parts = _ExampleParts(program, captured, flat_params, pullback,
                            examples, out.dtype)
    return _sum_gramian(program, parts, flat_params, mask)

  def saves(mask, num_objectives):
    if examples is not None:
      return True
    mask_leaves = (jax.tree.leaves(mask) if mask is not None
                   else [True] * len(flat_params))
    uses = {}
    for consumer in program.consumers:
      for leaf in consumer.leaves:
        uses[leaf] = uses.get(leaf, 0) + 1
    return any(
        consumer.dense is not None and mask_leaves[consumer.leaves[0]]
        and uses[consumer.leaves[0]] == 1
        and consumer.leaves[0] not in program.fallback
        and _dense_costs(consumer.dense, num_objectives)[0]
        < _dense_costs(consumer.dense, num_objectives)[1]
        for consumer in program.consumers)

  return Linearized(out, aux, vjp_fn, gramian, saves)


def _sum_gramian(program, parts, flat_params, mask):
  """``G`` summed leaf by leaf over the leaves that ``mask`` keeps."""
  mask_leaves = (jax.tree.leaves(mask) if mask is not None
                 else [True] * len(flat_params))
  kept = [index for index, (leaf, keep) in enumerate(
      zip(flat_params, mask_leaves))
          if keep and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
  dtype = jnp.result_type(jnp.float32,
                          *[jnp.result_type(flat_params[i]) for i in kept])
  consumers_of = {}
  for index, consumer in enumerate(program.consumers):
    for leaf in consumer.leaves:
      consumers_of.setdefault(leaf, []).append(index)
  total = jnp.zeros((parts.num_objectives, parts.num_objectives), dtype)
  for leaf in kept:
    users = consumers_of.get(leaf, [])
    if leaf in program.fallback:
      total += _flat_gramian(parts.whole_gradients(leaf), dtype)
    elif len(users) == 1 and parts.is_dense(users[0]):
      total += parts.dense_gramian(users[0], dtype)
    elif users:
      grads = sum(parts.local_gradients(index)[leaf] for index in users)
      total += _flat_gramian(grads, dtype)
  return total


class _TaskParts:
  """T objectives: the cotangents of T unit vectors, mapped."""

  def __init__(self, program, captured, flat_params, pullback,
               num_objectives, dtype):
    self.program, self.captured, self.flat_params = (program, captured,
                                                     flat_params)
    self.num_objectives = num_objectives
    eye = jnp.eye(num_objectives, dtype=dtype)
    # Under jit, what no Gramian reads (the covered leaves' gradients) is
    # never computed.
    self.param_cots, self.perturbation_cots = jax.vmap(pullback)(eye)
    self.local = {}

  def whole_gradients(self, leaf):
    return self.param_cots[leaf]

  def is_dense(self, index):
    return self.program.consumers[index].dense is not None

  def dense_gramian(self, index, dtype):
    return _dense_gramian(self.program.consumers[index].dense,
                          self.captured[index][0],
                          self.perturbation_cots[index][0], dtype)

  def local_gradients(self, index):
    if index not in self.local:
      consumer = self.program.consumers[index]
      pullback = _local_pullback(
          consumer, self.captured[index],
          [self.flat_params[leaf] for leaf in consumer.leaves])
      grads = jax.vmap(pullback)(tuple(self.perturbation_cots[index]))
      self.local[index] = dict(zip(consumer.leaves, grads))
    return self.local[index]


class _ExampleParts:
  """One objective per example: the cotangents of ONE backward pass.

  Example ``b``'s loss only reads example ``b``'s rows, so the cotangent of
  the summed losses, restricted to those rows, is that of loss ``b``.
  """

  def __init__(self, program, captured, flat_params, pullback, examples,
               dtype):
    self.program, self.captured, self.flat_params = (program, captured,
                                                     flat_params)
    self.pullback, self.examples = pullback, examples
    self.num_objectives = examples.num_examples
    ones = jnp.ones((examples.num_examples,), dtype)
    self.perturbation_cots = pullback(ones)[1]
    self.dtype = dtype
    self.local = {}
    self.whole = None

  def whole_gradients(self, leaf):
    if self.whole is None:
      eye = jnp.eye(self.num_objectives, dtype=self.dtype)
      self.whole = jax.vmap(self.pullback)(eye)[0]
    return self.whole[leaf]

  def is_dense(self, index):
    return self.examples.dense_rows[index] is not None

  def dense_gramian(self, index, dtype):
    return _example_dense_gramian(
        self.program.consumers[index].dense, self.examples.dense_rows[index],
        self.captured[index][0], self.perturbation_cots[index][0],
        self.num_objectives, dtype)

  def local_gradients(self, index):
    if index not in self.local:
      consumer = self.program.consumers[index]
      pullback = _local_pullback(
          consumer, self.captured[index],
          [self.flat_params[leaf] for leaf in consumer.leaves])
      cotangents = self.perturbation_cots[index]
      axes = self.examples.output_axes[index]
      added = _added_parameter(consumer)
      grads = None if added is None else _example_added_gradients(
          consumer, added, cotangents[0], axes[0], self.num_objectives,
          self.flat_params)
      if grads is not None:
        self.local[index] = grads
        return grads

      def one_example(example):
        return pullback([_rows_of(cot, axis, example)
                         for cot, axis in zip(cotangents, axes)])

      grads = jax.vmap(one_example)(jnp.arange(self.num_objectives))
      self.local[index] = dict(zip(consumer.leaves, grads))
    return self.local[index]


def _added_parameter(consumer):
  """``(position, sign)`` of a parameter (a bias) added to data, or None.

  The parameter's operand must be broadcast to the output by size-1
  dimensions only (as ``x + b`` traces), so each example's gradient is its
  rows' cotangents summed, never a cotangent masked per example.
  """
  if consumer.eqn.primitive.name not in ("add", "sub", "add_any"):
    return None
  infos = consumer.inputs
  pure = [k for k, info in enumerate(infos) if isinstance(info, _Pure)]
  if len(pure) != 1 or len(infos) != 2 or isinstance(
      infos[1 - pure[0]], _Literal):
    return None
  position = pure[0]
  operand = consumer.eqn.invars[position].aval.shape
  output = consumer.eqn.outvars[0].aval.shape
  if len(operand) != len(output) or any(
      a not in (1, b) for a, b in zip(operand, output)):
    return None
  sign = -1.0 if (consumer.eqn.primitive.name == "sub"
                  and position == 1) else 1.0
  return position, sign


def _example_added_gradients(consumer, added, cotangent, axis, num_examples,
                             flat_params):
  """Per-example gradients of a bias: each example's rows summed."""
  position, sign = added
  info = consumer.inputs[position]
  operand = consumer.eqn.invars[position].aval.shape
  dim, factor = axis
  if operand[dim] != 1:
    return None
  # [..., B·m, ...] -> [B, ..., m, ...]: the example axis in front.
  split = cotangent.reshape(cotangent.shape[:dim] + (num_examples, factor)
                            + cotangent.shape[dim + 1:])
  split = jnp.moveaxis(split, dim, 0)
  summed = tuple(d + 1 for d, size in enumerate(operand) if size == 1)
  per_example = sign * jnp.sum(split, axis=summed, keepdims=True)
  per_example = per_example.reshape((num_examples,) + operand)
  _, pullback = jax.vjp(info.fn, flat_params[info.leaf])
  grads = jax.vmap(lambda cot: pullback(cot.astype(
      consumer.eqn.invars[position].aval.dtype))[0])(per_example)
  return {info.leaf: grads}


def _rows_of(array, axis, example):
  """``array`` where its entries belong to ``example``, zero elsewhere."""
  dim, factor = axis
  owner = jnp.arange(array.shape[dim]) // factor
  shape = [1] * array.ndim
  shape[dim] = array.shape[dim]
  return jnp.where((owner == example).reshape(shape), array,
                   jnp.zeros((), array.dtype))


def _example_dense_gramian(dense, rows_dim, data, cotangents, num_examples,
                           dtype):
  """The per-example Gramian of a dense layer: ``Σ (X Xᵀ) ⊙ (Δ Δᵀ)``.

  The rows of example ``b`` are entries ``b·m … b·m + m − 1`` of the data's
  free dimension ``rows_dim`` (and every entry of its other free
  dimensions).
  """
  position = dense.data_free.index(rows_dim)
  other = tuple(d for d in dense.data_free if d != rows_dim)
  rows = jnp.transpose(
      data, dense.batch + (rows_dim,) + other + dense.contract).reshape(
          dense.batch_size, num_examples, -1, dense.contracting).astype(dtype)
  out_other = tuple(dense.out_data[k] for k in range(len(dense.data_free))
                    if k != position)
  deltas = jnp.transpose(
      cotangents, dense.out_batch + (dense.out_data[position],) + out_other
      + dense.out_param).reshape(
          dense.batch_size, num_examples, -1, dense.outputs).astype(dtype)
  n, b, m = rows.shape[:3]
  c, o = dense.contracting, dense.outputs
  kernel_cost = n * b * b * m * m * (c + o)
  gradient_cost = n * b * m * c * o + b * b * n * c * o
  if kernel_cost <= gradient_cost:
    # Two [n, B·m, B·m] Gram matrices (plain matrix products), multiplied
    # entrywise, summed over each pair of examples' rows.
    rows = rows.reshape(n, b * m, c)
    deltas = deltas.reshape(n, b * m, o)
    kernel = jnp.matmul(rows, jnp.swapaxes(rows, 1, 2), precision=_HIGHEST)
    outer = jnp.matmul(deltas, jnp.swapaxes(deltas, 1, 2),
                       precision=_HIGHEST)
    return jnp.sum((kernel * outer).reshape(n, b, m, b, m), axis=(0, 2, 4))
  grads = jnp.einsum("nbmc,nbmo->bnco", rows, deltas,
                     precision=_HIGHEST).reshape(b, -1)
  return jnp.matmul(grads, grads.T, precision=_HIGHEST)


@dataclasses.dataclass
class _Examples:
  """Where each consumer's examples lie (``batch_axis``)."""
  num_examples: int
  output_axes: list  # per consumer, per inexact output: (dim, factor)
  dense_rows: list  # per consumer: the data's example dimension, or None


def _example_axes(fun, program, flat_params, array_args, batch_axis):
  """Traces again with one more example and compares the shapes."""
  losses_shape = program.closed_jaxpr.out_avals[0].shape
  if len(losses_shape) != 1:
    raise ValueError(
        "with batch_axis, loss_fn must return one loss per example, shape "
        f"(batch,), got shape {losses_shape}.")
  num_examples = losses_shape[0]
  larger, resized = [], False
  for leaf in array_args:
    shape = list(np.shape(leaf))
    if len(shape) > batch_axis and shape[batch_axis] == num_examples:
      shape[batch_axis] += 1
      resized = True
    larger.append(jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(leaf)))
  if not resized:
    raise ValueError(
        f"batch_axis={batch_axis}: no array argument has the batch size "
        f"{num_examples} (the number of losses) along that axis.")
  other = trace(fun, flat_params, larger)
  if [c.eqn.primitive for c in other.consumers] != [
      c.eqn.primitive for c in program.consumers]:
    raise ValueError(
        "with batch_axis and gramian_mode='per_layer', the program must be "
        "the same for every batch size (its operations changed with one "
        "more example); use gramian_mode='jacobian'.")
  if _mixes_examples(program.closed_jaxpr.jaxpr, other.closed_jaxpr.jaxpr,
                     [False] * len(program.closed_jaxpr.jaxpr.invars))[0]:
    raise ValueError(
        "with batch_axis and gramian_mode='per_layer', no example's loss may "
        "read another example, but the losses read a value computed across "
        "the examples (BatchNorm in training mode, a batch mean or sum); "
        "use gramian_mode='jacobian', which makes no such assumption.")
  output_axes, dense_rows = [], []
  for consumer, twin in zip(program.consumers, other.consumers):
    axes = []
    for position in consumer.inexact_outputs:
      axis = _example_axis(consumer.eqn.outvars[position].aval.shape,
                           twin.eqn.outvars[position].aval.shape,
                           num_examples)
      if axis is None:
        raise ValueError(
            f"with batch_axis, the operation {consumer.eqn.primitive} that "
            "reads a parameter must keep the examples apart, but its output "
            f"{consumer.eqn.outvars[position].aval.str_short()} has no "
            "example axis; use gramian_mode='jacobian'.")
      axes.append(axis)
    output_axes.append(axes)
    rows = None
    if consumer.dense is not None:
      data = consumer.eqn.invars[consumer.dense.data_position]
      twin_data = twin.eqn.invars[consumer.dense.data_position]
      axis = _example_axis(data.aval.shape, twin_data.aval.shape,
                           num_examples)
      if axis is not None and axis[0] in consumer.dense.data_free:
        rows = axis[0]
    dense_rows.append(rows)
  return _Examples(num_examples, output_axes, dense_rows)


def _mixes_examples(jaxpr, larger, in_mixed):
  """Which outputs read a value computed across the examples.

  ``jaxpr`` and ``larger`` are the same program traced with B and B + 1
  examples: a value whose shape does not change although it is computed
  from one whose shape does (a reduction over the examples) mixes them,
  and so does every value computed from it. Calls are walked into; other
  operations with a body (scan, while) are taken as a whole.
  """
  mixed = dict(zip(jaxpr.invars, in_mixed))
  shapes = {}
  for var, twin in zip(jaxpr.invars, larger.invars):
    shapes[var] = var.aval.shape != twin.aval.shape
  read = lambda atom, table: (False if isinstance(atom, jax_core.Literal)
                              else table.get(atom, False))
  for eqn, twin in zip(jaxpr.eqns, larger.eqns):
    inputs_mixed = [read(atom, mixed) for atom in eqn.invars]
    if eqn.primitive.name in _CALLS:
      outputs_mixed = _mixes_examples(_call_jaxpr(eqn).jaxpr,
                                      _call_jaxpr(twin).jaxpr, inputs_mixed)
    else:
      per_example = any(read(atom, shapes) for atom in eqn.invars)
      outputs_mixed = [
          any(inputs_mixed) or (per_example and var.aval.shape
                                == twin_var.aval.shape)
          for var, twin_var in zip(eqn.outvars, twin.outvars)]
    for var, twin_var, flag in zip(eqn.outvars, twin.outvars, outputs_mixed):
      mixed[var] = flag
      shapes[var] = var.aval.shape != twin_var.aval.shape
  return [read(atom, mixed) for atom in jaxpr.outvars]


def _example_axis(shape, larger_shape, num_examples):
  """The dimension holding the examples (``(dim, rows per example)``)."""
  changed = [d for d, (a, b) in enumerate(zip(shape, larger_shape)) if a != b]
  if len(shape) != len(larger_shape) or len(changed) > 1:
    raise ValueError(
        f"with batch_axis, an array of shape {shape} changed to "
        f"{larger_shape} with one more example: the examples must lie along "
        "one axis; use gramian_mode='jacobian'.")
  if not changed:
    return None
  dim = changed[0]
  factor, remainder = divmod(shape[dim], num_examples)
  if remainder or larger_shape[dim] != factor * (num_examples + 1):
    raise ValueError(
        f"with batch_axis, axis {dim} of an array went from {shape[dim]} to "
        f"{larger_shape[dim]} entries with one more example: not a whole "
        "number of rows per example; use gramian_mode='jacobian'.")
  return dim, factor


def _split_args(args):
  """The array leaves of ``args`` and a function that puts them back."""
  leaves, treedef = jax.tree.flatten(args)
  is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
  arrays = [leaf for leaf, array in zip(leaves, is_array) if array]

  def rebuild(flat_arrays):
    it = iter(flat_arrays)
    return jax.tree.unflatten(
        treedef, [next(it) if array else leaf
                  for leaf, array in zip(leaves, is_array)])

  return arrays, rebuild
