"""Writes the results folder: results.json, report.md and PNG plots."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import numpy as np


def _pm(entry: Optional[dict], digits: int = 3, scale: float = 1.0) -> str:
  if not entry:
    return "–"
  mean, std = entry.get("mean"), entry.get("std", 0.0)
  if mean is None or not math.isfinite(mean):
    return "nan"
  return f"{mean * scale:.{digits}g} ± {std * scale:.2g}"


def _fixed(entry: Optional[dict], digits: int = 2) -> str:
  if not entry:
    return "–"
  return f"{entry['mean']:+.{digits}f} ± {entry.get('std', 0.0):.{digits}f}"


def _mib(value) -> str:
  return "–" if value is None else f"{value / 2**20:.2f}"


def _ratio(value) -> str:
  return "–" if value is None else f"{value:.2f}"


def _json_default(value):
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.bool_):
    return bool(value)
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def plot_weights(result: dict, path: str) -> None:
  """One panel per strategy: each task's weight over training."""
  plt = _plt()
  names = result["ranking"]
  cols = min(4, max(1, len(names)))
  rows = max(1, math.ceil(len(names) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows),
                           squeeze=False, sharex=True)
  steps = np.asarray(result["curve_steps"])
  tasks = result["tasks"]
  for ax, name in zip(axes.flat, names):
    weights = np.asarray(result["strategies"][name]["weights"], float)
    if weights.ndim != 2 or weights.shape[0] == 0:
      ax.set_axis_off()
      continue
    x = steps[:weights.shape[0]]
    many = weights.shape[1] > 10
    for task in range(weights.shape[1]):
      ax.plot(x, weights[:, task], lw=0.6 if many else 1.2,
              alpha=0.5 if many else 1.0,
              label=None if many else tasks[task])
    ax.set_title(name, fontsize=9)
    ax.tick_params(labelsize=7)
    if weights.size and np.all(weights > 0) and (
        weights.max() / max(weights.min(), 1e-30) > 100):
      ax.set_yscale("log")
  for ax in list(axes.flat)[len(names):]:
    ax.set_axis_off()
  if len(tasks) <= 10 and names:
    axes.flat[0].legend(fontsize=6, loc="best")
  fig.suptitle(f"{result['problem']}: task weights over training "
               "(mean over seeds)", fontsize=10)
  fig.tight_layout(rect=(0, 0, 1, 0.96))
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_toy(result: dict, path: str) -> None:
  """Trajectories of every strategy over the contours of f1 + f2."""
  plt = _plt()
  from benchmarks.problems import toy2d  # pylint: disable=import-outside-toplevel
  names = result["ranking"]
  axis = np.linspace(-10, 10, 200)
  grid = np.stack(np.meshgrid(axis, axis, indexing="xy"), -1)
  values = np.asarray(toy2d.objectives(grid, result["scale"]))
  total = values.sum(-1)
  pareto = np.asarray(result["pareto_set"])
  cols = min(4, max(1, len(names)))
  rows = max(1, math.ceil(len(names) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.0 * rows),
                           squeeze=False)
  for ax, name in zip(axes.flat, names):
    entry = result["strategies"][name]
    ax.contour(axis, axis, total, levels=20, linewidths=0.5, cmap="Greys")
    if len(pareto):
      ax.plot(pareto[:, 0], pareto[:, 1], ".", color="0.6", ms=1.5)
    for path_xy, reached in zip(entry["trajectories"], entry["reached"]):
      path_xy = np.asarray(path_xy)
      ax.plot(path_xy[:, 0], path_xy[:, 1], lw=1.2)
      ax.plot(path_xy[0, 0], path_xy[0, 1], "ko", ms=3)
      end = path_xy[-1]
      ax.plot(end[0], end[1], "*" if reached else "x",
              color="green" if reached else "red", ms=7)
    ax.set_title(f"{name}: {sum(entry['reached'])}/{len(entry['reached'])}",
                 fontsize=9)
    ax.set_xlim(-10, 10)
    ax.set_ylim(-10, 10)
    ax.tick_params(labelsize=7)
  for ax in list(axes.flat)[len(names):]:
    ax.set_axis_off()
  fig.suptitle("toy2d: trajectories over contours of f1+f2 (grey dots: "
               "Pareto set; * reached, x not)", fontsize=10)
  fig.tight_layout(rect=(0, 0, 1, 0.97))
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_speed(speed: dict, path: str) -> None:
  """Step-time ratios and memory against T."""
  plt = _plt()
  fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
  num_tasks = speed["num_tasks"]
  for name, per_t in speed["strategies"].items():
    ratios, mems, ts = [], [], []
    for t in num_tasks:
      entry = per_t.get(str(t), {})
      ratio = entry.get("ratio_jacobian", entry.get("ratio_equal"))
      if ratio is None:
        continue
      ts.append(t)
      ratios.append(ratio)
      mems.append((entry.get("memory_bytes") or 0) / 2**20)
    style = "-o" if per_t.get(str(num_tasks[0]), {}).get("kind") == "gramian" \
        else "--."
    ax_time.plot(ts, ratios, style, label=name, ms=3)
    ax_mem.plot(ts, mems, style, label=name, ms=3)
    low = [(t, per_t[str(t)].get("memory_low_memory_bytes"))
           for t in num_tasks if per_t.get(str(t), {}).get(
               "memory_low_memory_bytes")]
    if low:
      ax_mem.plot([t for t, _ in low], [m / 2**20 for _, m in low], ":",
                  color="0.5", lw=0.8)
  ax_time.set_xscale("log")
  ax_time.set_yscale("log")
  ax_time.set_xlabel("T")
  ax_time.set_ylabel("step time ratio (÷ equal or ÷ Jacobian-only)")
  ax_mem.set_xscale("log")
  ax_mem.set_xlabel("T")
  ax_mem.set_ylabel("memory MiB (dotted: low_memory)")
  ax_time.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _problem_markdown(result: dict, image: Optional[str]) -> list[str]:
  lines = [f"## {result['problem']}", "", result.get("description", ""), ""]
  strategies = result["strategies"]
  if result["problem"] == "toy2d":
    lines += ["| rank | strategy | reached Pareto set | mean distance to "
              "Pareto set | skipped steps | seconds |",
              "|---:|---|---:|---:|---:|---:|"]
    for i, name in enumerate(result["ranking"], 1):
      entry = strategies[name]
      lines.append(
          f"| {i} | {name} | {sum(entry['reached'])}/{len(entry['reached'])}"
          f" | {np.mean(entry['distance_to_pareto_set']):.3f} | "
          f"{int(np.max(entry['skipped_steps']))} | "
          f"{entry['train_seconds']:.1f} |")
    if image:
      lines += ["", f"![toy2d trajectories]({image})", ""]
    return lines
  tasks, metric = result["tasks"], result["metrics"][0]
  direction = "higher" if result["higher_is_better"][0] else "lower"
  lines += [f"Primary metric: `{metric}` ({direction} is better); Δm% is "
            "the mean relative change against the single-task models "
            "(positive = better); negative transfer counts the tasks worse "
            "than single-task by more than 2 standard errors over seeds. "
            f"Seeds: {result['seeds']}.", ""]
  lines += ["| rank | strategy | Δm% | mean score | neg. transfer | "
            "skipped steps | seconds |", "|---:|---|---:|---:|---:|---:|---:|"]
  stl = result.get("single_task")
  for i, name in enumerate(result["ranking"], 1):
    entry = strategies[name]
    skipped = int(np.max(entry.get("skipped_steps", [0]) or [0]))
    lines.append(
        f"| {i} | {name}{' (G)' if entry.get('gramian') else ''} | "
        f"{_fixed(entry.get('delta_m'))} | {_pm(entry['mean_score'], 4)} | "
        f"{entry.get('negative_transfer', '–')}/{len(tasks)} | {skipped} | "
        f"{entry['train_seconds']:.1f} |")
  if stl:
    lines.append(f"| – | single-task | 0 | {_pm(stl['mean_score'], 4)} | – "
                 f"| – | {stl['train_seconds']:.1f} |")
  lines += ["", "(G): reads the Gramian of the task gradients.", ""]
  if len(tasks) <= 12:
    header = "| strategy | " + " | ".join(tasks) + " |"
    lines += [f"Per-task `{metric}` (mean ± std over seeds):", "", header,
              "|---|" + "---:|" * len(tasks)]
    rows = ([("single-task", stl)] if stl else []) + [
        (name, strategies[name]) for name in result["ranking"]]
    for name, entry in rows:
      per_task = entry["per_task"][metric]
      cells = [f"{m:.4g} ± {s:.1g}" for m, s in zip(per_task["mean"],
                                                    per_task["std"])]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
  if image:
    lines += [f"![{result['problem']} task weights]({image})", ""]
  return lines


