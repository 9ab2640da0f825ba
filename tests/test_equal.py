"""Tests of optax_mtl.equal (the plain sum or mean of the task losses)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl


@pytest.mark.parametrize("mean", [False, True])
def test_weights_are_float64_under_x64(mean):
  # Under x64 float64 losses stay float64: equal(T, mean=True) is the mean
  # to float64 round-off (the step rounded the weights to float32).
  with jax.enable_x64(True):
    strategy = optax_mtl.equal(3, mean=mean)
    jacobian = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)))
    update, _ = strategy.update(jacobian, strategy.init(None),
                                task_losses=jnp.ones(3))
    assert update.dtype == jnp.float64
  expected = np.asarray(jacobian).sum(0) / (3 if mean else 1)
  np.testing.assert_allclose(update, expected, rtol=1e-15, atol=1e-15)


def test_the_spelling_of_optax_mtl_0_1_warns_and_gives_the_same_weights():
  """0.1 took ``mean`` by position."""
  with pytest.warns(DeprecationWarning, match="mean=True"):
    old = optax_mtl.equal(3, True)
  new = optax_mtl.equal(3, mean=True)
  jacobian = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)))
  old_update, old_state = old.update(jacobian, old.init(None),
                                     task_losses=jnp.ones(3))
  new_update, new_state = new.update(jacobian, new.init(None),
                                     task_losses=jnp.ones(3))
  np.testing.assert_array_equal(old_update, new_update)
  np.testing.assert_array_equal(old_state.weights, new_state.weights)
