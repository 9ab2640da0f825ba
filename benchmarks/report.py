"""Writes the results folder: results.json, report.md and PNG plots.

The report leads with what the run says (generated from the numbers: the
best strategy per problem with its confidence interval, ties, skipped steps
and overflowing weights where they occur, cost against a plain training
step), then the protocol, then per problem a quality-against-cost figure,
the per-task outcomes against the single-task models, the tables and, last,
the weights each strategy applied. The speed section gives absolute step
times and every strategy's step ÷ a plain training step.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Optional

import numpy as np

from benchmarks import claims
from benchmarks import strategies as strategies_lib
from benchmarks.runner import STILL_IMPROVING

CONFIDENCE = 0.95
# A weight above this (or a non-finite one) is reported as overflowing.
HUGE_WEIGHT = 1e6

_HUGE_MEANS = ("weights this large mean that a task with a near-zero loss or "
               "gradient, or a near-singular Gramian, sets the balance "
               "between the tasks.")
# Why a strategy's weights can grow without bound (README formulas).
_WEIGHT_CAUSES = {
    "loss_ema": "w_k = 1/L̃_k, the inverse of a running average of the loss",
    "rema": "w_k = r_k/L̃_k, the inverse of a running average of the loss",
    "dwema": "w_k ∝ 1/L̃_k, the inverse of a running average of the loss",
    "log_loss": "w_k = 1/L_k",
    "initial_loss": "w_k = 1/L_k at the first steps",
    "geometric_mean": "w_k = (Π L_j)^(1/γ)/(γ L_k)",
    "normalized_gradients": "w_k = 1/‖g_k‖",
    "nash_mtl": "Gα = 1/α, so α_k grows as the gradients shrink",
    "imtl_g": "weights that equalise the projections on unit gradients",
    "aligned_mtl": "B = √λ_min · V Λ^(−1/2) Vᵀ, which grows as the "
                   "Gramian's eigenvalues shrink",
    "uncertainty": "w_k = e^(−s_k) with a learned s_k",
}


# --------------------------------------------------------------------------
# Statistics over seeds.


def _t_quantile(num: int) -> float:
  """Two-sided CONFIDENCE quantile of Student's t with num − 1 dof."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  return float(stats.t.ppf(0.5 + CONFIDENCE / 2, num - 1))


def confidence_interval(values) -> tuple[float, float, float]:
  """``(mean, low, high)``: a t interval of the mean over seeds.

  With a single value the interval is that value (no spread known).
  """
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return float("nan"), float("nan"), float("nan")
  mean = float(values.mean())
  if values.size < 2:
    return mean, mean, mean
  half = _t_quantile(values.size) * values.std(ddof=1) / math.sqrt(
      values.size)
  return mean, mean - half, mean + half


def ties_with_best(result: dict) -> tuple[Optional[str], list[str]]:
  """The best strategy by Δm% and those not distinguishable from it.

  Seeds share the initialisation and the minibatches across strategies, so
  the comparison is paired: strategy s ties with the best b when the
  CONFIDENCE interval of the mean over seeds of Δm%_b − Δm%_s contains 0.
  With one seed nothing is called a tie.
  """
  strategies = result["strategies"]
  ranked = [n for n in result["ranking"] if "delta_m" in strategies[n]
            and np.isfinite(strategies[n]["delta_m"]["mean"])]
  if not ranked:
    return None, []
  best = ranked[0]
  best_seeds = np.asarray(strategies[best]["delta_m"]["per_seed"], float)
  ties = []
  for name in ranked[1:]:
    seeds = np.asarray(strategies[name]["delta_m"]["per_seed"], float)
    _, low, _ = confidence_interval(best_seeds - seeds)
    if len(seeds) > 1 and low <= 0.0:
      ties.append(name)
  return best, ties


# --------------------------------------------------------------------------
# Formatting.


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


def _ci_text(values, digits: int = 1) -> str:
  mean, low, high = confidence_interval(values)
  if not math.isfinite(mean):
    return "nan"
  if low == high:
    return f"{mean:+.{digits}f} (one seed, no interval)"
  return (f"{mean:+.{digits}f} ({CONFIDENCE:.0%} CI {low:+.{digits}f} to "
          f"{high:+.{digits}f})")


def _span(low: float, high: float, digits: int = 2, unit: str = "") -> str:
  """``"a–b×"``, or one value when both ends print the same."""
  low_text, high_text = f"{low:.{digits}g}", f"{high:.{digits}g}"
  if low_text == high_text:
    return f"{low_text}{unit}"
  return f"{low_text}–{high_text}{unit}"


def _mib(value) -> str:
  return "–" if value is None else f"{value / 2**20:.2f}"


def _ratio(value) -> str:
  return "–" if value is None else f"{value:.2f}"


def _ms(value) -> str:
  if value is None:
    return "–"
  return f"{value:.3g}"


def _names(names: list[str]) -> str:
  quoted = [f"`{n}`" for n in names]
  if len(quoted) <= 2:
    return " and ".join(quoted)
  return ", ".join(quoted[:-1]) + " and " + quoted[-1]


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


def _speed_models(speed: Optional[dict]) -> dict[str, dict]:
  """``{model: run_speed result}`` from either form."""
  if not speed:
    return {}
  if "strategies" in speed:  # A single run_speed result.
    return {speed.get("model", "mlp"): speed}
  return speed


# --------------------------------------------------------------------------
# What this run says.


def _problem_findings(result: dict) -> list[str]:
  """Bullet points for one problem with single-task baselines."""
  best, ties = ties_with_best(result)
  if best is None:
    return ["- No strategy has a finite Δm%."]
  return (_best_findings(result, best, ties)
          + _outlier_findings(result)
          + _score_finding(result, best, ties)
          + _rejection_findings(result)
          + _budget_findings(result)
          + _cost_finding(result, best))


def _best_findings(result: dict, best: str, ties: list[str]) -> list[str]:
  """The best strategy by Δm%, its ties, its gain over ``equal`` and the
  tasks worse than single-task."""
  strategies = result["strategies"]
  best_entry = strategies[best]
  seeds = len(best_entry["delta_m"]["per_seed"])
  text = (f"- **Best by Δm%: `{best}`**, Δm% "
          f"{_ci_text(best_entry['delta_m']['per_seed'])} over {seeds} "
          "seeds; ")
  if ties:
    tied = [f"`{n}` ({strategies[n]['delta_m']['mean']:+.1f})" for n in ties]
    text += (f"tied with {', '.join(tied)}: the paired {CONFIDENCE:.0%} "
             "interval of each difference over seeds contains 0, so these "
             "seeds do not separate them.")
  elif len(result["ranking"]) == 1:
    text += "the only strategy run."
  elif seeds > 1:
    text += "ahead of every other strategy beyond seed noise."
  else:
    text += "one seed, so ties are not assessed."
  lines = [text]
  if "equal" in strategies and best != "equal":
    difference = (np.asarray(best_entry["delta_m"]["per_seed"], float)
                  - np.asarray(strategies["equal"]["delta_m"]["per_seed"],
                               float))
    lines.append(
        f"- Against `equal` (the plain sum of the losses, Δm% "
        f"{strategies['equal']['delta_m']['mean']:+.1f}): `{best}` gains "
        f"{_ci_text(difference)} points of Δm%.")
  transfer = {n: strategies[n].get("negative_transfer") for n in strategies}
  fewest = min(v for v in transfer.values() if v is not None)
  clean = [n for n, v in transfer.items() if v == 0]
  # With one seed there is no standard error: any worse score counts.
  beyond = ("single seed: any lower score counts" if seeds < 2
            else "beyond 2 standard errors")
  if clean:
    lines.append(f"- No task worse than single-task ({beyond}) under "
                 f"{_names(clean)}.")
  else:
    lines.append(
        f"- Every strategy is worse than the single-task models on at least "
        f"{fewest} of {len(result['tasks'])} tasks ({beyond}); "
        f"`{best}` on {transfer[best]}.")
  return lines


