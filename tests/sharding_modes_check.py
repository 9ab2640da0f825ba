"""Every engine mode under the README's multi-device recipe (8 CPU devices).

Run as a script by ``tests/test_sharding_modes.py``: the device count must be
set before JAX starts. For each mode (Jacobian, low memory, representation,
shared parameters) and a loss-only strategy, two Gramian strategies and a
periodic one, one step under ``jax.jit`` with the batch sharded over an
explicit ``"data"`` axis of ``jax.make_mesh`` must give the same losses,
gradients and weights as the same step on unsharded data; then the same
under ``jax.shard_map`` with ``axis_name="data"`` (``check_vma`` on and
off). Prints ``OK <cases>`` or raises.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import optax_mtl

NUM_TASKS = 3


def encoder(params, inputs):
  return jnp.tanh(inputs @ params["trunk"])


def heads(params, representation, inputs):
  del inputs
  predictions = representation @ params["heads"].T
  return jnp.mean((predictions - jnp.arange(float(NUM_TASKS))) ** 2,
                  axis=0)


def loss_fn(params, inputs):
  return heads(params, encoder(params, inputs), inputs)


def main():
  assert jax.device_count() == 8, jax.device_count()
  mesh = jax.make_mesh((8,), ("data",))
  keys = jax.random.split(jax.random.key(0), 3)
  params = {"trunk": jax.random.normal(keys[0], (4, 6)) * 0.5,
            "heads": jax.random.normal(keys[1], (NUM_TASKS, 6))}
  inputs = jax.random.normal(keys[2], (32, 4))
  sharded = jax.device_put(inputs, NamedSharding(mesh, PartitionSpec("data")))
  shared = {"trunk": True, "heads": False}
  modes = {
      "jacobian": (loss_fn, {}),
      "low_memory": (loss_fn, {"gramian_mode": "low_memory"}),
      "representation": (heads, {"encoder_fn": encoder}),
      "shared": (loss_fn, {"shared": shared}),
  }
  strategies = {
      "loss_ema": optax_mtl.loss_ema(NUM_TASKS),
      "mgda": optax_mtl.mgda(NUM_TASKS),
      "upgrad": optax_mtl.upgrad(NUM_TASKS),
      "recompute_every": optax_mtl.recompute_every(
          optax_mtl.imtl_g(NUM_TASKS), 2),
  }
  checked = 0
  for strategy_name, strategy in strategies.items():
    for mode_name, (function, kwargs) in modes.items():
      step = jax.jit(optax_mtl.value_and_grad(function, strategy, **kwargs))
      state = strategy.init(params)
      expected = step(params, state, inputs)
      with jax.set_mesh(mesh):
        got = step(params, state, sharded)
      # Losses, gradients, the weights and the rejected-step count (solver
      # iteration counts may differ by one with the summation order).
      (want_losses, want_grads), want_state = expected
      (have_losses, have_grads), have_state = got
      # A recompute_every state holds the strategy's in inner_state.
      want_state = getattr(want_state, "inner_state", want_state)
      have_state = getattr(have_state, "inner_state", have_state)
      for want, have in zip(
          jax.tree.leaves((want_losses, want_grads, want_state.weights)),
          jax.tree.leaves((have_losses, have_grads, have_state.weights))):
        np.testing.assert_allclose(np.asarray(have), np.asarray(want),
                                   rtol=2e-4, atol=1e-5,
                                   err_msg=f"{strategy_name} {mode_name}")
      assert int(have_state.num_skipped) == int(want_state.num_skipped) == 0
      checked += 1
  assert checked == len(strategies) * len(modes)

  # shard_map: the engine averages over the named axis (check_vma both ways).
  replicated = PartitionSpec()
  for strategy_name in ("loss_ema", "mgda"):
    strategy = strategies[strategy_name]
    for mode_name, (function, kwargs) in modes.items():
      expected = jax.jit(optax_mtl.value_and_grad(function, strategy,
                                                  **kwargs))(
          params, strategy.init(params), inputs)
      for check_vma in (True, False):
        step = optax_mtl.value_and_grad(function, strategy, axis_name="data",
                                        **kwargs)

        def per_device(*args, step=step):
          # A leading device axis: every device returns its own copy.
          return jax.tree.map(lambda leaf: leaf[None], step(*args))

        sharded_step = jax.jit(jax.shard_map(
            per_device, mesh=mesh,
            in_specs=(replicated, replicated, PartitionSpec("data")),
            out_specs=PartitionSpec("data"), check_vma=check_vma))
        on_devices = jax.device_put(
            (params, strategy.init(params)), NamedSharding(mesh, replicated))
        copies = jax.tree.map(np.asarray, sharded_step(*on_devices, sharded))
        (want_losses, want_grads), want_state = expected
        for device in range(8):  # Every device holds the same result.
          (have_losses, have_grads), have_state = jax.tree.map(
              lambda leaf, device=device: leaf[device], copies)
          for want, have in zip(
              jax.tree.leaves((want_losses, want_grads, want_state.weights)),
              jax.tree.leaves((have_losses, have_grads, have_state.weights))):
            np.testing.assert_allclose(
                np.asarray(have), np.asarray(want), rtol=2e-4, atol=1e-5,
                err_msg=f"shard_map {strategy_name} {mode_name} {check_vma}")
        checked += 1
  print("OK", checked)


if __name__ == "__main__":
  main()
