"""Before and after: the cheap Gramian options on the conv speed model.

Times, in one process and with the speed harness (:mod:`benchmarks.speed`:
consecutive top-level jitted steps of a training trajectory, whole
``recompute_every`` cycles, interleaved rounds), the plain step, ``upgrad``,
``recompute_every(upgrad, 10)`` and ``upgrad`` with
``gramian_mode="low_memory"``, each from this checkout and from an earlier
commit of the package (``--before``), and checks them against the targets
of issue 23:

* ``recompute_every(s, n)`` ≤ ``1 + (c − 1)/n + 0.1`` plain steps
  (amortised), with ``c`` the cost of ``s`` alone;
* ``low_memory`` ≤ 1.5 × the Jacobian mode.

Run from the repository root (pin one core; the figures are ratios)::

  taskset -c 1 python -m benchmarks.conv_cliff --before e6ffbc8

The earlier package is extracted with ``git archive`` into a temporary
folder and imported as ``optax_mtl_before``.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Any

import numpy as np

import optax_mtl

from benchmarks import speed

TARGET_LOW_MEMORY = 1.5
TARGET_MARGIN = 0.1


def load_before(commit: str, folder: str) -> Any:
  """The package at ``commit``, importable as ``optax_mtl_before``."""
  root = pathlib.Path(folder)
  archive = subprocess.run(["git", "archive", commit, "optax_mtl"],
                           check=True, capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
  package = root / "optax_mtl_before"
  (root / "optax_mtl").rename(package)
  for path in package.rglob("*.py"):
    path.write_text(re.sub(r"\boptax_mtl\b", "optax_mtl_before",
                           path.read_text()))
  sys.path.insert(0, str(root))
  return importlib.import_module("optax_mtl_before")


def _step(package, strategy, loss_fn, **options):
  value_and_grad = package.value_and_grad(loss_fn, strategy, **options)

  def step(params, state, batch):
    (task_losses, grads), state = value_and_grad(params, state, batch)
    return task_losses, grads, state

  return step


def _plain(loss_fn):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def step(params, state, batch):
    loss, grads = jax.value_and_grad(lambda p: jnp.sum(loss_fn(p, batch)))(
        params)
    return loss, grads, state

  return step


def measure(before: Any, num_tasks: int, rounds: int, every: int) -> dict:
  """Amortised and slowest step of every entry, ÷ the plain step."""
  cfg = speed.model_config("conv", {"rounds": rounds})
  params, loss_fn, batches, _, _ = speed.make_model(num_tasks, cfg)
  # plain_again: the plain step compiled twice, this run's noise floor.
  steps = {"plain": (_plain(loss_fn), ()), "plain_again": (_plain(loss_fn), ())}
  for label, package in (("after", optax_mtl), ("before", before)):
    base = package.upgrad(num_tasks)
    recompute = package.recompute_every(base, every)
    steps[f"upgrad {label}"] = (_step(package, base, loss_fn),
                                base.init(params))
    steps[f"recompute_every {label}"] = (_step(package, recompute, loss_fn),
                                         recompute.init(params))
    steps[f"low_memory {label}"] = (
        _step(package, base, loss_fn, gramian_mode="low_memory"),
        base.init(params))
  trajectories = speed._prepare(  # pylint: disable=protected-access
      steps, cfg["learning_rate"], params, batches, cfg["target_seconds"])
  times = speed._interleaved_rounds(  # pylint: disable=protected-access
      trajectories, rounds)
  out = {}
  for key in steps:
    out[key] = dict(
        speed._timing(times, key),  # pylint: disable=protected-access
        ratio_plain=speed._ratio(times, key, "plain"),  # pylint: disable=protected-access
        ratio_median=speed._median_ratio(times, key, "plain"),  # pylint: disable=protected-access
        flops=speed.flops(trajectories[key].compiled))
  return out


def table(results: dict[int, dict], every: int) -> str:
  """Markdown: per T, each entry ÷ plain (amortised, slowest) and the
  targets."""
  lines = ["| T | entry | before ÷ plain | after ÷ plain | slowest step "
           "before / after (÷ plain) | target |",
           "|---|---|---|---|---|---|"]
  for t, out in results.items():
    cost = {label: out[f"upgrad {label}"]["ratio_plain"]
            for label in ("before", "after")}
    for entry in ("upgrad", "recompute_every", "low_memory"):
      before, after = out[f"{entry} before"], out[f"{entry} after"]
      if entry == "recompute_every":
        target = (f"≤ {1 + (cost['after'] - 1) / every + TARGET_MARGIN:.2f}"
                  f" (c = {cost['after']:.2f})")
      elif entry == "low_memory":
        target = (f"≤ {TARGET_LOW_MEMORY} × upgrad: before "
                  f"{before['ratio_plain'] / cost['before']:.2f}×, after "
                  f"{after['ratio_plain'] / cost['after']:.2f}×")
      else:
        target = "c"
      lines.append(
          f"| {t} | {entry} | {before['ratio_plain']:.2f} | "
          f"{after['ratio_plain']:.2f} | {before['slowest_ratio_plain']:.1f}"
          f" / {after['slowest_ratio_plain']:.1f} | {target} |")
    lines.append(f"| {t} | plain step | {out['plain']['step_ms']:.2f} ms | "
                 f"| noise floor (plain ÷ plain) "
                 f"{out['plain_again']['ratio_plain']:.3f} | |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--before", required=True,
                      help="the commit to compare with (e.g. e6ffbc8)")
  parser.add_argument("--tasks", default="2,10",
                      help="comma-separated task counts (default 2,10)")
  parser.add_argument("--rounds", type=int, default=10)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as folder:
    before = load_before(args.before, folder)
    results = {t: measure(before, t, args.rounds, speed.RECOMPUTE_EVERY)
               for t in (int(x) for x in args.tasks.split(","))}
  print(table(results, speed.RECOMPUTE_EVERY))
  ratios = {t: {k: round(v["ratio_plain"], 3) for k, v in out.items()}
            for t, out in results.items()}
  print("ratio_median:", {t: {k: round(v["ratio_median"], 3)
                              for k, v in out.items()}
                          for t, out in results.items()})
  print("ratio_plain:", ratios)
  print("flops ÷ plain (XLA's count; a cond counts both branches):",
        {t: {k: round(v["flops"] / out["plain"]["flops"], 2)
             for k, v in out.items() if v["flops"]}
         for t, out in results.items()})
  return 0


if __name__ == "__main__":
  sys.exit(main())