def _score_finding(result: dict, best: str, ties: list[str]) -> list[str]:
  """Says so when the best mean score is not the best Δm%'s."""
  strategies = result["strategies"]
  higher = result["higher_is_better"][0]
  by_score = max(strategies, key=lambda n: (
      strategies[n]["mean_score"]["mean"] if higher
      else -strategies[n]["mean_score"]["mean"]))
  if by_score == best or by_score in ties:
    return []
  return [
      f"- The best mean `{result['metrics'][0]}` over tasks is "
      f"`{by_score}`'s, not `{best}`'s: Δm% averages *relative* changes, "
      "so a task whose single-task score is small (or error is small) "
      "weighs more in Δm% than in the mean score."]


def _rejection_findings(result: dict) -> list[str]:
  """The strategies that rejected steps or whose weights grew huge."""
  lines = []
  for name in result["ranking"]:
    entry = result["strategies"][name]
    skipped = np.asarray(entry.get("skipped_steps", [0]), float)
    weight_max = max(entry.get("weight_max", [0.0]) or [0.0])
    steps = np.asarray(entry["selection"]["steps_run"], float)
    cause = _WEIGHT_CAUSES.get(name)
    huge = (f"its weights reached {weight_max:.1e} (the largest over "
            "training and tasks" + (f"; {cause}" if cause else "") + ")")
    if skipped.max() > 0:
      text = (f"- `{name}` rejected {skipped.mean():.0f} of "
              f"{steps.mean():.0f} steps (mean over seeds). A step is "
              "rejected when a loss is zero, negative or non-finite (for a "
              "strategy that divides by the losses), the Gramian is "
              "non-finite, or the weights come out non-finite; the previous "
              "weights are then applied again and the statistics stay as "
              "they were.")
      if weight_max > HUGE_WEIGHT:
        text += (f" Also, {huge}: {_HUGE_MEANS} The next step's weights can "
                 "then overflow.")
      lines.append(text)
    elif weight_max > HUGE_WEIGHT:
      sentence = _HUGE_MEANS[0].upper() + _HUGE_MEANS[1:]
      lines.append(f"- `{name}`: {huge}. {sentence} Adam normalises the "
                   "update's overall scale, so training goes on.")
  return lines


def _budget_findings(result: dict) -> list[str]:
  """Whether the single-task and multi-task models converged in budget."""
  lines = []
  stl = result.get("single_task", {})
  unconverged = stl.get("still_improving") or {}
  if unconverged:
    lines.append(
        "- **Single-task baselines still improving** when the budget ran "
        "out (the last fifth of the budget brought more than "
        f"{STILL_IMPROVING:.0%} of the whole reduction of the validation "
        "loss): " + ", ".join(f"{task} ({gain:.0%})"
                              for task, gain in unconverged.items())
        + ". Δm% on those tasks compares models at the same budget, not at "
          "convergence, and may favour the multi-task model.")
  else:
    lines.append("- Every single-task baseline converged within the budget "
                 "(early stopping on its validation loss, or less than "
                 f"{STILL_IMPROVING:.0%} of its progress in the last "
                 "fifth of the budget).")
  strategies = result["strategies"]
  improving = {n: float(np.mean(strategies[n]["selection"]["late_gain"]))
               for n in result["ranking"]
               if "late_gain" in strategies[n]["selection"]}
  improving = {n: g for n, g in improving.items() if g > STILL_IMPROVING}
  if improving:
    lines.append(
        "- Multi-task models still improving when the budget ran out: "
        + ", ".join(f"`{n}` ({g:.0%})" for n, g in improving.items())
        + "; a longer budget may raise their Δm%.")
  return lines


def _cost_finding(result: dict, best: str) -> list[str]:
  """The best strategy's step time against ``equal``'s."""
  strategies = result["strategies"]
  best_entry = strategies[best]
  if "equal" not in strategies or best == "equal" or (
      "step_ms" not in best_entry):
    return []
  seeds = len(best_entry["delta_m"]["per_seed"])
  return [
      f"- Cost on this problem: a training step of `{best}` took "
      f"{best_entry['step_ms'] / strategies['equal']['step_ms']:.1f}× "
      f"the step of `equal` ({seeds} seeds at once, validation included;"
      " figure below)."]


# A Δm% this far below the median of the strategies is commented on.
OUTLIER_GAP = 100.0


def _outlier_findings(result: dict) -> list[str]:
  """Strategies whose Δm% is far below the others', and the tasks that
  made it so (a regression task with a negative R², say)."""
  strategies = result["strategies"]
  deltas = {n: strategies[n]["delta_m"]["mean"] for n in strategies
            if "delta_m" in strategies[n]
            and math.isfinite(strategies[n]["delta_m"]["mean"])}
  if len(deltas) < 3:
    return []
  median = float(np.median(list(deltas.values())))
  metric = result["metrics"][0]
  stl = result.get("single_task", {}).get("per_task", {}).get(metric, {})
  sign = 1.0 if result.get("higher_is_better", [True])[0] else -1.0
  outliers = [n for n in sorted(deltas, key=deltas.get)
              if deltas[n] <= median - OUTLIER_GAP]
  lines = []
  for name in outliers[:3]:
    per_task = strategies[name]["per_task"][metric]["mean"]
    reference = stl.get("mean", [float("nan")] * len(per_task))
    changes = sorted(
        (sign * (score - ref) / abs(ref) if ref else float("nan"), task,
         score, ref)
        for task, score, ref in zip(result["tasks"], per_task, reference))
    worst = ", ".join(f"{task} {score:.3g} against {ref:.3g} single-task"
                      for _, task, score, ref in changes[:2])
    lines.append(
        f"- **`{name}` is an outlier** (Δm% {deltas[name]:+.0f}, the median "
        f"strategy {median:+.0f}): its worst tasks are {worst} "
        f"(`{metric}`). A few tasks this far behind decide its Δm%; the "
        "plots clip such values so that the other strategies stay "
        "readable.")
  if len(outliers) > 3:
    lines.append("- Also more than " f"{OUTLIER_GAP:.0f} points of Δm% "
                 "below the median strategy: "
                 + ", ".join(f"`{n}` ({deltas[n]:+.0f})"
                             for n in outliers[3:]) + ".")
  return lines


