"""The import graph: ``defenses/`` is a plain PyTorch and scikit-learn library (nothing of the
orchestrator, Ray, Optuna, MLflow or S3) without import circles. Imports inside functions
count: a circle hidden in a function is still one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("orchestrator", "ray", "optuna", "mlflow", "boto3", "botocore", "pyarrow")


def imports(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Every module of ``package`` (a folder under ``root``) and every module name its code
    imports (absolute)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((root / package).rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)
        graph[module] = names
    return graph


def internal_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph restricted to its own modules (``from a import b`` is an edge to ``a.b`` when
    that is a module, else to ``a``)."""
    edges = {}
    for module, names in graph.items():
        targets = set()
        for name in names:
            while name and name not in graph:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        edges[module] = targets
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_finder_finds_a_circle_hidden_in_a_function(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from . import c\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from pkg import a\n")  # into the circle, not in it
    found = circles(internal_edges(imports("pkg", root=tmp_path)))
    assert found == [["pkg.a", "pkg.b", "pkg.c"]]


def test_defenses_has_no_import_circle():
    assert circles(internal_edges(imports("defenses"))) == []


def test_defenses_imports_no_orchestrator_and_no_service():
    for module, names in imports("defenses").items():
        upward = sorted(n for n in names if n.split(".")[0] in SERVICES)
        assert not upward, (module, upward)
