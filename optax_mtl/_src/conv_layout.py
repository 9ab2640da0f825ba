"""Convolutions that XLA:CPU runs fast inside ``lax.cond`` and ``lax.map``.

XLA:CPU runs a convolution with its fast (Eigen, multithreaded) kernel only
when the convolution is *canonical*: input ``N…C``, kernel ``…IO``, output
``N…C`` (NHWC / HWIO in 2-D). Its pass that rewrites every other convolution
into a canonical one between two transposes (``ConvCanonicalization``,
``xla/service/cpu/conv_canonicalization.cc``) visits the entry computation
only. A convolution in the body of a ``lax.cond``, ``lax.map``, ``scan`` or
``while_loop`` keeps its dimension numbers, and a non-canonical one falls
back to a naive loop nest, 10 to 40 times slower. The backward pass of even
an NHWC/HWIO model is made of non-canonical convolutions (JAX's transpose
rules swap the roles of the dimensions), so a Jacobian computed inside
control flow hits that slow path (a conv training step: 1.9 ms at top level,
57–80 ms inside ``lax.cond`` on this project's 2-core CPU, whatever
``XLA_FLAGS`` says).

:func:`canonical_convolutions` does at the JAX level what that pass does at
the top level: it traces a function, rewrites every non-canonical
``conv_general_dilated`` as transpose → canonical convolution → transpose,
and evaluates the result in place of the function. Values are unchanged (the
same convolution on permuted axes); on XLA:GPU the transposes are folded
into the layouts XLA assigns anyway.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax import lax
from jax.extend import core as jax_core
import numpy as np

# Call-like primitives whose body is inlined when it holds a non-canonical
# convolution; their parameter that holds the body. Inlining keeps the
# values; only differentiating the result again would lose a custom rule
# or a remat policy, and nothing differentiates the Gramian.
_CALL_BODIES = {
    "pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr", "checkpoint": "jaxpr", "remat": "jaxpr",
    "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
}


def _canonical_specs(num_spatial: int) -> lax.ConvDimensionNumbers:
  """NHWC / HWIO / NHWC in ``num_spatial`` spatial dimensions."""
  spatial = tuple(range(1, num_spatial + 1))
  return lax.ConvDimensionNumbers(
      lhs_spec=(0, num_spatial + 1) + spatial,
      rhs_spec=(num_spatial + 1, num_spatial) + tuple(range(num_spatial)),
      out_spec=(0, num_spatial + 1) + spatial)


def is_canonical(dimension_numbers: lax.ConvDimensionNumbers) -> bool:
  """Whether XLA:CPU runs a convolution with these numbers on its fast path."""
  num_spatial = len(dimension_numbers.lhs_spec) - 2
  return tuple(map(tuple, dimension_numbers)) == tuple(
      map(tuple, _canonical_specs(num_spatial)))


def _canonical_convolution(lhs, rhs, *, dimension_numbers, **params):
  """The same convolution, as transposes around a canonical one."""
  if _swapped_by_xla(lhs.shape, rhs.shape, dimension_numbers, **params):
    lhs, rhs, dimension_numbers, params = _swapped(lhs, rhs,
                                                   dimension_numbers, params)
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  # Canonical order of each operand, as its original axes.
  lhs_order = (lhs_spec[0],) + tuple(lhs_spec[2:]) + (lhs_spec[1],)
  rhs_order = tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0])
  out_order = (out_spec[0],) + tuple(out_spec[2:]) + (out_spec[1],)
  out = lax.conv_general_dilated_p.bind(
      lax.transpose(lhs, lhs_order), lax.transpose(rhs, rhs_order),
      dimension_numbers=_canonical_specs(len(lhs_spec) - 2), **params)
  return lax.transpose(out, tuple(int(i) for i in np.argsort(out_order)))


def _kept_dims(lhs_shape, rhs_shape, dimension_numbers, window_strides,
               padding, lhs_dilation, rhs_dilation):
  """Per spatial dimension: whether XLA's operand swap leaves it as it is
  (a group or pure contraction dimension), and the kernel and input sizes."""
  lhs_spec, rhs_spec, _ = dimension_numbers
  for dim in range(len(lhs_spec) - 2):
    kernel = rhs_shape[rhs_spec[2 + dim]]
    size = lhs_shape[lhs_spec[2 + dim]]
    plain = padding[dim] == (0, 0) and rhs_dilation[dim] == 1
    group = (plain and lhs_dilation[dim] == kernel
             and window_strides[dim] == kernel - 1)
    contraction = (plain and kernel == size and lhs_dilation[dim] == 1
                   and window_strides[dim] == 1)
    yield group or contraction, kernel, size


def _swapped_by_xla(lhs_shape, rhs_shape, dimension_numbers, *,
                    window_strides, padding, lhs_dilation, rhs_dilation,
                    feature_group_count, batch_group_count, **unused):
  """Whether XLA's simplifier would swap input and kernel (ConvOperandSwapper:
  when the kernel is larger than the input), which makes a canonical
  convolution non-canonical again."""
  del unused
  if feature_group_count > 1 or batch_group_count > 1:
    return False
  kernel_product = swapped_product = 1
  for (kept, kernel, size), stride, (low, high), dilation in zip(
      _kept_dims(lhs_shape, rhs_shape, dimension_numbers, window_strides,
                 padding, lhs_dilation, rhs_dilation),
      window_strides, padding, rhs_dilation):
    if kept:
      continue
    kernel_product *= kernel
    swapped_product *= (kernel if size == 1 and stride == 1 and dilation == 1
                        and low == high == kernel - 1 else size)
  return kernel_product > swapped_product


def _swapped(lhs, rhs, dimension_numbers, params):
  """The convolution with input and kernel exchanged, as XLA would swap it.

  The new input is the kernel, the new kernel the input, both reversed on
  the swapped spatial dimensions; batch and feature of the output exchange
  their roles. Returned in JAX's terms: ``(lhs, rhs, numbers, params)``.
  """
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  strides, padding = params["window_strides"], params["padding"]
  base, window = params["lhs_dilation"], params["rhs_dilation"]
  new_padding, reversed_lhs, reversed_rhs = [], [], []
  for dim, (kept, kernel, size) in enumerate(_kept_dims(
      lhs.shape, rhs.shape, dimension_numbers, strides, padding, base,
      window)):
    if kept:
      new_padding.append(padding[dim])
      continue
    dilated_kernel = 1 + (kernel - 1) * window[dim]
    dilated_input = 1 + (size - 1) * base[dim]
    new_padding.append(tuple(dilated_input + pad - dilated_kernel
                             for pad in padding[dim]))
    reversed_rhs.append(rhs_spec[2 + dim])
    reversed_lhs.append(lhs_spec[2 + dim])
  numbers = lax.ConvDimensionNumbers(
      lhs_spec=(rhs_spec[0], rhs_spec[1]) + tuple(rhs_spec[2:]),
      rhs_spec=(lhs_spec[0], lhs_spec[1]) + tuple(lhs_spec[2:]),
      out_spec=(out_spec[1], out_spec[0]) + tuple(out_spec[2:]))
  params = dict(params, padding=tuple(new_padding), lhs_dilation=window,
                rhs_dilation=base)
  return (lax.rev(rhs, reversed_rhs), lax.rev(lhs, reversed_lhs), numbers,
          params)


def _body(eqn) -> Any:
  """The inner jaxpr of a call-like equation (or None)."""
  key = _CALL_BODIES.get(eqn.primitive.name)
  return None if key is None else eqn.params.get(key)


def _open(jaxpr) -> tuple[Any, tuple]:
  """``(Jaxpr, consts)`` of a Jaxpr or a ClosedJaxpr."""
  if isinstance(jaxpr, jax_core.ClosedJaxpr):
    return jaxpr.jaxpr, tuple(jaxpr.consts)
  return jaxpr, ()


def has_noncanonical_convolution(jaxpr) -> bool:
  """Whether ``jaxpr`` (or a call in it) holds a non-canonical convolution.

  Convolutions in the bodies of control flow (``cond``, ``scan``,
  ``while``) are not looked at: they are on the slow path at top level too.
  """
  for eqn in _open(jaxpr)[0].eqns:
    if _slow_convolution(eqn):
      return True
    if _body(eqn) is not None and has_noncanonical_convolution(_body(eqn)):
      return True
  return False


def _slow_convolution(eqn) -> bool:
  """Whether ``eqn`` is a convolution that would reach XLA:CPU's slow path
  inside control flow: not canonical, or one XLA would swap."""
  if eqn.primitive is not lax.conv_general_dilated_p:
    return False
  params = dict(eqn.params)
  numbers = params.pop("dimension_numbers")
  shapes = [var.aval.shape for var in eqn.invars]
  return not is_canonical(numbers) or _swapped_by_xla(*shapes, numbers,
                                                      **params)


def _bind(eqn, invals) -> list:
  params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(params, tuple):  # jax < 0.7: (subfuns, params).
    subfuns, params = params
    invals = list(subfuns) + list(invals)
  with eqn.ctx.manager:
    out = eqn.primitive.bind(*invals, **params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _evaluate(jaxpr, consts, *args) -> list:
  """Evaluates ``jaxpr`` with every non-canonical convolution rewritten."""
  env = {}

  def read(var):
    return var.val if isinstance(var, jax_core.Literal) else env[var]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(var) for var in eqn.invars]
    body = _body(eqn)
    if _slow_convolution(eqn):
      outvals = [_canonical_convolution(*invals, **eqn.params)]
    elif body is not None and has_noncanonical_convolution(body):
      outvals = _evaluate(*_open(body), *invals)
    else:
      outvals = _bind(eqn, invals)
    for var, value in zip(eqn.outvars, outvals):
      if not isinstance(var, jax_core.DropVar):
        env[var] = value
  return [read(var) for var in jaxpr.outvars]


def canonical_convolutions(fun: Callable[..., Any]) -> Callable[..., Any]:
  """``fun`` with its convolutions in the form XLA:CPU runs fast.

  Meant for the bodies of ``lax.cond`` and ``lax.map``: the result computes
  the same values as ``fun``; a function without a non-canonical
  convolution is called as it is.

  Args:
    fun: a function of arrays (pytrees) to arrays (pytrees).

  Returns:
    A function with the signature of ``fun``.
  """

  def rewritten(*args):
    closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
    if not has_noncanonical_convolution(closed):
      return fun(*args)
    outs = _evaluate(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return rewritten