def main_conclusions(results: dict[str, dict],
                     speed: Optional[dict] = None) -> list[str]:
  """The run's three main conclusions, one sentence each (printed at the
  end of ``python -m benchmarks``): the best strategy per problem, the
  strategies ahead of ``equal`` everywhere, and the cost."""
  best_parts, ahead = [], None
  for name, result in results.items():
    strategies = result.get("strategies") or {}
    if not strategies:
      continue
    if result["problem"] == "toy2d":
      starts = len(next(iter(strategies.values()))["reached"])
      full = [n for n in strategies if sum(strategies[n]["reached"]) == starts]
      best_parts.append(f"toy2d: {len(full)} of {len(strategies)} reach the "
                        f"Pareto set from all {starts} starts")
      continue
    best, ties = ties_with_best(result)
    if best is None:
      continue
    text = f"{name} `{best}` ({strategies[best]['delta_m']['mean']:+.1f}"
    best_parts.append(text + (f", tied with {len(ties)} others)" if ties
                              else ")"))
    if "equal" in strategies:
      base = strategies["equal"]["delta_m"]["mean"]
      better = {n for n in strategies if n != "equal"
                and strategies[n].get("delta_m", {}).get("mean", -np.inf)
                > base}
      ahead = better if ahead is None else ahead & better
  lines = []
  if best_parts:
    lines.append("Best by Δm%: " + "; ".join(best_parts) + ".")
  if ahead is not None:
    lines.append(
        f"{len(ahead)} strategies beat `equal` (mean Δm%) on every problem"
        + (f": {', '.join(sorted(ahead))}." if ahead else "."))
  cost = _cost_conclusion(_speed_models(speed), results)
  if cost:
    lines.append(cost)
  return lines[:3]


def _cost_conclusion(speed: dict[str, dict], results: dict) -> str:
  """One sentence on the step's cost (speed benchmark, else training)."""
  for model, run in speed.items():
    t = str(max(run["num_tasks"]))
    parts = []
    for kind, label in (("losses", "loss-only"), ("gramian", "Gramian")):
      ratios = [by_t[t]["ratio_plain"] for by_t in run["strategies"].values()
                if by_t.get(t, {}).get("kind") == kind]
      if ratios:
        parts.append(f"{label} {_span(min(ratios), max(ratios), unit='×')}")
    if parts:
      return (f"Step ÷ a plain training step ({model}, T = {t}): "
              + ", ".join(parts) + ".")
  for name, result in results.items():  # No speed run: the training steps.
    strategies = result.get("strategies") or {}
    base = strategies.get("equal", {}).get("step_ms")
    if not base:
      continue
    parts = []
    for gramian, label in ((False, "loss-only"), (True, "Gramian")):
      ratios = [e["step_ms"] / base for e in strategies.values()
                if e.get("gramian") == gramian and e.get("step_ms")]
      if ratios:
        parts.append(f"{label} {_span(min(ratios), max(ratios), unit='×')}")
    return (f"Training step ÷ `equal`'s on {name} (T = "
            f"{len(result['tasks'])}): " + ", ".join(parts) + ".")
  return ""


def _toy_findings(result: dict) -> list[str]:
  strategies = result["strategies"]
  reached = {n: sum(strategies[n]["reached"]) for n in strategies}
  starts = len(next(iter(strategies.values()))["reached"])
  everywhere = [n for n in result["ranking"] if reached[n] == starts]
  lines = []
  if everywhere:
    lines.append(f"- {_names(everywhere)} reach the Pareto set from all "
                 f"{starts} starts.")
  worst = min(reached.values())
  lines.append(f"- The fewest starts reaching the Pareto set: {worst} of "
               f"{starts} (" + _names([n for n in result["ranking"]
                                       if reached[n] == worst]) + ").")
  skipping = [n for n in result["ranking"]
              if max(strategies[n].get("skipped_steps", [0])) > 0]
  if skipping:
    lines.append(f"- {_names(skipping)} rejected steps (see the table): a "
                 "loss or the Gramian was non-finite, a loss was not "
                 "positive for a strategy that divides by it, or the weights "
                 "came out non-finite.")
  return lines


def _speed_findings(speed: dict[str, dict]) -> list[str]:
  lines = []
  for model, run in speed.items():
    for kind, label in (("losses", "loss-only"), ("gramian", "Gramian")):
      parts = []
      for t in run["num_tasks"]:
        ratios = [by_t[str(t)]["ratio_plain"]
                  for by_t in run["strategies"].values()
                  if by_t.get(str(t), {}).get("kind") == kind]
        if ratios:
          parts.append(f"T={t}: {_span(min(ratios), max(ratios), unit='×')}")
      if parts:
        plain = ", ".join(
            f"{run['baselines'][str(t)]['plain']['step_ms']:.3g}"
            for t in run["num_tasks"])
        lines.append(
            f"- {model} trunk, {label} strategies, step ÷ a plain training "
            f"step (`jax.value_and_grad` of the summed losses; plain takes "
            f"{plain} ms at T = {', '.join(map(str, run['num_tasks']))}): "
            + "; ".join(parts) + ".")
    for label, by_t in run.get("options", {}).items():
      lines.append(
          f"- {model} trunk, `{label}`: "
          + "; ".join(f"T={t}: {e['ratio_plain']:.2g}× plain, "
                      f"{e['ratio_base']:.2g}× the default step"
                      for t, e in by_t.items()) + ".")
  if lines:
    lines.insert(0, "A Gramian strategy computes one backward pass per task "
                    "(the per-task Jacobian), so its step grows with T; a "
                    "loss-only strategy costs one backward pass.")
    lines.insert(1, "")
  return lines


def findings_markdown(results: dict[str, dict],
                      speed: Optional[dict] = None) -> list[str]:
  """The "What this run says" section, generated from the numbers."""
  lines = ["## What this run says", "",
           "Generated from this run's numbers. Δm% is the mean over tasks "
           "of the relative change against the single-task models "
           "(positive = better); intervals are "
           f"{CONFIDENCE:.0%} t intervals over seeds.", ""]
  for name, result in results.items():
    if not result["strategies"]:
      continue
    lines += [f"**{name}**", ""]
    if result["problem"] == "toy2d":
      lines += _toy_findings(result)
    elif result.get("single_task"):
      lines += _problem_findings(result)
    lines.append("")
  speed_models = _speed_models(speed)
  if speed_models:
    lines += ["**Cost (speed benchmark)**", ""]
    lines += _speed_findings(speed_models) + [""]
  return lines


