"""Tests of optax_mtl.trimmed_mean against SciPy's trim_mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import optax_mtl


@pytest.mark.parametrize("num_tasks, trim_number", [(3, 1), (5, 2), (6, 1),
                                                    (4, 0)])
def test_matches_scipy_trim_mean(num_tasks, trim_number):
  rng = np.random.default_rng(num_tasks)
  task_grads = {"w": rng.normal(size=(num_tasks, 3, 2)).astype(np.float32),
                "b": rng.normal(size=(num_tasks, 4)).astype(np.float32) * 100}
  strategy = optax_mtl.trimmed_mean(num_tasks, trim_number)
  update, state = jax.jit(strategy.update)(
      jax.tree.map(jnp.asarray, task_grads), strategy.init(None),
      task_losses=-jnp.ones(num_tasks))
  for key, grads in task_grads.items():
    expected = stats.trim_mean(grads.astype(np.float64),
                               trim_number / num_tasks, axis=0)
    np.testing.assert_allclose(update[key], expected, rtol=1e-5, atol=1e-5)
  assert int(state.num_skipped) == 0  # Negative losses are ordinary values.


def test_one_outlying_task_cannot_move_the_update():
  grads = np.array([[1.0, 2.0], [1.5, 2.5], [1e6, -1e6]], np.float32)
  strategy = optax_mtl.trimmed_mean(3, 1)
  update, _ = strategy.update(jnp.asarray(grads), strategy.init(None),
                              task_losses=jnp.ones(3))
  np.testing.assert_allclose(update, [1.5, 2.0])


def test_value_and_grad_face_agrees():
  def loss_fn(params, scales):
    return scales * jnp.sum(params ** 2)

  strategy = optax_mtl.trimmed_mean(3, 1)
  params = jnp.arange(3.0)
  (_, grads), _ = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))(
      params, strategy.init(params), jnp.array([1.0, -4.0, 2.0]))
  np.testing.assert_allclose(grads, 2 * params)  # The median task.


@pytest.mark.parametrize("trim_number", [-1, 2, 1.0, True])
def test_hyperparameter_errors(trim_number):
  with pytest.raises(ValueError, match="trim_number"):
    optax_mtl.trimmed_mean(3, trim_number)
