"""Tests of optax_mtl.config (Liu et al. 2025) and optax_mtl.krum (Blanchard et
al. 2017) against NumPy references written from the papers."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl


def config_reference(jacobian, preference=None):
  """d = (Σ_k g_kᵀ v̂) v̂, v = pinv(U) p on the explicit unit gradients."""
  jacobian = np.asarray(jacobian, np.float64)
  preference = (np.ones(len(jacobian)) if preference is None
                else np.asarray(preference, np.float64))
  units = jacobian / np.linalg.norm(jacobian, axis=1, keepdims=True)
  direction = np.linalg.pinv(units) @ preference
  unit = direction / np.linalg.norm(direction)
  return np.sum(jacobian @ unit) * unit


def krum_reference(jacobian, num_byzantine, num_selected):
  """Scores by explicit pairwise distances, then the mean of the best m."""
  jacobian = np.asarray(jacobian, np.float64)
  num_tasks = len(jacobian)
  scores = []
  for i in range(num_tasks):
    distances = sorted(np.sum((jacobian[i] - jacobian[j]) ** 2)
                       for j in range(num_tasks) if j != i)
    scores.append(sum(distances[:num_tasks - num_byzantine - 2]))
  selected = np.argsort(scores, kind="stable")[:num_selected]
  return jacobian[selected].mean(axis=0)


def jacobians(num_tasks, dim, seed):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(num_tasks, dim)) * rng.uniform(0.1, 10, (num_tasks, 1))


@pytest.mark.parametrize("num_tasks, dim, seed", [(2, 5, 0), (3, 7, 1),
                                                  (5, 9, 2), (4, 4, 3)])
def test_config_matches_the_pseudo_inverse_definition(num_tasks, dim, seed):
  jacobian = jacobians(num_tasks, dim, seed)
  strategy = optax_mtl.config(num_tasks)
  update, state = jax.jit(strategy.update)(
      jnp.asarray(jacobian, jnp.float32), strategy.init(None),
      task_losses=jnp.ones(num_tasks))
  expected = config_reference(jacobian)
  np.testing.assert_allclose(update, expected, rtol=2e-4,
                             atol=2e-5 * np.abs(expected).max())
  # Equal cosines with every task gradient (p = 1), all positive.
  cosines = (jacobian @ np.asarray(update, np.float64)) / (
      np.linalg.norm(jacobian, axis=1) * np.linalg.norm(update))
  np.testing.assert_allclose(cosines, cosines[0], rtol=1e-3)
  assert cosines[0] > 0
  assert int(state.num_skipped) == 0


def test_config_preference_and_rank_deficient_gradients():
  jacobian = jacobians(3, 6, 7)
  preference = [1.0, 2.0, 0.5]
  strategy = optax_mtl.config(3, preference=preference)
  update, _ = strategy.update(jnp.asarray(jacobian, jnp.float32),
                              strategy.init(None), task_losses=jnp.ones(3))
  np.testing.assert_allclose(update, config_reference(jacobian, preference),
                             rtol=2e-4, atol=1e-4)
  # A duplicated task (rank 2 < 3): the pseudo-inverse answer.
  duplicated = np.stack([jacobian[0], jacobian[1], 2.0 * jacobian[0]])
  update, _ = optax_mtl.config(3).update(
      jnp.asarray(duplicated, jnp.float32), strategy.init(None),
      task_losses=jnp.ones(3))
  np.testing.assert_allclose(update, config_reference(duplicated), rtol=2e-3,
                             atol=1e-3)


def test_config_leaves_a_zero_gradient_out_and_scales_linearly():
  jacobian = jacobians(3, 5, 4)
  with_zero = np.concatenate([jacobian[:2], np.zeros((1, 5))])
  strategy = optax_mtl.config(3)
  update, _ = strategy.update(jnp.asarray(with_zero, jnp.float32),
                              strategy.init(None), task_losses=jnp.ones(3))
  np.testing.assert_allclose(update, config_reference(jacobian[:2]),
                             rtol=2e-4, atol=1e-5)
  for scale in (1e-6, 1e6):
    scaled, _ = strategy.update(jnp.asarray(jacobian * scale, jnp.float32),
                                strategy.init(None), task_losses=jnp.ones(3))
    np.testing.assert_allclose(np.asarray(scaled) / scale,
                               config_reference(jacobian), rtol=1e-3)


def test_config_preference_is_float64_under_x64():
  # ConFIG's update does not change when p is scaled; under x64 that holds
  # to float64 round-off (the preference was stored in float32).
  with jax.enable_x64(True):
    jacobian = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)))
    updates = []
    for preference in ([0.1, 0.2, 0.3], [1.0, 2.0, 3.0]):
      strategy = optax_mtl.config(3, preference=preference)
      update, _ = strategy.update(jacobian, strategy.init(None),
                                  task_losses=jnp.ones(3))
      assert update.dtype == jnp.float64
      updates.append(np.asarray(update))
  np.testing.assert_allclose(updates[0], updates[1], rtol=1e-13)


@pytest.mark.parametrize("num_tasks, num_byzantine, num_selected",
                         [(3, 0, 1), (5, 1, 1), (5, 1, 3), (6, 2, 2),
                          (4, 1, 4)])
def test_krum_matches_the_explicit_distances(num_tasks, num_byzantine,
                                             num_selected):
  for seed in range(5):
    jacobian = jacobians(num_tasks, 4, seed)
    strategy = optax_mtl.krum(num_tasks, num_byzantine, num_selected)
    update, state = jax.jit(strategy.update)(
        jnp.asarray(jacobian, jnp.float32), strategy.init(None),
        task_losses=jnp.ones(num_tasks))
    np.testing.assert_allclose(
        update, krum_reference(jacobian, num_byzantine, num_selected),
        rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.sum(state.weights), 1.0, rtol=1e-6)


def test_krum_never_selects_an_outlier():
  rng = np.random.default_rng(9)
  honest = rng.normal(size=(4, 3)) * 0.1 + 1.0
  for outlier in itertools.product([-100.0, 100.0], repeat=3):
    jacobian = np.concatenate([honest, [outlier]])
    strategy = optax_mtl.krum(5, num_byzantine=1, num_selected=3)
    _, state = strategy.update(jnp.asarray(jacobian, jnp.float32),
                               strategy.init(None), task_losses=jnp.ones(5))
    assert float(state.weights[4]) == 0.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_tasks=3, num_byzantine=1), "num_byzantine"),
    (dict(num_tasks=3, num_byzantine=-1), "num_byzantine"),
    (dict(num_tasks=3, num_selected=0), "num_selected"),
    (dict(num_tasks=3, num_selected=4), "num_selected"),
])
def test_krum_hyperparameter_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    optax_mtl.krum(**kwargs)


@pytest.mark.parametrize("preference", [[1.0], [1.0, -1.0], [1.0, np.inf],
                                        ["1", "1"], "abc"])
def test_config_preference_errors(preference):
  with pytest.raises(ValueError, match="preference"):
    optax_mtl.config(2, preference=preference)