def coverage_markdown(results: dict[str, dict],
                      speed: Optional[dict] = None) -> list[str]:
  """Which strategies of ``optax_mtl`` this run covers, and why not the
  others (``benchmarks.strategies.NOT_RUN``, and per problem the ones not
  defined at its number of tasks)."""
  run = sorted({name for result in results.values()
                for name in result["strategies"]}
               | {name for model in (speed or {}).values()
                  for name in model["strategies"]})
  lines = ["## Strategies covered", "",
           f"This run: {len(run)} strategies ({', '.join(run)})."]
  for name, why in strategies_lib.NOT_RUN.items():
    lines.append(f"- `{name}` not run: {why}.")
  for problem, result in results.items():
    for name, why in result.get("skipped", {}).items():
      lines.append(f"- `{name}` not run on `{problem}`: {why}.")
  for model, run_ in (speed or {}).items():
    for name, per_t in run_["strategies"].items():
      missing = [str(t) for t in run_["num_tasks"] if str(t) not in per_t]
      if missing:
        lines.append(f"- `{name}` not timed on the {model} trunk at "
                     f"T = {', '.join(missing)}: needs at least "
                     f"{strategies_lib.MIN_TASKS.get(name, 2)} tasks.")
  return lines + [""]


def protocol_markdown(results: dict[str, dict]) -> list[str]:
  """How every model was trained and selected."""
  settings = next((r["protocol"] for r in results.values()
                   if "protocol" in r), None)
  if settings is None:
    return []
  return [
      "## Protocol", "",
      "Every model, single-task and multi-task, is trained and selected the "
      "same way: Adam on minibatches (the same initialisation and minibatch "
      "order per seed for every model); the last "
      f"{settings['validation_fraction']:.0%} of the training rows are held "
      "out for validation; every 1 % of the step budget the validation "
      "criterion is computed (the mean over the model's tasks of the "
      "validation loss ÷ its value at initialisation; a single-task model "
      "reads its own task only); the checkpoint with the best criterion is "
      f"kept, and training stops after {settings['patience']} evaluations "
      f"without an improvement of more than {settings['min_delta']:.1%} or "
      "at the step budget. The selected checkpoints are scored on the test "
      "set. A single-task model has the multi-task architecture (its other "
      "heads unused), so T single-task models have T times the parameters "
      "of one multi-task model. Seeds vary the initialisation and the "
      "minibatch order; the data sets are fixed.", ""]


# --------------------------------------------------------------------------
# Plots.


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def strategy_colors(names: list[str]) -> dict[str, tuple]:
  """One distinct colour per strategy (tab20, tab20b, tab20c: 60 colours),
  the same strategy in the same colour in every plot of a report."""
  plt = _plt()
  palette = [c for cmap in ("tab20", "tab20b", "tab20c")
             for c in plt.get_cmap(cmap).colors]
  # tab20 pairs a dark and a light shade: take the dark ones first.
  palette = palette[0::2] + palette[1::2]
  return {name: palette[k % len(palette)] for k, name in enumerate(names)}


def _suptitle(fig, text: str, fontsize: float = 10) -> None:
  """A figure title wrapped to the figure's width (never cut at the
  edges)."""
  import textwrap  # pylint: disable=import-outside-toplevel
  width_chars = max(30, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
  fig.suptitle("\n".join(textwrap.wrap(text, width_chars)),
               fontsize=fontsize)


def _save(fig, path: str, title: Optional[str] = None,
          rect: Optional[tuple[float, ...]] = None, dpi: int = 100) -> None:
  """Titles (``_suptitle``), lays out within ``rect``, writes and closes."""
  if title is not None:
    _suptitle(fig, title)
  fig.tight_layout(rect=rect)
  fig.savefig(path, dpi=dpi)
  _plt().close(fig)


def _robust_limits(values, keep: float = 3.0) -> tuple[float, float, bool]:
  """``(low, high, clipped)``: the range of ``values`` without the points
  that lie more than ``keep`` interquartile ranges beyond the quartiles
  (an outlier would squeeze every other point into a corner)."""
  values = np.asarray(values, float)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return 0.0, 1.0, False
  q1, q3 = np.percentile(values, [25, 75])
  span = max(q3 - q1, 1e-3 * max(abs(q1), abs(q3), 1e-12))
  inside = values[(values >= q1 - keep * span) & (values <= q3 + keep * span)]
  low, high = float(inside.min()), float(inside.max())
  return low, high, bool(inside.size < values.size)


def _plain_log_ticks(axis, symlog: bool = False) -> None:
  """Ticks of a log axis at 1, 2, 5 × 10^k as plain numbers (0.5, 2, 40),
  not 5×10⁻¹; minor ticks unlabelled."""
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  if symlog:
    axis.set_major_locator(ticker.SymmetricalLogLocator(
        base=10, linthresh=10.0, subs=(1.0, 3.0)))
  else:
    axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
  axis.set_minor_formatter(ticker.NullFormatter())


def _label_points(ax, points: list[tuple[str, float, float]]) -> None:
  """Labels points without overlaps: each label takes the first of a few
  positions around its point whose box is free (in pixels)."""
  ax.figure.canvas.draw()
  transform = ax.transData
  taken: list[tuple[float, float, float, float]] = []
  offsets = [(5, 3), (5, -9), (-5, 3), (-5, -9)] + [
      (dx, dy) for distance in (14, 24, 34, 44)
      for dx, dy in ((8, distance), (8, -distance - 6), (-8, distance),
                     (-8, -distance - 6), (distance + 8, -3),
                     (-distance - 8, -3))]
  char_width, height = 4.6, 9.0  # pixels, fontsize 7 at 100 dpi
  frame = ax.get_window_extent()
  for name, x, y in sorted(points, key=lambda p: -p[2]):
    px, py = transform.transform((x, y))
    width = char_width * len(name)
    # Near the right edge, the label goes left of its point.
    chosen = offsets[0] if px + 5 + width < frame.x1 else offsets[2]
    for dx, dy in offsets:
      left = px + dx if dx > 0 else px + dx - width
      box = (left, py + dy, left + width, py + dy + height)
      inside = frame.x0 <= box[0] and box[2] <= frame.x1
      if inside and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3]
                            and b[1] < box[3] for b in taken):
        chosen = (dx, dy)
        taken.append(box)
        break
    else:
      left = px + chosen[0]
      taken.append((left, py + chosen[1], left + width,
                    py + chosen[1] + height))
    far = abs(chosen[0]) > 10 or abs(chosen[1]) > 12
    ax.annotate(name, (x, y), xytext=chosen, textcoords="offset pixels",
                fontsize=7, ha="left" if chosen[0] > 0 else "right",
                va="bottom",
                arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5",
                                shrinkA=0, shrinkB=2) if far else None)


