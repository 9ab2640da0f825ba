"""Tests of optax_mtl.graddrop (Chen et al. 2020)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl

RNG = np.random.default_rng(0)
JACOBIAN = RNG.normal(size=(3, 5)).astype(np.float32)


def expected_update(jacobian, leak=0.0):
  """E[d] from the paper's Eqs.: P·Σ positive parts + (1−P)·Σ negative ones."""
  jacobian = np.asarray(jacobian, np.float64)
  purity = 0.5 * (1.0 + jacobian.sum(0) / np.abs(jacobian).sum(0))
  positive = np.clip(jacobian, 0, None).sum(0)
  negative = np.clip(jacobian, None, 0).sum(0)
  dropped = purity * positive + (1.0 - purity) * negative
  return leak * jacobian.sum(0) + (1.0 - leak) * dropped


def mean_update_over_seeds(strategy, jacobian, num_runs=4000):
  """The update averaged over independent runs (one key each, under vmap)."""
  state = strategy.init(None)
  keys = jnp.stack([jnp.asarray(optax_mtl._src.base.key_data_from_seed('seed', k))
                    for k in range(num_runs)])
  states = jax.tree.map(
      lambda leaf: jnp.broadcast_to(leaf, (num_runs,) + leaf.shape), state)
  states = states._replace(key=keys)
  updates, _ = jax.vmap(
      lambda s: strategy.update(jnp.asarray(jacobian), s,
                                task_losses=jnp.ones(jacobian.shape[0])))(
                                    states)
  return np.asarray(updates, np.float64)


@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_expected_update_matches_the_sign_purity(leak):
  updates = mean_update_over_seeds(optax_mtl.graddrop(3, leak=leak), JACOBIAN)
  spread = np.abs(JACOBIAN).sum(0) / np.sqrt(updates.shape[0])
  np.testing.assert_allclose(updates.mean(0), expected_update(JACOBIAN, leak),
                             atol=float(4 * spread.max()))
  # Every run keeps, at each coordinate, the positive or the negative part.
  positive = np.clip(JACOBIAN, 0, None).sum(0)
  negative = np.clip(JACOBIAN, None, 0).sum(0)
  leaked = leak * JACOBIAN.sum(0)
  choices = np.stack([leaked + (1 - leak) * positive,
                      leaked + (1 - leak) * negative])
  distance = np.abs(updates[:, None, :] - choices[None]).min(axis=1)
  assert distance.max() < 1e-5


def test_runs_under_vmap_draw_independent_uniforms():
  updates = mean_update_over_seeds(optax_mtl.graddrop(3), JACOBIAN, 64)
  assert len({tuple(row) for row in updates.round(5)}) > 1


def test_agreeing_signs_and_extreme_purity_maps_are_exact():
  agreeing = np.abs(JACOBIAN)
  strategy = optax_mtl.graddrop(3)
  update, _ = strategy.update(jnp.asarray(agreeing), strategy.init(None),
                              task_losses=jnp.ones(3))
  np.testing.assert_allclose(update, agreeing.sum(0), rtol=1e-6)
  keep_positive = optax_mtl.graddrop(3, purity_fn=jnp.ones_like)
  update, _ = keep_positive.update(jnp.asarray(JACOBIAN),
                                   keep_positive.init(None),
                                   task_losses=jnp.ones(3))
  np.testing.assert_allclose(update, np.clip(JACOBIAN, 0, None).sum(0),
                             rtol=1e-6)
  plain = optax_mtl.graddrop(3, leak=1.0)
  update, _ = plain.update(jnp.asarray(JACOBIAN), plain.init(None),
                           task_losses=jnp.ones(3))
  np.testing.assert_allclose(update, JACOBIAN.sum(0), rtol=1e-5, atol=1e-6)


def paper_batch_update(grads, keep_positive):
  """Chen et al. 2020, Alg. 1 with a batch: task k's sign at a feature is
  that of its batch sum, and its mask covers all its samples (NumPy)."""
  grads = np.asarray(grads, np.float64)
  sums = grads.sum(axis=1, keepdims=True)  # [T, 1, features]
  mask = np.where(keep_positive[None, None], sums > 0, sums < 0)
  return (mask * grads).sum(axis=0)


def test_batch_axis_keeps_or_drops_each_task_whole():
  # Gradients of a [batch=4, features=2] representation, per task: each
  # feature keeps the tasks whose batch sum has the chosen sign, with all
  # their samples (also those of the other sign).
  grads = RNG.normal(size=(3, 4, 2)).astype(np.float32)
  strategy = optax_mtl.graddrop(3, batch_axis=0)
  state = strategy.init(None)
  for _ in range(5):
    update, state = strategy.update(jnp.asarray(grads), state,
                                    task_losses=jnp.ones(3))
    for feature in range(2):
      choices = [paper_batch_update(grads, np.array([sign] * 2))[:, feature]
                 for sign in (True, False)]
      column = np.asarray(update)[:, feature]
      assert any(np.allclose(column, c, atol=1e-6) for c in choices)
  # Purity 1 (both batch sums positive): every task kept whole, including
  # task 0's negative sample.
  agreeing = jnp.array([[[3.0], [-1.0]], [[1.0], [1.0]]])
  strategy = optax_mtl.graddrop(2, batch_axis=0)
  update, _ = strategy.update(agreeing, strategy.init(None),
                              task_losses=jnp.ones(2))
  np.testing.assert_array_equal(np.asarray(update).ravel(), [4.0, 0.0])


def test_training_step_face_on_the_representation():
  strategy = optax_mtl.graddrop(2, batch_axis=0, purity_fn=jnp.ones_like)
  params = {"trunk": jnp.ones((3, 2)), "heads": jnp.array([[1.0, -1.0],
                                                           [-2.0, 1.0]])}
  inputs = jnp.arange(12.0).reshape(4, 3) / 10
  encoder = lambda p, x: x @ p["trunk"]
  heads = lambda p, z, x: jnp.sum(z @ p["heads"].T, axis=0)
  (_, grads), state = jax.jit(optax_mtl.value_and_grad(
      heads, strategy, encoder_fn=encoder))(params, strategy.init(params),
                                            inputs)
  # d/dz of task k is heads[k] on every row: keep the positive parts only.
  kept = np.clip(np.asarray(params["heads"]), 0, None).sum(0)
  expected_trunk = np.asarray(inputs).T @ np.tile(kept, (4, 1))
  np.testing.assert_allclose(grads["trunk"], expected_trunk, rtol=1e-6)
  assert int(state.num_skipped) == 0


def test_rejected_step_keeps_the_key():
  strategy = optax_mtl.graddrop(2)
  state = strategy.init(None)
  update, new_state = strategy.update(jnp.ones((2, 3)), state,
                                      task_losses=jnp.array([1.0, jnp.nan]))
  np.testing.assert_array_equal(update, np.zeros(3))
  np.testing.assert_array_equal(new_state.key, state.key)
  assert int(new_state.num_skipped) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tasks=2, leak=1.5), "leak"),
    (dict(num_tasks=2, leak=[0.1]), "leak"),
    (dict(num_tasks=2, leak="0.5"), r"leak must be a number or 2 numbers in"),
    (dict(num_tasks=2, purity_fn=3), "purity_fn"),
    (dict(num_tasks=2, batch_axis=-1), "batch_axis"),
    (dict(num_tasks=2, seed=1.5), "seed"),
])
def test_hyperparameter_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    optax_mtl.graddrop(**kwargs)
