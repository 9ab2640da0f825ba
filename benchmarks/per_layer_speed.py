"""Step time and peak memory of ``gramian_mode="per_layer"`` (issue 19).

Run: ``taskset -c 1 python -m benchmarks.per_layer_speed [--quick]``.

Two parts, each a set of training steps timed against each other:

* **IWRM** (instance-wise risk minimisation: one objective per example):
  the benchmark's MLP trunk (64 → 256 → 256, ReLU) with a linear head of 8
  outputs, one squared-error loss per example, ``upgrad(num_tasks=B)``
  through ``optax_mtl.value_and_grad(..., batch_axis=0)`` in the
  ``"per_layer"`` and the ``"jacobian"`` modes (and ``"per_layer"`` with
  ``regularization=1e-4``, torchjd's default ``reg_eps``), against a plain
  step
  (``jax.value_and_grad`` of the summed per-example losses), at
  B = 32, 64, 128, 256. The Gramian-only step (the mode's Gramian, its
  trace added to the summed losses' gradient so that nothing is dropped)
  separates the engine's cost from UPGrad's solver, whose B × B QP grows
  with B whatever the mode.
* **Multi-task**: the benchmark's two trunks (``benchmarks/speed.py``: the
  MLP trunk and the conv trunk, two 3×3 stride-2 convolutions of 16 and 32
  channels on 16×16 inputs then a dense layer of 64) with T linear
  regression heads, ``upgrad(num_tasks=T)`` with the trunk shared, in the
  ``"per_layer"``, ``"jacobian"`` and ``"low_memory"`` modes, against a plain
  step, at T = 2, 10, 40 and minibatch 64 and 256.

Method: every step is one top-level ``jax.jit`` call (params, state,
batch) -> (params, state, losses) with an SGD update, run on consecutive
minibatches (a pool of 4, cycled) with no loop around it; every step of one
setting is compiled and warmed up first, then all are timed in turn over
``rounds`` rounds (interleaved, so that a slow spell of the shared machine
hits all alike), each round running each step for about ``target_seconds``.
A step's time is the minimum over rounds of its mean step time in a round
(noise only adds time); ratios divide two such minima from the same run.
Peak memory is the compiled executable's ``memory_analysis()``: temp +
argument + output bytes.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import optax_mtl
from benchmarks import speed
from benchmarks.problems import _common

INPUT_DIM, HIDDEN, DEPTH = 64, 256, 2
IWRM_OUTPUTS = 8
IWRM_BATCHES = (32, 64, 128, 256)
NUM_TASKS = (2, 10, 40)
BATCH_SIZES = (64, 256)
CONV = dict(side=16, channels=(16, 32), hidden=64)  # speed.py's conv trunk.
POOL = 4
LEARNING_RATE = 1e-4


def multitask_model(model: str, num_tasks: int, batch_size: int):
  """``(params, loss_fn, batches, shared)``: a trunk and T linear heads."""
  trunk_key, head_key, x_key, y_key = jax.random.split(jax.random.key(0), 4)
  if model == "mlp":
    trunk = _common.init_mlp(trunk_key, [INPUT_DIM] + [HIDDEN] * DEPTH)
    apply_trunk, input_shape, features = (_common.apply_mlp, (INPUT_DIM,),
                                          HIDDEN)
  else:
    trunk = speed._init_conv(trunk_key, CONV)
    apply_trunk = speed._apply_conv
    input_shape = (CONV["side"], CONV["side"], 1)
    features = CONV["hidden"]
  params = {"trunk": trunk,
            "heads": _common.init_heads(head_key, num_tasks, features, 1)}
  inputs = jax.random.normal(x_key, (POOL, batch_size) + input_shape)
  targets = jax.random.normal(y_key, (POOL, batch_size, num_tasks))

  def loss_fn(params, x, y):
    out = _common.apply_heads(params["heads"],
                              apply_trunk(params["trunk"], x))[..., 0]
    return jnp.mean((out - y) ** 2, axis=0) + 0.1

  return params, loss_fn, (inputs, targets), {"trunk": True, "heads": False}


def iwrm_model(batch_size: int):
  """``(params, loss_fn, batches)``: the MLP trunk, one loss per example."""
  trunk_key, head_key, x_key, y_key = jax.random.split(jax.random.key(1), 4)
  params = {"trunk": _common.init_mlp(trunk_key,
                                      [INPUT_DIM] + [HIDDEN] * DEPTH),
            "head": _common.init_mlp(head_key, [HIDDEN, IWRM_OUTPUTS])[0]}
  inputs = jax.random.normal(x_key, (POOL, batch_size, INPUT_DIM))
  targets = jax.random.normal(y_key, (POOL, batch_size, IWRM_OUTPUTS))

  def loss_fn(params, x, y):
    features = _common.apply_mlp(params["trunk"], x)
    out = features @ params["head"]["w"] + params["head"]["b"]
    return jnp.mean((out - y) ** 2, axis=1)

  return params, loss_fn, (inputs, targets)


def _sgd(params, grads):
  return jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)


def plain_step(loss_fn: Callable[..., Any]):
  """``jax.value_and_grad`` of the summed losses, then SGD."""

  def step(params, state, batch):
    summed = lambda p: jnp.sum(loss_fn(p, *batch))
    _, grads = jax.value_and_grad(summed)(params)
    return _sgd(params, grads), state, loss_fn(params, *batch)

  return step


def strategy_step(loss_fn, strategy, **options):
  """``optax_mtl.value_and_grad`` with ``options``, then SGD."""
  mtl_step = optax_mtl.value_and_grad(loss_fn, strategy, **options)

  def step(params, state, batch):
    (losses, grads), state = mtl_step(params, state, *batch)
    return _sgd(params, grads), state, losses

  return step


def gramian_only_step(loss_fn, num_objectives, mode, batch_axis=None):
  """The mode's Gramian and the summed losses' gradient, no solver.

  The Gramian's trace scales the gradient (by 1 + 0·trace), so XLA cannot
  drop it; what remains is what the engine pays before a strategy's rule.
  """
  from optax_mtl._src import per_layer  # pylint: disable=import-outside-toplevel
  from optax_mtl._src import tree as tree_lib  # pylint: disable=import-outside-toplevel

  def step(params, state, batch):
    if mode == "per_layer":
      linearized = per_layer.linearize(loss_fn, params, batch, False,
                                       batch_axis=batch_axis)
      gramian = linearized.gramian(None, num_objectives)
      losses, vjp_fn = linearized.out, linearized.vjp_fn
    else:
      losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, *batch), params)
      jacobian = jax.vmap(vjp_fn)(jnp.eye(num_objectives))[0]
      gramian = tree_lib.gramian(jacobian)
    (grads,) = vjp_fn(jnp.ones_like(losses))
    scale = 1.0 + 0.0 * jnp.trace(gramian)
    grads = jax.tree.map(lambda g: g * scale, grads)
    return _sgd(params, grads), state, losses

  return step


class _Entry:
  """One compiled step and where its trajectory stands."""

  def __init__(self, step, params, state, batches):
    self.batches = [jax.tree.map(lambda b, i=i: b[i], batches)
                    for i in range(POOL)]
    lowered = jax.jit(step).lower(params, state, self.batches[0])
    self.compiled = lowered.compile()
    analysis = self.compiled.memory_analysis()
    self.memory = (None if analysis is None else int(
        analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes))
    self.params, self.state, self.index = params, state, 0
    self.repeats = 1

  def run(self, num_steps):
    start = time.perf_counter()
    for _ in range(num_steps):
      batch = self.batches[self.index % POOL]
      self.params, self.state, losses = self.compiled(self.params, self.state,
                                                      batch)
      self.index += 1
    jax.block_until_ready((self.params, losses))
    return (time.perf_counter() - start) / num_steps


def time_entries(entries: dict, rounds: int, target_seconds: float) -> dict:
  """``{name: seconds per step}``: min over interleaved rounds."""
  for entry in entries.values():
    entry.run(3)  # Warm-up.
    once = entry.run(1)
    entry.repeats = int(max(1, min(200, target_seconds / max(once, 1e-6))))
  best = {name: np.inf for name in entries}
  for _ in range(rounds):
    for name, entry in entries.items():
      best[name] = min(best[name], entry.run(entry.repeats))
  return best


def run_iwrm(batch_sizes, rounds, target_seconds, log):
  rows = []
  for batch_size in batch_sizes:
    params, loss_fn, batches = iwrm_model(batch_size)
    strategy = optax_mtl.upgrad(num_tasks=batch_size)
    state = strategy.init(params)
    entries = {
        "plain": _Entry(plain_step(loss_fn), params, state, batches),
        "per_layer": _Entry(strategy_step(
            loss_fn, strategy, gramian_mode="per_layer", batch_axis=0),
                            params, state, batches),
        "jacobian": _Entry(strategy_step(
            loss_fn, strategy, gramian_mode="jacobian", batch_axis=0),
                           params, state, batches),
        "per_layer_reg": _Entry(strategy_step(
            loss_fn, optax_mtl.upgrad(num_tasks=batch_size,
                                      regularization=1e-4),
            gramian_mode="per_layer", batch_axis=0), params, state, batches),
        "gramian_per_layer": _Entry(gramian_only_step(
            loss_fn, batch_size, "per_layer", 0), params, state, batches),
        "gramian_jacobian": _Entry(gramian_only_step(
            loss_fn, batch_size, "jacobian"), params, state, batches),
    }
    times = time_entries(entries, rounds, target_seconds)
    row = dict(part="iwrm", model="mlp", batch=batch_size,
               ms={k: 1e3 * v for k, v in times.items()},
               mib={k: e.memory / 2**20 for k, e in entries.items()})
    rows.append(row)
    log(row)
  return rows


def run_multitask(models, num_tasks, batch_sizes, rounds, target_seconds,
                  log):
  rows = []
  for model in models:
    for batch_size in batch_sizes:
      for tasks in num_tasks:
        params, loss_fn, batches, shared = multitask_model(model, tasks,
                                                           batch_size)
        strategy = optax_mtl.upgrad(num_tasks=tasks)
        state = strategy.init(params)
        entries = {"plain": _Entry(plain_step(loss_fn), params, state,
                                   batches)}
        for mode in ("per_layer", "jacobian", "low_memory"):
          entries[mode] = _Entry(strategy_step(
              loss_fn, strategy, gramian_mode=mode, shared=shared),
                                 params, state, batches)
        times = time_entries(entries, rounds, target_seconds)
        row = dict(part="multitask", model=model, batch=batch_size,
                   num_tasks=tasks,
                   ms={k: 1e3 * v for k, v in times.items()},
                   mib={k: e.memory / 2**20 for k, e in entries.items()})
        rows.append(row)
        log(row)
  return rows


def summary(rows) -> str:
  """Markdown tables of the ratios."""

  def iwrm(ms, mib, row):
    return [f"{row['batch']}", f"{ms['plain']:.2f}",
            f"{ms['per_layer'] / ms['plain']:.2f}",
            f"{ms['jacobian'] / ms['plain']:.1f}",
            f"{ms['jacobian'] / ms['per_layer']:.1f}",
            f"{ms['per_layer_reg'] / ms['plain']:.2f}",
            f"{ms['gramian_per_layer'] / ms['plain']:.2f}",
            f"{ms['gramian_jacobian'] / ms['gramian_per_layer']:.1f}",
            f"{mib['plain']:.1f} / {mib['per_layer']:.1f} / "
            f"{mib['jacobian']:.1f}"]

  def multitask(ms, mib, row):
    return [f"{row['model']}", f"{row['batch']}", f"{row['num_tasks']}",
            f"{ms['plain']:.2f}", f"{ms['per_layer'] / ms['plain']:.2f}",
            f"{ms['jacobian'] / ms['plain']:.2f}",
            f"{ms['low_memory'] / ms['plain']:.2f}",
            f"{ms['jacobian'] / ms['per_layer']:.2f}",
            f"{mib['plain']:.1f} / {mib['per_layer']:.1f} / "
            f"{mib['jacobian']:.1f} / {mib['low_memory']:.1f}"]

  return "\n".join(
      _table(rows, "iwrm",
             "IWRM (MLP trunk, upgrad(num_tasks=B), batch_axis=0):",
             ("B", "plain ms", "per_layer ÷ plain", "jacobian ÷ plain",
              "jacobian ÷ per_layer",
              "per_layer, regularization=1e-4 ÷ plain",
              "Gramian only: per_layer ÷ plain", "jacobian ÷ per_layer",
              "MiB plain / per_layer / jacobian"), iwrm)
      + [""] + _table(
          rows, "multitask",
          "Multi-task (upgrad(num_tasks=T), trunk shared):",
          ("model", "batch", "T", "plain ms", "per_layer ÷ plain",
           "jacobian ÷ plain", "low_memory ÷ plain", "jacobian ÷ per_layer",
           "MiB plain / per_layer / jacobian / low_memory"), multitask))


def _table(rows, part: str, title: str, columns, cells) -> list[str]:
  """A titled markdown table: one row ``cells(ms, mib, row)`` per row of
  ``part``."""
  lines = [title, "", "| " + " | ".join(columns) + " |",
           "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cells(row["ms"], row["mib"], row)) + " |"
            for row in rows if row["part"] == part]
  return lines


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer rounds and settings (a smoke run)")
  parser.add_argument("--part", choices=("all", "iwrm", "multitask"),
                      default="all")
  parser.add_argument("--models", default="mlp,conv")
  parser.add_argument("--batch-sizes", default=None,
                      help="multi-task minibatch sizes, e.g. 64,256")
  parser.add_argument("--iwrm-batches", default=None,
                      help="IWRM batch sizes, e.g. 32,64,128,256")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--target-seconds", type=float, default=0.2)
  parser.add_argument("--out", default=None, help="write the rows as JSON")
  args = parser.parse_args(argv)
  rounds, target = args.rounds, args.target_seconds
  iwrm_batches, tasks, batches = IWRM_BATCHES, NUM_TASKS, BATCH_SIZES
  if args.quick:
    rounds, target = 2, 0.02
    iwrm_batches, tasks, batches = (32,), (2,), (64,)
  if args.batch_sizes:
    batches = tuple(int(b) for b in args.batch_sizes.split(","))
  if args.iwrm_batches:
    iwrm_batches = tuple(int(b) for b in args.iwrm_batches.split(","))
  log = lambda row: print(json.dumps(row), flush=True)
  rows = []
  if args.part in ("all", "iwrm"):
    rows += run_iwrm(iwrm_batches, rounds, target, log)
  if args.part in ("all", "multitask"):
    rows += run_multitask(args.models.split(","), tasks, batches, rounds,
                          target, log)
  print(f"\njax {jax.__version__}, {jax.devices()[0].device_kind}\n")
  print(summary(rows))
  if args.out:
    with open(args.out, "w") as file:
      json.dump(rows, file, indent=1)


if __name__ == "__main__":
  main()
