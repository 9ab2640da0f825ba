"""Publishes a results folder as ``benchmarks/RESULTS.md``.

``python -m benchmarks.publish [RESULTS_DIR [SPEED_DIR ...]] [--note TEXT]``
(default ``bench_results``) copies the report's plots to
``benchmarks/results/`` and writes ``benchmarks/RESULTS.md``: the report
itself, followed by a summary of the speed and memory requirements per
speed model, computed from ``results.json``. Each further ``SPEED_DIR`` (a
run of ``python -m benchmarks --speed-only``: a repeat, another
``--speed-batch``, another machine) adds the same summary of its own run at
the end, under the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
from typing import Optional

HERE = pathlib.Path(__file__).parent
LOSS_TARGET = 1.05  # Target: a loss-only step within 5 % of value_and_grad.
GRAMIAN_TARGET = 1.10  # Target: a Gramian step ≤ 1.10 × the Jacobian-only.


def _low(values) -> float:
  """The smallest value, NaN (a T where a strategy is not defined) left
  out."""
  return min((x for x in values if x == x), default=float("nan"))


def _high(values) -> float:
  """The largest value, NaN left out."""
  return max((x for x in values if x == x), default=float("nan"))


def speed_runs(speed: Optional[dict]) -> dict[str, dict]:
  """``{model: run_speed result}`` from a results.json ``speed`` entry."""
  if not speed:
    return {}
  if "strategies" in speed:  # One model (results.json before the conv run).
    return {speed.get("model", "mlp"): speed}
  return speed


def worst_loss_ratio(speed: dict) -> tuple[float, str, str] | None:
  """``(ratio, strategy, T)``: the largest loss-only step ÷ plain of a run
  of one model."""
  ratios = [(entry["ratio_plain"], name, t)
            for name, by_tasks in speed["strategies"].items()
            for t, entry in by_tasks.items()
            if entry.get("kind") == "losses" and "ratio_plain" in entry]
  return max(ratios) if ratios else None


def speed_summary(speed: dict) -> list[str]:
  """Markdown lines checking the step-time and memory targets."""
  tasks = [str(t) for t in speed["num_tasks"]]
  loss_rows, gramian_rows = _speed_rows(speed, tasks)
  noise = [speed["baselines"][t].get("noise", float("nan")) for t in tasks]
  lines = ["## Requirements at a glance", "",
           f"Computed from `results.json` of this run (T = {', '.join(tasks)}"
           "; a time ratio is the amortised step of the strategy ÷ that of "
           "the baseline: the mean over a cycle of 10 consecutive top-level "
           "steps of each position's fastest step over "
           f"{speed['config']['rounds']} interleaved rounds within one run). "
           "Noise floor of this run, the "
           "plain step compiled twice and timed against itself: "
           + ", ".join(f"{x:.3f}" for x in noise) + ".", ""]
  if loss_rows:
    lines += _loss_only_summary(speed, tasks, loss_rows)
  if gramian_rows:
    lines += _gramian_summary(speed, tasks, gramian_rows)
  return lines + [""]


def _speed_rows(speed: dict, tasks: list[str]) -> tuple[list, list]:
  """Per strategy and T: the loss-only rows ``(name, ÷ plain, flops ÷
  plain, ÷ by hand)`` and the Gramian rows ``(name, ÷ Jacobian-only, MiB,
  flops ÷ Jacobian-only, ÷ plain)``."""
  loss_rows, gramian_rows = [], []
  for name, by_tasks in speed["strategies"].items():
    entries = [by_tasks.get(t, {}) for t in tasks]
    kinds = [e["kind"] for e in entries if e]
    if not kinds:
      continue
    # A strategy not defined at some T (krum at T = 2) has NaN there.
    nan = float("nan")
    entries = [e or {"step_ms": nan, "ratio_plain": nan,
                     "ratio_jacobian": nan, "memory_bytes": nan}
               for e in entries]
    flop_ratios = [e.get("flops_ratio", nan) for e in entries]
    if kinds[0] == "losses":
      loss_rows.append((name, [e["ratio_plain"] for e in entries],
                        flop_ratios,
                        [e.get("ratio_by_hand", float("nan"))
                         for e in entries]))
    else:
      gramian_rows.append((name, [e["ratio_jacobian"] for e in entries],
                           [e["memory_bytes"] / 2**20 for e in entries],
                           flop_ratios, [e["ratio_plain"] for e in entries]))
  return loss_rows, gramian_rows


def _loss_only_summary(speed: dict, tasks: list[str],
                       loss_rows: list) -> list[str]:
  """The loss-only strategies against plain and by-hand steps."""
  lines = []
  worst = worst_loss_ratio(speed)
  within = sum(all(x <= LOSS_TARGET for x in r)
               for _, r, _, _ in loss_rows)
  flop_ratios = [x for _, _, f, _ in loss_rows for x in f]
  by_hand = [x for _, _, _, h in loss_rows for x in h]
  ratio_columns = list(zip(*[r for _, r, _, _ in loss_rows]))
  baselines = [speed["baselines"][t] for t in tasks]
  hand_vs_plain = [b["by_hand"]["step_ms"] / b["plain"]["step_ms"]
                   for b in baselines]
  added_us = [[(speed["strategies"][n][t]["step_ms"]
                - b["plain"]["step_ms"]) * 1e3 for n, _, _, _ in loss_rows]
              for t, b in zip(tasks, baselines)]
  lines.append(
      f"- Loss-only strategies ÷ plain `jax.value_and_grad` of the summed "
      f"losses: {within}/{len(loss_rows)} strategies within "
      f"{LOSS_TARGET:.2f} at every T; worst {worst[0]:.2f} ({worst[1]}). "
      "Per T: " + ", ".join(
          f"T={t}: {_low(col):.2f}–{_high(col):.2f}"
          for t, col in zip(tasks, ratio_columns)) + ". Time added per "
      "step (µs; the plain step takes " + ", ".join(
          f"{b['plain']['step_ms'] * 1e3:.0f}" for b in baselines)
      + " µs): " + ", ".join(
          f"T={t}: {min(col):+.0f} to {max(col):+.0f}"
          for t, col in zip(tasks, added_us)) + ". "
      f"Floating-point operations per step (XLA's count, noise-free): "
      f"{min(flop_ratios):.3f}–{max(flop_ratios):.3f} × plain.")
  lines.append(
      "- The same data-dependent weighting written by hand (a VJP with "
      "cotangent 1/L, no optax_mtl code) ÷ plain: " + ", ".join(
          f"T={t}: {x:.2f}" for t, x in zip(tasks, hand_vs_plain))
      + f"; the strategies ÷ that by-hand step: {min(by_hand):.2f}–"
      f"{max(by_hand):.2f}.")
  return lines


def _gramian_summary(speed: dict, tasks: list[str],
                     gramian_rows: list) -> list[str]:
  """The Gramian strategies' operations, times and memory."""
  lines = []
  within = [n for n, r, _, _, _ in gramian_rows
            if all(x <= GRAMIAN_TARGET for x in r if x == x)]
  over = [f"{n} ({', '.join(f'{x:.2f}' for x in r)})"
          for n, r, _, _, _ in gramian_rows if n not in within]
  flop_columns = list(zip(*[f for _, _, _, f, _ in gramian_rows]))
  plain_columns = list(zip(*[p for _, _, _, _, p in gramian_rows]))
  lines.append(
      "- Gramian strategies, floating-point operations ÷ the "
      "Jacobian-only step (XLA's count; a solver's loop body is counted "
      "once): " + ", ".join(
          f"T={t}: {_low(col):.3f}–{_high(col):.3f}"
          for t, col in zip(tasks, flop_columns)) + ".")
  lines.append(
      "- Gramian strategies ÷ a plain training step (what a user pays "
      "against training without optax_mtl): " + ", ".join(
          f"T={t}: {_low(col):.1f}–{_high(col):.1f}×"
          for t, col in zip(tasks, plain_columns)) + "; the Jacobian-only "
      "step alone takes " + ", ".join(
          f"{b['jacobian']['step_ms'] / b['plain']['step_ms']:.1f}×"
          for b in (speed["baselines"][t] for t in tasks)) + " plain.")
  lines.append(
      f"- Gramian strategies ÷ the Jacobian-only step: {len(within)}/"
      f"{len(gramian_rows)} within {GRAMIAN_TARGET:.2f} at every T"
      + (f"; over it somewhere: {'; '.join(over)}." if over else "."))
  memory = [m for _, _, m, _, _ in gramian_rows]
  low = next((by_t for label, by_t in speed.get("options", {}).items()
              if "low_memory" in label), None)
  lines.append(
      "- Peak memory of the Gramian strategies (MiB, at T = "
      f"{', '.join(tasks)}): "
      + ", ".join(f"{_low(col):.2f}–{_high(col):.2f}" for col in zip(*memory))
      + (("; with `gramian_mode=\"low_memory\"` (upgrad): "
          + ", ".join(f"{low[t]['memory_bytes'] / 2**20:.2f}"
                      for t in tasks)) if low else "") + ".")
  return lines