def _speed_markdown(speed: dict, image: Optional[str]) -> list[str]:
  ts = speed["num_tasks"]
  lines = ["## Speed and memory", "",
           "Step time of `optax_mtl.value_and_grad(loss_fn, strategy)` on a "
           f"shared MLP trunk ({speed['config']['depth']}×"
           f"{speed['config']['hidden']}, batch "
           f"{speed['config']['batch_size']}) with T regression heads. "
           "Loss-only strategies: ratio to the `equal` step and to a plain "
           "`jax.value_and_grad` of the summed losses. Gramian strategies: "
           "ratio to the Jacobian-only step (vmap of the VJP, summed). "
           "Fastest step over interleaved rounds, ÷ the baseline's fastest, "
           "jitted, after warm-up. Memory: "
           "compiled `memory_analysis()` temp + argument + output, MiB.", ""]
  header = ("| strategy | kind | " + " | ".join(f"time ratio T={t}"
                                              for t in ts)
            + " | " + " | ".join(f"÷plain T={t}" for t in ts) + " | "
            + " | ".join(f"MiB T={t}" for t in ts) + " | "
            + " | ".join(f"low_memory MiB T={t}" for t in ts) + " |")
  lines += [header, "|---|---|" + "---:|" * (4 * len(ts))]
  for name, per_t in speed["strategies"].items():
    entries = [per_t.get(str(t), {}) for t in ts]
    kind = next((e.get("kind") for e in entries if e.get("kind")), "error")
    cells = [_ratio(e.get("ratio_jacobian", e.get("ratio_equal")))
             for e in entries]
    cells += [_ratio(e.get("ratio_plain")) for e in entries]
    cells += [_mib(e.get("memory_bytes")) for e in entries]
    cells += [_mib(e.get("memory_low_memory_bytes")) for e in entries]
    lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    for t, e in zip(ts, entries):
      if "error" in e:
        lines.append(f"| ↳ T={t} error | {e['error']} |")
  base = speed["baselines"]
  lines += ["", "Baselines (MiB): " + "; ".join(
      f"T={t}: plain {_mib(base[str(t)]['plain']['memory_bytes'])}, "
      f"equal {_mib(base[str(t)]['equal']['memory_bytes'])}, Jacobian-only "
      f"{_mib(base[str(t)]['jacobian']['memory_bytes'])}" for t in ts), ""]
  if image:
    lines += [f"![speed]({image})", ""]
  return lines


