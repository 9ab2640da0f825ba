"""The code in README.md and the guides runs, and the API page is complete.

Every fenced ```python block of ``README.md`` and of the Markdown pages under
``docs/`` (the guides) is executed: the blocks of one file run in order, in
one namespace, as a reader would paste them into one session. A block may
opt out only through a marker, an HTML comment (invisible once rendered, on
GitHub as in Sphinx) on the last non-blank line before its fence:

* ``<!-- docs-test: skip REASON -->``: the block is not run. REASON is
  required; use it for code that cannot run here (several hosts, a GPU).
* ``<!-- docs-test: requires MODULE -->``: the block runs only when MODULE
  can be imported. When it cannot, the file's other blocks still run and the
  test is reported as skipped, naming MODULE, rather than passed. Mark every
  block that depends on a skipped one.

Any other comment that starts with ``docs-test:``, or a marker that is not
followed by a python block, fails the test.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import re
import traceback
from typing import NamedTuple, Optional

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
_ANY_MARKER = re.compile(r"^\s*<!--\s*docs-test:")


class CodeBlock(NamedTuple):
  path: pathlib.Path
  line: int  # 1-based line number of the block's first line of code.
  code: str
  skip_reason: Optional[str]  # From a "skip" marker.
  requires: Optional[str]  # From a "requires" marker: a module name.


class MarkerError(ValueError):
  """A docs-test marker that is malformed or not followed by a python block."""


def _shown(path: pathlib.Path) -> str:
  """The path as messages show it: relative to the repository when inside."""
  try:
    return str(path.relative_to(ROOT))
  except ValueError:
    return str(path)


def _parse_marker(body: str, where: str) -> tuple[Optional[str], Optional[str]]:
  keyword, _, argument = body.partition(" ")
  argument = argument.strip()
  if keyword == "skip" and argument:
    return argument, None
  if keyword == "requires" and re.fullmatch(r"[A-Za-z_][\w.]*", argument):
    return None, argument
  raise MarkerError(
      f"{where}: a docs-test marker is '<!-- docs-test: skip REASON -->' or "
      f"'<!-- docs-test: requires MODULE -->', got {body!r}.")


def python_blocks(path: pathlib.Path) -> list[CodeBlock]:
  """The fenced python blocks of a Markdown file, with their markers."""
  lines = path.read_text(encoding="utf-8").splitlines()
  blocks = []
  pending = None  # (line number, skip_reason, requires) of a marker.
  index = 0
  while index < len(lines):
    line = lines[index]
    where = f"{_shown(path)}:{index + 1}"
    match = _FENCE.match(line)
    if match is None:
      marker = _MARKER.match(line)
      if marker is not None:
        if pending is not None:
          raise MarkerError(f"{where}: two docs-test markers in a row.")
        pending = (index + 1, *_parse_marker(marker.group("body"), where))
      elif _ANY_MARKER.search(line):
        raise MarkerError(f"{where}: a docs-test marker must be an HTML "
                          "comment alone on its line.")
      elif line.strip() and pending is not None:
        raise MarkerError(f"{where}: the docs-test marker of line "
                          f"{pending[0]} is not followed by a python block.")
      index += 1
      continue
    fence, info = match.group("fence"), match.group("info").strip()
    language = info.split()[0] if info else ""
    if fence[0] == "`" and "`" in info:
      index += 1  # Not a fence: inline code at the start of a line.
      continue
    # The block ends at a fence of the same character, at least as long.
    end = index + 1
    while end < len(lines):
      closing = _FENCE.match(lines[end])
      if (closing is not None and closing.group("fence")[0] == fence[0]
          and len(closing.group("fence")) >= len(fence)
          and not closing.group("info").strip()):
        break
      end += 1
    if language == "python":
      indent = len(match.group("indent"))
      code = "\n".join(text[indent:] if text[:indent].isspace() else text
                       for text in lines[index + 1:end])
      skip_reason, requires = (pending or (None, None, None))[1:]
      blocks.append(CodeBlock(path, index + 2, code, skip_reason, requires))
    elif pending is not None:
      raise MarkerError(f"{where}: the docs-test marker of line {pending[0]} "
                        f"is followed by a {language or 'plain'} block, not a "
                        "python block.")
    pending = None
    index = end + 1
  if pending is not None:
    raise MarkerError(f"{_shown(path)}:{pending[0]}: the docs-test "
                      "marker is not followed by a python block.")
  return blocks


def documented_files() -> list[pathlib.Path]:
  """README.md and every Markdown page of the docs (not the build output)."""
  pages = sorted(path for path in DOCS.rglob("*.md")
                 if "_build" not in path.relative_to(DOCS).parts)
  return [ROOT / "README.md", *pages]


def _module_available(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ImportError:  # A parent package is missing.
    return False


def run_blocks(blocks: list[CodeBlock]) -> list[CodeBlock]:
  """Runs the blocks in order in one namespace; returns those left out."""
  namespace = {"__name__": "__docs__"}
  left_out = []
  for block in blocks:
    if block.skip_reason is not None or (
        block.requires is not None and not _module_available(block.requires)):
      left_out.append(block)
      continue
    # Leading newlines make the traceback's line numbers the file's.
    source = "\n" * (block.line - 1) + block.code
    code = compile(source, str(block.path), "exec")
    try:
      exec(code, namespace)  # pylint: disable=exec-used
    except Exception:  # pylint: disable=broad-except
      pytest.fail(
          f"The python block at {_shown(block.path)}:{block.line} "
          f"failed:\n{traceback.format_exc()}", pytrace=False)
  return left_out


@pytest.mark.parametrize(
    "path", [path for path in documented_files() if python_blocks(path)],
    ids=_shown)
def test_python_blocks_run(path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Files that a block writes land here.
  left_out = run_blocks(python_blocks(path))
  missing = sorted({block.requires for block in left_out
                    if block.skip_reason is None})
  if missing:
    pytest.skip(f"{len(left_out)} block(s) left out: they need "
                f"{', '.join(missing)}, which cannot be imported")


def test_readme_and_quickstart_have_blocks():
  """The extractor finds the code (a broken parser would pass vacuously)."""
  assert len(python_blocks(ROOT / "README.md")) >= 2
  assert len(python_blocks(DOCS / "guides" / "quickstart.md")) >= 2


def test_markers_are_few():
  """Opting out is the exception: at most one block in ten."""
  blocks = [block for path in documented_files()
            for block in python_blocks(path)]
  skipped = [block for block in blocks if block.skip_reason is not None]
  assert len(skipped) * 10 <= len(blocks), [
      f"{_shown(block.path)}:{block.line}" for block in skipped]


def test_extractor(tmp_path):
  page = tmp_path / "page.md"
  page.write_text(
      "text\n"
      "```python\n"
      "a = 1\n"
      "```\n"
      "````markdown\n"
      "```python\n"
      "not_code = True\n"
      "```\n"
      "````\n"
      "<!-- docs-test: skip needs eight hosts -->\n"
      "```python\n"
      "raise SystemExit\n"
      "```\n"
      "\n"
      "<!-- docs-test: requires no_such_module_anywhere -->\n"
      "\n"
      "```python\n"
      "import no_such_module_anywhere\n"
      "```\n"
      "- a list item\n"
      "  ```python\n"
      "  b = a + 1\n"
      "  ```\n", encoding="utf-8")
  blocks = python_blocks(page)
  assert [block.code for block in blocks] == [
      "a = 1", "raise SystemExit", "import no_such_module_anywhere",
      "b = a + 1"]
  assert [block.line for block in blocks] == [3, 12, 18, 22]
  assert blocks[1].skip_reason == "needs eight hosts"
  assert blocks[2].requires == "no_such_module_anywhere"
  assert run_blocks(blocks) == blocks[1:3]


@pytest.mark.parametrize("text", [
    "<!-- docs-test: skip -->\n```python\nx = 1\n```\n",  # No reason.
    "<!-- docs-test: maybe -->\n```python\nx = 1\n```\n",  # Unknown keyword.
    "<!-- docs-test: skip why -->\ntext\n```python\nx = 1\n```\n",
    "<!-- docs-test: skip why -->\n```bash\nls\n```\n",
    "<!-- docs-test: skip why -->\n",
    "<!-- docs-test: skip why --> x\n```python\nx = 1\n```\n",
])
def test_bad_markers_fail(tmp_path, text):
  page = tmp_path / "page.md"
  page.write_text(text, encoding="utf-8")
  with pytest.raises(MarkerError):
    python_blocks(page)


# --------------------------------------------------------------------------
# The API page lists every public name.
# --------------------------------------------------------------------------


def _api_sections():
  spec = importlib.util.spec_from_file_location(
      "api_sections", DOCS / "api_sections.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_api_page_lists_every_public_name():
  import optax_mtl  # pylint: disable=import-outside-toplevel
  api_sections = _api_sections()
  page = api_sections.render(optax_mtl)
  listed = re.findall(r"^   ([\w.]+)$", page, flags=re.MULTILINE)
  for name in optax_mtl.__all__:
    value = getattr(optax_mtl, name)
    if hasattr(value, "__all__") and hasattr(value, "__file__"):
      # A public submodule: its own public names are listed.
      for member in value.__all__:
        assert f"{name}.{member}" in listed, f"{name}.{member}"
    else:
      assert name in listed, f"optax_mtl.{name} is missing from the API page"
  assert len(listed) == len(set(listed)), "a name is listed twice"


def test_api_page_sections_are_current():
  import optax_mtl  # pylint: disable=import-outside-toplevel
  api_sections = _api_sections()
  titles = [section.title for section in api_sections.sections(optax_mtl)]
  unfiled = [section.names for section in api_sections.sections(optax_mtl)
             if section.title == api_sections.OTHER_TITLE]
  assert not unfiled, (
      f"file these names under a section of docs/api_sections.py: {unfiled}")
  assert not api_sections.stale_names(optax_mtl)
  assert "Loss-weighting strategies" in titles


_EXTERNAL = re.compile(
    r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*[\"']"
    r"(?P<url>(?:[a-z][a-z0-9+.-]*:)?//[^\"']*)", re.IGNORECASE)


def test_formulas_render_without_a_network(tmp_path):
  """A page with formulas, built with the site's configuration, loads
  MathJax and every other script, style or font from the site itself."""
  sphinx_cmd = pytest.importorskip("sphinx.cmd.build")
  source = tmp_path / "src"
  source.mkdir()
  (source / "index.md").write_text(
      "# Formulas\n\nInline $w_k = 1/L_k$, and displayed:\n\n"
      "$$\\sum_k w_k \\nabla L_k$$\n", encoding="utf-8")
  out = tmp_path / "html"
  assert sphinx_cmd.build_main(
      ["-q", "-b", "html", "-c", str(DOCS), str(source), str(out)]) == 0
  page = (out / "index.html").read_text(encoding="utf-8")
  assert 'src="_static/mathjax/tex-mml-chtml.js"' in page
  assert (out / "_static" / "mathjax" / "tex-mml-chtml.js").is_file()
  assert any((out / "_static" / "mathjax" / "output" / "chtml" / "fonts"
              / "woff-v2").glob("*.woff"))
  for html in out.rglob("*.html"):
    external = [m["url"] for m in _EXTERNAL.finditer(
        html.read_text(encoding="utf-8")) if "//" in m["url"]]
    # Links (<a href>) may point anywhere; nothing the page loads may.
    assert not external, (html.name, external)
