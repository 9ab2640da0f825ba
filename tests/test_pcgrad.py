"""Tests of optax_mtl.pcgrad against a NumPy loop over the gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from optax_mtl._src.weighting import _pcgrad
from optax_mtl._src.weighting._helpers import gradient_surgery
from tests import gramian_harness

# Fixed Jacobians (rows are task gradients): conflicting, rank-deficient,
# duplicated and zero gradients, T = 2..5.
JACOBIANS = gramian_harness.fixed_jacobians(
    "t2_conflict", "t3_mixed", "t4_rank2", "t5_random",
    t3_duplicate=[[1.0, -1.0], [1.0, -1.0], [-0.5, 2.0]],
    t3_zero=[[1.0, -1.0], [0.0, 0.0], [-0.5, 2.0]],
    t2_opposite=[[1.0, 2.0], [-1.0, -2.0]],
)


def pcgrad_reference(jacobian, orders):
  """Algorithm 1 of Yu et al. (2020) on the explicit gradients, float64."""
  jacobian = np.asarray(jacobian, np.float64)
  projected = []
  for i in range(jacobian.shape[0]):
    g_pc = jacobian[i].copy()
    for j in orders[i]:
      if j == i:
        continue
      g_j = jacobian[j]
      dot = g_pc @ g_j
      if dot < 0:
        g_pc = g_pc - dot / (g_j @ g_j) * g_j
    projected.append(g_pc)
  return np.sum(projected, axis=0)


def random_orders(rng, num_tasks):
  return np.stack([rng.permutation(num_tasks) for _ in range(num_tasks)])


weights_fn = jax.jit(_pcgrad._pcgrad_weights)


def gramian_of(jacobian):
  jacobian = jnp.asarray(jacobian, jnp.float32)
  return jacobian @ jacobian.T


@pytest.mark.parametrize("name", sorted(JACOBIANS))
def test_fixed_orders_match_the_numpy_loop(name):
  jacobian = np.asarray(JACOBIANS[name])
  num_tasks = jacobian.shape[0]
  rng = np.random.default_rng(0)
  for _ in range(4):
    orders = random_orders(rng, num_tasks)
    weights = np.asarray(weights_fn(gramian_of(jacobian), jnp.asarray(orders)))
    assert np.all(np.isfinite(weights))
    expected = pcgrad_reference(jacobian, orders)
    np.testing.assert_allclose(weights @ jacobian, expected, rtol=1e-5,
                               atol=1e-5)


def test_two_tasks_golden_value():
  # g1·g2 = -1: g1^PC = (0.5, 0.5), g2^PC = (0, 1); weights (2, 1.5).
  jacobian = np.array([[1.0, 0.0], [-1.0, 1.0]])
  orders = np.array([[0, 1], [1, 0]])
  weights = weights_fn(gramian_of(jacobian), jnp.asarray(orders))
  np.testing.assert_allclose(weights, [2.0, 1.5], rtol=1e-6)


def test_optax_face_uses_the_orders_drawn_from_its_key():
  jacobian = np.asarray(JACOBIANS["t5_random"], np.float32)
  num_tasks = jacobian.shape[0]
  strategy = optax_mtl.pcgrad(num_tasks, seed=3)
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  keys_seen = []
  for _ in range(3):
    key = jax.random.wrap_key_data(state.key)
    _, orders_key = jax.random.split(key)
    orders = np.asarray(gradient_surgery.random_orders(orders_key, num_tasks))
    combined, state = update(jnp.asarray(jacobian), state,
                             task_losses=jnp.ones(num_tasks))
    np.testing.assert_allclose(combined, pcgrad_reference(jacobian, orders),
                               rtol=1e-5, atol=1e-5)
    keys_seen.append(tuple(np.asarray(state.key).tolist()))
  assert len(set(keys_seen)) == 3  # A fresh key every step.
  assert state.key.dtype == jnp.uint32


def test_both_faces_agree():
  jacobian = np.asarray(JACOBIANS["t4_rank2"], np.float32)
  num_tasks = jacobian.shape[0]
  gramian_harness.check_both_faces_agree(
      optax_mtl.pcgrad(num_tasks, seed=1), jacobian,
      gramian_harness.linear_loss(jacobian, 10.0),
      jnp.ones(jacobian.shape[1]),
      grads_tolerance=dict(rtol=1e-5, atol=1e-6),
      weights_tolerance=dict(rtol=1e-6))


def test_two_tasks_are_permutation_invariant_and_scale_invariant():
  jacobian = np.asarray(JACOBIANS["t2_conflict"])
  orders = jnp.array([[0, 1], [1, 0]])
  weights = weights_fn(gramian_of(jacobian), orders)
  swapped = weights_fn(gramian_of(jacobian[::-1]), orders)
  np.testing.assert_allclose(swapped, weights[::-1], rtol=1e-6)
  for scale in (1e-8, 1e8):
    scaled = weights_fn(gramian_of(jacobian * scale), orders)
    np.testing.assert_allclose(scaled, weights, rtol=1e-5)


def test_permuting_tasks_and_orders_permutes_weights():
  jacobian = np.asarray(JACOBIANS["t5_random"])
  rng = np.random.default_rng(1)
  orders = random_orders(rng, 5)
  perm = rng.permutation(5)
  inverse = np.argsort(perm)
  permuted_orders = inverse[orders[perm]]
  weights = weights_fn(gramian_of(jacobian), jnp.asarray(orders))
  permuted = weights_fn(gramian_of(jacobian[perm]),
                        jnp.asarray(permuted_orders))
  np.testing.assert_allclose(permuted, np.asarray(weights)[perm], rtol=1e-5)


def test_non_conflicting_gradients_are_summed():
  jacobian = np.array([[1.0, 0.2], [0.3, 1.0], [0.5, 0.5]])
  weights = weights_fn(gramian_of(jacobian), jnp.asarray(
      random_orders(np.random.default_rng(2), 3)))
  np.testing.assert_allclose(weights, np.ones(3))


def test_zero_gradient_is_never_projected_onto():
  jacobian = np.asarray(JACOBIANS["t3_zero"])
  orders = jnp.array([[1, 2, 0], [0, 1, 2], [1, 0, 2]])
  weights = np.asarray(weights_fn(gramian_of(jacobian), orders))
  assert np.all(np.isfinite(weights))
  np.testing.assert_allclose(weights @ jacobian,
                             pcgrad_reference(jacobian[[0, 2]], [[1, 0],
                                                                 [0, 1]]),
                             rtol=1e-6)


def test_rejected_step_keeps_the_key():
  strategy = optax_mtl.pcgrad(3)
  state = strategy.init(None)
  _, new_state = jax.jit(strategy.update)(
      jnp.ones((3, 2)), state, task_losses=jnp.array([1.0, jnp.nan, 1.0]))
  assert int(new_state.num_skipped) == 1
  np.testing.assert_array_equal(new_state.key, state.key)


def test_recompute_every_reuses_the_weights():
  jacobian = jnp.asarray(JACOBIANS["t3_mixed"], jnp.float32)
  strategy = optax_mtl.recompute_every(optax_mtl.pcgrad(3), 2)
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  _, state = update(jacobian, state, task_losses=jnp.ones(3))
  first = state.inner_state.weights
  _, state = update(2.0 * jacobian[::-1], state, task_losses=jnp.ones(3))
  np.testing.assert_array_equal(state.inner_state.weights, first)


@pytest.mark.parametrize("kwargs, message",
                         gramian_harness.hyperparameter_errors(
                             (dict(num_tasks=2, seed=1.5), "seed")))
def test_hyperparameter_errors(kwargs, message):
  gramian_harness.check_rejects(optax_mtl.pcgrad, kwargs, message)


def test_seed_by_position_warns_and_gives_the_same_strategy():
  # optax_mtl 0.1 took the seed second, by position; it is keyword-only now.
  with pytest.warns(DeprecationWarning, match="seed=5"):
    old = optax_mtl.pcgrad(3, 5)
  new = optax_mtl.pcgrad(3, seed=5)
  np.testing.assert_array_equal(old.init(None).key, new.init(None).key)
  jacobian = jnp.asarray(JACOBIANS["t3_mixed"], jnp.float32)
  old_update, _ = old.update(jacobian, old.init(None), task_losses=jnp.ones(3))
  new_update, _ = new.update(jacobian, new.init(None), task_losses=jnp.ones(3))
  np.testing.assert_array_equal(old_update, new_update)
