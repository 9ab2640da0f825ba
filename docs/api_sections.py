"""The API page, generated from ``optax_mtl.__all__``.

``conf.py`` writes ``docs/api.rst`` (not committed) from :func:`render` at
the start of every build: a title, an introduction and one ``autosummary``
table per section.
Every name of ``optax_mtl.__all__`` lands in exactly one table, so a new
public name cannot be left out of the site:

* the names listed in :data:`SECTIONS` go to their section;
* a strategy factory that no section lists goes to the section of what it
  reads (``optax_mtl.weighting_of(factory(num_tasks=T)).needs``, see
  :data:`SECTION_OF_NEEDS`), after the listed names;
* a state (a name ending in ``State``) that no section lists goes to
  "Strategy states";
* a public submodule (``optax_mtl.metrics``, ``optax_mtl.nnx``) gets a
  section of its own that lists the submodule's own ``__all__``;
* any other name goes to "Other public names", and
  ``tests/test_docs.py`` fails until someone files it under a section.

A name listed here that ``optax_mtl`` no longer exports is reported by
:func:`stale_names`; ``conf.py`` turns it into a Sphinx warning, which
``make docs`` (``-W``) treats as an error.
"""

from __future__ import annotations

import importlib
import types
from typing import Iterable, NamedTuple, Sequence


class Section(NamedTuple):
  title: str
  intro: str
  names: Sequence[str]


SECTIONS = (
    Section(
        "Loss-weighting strategies",
        "They read the per-task losses only. Through "
        ":func:`optax_mtl.value_and_grad` a step costs one forward and one "
        "backward pass, like ``jax.value_and_grad`` of the summed losses.",
        ("equal", "constant", "loss_ema", "rema", "dwema", "dwa", "lbtw",
         "initial_loss", "log_loss", "geometric_mean", "uncertainty", "imtl_l",
         "stch", "cosmos", "pbi", "famo", "famo_update_logits", "rlw")),
    Section(
        "Gradient-balancing strategies",
        "They read the T×T Gramian ``G = J Jᵀ`` of the per-task gradients "
        "and return weights ``w(G)``; only the final ``Jᵀw`` touches the "
        "parameters.",
        ("normalized_gradients", "mgda", "gradnorm", "pcgrad", "cagrad",
         "imtl_g", "imtl", "nash_mtl", "aligned_mtl", "upgrad", "dualproj")),
    Section(
        "Training step",
        "The training-step face: a ``jax.value_and_grad`` for per-task "
        "losses that computes only what the strategy needs.",
        ("value_and_grad",)),
    Section(
        "Wrappers",
        "Functions that take a strategy and return a strategy.",
        ("recompute_every", "smooth_weights", "with_shared_parameters",
         "RecomputeEveryState", "SmoothWeightsState")),
    Section(
        "Writing your own strategy",
        "The extension API: a weight rule and what it reads, or a rule on "
        "the per-task gradients, turned into a strategy that works on both "
        "faces. See the guide :doc:`guides/custom_strategy`.",
        ("MultiTaskStrategy", "Weighting", "GradientRule", "Needs",
         "as_gradient_transformation", "weighting_of", "common_state_fields")),
    Section(
        "Writing the loss function",
        "Helpers for per-task losses: a mean over the labelled examples "
        "that stays finite for a task without labels in the batch.",
        ("masked_mean",)),
    Section(
        "Logging and gradient geometry",
        "Diagnostics of any state tree, and the Gramian and cosines of "
        "per-task gradients.",
        ("diagnostics", "gramian", "cosine_matrix")),
    Section(
        "Solvers",
        "The jittable solvers on the T×T Gramian that the strategies use "
        "(``lax.while_loop``, no SciPy).",
        ("solve_min_norm", "project_simplex", "solve_dual_cone_qp",
         "solve_cagrad", "solve_nash", "solve_alpha_fair",
         "solve_priority_qp", "SolverResult", "Outcome")),
)

GRADIENTS_SECTION = Section(
    "Strategies that read the gradients",
    "They combine the per-task gradients coordinate by coordinate, so the "
    "training-step face computes the per-task Jacobian.",
    ())
# Section title of each kind of strategy, by the name of its Needs member.
SECTION_OF_NEEDS = {
    "LOSSES": "Loss-weighting strategies",
    "GRAMIAN": "Gradient-balancing strategies",
    "GRADIENTS": GRADIENTS_SECTION.title,
}

