"""Tests of the loss statistics shared by ema, rema, dwema and dwa."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_mtl._src.weighting._helpers import loss_history

NUM_TASKS = 3


def run_history(losses, steps_per_period, temperature=2.0):
  """Records every row of ``losses``; returns per-step ratios and factors."""

  @jax.jit
  def run(losses):
    def body(state, step_losses):
      ratios, available = loss_history.loss_ratios(state)
      factors = loss_history.dwa_coefficients(state, temperature)
      state = loss_history.record_losses(state, step_losses, steps_per_period)
      return state, (ratios, available, factors)
    return jax.lax.scan(body, loss_history.init_loss_ratios(NUM_TASKS),
                        losses)

  return run(jnp.asarray(losses, jnp.float32))


@pytest.mark.parametrize("steps_per_period", [1, 3])
def test_ratios_and_dwa_factors_match_period_means(steps_per_period):
  losses = np.random.default_rng(1).uniform(0.5, 2.0, (11, NUM_TASKS))
  final, (ratios, available, factors) = run_history(losses, steps_per_period)
  for step in range(len(losses)):
    period = step // steps_per_period  # The period this step belongs to.
    if period >= 2:
      chunk = lambda p: losses[p * steps_per_period:(p + 1) * steps_per_period]
      expected = chunk(period - 1).mean(0) / chunk(period - 2).mean(0)
      softmax = np.exp(expected / 2.0) / np.exp(expected / 2.0).sum()
      assert np.all(available[step])
      np.testing.assert_allclose(ratios[step], expected, rtol=1e-5)
      np.testing.assert_allclose(factors[step], NUM_TASKS * softmax,
                                 rtol=1e-5)
    else:
      assert not np.any(available[step])
      np.testing.assert_array_equal(ratios[step], np.ones(NUM_TASKS))
      np.testing.assert_array_equal(factors[step], np.ones(NUM_TASKS))
  np.testing.assert_array_equal(final.num_periods,
                                [len(losses) // steps_per_period] * NUM_TASKS)
  np.testing.assert_array_equal(final.num_period_steps,
                                [len(losses) % steps_per_period] * NUM_TASKS)


def test_long_period_mean_is_accurate_in_float32():
  losses = np.random.default_rng(2).uniform(1.0, 1000.0, (4000, NUM_TASKS))
  final, _ = run_history(losses, steps_per_period=2000)
  np.testing.assert_allclose(final.last_mean, losses[2000:].mean(0),
                             rtol=1e-5)
  np.testing.assert_allclose(final.before_last_mean, losses[:2000].mean(0),
                             rtol=1e-5)


def test_loss_average_starts_at_first_losses():
  losses = np.array([[2.0, 4.0, 8.0], [4.0, 2.0, 8.0], [1.0, 1.0, 1.0]])
  beta = 0.25
  state = loss_history.init_loss_average(NUM_TASKS)
  update = jax.jit(loss_history.update_loss_average, static_argnums=2)
  expected = losses[0]
  for step, step_losses in enumerate(losses):
    state = update(state, jnp.asarray(step_losses, jnp.float32), beta)
    if step:
      expected = beta * step_losses + (1 - beta) * expected
    np.testing.assert_allclose(state.average, expected, rtol=1e-6)
    assert state.average.dtype == jnp.float32
  np.testing.assert_array_equal(state.num_steps, [len(losses)] * NUM_TASKS)


def test_masked_updates_leave_excluded_tasks_alone():
  """valid=False keeps a task's statistics; it starts at its first loss."""
  valid = jnp.array([True, False, True])
  losses = jnp.array([2.0, -1.0, 4.0], jnp.float32)
  average = loss_history.update_loss_average(
      loss_history.init_loss_average(NUM_TASKS), losses, 0.5, valid)
  np.testing.assert_array_equal(average.average, [2.0, 0.0, 4.0])
  np.testing.assert_array_equal(average.num_steps, [1, 0, 1])
  average = loss_history.update_loss_average(
      average, jnp.array([4.0, 6.0, 4.0]), 0.5, jnp.array([True] * 3))
  np.testing.assert_array_equal(average.average, [3.0, 6.0, 4.0])
  ratios = loss_history.init_loss_ratios(NUM_TASKS)
  for step_losses in ([1.0, 9.0, 1.0], [2.0, 9.0, 4.0]):
    ratios = loss_history.record_losses(
        ratios, jnp.asarray(step_losses, jnp.float32), 1, valid)
  r, available = loss_history.loss_ratios(ratios)
  np.testing.assert_array_equal(available, [True, False, True])
  np.testing.assert_allclose(r, [2.0, 1.0, 4.0])
  np.testing.assert_array_equal(ratios.num_periods, [2, 0, 2])


def test_masked_normalisation_keeps_the_sum_and_the_excluded_weight():
  log_weights = jnp.log(jnp.array([1.0, 100.0, 3.0]))
  previous = jnp.array([0.5, 1.5, 1.0])
  valid = jnp.array([True, False, True])
  weights = loss_history.normalized_weights(log_weights, valid, previous)
  # Task 1 keeps 1.5; tasks 0 and 2 share 3 − 1.5 in the ratio 1 : 3.
  np.testing.assert_allclose(weights, [0.375, 1.5, 1.125], rtol=1e-6)
  all_valid = loss_history.normalized_weights(
      log_weights, jnp.array([True] * 3), previous)
  np.testing.assert_array_equal(all_valid,
                                loss_history.normalized_weights(log_weights))


def test_the_state_field_of_optax_mtl_0_1_warns_and_reads_the_same():
  """0.1 named ``LossRatioState.num_period_steps`` ``steps_in_period``."""
  state = loss_history.init_loss_ratios(3)
  with pytest.warns(DeprecationWarning,
                    match="steps_in_period .*LossRatioState.num_period"):
    assert state.steps_in_period is state.num_period_steps
