"""The package's seams: imports run one way, configs read without the pipeline, no
module is too long to read."""

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "mmjax")
MAX_LINES = 450


def _modules(folder):
  for root, _, files in os.walk(folder):
    for f in files:
      if f.endswith(".py"):
        yield os.path.join(root, f)


def _imports(path):
  """Every module name an import statement of `path` names (top level or nested)."""
  tree = ast.parse(open(path).read(), path)
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.append(node.module)
      names += [f"{node.module}.{a.name}" for a in node.names]
  return names


def test_evals_import_nothing_from_train():
  offenders = {os.path.relpath(p, REPO): [n for n in _imports(p)
                                          if n == "mmjax.train" or n.startswith("mmjax.train.")]
               for p in _modules(os.path.join(PACKAGE, "evals"))}
  assert not {p: n for p, n in offenders.items() if n}


def test_the_library_rooms_import_no_runner():
  # data, models, fusion, align and pretrained know nothing of training, evaluation or the
  # experiment setup that joins them.
  for room in ("data", "models", "fusion", "align", "pretrained"):
    for path in _modules(os.path.join(PACKAGE, room)):
      bad = [n for n in _imports(path) if n.split(".")[:2] in (
          ["mmjax", "train"], ["mmjax", "evals"], ["mmjax", "experiment"])]
      assert not bad, (os.path.relpath(path, REPO), bad)


def test_configs_import_only_config_lib():
  for path in _modules(os.path.join(REPO, "configs")):
    mmjax_imports = {n for n in _imports(path) if n.split(".")[0] == "mmjax"}
    assert mmjax_imports <= {"mmjax", "mmjax.config_lib"}, (path, mmjax_imports)


def test_reading_a_config_imports_neither_grain_nor_the_pipeline():
  code = ("import sys; from mmjax import config_lib; "
          "[config_lib.load_config(f'configs/{n}') for n in ('default.py', "
          "'fusion_flexmoe.py:redundant', 'gram_trimodal.py', 'siglip.py')]; "
          "print(sorted(m for m in sys.modules if m in ('grain', 'mmjax.data.pipeline', "
          "'mmjax.evals', 'mmjax.train') or m.startswith('grain.')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("path", sorted(_modules(PACKAGE)))
def test_no_module_is_over_the_line_limit(path):
  with open(path) as f:
    lines = sum(1 for _ in f)
  assert lines <= MAX_LINES, f"{os.path.relpath(path, REPO)} has {lines} lines"


def test_the_project_cites_no_file_outside_it():
  for root in ("mmjax", "docs", "configs", "README.md"):
    full = os.path.join(REPO, root)
    paths = [full] if os.path.isfile(full) else [
        os.path.join(r, f) for r, _, fs in os.walk(full) for f in fs
        if f.endswith((".py", ".md"))]
    for path in paths:
      text = open(path).read()
      assert "DESIGN.md" not in text and ".." + "/shared" not in text, path