def write_report(results: dict[str, dict], out_dir: str,
                 speed: Optional[dict] = None,
                 meta: Optional[dict] = None) -> dict[str, str]:
  """Writes ``results.json``, ``report.md`` and PNGs into ``out_dir``.

  Args:
    results: problem name -> :func:`benchmarks.run_problem` result.
    out_dir: the folder (created if missing).
    speed: the :func:`benchmarks.run_speed` result, if any.
    meta: command, machine, wall time (free-form, shown at the top).

  Returns:
    ``{"json": path, "markdown": path, "plots": [paths]}``.
  """
  os.makedirs(out_dir, exist_ok=True)
  meta = dict(meta or {})
  json_path = os.path.join(out_dir, "results.json")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump({"meta": meta, "problems": results, "speed": speed}, f,
              default=_json_default)
  plots = []
  lines = ["# optax_mtl benchmark report", ""]
  if meta:
    machine = meta.get("machine", {})
    lines += [f"- command: `{meta.get('command', '')}`",
              f"- machine: {machine.get('nproc', '?')} CPUs, "
              f"{machine.get('cpu', '?')}; jax {machine.get('jax', '?')} "
              f"({machine.get('backend', '?')})",
              f"- wall time: {meta.get('wall_seconds', float('nan')):.0f} s",
              ""]
  lines += ["## Ranking summary", "",
            "| problem | best → worst (by Δm%, toy2d by Pareto reached) |",
            "|---|---|"]
  for name, result in results.items():
    lines.append(f"| {name} | {', '.join(result['ranking'])} |")
  lines.append("")
  for name, result in results.items():
    image = None
    if result["strategies"]:
      image = f"{name}_{'trajectories' if name == 'toy2d' else 'weights'}.png"
      (plot_toy if name == "toy2d" else plot_weights)(
          result, os.path.join(out_dir, image))
      plots.append(os.path.join(out_dir, image))
    lines += _problem_markdown(result, image)
  if speed:
    image = "speed.png"
    plot_speed(speed, os.path.join(out_dir, image))
    plots.append(os.path.join(out_dir, image))
    lines += _speed_markdown(speed, image)
  md_path = os.path.join(out_dir, "report.md")
  with open(md_path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return {"json": json_path, "markdown": md_path, "plots": plots}
