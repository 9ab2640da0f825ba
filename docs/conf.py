"""Sphinx configuration of the optax_mtl documentation (``make docs``)."""

from __future__ import annotations

import inspect
import os
import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))
sys.path.insert(0, str(DOCS.parent))

# The notebooks run on the CPU (their kernels inherit this environment). No
# MPLBACKEND here: the kernel's inline backend puts the figures in the pages.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import optax_mtl  # noqa: E402

import api_sections  # noqa: E402

project = "optax_mtl"
author = "the optax_mtl authors"
copyright = "the optax_mtl authors"  # pylint: disable=redefined-builtin
release = optax_mtl.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb",
                 ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
root_doc = "index"

# -- API: autodoc, autosummary, napoleon -------------------------------------
# Google-style docstrings (Args:, Returns:, Examples:, References:), read by
# napoleon, as in optax and flax: see the note on index.md.
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "none"
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# "Attributes:" as a field list: autodoc documents the fields themselves.
napoleon_use_ivar = True
napoleon_attr_annotations = False
add_module_names = False
templates_path = ["_templates"]

# -- MyST and notebooks -------------------------------------------------------
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# Every notebook of notebooks/ is executed on each build, top to bottom; an
# error in a cell fails the build.
nb_execution_mode = "force"
# negative_transfer.ipynb trains single-task and multi-task models for
# minutes on CPU; tests/test_notebooks.py executes it in CI already, so the
# site shows it unexecuted rather than running it a second time.
nb_execution_excludepatterns = ["*negative_transfer*"]
nb_execution_timeout = 300
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True

# -- HTML ---------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = "optax_mtl"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,
}
html_static_path: list[str] = []

# -- Formulas, rendered offline ------------------------------------------------
# MathJax 3 comes from the PyPI package django-static-mathjax (the docs
# extras; its module is ``mathjax``, without Django): the pages load it from
# the site's own _static/mathjax, never from a CDN, so formulas render with
# no network. Only what tex-mml-chtml needs is copied (the component, its
# CHTML fonts, the TeX extensions it may load on demand).
mathjax_path = "mathjax/tex-mml-chtml.js"
_MATHJAX_PARTS = ("tex-mml-chtml.js", "output/chtml/fonts/woff-v2",
                  "input/tex/extensions")


def _copy_mathjax(app, exception):
  if exception is not None or app.builder.format != "html":
    return
  import shutil  # pylint: disable=import-outside-toplevel
  import mathjax  # pylint: disable=import-outside-toplevel
  source = pathlib.Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
  target = pathlib.Path(app.outdir) / "_static" / "mathjax"
  for part in _MATHJAX_PARTS:
    if (source / part).is_dir():
      shutil.copytree(source / part, target / part, dirs_exist_ok=True)
    else:
      (target / part).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(source / part, target / part)


def _write_api_page():
  """Writes ``api.rst`` from ``optax_mtl.__all__`` (only when it changed)."""
  page = DOCS / "api.rst"
  text = api_sections.render(optax_mtl)
  if not page.exists() or page.read_text(encoding="utf-8") != text:
    page.write_text(text, encoding="utf-8")


# Before autosummary scans the sources for its tables.
_write_api_page()


def _check_api_sections(app):
  from sphinx.util import logging  # pylint: disable=import-outside-toplevel
  logger = logging.getLogger(__name__)
  for name in api_sections.stale_names(optax_mtl):
    logger.warning("docs/api_sections.py lists %r, which optax_mtl no longer "
                   "exports", name)


_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


def _field_comments(cls) -> dict[str, str]:
  """``{field: comment}`` from the lines ``name: type  # comment`` of a class.

  The states' fields are documented by a comment on their line (shape, dtype
  and meaning), as in optax; NamedTuple fields otherwise read "Alias for
  field number N".
  """
  try:
    source = inspect.getsource(cls)
  except (OSError, TypeError):
    return {}
  comments = {}
  for line in source.splitlines():
    match = _FIELD_COMMENT.match(line)
    if match and not line.lstrip().startswith("#"):
      comments.setdefault(match.group(1), match.group(2).strip())
  return comments


def _document_namedtuple_fields(app, what, name, obj, options, lines):
  """Replaces "Alias for field number N" by the field's source comment."""
  del app, options
  if what not in ("attribute", "property") or not lines:
    return
  if not lines[0].startswith("Alias for field number"):
    return
  class_name, _, field = name.rpartition(".")
  module_name, _, cls_name = class_name.rpartition(".")
  cls = getattr(sys.modules.get(module_name), cls_name, None)
  comment = _field_comments(cls).get(field) if cls is not None else None
  if comment:
    lines[:] = [comment]


def _owner_of_field(name, obj):
  """The public NamedTuple class whose field ``name`` is ``obj``, if any."""
  for value in vars(optax_mtl).values():
    if isinstance(value, type) and vars(value).get(name) is obj:
      return value
  return None


def _skip_uncommented_fields(app, what, name, obj, skip, options):
  """Leaves out NamedTuple fields that only read "Alias for field number N".

  Their class docstring describes them (``Attributes:``); a field with a
  source comment is kept and shows the comment.
  """
  del app, options
  if what != "class" or skip:
    return None
  if not (getattr(obj, "__doc__", None) or "").startswith(
      "Alias for field number"):
    return None
  owner = _owner_of_field(name, obj)
  if owner is None or name not in _field_comments(owner):
    return True
  return None


def setup(app):
  app.connect("autodoc-skip-member", _skip_uncommented_fields)
  app.connect("autodoc-process-docstring", _document_namedtuple_fields)
  app.connect("builder-inited", _check_api_sections)
  app.connect("build-finished", _copy_mathjax)