def plot_cost_quality(result: dict, path: str) -> None:
  """Δm% (with its interval) against the step time, one point a strategy."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(8.5, 5.2))
  names = [n for n in result["ranking"]
           if "delta_m" in result["strategies"][n]]
  points = []
  for name in names:
    entry = result["strategies"][name]
    mean, low, high = confidence_interval(entry["delta_m"]["per_seed"])
    if not math.isfinite(mean):
      continue
    points.append((name, entry["step_ms"], mean, low, high,
                   entry.get("gramian", False)))
  for gramian, marker, color, label in (
      (False, "o", "tab:blue", "loss weighting (one backward pass)"),
      (True, "s", "tab:orange", "gradient balancing (reads the Gramian)")):
    chosen = [p for p in points if p[5] == gramian]
    if not chosen:
      continue
    x = np.array([p[1] for p in chosen])
    y = np.array([p[2] for p in chosen])
    err = np.array([[p[2] - p[3] for p in chosen],
                    [p[4] - p[2] for p in chosen]])
    ax.errorbar(x, y, yerr=err, fmt=marker, color=color, ms=5, capsize=2,
                lw=0.8, label=label)
  means = np.array([p[2] for p in points] + [0.0])
  spread = float(np.max(np.abs(means))) if points else 1.0
  if spread > 50:  # Wide spread: linear within ±10, logarithmic beyond.
    ax.set_yscale("symlog", linthresh=10.0)
    _plain_log_ticks(ax.yaxis, symlog=True)
  low, high = float(means.min()), float(means.max())
  pad = 0.08 * (high - low or 1.0)
  if spread > 50:
    ax.set_ylim(low * 1.6 - 5 if low < 0 else low - 5,
                high * 1.6 + 5 if high > 0 else high + 5)
  else:
    ax.set_ylim(low - pad, high + pad)
  ax.axhline(0.0, color="black", lw=0.8, ls="--",
             label="single-task models (Δm% = 0)")
  times = np.array([p[1] for p in points] or [1.0])
  if times.max() / times.min() > 3:
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    if times.max() / times.min() < 20:  # Label the 1, 2, … 9 × 10^k ticks.
      from matplotlib import ticker  # pylint: disable=import-outside-toplevel
      ax.xaxis.set_major_locator(ticker.LogLocator(subs=range(1, 10)))
    ax.set_xlim(times.min() / 1.15, times.max() * 1.15)
    scale_text = "log scale"
  else:
    ax.set_xlim(times.min() - 0.08 * (times.max() - times.min() + 1e-3),
                times.max() + 0.08 * (times.max() - times.min() + 1e-3))
    scale_text = "linear scale"
  ax.set_xlabel("training step time on this problem (ms, all seeds at once, "
                f"{scale_text})")
  ax.set_ylabel("Δm% against single-task (higher is better"
                + ("; symlog scale)" if spread > 50 else ")"))
  ax.set_title(f"{result['problem']}: quality against cost "
               f"(bars: {CONFIDENCE:.0%} interval over seeds)", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13),
            ncol=3, frameon=False)
  fig.tight_layout()
  _label_points(ax, [(p[0], p[1], p[2]) for p in points])
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_outcomes(result: dict, path: str, top: int = 3) -> None:
  """Per-task scores against the single-task models.

  Left: each task's multi-task score against its single-task score for
  ``equal`` and the ``top`` strategies (above the diagonal = better when
  higher is better). Right: the relative change of every strategy on every
  task (a heatmap, strategies best first).
  """
  plt = _plt()
  fig, (ax_scatter, ax_heat) = plt.subplots(
      1, 2, figsize=(13, max(4.5, 0.28 * len(result["ranking"]) + 2.2)),
      gridspec_kw={"width_ratios": [1, 1.3]})
  _outcome_scatter(ax_scatter, result, top)
  _outcome_heatmap(fig, ax_heat, result)
  _save(fig, path, f"{result['problem']}: per-task outcomes against the "
        "single-task models (mean over seeds)")


def _mean_scores(result: dict, name: str) -> np.ndarray:
  """A strategy's mean test score per task (the first metric)."""
  entry = result["strategies"][name]["per_task"][result["metrics"][0]]
  return np.asarray(entry["mean"], float)


def _single_task_scores(result: dict) -> np.ndarray:
  """The single-task models' mean test score per task (the first metric)."""
  return np.asarray(
      result["single_task"]["per_task"][result["metrics"][0]]["mean"], float)


def _outcome_scatter(ax, result: dict, top: int) -> None:
  """Each task's multi-task score against its single-task score."""
  metric = result["metrics"][0]
  higher = result["higher_is_better"][0]
  names = result["ranking"]
  stl = _single_task_scores(result)
  shown = names[:top] + (["equal"] if "equal" in names[top:] else [])
  markers = "osD^v<>"
  colors = strategy_colors(names)
  values = np.concatenate([stl] + [_mean_scores(result, n) for n in shown])
  low, high, clipped = _robust_limits(values)
  pad = 0.05 * (high - low or 1.0)
  low, high = low - pad, high + pad
  for index, name in enumerate(shown):
    scores = _mean_scores(result, name)
    # Points off the axes are drawn at its edge; the legend gives values.
    outside = [f"{y:.3g}" for y in scores
               if np.isfinite(y) and not low <= y <= high]
    ax.plot(stl, np.clip(scores, low, high),
            markers[index % len(markers)], ms=5, alpha=0.8,
            color=colors[name],
            label=name + (f" (at the edge: {', '.join(outside)})"
                          if outside else ""))
  ax.plot([low, high], [low, high], "k--", lw=0.8,
          label="equal to single-task")
  ax.set_xlim(low, high)
  ax.set_ylim(low, high)
  ax.set_xlabel(f"single-task model's test {metric}")
  ax.set_ylabel(f"multi-task model's test {metric}"
                + (" (clipped: outliers at the edge)" if clipped else ""))
  ax.set_title(
      f"one point per task ({'above' if higher else 'below'} the diagonal "
      "= better than single-task)", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12),
            ncol=2, frameon=False)


