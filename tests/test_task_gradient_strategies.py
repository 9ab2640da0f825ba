"""Golden values of moco, db_mtl and excess_mtl against NumPy references.

Each reference is written from the paper's equations (see the docstrings),
runs in float64 on flat gradients, and is compared over several steps with
both faces.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_mtl
from tests import scipy_references

NUM_TASKS = 3
NUM_STEPS = 6
RNG = np.random.default_rng(3)
JACOBIANS = RNG.normal(size=(NUM_STEPS, NUM_TASKS, 5)) * np.array([[1.0], [10.0], [0.1]])
LOSSES = RNG.uniform(0.5, 3.0, size=(NUM_STEPS, NUM_TASKS))


simplex_projection = scipy_references.simplex_projection


def moco_reference(jacobians, losses, beta=0.5, beta_sigma=0.5, gamma=0.1,
                   gamma_sigma=0.5, rho=0.0, projection="simplex",
                   normalize=False):
  tracked = np.zeros_like(jacobians[0])
  lambdas = np.full(NUM_TASKS, 1.0 / NUM_TASKS)
  updates = []
  for t, (grads, loss) in enumerate(zip(jacobians, losses), start=1):
    if normalize:
      grads = grads / np.linalg.norm(grads, axis=1, keepdims=True) * loss[:, None]
    tracked = tracked - beta / t**beta_sigma * (tracked - grads)
    moved = lambdas - gamma / t**gamma_sigma * (
        (tracked @ tracked.T + rho * np.eye(NUM_TASKS)) @ lambdas)
    if projection == "simplex":
      lambdas = simplex_projection(moved)
    else:
      lambdas = np.exp(moved - moved.max()) / np.exp(moved - moved.max()).sum()
    updates.append(lambdas @ tracked)
  return np.array(updates), lambdas


def db_mtl_reference(jacobians, losses, beta=0.9, beta_sigma=0.5, eps=1e-8):
  averages = np.zeros_like(jacobians[0])
  updates = []
  for t, (grads, loss) in enumerate(zip(jacobians, losses), start=1):
    log_grads = grads / (loss + eps)[:, None]
    beta_t = beta / t**beta_sigma
    averages = beta_t * averages + (1 - beta_t) * log_grads
    norms = np.linalg.norm(averages, axis=1)
    updates.append((norms.max() / norms) @ averages)
  return np.array(updates), None


def excess_mtl_reference(jacobians, losses, robust_step_size=1e-2, eps=1e-7):
  del losses
  sums = np.zeros_like(jacobians[0])
  weights = np.ones(NUM_TASKS)
  initial = None
  updates = []
  for grads in jacobians:
    sums = sums + grads**2
    risks = np.sum(grads**2 / np.sqrt(sums + eps), axis=1)
    if initial is None:
      initial = risks
    else:
      weights = weights * np.exp(robust_step_size * risks / initial)
      weights = NUM_TASKS * weights / weights.sum()
    updates.append(weights @ grads)
  return np.array(updates), weights


CASES = {
    "moco": (optax_mtl.moco, {}, moco_reference, {}),
    "moco_softmax_normalized": (
        optax_mtl.moco, dict(projection="softmax", gradient_normalization="loss",
                             rho=0.1, learning_rate=0.5),
        moco_reference, dict(projection="softmax", normalize=True, rho=0.1,
                             gamma=0.5)),
    "db_mtl": (optax_mtl.db_mtl, {}, db_mtl_reference, {}),
    "db_mtl_options": (optax_mtl.db_mtl, dict(decay=0.5, decay_sigma=0.0,
                                              eps=0.0),
                       db_mtl_reference, dict(beta=0.5, beta_sigma=0.0,
                                              eps=0.0)),
    "excess_mtl": (optax_mtl.excess_mtl, dict(learning_rate=0.5),
                   excess_mtl_reference, dict(robust_step_size=0.5)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_values_in_both_faces(case):
  factory, kwargs, reference, reference_kwargs = CASES[case]
  expected, expected_weights = reference(JACOBIANS, LOSSES, **reference_kwargs)
  strategy = factory(NUM_TASKS, **kwargs)
  params = jnp.zeros(5)
  update = jax.jit(strategy.update)
  state = strategy.init(params)
  for t in range(NUM_STEPS):
    got, state = update(jnp.asarray(JACOBIANS[t], jnp.float32), state, params,
                        task_losses=jnp.asarray(LOSSES[t], jnp.float32))
    np.testing.assert_allclose(got, expected[t], rtol=2e-4, atol=1e-5,
                               err_msg=f"{case} step {t}")
  if expected_weights is not None:
    np.testing.assert_allclose(state.weights, expected_weights, rtol=2e-4,
                               atol=1e-6)
  assert int(state.num_skipped) == 0

  # The training-step face on losses L_k(θ) = J_k·θ + c_k: same gradients.
  def loss_fn(theta, jacobian, offset):
    return jacobian @ theta + offset

  step = jax.jit(optax_mtl.value_and_grad(loss_fn, strategy))
  state = strategy.init(params)
  for t in range(NUM_STEPS):
    offset = LOSSES[t] - JACOBIANS[t] @ np.zeros(5)
    (_, grads), state = step(params, state,
                             jnp.asarray(JACOBIANS[t], jnp.float32),
                             jnp.asarray(offset, jnp.float32))
    np.testing.assert_allclose(grads, expected[t], rtol=2e-4, atol=1e-5)


def _after_one_step(name):
  """``(jitted update, params, state)`` of ``name`` after the first step."""
  strategy = getattr(optax_mtl, name)(NUM_TASKS)
  params = jnp.zeros(5)
  update = jax.jit(strategy.update)
  _, state = update(jnp.asarray(JACOBIANS[0], jnp.float32),
                    strategy.init(params), params,
                    task_losses=jnp.asarray(LOSSES[0], jnp.float32))
  return update, params, state


@pytest.mark.parametrize("name", ["moco", "db_mtl", "excess_mtl"])
def test_rejected_steps_keep_the_state(name):
  update, params, state = _after_one_step(name)
  # No task with a finite gradient (one such task alone is excluded: see
  # test_a_non_finite_gradient_excludes_its_task_only).
  bad_grads = jnp.full((NUM_TASKS, 5), jnp.nan, jnp.float32)
  for grads, losses in ((bad_grads, LOSSES[1]),
                        (JACOBIANS[1], [1.0, jnp.inf, 1.0])):
    out, rejected = update(jnp.asarray(grads, jnp.float32), state, params,
                           task_losses=jnp.asarray(losses, jnp.float32))
    np.testing.assert_array_equal(out, np.zeros(5))
    assert int(rejected.num_skipped) == int(state.num_skipped) + 1
    # Every task of the NaN gradients is counted; none for the bad loss.
    np.testing.assert_array_equal(rejected.num_rejected_gradients,
                                  [int(grads is bad_grads)] * NUM_TASKS)
    unchanged = dict(num_skipped=0, num_rejected_gradients=0)
    for kept, before in zip(jax.tree.leaves(rejected._replace(**unchanged)),
                            jax.tree.leaves(state._replace(**unchanged))):
      np.testing.assert_array_equal(kept, before)


@pytest.mark.parametrize("name", ["moco", "db_mtl", "excess_mtl"])
def test_a_non_finite_gradient_excludes_its_task_only(name):
  """The step goes on for the other tasks; no NaN in the update or state."""
  update, params, state = _after_one_step(name)
  bad_grads = jnp.asarray(JACOBIANS[1], jnp.float32).at[0, 0].set(jnp.nan)
  out, new_state = update(bad_grads, state, params,
                          task_losses=jnp.asarray(LOSSES[1], jnp.float32))
  assert int(new_state.num_skipped) == int(state.num_skipped)
  assert np.all(np.isfinite(out)) and np.any(out != 0)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(new_state))
  np.testing.assert_array_equal(new_state.num_rejected_gradients, [1, 0, 0])


def test_db_mtl_rejects_non_positive_losses_and_moco_accepts_them():
  params = jnp.zeros(5)
  grads = jnp.asarray(JACOBIANS[0], jnp.float32)
  db = optax_mtl.db_mtl(NUM_TASKS)
  _, state = db.update(grads, db.init(params), task_losses=jnp.zeros(3))
  assert int(state.num_skipped) == 1
  moco = optax_mtl.moco(NUM_TASKS)
  _, state = moco.update(grads, moco.init(params), task_losses=-jnp.ones(3))
  assert int(state.num_skipped) == 0


def test_per_task_state_has_the_params_structure():
  params = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(2),
            "count": jnp.zeros([], jnp.int32)}
  strategy = optax_mtl.moco(NUM_TASKS)
  state = strategy.init(params)
  assert state.gradient_average["w"].shape == (NUM_TASKS, 2, 3)
  assert state.gradient_average["count"] is None
  task_grads = {"w": jnp.ones((NUM_TASKS, 2, 3)), "b": jnp.ones((NUM_TASKS, 2)),
                "count": np.zeros((NUM_TASKS,), jax.dtypes.float0)}
  update, _ = strategy.update(task_grads, state, params,
                              task_losses=jnp.ones(NUM_TASKS))
  assert update["w"].shape == (2, 3)
  assert update["count"].dtype == jax.dtypes.float0


@pytest.mark.parametrize("factory, kwargs, message", [
    (optax_mtl.moco, dict(beta=0.0), "beta"),
    (optax_mtl.moco, dict(learning_rate=float("inf")), "learning_rate"),
    (optax_mtl.moco, dict(rho=-1.0), "rho"),
    (optax_mtl.moco, dict(projection="box"), "projection"),
    (optax_mtl.moco, dict(gradient_normalization="l2"),
     "gradient_normalization"),
    (optax_mtl.db_mtl, dict(decay=1.5), "decay"),
    (optax_mtl.db_mtl, dict(eps=-1.0), "eps"),
    (optax_mtl.excess_mtl, dict(learning_rate=0.0), "learning_rate"),
    (optax_mtl.excess_mtl, dict(eps=float("nan")), "eps"),
])
def test_hyperparameter_errors(factory, kwargs, message):
  with pytest.raises(ValueError, match=message):
    factory(NUM_TASKS, **kwargs)


def test_excess_mtl_a_weight_that_fell_far_comes_back():
  # One excess-risk swing of ~200 drives task 1's weight to e^-200 of task
  # 0's (below float32); when task 1's risk then swings back, the exact
  # exponentiated-gradient recursion (NumPy, float64, on log-weights) puts
  # the weight on task 1, which must happen here too.
  steps = [np.array([[1.0], [1.0]]), np.array([[200.0], [1.0]]),
           np.array([[1.0], [400.0]])]
  strategy = optax_mtl.excess_mtl(2, learning_rate=1.0)
  state = strategy.init(jnp.zeros(1))
  sums, log_weights, initial = np.zeros((2, 1)), np.zeros(2), None
  for grads in steps:
    _, state = strategy.update(jnp.asarray(grads), state,
                               task_losses=jnp.ones(2))
    sums += grads * grads
    risks = (grads * grads / np.sqrt(sums + 1e-7)).sum(axis=1)
    if initial is None:
      initial = risks
    else:
      log_weights = log_weights + risks / initial
  exact = 2 * np.exp(log_weights - log_weights.max())
  exact /= np.exp(log_weights - log_weights.max()).sum()
  np.testing.assert_allclose(state.weights, exact, rtol=1e-6, atol=1e-30)


def test_moco_computes_in_float64_under_x64():
  # A 1e-10 relative change of float64 gradients is resolved: finite
  # differences with steps 1e-10 and 1e-6 agree as in float64 (the tracked
  # Gramian and λ were rounded to float32).
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    jacobian, change = rng.normal(size=(2, 3, 6))
    strategy = optax_mtl.moco(3)

    def update(grads):
      out, _ = strategy.update(jnp.asarray(grads), strategy.init(jnp.zeros(6)),
                               task_losses=jnp.array([0.9, 2.5, 0.3]))
      assert out.dtype == jnp.float64
      return np.asarray(out)

    small = (update(jacobian + 1e-10 * change) - update(jacobian)) / 1e-10
    large = (update(jacobian + 1e-6 * change) - update(jacobian)) / 1e-6
    assert np.max(np.abs(small - large)) <= 1e-4 * np.max(np.abs(large))


def test_db_mtl_step_size_is_float64_under_x64():
  # δ_t = δ / t^σ in float64: two steps of db_mtl(decay_sigma=0.5) match
  # the NumPy recursion (LibMTL's DB_MTL with a decaying β) to float64
  # precision.
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    jacobians = rng.normal(size=(3, 3, 4))
    losses = rng.uniform(0.5, 2.0, size=(3, 3))
    strategy = optax_mtl.db_mtl(3)
    state = strategy.init(jnp.zeros(4))
    averages = np.zeros((3, 4))
    for t, (grads, task_losses) in enumerate(zip(jacobians, losses), 1):
      update, state = strategy.update(jnp.asarray(grads), state,
                                      task_losses=jnp.asarray(task_losses))
      beta_t = 0.9 / np.sqrt(t)
      averages = beta_t * averages + (1 - beta_t) * grads / (
          task_losses + 1e-8)[:, None]
      norms = np.linalg.norm(averages, axis=1)
      np.testing.assert_allclose(update, (norms.max() / norms) @ averages,
                                 rtol=1e-12)


@pytest.mark.parametrize("case", ["moco_softmax_normalized", "excess_mtl"])
def test_the_iterates_are_float64_under_x64(case):
  # Six steps in float64: λ, the tracked Gramian and the risks stay float64
  # between steps, so the updates match the float64 recursion.
  factory, kwargs, reference, reference_kwargs = CASES[case]
  expected, _ = reference(JACOBIANS, LOSSES, **reference_kwargs)
  with jax.enable_x64(True):
    strategy = factory(NUM_TASKS, **kwargs)
    params = jnp.zeros(5, jnp.float64)
    state = strategy.init(params)
    for t in range(NUM_STEPS):
      got, state = strategy.update(jnp.asarray(JACOBIANS[t]), state, params,
                                   task_losses=jnp.asarray(LOSSES[t]))
      assert state.weights.dtype == jnp.float64
      np.testing.assert_allclose(got, expected[t], rtol=1e-11,
                                 err_msg=f"{case} step {t}")


@pytest.mark.parametrize("factory, old, new, old_field, new_field", [
    (optax_mtl.moco, dict(gamma=0.5, gamma_sigma=0.2),
     dict(learning_rate=0.5, learning_rate_sigma=0.2), "tracked_gradients",
     "gradient_average"),
    (optax_mtl.db_mtl, dict(beta=0.5, beta_sigma=0.2),
     dict(decay=0.5, decay_sigma=0.2), "gradient_averages",
     "gradient_average"),
    (optax_mtl.excess_mtl, dict(robust_step_size=0.5),
     dict(learning_rate=0.5), None, None),
])
def test_optax_mtl_0_1_names_warn_and_give_the_same_strategy(
    factory, old, new, old_field, new_field):
  with pytest.warns(DeprecationWarning, match=sorted(new)[0]):
    old_strategy = factory(NUM_TASKS, **old)
  new_strategy = factory(NUM_TASKS, **new)
  params = jnp.zeros(5)
  old_state, new_state = old_strategy.init(params), new_strategy.init(params)
  for t in range(2):
    grads = jnp.asarray(JACOBIANS[t], jnp.float32)
    losses = jnp.asarray(LOSSES[t], jnp.float32)
    old_update, old_state = old_strategy.update(grads, old_state,
                                                task_losses=losses)
    new_update, new_state = new_strategy.update(grads, new_state,
                                                task_losses=losses)
    np.testing.assert_array_equal(old_update, new_update)
  if old_field is not None:
    with pytest.warns(DeprecationWarning, match=new_field):
      np.testing.assert_array_equal(getattr(new_state, old_field),
                                    getattr(new_state, new_field))
    assert old_field not in new_state._fields
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # The new spelling does not warn.
    factory(NUM_TASKS, **new)
