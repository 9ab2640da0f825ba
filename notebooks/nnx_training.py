"""Training a multi-task Flax NNX model with optax_mtl.nnx, through both faces.

The model has a shared trunk (with BatchNorm and Dropout) and one head per
task. Three regression tasks share a latent representation but have targets
of very different scales, so the plain sum of the losses is dominated by the
largest task.

* The **training-step face**: ``mtl_nnx.value_and_grad(task_losses, strategy,
  shared=nnx.PathContains("trunk"))`` makes ``step(model, strategy_state,
  inputs, targets)``. It computes only what the strategy needs (one backward
  pass for a loss-weighting strategy), gives each head its own gradient under
  a gradient-balancing strategy, updates the BatchNorm statistics and the
  Dropout RNG state of the model as ``nnx.value_and_grad`` would, and returns
  the gradient as an ``nnx.State`` for any ``nnx.Optimizer``.
* The same face with ``encoder_fn=``: a gradient-balancing strategy reads the
  gradients with respect to the trunk's output instead of every parameter,
  about the cost of one backward pass (``--features``).
* The **optax face**: the strategy is the first link of the optax chain held
  by an ``nnx.Optimizer``; ``mtl_nnx.value_and_jacobian`` gives it the
  per-task gradients and ``mtl_nnx.shared_mask`` declares the trunk shared.
* An Orbax checkpoint of the model, the optimizer and the strategy state, and
  the evaluation of the model with BatchNorm's running statistics and without
  Dropout.

Run it::

  python notebooks/nnx_training.py --strategy upgrad --steps 200 --features
"""

from __future__ import annotations

import argparse

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

import optax_mtl
from optax_mtl import nnx as mtl_nnx

NUM_TASKS = 3
NUM_FEATURES = 8
HIDDEN = 32
TARGET_SCALES = (1.0, 10.0, 0.1)  # Task 1 dominates the plain sum.
TRUNK = nnx.PathContains("trunk")  # The parameters all tasks share.


class MultiTaskModel(nnx.Module):
  """A shared trunk (BatchNorm, Dropout) and one linear head per task."""

  def __init__(self, num_tasks: int, *, rngs: nnx.Rngs):
    self.trunk = nnx.Sequential(
        nnx.Linear(NUM_FEATURES, HIDDEN, rngs=rngs),
        nnx.BatchNorm(HIDDEN, rngs=rngs), nnx.tanh,
        nnx.Dropout(0.1, rngs=rngs),
        nnx.Linear(HIDDEN, HIDDEN, rngs=rngs), nnx.tanh)
    self.heads = nnx.List(
        [nnx.Linear(HIDDEN, 1, rngs=rngs) for _ in range(num_tasks)])

  def __call__(self, inputs):  # [batch, features] -> [batch, num_tasks]
    return self.predict(self.trunk(inputs))

  def predict(self, features):
    return jnp.concatenate([head(features) for head in self.heads], axis=-1)


def make_model(seed: int = 0) -> MultiTaskModel:
  return MultiTaskModel(NUM_TASKS, rngs=nnx.Rngs(seed, dropout=seed + 1))


def make_data(seed: int = 0, num_examples: int = 256, dtype=jnp.float32,
              held_out: bool = False):
  """Inputs and targets of three related regression tasks.

  ``seed`` picks the tasks; ``held_out`` draws other examples of them.
  """
  keys = jax.random.split(jax.random.key(seed), 6)
  input_key, noise_key = (keys[4], keys[5]) if held_out else (keys[0], keys[3])
  inputs = jax.random.normal(input_key, (num_examples, NUM_FEATURES))
  latent = jnp.tanh(inputs @ jax.random.normal(keys[1], (NUM_FEATURES, 4)))
  readout = jax.random.normal(keys[2], (4, NUM_TASKS))
  noise = 0.05 * jax.random.normal(noise_key, (num_examples, NUM_TASKS))
  targets = (latent @ readout + noise) * jnp.asarray(TARGET_SCALES)
  return inputs.astype(dtype), targets.astype(dtype)


def task_losses(model: MultiTaskModel, inputs, targets):
  """The mean squared error of each task: shape [num_tasks]."""
  return jnp.mean((model(inputs) - targets) ** 2, axis=0)


# With encoder_fn, the loss is computed from the trunk's output.
def trunk_features(model: MultiTaskModel, inputs, targets):
  del targets
  return model.trunk(inputs)


def heads_losses(model: MultiTaskModel, features, inputs, targets):
  del inputs
  return jnp.mean((model.predict(features) - targets) ** 2, axis=0)


# --------------------------------------------------------------------------
# The training-step face: mtl_nnx.value_and_grad.
# --------------------------------------------------------------------------


