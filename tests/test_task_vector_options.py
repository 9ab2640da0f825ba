"""Options taking "a number or T numbers": one check, schedulable, strict."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_mtl
from optax_mtl._src import base

GRADS, LOSSES = jnp.eye(3), jnp.array([0.9, 2.5, 0.3])

# (factory, option, value, static args besides num_tasks)
OPTIONS = [
    ("graddrop", "leak", 0.3, ("seed",)),
    ("constant", "weights", [0.5, 1.0, 1.5], ()),
    ("config", "preference", [1.0, 2.0, 1.0], ()),
    ("stch", "preference", [1.0, 2.0, 1.0], ("warmup_epochs",)),
    ("famo", "min_losses", [0.0, 0.1, 0.0], ()),
    ("imtl_l", "initial_scales", [0.0, 0.5, -0.5], ()),
]


@pytest.mark.parametrize("name, option, value, static", OPTIONS)
def test_array_options_can_be_scheduled_by_inject_hyperparams(
    name, option, value, static):
  """Under jit, injected values give the update of the plain factory."""
  factory = getattr(optax_mtl, name)
  injected = optax.inject_hyperparams(
      factory, static_args=("num_tasks",) + static)(
          num_tasks=3, **{option: jnp.asarray(value, jnp.float32)})
  update, _ = jax.jit(lambda g, s: injected.update(
      g, s, jnp.zeros(3), task_losses=LOSSES))(GRADS,
                                              injected.init(jnp.zeros(3)))
  plain = factory(3, **{option: value})
  expected, _ = plain.update(GRADS, plain.init(jnp.zeros(3)), jnp.zeros(3),
                             task_losses=LOSSES)
  np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name, option, value, static", OPTIONS)
def test_numeric_strings_are_rejected_naming_the_option(
    name, option, value, static):
  del static
  as_strings = ([str(v) for v in value] if isinstance(value, list)
                else str(value))
  with pytest.raises(ValueError, match=rf"^{option} must be "):
    getattr(optax_mtl, name)(3, **{option: as_strings})


@pytest.mark.parametrize("value", ["abc", b"1", True, None, [1.0, "2", 3.0],
                                   [1.0, 2.0], [[1.0, 2.0, 3.0]],
                                   [1.0, np.nan, 1.0], [1e39, 1.0, 1.0],
                                   [0.5, 1.5, 0.5]])
def test_check_task_vector_rejects_with_the_name(value):
  with pytest.raises(ValueError, match=r"^leak must be"):
    base.check_task_vector("leak", value, 3, 0.0, 1.0)


def test_check_task_vector_broadcasts_and_returns_float32():
  np.testing.assert_array_equal(
      base.check_task_vector("leak", np.float64(0.5), 2, 0.0, 1.0),
      np.array([0.5, 0.5], np.float32))
  values = base.check_task_vector("weights", jnp.array([1, 2]), 2,
                                  allow_scalar=False)
  assert values.dtype == np.float32 and values.tolist() == [1.0, 2.0]
  with pytest.raises(ValueError, match=r"weights must be 2 numbers, got shape"):
    base.check_task_vector("weights", 1.0, 2, allow_scalar=False)
  traced = jax.jit(lambda v: base.check_task_vector("leak", v, 3, 0.0, 1.0))(
      jnp.float32(0.25))
  np.testing.assert_array_equal(traced, [0.25, 0.25, 0.25])