STATES_TITLE = "Strategy states"
STATES_INTRO = (
    "Every state is a NamedTuple of arrays with fixed shapes and dtypes, with "
    "at least ``weights`` (float32[T], the weights applied last) and "
    "``num_skipped`` (int32[], the rejected steps).")
OTHER_TITLE = "Other public names"
# Submodules that are public even when the package's __all__ leaves them out.
OPTIONAL_SUBMODULES = ("nnx",)


def _public_submodule(package: types.ModuleType, name: str):
  """``package.name`` if it is a submodule that can be imported, else None."""
  module = getattr(package, name, None)
  if isinstance(module, types.ModuleType):
    return module
  try:
    return importlib.import_module(f"{package.__name__}.{name}")
  except ImportError:
    return None


def _needs_of(package: types.ModuleType, name: str):
  """The name of what the strategy factory ``name`` reads, or None."""
  factory = getattr(package, name)
  if isinstance(factory, type) or not callable(factory):
    return None
  for num_tasks in (2, 3, 8):  # Some methods need more than two tasks.
    try:
      return package.weighting_of(factory(num_tasks=num_tasks)).needs.name
    except Exception:  # pylint: disable=broad-except
      continue
  return None  # Not a strategy factory.


def sections(package: types.ModuleType) -> list[Section]:
  """Every name of ``package.__all__`` in exactly one section, in order."""
  exported = list(package.__all__)
  modules = [name for name in exported
             if isinstance(getattr(package, name), types.ModuleType)]
  listed = {name for section in SECTIONS for name in section.names}
  unlisted_by_title: dict[str, list[str]] = {}
  for name in exported:
    if name not in listed and name not in modules:
      needs = _needs_of(package, name)
      if needs is not None:
        title = SECTION_OF_NEEDS.get(needs, GRADIENTS_SECTION.title)
        unlisted_by_title.setdefault(title, []).append(name)
  placed: set[str] = set()
  result = []
  for section in (*SECTIONS[:2], GRADIENTS_SECTION, *SECTIONS[2:]):
    names = [name for name in section.names
             if name in exported and name not in modules]
    names += unlisted_by_title.get(section.title, [])
    placed.update(names)
    if names:
      result.append(section._replace(names=names))
  states = [name for name in exported
            if name.endswith("State") and name not in placed]
  placed.update(states)
  if states:
    result.append(Section(STATES_TITLE, STATES_INTRO, states))
  placed.update(modules)
  for name in list(modules) + [
      name for name in OPTIONAL_SUBMODULES if name not in modules]:
    module = _public_submodule(package, name)
    if module is None:
      continue
    own = list(getattr(module, "__all__", ()))
    intro = (module.__doc__ or "").strip().splitlines()[0:1]
    result.append(Section(f"``{module.__name__}``",
                          intro[0] if intro else "", [
                              f"{name}.{member}" for member in own]))
  others = [name for name in exported if name not in placed]
  if others:
    result.append(Section(OTHER_TITLE, "Not yet filed under a section.",
                          others))
  return result


def stale_names(package: types.ModuleType) -> list[str]:
  """Names that a section lists but ``package`` no longer exports."""
  exported = set(package.__all__)
  return [name for section in SECTIONS for name in section.names
          if name not in exported]


def _underline(title: str, char: str) -> str:
  return f"{title}\n{char * len(title)}\n"


TITLE = "API reference"
INTRO = """\
Every public name of ``optax_mtl``, generated from ``optax_mtl.__all__``
(``docs/api_sections.py``). The docstrings follow the Google style of optax
and flax: a one-line summary, the formula, ``Args``, ``Returns``, a doctest
and the paper.

.. currentmodule:: optax_mtl
"""


def render(package: types.ModuleType) -> str:
  """The whole of ``api.rst``."""
  lines = [_underline(TITLE, "="), INTRO]
  for section in sections(package):
    lines.append(_underline(section.title, "-"))
    if section.intro:
      lines.append(section.intro + "\n")
    lines.append(".. autosummary::\n   :toctree: _autosummary\n   :nosignatures:\n")
    lines.extend(f"   {name}" for name in section.names)
    lines.append("\n")
  return "\n".join(lines)


def listed_names(package: types.ModuleType) -> Iterable[str]:
  """Every name that the generated page lists, as written in its tables."""
  for section in sections(package):
    yield from section.names