def _outcome_heatmap(fig, ax, result: dict) -> None:
  """The relative change of every strategy on every task, in %."""
  metric = result["metrics"][0]
  sign = 1.0 if result["higher_is_better"][0] else -1.0
  tasks = result["tasks"]
  names = result["ranking"]
  stl = _single_task_scores(result)
  relative = np.array([sign * (_mean_scores(result, n) - stl)
                       / np.abs(stl) * 100.0 for n in names])
  limit = np.nanpercentile(np.abs(relative), 95) if np.isfinite(
      relative).any() else 1.0
  limit = max(float(limit), 1e-3)
  from matplotlib import colors  # pylint: disable=import-outside-toplevel
  norm = colors.SymLogNorm(linthresh=max(limit / 20.0, 0.5), vmin=-limit,
                           vmax=limit)
  image = ax.imshow(np.clip(relative, -limit, limit), cmap="RdBu",
                    norm=norm, aspect="auto", interpolation="nearest")
  ax.set_yticks(range(len(names)), names, fontsize=7)
  if len(tasks) <= 12:
    ax.set_xticks(range(len(tasks)), tasks, fontsize=7, rotation=30,
                  ha="right")
    for row in range(len(names)):
      for col in range(len(tasks)):
        value = relative[row, col]
        if np.isfinite(value):
          dark = abs(float(norm(np.clip(value, -limit, limit))) - 0.5) > 0.3
          ax.text(col, row, f"{value:+.0f}", ha="center", va="center",
                  fontsize=6, color="white" if dark else "black")
  else:
    ax.set_xticks(range(0, len(tasks), max(1, len(tasks) // 8)))
  ax.set_xlabel("task" if len(tasks) <= 12 else "task index")
  ax.set_ylabel("strategy (best Δm% first)")
  ax.set_title(f"relative change of {metric} against single-task (%)",
               fontsize=9)
  colorbar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02,
                          format="%g")
  colorbar.set_label("% (blue: better than single-task, red: worse; "
                     f"symlog scale, clipped at ±{limit:.0f})", fontsize=7)


def plot_weights(result: dict, path: str) -> None:
  """One panel per strategy: the task weights over training (secondary).

  With more than 10 tasks a panel shows the median and the range over the
  tasks instead of one line per task. All panels share one y scale:
  symlog (linear near 0, logarithmic beyond) when the weights span more
  than a factor 100.
  """
  plt = _plt()
  names = result["ranking"]
  cols = min(4, max(1, len(names)))
  rows = max(1, math.ceil(len(names) / cols))
  fig, axes = plt.subplots(rows, cols,
                           figsize=(max(7.0, 3.3 * cols), 2.5 * rows + 0.6),
                           squeeze=False, sharex=True)
  steps = np.asarray(result["curve_steps"])
  tasks = result["tasks"]
  many = len(tasks) > 10
  curves = {n: np.asarray(result["strategies"][n]["weights"], float)
            for n in names}
  magnitudes = np.concatenate([np.abs(c[np.isfinite(c)]).ravel()
                               for c in curves.values()] + [np.ones(1)])
  positive = magnitudes[magnitudes > 0]
  lowest = min([float(np.min(c[np.isfinite(c)])) for c in curves.values()
                if np.isfinite(c).any()] + [0.0])
  # One scale for every panel: symlog (linear near 0, log beyond) when the
  # weights span more than a factor 100.
  symlog = positive.max() / positive.min() > 100
  linthresh = float(max(np.percentile(positive, 5), 1e-6))
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  for ax, name in zip(axes.flat, names):
    weights = curves[name]
    if weights.ndim != 2 or weights.shape[0] == 0:
      ax.set_axis_off()
      continue
    x = steps[:weights.shape[0]]
    if many:
      # krum and trimmed_mean have no weights (all NaN): an empty panel.
      with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ax.fill_between(x, np.nanmin(weights, 1), np.nanmax(weights, 1),
                        color="tab:blue", alpha=0.25, lw=0,
                        label="range over tasks")
        ax.plot(x, np.nanmedian(weights, 1), color="tab:blue", lw=1.2,
                label="median over tasks")
    else:
      for task in range(weights.shape[1]):
        ax.plot(x, weights[:, task], lw=1.2, label=tasks[task])
    ax.set_title(name, fontsize=9)
    ax.tick_params(labelsize=7)
    if symlog:
      ax.set_yscale("symlog", linthresh=linthresh)
      ax.yaxis.set_major_locator(ticker.SymmetricalLogLocator(
          base=10, linthresh=linthresh))
      ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
      ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    # The same y range in every panel, so that panels compare at a glance
    # and every panel has its tick labels.
    grow = 1.5 if symlog else 1.05
    ax.set_ylim(min(lowest * grow, 0.0), float(magnitudes.max()) * grow)
  ylabel = "task weight" + (" (symlog)" if symlog else "")
  for ax in axes[:, 0]:
    ax.set_ylabel(ylabel, fontsize=8)
  used = len(names)
  for index, ax in enumerate(axes.flat):
    if index >= used:
      ax.set_axis_off()
    elif index + cols >= used:  # the lowest panel of its column
      ax.set_xlabel("training step", fontsize=8)
      ax.xaxis.set_tick_params(labelbottom=True)
  handles, labels = axes.flat[0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8),
               fontsize=7, frameon=False)
  _save(fig, path, f"{result['problem']}: task weights over training (mean "
        "over seeds; each point a mean over an evaluation interval)",
        rect=(0, 0.04, 1, 0.94), dpi=90)


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
  for ax in axes[:, 0]:
    ax.set_ylabel("x2", fontsize=8)
  for ax in axes[-1, :]:
    ax.set_xlabel("x1", fontsize=8)
  for ax in list(axes.flat)[len(names):]:
    ax.set_axis_off()
  _save(fig, path, "toy2d: trajectories over contours of f1+f2 (grey dots: "
        "Pareto set; black dot: start; green *: reached, red x: not)",
        rect=(0, 0, 1, 0.95), dpi=90)


def plot_speed(speed: dict, path: str) -> None:
  """Per model: absolute step time, step ÷ plain, and memory against T."""
  plt = _plt()
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  models = _speed_models(speed)
  if all(len(run["num_tasks"]) == 1 for run in models.values()):
    _plot_speed_bars(models, path)
    return
  fig, axes = plt.subplots(len(models), 3, figsize=(15, 4.2 * len(models)),
                           squeeze=False)
  colors = strategy_colors(sorted({name for run in models.values()
                                   for name in run["strategies"]}))
  handles = {}
  for row, (model, run) in enumerate(models.items()):
    ax_time, ax_ratio, ax_mem = axes[row]
    ts = run["num_tasks"]
    for key, style, label in (("plain", "k-", "plain training step"),
                              ("jacobian", "k:", "Jacobian-only step")):
      line, = ax_time.plot(
          ts, [run["baselines"][str(t)][key]["step_ms"] for t in ts], style,
          lw=2, label=label)
      handles[label] = line
      ax_mem.plot(ts, [(run["baselines"][str(t)][key]["memory_bytes"] or 0)
                       / 2**20 for t in ts], style, lw=2)
    for name, per_t in run["strategies"].items():
      entries = [per_t.get(str(t), {}) for t in ts]
      gramian = any(e.get("kind") == "gramian" for e in entries)
      style = dict(color=colors[name], lw=1.0, ms=3,
                   marker="s" if gramian else "o",
                   ls="-" if gramian else "--")
      # NaN (no point) where the strategy is not defined (krum at T = 2).
      line, = ax_time.plot(ts, [e.get("step_ms", np.nan) for e in entries],
                           **style, label=name)
      handles.setdefault(name, line)
      ax_ratio.plot(ts, [e.get("ratio_plain", np.nan) for e in entries],
                    **style)
      ax_mem.plot(ts, [e["memory_bytes"] / 2**20 if e.get("memory_bytes")
                       else np.nan for e in entries], **style)
    for label, per_t in run.get("options", {}).items():
      if "low_memory" in label:
        line, = ax_mem.plot(ts, [(per_t[str(t)]["memory_bytes"] or 0) / 2**20
                                 for t in ts], "k-.", lw=1.5, label=label)
        handles[label] = line
    ax_ratio.axhline(1.0, color="black", lw=1.5)
    for ax, ylabel in ((ax_time, "step time (ms, log)"),
                       (ax_ratio, "step time / plain step time (log)"),
                       (ax_mem, "peak memory (MiB, log)")):
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.xaxis.set_major_locator(ticker.FixedLocator(ts))
      ax.xaxis.set_major_formatter(ticker.FixedFormatter([str(t) for t in ts]))
      ax.xaxis.set_minor_locator(ticker.NullLocator())
      _plain_log_ticks(ax.yaxis)
      ax.set_xlabel("number of tasks T")
      ax.set_ylabel(ylabel, fontsize=8)
      ax.grid(alpha=0.3, which="both")
    config = run["config"]
    ax_time.set_title(f"{model} trunk (minibatch {config['batch_size']}): "
                      "absolute step time", fontsize=9)
    ax_ratio.set_title(f"{model} trunk: cost against plain training",
                       fontsize=9)
    ax_mem.set_title(f"{model} trunk: memory", fontsize=9)
  fig.tight_layout(rect=(0, 0, 0.8, 1))
  fig.legend(list(handles.values()), list(handles), loc="center left",
             bbox_to_anchor=(0.81, 0.5), fontsize=7, frameon=False,
             title="solid/squares: Gramian\ndashed/circles: loss-only",
             title_fontsize=7)
  fig.savefig(path, dpi=90)
  plt.close(fig)


def _plot_speed_bars(models: dict[str, dict], path: str) -> None:
  """Speed runs at one T: per model, every strategy's step ÷ a plain
  training step as a horizontal bar, cheapest first, named on its row."""
  plt = _plt()
  rows = max(len(run["strategies"]) for run in models.values())
  fig, axes = plt.subplots(1, len(models), squeeze=False,
                           figsize=(7.5 * len(models), 0.22 * rows + 1.6))
  for ax, (model, run) in zip(axes[0], models.items()):
    t = str(run["num_tasks"][0])
    entries = {n: e[t] for n, e in run["strategies"].items() if t in e}
    names = sorted(entries, key=lambda n: entries[n]["ratio_plain"])
    ratios = [entries[n]["ratio_plain"] for n in names]
    colors = ["tab:orange" if entries[n]["kind"] == "gramian"
              else "tab:blue" for n in names]
    ax.barh(range(len(names)), ratios, color=colors, height=0.7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_ylim(-0.6, len(names) - 0.4)
    for row, ratio in enumerate(ratios):
      ax.text(ratio * 1.03, row, f"{ratio:.2g}×", va="center", fontsize=6)
    ax.axvline(1.0, color="black", lw=1.0)
    ax.set_xscale("log")
    _plain_log_ticks(ax.xaxis)
    ax.set_xlim(min(min(ratios), 1.0) / 1.3, max(ratios) * 1.6)
    ax.set_xlabel("step time ÷ plain training step (log scale; black line: "
                  "plain)", fontsize=8)
    plain = run["baselines"][t]["plain"]["step_ms"]
    ax.set_title(f"{model} trunk, T = {t} (plain step {plain:.3g} ms); "
                 "blue: loss-only, orange: reads the per-task gradients",
                 fontsize=8)
    ax.grid(alpha=0.3, axis="x", which="both")
  _save(fig, path)


# --------------------------------------------------------------------------
# Markdown.


def _problem_markdown(result: dict, images: dict[str, str]) -> list[str]:
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
    if "trajectories" in images:
      lines += ["", f"![toy2d trajectories]({images['trajectories']})", ""]
    return lines
  tasks, metric = result["tasks"], result["metrics"][0]
  direction = "higher" if result["higher_is_better"][0] else "lower"
  stl = result.get("single_task")
  lines += [f"Primary metric: `{metric}` ({direction} is better); Δm% is "
            "the mean relative change against the single-task models "
            "(positive = better), shown as mean ± std and as a "
            f"{CONFIDENCE:.0%} interval over seeds {result['seeds']}; "
            "negative transfer counts the tasks worse than single-task by "
            "more than 2 standard errors over seeds; *stopped at* is the "
            "median over seeds of the selected checkpoint's step (budget "
            f"{result['num_steps']}); step ms is one training step of all "
            "seeds at once on this machine.", ""]
  if "cost" in images:
    lines += [f"![{result['problem']} quality against cost]"
              f"({images['cost']})", ""]
  lines += ["| rank | strategy | Δm% | Δm% interval | mean score | neg. "
            "transfer | skipped steps | stopped at | step ms |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
  for i, name in enumerate(result["ranking"], 1):
    entry = strategies[name]
    skipped = int(np.max(entry.get("skipped_steps", [0]) or [0]))
    _, low, high = confidence_interval(entry["delta_m"]["per_seed"]) if (
        "delta_m" in entry) else (0, float("nan"), float("nan"))
    stopped = np.median(entry["selection"]["best_step"])
    lines.append(
        f"| {i} | {name}{' (G)' if entry.get('gramian') else ''} | "
        f"{_fixed(entry.get('delta_m'))} | {low:+.1f} to {high:+.1f} | "
        f"{_pm(entry['mean_score'], 4)} | "
        f"{entry.get('negative_transfer', '–')}/{len(tasks)} | {skipped} | "
        f"{stopped:.0f} | {_ms(entry.get('step_ms'))} |")
  if stl:
    stopped = np.median(stl["selection"]["best_step"])
    lines.append(f"| – | single-task | 0 | – | {_pm(stl['mean_score'], 4)} "
                 f"| – | – | {stopped:.0f} | – |")
  lines += ["", "(G): reads the Gramian of the task gradients.", ""]
  if "outcomes" in images:
    lines += [f"![{result['problem']} per-task outcomes]"
              f"({images['outcomes']})", ""]
  if len(tasks) <= 12:
    header = "| strategy | " + " | ".join(tasks) + " |"
    lines += [f"Per-task `{metric}` (mean ± std over seeds; single-task: "
              "selected step, median over seeds, in brackets):", "", header,
              "|---|" + "---:|" * len(tasks)]
    rows = ([("single-task", stl)] if stl else []) + [
        (name, strategies[name]) for name in result["ranking"]]
    for name, entry in rows:
      per_task = entry["per_task"][metric]
      cells = [f"{m:.4g} ± {s:.1g}" for m, s in zip(per_task["mean"],
                                                    per_task["std"])]
      if name == "single-task":
        steps = np.median(np.asarray(entry["selection"]["best_step"]), 1)
        cells = [f"{c} [{s:.0f}]" for c, s in zip(cells, steps)]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
  if "weights" in images:
    lines += ["The weights each strategy applied (secondary: what the "
              "strategies did, not how well it worked):", "",
              f"![{result['problem']} task weights]({images['weights']})",
              ""]
  return lines


def _speed_markdown(speed: dict[str, dict], image: Optional[str]) -> list[str]:
  lines = ["## Speed and memory", "",
           "Step time of `optax_mtl.value_and_grad(loss_fn, strategy)` plus "
           "an SGD update, each step one call of its jitted training step, "
           "as a user's loop runs it: consecutive steps of a training "
           "trajectory, timed over whole `recompute_every` cycles of 10 "
           "steps in interleaved rounds; **ms** is the mean over the "
           "cycle's 10 positions of each position's fastest step "
           "(amortised). **÷ plain** divides by a plain training "
           "step, `jax.value_and_grad` of the summed losses, timed in the "
           "same rounds; **÷ ref** divides loss-only strategies by `equal` "
           "and Gramian strategies by the Jacobian-only step (`vmap` of "
           "the VJP over the tasks, summed), the least any Gramian strategy "
           "computes. Memory: the compiled `memory_analysis()` temp + "
           "argument + output, MiB.", ""]
  for model, run in speed.items():
    ts = run["num_tasks"]
    config = run["config"]
    shape = (f"{config['depth']}×{config['hidden']} MLP"
             if config["model"] == "mlp" else
             f"conv {config['side']}×{config['side']}×1 → "
             f"{' → '.join(str(c) for c in config['channels'])} channels "
             f"(3×3, stride 2) → dense {config['hidden']}")
    lines += [f"### {model} trunk ({shape}, minibatch "
              f"{config['batch_size']})", ""]
    base = {t: run["baselines"][str(t)] for t in ts}
    lines += ["Baselines (ms per step): " + "; ".join(
        f"T={t}: plain {_ms(b['plain']['step_ms'])}, equal "
        f"{_ms(b['equal']['step_ms'])}, Jacobian-only "
        f"{_ms(b['jacobian']['step_ms'])} "
        f"({b['jacobian']['step_ms'] / b['plain']['step_ms']:.1f}× plain)"
        for t, b in base.items())
        + ". Noise floor (plain ÷ plain compiled again): "
        + ", ".join(f"{b['noise']:.3f}" for b in base.values()) + ".", ""]
    header = ("| strategy | kind | "
              + " | ".join(f"ms T={t}" for t in ts) + " | "
              + " | ".join(f"÷plain T={t}" for t in ts) + " | "
              + " | ".join(f"÷ref T={t}" for t in ts) + " | "
              + " | ".join(f"MiB T={t}" for t in ts) + " |")
    lines += [header, "|---|---|" + "---:|" * (4 * len(ts))]
    for name, per_t in run["strategies"].items():
      entries = [per_t.get(str(t), {}) for t in ts]
      kind = next((e["kind"] for e in entries if e), "?")
      cells = [_ms(e.get("step_ms")) for e in entries]
      cells += [_ratio(e.get("ratio_plain")) for e in entries]
      cells += [_ratio(e.get("ratio_jacobian", e.get("ratio_equal")))
                for e in entries]
      cells += [_mib(e.get("memory_bytes")) for e in entries]
      lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    if run.get("options"):
      lines += ["", "Engine options on one Gramian strategy (÷ default: ÷ "
                "the same strategy's default step; slowest: the slowest "
                "position's fastest step ÷ the plain step — "
                "`recompute_every`'s recomputing step):", "",
                "| option | " + " | ".join(f"ms T={t}" for t in ts) + " | "
                + " | ".join(f"÷plain T={t}" for t in ts) + " | "
                + " | ".join(f"÷default T={t}" for t in ts) + " | "
                + " | ".join(f"slowest ÷plain T={t}" for t in ts) + " | "
                + " | ".join(f"MiB T={t}" for t in ts) + " |",
                "|---|" + "---:|" * (5 * len(ts))]
      for label, per_t in run["options"].items():
        entries = [per_t.get(str(t), {}) for t in ts]
        cells = [_ms(e.get("step_ms")) for e in entries]
        cells += [_ratio(e.get("ratio_plain")) for e in entries]
        cells += [_ratio(e.get("ratio_base")) for e in entries]
        cells += [_ratio(e.get("slowest_ratio_plain")) for e in entries]
        cells += [_mib(e.get("memory_bytes")) for e in entries]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    lines.append("")
  if image:
    lines += [f"![speed]({image})", ""]
  return lines


def write_report(results: dict[str, dict], out_dir: str,
                 speed: Optional[dict] = None,
                 meta: Optional[dict] = None) -> dict[str, Any]:
  """Writes ``results.json``, ``report.md`` and PNGs into ``out_dir``.

  Args:
    results: problem name -> :func:`benchmarks.run_problem` result.
    out_dir: the folder (created if missing).
    speed: ``{model: run_speed result}`` (:func:`benchmarks.speed.
      run_speed_models`) or one :func:`benchmarks.run_speed` result.
    meta: command, machine, wall time (free-form, shown at the top).

  Returns:
    ``{"json": path, "markdown": path, "plots": [paths]}``.
  """
  os.makedirs(out_dir, exist_ok=True)
  meta = dict(meta or {})
  speed_models = _speed_models(speed)
  json_path = os.path.join(out_dir, "results.json")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump({"meta": meta, "problems": results,
               "speed": speed_models or None}, f, default=_json_default)
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
  lines += findings_markdown(results, speed_models)
  lines += claims.claims_markdown(results)
  lines += coverage_markdown(results, speed_models)
  lines += protocol_markdown(results)
  lines += ["## Ranking summary", "",
            "| problem | best → worst (by Δm%, toy2d by Pareto reached) |",
            "|---|---|"]
  for name, result in results.items():
    lines.append(f"| {name} | {', '.join(result['ranking'])} |")
  lines.append("")
  for name, result in results.items():
    images: dict[str, str] = {}
    if result["strategies"]:
      if result["problem"] == "toy2d":
        makers = {"trajectories": plot_toy}
      else:
        makers = {"weights": plot_weights}
        if result.get("single_task"):
          makers.update(cost=plot_cost_quality, outcomes=plot_outcomes)
      for kind, maker in makers.items():
        images[kind] = f"{name}_{kind}.png"
        maker(result, os.path.join(out_dir, images[kind]))
        plots.append(os.path.join(out_dir, images[kind]))
    lines += _problem_markdown(result, images)
  if speed_models:
    image = "speed.png"
    plot_speed(speed_models, os.path.join(out_dir, image))
    plots.append(os.path.join(out_dir, image))
    lines += _speed_markdown(speed_models, image)
  md_path = os.path.join(out_dir, "report.md")
  with open(md_path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return {"json": json_path, "markdown": md_path, "plots": plots}


def merge(paths: list[str]) -> tuple[dict, dict, dict]:
  """``(problems, speed, meta)`` merged from several ``results.json``.

  Lets a suite run in parts (e.g. ``--no-speed`` and ``--speed-only``, or
  one problem at a time) and be reported as one; wall times add up.
  """
  problems, speed, meta = {}, {}, {}
  for path in paths:
    with open(path, encoding="utf-8") as f:
      loaded = json.load(f)
    problems.update(loaded.get("problems") or {})
    speed.update(_speed_models(loaded.get("speed")))
    part = dict(loaded.get("meta") or {})
    if meta:
      meta["command"] += "; " + part.get("command", "")
      meta["wall_seconds"] = (meta.get("wall_seconds", 0.0)
                              + part.get("wall_seconds", 0.0))
    else:
      meta = part
  return problems, speed, meta