KEEP_MARKER = ("<!-- benchmarks.publish keeps everything below this line: "
               "measurements made outside the suite -->")
README_BEGIN = ("<!-- begin: generated by python -m benchmarks.publish from "
                "benchmarks/RESULTS.md; do not edit by hand -->")
README_END = "<!-- end: generated by python -m benchmarks.publish -->"


def _problem_summary(name: str, result: dict) -> str:
  """One README bullet for a problem with single-task baselines."""
  # pylint: disable=import-outside-toplevel
  from benchmarks import report
  strategies = result["strategies"]
  best, ties = report.ties_with_best(result)
  if best is None:
    return f"- **`{name}`**: no strategy has a finite Δm%."
  text = (f"- **`{name}`** ({len(result['tasks'])} tasks): best by Δm% "
          f"`{best}`, {report._ci_text(strategies[best]['delta_m']['per_seed'])}")  # pylint: disable=protected-access
  if ties:
    text += (f", tied with {len(ties)} others ("
             + ", ".join(f"`{n}`" for n in ties[:6])
             + (", …" if len(ties) > 6 else "") + ")")
  if "equal" in strategies:
    text += (f"; `equal` (the plain sum) "
             f"{strategies['equal']['delta_m']['mean']:+.1f}")
  transfer = {n: e.get("negative_transfer") for n, e in strategies.items()
              if e.get("negative_transfer") is not None}
  clean = sorted(n for n, v in transfer.items() if v == 0)
  if clean:
    text += (f". No task worse than single-task under "
             + ", ".join(f"`{n}`" for n in clean) + ".")
  elif transfer:
    text += (f". Every strategy is worse than single-task on at least "
             f"{min(transfer.values())} of {len(result['tasks'])} tasks.")
  return text


