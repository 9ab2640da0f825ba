"""optax_mtl benchmark suite: problems, protocol, speed, report.

From a notebook::

    import benchmarks
    result = benchmarks.run_problem("digits", strategies=["equal", "mgda"],
                                    seeds=2)
    benchmarks.write_report({"digits": result}, "bench_results")

From a shell: ``python -m benchmarks`` (see ``python -m benchmarks --help``).
"""

from benchmarks.problems import Problem
from benchmarks.problems import make as make_problem
from benchmarks.report import write_report
from benchmarks.runner import rank
from benchmarks.runner import run_problem
from benchmarks.runner import score_models
from benchmarks.runner import train_multitask
from benchmarks.runner import train_single_task
from benchmarks.speed import run_speed

__all__ = (
    "Problem",
    "make_problem",
    "rank",
    "run_problem",
    "run_speed",
    "score_models",
    "train_multitask",
    "train_single_task",
    "write_report",
)
