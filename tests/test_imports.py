"""No hidden import cycles: leaf modules of rest_jax.rewards / rest_jax.tasks never import their
package's ``__init__`` (which imports them back), and the leaves import each other acyclically.

A static check over every import statement (module level and inside functions), so a cycle
that only bites on some import order, or only when a function first runs, fails here.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "rest_jax"
PACKAGES = ("rewards", "tasks")


def _leaves(package: str) -> list[str]:
  return sorted(p.stem for p in (ROOT / package).glob("*.py") if p.stem != "__init__")


def _imports(package: str, leaf: str) -> list[tuple[int, str]]:
  """(line, imported module) for every import in ``rest_jax/<package>/<leaf>.py``; a name
  imported from the package counts as the package itself unless it is one of its leaves."""
  full, leaves = f"rest_jax.{package}", set(_leaves(package))
  tree = ast.parse((ROOT / package / f"{leaf}.py").read_text(), filename=f"{leaf}.py")
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.extend((node.lineno, alias.name) for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        if node.module == "rest_jax" and alias.name == package:
          out.append((node.lineno, full))
        elif node.module == full:
          out.append((node.lineno, f"{full}.{alias.name}" if alias.name in leaves else full))
        else:
          out.append((node.lineno, node.module))
    elif isinstance(node, ast.ImportFrom) and node.level:
      raise AssertionError(f"{package}/{leaf}.py:{node.lineno}: use absolute imports")
  return sorted(out)


@pytest.mark.parametrize("package", PACKAGES)
def test_leaves_do_not_import_their_package(package):
  bad = [f"{package}/{leaf}.py:{line} imports {module}" for leaf in _leaves(package)
         for line, module in _imports(package, leaf) if module == f"rest_jax.{package}"]
  assert not bad, ("import the leaf module that defines the name instead of the package "
                   "__init__ (which imports the leaves): " + "; ".join(bad))


@pytest.mark.parametrize("package", PACKAGES)
def test_leaves_import_each_other_without_cycles(package):
  prefix = f"rest_jax.{package}."
  graph = {leaf: {m[len(prefix):] for _, m in _imports(package, leaf) if m.startswith(prefix)}
           for leaf in _leaves(package)}
  done: set[str] = set()

  def visit(leaf: str, path: tuple[str, ...]) -> None:
    assert leaf not in path, f"import cycle in rest_jax.{package}: {' -> '.join(path + (leaf,))}"
    if leaf not in done:
      for dep in sorted(graph[leaf]):
        visit(dep, path + (leaf,))
      done.add(leaf)

  for leaf in graph:
    visit(leaf, ())


def test_the_check_sees_a_package_import(tmp_path, monkeypatch):
  """The checks above would flag the forms this refactor removed."""
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "__init__.py").write_text("")
  (tmp_path / "pkg" / "a.py").write_text(
      "from rest_jax import pkg\n"
      "def f():\n  from rest_jax.pkg import NAME\n  from rest_jax.pkg import b\n")
  (tmp_path / "pkg" / "b.py").write_text("import rest_jax.pkg.a\n")
  monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
  assert _imports("pkg", "a") == [(1, "rest_jax.pkg"), (3, "rest_jax.pkg"),
                                  (4, "rest_jax.pkg.b")]
  with pytest.raises(AssertionError, match="imports rest_jax.pkg"):
    test_leaves_do_not_import_their_package("pkg")
  (tmp_path / "pkg" / "a.py").write_text("from rest_jax.pkg import b\n")
  with pytest.raises(AssertionError, match="cycle in rest_jax.pkg: a -> b -> a"):
    test_leaves_import_each_other_without_cycles("pkg")
