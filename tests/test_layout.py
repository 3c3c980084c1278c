"""The shape of the source tree: imports point one way, and every pass is findable by its name.

The import graph is read from the source with ``ast`` (imports at module level and inside
functions alike), so a cycle that only closes at run time still shows here.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _modules() -> dict[str, Path]:
    """Module name -> source file, for every module of the infoptc package (pyproject's package-dir)."""
    found: dict[str, Path] = {}
    for package, folder in PYPROJECT["package-dir"].items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("").parts
            if any(not (base.joinpath(*rel[:i]) / "__init__.py").is_file() for i in range(len(rel))):
                continue  # not inside a package (e.g. a stray script)
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _package_of(name: str) -> str:
    return name if _is_package(name) else name.rpartition(".")[0]


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:`` (not imported at run time)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _imports(name: str) -> list[tuple[str, str | None, int]]:
    """``(module imported, name taken from it or None, line)`` for every import in ``name``."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    skip = _type_checking_only(tree)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name).split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out += [(module, alias.name, node.lineno) for alias in node.names]
    return out


def _targets(module: str, taken: str | None) -> list[str]:
    """The infoptc modules an import loads and reads from (the parent packages it also runs are
    left out: every submodule would otherwise import its package)."""
    if taken is not None and f"{module}.{taken}" in MODULES:
        return [f"{module}.{taken}"]  # `from pkg import submodule`
    while module and module not in MODULES:
        module = module.rpartition(".")[0]  # `import infoptc.x.y` reads infoptc.x.y; a name's module
    return [module] if module else []


def _graph() -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(MODULES)
    for name in MODULES:
        for module, taken, line in _imports(name):
            for target in _targets(module, taken):
                if target != name:
                    graph.add_edge(name, target, line=line)
    return graph


def test_the_walker_sees_the_package():
    assert {"infoptc", "infoptc.cli", "infoptc.driver", "infoptc.pass_manager", "infoptc.pipelines",
            "infoptc.passes", "infoptc.backends", "infoptc.backends.onnx", "infoptc.backends.tvm"} <= set(MODULES)
    graph = _graph()
    assert graph.has_edge("infoptc.driver", "infoptc.pass_manager")
    assert graph.has_edge("infoptc.driver", "infoptc.ir")  # `from . import ir`


def test_no_import_cycles():
    graph = _graph()
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    details = []
    for component in cycles:
        cycle = nx.find_cycle(graph.subgraph(component))
        details.append(" -> ".join(f"{a} (line {graph.edges[a, b]['line']})" for a, b in cycle) + f" -> {cycle[0][0]}")
    assert not cycles, "import cycles:\n" + "\n".join(details)


def test_the_library_never_imports_the_cli():
    graph = _graph()
    bad = [f"{a} imports {b} (line {graph.edges[a, b]['line']})" for a, b in graph.edges
           if not _in_cli(a) and _in_cli(b)]
    assert not bad, "\n".join(bad)


def _in_cli(name: str) -> bool:
    return name == "infoptc.cli" or name.startswith("infoptc.cli.")


def test_no_private_name_of_another_package_is_imported():
    bad = []
    for name in MODULES:
        for module, taken, line in _imports(name):
            if not (module == "infoptc" or module.startswith("infoptc.")):
                continue
            parts = [*module.split("."), *([taken] if taken else [])]
            private = [p for p in parts if p.startswith("_") and not p.startswith("__")]
            if not private:
                continue
            # The package that owns the private name: the module's package, or the package
            # whose private submodule it is.
            first = parts.index(private[0])
            owner = ".".join(parts[:first])
            if owner in MODULES and not _is_package(owner):
                owner = _package_of(owner)
            if owner != _package_of(name):
                bad.append(f"{name} (line {line}) imports {'.'.join(parts)} from package {owner}")
    assert not bad, "\n".join(bad)


def test_every_package_is_listed_in_pyproject():
    """setuptools installs only the packages pyproject names: a new folder must be listed there."""
    packages = {name for name in MODULES if _is_package(name)}
    assert packages == set(PYPROJECT["packages"]), "add to [tool.setuptools] packages: " + ", ".join(
        sorted(packages - set(PYPROJECT["packages"])))


# ----------------------------------------------------------------------------- passes by name


def _builtin_passes() -> dict[str, type]:
    from infoptc.pass_manager import PASS_REGISTRY
    from infoptc.plugins import load_builtin_passes

    load_builtin_passes()
    return {name: cls for name, cls in PASS_REGISTRY.items() if cls.__module__.startswith("infoptc.passes.")}


def test_the_builtin_passes_are_found():
    names = set(_builtin_passes())
    assert {"dce", "cse", "fold-constants", "fuse-conv-bn", "toposort"} <= names


@pytest.mark.parametrize("name", sorted(_builtin_passes()))
def test_each_builtin_pass_has_its_doc_page_and_test_file(name):
    """A pass named NAME is documented in docs/passes/NAME.md, which names the module that holds
    it, and tested in tests/test_NAME.py (dashes as underscores): it can be found by its name alone."""
    page = ROOT / "docs" / "passes" / f"{name}.md"
    assert page.is_file(), f"docs/passes/{name}.md is missing"
    test_file = f"test_{name.replace('-', '_')}.py"
    assert (ROOT / "tests" / test_file).is_file(), f"tests/{test_file} is missing"
    module = Path(sys.modules[_builtin_passes()[name].__module__].__file__).resolve().relative_to(ROOT)
    assert f"`{module.as_posix()}`" in page.read_text(), f"docs/passes/{name}.md does not name its module {module}"
