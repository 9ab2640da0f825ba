"""Tests of optax_mtl.rlw (Lin et al., TMLR 2022): w = softmax(z), z ~ N(0, I).

The reference draws the documented stream with its own calls to
jax.lax.rng_bit_generator (Threefry, T words per accepted step), maps the
words to normals with SciPy's normal quantile and applies the softmax in
NumPy; distribution tests check the law of the weights.
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
from optax_mtl._src.weighting import _rlw as rlw_module
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


def initial_key(seed):
  seed %= 2**64
  return jnp.array([seed % 2**32, seed // 2**32, 0, 0], jnp.uint32)


def draw_words(key, num_words):
  return jax.lax.rng_bit_generator(
      key, (num_words,), jnp.uint32,
      algorithm=jax.lax.RandomAlgorithm.RNG_THREE_FRY)


def normals(words):
  """Φ⁻¹ at the midpoint of the 2**23 bins given by each word's top 23 bits."""
  bins = np.asarray(words, np.uint64) // 2**9
  return scipy.stats.norm.ppf((bins + 0.5) / 2**23)


def reference_weights(losses, seed):
  """One fresh draw per accepted step; a rejected step draws nothing."""
  key = initial_key(seed)
  weights = np.full(NUM_TASKS, 1.0 / NUM_TASKS)
  out = []
  for step_losses in losses:
    if is_accepted(step_losses):
      key, words = draw_words(key, NUM_TASKS)
      weights = softmax(normals(words))
    out.append(weights)
  return np.array(out)


@pytest.mark.parametrize("seed", [0, 7, 2**40, -3, 2**64 - 1])
def test_golden_values_optax_face(seed):
  strategy = optax_mtl.rlw(NUM_TASKS, seed=seed)
  init_types = harness.shapes_and_dtypes(strategy.init(None))
  assert init_types.key == ((4,), jnp.uint32)
  np.testing.assert_array_equal(strategy.init(None).key, initial_key(seed))

  def check_key(step, previous_state, state):
    # The key advances exactly on the accepted steps.
    assert (np.array_equal(state.key, previous_state.key)
            != is_accepted(LOSSES[step]))

  state = harness.check_optax_face(strategy, LOSSES, GRADS,
                                   reference_weights(LOSSES, seed),
                                   check_step=check_key)
  assert int(state.num_skipped) == NUM_REJECTED


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
  """Step after step, the draws are consecutive words of one stream."""
  num_tasks, num_steps = 4, 6
  weights = scan_run(num_tasks, 9)(np.ones((num_steps, num_tasks), np.float32))
  _, words = draw_words(initial_key(9), num_steps * num_tasks)
  expected = [softmax(z) for z in normals(words).reshape(num_steps, num_tasks)]
  np.testing.assert_allclose(weights, expected, rtol=1e-5)


def test_normals_stay_finite_at_the_extreme_words():
  words = jnp.array([0, 2**9 - 1, 2**31, 2**32 - 1], jnp.uint32)
  z = np.asarray(rlw_module.standard_normal(words), np.float64)
  np.testing.assert_allclose(z, normals(words), rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(z)) and np.max(np.abs(z)) < 5.3
  assert z[0] == z[1] == -z[3]


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
    (dict(num_tasks=0), r"num_tasks must be an integer >= 1, got 0"),
    (dict(seed=1.5), r"seed must be an integer, got 1.5"),
    (dict(seed="0"), r"seed must be an integer, got '0'"),
    (dict(seed=True), r"seed must be an integer, got True"),
    (dict(seed=2**70), r"seed must fit in a 64-bit integer, got 1180591620"),
    (dict(seed=2**64), r"seed must fit in a 64-bit integer, got 1844674407"),
    (dict(seed=-2**63 - 1), r"seed must fit in a 64-bit integer, got -9223"),
])
def test_hyperparameter_errors(kwargs, message):
  harness.check_rejects(optax_mtl.rlw, kwargs, message)
