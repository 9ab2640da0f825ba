"""Tests of optax_mtl.rlw (Lin et al., TMLR 2022): w = softmax(z), z ~ N(0, I).

The reference draws the documented stream with its own jax.random calls (the
key of the seed, one split per accepted step, T normals from the second
half) and applies the softmax in NumPy; distribution tests check the law of
the weights.
"""

import functools

from hypothesis import given
from hypothesis import settings
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import optax_mtl
from tests import loss_weighting_harness as harness

NUM_TASKS = harness.NUM_TASKS
NAN = harness.NAN
# A scripted run: NaN and inf steps are rejected; the zero and the negative
# losses are accepted (RLW never reads the values).
LOSSES = harness.REJECTED_IN_MIDDLE.copy()
LOSSES[5, 1] = -0.2
GRADS = harness.scripted_grads(LOSSES)
NUM_REJECTED = 2


def is_accepted(losses):
  return bool(np.all(np.isfinite(losses)))


def softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


def key_words(seed):
  """The Threefry key data of a 64-bit seed: high word, low word."""
  seed %= 2**64
  return np.array([seed // 2**32, seed % 2**32], np.uint32)


def initial_key(seed):
  return jax.random.wrap_key_data(key_words(seed), impl="threefry2x32")


def draw(key, num_tasks=NUM_TASKS):
  key, draw_key = jax.random.split(key)
  return key, np.asarray(jax.random.normal(draw_key, (num_tasks,)))


def reference_weights(losses, seed):
  """One fresh draw per accepted step; a rejected step draws nothing."""
  key = initial_key(seed)
  weights = np.full(NUM_TASKS, 1.0 / NUM_TASKS)
  out = []
  for step_losses in losses:
    if is_accepted(step_losses):
      key, z = draw(key)
      weights = softmax(z)
    out.append(weights)
  return np.array(out)


@pytest.mark.parametrize("seed", [0, 7, 2**40, -3, 2**64 - 1, np.int64(5),
                                  np.uint64(2**63)])
def test_golden_values_optax_face(seed):
  strategy = optax_mtl.rlw(NUM_TASKS, seed=seed)
  state = strategy.init(None)
  assert harness.shapes_and_dtypes(state).key == ((2,), jnp.uint32)
  np.testing.assert_array_equal(state.key, key_words(int(seed)))

  def check_key(step, previous_state, state):
    # The key advances exactly on the accepted steps.
    assert (np.array_equal(state.key, previous_state.key)
            != is_accepted(LOSSES[step]))

  state = harness.check_optax_face(strategy, LOSSES, GRADS,
                                   reference_weights(LOSSES, int(seed)),
                                   check_step=check_key)
  assert int(state.num_skipped) == NUM_REJECTED


def test_seeds_use_all_64_bits():
  """2**40 and 0 share their low 32 bits; their streams differ."""
  losses = np.ones((3, NUM_TASKS), np.float32)
  assert not np.allclose(scan_run(NUM_TASKS, 2**40)(losses),
                         scan_run(NUM_TASKS, 0)(losses))


def test_golden_values_value_and_grad_face():
  state = harness.check_value_and_grad_face(
      optax_mtl.rlw(NUM_TASKS, seed=3), LOSSES, GRADS[0],
      reference_weights(LOSSES, 3), accepted=is_accepted)
  assert int(state.num_skipped) == NUM_REJECTED


def test_rejected_step_does_not_consume_a_draw():
  strategy = optax_mtl.rlw(NUM_TASKS, seed=11)
  update_fn = jax.jit(strategy.update)
  grads = jnp.eye(NUM_TASKS)
  ones = jnp.ones(NUM_TASKS)
  _, clean = update_fn(grads, strategy.init(None), task_losses=ones)
  _, state = update_fn(grads, strategy.init(None),
                       task_losses=jnp.array([1.0, NAN, 1.0]))
  _, state = update_fn(grads, state, task_losses=ones)
  np.testing.assert_array_equal(state.weights, clean.weights)
  np.testing.assert_array_equal(state.key, clean.key)
  assert int(state.num_skipped) == 1


def test_accepted_steps_read_one_stream():
  """Step after step, the draws follow one chain of splits of the seed's key."""
  num_tasks, num_steps = 4, 6
  weights = scan_run(num_tasks, 9)(np.ones((num_steps, num_tasks), np.float32))
  key, expected = initial_key(9), []
  for _ in range(num_steps):
    key, z = draw(key, num_tasks)
    expected.append(softmax(z))
  np.testing.assert_allclose(weights, expected, rtol=1e-5)


@functools.lru_cache(maxsize=None)
def scan_run(num_tasks, seed):
  return harness.scan_states(optax_mtl.rlw(num_tasks, seed=seed),
                             jnp.eye(num_tasks))


def test_distribution_of_the_weights():
  num_tasks, num_steps = 4, 4000
  weights = np.asarray(
      scan_run(num_tasks, 5)(np.ones((num_steps, num_tasks), np.float32)),
      np.float64)
  assert np.all(weights > 0)
  np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-5)
  # Exchangeable tasks: every task's mean weight is 1/T (std of a mean of
  # 4000 draws is about 0.003).
  np.testing.assert_allclose(weights.mean(0), 1.0 / num_tasks, atol=0.012)
  # log w_i - log w_j = z_i - z_j ~ N(0, 2), independent across steps.
  log_ratios = np.log(weights[:, :1]) - np.log(weights[:, 1:])
  for column in log_ratios.T:
    assert scipy.stats.kstest(column / np.sqrt(2.0), "norm").pvalue > 1e-3
  np.testing.assert_allclose(log_ratios.var(0), 2.0, rtol=0.1)
  lag_correlation = np.corrcoef(log_ratios[1:, 0], log_ratios[:-1, 0])[0, 1]
  assert abs(lag_correlation) < 0.06
  # Each task holds the largest weight a quarter of the time.
  wins = np.bincount(np.argmax(weights, 1), minlength=num_tasks) / num_steps
  np.testing.assert_allclose(wins, 1.0 / num_tasks, atol=0.03)


def test_seeds_give_different_reproducible_draws():
  losses = np.ones((5, NUM_TASKS), np.float32)
  first = scan_run(NUM_TASKS, 0)(losses)
  again = scan_run(NUM_TASKS, 0)(losses)
  other = scan_run(NUM_TASKS, 1)(losses)
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)
  assert not np.allclose(first[0], first[1])


