"""Tests of optax_mtl.rlw (Lin et al., TMLR 2022): w = softmax(z), z ~ N(0, I).

The documented stream: the key of the seed (Threefry, the seed's 64 bits as
two words), one split per accepted step, T standard normals from the second
half. The references are the draws of that stream stored below as numbers
(they detect a change of the stream, of JAX's PRNG included) with the
softmax applied here in NumPy; the distribution tests check the law of the
weights.
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


# The first six draws z (f32[3]) of the stream of each seed, in order, as
# jax.random.normal(split(key)[1], (3,)) gave them (printed with 9
# significant digits: exact in float32).
DRAWS = {
    0: [
        [-2.44245577, -2.03568053, 0.205544233],
        [-1.25747764, -0.401604414, -1.12136006],
        [-1.38776815, 0.774854362, 1.54049325],
        [-2.30226636, 0.0527779758, 1.68457139],
        [-1.0147804, 1.58730054, -0.0151891923],
        [-0.198178887, 0.795590281, -1.22228813],
    ],
    3: [
        [-1.94322157, 0.104816101, -0.0475895666],
        [-0.301884085, -0.00714819878, -1.1109128],
        [0.908066213, -0.287782639, 0.588171542],
        [-1.01810324, 0.926944613, 1.40677035],
        [1.82138467, 0.101482183, 0.235572681],
        [-0.942700982, 1.32254958, 0.600125611],
    ],
    5: [
        [-1.37987006, -0.741440237, -1.21413994],
        [-1.3889432, 0.205099285, 1.12626791],
        [0.689366102, -1.44804585, 0.370458186],
        [0.329892457, -1.39442849, 1.02189136],
        [-1.86706436, -0.0471964814, -0.0933690593],
        [-0.8084867, 1.32712758, 0.500956059],
    ],
    7: [
        [0.454133511, 0.939162791, -0.268943131],
        [2.24339223, -2.05923295, -1.69406974],
        [1.00643504, -0.366826773, -1.00690949],
        [0.522120774, -1.85568082, -0.436746299],
        [-1.93555617, 0.515648782, 0.163307711],
        [1.20637059, -1.53521562, 0.777778506],
    ],
    -3: [
        [1.31908023, -0.756209195, -1.28309882],
        [-0.389048308, 0.396861166, 1.2007823],
        [0.658074319, -0.534404814, 1.62159526],
        [0.305615216, 0.872309268, 1.07374811],
        [-0.500034988, 0.162841693, 0.0482897386],
        [0.208922073, -0.51506269, 0.0809089094],
    ],
    2**40: [
        [1.98439503, -0.488221884, -0.558916271],
        [0.24449864, -0.0574209616, -0.42790699],
        [-0.601652801, 0.213048369, 1.46367657],
        [-0.286191821, -0.573497951, -1.31529498],
        [0.503355265, 0.20523724, 0.307753086],
        [0.441023737, -1.89309204, -0.64438653],
    ],
    2**63: [
        [-0.694723785, 0.732763588, -0.703191698],
        [0.342095226, -0.611427665, -1.20171285],
        [-0.898534954, 0.382576346, 1.20245469],
        [0.863872647, -0.10877955, 1.74138892],
        [2.9296577, 0.956896126, -0.562775612],
        [0.465252727, 0.523427665, -0.347081989],
    ],
    2**64 - 1: [
        [-0.620679379, 1.6978054, -0.680069864],
        [-0.510665476, -0.594175279, 0.109583795],
        [0.270201325, 0.0488557629, -1.21965051],
        [-0.13360405, -0.435368717, -0.516829491],
        [0.40765965, 2.37191153, 1.42126572],
        [0.19194755, 0.0238718502, 0.739965022],
    ],
}
# The first six draws of seed 9 with four tasks.
DRAWS_SEED_9_FOUR_TASKS = [
    [-1.09598315, -0.72797662, 0.2524257, -0.926556528],
    [1.5445416, 1.07087171, 0.893871188, 0.77034086],
    [0.214403018, 1.10879314, -0.983975172, 0.761420727],
    [-0.419366568, 1.39959276, -0.959693909, 1.54754472],
    [-0.582102656, 0.128460974, -1.37116313, -0.242845207],
    [-1.18499458, 0.916268349, 1.09724331, -1.67242754],
]


def reference_weights(losses, seed):
  """One fresh draw per accepted step; a rejected step draws nothing."""
  draws = iter(np.asarray(DRAWS[seed], np.float32))
  weights = np.full(NUM_TASKS, 1.0 / NUM_TASKS)
  out = []
  for step_losses in losses:
    if is_accepted(step_losses):
      weights = softmax(next(draws))
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
  expected = [softmax(z) for z in
              np.asarray(DRAWS_SEED_9_FOUR_TASKS, np.float32)]
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