def _claims_summary(problems: dict[str, dict]) -> list[str]:
  """One README bullet per claim: its verdicts counted over comparisons."""
  # pylint: disable=import-outside-toplevel
  from benchmarks import claims
  lines = []
  for claim in claims.CLAIMS:
    verdicts = [found["verdict"]
                for problem, result in problems.items()
                if claim.problems is None or problem in claim.problems
                for other in claim.others
                for found in [claims.compare(result, claim, other)]
                if found is not None]
    if not verdicts:
      continue
    counts = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    lines.append(f"  - {claim.source}: " + ", ".join(
        f"{v} in {c}" for v, c in counts.items())
        + f" of {len(verdicts)} comparisons.")
  return lines


def readme_section(results: dict) -> list[str]:
  """The README's "What the benchmarks show", generated from a published
  run's ``results.json`` (no hand-copied figures)."""
  # pylint: disable=import-outside-toplevel
  from benchmarks import report
  meta = results.get("meta", {})
  problems = results.get("problems", {})
  names = sorted({n for r in problems.values() for n in r["strategies"]})
  seeds = max((len(r.get("seeds") or []) for r in problems.values()),
              default=0)
  machine = meta.get("machine", {})
  lines = [README_BEGIN, "",
           f"The published run ([`benchmarks/RESULTS.md`]"
           f"(benchmarks/RESULTS.md): `{meta.get('command', '?')}`, "
           f"{seeds} seeds, {len(names)} strategies; "
           f"{machine.get('nproc', '?')} CPUs, {machine.get('cpu', '?')}) "
           "compares every strategy with single-task models of the same "
           "architecture, trained under the same model selection (best "
           "validation checkpoint, early stopping). Δm% is the mean relative "
           "change against them over tasks (positive = better), with its "
           "95% interval over seeds:", ""]
  for name, result in problems.items():
    if not result["strategies"]:
      continue
    if result.get("single_task"):
      lines.append(_problem_summary(name, result))
    elif result["problem"] == "toy2d":
      lines.append(f"- **`{name}`**: " + " ".join(
          line[2:] for line in report._toy_findings(result)[:2]))  # pylint: disable=protected-access
  claim_lines = _claims_summary(problems)
  if claim_lines:
    lines += ["- **The papers' claims** (paired over seeds; the report's "
              "\"claims, side by side\" has every row):"] + claim_lines
  cost = report.main_conclusions(problems, results.get("speed"))
  cost = [line for line in cost if line.startswith("Step ÷")]
  if cost:
    lines.append(f"- **Cost**: {cost[0]}")
  return lines + ["", README_END]


