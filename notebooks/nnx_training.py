"""Training a multi-task Flax NNX model with optax_mtl, through both faces.

The model has a shared trunk and one head per task. Three regression tasks
share a latent representation but have targets of very different scales, so
the plain sum of the losses is dominated by the largest task.

* The **optax face**: the strategy is the first link of an optax chain held by
  an ``nnx.Optimizer``. It receives per-task gradients with a leading task
  axis (from ``jax.jacrev`` of the per-task losses) and the losses as the
  keyword argument ``task_losses``.
* The **training-step face**: ``optax_mtl.value_and_grad`` turns the per-task
  loss function of the split model (``nnx.split`` / ``nnx.merge``) into a step
  that computes only what the strategy needs (one backward pass for
  strategies that read only the losses) and returns the combined gradient for
  any optimizer.

Run it::

  python notebooks/nnx_training.py --strategy ema --steps 200
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_mtl

NUM_TASKS = 3
NUM_FEATURES = 8
HIDDEN = 32
TARGET_SCALES = (1.0, 10.0, 0.1)  # Task 1 dominates the plain sum.


class MultiTaskModel(nnx.Module):
  """A shared two-layer trunk and one linear head per task."""

  def __init__(self, num_tasks: int, *, rngs: nnx.Rngs):
    self.trunk = nnx.Sequential(
        nnx.Linear(NUM_FEATURES, HIDDEN, rngs=rngs), nnx.tanh,
        nnx.Linear(HIDDEN, HIDDEN, rngs=rngs), nnx.tanh)
    self.heads = nnx.List(
        [nnx.Linear(HIDDEN, 1, rngs=rngs) for _ in range(num_tasks)])

  def __call__(self, inputs):  # [batch, features] -> [batch, num_tasks]
    shared = self.trunk(inputs)
    return jnp.concatenate([head(shared) for head in self.heads], axis=-1)


def make_data(seed: int = 0, num_examples: int = 256, dtype=jnp.float32):
  """Inputs and targets of three related regression tasks."""
  keys = jax.random.split(jax.random.key(seed), 4)
  inputs = jax.random.normal(keys[0], (num_examples, NUM_FEATURES))
  latent = jnp.tanh(inputs @ jax.random.normal(keys[1], (NUM_FEATURES, 4)))
  readout = jax.random.normal(keys[2], (4, NUM_TASKS))
  noise = 0.05 * jax.random.normal(keys[3], (num_examples, NUM_TASKS))
  targets = (latent @ readout + noise) * jnp.asarray(TARGET_SCALES)
  return inputs.astype(dtype), targets.astype(dtype)


def task_losses(model: MultiTaskModel, inputs, targets):
  """The mean squared error of each task: shape [num_tasks]."""
  return jnp.mean((model(inputs) - targets) ** 2, axis=0)


# --------------------------------------------------------------------------
# The optax face: nnx.Optimizer(model, optax.chain(strategy, adam)).
# --------------------------------------------------------------------------


@nnx.jit
def optax_face_step(model, optimizer, inputs, targets):
  """One step: per-task gradients [T, ...] in, one combined update applied."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def losses_of(params):
    losses = task_losses(nnx.merge(graphdef, params, rest), inputs, targets)
    return losses, losses

  # jacrev gives every gradient leaf a leading task axis of size T.
  task_grads, losses = jax.jacrev(losses_of, has_aux=True)(params)
  optimizer.update(model, task_grads, task_losses=losses)
  return losses, optax_mtl.diagnostics(optimizer.opt_state)


def train_optax_face(strategy, num_steps: int = 200,
                     learning_rate: float = 1e-2, seed: int = 0):
  """Trains through the optax face; returns the losses and the diagnostics."""
  inputs, targets = make_data(seed)
  model = MultiTaskModel(NUM_TASKS, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(
      model, optax.chain(strategy, optax.adam(learning_rate)), wrt=nnx.Param)
  history = [optax_face_step(model, optimizer, inputs, targets)
             for _ in range(num_steps)]
  return _stack(history), model


# --------------------------------------------------------------------------
# The training-step face: optax_mtl.value_and_grad on the split model.
# --------------------------------------------------------------------------


def make_training_step(strategy):
  """A jitted step that computes only what ``strategy`` needs."""

  @nnx.jit
  def training_step(model, optimizer, strategy_state, inputs, targets):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, inputs, targets):
      return task_losses(nnx.merge(graphdef, params, rest), inputs, targets)

    step = optax_mtl.value_and_grad(loss_fn, strategy)
    (losses, grads), strategy_state = step(params, strategy_state, inputs,
                                           targets)
    optimizer.update(model, grads)  # A plain optax optimizer.
    return losses, strategy_state, optax_mtl.diagnostics(strategy_state)

  return training_step


def train_step_face(strategy, num_steps: int = 200,
                    learning_rate: float = 1e-2, seed: int = 0):
  """Trains through the training-step face; same problem, same model."""
  inputs, targets = make_data(seed)
  model = MultiTaskModel(NUM_TASKS, rngs=nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
  strategy_state = strategy.init(nnx.state(model, nnx.Param))
  training_step = make_training_step(strategy)
  history = []
  for _ in range(num_steps):
    losses, strategy_state, logs = training_step(
        model, optimizer, strategy_state, inputs, targets)
    history.append((losses, logs))
  return _stack(history), model


def _stack(history):
  """[(losses, logs)] -> {"losses": [steps, T], key: [steps]}."""
  stacked = {"losses": np.stack([np.asarray(losses) for losses, _ in history])}
  for key in history[0][1]:
    stacked[key] = np.stack([np.asarray(logs[key]) for _, logs in history])
  return stacked


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--strategy", default="ema",
                      help="any optax_mtl strategy taking num_tasks")
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args()
  factory = getattr(optax_mtl, args.strategy)
  for face, train in (("optax face", train_optax_face),
                      ("training-step face", train_step_face)):
    history, _ = train(factory(num_tasks=NUM_TASKS), args.steps)
    losses = history["losses"]
    weights = [history[f"mtl/weights/{k}"][-1] for k in range(NUM_TASKS)]
    print(f"{args.strategy}, {face}:")
    print(f"  task losses  first {np.round(losses[0], 4)}  "
          f"last {np.round(losses[-1], 4)}")
    print(f"  weights last {np.round(weights, 4)}")


if __name__ == "__main__":
  main()