def make_training_step(strategy, use_features: bool = False):
  """A jitted step that computes only what ``strategy`` needs."""
  if use_features:
    step = mtl_nnx.value_and_grad(heads_losses, strategy, shared=TRUNK,
                                  encoder_fn=trunk_features)
  else:
    step = mtl_nnx.value_and_grad(task_losses, strategy, shared=TRUNK)

  @nnx.jit
  def training_step(model, optimizer, strategy_state, inputs, targets):
    (losses, grads), strategy_state = step(model, strategy_state, inputs,
                                           targets)
    optimizer.update(model, grads)  # A plain optax optimizer.
    return losses, strategy_state, optax_mtl.diagnostics(strategy_state)

  return training_step


def train_step_face(strategy, num_steps: int = 200,
                    learning_rate: float = 1e-2, seed: int = 0,
                    use_features: bool = False):
  """Trains through the training-step face; returns the history and model."""
  inputs, targets = make_data(seed)
  model = make_model(seed)
  optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
  strategy_state = strategy.init(nnx.state(model, nnx.Param))
  training_step = make_training_step(strategy, use_features)
  history = []
  for _ in range(num_steps):
    losses, strategy_state, logs = training_step(
        model, optimizer, strategy_state, inputs, targets)
    history.append((losses, logs))
  return _stack(history), model


# --------------------------------------------------------------------------
# The optax face: nnx.Optimizer(model, optax.chain(strategy, adam)).
# --------------------------------------------------------------------------

value_and_jacobian = mtl_nnx.value_and_jacobian(task_losses)


@nnx.jit
def optax_face_step(model, optimizer, inputs, targets):
  """One step: per-task gradients [T, ...] in, one combined update applied."""
  losses, task_grads = value_and_jacobian(model, inputs, targets)
  optimizer.update(model, task_grads, task_losses=losses)
  return losses, optax_mtl.diagnostics(optimizer.opt_state)


def train_optax_face(strategy, num_steps: int = 200,
                     learning_rate: float = 1e-2, seed: int = 0):
  """Trains through the optax face; same problem, same model."""
  inputs, targets = make_data(seed)
  model = make_model(seed)
  strategy = optax_mtl.with_shared_parameters(
      strategy, mtl_nnx.shared_mask(model, TRUNK))
  optimizer = nnx.Optimizer(
      model, optax.chain(strategy, optax.adam(learning_rate)), wrt=nnx.Param)
  history = [optax_face_step(model, optimizer, inputs, targets)
             for _ in range(num_steps)]
  return _stack(history), model


# --------------------------------------------------------------------------
# Checkpoints and evaluation.
# --------------------------------------------------------------------------


def save_checkpoint(path, model, optimizer, strategy_state=None):
  """Saves the model (with its BatchNorm and RNG state) and both states."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {"model": nnx.state(model),
                           "optimizer": nnx.state(optimizer),
                           "strategy": strategy_state})
  checkpointer.wait_until_finished()


def restore_checkpoint(path, model, optimizer, strategy_state=None):
  """Restores into a freshly built model and optimizer; returns the strategy
  state (pass ``strategy.init(...)`` as the template)."""
  target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer),
            "strategy": strategy_state}
  restored = ocp.StandardCheckpointer().restore(
      path, jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
  nnx.update(model, restored["model"])
  nnx.update(optimizer, restored["optimizer"])
  return restored["strategy"]


def evaluate(model, inputs, targets):
  """Task losses with BatchNorm's running statistics and without Dropout."""
  eval_model = nnx.view(model, deterministic=True, use_running_average=True)
  return task_losses(eval_model, inputs, targets)


def _stack(history):
  """[(losses, logs)] -> {"losses": [steps, T], key: [steps]}."""
  stacked = {"losses": np.stack([np.asarray(losses) for losses, _ in history])}
  for key in history[0][1]:
    stacked[key] = np.stack([np.asarray(logs[key]) for _, logs in history])
  return stacked


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--strategy", default="loss_ema",
                      help="any optax_mtl strategy taking num_tasks")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--features", action="store_true",
                      help="the training-step face balances on the trunk's "
                      "output (encoder_fn)")
  args = parser.parse_args()
  factory = getattr(optax_mtl, args.strategy)
  step_face = "training-step face" + (" (encoder_fn)" if args.features
                                      else "")
  runs = (("optax face", train_optax_face),
          (step_face, lambda strategy, steps: train_step_face(
              strategy, steps, use_features=args.features)))
  inputs, targets = make_data(held_out=True)
  for face, train in runs:
    history, model = train(factory(num_tasks=NUM_TASKS), args.steps)
    losses = history["losses"]
    weights = [history[f"mtl/weights/{k}"][-1] for k in range(NUM_TASKS)]
    print(f"{args.strategy}, {face}:")
    print(f"  task losses  first {np.round(losses[0], 4)}  "
          f"last {np.round(losses[-1], 4)}")
    print(f"  held-out     {np.round(evaluate(model, inputs, targets), 4)}")
    print(f"  weights last {np.round(weights, 4)}")


if __name__ == "__main__":
  main()