def update_readme(results: dict, readme: pathlib.Path) -> bool:
  """Replaces the generated section of ``readme``; False if it has none."""
  text = readme.read_text(encoding="utf-8")
  begin, end = text.find(README_BEGIN), text.find(README_END)
  if begin < 0 or end < begin:
    return False
  readme.write_text(text[:begin] + "\n".join(readme_section(results))
                    + text[end + len(README_END):], encoding="utf-8")
  return True


def publish(results_dir: str = "bench_results",
            destination: pathlib.Path = HERE,
            speed_dirs: tuple[str, ...] = (),
            note: str = "",
            readme: Optional[pathlib.Path] = None) -> pathlib.Path:
  """Writes ``destination/RESULTS.md`` and ``destination/results/*.png``,
  and the generated section of ``readme`` (None: leave it).

  ``note`` (Markdown) goes under the title: how and where the run was made
  when it was not a plain ``make bench``.
  """
  source = pathlib.Path(results_dir)
  destination = pathlib.Path(destination)
  results = json.loads((source / "results.json").read_text())
  report = (source / "report.md").read_text()
  plots = destination / "results"
  plots.mkdir(exist_ok=True)
  for png in sorted(source.glob("*.png")):
    shutil.copy(png, plots / png.name)
    report = report.replace(f"]({png.name})", f"](results/{png.name})")
  title, _, body = report.partition("\n")
  command = results.get("meta", {}).get("command", "python -m benchmarks")
  lines = [title.replace("report", "results"), "",
           f"The published run (`{command}`), written by "
           "`python -m benchmarks.publish`, which also regenerates the "
           "README's \"What the benchmarks show\"; plots in "
           "`benchmarks/results/`.", ""] + ([note, ""] if note else [])
  extras = [json.loads((pathlib.Path(d) / "results.json").read_text())
            for d in speed_dirs]
  # The speed targets of the issues, after the report (whose first section,
  # "What this run says", is the one a user reads).
  requirements = []
  runs = speed_runs(results.get("speed"))
  if runs:
    requirements += ["", "## Requirements at a glance", ""]
  for model, run in runs.items():
    requirements += [f"**{model} trunk**", ""] + speed_summary(run)[2:]
  if extras:
    worst = [(model, worst_loss_ratio(run))
             for extra in [results] + extras
             for model, run in speed_runs(extra.get("speed")).items()]
    requirements[-1:] = [
        "- Worst loss-only strategy ÷ plain in each run of this file (this "
        "run first, then the further speed runs at the end, in order): "
        + ", ".join(f"{w[0]:.3f} ({w[1]}, {model}, T={w[2]})"
                    for model, w in worst if w) + ".", ""]
  further = ["", "## Further speed runs", ""] if extras else []
  for extra in extras:
    for model, run in speed_runs(extra.get("speed")).items():
      backend = extra["meta"].get("machine", {}).get("backend", "?")
      heading = (f"### `{extra['meta']['command']}` ({model} trunk, "
                 f"minibatch {run['config']['batch_size']}, {backend})")
      further += [heading, ""] + speed_summary(run)[2:]
  out = destination / "RESULTS.md"
  # What follows KEEP_MARKER in the file (runs of other benchmarks, each
  # with its command) stays as it is.
  previous = out.read_text(encoding="utf-8") if out.exists() else ""
  kept = previous[previous.find(KEEP_MARKER):] if KEEP_MARKER in previous \
      else ""
  out.write_text("\n".join(lines) + body.rstrip("\n") + "\n"
                 + "\n".join(requirements + further).rstrip("\n") + "\n"
                 + ("\n" + kept if kept else ""), encoding="utf-8")
  if readme is not None:
    update_readme(results, pathlib.Path(readme))
  return out


def main(argv: Optional[list[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.publish",
      description="Publish a results folder as benchmarks/RESULTS.md.")
  parser.add_argument("results_dir", nargs="?", default="bench_results")
  parser.add_argument("speed_dirs", nargs="*",
                      help="further --speed-only results folders")
  parser.add_argument("--note", default="",
                      help="Markdown under the title (where the run was made)")
  parser.add_argument("--no-readme", action="store_true",
                      help="leave README.md's generated section as it is")
  args = parser.parse_args(argv)
  readme = None if args.no_readme else HERE.parent / "README.md"
  print(publish(args.results_dir, speed_dirs=tuple(args.speed_dirs),
                note=args.note, readme=readme))


if __name__ == "__main__":
  main()
