"""Helpers for writing per-task loss functions."""

from __future__ import annotations

from typing import Optional, Union

import chex
import jax.numpy as jnp


def masked_mean(values: chex.Array, mask: chex.Array,
                axis: Optional[Union[int, tuple[int, ...]]] = 0) -> chex.Array:
  """The mean of ``values`` over the entries where ``mask`` is true; 0 if none.

  .. math::

    \\operatorname{masked\\_mean}(v, m) =
      \\frac{\\sum_i m_i v_i}{\\max(1, \\sum_i m_i)}

  For a loss over labelled examples only: a task without a labelled
  example in the batch gets a loss of exactly 0 and a zero gradient, where
  the naive ``sum(v * m) / sum(m)`` gives 0/0 = NaN, which would reach the
  parameters. The unmasked entries are selected with ``jnp.where``, so a
  NaN or inf there (a missing label stored as NaN) does not enter the value;
  for a NaN-free *gradient* the loss must also be finite at those entries
  (replace missing labels by any finite value before computing ``values``).

  A strategy that needs positive losses (``uncertainty``, ``log_loss``,
  ``geometric_mean``, ...) excludes a task with a loss of 0 for that step;
  see each strategy's docstring.

  Args:
    values: per-example values, e.g. losses of shape ``(batch, T)``.
    mask: bools (or 0/1) broadcastable to ``values``: which entries count.
    axis: the axis (or axes) to average over; None for all.

  Returns:
    The masked mean, float32 or wider (``values``' shape without ``axis``).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> losses = jnp.array([[1.0, 5.0], [3.0, jnp.nan]])
    >>> labelled = jnp.array([[True, False], [True, False]])
    >>> optax_mtl.masked_mean(losses, labelled).tolist()
    [2.0, 0.0]
  """
  values = jnp.asarray(values)
  mask = jnp.broadcast_to(jnp.asarray(mask, bool), values.shape)
  dtype = jnp.promote_types(values.dtype, jnp.float32)
  total = jnp.sum(jnp.where(mask, values, 0).astype(dtype), axis=axis)
  count = jnp.sum(mask, axis=axis).astype(dtype)
  return total / jnp.maximum(count, 1)