wide_positive_losses = harness.wide_positive_losses(4)


@settings(max_examples=30, deadline=None)
@given(losses=wide_positive_losses)
def test_weights_finite_and_positive(losses):
  weights = scan_run(NUM_TASKS, 0)(losses)
  harness.assert_finite_and_positive(weights)
  np.testing.assert_allclose(weights, reference_weights(losses, 0), rtol=1e-5)


def test_many_tasks():
  weights = scan_run(128, 0)(np.ones((2, 128), np.float32))
  harness.assert_finite_and_positive(weights)
  np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(seed=1.5),
     r"seed must be an integer in \[-2\*\*63, 2\*\*64\), got 1.5"),
    (dict(seed="0"), r"seed must be an integer .*got '0'"),
    (dict(seed=True), r"seed must be an integer .*got True"),
    (dict(seed=2**70), r"seed must be an integer .*got 1180591620"),
    (dict(seed=2**64), r"seed must be an integer .*got 1844674407"),
    (dict(seed=-2**63 - 1), r"seed must be an integer .*got -9223"),
])
def test_hyperparameter_errors(kwargs, message):
  harness.check_rejects(optax_mtl.rlw, kwargs, message)


def test_the_spelling_of_optax_mtl_0_1_warns_and_runs_the_same():
  """0.1 took ``seed`` by position."""
  harness.check_old_spelling(lambda: optax_mtl.rlw(NUM_TASKS, 7),
                             lambda: optax_mtl.rlw(NUM_TASKS, seed=7),
                             match="seed=7")
