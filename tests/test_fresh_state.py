"""A fresh state of the loss strategies.

What is guaranteed: uncertainty's inner optimizer state is optax's own Adam
state, and no fresh state shares one buffer between two fields, so the very
first state can be donated to a jitted update.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import optax_mtl
from tests import strategies

NUM_TASKS = 3


def test_uncertainty_state_is_optax_adam_state():
  state = optax_mtl.uncertainty(NUM_TASKS).init(None)
  assert isinstance(state.optimizer_state, optax.ScaleByAdamState)


@pytest.mark.parametrize("name", [
    "uncertainty", "rlw", "loss_ema", "rema", "dwema", "dwa", "lbtw",
    "initial_loss", "log_loss", "geometric_mean", "gradnorm", "equal"])
def test_a_fresh_state_can_be_donated(name):
  strategy = strategies.build(name)
  grads = jnp.eye(NUM_TASKS)

  def step(state, losses):
    return strategy.update(grads, state, task_losses=losses)[1]

  donating = jax.jit(step, donate_argnums=0)
  state = donating(strategy.init(None), jnp.ones(NUM_TASKS))
  state = donating(state, jnp.ones(NUM_TASKS))
  assert int(state.num_skipped) == 0
