"""The methods' papers' claims that the suite can test, and what a run found.

Each claim compares two strategies on the problems with single-task
baselines. Seeds share the initialisation and the minibatches across
strategies, so every comparison is paired over seeds: the figure is the
mean over seeds of a per-seed difference, with a 95 % t interval
(``report.confidence_interval``). A claim is *supported* on a problem when
the interval lies on the side the paper claims, *contradicted* when it lies
on the other side, and *not separated* when it contains 0 (for the claims of
the form "comparable or better", not separated counts as consistent).

Two measures:

* ``delta_m``: Δm% (the mean over tasks of the relative change against the
  single-task models, positive = better), per seed;
* ``negative_tasks``: per seed, the number of tasks whose primary metric is
  worse than the single-task model's of the same seed (fewer = better).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np


class Claim(NamedTuple):
  """One comparison: ``strategy`` against each of ``others``."""
  source: str  # The paper and what it claims.
  strategy: str
  others: tuple[str, ...]
  measure: str  # "delta_m" or "negative_tasks".
  problems: Optional[tuple[str, ...]]  # None: every problem with baselines.
  comparable: bool  # The claim is "comparable or better", not "better".


CLAIMS = (
    Claim("Lakkapragada et al. (2022): EMA loss weighting (β = 0.2) performs "
          "comparably to, if not better than, uncertainty weighting, DWA and "
          "GradNorm", "loss_ema", ("uncertainty", "dwa", "gradnorm"), "delta_m",
          None, True),
    Claim("Liu et al. (2019): loss-balanced task weighting (α = 0.5) has "
          "fewer tasks with negative transfer than the plain sum, on many "
          "tasks", "lbtw", ("equal",), "negative_tasks", ("manytask",),
          False),
    Claim("Liu et al. (2023): FAMO performs comparably to Nash-MTL at the "
          "cost of one backward pass", "famo", ("nash_mtl", "equal"),
          "delta_m", None, True),
    Claim("Lin et al. (2024): STCH (smooth Tchebycheff) is better than "
          "linear scalarisation (the plain sum) and comparable to Nash-MTL",
          "stch", ("equal", "nash_mtl"), "delta_m", None, True),
    Claim("Liu et al. (2021): IMTL-L (learned loss scales) is better than "
          "equal weighting", "imtl_l", ("equal",), "delta_m", None, False),
)


def negative_tasks_per_seed(result: dict, name: str) -> np.ndarray:
  """``[seeds]``: tasks worse than the same seed's single-task model (on the
  problem's primary metric)."""
  metric = result["metrics"][0]
  higher = result["higher_is_better"][0]
  mtl = np.asarray(
      result["strategies"][name]["per_task"][metric]["per_seed"], float)
  stl = np.asarray(result["single_task"]["per_task"][metric]["per_seed"],
                   float)
  worse = mtl < stl if higher else mtl > stl
  return np.sum(worse, axis=-1).astype(float)


def _per_seed(result: dict, name: str, measure: str) -> np.ndarray:
  if measure == "negative_tasks":
    return negative_tasks_per_seed(result, name)
  return np.asarray(result["strategies"][name]["delta_m"]["per_seed"], float)


def compare(result: dict, claim: Claim, other: str) -> Optional[dict]:
  """The paired comparison of ``claim.strategy`` with ``other`` on one
  problem's result, or None when either is missing.

  Returns ``{"mean", "low", "high", "verdict", "seeds", "values"}``, where
  mean/low/high are of the per-seed difference oriented so that positive
  means ``claim.strategy`` is better, and ``values`` the two strategies'
  means of the measure.
  """
  # pylint: disable=import-outside-toplevel
  from benchmarks import report
  strategies = result.get("strategies", {})
  if (claim.strategy not in strategies or other not in strategies
      or not result.get("single_task")):
    return None
  mine = _per_seed(result, claim.strategy, claim.measure)
  theirs = _per_seed(result, other, claim.measure)
  sign = -1.0 if claim.measure == "negative_tasks" else 1.0
  mean, low, high = report.confidence_interval(sign * (mine - theirs))
  if len(mine) < 2 or not np.isfinite(low):
    verdict = "one seed: no interval"
  elif low > 0:
    verdict = "supported"
  elif high < 0:
    verdict = "contradicted"
  else:
    verdict = ("consistent (not separated)" if claim.comparable
               else "not separated")
  return {"mean": mean, "low": low, "high": high, "verdict": verdict,
          "seeds": len(mine),
          "values": (float(np.nanmean(mine)), float(np.nanmean(theirs)))}


def claims_markdown(results: dict[str, dict]) -> list[str]:
  """The "claims, side by side" section of the report."""
  lines = ["## The papers' claims, side by side", "",
           "Each row compares two strategies on one problem, paired over "
           "seeds: the mean per-seed difference (positive = the first "
           "strategy better: higher Δm%, or fewer tasks worse than the same "
           "seed's single-task model) and its 95% interval. *Supported*: "
           "the interval lies on the claimed side; *contradicted*: on the "
           "other side; otherwise not separated by these seeds. These are "
           "small problems on a CPU budget, not the papers' benchmarks.", ""]
  for claim in CLAIMS:
    rows = []
    for problem, result in results.items():
      if claim.problems is not None and problem not in claim.problems:
        continue
      for other in claim.others:
        found = compare(result, claim, other)
        if found is None:
          continue
        unit = " tasks" if claim.measure == "negative_tasks" else ""
        rows.append(
            f"| {problem} | `{claim.strategy}` vs `{other}` | "
            f"{found['values'][0]:.3g} vs {found['values'][1]:.3g}{unit} | "
            f"{found['mean']:+.2f} [{found['low']:+.2f}, "
            f"{found['high']:+.2f}] | {found['verdict']} |")
    lines += [f"**{claim.source}.**", ""]
    if not rows:
      lines += ["Not tested by this run (a strategy or the problem is "
                "missing).", ""]
      continue
    measure = ("tasks worse than single-task (mean over seeds)"
               if claim.measure == "negative_tasks" else "Δm% (mean)")
    lines += [f"| problem | comparison | {measure} | difference [95% CI] | "
              "verdict |", "|---|---|---:|---:|---|"] + rows + [""]
  return lines
