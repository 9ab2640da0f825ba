"""Tests of optax_mtl.gradvac (Wang et al. 2021) against a NumPy reference
that applies the paper's Algorithm 1 to explicit gradient vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from optax_mtl._src.weighting._helpers import gradient_surgery


def numpy_gradvac(jacobian, targets, orders, beta, fixed_target=None):
  """Algorithm 1 on vectors: returns (update, new targets)."""
  jacobian = np.asarray(jacobian, np.float64)
  targets = np.array(targets, np.float64)
  num_tasks = len(jacobian)
  total = np.zeros(jacobian.shape[1])
  for i in range(num_tasks):
    g_i = jacobian[i].copy()
    for j in orders[i]:
      if j == i:
        continue
      g_j = jacobian[j]
      cosine = g_i @ g_j / (np.linalg.norm(g_i) * np.linalg.norm(g_j))
      target = targets[i, j] if fixed_target is None else fixed_target
      if cosine < target:
        g_i = g_i + g_j * np.linalg.norm(g_i) * (
            target * np.sqrt(1 - cosine**2)
            - cosine * np.sqrt(1 - target**2)) / (
                np.linalg.norm(g_j) * np.sqrt(1 - target**2))
      targets[i, j] = (1 - beta) * targets[i, j] + beta * cosine
    total += g_i
  return total, targets


@pytest.mark.parametrize("num_tasks, seed", [(2, 0), (3, 1), (5, 2)])
@pytest.mark.parametrize("fixed_target", [None, 0.3])
def test_coefficients_match_the_algorithm_on_vectors(num_tasks, seed,
                                                     fixed_target):
  rng = np.random.default_rng(seed)
  jacobian = rng.normal(size=(num_tasks, 6))
  targets = rng.uniform(-0.5, 0.8, size=(num_tasks, num_tasks))
  orders = np.stack([rng.permutation(num_tasks) for _ in range(num_tasks)])
  expected, expected_targets = numpy_gradvac(jacobian, targets, orders, 0.3,
                                             fixed_target)
  coefficients, new_targets = jax.jit(
      lambda g, t, o: gradient_surgery.surgery_coefficients(
          g, t, o, 0.3, fixed_target))(
          jnp.asarray(jacobian @ jacobian.T, jnp.float32),
          jnp.asarray(targets, jnp.float32), jnp.asarray(orders))
  np.testing.assert_allclose(np.sum(np.asarray(coefficients), 0) @ jacobian,
                             expected, rtol=1e-4, atol=1e-4)
  off_diagonal = ~np.eye(num_tasks, dtype=bool)
  np.testing.assert_allclose(np.asarray(new_targets)[off_diagonal],
                             expected_targets[off_diagonal], rtol=1e-4,
                             atol=1e-5)


def test_strategy_runs_the_algorithm_with_its_random_orders():
  rng = np.random.default_rng(4)
  jacobians = rng.normal(size=(4, 3, 5)).astype(np.float32)
  strategy = optax_mtl.gradvac(3, beta=0.2)
  update = jax.jit(strategy.update)
  state = strategy.init(None)
  targets = np.zeros((3, 3))
  for jacobian in jacobians:
    _, key = optax_mtl._src.base.split_key(state.key)
    orders = np.asarray(gradient_surgery.random_orders(key, 3))
    assert all(sorted(row) == [0, 1, 2] for row in orders)
    expected, targets = numpy_gradvac(jacobian, targets, orders, 0.2)
    got, state = update(jnp.asarray(jacobian), state, task_losses=jnp.ones(3))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  assert int(state.num_skipped) == 0


def test_per_leaf_groups_apply_gradvac_to_each_tensor():
  rng = np.random.default_rng(5)
  task_grads = {"a": rng.normal(size=(3, 2, 2)).astype(np.float32),
                "b": rng.normal(size=(3, 4)).astype(np.float32)}
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), task_grads)
  strategy = optax_mtl.gradvac(3, target=0.1, groups="leaf")
  state = strategy.init(params)
  assert state.target_cosines.shape == (2, 3, 3)
  _, key = optax_mtl._src.base.split_key(state.key)
  orders = np.asarray(gradient_surgery.random_orders(key, 3))
  update, state = jax.jit(strategy.update)(
      jax.tree.map(jnp.asarray, task_grads), state, params,
      task_losses=jnp.ones(3))
  for name, grads in task_grads.items():
    flat = grads.reshape(3, -1)
    expected, _ = numpy_gradvac(flat, np.zeros((3, 3)), orders, 0.5, 0.1)
    np.testing.assert_allclose(np.ravel(update[name]), expected, rtol=1e-4,
                               atol=1e-4)


def test_pcgrad_is_gradvac_with_target_zero():
  # The same random orders and the same projections: equal updates, bit
  # for bit, step after step.
  rng = np.random.default_rng(6)
  gradvac = optax_mtl.gradvac(4, target=0.0, seed=9)
  pcgrad = optax_mtl.pcgrad(4, seed=9)
  gradvac_state, pcgrad_state = gradvac.init(None), pcgrad.init(None)
  for _ in range(3):
    jacobian = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    expected, pcgrad_state = pcgrad.update(jacobian, pcgrad_state,
                                           task_losses=jnp.ones(4))
    got, gradvac_state = gradvac.update(jacobian, gradvac_state,
                                        task_losses=jnp.ones(4))
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(gradvac_state.weights, pcgrad_state.weights)


def test_agreeing_gradients_are_summed_and_targets_move():
  jacobian = jnp.array([[1.0, 0.2], [0.8, 0.3], [0.9, -0.1]])
  strategy = optax_mtl.gradvac(3)
  update, state = strategy.update(jacobian, strategy.init(None),
                                  task_losses=jnp.ones(3))
  # All cosines are above the initial targets (0): the plain sum.
  np.testing.assert_allclose(update, jacobian.sum(0), rtol=1e-6)
  assert float(state.target_cosines[0, 1]) > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=1.5), "beta"), (dict(target=1.0), "target"),
    (dict(groups="layer"), "groups"), (dict(seed="0"), "seed")])
def test_hyperparameter_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    optax_mtl.gradvac(3, **kwargs)
