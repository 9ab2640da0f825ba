"""Data-parallel training of every strategy on 8 simulated CPU devices.

Run by tests/test_sharding.py in its own process, with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before JAX starts::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python tests/sharding_check.py results.json [--check-vma] [NAME ...]

For every strategy, a few training steps (``optax_mtl.value_and_grad`` +
adam, under one ``lax.scan``) are run three ways:

1. the reference: ``jax.jit`` on one device, the whole batch there;
2. ``jax.jit`` with the batch sharded over a mesh axis ``"data"`` of 8
   devices (params and states replicated), the same code as 1;
3. ``jax.shard_map`` over the same mesh, each device seeing its slice of the
   batch, with ``value_and_grad(..., axis_name="data")``; every device returns
   its own copy of the params and the strategy state.

2 and 3 run in one compiled function. ``shard_map`` runs with
``check_vma=False`` unless ``--check-vma`` is given (see test_sharding.py).
The results (one list of failures per
strategy, empty when all is well) are written as JSON to the path given.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import optax_mtl  # pylint: disable=g-import-not-at-top
from tests import strategies  # pylint: disable=g-import-not-at-top

NUM_DEVICES = 8
NUM_TASKS = strategies.NUM_TASKS
NUM_STEPS = 3
BATCH = 16  # 2 examples per device.
RTOL, ATOL = 2e-4, 1e-6


def init_params():
  keys = jax.random.split(jax.random.key(1), 2)
  return {"trunk": 0.5 * jax.random.normal(keys[0], (4, 6)),
          "heads": 0.5 * jax.random.normal(keys[1], (6, NUM_TASKS))}


def task_losses_fn(params, inputs, targets):
  """Per-task mean squared error over the (local) batch: shape [T]."""
  predictions = jnp.tanh(inputs @ params["trunk"]) @ params["heads"]
  return jnp.mean((predictions - targets) ** 2, axis=0) + 0.01


def make_data():
  inputs = jax.random.normal(jax.random.key(0), (NUM_STEPS, BATCH, 4))
  mixing = jnp.arange(1.0, 1.0 + 4 * NUM_TASKS).reshape(4, NUM_TASKS) / 4
  targets = jnp.sin(inputs @ mixing) * jnp.array([1.0, 5.0, 0.2])[:NUM_TASKS]
  return inputs, targets


def make_train(strategy, optimizer, axis_name=None):
  """``train(params, opt_state, strategy_state, inputs, targets)``."""
  step = optax_mtl.value_and_grad(task_losses_fn, strategy,
                                  axis_name=axis_name)

  def train(params, opt_state, strategy_state, inputs, targets):

    def body(carry, batch):
      params, opt_state, strategy_state = carry
      (losses, grads), strategy_state = step(params, strategy_state, *batch)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      # The gradients are compared too: adam would hide a wrong scale.
      return (params, opt_state, strategy_state), (
          losses, strategy_state.weights, grads)

    (params, _, strategy_state), (losses, weights, grads) = jax.lax.scan(
        body, (params, opt_state, strategy_state), (inputs, targets))
    return {"params": params, "strategy_state": strategy_state,
            "losses": losses, "weights": weights, "grads": grads}

  return train


# A solver's iteration count, final gap and flag depend on rounding (summing
# over devices reorders the sums); the weights it returns are compared.
SOLVER_REPORTS = ("solver_iterations", "solver_gap", "solver_converged")


def compare(label, got, expected, failures):
  for (path, leaf), want in zip(jax.tree_util.tree_leaves_with_path(got),
                                jax.tree.leaves(expected)):
    leaf, want = np.asarray(leaf), np.asarray(want)
    where = f"{label}{jax.tree_util.keystr(path)}"
    if any(name in where for name in SOLVER_REPORTS):
      continue
    if leaf.shape != want.shape or leaf.dtype != want.dtype:
      failures.append(f"{where}: {leaf.shape} {leaf.dtype} != "
                      f"{want.shape} {want.dtype}")
    elif not np.allclose(
        leaf.astype(np.float64), want.astype(np.float64), rtol=RTOL,
        # Solvers that stop on a tolerance turn reordered sums into small
        # absolute differences: measured against the array's own scale.
        atol=ATOL + RTOL * float(np.max(np.abs(want), initial=0.0))):
      diff = np.max(np.abs(leaf.astype(np.float64) - want.astype(np.float64)))
      failures.append(f"{where}: max abs difference {diff:.3g}")


def check_strategy(strategy, mesh, data, check_vma):
  optimizer = optax.adam(1e-2)
  params = init_params()
  init = (params, optimizer.init(params), strategy.init(params))
  failures = []

  reference = jax.jit(make_train(strategy, optimizer))(*init, *data)

  replicated = NamedSharding(mesh, P())
  batch_sharded = NamedSharding(mesh, P(None, "data"))
  train = make_train(strategy, optimizer)
  per_device_train = make_train(strategy, optimizer, axis_name="data")

  def per_device(*args):
    out = per_device_train(*args)
    # A leading device axis: every device returns its own copy.
    return jax.tree.map(lambda leaf: leaf[None], out)

  sharded_map = jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(), P(), P(), P(None, "data"), P(None, "data")),
      out_specs=P("data"), check_vma=check_vma)

  @jax.jit
  def data_parallel(*args):
    return train(*args), sharded_map(*args)

  args = (jax.device_put(init, replicated),
          *jax.device_put(data, batch_sharded))
  under_jit, under_shard_map = data_parallel(*args[0], *args[1:])

  compare("jit", under_jit, reference, failures)
  for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(
      under_jit["strategy_state"]):
    shards = [np.asarray(shard.data) for shard in leaf.addressable_shards]
    if len(shards) != NUM_DEVICES or any(
        shard.shape != leaf.shape or not np.array_equal(shard, shards[0])
        for shard in shards):
      failures.append(f"jit state{jax.tree_util.keystr(leaf_path)}: the "
                      "devices do not all hold the whole, same value")

  for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(
      under_shard_map["strategy_state"]):
    copies = np.asarray(leaf)
    if copies.shape[0] != NUM_DEVICES or not all(
        np.array_equal(copy, copies[0]) for copy in copies):
      failures.append(f"shard_map state{jax.tree_util.keystr(leaf_path)}: "
                      "the devices hold different values")
  first_device = jax.tree.map(lambda leaf: np.asarray(leaf)[0], under_shard_map)
  compare("shard_map", first_device, reference, failures)

  if not np.all(np.isfinite(np.asarray(reference["losses"]))):
    failures.append("reference: non-finite losses")
  return failures


def main(output_path, check_vma=False, names=None):
  """Checks every strategy (or those in ``names``); writes the failures.

  Args:
    output_path: where the JSON ``{name: [failure, ...]}`` goes.
    check_vma: ``jax.shard_map``'s type check of device-varying values.
    names: only these strategies (default: every one).
  """
  if jax.device_count() != NUM_DEVICES:
    raise SystemExit(
        f"expected {NUM_DEVICES} devices, got {jax.device_count()}: set "
        "XLA_FLAGS=--xla_force_host_platform_device_count=8")
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
  data = make_data()
  results = {}
  for name in strategies.NAMES:
    if names and name not in names:
      continue
    try:
      results[name] = check_strategy(strategies.build(name), mesh, data,
                                     check_vma)
    except Exception as error:  # pylint: disable=broad-except
      results[name] = [f"raised {type(error).__name__}: {error}"[:2000]]
  pathlib.Path(output_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  # sharding_check.py OUTPUT [--check-vma] [NAME ...]
  arguments = sys.argv[2:]
  vma = "--check-vma" in arguments
  main(sys.argv[1], check_vma=vma,
       names=[name for name in arguments if name != "--check-vma"])
