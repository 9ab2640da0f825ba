"""masked_mean: a per-task loss over labelled examples that is never NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl


def _reference(values, mask):
  """Σ m v / max(1, Σ m) per column, in NumPy (float64)."""
  values, mask = np.asarray(values, np.float64), np.asarray(mask, bool)
  out = []
  for column in range(values.shape[1]):
    kept = values[mask[:, column], column]
    out.append(kept.sum() / max(1, kept.size))
  return np.array(out)


def test_masked_mean_matches_the_reference():
  rng = np.random.default_rng(0)
  values = rng.normal(size=(16, 4)).astype(np.float32)
  mask = rng.random((16, 4)) < 0.5
  mask[:, 2] = False  # A task without labels in this batch.
  np.testing.assert_allclose(optax_mtl.masked_mean(values, mask),
                             _reference(values, mask),
                             rtol=16 * np.finfo(np.float32).eps)


def test_an_unlabelled_task_gives_zero_loss_and_zero_gradient():
  values = jnp.array([[1.0, jnp.nan], [3.0, jnp.inf]])
  mask = jnp.array([[True, False], [True, False]])
  np.testing.assert_array_equal(optax_mtl.masked_mean(values, mask),
                                [2.0, 0.0])
  grad = jax.grad(lambda v: optax_mtl.masked_mean(v, mask).sum())(values)
  np.testing.assert_array_equal(grad, [[0.5, 0.0], [0.5, 0.0]])


@pytest.mark.parametrize("name", ["loss_ema", "upgrad"])
def test_training_with_an_unlabelled_task_keeps_the_params_finite(name):
  def loss_fn(params, x, y, labelled):
    per_example = (x @ params - y) ** 2
    return optax_mtl.masked_mean(per_example, labelled)
  strategy = getattr(optax_mtl, name)(3)
  step = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  params, state = jnp.ones((2, 3)), strategy.init(None)
  x, y = jnp.ones((8, 2)), jnp.zeros((8, 3))
  labelled = jnp.ones((8, 3), bool).at[:, 1].set(False)
  for _ in range(3):
    (losses, grads), state = step(params, state, x, y, labelled)
    params = optax.apply_updates(params, jax.tree.map(lambda g: -0.1 * g,
                                                      grads))
  assert float(losses[1]) == 0.0
  assert np.all(np.isfinite(params))
  np.testing.assert_array_equal(params[:, 1], 1.0)  # No labels, no move.
